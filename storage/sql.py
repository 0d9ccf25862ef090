"""SQL event log shared by the SQLite and PostgreSQL back ends.

Schema (every name starts with `table_prefix`, default `centripy_`):

* `streams`: one row per channel with history meta. `top_offset` is the last assigned
  offset; publications `min_offset..top_offset` are the kept ones (rows below `min_offset`
  are trimmed logically at once and deleted physically by the next append or by `gc`).
  `pubs_expire_at` (NULL: nothing kept) is `last_publish_at + history_ttl`;
  `meta_expires_at` (NULL: never) is the last access + `meta_ttl`.
* `publications`: PK (channel, offset).
* `idempotency`: PK (channel, key), the first call's offset/epoch until `expires_at`.
* `schema_version`: one row with the schema version `start()` migrated to.
* `settings`: named values of this database; `epoch_salt` keys `stream_epoch`, so a stream
  gets the epoch a read reported before its first append without the read storing anything.

Reads never create rows: a read of a channel without a live stream reports offset 0 and the
epoch its first append will get (`stream_epoch`); it only touches the meta of live streams.

Concurrency (docs/design/ARCHITECTURE.md decision 2): offsets are assigned inside the batch
transaction by one multi-row
`INSERT .. ON CONFLICT (channel) DO UPDATE SET top_offset = top_offset + n .. RETURNING`, which
row-locks each stream until commit, so several processes appending to one channel get
consecutive offsets. Idempotency keys are claimed first by an insert-on-conflict (a concurrent
claim of the same key waits for the other transaction). Rows are locked in sorted order (keys,
then channels) so concurrent batches cannot deadlock. Timestamps come from the injected clock,
never from the database.

Execution: SQLAlchemy Core defines the schema, runs migrations and *builds* every statement;
the statements are compiled once per dialect (multi-row ones once per row count) and run on
the pooled connection's raw driver (`Session`), because SQLAlchemy's per-row parameter
processing and adapter round trips cost 3-4x the throughput (bench/bench_log.py).
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from centripy.engine.contracts import (
    AppendRequest,
    AppendResult,
    EventLog,
    HistoryQuery,
    HistoryResult,
    StorageError,
)
from centripy.engine.types import EMPTY_TAGS, ClientInfo, Publication, StreamPosition
from centripy.storage.rules import (
    DEFAULT_GC_INTERVAL,
    check_append,
    check_epoch,
    check_query,
    history_enabled,
    history_range,
    meta_expiry,
    new_salt,
    publication_of,
    stream_epoch,
)

log = logging.getLogger("centripy.storage")

SCHEMA_VERSION = 1
_PREFIX_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,40}$")
Key = tuple[str, str]
Position = tuple[int, str]


@dataclass(frozen=True, slots=True)
class Tables:
    metadata: sa.MetaData
    streams: sa.Table
    publications: sa.Table
    idempotency: sa.Table
    schema_version: sa.Table
    settings: sa.Table


def make_tables(prefix: str = "centripy_") -> Tables:
    """The schema with every table and index name prefixed by `prefix`."""
    if not _PREFIX_RE.match(prefix):
        raise ValueError(f"table_prefix must match {_PREFIX_RE.pattern}, got {prefix!r}")
    md = sa.MetaData()
    streams = sa.Table(
        f"{prefix}streams",
        md,
        sa.Column("channel", sa.Text, primary_key=True),
        sa.Column("epoch", sa.Text, nullable=False),
        sa.Column("top_offset", sa.BigInteger, nullable=False),
        sa.Column("min_offset", sa.BigInteger, nullable=False),
        sa.Column("history_size", sa.BigInteger, nullable=False),
        sa.Column("last_publish_at", sa.Double),
        sa.Column("pubs_expire_at", sa.Double),
        sa.Column("meta_touched_at", sa.Double, nullable=False),
        sa.Column("meta_expires_at", sa.Double),
        sa.Index(f"{prefix}streams_meta_expires_idx", "meta_expires_at"),
        sa.Index(f"{prefix}streams_pubs_expire_idx", "pubs_expire_at"),
    )
    publications = sa.Table(
        f"{prefix}publications",
        md,
        sa.Column("channel", sa.Text, primary_key=True),
        sa.Column("offset", sa.BigInteger, primary_key=True),
        sa.Column("data", sa.LargeBinary, nullable=False),
        sa.Column("info_user", sa.Text),  # NULL: no ClientInfo
        sa.Column("info_client", sa.Text),
        sa.Column("conn_info", sa.LargeBinary),
        sa.Column("chan_info", sa.LargeBinary),
        sa.Column("tags", sa.JSON(none_as_null=True)),
        sa.Column("time", sa.BigInteger, nullable=False),  # unix ms
    )
    idempotency = sa.Table(
        f"{prefix}idempotency",
        md,
        sa.Column("channel", sa.Text, primary_key=True),
        sa.Column("key", sa.Text, primary_key=True),
        sa.Column("offset", sa.BigInteger, nullable=False),
        sa.Column("epoch", sa.Text, nullable=False),
        sa.Column("expires_at", sa.Double, nullable=False),
        sa.Index(f"{prefix}idempotency_expires_idx", "expires_at"),
    )
    version = sa.Table(
        f"{prefix}schema_version",
        md,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("version", sa.Integer, nullable=False),
    )
    settings = sa.Table(
        f"{prefix}settings",
        md,
        sa.Column("name", sa.Text, primary_key=True),
        sa.Column("value", sa.Text, nullable=False),
    )
    return Tables(md, streams, publications, idempotency, version, settings)


# Steps from version v to v + 1, run inside start()'s transaction. Never drop data.
MIGRATIONS: dict[int, Callable[[sa.Connection, Tables], None]] = {}


def migrate_sync(conn: sa.Connection, tables: Tables) -> None:
    """Create missing tables and indexes, then bring the schema to SCHEMA_VERSION."""
    insp = sa.inspect(conn)
    existing = set(insp.get_table_names())
    had_version = tables.schema_version.name in existing
    version = SCHEMA_VERSION
    if had_version:
        found = conn.execute(sa.select(tables.schema_version.c.version)).scalar()
        version = SCHEMA_VERSION if found is None else int(found)
    if version > SCHEMA_VERSION:
        raise StorageError(f"database schema version {version} is newer than {SCHEMA_VERSION}")
    tables.metadata.create_all(conn, checkfirst=True)
    for table in tables.metadata.sorted_tables:
        if table.name in existing:
            for index in table.indexes:
                index.create(conn, checkfirst=True)
    for step in range(version, SCHEMA_VERSION):
        MIGRATIONS[step](conn, tables)
    conn.execute(sa.delete(tables.schema_version))
    conn.execute(sa.insert(tables.schema_version).values(id=1, version=SCHEMA_VERSION))


def load_salt_sync(conn: sa.Connection, tables: Tables) -> bytes:
    """This database's `epoch_salt`, created on first use. Runs in start()'s transaction,
    which concurrent starts take in turn (SQLite: BEGIN IMMEDIATE; PostgreSQL: the schema
    lock), so every process sharing the database reads the same salt."""
    st = tables.settings
    query = sa.select(st.c.value).where(st.c.name == "epoch_salt")
    found = conn.execute(query).scalar()
    if found is None:
        found = new_salt().hex()
        conn.execute(sa.insert(st).values(name="epoch_salt", value=found))
    return bytes.fromhex(found)


# --- pure helpers ---------------------------------------------------------------------------------

PUB_COLUMNS = (
    *("channel", "offset", "data", "info_user", "info_client", "conn_info", "chan_info"),
    *("tags", "time"),
)
STREAM_COLUMNS = (
    *("channel", "epoch", "top_offset", "min_offset", "history_size", "last_publish_at"),
    *("pubs_expire_at", "meta_touched_at", "meta_expires_at"),
)
CLAIM_COLUMNS = ("channel", "key", "offset", "epoch", "expires_at")
MAX_ROWS_PER_STATEMENT = 500  # multi-row upserts are split above this (bind limits)
PURGE_ALL = 2**62  # "offset < PURGE_ALL" matches every row of a stream


def retention(sizes: Sequence[int]) -> int:
    """How many of the newest offsets stay kept after appending len(sizes) publications one
    by one, the i-th trimming the stream to sizes[i] items (= sizes[0] when all are equal)."""
    n = len(sizes)
    return n - max(i + 1 - size + 1 for i, size in enumerate(sizes)) + 1


def split_keys(requests: Sequence[AppendRequest]) -> tuple[dict[Key, int], dict[int, int]]:
    """First request index per (channel, key), and each later duplicate's first index."""
    leaders: dict[Key, int] = {}
    followers: dict[int, int] = {}
    for i, req in enumerate(requests):
        if req.idempotency_key:
            key = (req.channel, req.idempotency_key)
            if key in leaders:
                followers[i] = leaders[key]
            else:
                leaders[key] = i
    return leaders, followers


