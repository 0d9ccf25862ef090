"""PostgreSQL LISTEN/NOTIFY broker (engine `postgresql`) between two nodes (not a test).

A publishing node (this process) sends N publications through `PostgresBroker.publish` from
C concurrent callers; a receiving node (a child process, so its CPU is its own) counts what
its handler gets and stops on a control message sent after the last publication (control
and publications share one commit order, so everything before it was handled). One JSON
line per case:

    .venv/bin/python bench/bench_pg_broker.py                       # all cases
    .venv/bin/python bench/bench_pg_broker.py --sizes 100 --pubs 2000

Cases: `throughput` (payload sizes 100 B / 4 KB / 16 KB, the receiver subscribed to every
channel published to; 16 KB bodies travel through the table) and `sharding` (publications
spread over 256 channels, the receiver subscribed to one: shards=1, every node gets every
publication, against the default 32 shards). Figures: pubs/s and CPU per publication at
the publisher, end-to-end pubs/s (until the receiver handled the stop marker),
notifications the receiver read and its CPU per publication published. Uses a unique
prefix and table in database `test`, dropped afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from centripy.engine.types import ClientInfo, Publication
from centripy.storage.broker_postgres import PostgresBroker, asyncpg_dsn

PG_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
STOP = b"bench-stop"


class Counter:
    """The receiving node's BrokerHandler: counts, and sets `stopped` on the marker."""

    def __init__(self) -> None:
        self.pubs = 0
        self.bytes = 0
        self.reconnects = 0
        self.stopped = asyncio.Event()

    def on_publication(self, channel: str, pub: Publication, epoch: str) -> None:
        self.pubs += 1
        self.bytes += len(pub.data)

    def on_join(self, channel: str, info: ClientInfo) -> None:
        pass

    def on_leave(self, channel: str, info: ClientInfo) -> None:
        pass

    def on_control(self, data: bytes) -> None:
        if data == STOP:
            self.stopped.set()

    def on_reconnect(self) -> None:
        self.reconnects += 1


async def receiver(args: argparse.Namespace) -> None:
    """Child process: subscribe, print `ready`, count until the stop marker, print JSON."""
    handler = Counter()
    broker = PostgresBroker(
        args.pg_url, channel_prefix=args.prefix, table=f"{args.prefix}_msgs", shards=args.shards
    )
    await broker.start(f"recv-{uuid.uuid4().hex[:8]}", handler)
    for channel in args.subscribe.split(","):
        await broker.subscribe(channel)
    print("ready", flush=True)
    cpu0, received0 = time.process_time(), broker.received
    await asyncio.wait_for(handler.stopped.wait(), args.timeout)
    record = {
        "cpu_s": time.process_time() - cpu0,
        "notifications": broker.received - received0,
        "pubs": handler.pubs,
        "bytes": handler.bytes,
        "reconnects": handler.reconnects,
        "overflows": broker.overflows,
        "listened_shards": len(broker.listened_shards()),
    }
    await broker.close()
    print(orjson.dumps(record).decode(), flush=True)


async def run_case(
    args: argparse.Namespace,
    case: str,
    size: int,
    channels: list[str],
    subscribed: list[str],
    shards: int,
) -> dict[str, Any]:
    prefix = f"b{uuid.uuid4().hex[:10]}"
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        __file__,
        "--role=receiver",
        f"--prefix={prefix}",
        f"--shards={shards}",
        f"--subscribe={','.join(subscribed)}",
        f"--pg-url={args.pg_url}",
        stdout=asyncio.subprocess.PIPE,
    )
    assert child.stdout is not None
    publisher = PostgresBroker(
        args.pg_url,
        channel_prefix=prefix,
        table=f"{prefix}_msgs",
        shards=shards,
        pool_size=args.concurrency,
    )
    await publisher.start(f"pub-{uuid.uuid4().hex[:8]}", Counter())
    try:
        line = await asyncio.wait_for(child.stdout.readline(), 30)
        assert line.strip() == b"ready", line
        data = os.urandom(size // 2).hex().encode()[:size]
        per_caller = args.pubs // args.concurrency

        async def caller(c: int) -> None:
            for i in range(per_caller):
                seq = c * per_caller + i  # distinct publications (identical ones are legal too)
                await publisher.publish(
                    channels[seq % len(channels)], Publication(data, seq + 1), "E"
                )

        t0, cpu0 = time.perf_counter(), time.process_time()
        await asyncio.gather(*(caller(c) for c in range(args.concurrency)))
        published = time.perf_counter() - t0
        publisher_cpu = time.process_time() - cpu0
        await publisher.publish_control(STOP)
        line = await asyncio.wait_for(child.stdout.readline(), args.timeout)
        total = time.perf_counter() - t0
        got = orjson.loads(line)
        await child.wait()
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()
        await publisher.close()
        conn = await asyncpg.connect(asyncpg_dsn(args.pg_url))
        try:
            await conn.execute(f"DROP TABLE IF EXISTS {prefix}_msgs")
        finally:
            await conn.close()
    n = per_caller * args.concurrency
    return {
        "case": case,
        "size": size,
        "shards": shards,
        "channels": len(channels),
        "subscribed": len(subscribed),
        "pubs": n,
        "publish_per_s": round(n / published),
        "end_to_end_per_s": round(n / total),
        "publisher_cpu_us_per_pub": round(publisher_cpu / n * 1e6, 1),
        "receiver_notifications": got["notifications"],
        "receiver_pubs": got["pubs"],
        "receiver_cpu_us_per_pub": round(got["cpu_s"] / n * 1e6, 1),
        "receiver_cpu_s": round(got["cpu_s"], 3),
        "receiver_reconnects": got["reconnects"],
        "loadavg": os.getloadavg()[0],
    }


async def main(args: argparse.Namespace) -> None:
    if args.role == "receiver":
        await receiver(args)
        return
    cases = args.cases.split(",")
    if "throughput" in cases:
        chans = [f"chat:{i}" for i in range(8)]
        for size in (int(s) for s in args.sizes.split(",")):
            print(orjson.dumps(await run_case(args, "throughput", size, chans, chans, 32)).decode())
    if "sharding" in cases:
        chans = [f"user:{i}" for i in range(256)]
        for shards in (1, 32):
            record = await run_case(args, "sharding", 100, chans, chans[:1], shards)
            print(orjson.dumps(record).decode())


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pubs", type=int, default=5000)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--sizes", default="100,4096,16384")
    p.add_argument("--cases", default="throughput,sharding")
    p.add_argument("--pg-url", default=PG_URL)
    p.add_argument("--timeout", type=float, default=300.0)
    # the receiving child's own arguments
    p.add_argument("--role", default="publisher", choices=["publisher", "receiver"])
    p.add_argument("--prefix", default="")
    p.add_argument("--shards", type=int, default=32)
    p.add_argument("--subscribe", default="")
    return p.parse_args()


if __name__ == "__main__":
    asyncio.run(main(parse()))
