"""Fixtures for the event log suites: a fake clock and a factory that opens the same storage
for memory, SQLite (a tmp file) and PostgreSQL (a unique table prefix, dropped afterwards).

PostgreSQL is at 127.0.0.1:5432 (tests.support.services): when it is unreachable the postgres
tests skip, except under CI=true, where they fail.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

from centripy.engine.contracts import EventLog
from centripy.storage.memory import MemoryEventLog
from centripy.storage.postgres import PostgresEventLog
from centripy.storage.sql_schema import make_tables
from centripy.storage.sqlite import SqliteEventLog
from tests.support.services import postgres_url

BACKENDS = ("memory", "sqlite", pytest.param("postgres", marks=pytest.mark.postgres))


class FakeClock:
    """A settable clock in seconds (never sleeps)."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.t = start

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


@pytest.fixture(scope="session")
def pg_url() -> str:
    """The test PostgreSQL URL; skips (fails under CI=true) when it is unreachable."""
    return postgres_url()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "events.db"


@pytest.fixture
async def sqlite_log(db_path: Path) -> AsyncIterator[SqliteEventLog]:
    """A started SQLite log in the file `db_path` (no GC task), closed afterwards."""
    log = SqliteEventLog(f"sqlite+aiosqlite:///{db_path}", gc_interval=None)
    await log.start()
    try:
        yield log
    finally:
        await log.close()


def new_prefix() -> str:
    return f"t{uuid.uuid4().hex[:10]}_"


async def drop_prefix(url: str, prefix: str) -> None:
    engine = create_async_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(make_tables(prefix).metadata.drop_all)
    finally:
        await engine.dispose()


class LogFactory:
    """Opens (and later closes) event logs of one kind that all share one storage, so a
    second `open()` is the same database seen by a restarted or another process."""

    def __init__(self, kind: str, clock: FakeClock, tmp_path: Path, pg: str | None) -> None:
        self.kind = kind
        self.clock = clock
        self.persistent = kind != "memory"
        self.url = {
            "memory": "memory://",
            "sqlite": f"sqlite+aiosqlite:///{tmp_path / 'log.db'}",
            "postgres": pg or "",
        }[kind]
        self.prefix = new_prefix()
        self._opened: list[EventLog] = []
        self._memory: MemoryEventLog | None = None

    def build(self) -> EventLog:
        if self.kind == "memory":
            if self._memory is None:
                self._memory = MemoryEventLog(now=self.clock)
            return self._memory
        cls = SqliteEventLog if self.kind == "sqlite" else PostgresEventLog
        return cls(self.url, table_prefix=self.prefix, now=self.clock, gc_interval=None)

    async def open(self) -> EventLog:
        log = self.build()
        await log.start()
        self._opened.append(log)
        return log

    async def rows(self, table: str) -> int:
        """Row count of `table` (e.g. "idempotency") in this factory's SQL storage."""
        tables = make_tables(self.prefix)
        target = {
            "streams": tables.streams,
            "publications": tables.publications,
            "idempotency": tables.idempotency,
        }[table]
        engine = create_async_engine(self.url)
        try:
            async with engine.connect() as conn:
                count = await conn.scalar(sa.select(sa.func.count()).select_from(target))
        finally:
            await engine.dispose()
        return int(count or 0)

    async def counts(self) -> tuple[int, int, int]:
        """(streams, publications, idempotency keys) stored: rows of the SQL tables, or the
        entries of the memory log."""
        if self.kind == "memory":
            assert self._memory is not None
            streams = self._memory._streams
            kept = sum(len(s.pubs) for s in streams.values())
            return len(streams), kept, len(self._memory._seen)
        tables = ("streams", "publications", "idempotency")
        a, b, c = [await self.rows(t) for t in tables]
        return a, b, c

    async def aclose(self) -> None:
        for log in self._opened:
            await log.close()
        if self.kind == "postgres":
            await drop_prefix(self.url, self.prefix)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(params=BACKENDS)
async def logs(
    request: pytest.FixtureRequest, clock: FakeClock, tmp_path: Path
) -> AsyncIterator[LogFactory]:
    pg = request.getfixturevalue("pg_url") if request.param == "postgres" else None
    factory = LogFactory(request.param, clock, tmp_path, pg)
    try:
        yield factory
    finally:
        await factory.aclose()


@pytest.fixture
async def log(logs: LogFactory) -> EventLog:
    return await logs.open()
