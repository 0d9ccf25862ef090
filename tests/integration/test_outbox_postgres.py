"""The PostgreSQL outbox consumer end to end: a real `centripy serve` process consumes an
outbox table in the `test` database and a real centrifuge-python subscriber receives the
publications (docs/spec/server_api.md 4.2)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from tests.integration.consumers_support import (
    PG_DSN,
    PG_NOTIFY_DDL,
    PG_OUTBOX_DDL,
    SERVER_CONFIG,
    channel_name,
    history_data,
    outbox_consumer,
    server_log,
    subscriber,
    unique,
    wait_for_log,
    wait_for_log_count,
)
from tests.support.server import ServerFactory, ServerProcess
from tests.support.services import postgres_url
from tests.support.wait import eventually

pytestmark = [pytest.mark.integration, pytest.mark.postgres, pytest.mark.timeout(30)]


class PgOutbox:
    """A uniquely named outbox table (dropped at teardown) and a connection to fill it."""

    def __init__(self, conn: asyncpg.Connection, notify: str = "") -> None:
        self.conn = conn
        self.table = unique("outbox")
        self.consumer = unique("pg")
        self.notify = notify

    async def create(self) -> None:
        await self.conn.execute(PG_OUTBOX_DDL.format(table=self.table))
        if self.notify:
            await self.conn.execute(PG_NOTIFY_DDL.format(table=self.table, channel=self.notify))

    async def insert(
        self, rows: list[tuple[str, str | dict[str, Any]]], partition: int = 0
    ) -> None:
        """Insert `(method, payload)` rows in one transaction (payload dicts become JSON)."""
        values = [(m, p if isinstance(p, str) else json.dumps(p), partition) for m, p in rows]
        async with self.conn.transaction():
            await self.conn.executemany(
                f"INSERT INTO {self.table} (method, payload, partition) VALUES ($1, $2, $3)",
                values,
            )

    async def publish(self, channel: str, items: list[Any], partition: int = 0) -> None:
        await self.insert([("publish", {"channel": channel, "data": d}) for d in items], partition)

    async def count(self) -> int:
        return int(await self.conn.fetchval(f"SELECT count(*) FROM {self.table}"))

    async def drained(self) -> None:
        """Wait until every row has been consumed (deleted after its batch commits)."""

        async def empty() -> bool:
            return await self.count() == 0

        await eventually(empty, what=f"{self.table} drained", interval=0.02)

    def config(self, **options: Any) -> dict[str, Any]:
        settings = {"partition_poll_interval": "50ms", **options}
        if self.notify:
            settings["partition_notification_channel"] = self.notify
        consumer = outbox_consumer(self.consumer, PG_DSN, self.table, **settings)
        return {**SERVER_CONFIG, "consumers": [consumer]}


@pytest.fixture
async def pg() -> AsyncIterator[list[PgOutbox]]:
    """`outbox = PgOutbox(conn)` factories share one connection; tables dropped after."""
    postgres_url()  # skips (or fails under CI) without PostgreSQL
    conn = await asyncpg.connect(PG_DSN)
    made: list[PgOutbox] = []
    try:
        yield made
    finally:
        for outbox in made:
            await conn.execute(f"DROP TABLE IF EXISTS {outbox.table}")
            await conn.execute(f"DROP FUNCTION IF EXISTS {outbox.table}_notify()")
        await conn.close()


async def new_outbox(made: list[PgOutbox], notify: bool = False) -> PgOutbox:
    conn = await asyncpg.connect(PG_DSN)
    outbox = PgOutbox(conn, unique("chan") if notify else "")
    await outbox.create()
    made.append(outbox)
    return outbox


@pytest.fixture
async def outbox(pg: list[PgOutbox]) -> AsyncIterator[PgOutbox]:
    box = await new_outbox(pg)
    yield box
    await box.conn.close()


@pytest.fixture
async def notify_outbox(pg: list[PgOutbox]) -> AsyncIterator[PgOutbox]:
    box = await new_outbox(pg, notify=True)
    yield box
    await box.conn.close()


async def consumer_backends(outbox: PgOutbox) -> list[int]:
    rows = await outbox.conn.fetch(
        "SELECT pid FROM pg_stat_activity WHERE application_name = $1",
        f"centripy-consumer-{outbox.consumer}",
    )
    return [row["pid"] for row in rows]


async def test_rows_are_delivered_in_order_and_deleted(
    server_factory: ServerFactory, outbox: PgOutbox
) -> None:
    server = server_factory(outbox.config(partition_select_limit=7))
    channel = channel_name()
    async with subscriber(server, channel) as sub:
        for start in (0, 15, 30):
            await outbox.publish(channel, list(range(start, start + 15)))
        assert await sub.wait_count(45) == list(range(45))
    await outbox.drained()
    assert await history_data(server, channel) == list(range(45))


async def test_partitions_keep_their_own_order(
    server_factory: ServerFactory, outbox: PgOutbox
) -> None:
    server = server_factory(outbox.config(num_partitions=3, partition_select_limit=4))
    channels = [channel_name() for _ in range(3)]
    async with (
        subscriber(server, channels[0]) as s0,
        subscriber(server, channels[1]) as s1,
        subscriber(server, channels[2]) as s2,
    ):
        for partition, channel in enumerate(channels):
            await outbox.publish(channel, list(range(20)), partition=partition)
        for sub in (s0, s1, s2):
            assert await sub.wait_count(20) == list(range(20))
    await outbox.drained()


async def test_idempotency_key_duplicates_are_suppressed(
    server_factory: ServerFactory, outbox: PgOutbox
) -> None:
    server = server_factory(outbox.config())
    channel = channel_name()

    def row(data: Any, key: str = "") -> tuple[str, dict[str, Any]]:
        payload: dict[str, Any] = {"channel": channel, "data": data}
        if key:
            payload["idempotency_key"] = key
        return ("publish", payload)

    async with subscriber(server, channel) as sub:
        await outbox.insert([row(1, "k1"), row(1, "k1"), row(2, "k2"), row(1, "k1")])
        await outbox.insert([row(2, "k2"), row("end")])
        assert await sub.wait_count(3) == [1, 2, "end"]
    assert await history_data(server, channel) == [1, 2, "end"]


async def test_garbage_rows_are_skipped(server_factory: ServerFactory, outbox: PgOutbox) -> None:
    server = server_factory(outbox.config())
    channel = channel_name()
    good = {"channel": channel, "data": "good"}
    async with subscriber(server, channel) as sub:
        await outbox.insert(
            [
                ("publish", {"channel": channel, "data": 0}),
                ("publish", '"not an object"'),  # JSON string holding non-JSON
                ("publish", {"channel": 5, "data": 1}),  # does not decode
                ("publish", {"data": 1}),  # 107: no channel
                ("publish", {"channel": "nope:x", "data": 1}),  # 102: unknown namespace
                ("frobnicate", {"x": 1}),  # unknown method: ignored
                ("history", {"channel": channel}),  # read-only: ignored
                ("publish", json.dumps(json.dumps(good))),  # payload as a JSON string
                ("publish", {"channel": channel, "data": 1}),
            ]
        )
        assert await sub.wait_count(3) == [0, "good", 1]
    await eventually(lambda: "skipping publish" in server_log(server), what="skip log line")
    await outbox.drained()
    assert f"{outbox.table} partition 0 id" in server_log(server)


async def test_restart_does_not_apply_rows_again(
    server_factory: ServerFactory, outbox: PgOutbox
) -> None:
    server = server_factory(outbox.config())
    channel = channel_name()
    async with subscriber(server, channel) as sub:
        await outbox.publish(channel, [0, 1, 2, 3, 4])
        assert await sub.wait_count(5) == [0, 1, 2, 3, 4]
    assert server.stop() == 0
    await outbox.drained()
    await outbox.publish(channel, [5, 6, 7])
    server.start()
    async with subscriber(server, channel) as sub:
        await outbox.publish(channel, [8])
        await eventually(lambda: 8 in sub.data)
        # Rows 5-7 may be applied before the subscriber is in: it sees a suffix.
        assert sub.data == [5, 6, 7, 8][-len(sub.data) :]
    assert await history_data(server, channel) == list(range(9))


async def test_terminated_connections_heal(
    server_factory: ServerFactory, notify_outbox: PgOutbox
) -> None:
    outbox = notify_outbox
    # Polling is slow, so prompt delivery after the outage proves LISTEN reconnected.
    server = server_factory(outbox.config(partition_poll_interval="20s"))
    channel = channel_name()
    listening = f"listening on {outbox.notify}"
    await wait_for_log(server, listening)
    async with subscriber(server, channel) as sub:
        await outbox.publish(channel, [0])
        assert await sub.wait_count(1) == [0]
        for round_ in range(2):
            # Kill only idle connections: a batch killed between its dispatch and its
            # COMMIT is applied again (at-least-once; idempotency_key guards against it).
            await outbox.drained()
            before = await consumer_backends(outbox)
            assert before, "the consumer holds connections"
            killed = await outbox.conn.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE application_name = $1",
                f"centripy-consumer-{outbox.consumer}",
            )
            assert killed == len(before)
            await outbox.publish(channel, [f"during-{round_}"])
            await wait_for_log_count(server, listening, round_ + 2)  # LISTEN reconnected
            await outbox.publish(channel, [f"after-{round_}"])
            await sub.wait_count(1 + 2 * (round_ + 1), within=5.0)
    assert sub.data == [0, "during-0", "after-0", "during-1", "after-1"]
    assert "LISTEN" in server_log(server)
    assert set(await consumer_backends(outbox)).isdisjoint(before)


async def test_two_servers_share_one_outbox_in_order(
    server_factory: ServerFactory, notify_outbox: PgOutbox
) -> None:
    outbox = notify_outbox
    config = {
        **outbox.config(partition_select_limit=5),
        "database_url": postgres_url(),  # one event log: history shows the global order
    }
    servers = [server_factory(config), server_factory(config)]
    channel = channel_name()
    async with subscriber(servers[0], channel) as a, subscriber(servers[1], channel) as b:
        for start in range(0, 100, 20):
            await outbox.publish(channel, list(range(start, start + 20)))
        await eventually(lambda: len(a.data) + len(b.data) >= 100, what="100 publications")
    assert sorted(a.data + b.data) == list(range(100))
    assert a.data == sorted(a.data) and b.data == sorted(b.data)
    assert a.data and b.data, "both servers took part"
    assert await history_data(servers[0], channel) == list(range(100))
    await outbox.drained()


async def test_listen_wakes_the_partition_at_once(
    server_factory: ServerFactory, notify_outbox: PgOutbox
) -> None:
    outbox = notify_outbox
    server = server_factory(outbox.config(partition_poll_interval="20s"))
    await wait_for_log(server, f"listening on {outbox.notify}")
    channel = channel_name()
    latencies: list[float] = []
    async with subscriber(server, channel) as sub:
        for i in range(5):
            sent = time.monotonic()
            await outbox.publish(channel, [i])
            await sub.wait_count(i + 1, within=5.0)
            latencies.append(sub.arrived[i] - sent)
            await asyncio.sleep(0.05)  # let the worker go back to its 20 s wait
    assert sub.data == list(range(5))
    assert max(latencies) < 1.0, latencies


async def test_server_refuses_to_start_without_the_database(
    server_factory: ServerFactory,
) -> None:
    config = {
        **SERVER_CONFIG,
        "consumers": [
            outbox_consumer("pgdown", "postgresql://postgres@127.0.0.1:1/test", "outbox")
        ],
    }
    server: ServerProcess = server_factory(config, start=False)
    with pytest.raises(AssertionError, match="exited with code 1"):
        server.start()
    assert "cannot connect to PostgreSQL" in server_log(server)
