"""SQL event log shared by the SQLite and PostgreSQL back ends.

The schema and its migrations are in storage/sql_schema.py; the statements, compiled once
per dialect and run on the pooled connection's raw driver (`Session`), in
storage/sql_statements.py.

Reads never create rows: a read of a channel without a live stream reports offset 0 and the
epoch its first append will get (`stream_epoch`); it only touches the meta of live streams.

Every transaction is written once, as a *plan*: a generator that yields the statements it
needs (`Step`: fetch, execute or executemany, with positional arguments) and receives each
one's rows. A back end runs a plan in one transaction its own way (`_transact`): PostgreSQL
awaits each step on its asyncpg connection; SQLite runs the whole plan, BEGIN to COMMIT, in
one call on its connection's worker thread (one thread hop per transaction, not one per
statement).

Concurrency (docs/design/ARCHITECTURE.md decision 2): offsets are assigned inside the batch
transaction by one multi-row
`INSERT .. ON CONFLICT (channel) DO UPDATE SET top_offset = top_offset + n .. RETURNING`, which
row-locks each stream until commit, so several processes appending to one channel get
consecutive offsets. Idempotency keys are claimed first by an insert-on-conflict (a concurrent
claim of the same key waits for the other transaction). Rows are locked in sorted order (keys,
then channels) so concurrent batches cannot deadlock. Timestamps come from the injected clock,
never from the database.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable, Generator, Sequence
from typing import Any, NamedTuple, TypeVar

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from centripy.engine.contracts import (
    AppendRequest,
    AppendResult,
    EventLog,
    HistoryQuery,
    HistoryResult,
    StorageError,
    UnrecoverablePosition,
)
from centripy.engine.types import Publication, StreamPosition
from centripy.storage.rules import (
    DEFAULT_GC_INTERVAL,
    check_all,
    check_epoch,
    check_query,
    history_enabled,
    history_range,
    meta_expiry,
    needs_touch,
    publication_of,
    stream_epoch,
)
from centripy.storage.sql_schema import load_salt_sync, make_tables, migrate_sync
from centripy.storage.sql_statements import (
    Session,
    Sql,
    Statements,
    plain_args,
    publication_args,
    row_to_publication,
)

log = logging.getLogger("centripy.storage")

Key = tuple[str, str]
Position = tuple[int, str]
T = TypeVar("T")
# One statement of a plan: ("fetch" | "execute" | "executemany", statement, arguments);
# "fetch" sends back the rows, the others None. A plan returns its result at the end.
Step = tuple[str, Sql, Any]
Plan = Generator[Step, Any, T]
Rows = Sequence[Sequence[Any]]
MAX_ROWS_PER_STATEMENT = 500  # multi-row upserts are split above this (bind limits)
PURGE_ALL = 2**62  # "offset < PURGE_ALL" matches every row of a stream
SMALL_ROWS = 512  # appends of at most this many rows are "small" transactions (`_transact`)


# --- batch helpers --------------------------------------------------------------------------------


def retention(sizes: Sequence[int]) -> int:
    """How many of the newest offsets stay kept after appending len(sizes) publications one
    by one, the i-th trimming the stream to sizes[i] items (= sizes[0] when all are equal)."""
    n = len(sizes)
    first = sizes[0]
    if sizes.count(first) == n:  # the usual case: one namespace's size for the channel
        return first
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


class Window(NamedTuple):
    """The publications of one history read: offsets lo..hi of `channel`, at most `limit`
    of them, from the newest when `reverse`."""

    channel: str
    lo: int
    hi: int
    limit: int
    reverse: bool


def chunks(items: Sequence[Any], size: int = MAX_ROWS_PER_STATEMENT) -> list[Sequence[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


PEEK_ROWS = 512  # channels per stream peek (compiled for powers of two up to this)


def peek_size(n: int) -> int:
    """The compiled peek size for n channels: the next power of two (the channel list is
    padded by repeating its last name), so a few statements serve every batch size."""
    return 1 << max(0, n - 1).bit_length()


def stmt_rows(stmt: Sql) -> int:
    """How many rows' binds a multi-row statement has."""
    return 1 + max(i for i, _ in stmt.slots)


