"""SQLite event log (`sqlite+aiosqlite:///path.db`): the embedded default
(docs/design/ARCHITECTURE.md decision 3). WAL, synchronous=NORMAL, and ONE connection through
which every transaction runs in turn (`BEGIN IMMEDIATE`): one process owns the file, and SQLite
allows one writer at a time anyway. Reads touch stream meta, so they use that connection too.
The log checks that connection out of the engine's pool once, at start, and keeps it until
close (a checkout per transaction cost ~0.3 ms of the event loop's time); the pool may open one
more connection for callers of `engine` itself (tools, tests).

Where a transaction runs (`SqliteEventLog._transact`): a small one (an append of at most
`SMALL_ROWS` rows, a history read) runs on the event loop's own thread, through the sqlite3
connection under aiosqlite's (opened with `check_same_thread=False`). It holds the loop for
~0.1-0.3 ms (a single publish) to ~5 ms (a group of 400 rows), which costs less than the hop to
aiosqlite's worker thread and back (a queue put, a self-pipe wake-up, futures, and GIL hand-offs
with the loop at every statement): single publishes +38%/s and half the p99 of many small
channels at 2,000/s in the benchmarks, and groups of 400 rows 14-34% more rows/s for 8-22% less
CPU (bench/bench_log.py). Larger appends (beyond what one writer batch holds) and the GC run on
the worker thread, where SQLite's own work proceeds beside the loop. The connection's busy
timeout is 0, so the loop never waits for a lock another connection holds: a small transaction
that finds the database locked goes to the worker thread, which waits up to `busy_timeout`
for it. While a transaction is on the worker thread, later ones queue behind it there, so
transactions never interleave and run in the order they were made.

The database file holds every publication: it is created owner-only (0600) before SQLite opens
it, and SQLite gives its `-wal` and `-shm` files the mode of the database file.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import os
import sqlite3
import time
from collections.abc import Callable
from typing import Any, TypeVar, cast

import aiosqlite
import orjson
import sqlalchemy as sa
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import AsyncAdaptedQueuePool, StaticPool

from centripy.engine.contracts import StorageError
from centripy.storage.rules import DEFAULT_GC_INTERVAL
from centripy.storage.sql import Plan, SqlEventLog
from centripy.storage.sql_statements import json_dumps
from centripy.storage.sqlite_wal import BACKSTOP_PAGES, WalCheckpointer

T = TypeVar("T")

SCHEME = "sqlite+aiosqlite"


def is_memory_url(url: str) -> bool:
    """True for an in-memory database URL (no file path or ':memory:')."""
    path = sa.make_url(url).database
    return not path or path == ":memory:"


def create_private_file(url: str) -> None:
    """Create the database file of `url` with mode 0600 if it does not exist yet.

    Called on the event loop before the engine opens its connection (one quick syscall).
    Not touched: in-memory and `file:` URI databases, and an existing file (its mode is the
    operator's choice). Other OS errors are left for SQLite to report when it opens the path."""
    parsed = sa.make_url(url)
    path = parsed.database
    if is_memory_url(url) or path is None or path.startswith("file:") or "uri" in parsed.query:
        return
    with contextlib.suppress(OSError):  # FileExistsError included: O_EXCL never follows links
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


class Busy(enum.Enum):
    """`try_transaction` found the database locked by another connection."""

    BUSY = "busy"


BUSY = Busy.BUSY


def run_transaction(db: sqlite3.Connection, plan: Plan[T], wait_ms: int = 0) -> T:
    """Run `plan` in one `BEGIN IMMEDIATE` .. `COMMIT` on `db` (ROLLBACK when a step
    raises; the error propagates). BEGIN waits up to `wait_ms` for another connection's
    write lock (the log's connection keeps a busy timeout of 0 otherwise)."""
    if wait_ms:
        db.execute(f"PRAGMA busy_timeout={wait_ms}")
    try:
        db.execute("BEGIN IMMEDIATE")
    except BaseException:
        plan.close()
        raise
    finally:
        if wait_ms:
            db.execute("PRAGMA busy_timeout=0")
    return _run_begun(db, plan)


def try_transaction(db: sqlite3.Connection, plan: Plan[T]) -> T | Busy:
    """`run_transaction` without waiting: `BUSY` (and `plan` untouched) when another
    connection holds the write lock."""
    try:
        db.execute("BEGIN IMMEDIATE")
    except sqlite3.OperationalError as exc:
        if exc.sqlite_errorcode == sqlite3.SQLITE_BUSY:
            return BUSY
        plan.close()
        raise
    return _run_begun(db, plan)


def _run_begun(db: sqlite3.Connection, plan: Plan[T]) -> T:
    try:
        reply: Any = None
        try:
            while True:
                kind, stmt, args = plan.send(reply)
                if kind == "fetch":
                    reply = db.execute(stmt.text, args).fetchall()
                elif kind == "executemany":
                    reply = db.executemany(stmt.text, args)
                else:
                    reply = db.execute(stmt.text, args)
        except StopIteration as stop:
            result: T = stop.value
        db.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(Exception):
            db.execute("ROLLBACK")
        raise
    finally:
        plan.close()
    return result


async def in_worker(raw: aiosqlite.Connection, function: Callable[[sqlite3.Connection], T]) -> T:
    """`function(db)` on the aiosqlite connection's worker thread, in turn with its other
    calls, as aiosqlite runs each of its own methods (`Connection._execute`; `_conn` is the
    sqlite3 connection). aiosqlite is pinned below 0.23 for these two private names; a
    statement per call would cost one thread hop each."""
    proxy = cast(Any, raw)
    return cast(T, await proxy._execute(lambda: function(proxy._conn)))


class SqliteEventLog(SqlEventLog):
    """Event log in one SQLite file. Methods run on the event loop; each transaction runs
    whole on the loop's thread or on the aiosqlite thread (see the module doc)."""

    driver_errors = (*SqlEventLog.driver_errors, sqlite3.Error)
    insert_in_one = True

    def __init__(
        self,
        url: str,
        *,
        table_prefix: str = "centripy_",
        now: Callable[[], float] = time.time,
        gc_interval: float | None = DEFAULT_GC_INTERVAL,
        busy_timeout: float = 5.0,
    ) -> None:
        parsed = sa.make_url(url)
        if parsed.drivername != SCHEME:
            raise ValueError(f"SqliteEventLog needs a {SCHEME}:// URL, got {parsed.drivername}://")
        super().__init__(
            url, insert=sqlite_insert, table_prefix=table_prefix, now=now, gc_interval=gc_interval
        )
        self._busy_ms = int(busy_timeout * 1000)
        self._conn: AsyncConnection | None = None  # checked out from start to close
        self._raw: aiosqlite.Connection | None = None  # its driver connection
        self._db: sqlite3.Connection | None = None  # the sqlite3 connection under _raw
        self._wal: WalCheckpointer | None = None  # for a file in WAL mode
        self._queued = 0  # transactions on (or queued for) the worker thread
        self.worker_transactions = 0  # run on the worker thread since start (diagnostics)

    def _make_engine(self) -> AsyncEngine:
        create_private_file(self.url)  # before SQLite creates it with the umask's mode
        pool: dict[str, Any] = (
            {"poolclass": StaticPool}
            if is_memory_url(self.url)
            else {"poolclass": AsyncAdaptedQueuePool, "pool_size": 1, "max_overflow": 1}
        )
        engine = create_async_engine(
            self.url,
            json_serializer=json_dumps,
            json_deserializer=orjson.loads,
            pool_reset_on_return=None,  # every transaction here ends in COMMIT or ROLLBACK
            connect_args={"check_same_thread": False},  # small transactions: the loop's thread
            **pool,
        )
        sa.event.listen(engine.sync_engine, "connect", self._on_connect)
        sa.event.listen(engine.sync_engine, "begin", _begin_immediate)
        return engine

    def _on_connect(self, dbapi_connection: Any, _record: Any) -> None:
        """Runs (through the sync facade) when the pool opens the connection."""
        dbapi_connection.isolation_level = None  # we emit BEGIN ourselves
        cursor = dbapi_connection.cursor()
        for pragma in ("journal_mode=WAL", "synchronous=NORMAL", f"busy_timeout={self._busy_ms}"):
            cursor.execute(f"PRAGMA {pragma}")
        cursor.close()

    async def _opened(self) -> None:
        self._conn = await self.engine.connect()
        raw = (await self._conn.get_raw_connection()).driver_connection
        assert isinstance(raw, aiosqlite.Connection)
        self._raw = raw
        self._db = db = cast(Any, raw)._conn
        db.execute("PRAGMA busy_timeout=0")  # locks are waited for on the worker thread
        path = _wal_file(db)
        if path:  # the thread checkpoints; SQLite's own checkpoint is the backstop
            db.execute(f"PRAGMA wal_autocheckpoint={BACKSTOP_PAGES}")
            self._wal = WalCheckpointer(path)
            self._wal.start()

    async def _closing(self) -> None:
        conn, self._conn, self._raw, self._db = self._conn, None, None, None
        wal, self._wal = self._wal, None
        if wal is not None:
            await wal.close()
        if conn is not None:
            await conn.close()

    async def _transact(self, plan: Plan[T], *, small: bool = True) -> T:
        """The whole transaction in one call: on the loop's thread when it is small and no
        transaction is on the worker thread, else on the worker thread, which runs its calls
        one at a time in the order they were made."""
        if self._raw is None or self._db is None:
            raise StorageError("event log not started")
        try:
            if small and not self._queued:
                result = try_transaction(self._db, plan)
                if result is not BUSY:
                    return result
            self._queued += 1
            self.worker_transactions += 1
            run = functools.partial(run_transaction, plan=plan, wait_ms=self._busy_ms)
            work = asyncio.ensure_future(in_worker(self._raw, run))
            work.add_done_callback(self._worker_done)
            # A cancelled caller leaves the transaction running on the worker thread: the
            # connection is the loop's again only when the worker has finished it.
            return await asyncio.shield(work)
        finally:
            if self._wal is not None:
                self._wal.written()

    def _worker_done(self, work: asyncio.Future[Any]) -> None:
        self._queued -= 1
        if not work.cancelled():
            work.exception()  # retrieved: its caller may have been cancelled


def _wal_file(db: sqlite3.Connection) -> str:
    """The database file's path when it is in WAL mode; "" for other databases."""
    if db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
        return ""
    return str(next((row[2] for row in db.execute("PRAGMA database_list") if row[1] == "main"), ""))


def _begin_immediate(conn: sa.Connection) -> None:
    """SQLAlchemy-level transactions (schema migration) also take the write lock up front."""
    conn.exec_driver_sql("BEGIN IMMEDIATE")
