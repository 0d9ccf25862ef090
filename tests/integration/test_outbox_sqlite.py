"""The outbox consumer on a SQLite file end to end (a centripy extension: a consumer of type
`postgresql` whose dsn is `sqlite:///<path>`): a real `centripy serve` process, the
application writing the file from another process (this test), a real centrifuge-python
subscriber."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiosqlite
import pytest

from tests.integration.consumers_support import (
    SERVER_CONFIG,
    SQLITE_OUTBOX_DDL,
    channel_name,
    history_data,
    outbox_consumer,
    server_log,
    subscriber,
    unique,
)
from tests.support.server import ServerFactory
from tests.support.wait import eventually

pytestmark = [pytest.mark.integration, pytest.mark.timeout(30)]


class SqliteOutbox:
    """An outbox table in a SQLite file, written like an application would."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.table = unique("outbox")
        self.consumer = unique("lite")

    @property
    def dsn(self) -> str:
        return f"sqlite:///{self.path}"  # absolute path: sqlite:////tmp/...

    async def create(self) -> None:
        async with aiosqlite.connect(self.path) as db:
            await db.execute(SQLITE_OUTBOX_DDL.format(table=self.table))
            await db.commit()

    async def insert(
        self, rows: list[tuple[str, str | dict[str, Any]]], partition: int = 0
    ) -> None:
        values = [(m, p if isinstance(p, str) else json.dumps(p), partition) for m, p in rows]
        async with aiosqlite.connect(self.path, timeout=10) as db:
            await db.executemany(
                f"INSERT INTO {self.table} (method, payload, partition) VALUES (?, ?, ?)", values
            )
            await db.commit()

    async def publish(self, channel: str, items: list[Any]) -> None:
        await self.insert([("publish", {"channel": channel, "data": d}) for d in items])

    async def count(self) -> int:
        async with (
            aiosqlite.connect(self.path, timeout=10) as db,
            db.execute(f"SELECT count(*) FROM {self.table}") as cursor,
        ):
            row = await cursor.fetchone()
        assert row is not None
        return int(row[0])

    async def drained(self) -> None:
        async def empty() -> bool:
            return await self.count() == 0

        await eventually(empty, what=f"{self.table} drained", interval=0.02)

    def config(self, **options: Any) -> dict[str, Any]:
        settings = {"partition_poll_interval": "20ms", **options}
        consumer = outbox_consumer(self.consumer, self.dsn, self.table, **settings)
        return {**SERVER_CONFIG, "consumers": [consumer]}


@pytest.fixture
async def outbox(tmp_path: Path) -> SqliteOutbox:
    box = SqliteOutbox(tmp_path / "app.db")
    await box.create()
    return box


async def test_rows_are_delivered_in_order_and_deleted(
    server_factory: ServerFactory, outbox: SqliteOutbox
) -> None:
    server = server_factory(outbox.config(partition_select_limit=6))
    channel = channel_name()
    async with subscriber(server, channel) as sub:
        for start in range(0, 40, 10):
            await outbox.publish(channel, list(range(start, start + 10)))
        assert await sub.wait_count(40) == list(range(40))
    await outbox.drained()
    assert await history_data(server, channel) == list(range(40))


async def test_application_writes_while_the_consumer_works(
    server_factory: ServerFactory, outbox: SqliteOutbox
) -> None:
    """The app's small transactions wait for the consumer's write lock, never fail."""
    server = server_factory(outbox.config(partition_select_limit=5, partition_poll_interval="1ms"))
    channel = channel_name()
    async with subscriber(server, channel) as sub:
        for i in range(60):
            await outbox.publish(channel, [i])
        assert await sub.wait_count(60) == list(range(60))


async def test_garbage_rows_are_skipped(
    server_factory: ServerFactory, outbox: SqliteOutbox
) -> None:
    server = server_factory(outbox.config())
    channel = channel_name()
    async with subscriber(server, channel) as sub:
        await outbox.insert(
            [
                ("publish", {"channel": channel, "data": 0}),
                ("publish", "not json at all"),
                ("publish", "[1, 2]"),
                ("publish", {"channel": channel}),  # 107: no data
                ("unknown_method", {"channel": channel, "data": "x"}),
                ("publish", json.dumps(json.dumps({"channel": channel, "data": "str"}))),
                ("publish", {"channel": channel, "data": 1}),
            ]
        )
        assert await sub.wait_count(3) == [0, "str", 1]
    await outbox.drained()
    assert server_log(server).count("skipping") == 3


async def test_restart_does_not_apply_rows_again(
    server_factory: ServerFactory, outbox: SqliteOutbox
) -> None:
    server = server_factory(outbox.config())
    channel = channel_name()
    async with subscriber(server, channel) as sub:
        await outbox.publish(channel, [0, 1, 2])
        assert await sub.wait_count(3) == [0, 1, 2]
    assert server.stop() == 0
    await outbox.drained()
    await outbox.publish(channel, [3, 4])
    server.start()
    async with subscriber(server, channel) as sub:
        await outbox.publish(channel, [5])
        await eventually(lambda: 5 in sub.data)
        assert sub.data == [3, 4, 5][-len(sub.data) :]
    assert await history_data(server, channel) == list(range(6))


async def test_two_servers_share_one_file_without_duplicates(
    server_factory: ServerFactory, outbox: SqliteOutbox
) -> None:
    config = outbox.config(partition_select_limit=4)
    servers = [server_factory(config), server_factory(config)]
    channel = channel_name()
    async with subscriber(servers[0], channel) as a, subscriber(servers[1], channel) as b:
        for start in range(0, 80, 20):
            await outbox.publish(channel, list(range(start, start + 20)))
        await eventually(lambda: len(a.data) + len(b.data) >= 80, what="80 publications")
    assert sorted(a.data + b.data) == list(range(80))
    assert a.data == sorted(a.data) and b.data == sorted(b.data)
    await outbox.drained()


async def test_server_refuses_to_start_without_the_file(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    consumer = outbox_consumer("litedown", f"sqlite:///{tmp_path}/missing.db", "outbox")
    server = server_factory({**SERVER_CONFIG, "consumers": [consumer]}, start=False)
    with pytest.raises(AssertionError, match="exited with code 1"):
        server.start()
    assert "cannot read SQLite table" in server_log(server)
    assert not (tmp_path / "missing.db").exists()