def json_dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


def publication_args(channel: str, pub: Publication) -> tuple[Any, ...]:
    """A publications row in PUB_COLUMNS order (tags as JSON text)."""
    info = pub.info
    tags = json_dumps(dict(pub.tags)) if pub.tags else None
    if info is None:
        return (channel, pub.offset, pub.data, None, None, None, None, tags, pub.time)
    return (channel, pub.offset, pub.data, info.user, info.client, info.conn_info,
            info.chan_info, tags, pub.time)  # fmt: skip


def row_to_publication(row: Sequence[Any]) -> Publication:
    """A row of `Statements.forward`/`backward` (offset, data, info..., tags, time)."""
    offset, data, user, client, conn_info, chan_info, tags, ms = row
    info = None if user is None else ClientInfo(user, client, conn_info or b"", chan_info or b"")
    if isinstance(tags, str | bytes):
        tags = orjson.loads(tags)
    return Publication(bytes(data), int(offset), info, tags or EMPTY_TAGS, int(ms))


def purge_below(fresh: bool, top: int, n: int, keep: int, first_kept: int) -> int | None:
    """Which rows of a stream just advanced by n to `top` to delete physically: all of them
    for a new or re-created stream (leftovers of an earlier incarnation), else the trimmed
    ones below `first_kept`, but only when `top` crosses a multiple of `keep`, so the
    delete is amortised (at most ~2 * keep rows per stream stay on disk; reads never see
    rows below `first_kept`). None: delete nothing now."""
    if fresh:
        return PURGE_ALL
    if (top - n) // keep != top // keep and first_kept > 1:
        return first_kept
    return None