class SqlEventLog(EventLog):
    """`EventLog` on a SQLAlchemy async engine. Subclasses supply the engine, the dialect's
    `insert`, the driver errors to translate and `_transact` (a plan run in one transaction
    on the raw driver connection). Every public method runs on the server's event loop."""

    driver_errors: tuple[type[BaseException], ...] = (sa.exc.SQLAlchemyError, OSError)
    # Publications go in as multi-row INSERTs (one statement per MAX_ROWS_PER_STATEMENT)
    # rather than one executemany: SQLite's driver takes the GIL back after every row of
    # an executemany, which behind a busy event loop costs a switch interval (5 ms) each.
    insert_in_one = False
    gc_chunk = 1000  # streams per gc transaction

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
    async def _transact(self, plan: Plan[T], *, small: bool = True) -> T:
        """Run `plan` in one transaction on one connection (committed when the plan
        returns, rolled back when a step raises) and return the plan's result. `small`:
        the plan writes at most `SMALL_ROWS` rows (SQLite runs those on the loop's thread)."""

    async def _lock_schema(self, conn: AsyncConnection) -> None:
        """Serialise concurrent migrations (PostgreSQL: advisory lock). Default: nothing."""

    async def _opened(self) -> None:
        """After the schema is in place (start). Default: nothing."""

    async def _closing(self) -> None:
        """Before the engine is disposed (close, or a failed start). Default: nothing."""

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
            await self._opened()
        except BaseException:
            await self._closing()
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
            await self._closing()
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
        check_all(requests)
        if not requests:
            return []
        async with self._guard() as sql:
            plan = self._append_plan(sql, requests, self._now())
            return await self._transact(plan, small=len(requests) <= SMALL_ROWS)

    async def history(self, query: HistoryQuery) -> HistoryResult:
        """Read a stream, touching its meta when stale (`needs_touch`). A channel without a
        live stream (none, or forgotten) is reported at offset 0 with the epoch its first
        append will get; no row is written for it."""
        check_query(query)
        result = (await self.history_many([query]))[0]
        if isinstance(result, Exception):
            raise result
        return result

    async def history_many(
        self, queries: Sequence[HistoryQuery]
    ) -> list[HistoryResult | Exception]:
        """Every query in one transaction (one thread hop on SQLite); results in query order,
        a query's ValueError or UnrecoverablePosition in its place."""
        results: list[HistoryResult | Exception | None] = [None] * len(queries)
        valid: list[int] = []
        for i, query in enumerate(queries):
            try:
                check_query(query)
                valid.append(i)
            except ValueError as exc:
                results[i] = exc
        if valid:
            async with self._guard() as sql:
                reads = await self._transact(
                    self._history_plan(sql, [queries[i] for i in valid], self._now())
                )
            for i, (epoch, top, pubs) in zip(valid, reads, strict=True):
                try:
                    check_epoch(queries[i], epoch)  # after commit: the meta touch is kept
                    results[i] = HistoryResult(pubs, StreamPosition(top, epoch))
                except UnrecoverablePosition as exc:
                    results[i] = exc
        return results  # type: ignore[return-value]  # every index was filled above

    async def remove_history(self, channel: str) -> None:
        async with self._guard() as sql:
            await self._transact(self._remove_plan(sql, channel))

    async def gc(self) -> None:
        """Delete expired idempotency keys, forgotten streams and expired publications: the
        streams `gc_chunk` per transaction (in key order), so appends run between chunks."""
        now = self._now()
        async with self._guard() as sql:
            after: str | None = ""
            while after is not None:
                after = await self._transact(self._gc_plan(sql, now, after), small=False)

    async def _gc_loop(self) -> None:
        assert self._gc_interval
        while True:
            await asyncio.sleep(self._gc_interval)
            try:
                await self.gc()
            except StorageError:
                log.warning("event log garbage collection failed", exc_info=True)

    # --- plans (pure: no I/O of their own; see the module doc) ------------------------------------

    def _history_plan(
        self, sql: Statements, queries: Sequence[HistoryQuery], now: float
    ) -> Plan[list[tuple[str, int, list[Publication]]]]:
        """Peek at every live stream of the queries (a few multi-row SELECTs), rewrite the
        stale expiries (in channel order, as appends lock rows), then read each query's
        publications. A channel's expiry follows its last query's meta_ttl."""
        ttl = {q.channel: q.meta_ttl for q in queries}
        live: dict[str, Sequence[Any]] = {}
        for part in chunks(sorted(ttl), PEEK_ROWS):
            stmt = sql.peek(peek_size(len(part)))
            names = [{"channel": part[min(i, len(part) - 1)]} for i in range(stmt_rows(stmt))]
            for row in (yield ("fetch", stmt, stmt.args({"b_now": now}, names))):
                live[row[0]] = row
        stale = [
            sql.touch.args({"b_channel": ch, "b_now": now, "b_expires": meta_expiry(now, ttl[ch])})
            for ch in sorted(live)
            if needs_touch(live[ch][5], now, ttl[ch])
        ]
        if stale:
            yield ("executemany", sql.touch, stale)
        out: list[tuple[str, int, list[Publication]]] = []
        windows: list[Window] = []
        read: list[int] = []  # the index in `out` of each window's query
        for query in queries:
            row = live.get(query.channel)
            if row is None:
                epoch = stream_epoch(self._salt, query.channel, query.meta_ttl, now)
                out.append((epoch, 0, []))
                continue
            _, epoch, top, first, pubs_expire_at, _ = row
            top = int(top)
            out.append((epoch, top, []))
            if pubs_expire_at is None or pubs_expire_at < now:
                first = top + 1
            rng = history_range(int(first), top, query)
            if rng is None or (query.since is not None and query.since.epoch not in ("", epoch)):
                continue
            count = rng[1] - rng[0] + 1
            limit = min(query.limit, count) if query.limit > 0 else count
            read.append(len(out) - 1)
            windows.append(Window(query.channel, rng[0], rng[1], limit, query.reverse))
        if windows:
            rows = yield from self._read_windows(sql, windows)
            for i, part in zip(read, rows, strict=True):
                out[i][2].extend(row_to_publication(r) for r in part)
        return out

    def _read_windows(self, sql: Statements, windows: Sequence[Window]) -> Plan[Sequence[Rows]]:
        """The rows of each window (`Statements.forward`/`backward` columns), one statement
        per window; a back end with round trips may read them all at once."""
        out: list[Rows] = []
        for w in windows:
            stmt = sql.backward if w.reverse else sql.forward
            read = {"b_channel": w.channel, "b_lo": w.lo, "b_hi": w.hi, "b_limit": w.limit}
            out.append((yield ("fetch", stmt, stmt.args(read))))
        return out

    @staticmethod
    def _remove_plan(sql: Statements, channel: str) -> Plan[None]:
        yield ("execute", sql.clear, sql.clear.args({"b_channel": channel}))
        yield ("execute", sql.delete_channel, sql.delete_channel.args({"b_channel": channel}))

    def _gc_plan(self, sql: Statements, now: float, after: str) -> Plan[str | None]:
        """The first chunk (`after` empty) also deletes expired idempotency keys. Forget or
        expire the streams of the chunk after channel `after`; return where the next chunk
        starts, or None after the last chunk."""
        if not after:
            yield ("execute", sql.forget_keys, sql.forget_keys.args({"b_now": now}))
        chunk = {"b_after": after, "b_limit": self.gc_chunk}
        bound = yield ("fetch", sql.gc_bound, sql.gc_bound.args(chunk))
        upto, size = bound[0] if bound else (None, 0)
        if upto is None:
            return None
        params = {"b_now": now, "b_after": after, "b_upto": upto}
        forgotten = yield ("fetch", sql.forget_streams, sql.forget_streams.args(params))
        doomed = [(r[0], PURGE_ALL) for r in forgotten]
        expired = yield ("fetch", sql.expire_pubs, sql.expire_pubs.args(params))
        doomed += [(r[0], r[1]) for r in expired]
        if doomed:
            args = [sql.delete_below.args({"b_channel": ch, "b_lo": lo}) for ch, lo in doomed]
            yield ("executemany", sql.delete_below, args)
        return str(upto) if size >= self.gc_chunk else None

    def _append_plan(
        self, sql: Statements, requests: Sequence[AppendRequest], now: float
    ) -> Plan[list[AppendResult]]:
        leaders, followers = split_keys(requests)
        known: dict[int, Position] = {}
        if leaders:
            known = yield from self._claim_keys(sql, requests, leaders, now)
        if followers or known:
            store = [i for i in range(len(requests)) if i not in followers and i not in known]
        else:
            store = list(range(len(requests)))
        appends = [i for i in store if history_enabled(requests[i])]
        positions, kept_from = yield from self._assign_offsets(sql, requests, appends, now)
        results: list[AppendResult | None] = [None] * len(requests)
        rows: list[tuple[Any, ...]] = []
        plain: list[tuple[Any, ...]] = []
        for i in store:
            req = requests[i]
            offset, epoch = positions.get(i, (0, ""))
            result = results[i] = AppendResult(publication_of(req, offset, now), epoch)
            if offset and offset >= kept_from[req.channel]:
                pub = result.publication
                row = plain_args(req.channel, pub)
                if row is not None:
                    plain.append(row)
                else:
                    rows.append(publication_args(req.channel, pub))
        for i, (offset, epoch) in known.items():
            results[i] = AppendResult(publication_of(requests[i], offset, now), epoch, True)
        for i, first in followers.items():
            leader = results[first]
            assert leader is not None  # a follower comes after its leader
            offset, epoch = leader.publication.offset, leader.epoch
            results[i] = AppendResult(publication_of(requests[i], offset, now), epoch, True)
        yield from self._insert_plan(sql, plain, plain=True)
        yield from self._insert_plan(sql, rows, plain=False)
        keyed = [i for i in leaders.values() if i in positions]  # claimed, with history
        if keyed:
            args = [sql.record.args(self._key_params(requests[i], positions[i])) for i in keyed]
            yield ("executemany", sql.record, args)
        return results  # type: ignore[return-value]  # every index was filled above

    def _insert_plan(self, sql: Statements, rows: Rows, *, plain: bool) -> Plan[None]:
        """Insert publications rows (PLAIN_COLUMNS when `plain`, else PUB_COLUMNS)."""
        if rows and self.insert_in_one:
            for part in chunks(rows):
                values = list(itertools.chain.from_iterable(part))
                yield ("execute", sql.insert_rows(len(part), plain=plain), values)
        elif rows:
            yield ("executemany", sql.insert_plain if plain else sql.insert_pubs, rows)

    def _claim_keys(
        self,
        sql: Statements,
        requests: Sequence[AppendRequest],
        leaders: dict[Key, int],
        now: float,
    ) -> Plan[dict[int, Position]]:
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
            fetched = yield ("fetch", stmt, stmt.args({"b_now": now}, rows))
            claimed.update((r[0], r[1]) for r in fetched)
        live = [key for key in leaders if key not in claimed]
        found: dict[int, Position] = {}
        for part in chunks(live):
            stmt = sql.known(len(part))
            rows = [{"channel": ch, "key": key} for ch, key in part]
            fetched = yield ("fetch", stmt, stmt.args(rows=rows))
            for ch, key, offset, epoch in fetched:
                found[leaders[(ch, key)]] = (int(offset), epoch)
        return found

    def _assign_offsets(
        self,
        sql: Statements,
        requests: Sequence[AppendRequest],
        indices: Sequence[int],
        now: float,
    ) -> Plan[tuple[dict[int, Position], dict[str, int]]]:
        """Advance each stream by its requests' count and delete its stale rows. Returns
        offset/epoch per request index and each channel's first kept offset."""
        groups: dict[str, list[int]] = {}
        for i in indices:
            channel = requests[i].channel
            members = groups.get(channel)
            if members is None:
                groups[channel] = [i]
            else:
                members.append(i)
        positions: dict[int, Position] = {}
        kept_from: dict[str, int] = {}
        stale: list[tuple[Any, ...]] = []
        for part in chunks(sorted(groups)):
            rows = {
                ch: advance_row(ch, [requests[i] for i in groups[ch]], now, self._salt)
                for ch in part
            }
            stmt = sql.advance(len(rows))
            returned = yield ("fetch", stmt, stmt.args(rows=list(rows.values())))
            for channel, epoch, top, first_kept, _ in returned:
                members, row = groups[channel], rows[channel]
                top, first_kept = int(top), int(first_kept)
                first = top - len(members) + 1
                for j, i in enumerate(members):
                    positions[i] = (first + j, epoch)
                kept_from[channel] = first_kept
                fresh = top == len(members)  # a new or re-created stream
                below = purge_below(fresh, top, len(members), row["history_size"], first_kept)
                if below is not None:
                    stale.append(sql.delete_below.args({"b_channel": channel, "b_lo": below}))
        if stale:
            yield ("executemany", sql.delete_below, stale)
        return positions, kept_from

    @staticmethod
    def _key_params(req: AppendRequest, position: Position) -> dict[str, Any]:
        return {
            "b_channel": req.channel,
            "b_key": req.idempotency_key,
            "b_offset": position[0],
            "b_epoch": position[1],
        }


async def run_plan(plan: Plan[T], session: Session) -> T:
    """Run `plan`'s steps one by one on `session` (an open transaction) and return its
    result. On the event loop."""
    reply: Any = None
    try:
        while True:
            kind, stmt, args = plan.send(reply)
            reply = None
            if kind == "fetch":
                reply = await session.fetch(stmt, args)
            elif kind == "executemany":
                await session.executemany(stmt, args)
            else:
                await session.execute(stmt, args)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]
    finally:
        plan.close()
