"""The outbox consumer on a SQLite database file (a centripy extension).

A consumer of type `postgresql` whose `dsn` is `sqlite:///<path>` (SQLAlchemy's form:
`sqlite:///app.db` is relative to the server's working directory, `sqlite:////abs/app.db`
is absolute; `sqlite+aiosqlite://` is accepted too) reads the outbox table of that file:

    CREATE TABLE centrifugo_outbox (id INTEGER PRIMARY KEY AUTOINCREMENT,
      method TEXT NOT NULL, payload TEXT NOT NULL, partition INTEGER NOT NULL DEFAULT 0,
      created_at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP);

The algorithm is the PostgreSQL one (see centripy/consumers/outbox.py). SQLite has no
advisory locks: a batch runs inside `BEGIN IMMEDIATE`, which takes the database's write lock,
so two processes never work a partition at once (the other waits up to the busy timeout and
retries). A quick lock-free look first skips the write lock when the partition is empty, so
an idle consumer does not contend with the application's writes. Polling only (no NOTIFY).
Each partition has its own aiosqlite connection; everything runs on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import sqlite3
import urllib.parse
from collections.abc import Sequence
from pathlib import Path
from typing import Final

import aiosqlite

from centripy.consumers.dispatch import (
    BatchOutcome,
    ConsumerStartError,
    Item,
    outbox_item,
)
from centripy.consumers.outbox import Apply

log = logging.getLogger("centripy.consumers")

BUSY_TIMEOUT: Final = 5.0  # seconds to wait for another writer's lock
CLOSE_TIMEOUT: Final = 3.0
DELETE_CHUNK: Final = 500  # ids per DELETE (SQLite caps bound parameters)
SCHEMES: Final = ("sqlite://", "sqlite+aiosqlite://")
_IDENT: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def is_sqlite_dsn(dsn: str) -> bool:
    return dsn.startswith(SCHEMES)


def sqlite_path(dsn: str) -> Path:
    """The database file of a `sqlite:///path` DSN (query string ignored)."""
    for scheme in SCHEMES:
        if dsn.startswith(scheme):
            rest = dsn[len(scheme) :]
            break
    else:
        raise ConsumerStartError(f"not a sqlite DSN: {dsn!r}")
    if not rest.startswith("/") or rest == "/":
        raise ConsumerStartError(f"sqlite DSN needs a file path (sqlite:///app.db): {dsn!r}")
    path = urllib.parse.unquote(rest[1:].partition("?")[0])
    if not path or path == ":memory:":
        raise ConsumerStartError(f"sqlite DSN needs a database file, got {dsn!r}")
    return Path(path)


def table_identifier(name: str) -> str:
    if not _IDENT.fullmatch(name):
        raise ConsumerStartError(f"outbox_table_name {name!r} is not a plain table identifier")
    return name


class SqliteOutboxStore:
    """The outbox table of a SQLite file; one connection per partition worker."""

    def __init__(self, consumer: str, dsn: str, table: str) -> None:
        self.consumer = consumer
        self.path = sqlite_path(dsn)
        self.table = table_identifier(table)
        self.label = f'SQLite table "{table}" in {self.path}'
        self._conns: dict[int, aiosqlite.Connection] = {}
        self._peek = f"SELECT 1 FROM {self.table} WHERE partition = ? LIMIT 1"
        self._select = (
            f"SELECT id, method, payload FROM {self.table} "
            "WHERE partition = ? ORDER BY id ASC LIMIT ?"
        )

    async def _connect(self) -> aiosqlite.Connection:
        # mode=rw: a missing file is an error, not a new empty database.
        uri = f"file:{urllib.parse.quote(str(self.path))}?mode=rw"
        conn = aiosqlite.connect(uri, uri=True, timeout=BUSY_TIMEOUT, isolation_level=None)
        try:
            return await conn
        except BaseException:
            # aiosqlite stops the worker thread of a failed connect without waiting for it;
            # the thread then posts to this loop, possibly after it closed: wait for it.
            await asyncio.to_thread(conn._thread.join, CLOSE_TIMEOUT)
            raise

    async def start(self) -> None:
        try:
            conn = await self._connect()
            try:
                await conn.execute(f"SELECT count(*) FROM {self.table} WHERE 0")
            finally:
                await conn.close()
        except sqlite3.Error as exc:
            raise ConsumerStartError(
                f"consumer {self.consumer}: cannot read {self.label}: {exc}"
            ) from exc

    async def _conn(self, partition: int) -> aiosqlite.Connection:
        conn = self._conns.get(partition)
        if conn is None:
            conn = self._conns[partition] = await self._connect()
        return conn

    async def _drop(self, partition: int) -> None:
        conn = self._conns.pop(partition, None)
        if conn is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), CLOSE_TIMEOUT)

    async def process(self, partition: int, limit: int, apply: Apply) -> tuple[int, BatchOutcome]:
        try:
            return await self._process(await self._conn(partition), partition, limit, apply)
        except BaseException:
            await self._drop(partition)  # a fresh connection next time (rolls back)
            raise

    async def _process(
        self, conn: aiosqlite.Connection, partition: int, limit: int, apply: Apply
    ) -> tuple[int, BatchOutcome]:
        async with conn.execute(self._peek, (partition,)) as cursor:
            if await cursor.fetchone() is None:
                return 0, BatchOutcome()
        await conn.execute("BEGIN IMMEDIATE")
        async with conn.execute(self._select, (partition, limit)) as cursor:
            rows = list(await cursor.fetchall())
        where = f"{self.table} partition {partition} id"
        items: list[Item] = [outbox_item(r[1], r[2], f"{where} {r[0]}") for r in rows]
        outcome = await apply(items)
        await self._delete([row[0] for row in rows[: outcome.done]], conn)
        await conn.execute("COMMIT")
        return len(rows), outcome

    async def _delete(self, ids: Sequence[int], conn: aiosqlite.Connection) -> None:
        for start in range(0, len(ids), DELETE_CHUNK):
            chunk = ids[start : start + DELETE_CHUNK]
            marks = ",".join("?" * len(chunk))
            await conn.execute(f"DELETE FROM {self.table} WHERE id IN ({marks})", chunk)

    async def close(self) -> None:
        for partition in list(self._conns):
            await self._drop(partition)
