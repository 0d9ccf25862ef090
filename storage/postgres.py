"""PostgreSQL event log (`postgresql+asyncpg://...`), the production back end.

Safe with several server processes appending to the same channel: offsets are assigned by
a row-locking upsert on the streams table inside the batch transaction and idempotency keys
are claimed by insert-on-conflict in the same transaction (see storage/sql.py). Nothing is
cached between calls, so another process's writes are always seen.
"""

from __future__ import annotations

import contextlib
import functools
import time
import zlib
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, TypeVar

import asyncpg
import orjson
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from centripy.storage.rules import DEFAULT_GC_INTERVAL
from centripy.storage.sql import Plan, Rows, SqlEventLog, Window, run_plan
from centripy.storage.sql_statements import PUB_COLUMNS, Session, Sql, Statements, json_dumps

T = TypeVar("T")

SCHEME = "postgresql+asyncpg"
# Errors after which no pooled connection is trusted (the server went away or restarted).
LOST_CONNECTION = (
    asyncpg.ConnectionDoesNotExistError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    ConnectionError,
)


def windows_sql(table: str, *, reverse: bool) -> Sql:
    """Read many windows (arrays: index, channel, lo, hi, limit) in one statement: each
    window's publications in offset order (descending when `reverse`), its index first."""
    order = "DESC" if reverse else "ASC"
    cols = ", ".join(f'p."{c}"' for c in PUB_COLUMNS[1:])
    outer = ", ".join(f'w."{c}"' for c in PUB_COLUMNS[1:])
    text = (
        f"SELECT q.i, {outer} FROM unnest($1::int4[], $2::text[], $3::int8[], $4::int8[], "
        "$5::int8[]) AS q(i, channel, lo, hi, lim) CROSS JOIN LATERAL ("
        f'SELECT {cols} FROM "{table}" AS p WHERE p."channel" = q.channel '
        f'AND p."offset" >= q.lo AND p."offset" <= q.hi ORDER BY p."offset" {order} '
        f'LIMIT q.lim) AS w ORDER BY q.i, w."offset" {order}'
    )
    return Sql(text, (), {})


class PostgresSession(Session):
    """Statements on the raw asyncpg connection (its prepared-statement cache applies)."""

    def __init__(self, raw: asyncpg.Connection) -> None:
        self._raw = raw

    async def fetch(self, sql: Sql, args: Sequence[Any] = ()) -> Sequence[Sequence[Any]]:
        return await self._raw.fetch(sql.text, *args)  # type: ignore[no-any-return]

    async def execute(self, sql: Sql, args: Sequence[Any] = ()) -> None:
        await self._raw.execute(sql.text, *args)

    async def executemany(self, sql: Sql, rows: Sequence[Sequence[Any]]) -> None:
        await self._raw.executemany(sql.text, rows)


class PostgresEventLog(SqlEventLog):
    """Event log in PostgreSQL through a pooled asyncpg engine. Methods run on the event
    loop; appends normally come from the node's one GroupCommitWriter, reads run beside."""

    driver_errors = (*SqlEventLog.driver_errors, asyncpg.PostgresError, asyncpg.InterfaceError)

    def __init__(
        self,
        url: str,
        *,
        table_prefix: str = "centripy_",
        now: Callable[[], float] = time.time,
        gc_interval: float | None = DEFAULT_GC_INTERVAL,
        pool_size: int = 10,
        max_overflow: int = 10,
        connect_timeout: float = 10.0,
    ) -> None:
        parsed = sa.make_url(url)
        if parsed.drivername != SCHEME:
            raise ValueError(
                f"PostgresEventLog needs a {SCHEME}:// URL, got {parsed.drivername}://"
            )
        super().__init__(
            url, insert=pg_insert, table_prefix=table_prefix, now=now, gc_interval=gc_interval
        )
        self._pool_size = pool_size
        self._max_overflow = max_overflow
        self._connect_timeout = connect_timeout
        self._pool_stale = False  # a session lost its connection: renew the pool

    def _make_engine(self) -> AsyncEngine:
        engine = create_async_engine(
            self.url,
            pool_size=self._pool_size,
            max_overflow=self._max_overflow,
            json_serializer=json_dumps,
            json_deserializer=orjson.loads,
            connect_args={
                "timeout": self._connect_timeout,
                "server_settings": {"application_name": "centripy"},
            },
        )
        sa.event.listen(engine.sync_engine, "checkout", self._on_checkout)
        return engine

    def _on_checkout(self, dbapi_conn: Any, _record: Any, _proxy: Any) -> None:
        """Pool checkout (in SQLAlchemy's greenlet, on the loop): a connection the server
        closed (a restart: asyncpg saw the socket end), or any pooled one after a session
        lost its connection, is not handed out; the pool drops every connection made before
        now and opens a fresh one, so an outage costs no failed batch per stale connection."""
        stale, self._pool_stale = self._pool_stale, False
        if stale or dbapi_conn.driver_connection.is_closed():
            raise sa.exc.InvalidatePoolError("connection lost")

    def _read_windows(self, sql: Statements, windows: Sequence[Window]) -> Plan[Sequence[Rows]]:
        """Every window in one statement per direction: a reconnect storm's 2,000 recoveries
        of 2,000 channels are then 1 round trip, not 2,000 (`windows_sql`)."""
        if len(windows) < 2:
            return (yield from super()._read_windows(sql, windows))
        out: list[list[Sequence[Any]]] = [[] for _ in windows]
        for reverse in (False, True):
            picked = [i for i, w in enumerate(windows) if w.reverse is reverse]
            if not picked:
                continue
            columns = zip(*(windows[i][:4] for i in picked), strict=True)
            stmt = self._windows[reverse]
            for row in (yield ("fetch", stmt, (picked, *map(list, columns)))):
                out[row[0]].append(row[1:])
        return out

    @functools.cached_property
    def _windows(self) -> tuple[Sql, Sql]:
        table = self.tables.publications.name
        return windows_sql(table, reverse=False), windows_sql(table, reverse=True)

    async def _transact(self, plan: Plan[T], *, small: bool = True) -> T:
        async with self._session() as session:
            return await run_plan(plan, session)

    @contextlib.asynccontextmanager
    async def _session(self) -> AsyncIterator[Session]:
        async with self.engine.connect() as conn:
            raw = (await conn.get_raw_connection()).driver_connection
            assert isinstance(raw, asyncpg.Connection)
            try:
                async with raw.transaction():
                    yield PostgresSession(raw)
            except BaseException as exc:
                if raw.is_closed() or isinstance(exc, LOST_CONNECTION):
                    self._pool_stale = True  # the others may be dead too (a restart)
                if raw.is_closed() or raw.is_in_transaction():
                    await conn.invalidate()  # unusable (lost, or mid-cancel): do not reuse
                raise

    async def _lock_schema(self, conn: AsyncConnection) -> None:
        """Several processes may start at once: one migrates, the others wait and find the
        tables in place."""
        key = zlib.crc32(self.tables.streams.name.encode())
        await conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": key})