def advance_row(
    channel: str, reqs: Sequence[AppendRequest], now: float, salt: bytes
) -> dict[str, Any]:
    """The streams row for appending `reqs` (as the new stream, or its increments)."""
    n, keep = len(reqs), retention([r.history_size for r in reqs])
    return {
        "channel": channel,
        "epoch": stream_epoch(salt, channel, reqs[-1].meta_ttl, now),
        "top_offset": n,
        "min_offset": max(1, n - keep + 1),
        "history_size": keep,
        "last_publish_at": now,
        "pubs_expire_at": now + reqs[-1].history_ttl,
        "meta_touched_at": now,
        "meta_expires_at": meta_expiry(now, reqs[-1].meta_ttl),
    }


# --- compiled statements --------------------------------------------------------------------------

_ROW_BIND = re.compile(r"r(\d+)_(\w+)")


@dataclass(frozen=True, slots=True)
class Sql:
    """A statement compiled for one dialect. `slots` name each positional parameter:
    (row index, column) for multi-row VALUES binds `r<i>_<col>`, (-1, name) otherwise."""

    text: str
    slots: tuple[tuple[int, str], ...]
    fixed: Mapping[str, Any]  # literal binds SQLAlchemy made (e.g. `SET offset = 0`)

    def args(
        self, params: Mapping[str, Any] | None = None, rows: Sequence[Mapping[str, Any]] = ()
    ) -> tuple[Any, ...]:
        params = params or {}
        return tuple(
            rows[i][name] if i >= 0 else params[name] if name in params else self.fixed[name]
            for i, name in self.slots
        )


