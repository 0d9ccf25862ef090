"""Consumer throughput and latency (not a test): a real `centripy serve` process consumes a
PostgreSQL outbox (with LISTEN/NOTIFY), a SQLite outbox and a Kafka topic (Tansu); a real
centrifuge-python subscriber receives the publications. Prints one JSON line per back end:

    .venv/bin/python bench/bench_consumers.py --rows 5000 --samples 200
    .venv/bin/python bench/bench_consumers.py --partitions 4 --fetch-max-wait-ms 20
    .venv/bin/python bench/bench_consumers.py --backends sqlite --select-limit 500

throughput: `rows` commands written at once (outbox: transactions of 1000 rows; Kafka: one
producer flush), commands/s = rows / (last delivery - first write).
latency: `samples` single commands written one at a time (every `--gap` s), each carrying its
send time; insert-to-subscriber latency p50/p95/p99/max in milliseconds. A partition applies
its commands one after another (each publish waits for its log commit), so throughput grows
with --partitions. Tansu holds a Kafka fetch for about half of --fetch-max-wait-ms even when
records arrive (a real Kafka broker answers at once), which dominates Kafka latency here.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
from centrifuge import Client, PublicationContext, SubscriptionEventHandler
from kafka import KafkaAdminClient, KafkaProducer
from kafka.admin import NewTopic

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.integration.conftest import make_jwt
from tests.support.server import ServerProcess
from tests.support.services import TansuBroker

PG_DSN = "postgresql://postgres@127.0.0.1:5432/test"
CONFIG: dict[str, Any] = {
    "api_key": "bench",
    "token_hmac_secret_key": "bench-secret-bench-secret-bench-secret",
    "log_level": "warn",
    "namespaces": [
        {
            "name": "bench",
            "history_size": 100,
            "history_ttl": "300s",
            "allow_subscribe_for_client": True,
        }
    ],
}
Row = tuple[str, int]  # (publish payload JSON, partition)
Writer = Callable[[list[Row]], Awaitable[None]]  # writes publish commands


class Counter(SubscriptionEventHandler):  # type: ignore[misc]
    def __init__(self) -> None:
        self.count = 0
        self.latencies: list[float] = []
        self.last = 0.0
        self.changed = asyncio.Event()

    async def on_publication(self, ctx: PublicationContext) -> None:
        now = time.time()
        self.count += 1
        self.last = time.monotonic()
        sent = ctx.pub.data.get("t") if isinstance(ctx.pub.data, dict) else None
        if sent is not None:
            self.latencies.append(now - sent)
        self.changed.set()

    async def wait(self, count: int, within: float) -> None:
        async with asyncio.timeout(within):
            while self.count < count:
                self.changed.clear()
                await self.changed.wait()


def row(channel: str, i: int, partitions: int, stamp: bool = False) -> Row:
    data: dict[str, Any] = {"i": i}
    if stamp:
        data["t"] = time.time()
    return json.dumps({"channel": channel, "data": data}), i % partitions


async def measure(
    name: str, server: ServerProcess, write: Writer, args: argparse.Namespace
) -> dict[str, Any]:
    channel = f"bench:{uuid.uuid4().hex[:8]}"
    client = Client(
        server.ws_url, token=make_jwt("bench", secret=CONFIG["token_hmac_secret_key"]), proxy=None
    )
    counter = Counter()
    sub = client.new_subscription(channel, events=counter)
    await client.connect()
    await sub.subscribe()
    await sub.ready(timeout=10)
    try:
        await write([row(channel, 0, 1)])  # warm-up (Kafka: the group join)
        await counter.wait(1, 60)
        start = time.monotonic()
        for first in range(0, args.rows, 1000):
            batch = range(first, min(args.rows, first + 1000))
            await write([row(channel, i, args.partitions) for i in batch])
        await counter.wait(1 + args.rows, 300)
        elapsed = counter.last - start
        counter.latencies.clear()
        for i in range(args.samples):
            await write([row(channel, i, args.partitions, stamp=True)])
            await asyncio.sleep(args.gap)
        await counter.wait(1 + args.rows + args.samples, 60)
    finally:
        await client.disconnect()
    ms = sorted(x * 1000 for x in counter.latencies)
    return {
        "backend": name,
        "rows": args.rows,
        "partitions": args.partitions,
        "commands_per_s": round(args.rows / elapsed),
        "latency_ms": {
            "p50": round(statistics.median(ms), 2),
            "p95": round(ms[int(len(ms) * 0.95) - 1], 2),
            "p99": round(ms[int(len(ms) * 0.99) - 1], 2),
            "max": round(ms[-1], 2),
        },
    }


async def pg_writer(table: str) -> tuple[Writer, Callable[[], Awaitable[None]]]:
    conn = await asyncpg.connect(PG_DSN)
    await conn.execute(
        f"CREATE TABLE {table} (id BIGSERIAL PRIMARY KEY, method text NOT NULL, "
        "payload JSONB NOT NULL, partition INTEGER NOT NULL default 0, "
        "created_at TIMESTAMPTZ DEFAULT now() NOT NULL)"
    )
    await conn.execute(
        f"CREATE FUNCTION {table}_n() RETURNS TRIGGER AS $$ BEGIN "
        f"PERFORM pg_notify('{table}', NEW.partition::text); RETURN NEW; END; $$ LANGUAGE plpgsql;"
        f"CREATE TRIGGER {table}_t AFTER INSERT ON {table} "
        f"FOR EACH ROW EXECUTE FUNCTION {table}_n();"
    )

    async def write(rows: list[Row]) -> None:
        async with conn.transaction():
            await conn.executemany(
                f"INSERT INTO {table} (method, payload, partition) VALUES ('publish', $1, $2)",
                rows,
            )

    async def cleanup() -> None:
        await conn.execute(f"DROP TABLE {table}; DROP FUNCTION {table}_n()")
        await conn.close()

    return write, cleanup


def sqlite_writer(path: Path, table: str) -> Writer:
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(
            f"CREATE TABLE {table} (id INTEGER PRIMARY KEY AUTOINCREMENT, method TEXT NOT NULL, "
            "payload TEXT NOT NULL, partition INTEGER NOT NULL DEFAULT 0)"
        )

    def insert(rows: list[Row]) -> None:
        with sqlite3.connect(path, timeout=30) as db:
            db.executemany(
                f"INSERT INTO {table} (method, payload, partition) VALUES ('publish', ?, ?)",
                rows,
            )

    async def write(rows: list[Row]) -> None:
        await asyncio.to_thread(insert, rows)

    return write


def kafka_writer(
    broker: TansuBroker, topic: str, partitions: int
) -> tuple[Writer, Callable[[], None]]:
    admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap_servers)
    admin.create_topics([NewTopic(topic, partitions, 1)])
    admin.close()
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap_servers, linger_ms=1)

    def send(rows: list[Row]) -> None:
        for payload, partition in rows:
            value = b'{"method":"publish","payload":' + payload.encode() + b"}"
            producer.send(topic, value=value, partition=partition)
        producer.flush(timeout=30)

    async def write(rows: list[Row]) -> None:
        await asyncio.to_thread(send, rows)

    return write, producer.close


async def main(args: argparse.Namespace) -> None:
    """Set up the selected back ends and one server, measure each; every table, broker and
    process made here is removed/stopped on the way out, whatever fails."""
    tmp = Path(tempfile.mkdtemp(prefix="bench_consumers_"))
    token = uuid.uuid4().hex[:8]
    backends = args.backends.split(",")
    consumers: list[dict[str, Any]] = []
    writers: dict[str, Writer] = {}
    common = {"partition_select_limit": args.select_limit, "num_partitions": args.partitions}
    async with contextlib.AsyncExitStack() as stack:
        if "postgresql" in backends:
            table = f"bench_pg_{token}"
            writers["postgresql"], cleanup = await pg_writer(table)
            stack.push_async_callback(cleanup)
            pg = {"dsn": PG_DSN, "outbox_table_name": table, **common}
            pg["partition_notification_channel"] = table
            consumers.append({"name": "pg", "type": "postgresql", "postgresql": pg})
        if "sqlite" in backends:
            table = f"bench_lite_{token}"
            writers["sqlite"] = sqlite_writer(tmp / "app.db", table)
            lite = {"dsn": f"sqlite:///{tmp / 'app.db'}", "outbox_table_name": table, **common}
            lite["partition_poll_interval"] = args.sqlite_poll
            consumers.append({"name": "lite", "type": "postgresql", "postgresql": lite})
        if "kafka" in backends:
            broker = TansuBroker(tmp / "tansu").start()
            stack.callback(broker.stop)
            topic = f"bench_{token}"
            writers["kafka"], close = kafka_writer(broker, topic, args.partitions)
            stack.callback(close)
            kafka = {
                "brokers": [broker.bootstrap_servers], "topics": [topic],
                "consumer_group": topic, "max_poll_records": args.max_poll_records,
            }  # fmt: skip
            consumers.append({"name": "kafka", "type": "kafka", "kafka": kafka})
        env = {
            "CENTRIPY_KAFKA_SESSION_TIMEOUT_MS": "2000",
            "CENTRIPY_KAFKA_HEARTBEAT_INTERVAL_MS": "500",
            "CENTRIPY_KAFKA_FETCH_MAX_WAIT_MS": str(args.fetch_max_wait_ms),
        }
        server = ServerProcess({**CONFIG, "consumers": consumers}, tmp / "server", env=env)
        stack.callback(lambda: server.running and server.stop())
        server.start()
        for name in backends:
            print(json.dumps(await measure(name, server, writers[name], args)), flush=True)
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="postgresql,sqlite,kafka")
    parser.add_argument("--rows", type=int, default=5000)
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--gap", type=float, default=0.01, help="seconds between latency samples")
    parser.add_argument("--partitions", type=int, default=1, help="outbox/topic partitions")
    parser.add_argument("--select-limit", type=int, default=100)
    parser.add_argument("--max-poll-records", type=int, default=100)
    parser.add_argument(
        "--fetch-max-wait-ms", type=int, default=500,
        help="Kafka fetch wait (Tansu holds every fetch about half of it)",
    )  # fmt: skip
    parser.add_argument("--sqlite-poll", default="10ms", help="SQLite partition_poll_interval")
    asyncio.run(main(parser.parse_args()))