def compile_sql(stmt: sa.ClauseElement, dialect: sa.Dialect) -> Sql:
    compiled = stmt.compile(dialect=dialect)
    assert isinstance(compiled, sa.sql.compiler.SQLCompiler)
    names = tuple(compiled.positiontup or ())
    slots = []
    for name in names:
        match = _ROW_BIND.fullmatch(name)
        slots.append((int(match[1]), match[2]) if match else (-1, name))
    fixed = {n: compiled.binds[n].value for n in names if not compiled.binds[n].required}
    return Sql(compiled.string, tuple(slots), fixed)


def _greatest(a: sa.ColumnElement[Any], b: sa.ColumnElement[Any]) -> sa.ColumnElement[Any]:
    return sa.case((a > b, a), else_=b)


def _rows(table: sa.Table, columns: Sequence[str], n: int) -> list[dict[str, Any]]:
    return [
        {c: sa.bindparam(f"r{i}_{c}", type_=table.c[c].type) for c in columns} for i in range(n)
    ]


class Statements:
    """Every statement the log runs, compiled once for `dialect`; the multi-row upserts once
    per row count. `insert` is the dialect's (it has `on_conflict_do_update`)."""

    def __init__(self, t: Tables, insert: Callable[[sa.Table], Any], dialect: sa.Dialect) -> None:
        self._t, self._insert, self._dialect = t, insert, dialect
        self._multi: dict[tuple[str, int], Sql] = {}
        s, p, k = t.streams.c, t.publications.c, t.idempotency.c
        b = sa.bindparam
        pubs = {c: b(c, type_=t.publications.c[c].type) for c in PUB_COLUMNS}
        self.insert_pubs = self._sql(sa.insert(t.publications).values(pubs))
        assert tuple(name for _, name in self.insert_pubs.slots) == PUB_COLUMNS
        self.delete_below = self._sql(
            sa.delete(t.publications).where(p.channel == b("b_channel"), p.offset < b("b_lo"))
        )
        self.record = self._sql(
            sa.update(t.idempotency)
            .where(k.channel == b("b_channel"), k.key == b("b_key"))
            .values(offset=b("b_offset"), epoch=b("b_epoch"))
        )
        window = sa.select(*(p[c] for c in PUB_COLUMNS[1:])).where(
            p.channel == b("b_channel"), p.offset >= b("b_lo"), p.offset <= b("b_hi")
        )
        limit = b("b_limit", type_=sa.Integer)
        self.forward = self._sql(window.order_by(p.offset.asc()).limit(limit))
        self.backward = self._sql(window.order_by(p.offset.desc()).limit(limit))
        self.clear = self._sql(
            sa.update(t.streams)
            .where(s.channel == b("b_channel"))
            .values(min_offset=s.top_offset + 1, pubs_expire_at=sa.null())
        )
        self.delete_channel = self._sql(
            sa.delete(t.publications).where(p.channel == b("b_channel"))
        )
        self.read = self._sql(
            sa.update(t.streams)
            .where(
                s.channel == b("b_channel"),
                sa.or_(s.meta_expires_at.is_(None), s.meta_expires_at >= b("b_now")),
            )
            .values(meta_touched_at=b("b_now"), meta_expires_at=b("b_expires"))
            .returning(s.epoch, s.top_offset, s.min_offset, s.pubs_expire_at)
        )
        self.forget_keys = self._sql(sa.delete(t.idempotency).where(k.expires_at < b("b_now")))
        self.forget_streams = self._sql(
            sa.delete(t.streams).where(s.meta_expires_at < b("b_now")).returning(s.channel)
        )
        self.expire_pubs = self._sql(
            sa.update(t.streams)
            .where(s.pubs_expire_at < b("b_now"))
            .values(min_offset=s.top_offset + 1, pubs_expire_at=sa.null())
            .returning(s.channel, s.min_offset)
        )

    def _sql(self, stmt: sa.ClauseElement) -> Sql:
        return compile_sql(stmt, self._dialect)

    def _cached(self, kind: str, n: int, build: Callable[[int], sa.ClauseElement]) -> Sql:
        sql = self._multi.get((kind, n))
        if sql is None:
            sql = self._multi[(kind, n)] = self._sql(build(n))
        return sql

    def advance(self, n: int) -> Sql:
        """Upsert n streams, each advanced by its row's top_offset (= number of appends)."""
        return self._cached("advance", n, self._advance)

    def claim(self, n: int) -> Sql:
        """Insert n idempotency keys; take over expired ones; RETURNING the claimed keys."""
        return self._cached("claim", n, self._claim)

    def known(self, n: int) -> Sql:
        """Positions stored for n keys (rows r<i>_channel, r<i>_key)."""
        return self._cached("known", n, self._known)

    def _advance(self, n: int) -> sa.ClauseElement:
        st = self._t.streams
        s, up = st.c, self._insert(st).values(_rows(st, STREAM_COLUMNS, n))
        x = up.excluded  # excluded.top_offset is the number of appends; excluded.* the new stream
        reset = sa.and_(s.meta_expires_at.is_not(None), s.meta_expires_at < x.meta_touched_at)
        gone = sa.or_(s.pubs_expire_at.is_(None), s.pubs_expire_at < x.meta_touched_at)
        trim = s.top_offset + x.top_offset - x.history_size + 1
        values = {
            "epoch": sa.case((reset, x.epoch), else_=s.epoch),
            "top_offset": sa.case((reset, x.top_offset), else_=s.top_offset + x.top_offset),
            "min_offset": sa.case(
                (reset, x.min_offset),
                (gone, _greatest(s.top_offset + 1, trim)),
                else_=_greatest(s.min_offset, trim),
            ),
        } | {c: x[c] for c in ("history_size", "last_publish_at", "pubs_expire_at")}
        values |= {"meta_touched_at": x.meta_touched_at, "meta_expires_at": x.meta_expires_at}
        stmt: sa.ClauseElement = up.on_conflict_do_update(
            index_elements=[s.channel], set_=values
        ).returning(s.channel, s.epoch, s.top_offset, s.min_offset, s.pubs_expire_at)
        return stmt

    def _claim(self, n: int) -> sa.ClauseElement:
        it = self._t.idempotency
        k, up = it.c, self._insert(it).values(_rows(it, CLAIM_COLUMNS, n))
        stmt: sa.ClauseElement = up.on_conflict_do_update(
            index_elements=[k.channel, k.key],
            set_={"offset": 0, "epoch": "", "expires_at": up.excluded.expires_at},
            where=k.expires_at < sa.bindparam("b_now"),
        ).returning(k.channel, k.key)
        return stmt

    def _known(self, n: int) -> sa.ClauseElement:
        k, b = self._t.idempotency.c, sa.bindparam
        match = [
            sa.and_(k.channel == b(f"r{i}_channel"), k.key == b(f"r{i}_key")) for i in range(n)
        ]
        return sa.select(k.channel, k.key, k.offset, k.epoch).where(sa.or_(*match))


# --- execution ------------------------------------------------------------------------------------


class Session(abc.ABC):
    """One open transaction on a pooled connection's raw driver. Runs on the event loop."""

    @abc.abstractmethod
    async def fetch(self, sql: Sql, args: Sequence[Any] = ()) -> Sequence[Sequence[Any]]: ...

    @abc.abstractmethod
    async def execute(self, sql: Sql, args: Sequence[Any] = ()) -> None: ...

    @abc.abstractmethod
    async def executemany(self, sql: Sql, rows: Sequence[Sequence[Any]]) -> None: ...


def chunks(items: Sequence[Any], size: int = MAX_ROWS_PER_STATEMENT) -> list[Sequence[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


class SqlEventLog(EventLog):
    """`EventLog` on a SQLAlchemy async engine. Subclasses supply the engine, the dialect's
    `insert`, the driver errors to translate and `_session` (a transaction on the raw driver
    connection). Every public method runs on the server's event loop."""

    driver_errors: tuple[type[BaseException], ...] = (sa.exc.SQLAlchemyError, OSError)

    def __init__(
        self,
        url: str,
        *,
        insert: Callable[[sa.Table], Any],
        table_prefix: str = "centripy_",
        now: Callable[[], float] = time.time,
        gc_interval: float | None = DEFAULT_GC_INTERVAL,
    ) -> None:
        self.url = url
        self.tables = make_tables(table_prefix)
        self._insert = insert
        self._now = now
        self._gc_interval = gc_interval
        self._engine: AsyncEngine | None = None
        self._sql: Statements | None = None
        self._gc_task: asyncio.Task[None] | None = None
        self._closed = False
        self._salt = b""  # the database's epoch_salt, read by start()
        self._inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    # --- hooks ------------------------------------------------------------------------------------

    @abc.abstractmethod
    def _make_engine(self) -> AsyncEngine: ...

    @abc.abstractmethod
    def _session(self) -> contextlib.AbstractAsyncContextManager[Session]:
        """A transaction on one raw connection: commit on normal exit, roll back on error."""

    async def _lock_schema(self, conn: AsyncConnection) -> None:
        """Serialise concurrent migrations (PostgreSQL: advisory lock). Default: nothing."""

    # --- lifecycle --------------------------------------------------------------------------------

    @property
    def engine(self) -> AsyncEngine:
        if self._engine is None:
            raise StorageError("event log not started")
        return self._engine

    async def start(self) -> None:
        """Create the engine, create missing tables/indexes and migrate; start the GC task."""
        if self._engine is not None:
            return
        self._engine = self._make_engine()
        try:
            async with self._guard():
                async with self._engine.begin() as conn:
                    await self._lock_schema(conn)
                    await conn.run_sync(migrate_sync, self.tables)
                    self._salt = await conn.run_sync(load_salt_sync, self.tables)
                self._sql = Statements(self.tables, self._insert, self._engine.dialect)
        except BaseException:
            engine, self._engine = self._engine, None
            await engine.dispose()
            raise
        if self._gc_interval:
            self._gc_task = asyncio.get_running_loop().create_task(self._gc_loop())

    async def close(self) -> None:
        """Refuse new work, wait for in-flight operations, stop GC, dispose the engine."""
        self._closed = True
        if self._gc_task is not None:
            self._gc_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._gc_task
            self._gc_task = None
        await self._idle.wait()
        if self._engine is not None:
            await self._engine.dispose()
            self._engine = None

    @contextlib.asynccontextmanager
    async def _guard(self) -> AsyncIterator[Statements]:
        """The one place driver errors become StorageError (cause chained)."""
        if self._closed or self._engine is None:
            raise StorageError(f"event log {'closed' if self._closed else 'not started'}")
        self._inflight += 1
        self._idle.clear()
        try:
            yield self._sql  # type: ignore[misc]  # None only inside start()
        except StorageError:
            raise
        except self.driver_errors as exc:
            raise StorageError(f"{type(exc).__name__}: {exc}") from exc
        finally:
            self._inflight -= 1
            if not self._inflight:
                self._idle.set()

    # --- EventLog ---------------------------------------------------------------------------------

    async def append_many(self, requests: Sequence[AppendRequest]) -> list[AppendResult]:
        """One transaction for the whole batch; results in request order."""
        for req in requests:
            check_append(req)
        if not requests:
            return []
        async with self._guard() as sql, self._session() as session:
            return await self._append_tx(sql, session, requests, self._now())

    async def history(self, query: HistoryQuery) -> HistoryResult:
        """Read a stream, touching its meta. A channel without a live stream (none, or
        forgotten) is reported at offset 0 with the epoch its first append will get; no
        row is written for it."""
        check_query(query)
        async with self._guard() as sql, self._session() as session:
            now = self._now()
            params = {
                "b_channel": query.channel,
                "b_now": now,
                "b_expires": meta_expiry(now, query.meta_ttl),
            }
            live = await session.fetch(sql.read, sql.read.args(params))
            if not live:
                epoch, top, pubs = (
                    stream_epoch(self._salt, query.channel, query.meta_ttl, now),
                    0,
                    [],
                )
            else:
                epoch, top, first, pubs_expire_at = live[0]
                top = int(top)
                if pubs_expire_at is None or pubs_expire_at < now:
                    first = top + 1
                rng = history_range(int(first), top, query)
                stale = query.since is not None and query.since.epoch not in ("", epoch)
                pubs = [] if rng is None or stale else await self._read(sql, session, query, rng)
        check_epoch(query, epoch)  # after commit: the meta touch above is kept
        return HistoryResult(pubs, StreamPosition(top, epoch))

    async def remove_history(self, channel: str) -> None:
        async with self._guard() as sql, self._session() as session:
            await session.execute(sql.clear, sql.clear.args({"b_channel": channel}))
            await session.execute(
                sql.delete_channel, sql.delete_channel.args({"b_channel": channel})
            )

    async def gc(self) -> None:
        """Delete expired idempotency keys, forgotten streams and expired publications."""
        async with self._guard() as sql, self._session() as session:
            now = {"b_now": self._now()}
            await session.execute(sql.forget_keys, sql.forget_keys.args(now))
            doomed = [
                (r[0], PURGE_ALL)
                for r in await session.fetch(sql.forget_streams, sql.forget_streams.args(now))
            ]
            doomed += [
                (r[0], r[1])
                for r in await session.fetch(sql.expire_pubs, sql.expire_pubs.args(now))
            ]
            if doomed:
                args = [sql.delete_below.args({"b_channel": ch, "b_lo": lo}) for ch, lo in doomed]
                await session.executemany(sql.delete_below, args)

    async def _gc_loop(self) -> None:
        assert self._gc_interval
        while True:
            await asyncio.sleep(self._gc_interval)
            try:
                await self.gc()
            except StorageError:
                log.warning("event log garbage collection failed", exc_info=True)

    # --- batch transaction ------------------------------------------------------------------------

    async def _read(
        self, sql: Statements, session: Session, query: HistoryQuery, rng: tuple[int, int]
    ) -> list[Publication]:
        count = rng[1] - rng[0] + 1
        limit = min(query.limit, count) if query.limit > 0 else count
        stmt = sql.backward if query.reverse else sql.forward
        params = {"b_channel": query.channel, "b_lo": rng[0], "b_hi": rng[1], "b_limit": limit}
        return [row_to_publication(row) for row in await session.fetch(stmt, stmt.args(params))]

    async def _append_tx(
        self, sql: Statements, session: Session, requests: Sequence[AppendRequest], now: float
    ) -> list[AppendResult]:
        leaders, followers = split_keys(requests)
        known = await self._claim_keys(sql, session, requests, leaders, now) if leaders else {}
        store = [i for i in range(len(requests)) if i not in followers and i not in known]
        appends = [i for i in store if history_enabled(requests[i])]
        positions, kept_from = await self._assign_offsets(sql, session, requests, appends, now)
        results: dict[int, AppendResult] = {}
        for i in store:
            offset, epoch = positions.get(i, (0, ""))
            results[i] = AppendResult(publication_of(requests[i], offset, now), epoch)
        for i, (offset, epoch) in known.items():
            results[i] = AppendResult(publication_of(requests[i], offset, now), epoch, True)
        for i, first in followers.items():
            offset, epoch = results[first].publication.offset, results[first].epoch
            results[i] = AppendResult(publication_of(requests[i], offset, now), epoch, True)
        rows = [
            publication_args(requests[i].channel, results[i].publication)
            for i in appends
            if positions[i][0] >= kept_from[requests[i].channel]
        ]
        if rows:
            await session.executemany(sql.insert_pubs, rows)
        keyed = [i for i in leaders.values() if i in positions]  # claimed, with history
        if keyed:
            args = [sql.record.args(self._key_params(requests[i], positions[i])) for i in keyed]
            await session.executemany(sql.record, args)
        return [results[i] for i in range(len(requests))]

    async def _claim_keys(
        self,
        sql: Statements,
        session: Session,
        requests: Sequence[AppendRequest],
        leaders: dict[Key, int],
        now: float,
    ) -> dict[int, Position]:
        """Claim new (or expired) keys; return the live ones' stored positions by index."""
        claimed: set[Key] = set()
        expires = {key: now + requests[i].idempotent_ttl for key, i in leaders.items()}
        for part in chunks(sorted(leaders)):
            rows = [
                {
                    "channel": ch,
                    "key": key,
                    "offset": 0,
                    "epoch": "",
                    "expires_at": expires[ch, key],
                }
                for ch, key in part
            ]
            stmt = sql.claim(len(rows))
            claimed.update(
                (r[0], r[1]) for r in await session.fetch(stmt, stmt.args({"b_now": now}, rows))
            )
        live = [key for key in leaders if key not in claimed]
        found: dict[int, Position] = {}
        for part in chunks(live):
            stmt = sql.known(len(part))
            rows = [{"channel": ch, "key": key} for ch, key in part]
            for ch, key, offset, epoch in await session.fetch(stmt, stmt.args(rows=rows)):
                found[leaders[(ch, key)]] = (int(offset), epoch)
        return found

    async def _assign_offsets(
        self,
        sql: Statements,
        session: Session,
        requests: Sequence[AppendRequest],
        indices: Sequence[int],
        now: float,
    ) -> tuple[dict[int, Position], dict[str, int]]:
        """Advance each stream by its requests' count and delete its stale rows. Returns
        offset/epoch per request index and each channel's first kept offset."""
        groups: dict[str, list[int]] = {}
        for i in indices:
            groups.setdefault(requests[i].channel, []).append(i)
        positions: dict[int, Position] = {}
        kept_from: dict[str, int] = {}
        stale: list[tuple[Any, ...]] = []
        for part in chunks(sorted(groups)):
            rows = {
                ch: advance_row(ch, [requests[i] for i in groups[ch]], now, self._salt)
                for ch in part
            }
            stmt = sql.advance(len(rows))
            returned = await session.fetch(stmt, stmt.args(rows=list(rows.values())))
            for channel, epoch, top, first_kept, _ in returned:
                members, row = groups[channel], rows[channel]
                first = int(top) - len(members) + 1
                for j, i in enumerate(members):
                    positions[i] = (first + j, epoch)
                kept_from[channel] = int(first_kept)
                fresh = int(top) == len(members)  # a new or re-created stream
                below = purge_below(fresh, int(top), len(members), row["history_size"], first_kept)
                if below is not None:
                    stale.append(sql.delete_below.args({"b_channel": channel, "b_lo": below}))
        if stale:
            await session.executemany(sql.delete_below, stale)
        return positions, kept_from

    @staticmethod
    def _key_params(req: AppendRequest, position: Position) -> dict[str, Any]:
        return {
            "b_channel": req.channel,
            "b_key": req.idempotency_key,
            "b_offset": position[0],
            "b_epoch": position[1],
        }
