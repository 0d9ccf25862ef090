"""Cross-node fan-out on PostgreSQL alone: LISTEN/NOTIFY (engine `postgresql`).

Publications, join and leave travel on `shards` LISTEN channels `<channel_prefix>_pub_<k>`
(`k` = crc32(channel) mod `shards`; one channel `<channel_prefix>_pub` when `shards` is 1):
a node LISTENs only to the shards of the channels it has local subscribers for (LISTEN on
the first channel of a shard, UNLISTEN after the last) and drops what it receives for other
channels of those shards. `<channel_prefix>_ctl` carries control messages (to all nodes, or
addressed to one uid) and barrier tokens; every node LISTENs to it.

A NOTIFY payload is text shorter than 8000 bytes, so a message body (the binary envelope of
`storage.wire`) is sent as `i<base64(body)>` when that fits in `inline_limit`
characters, otherwise the body is inserted into `<table>(id bigserial, body bytea,
created_at timestamptz)` and the NOTIFY (same statement, so it is delivered only once the
row is visible) carries `r["<id>", "<origin>", "<kind>", "<channel or target>"]`; receivers
that want it fetch the rows of everything queued with one SELECT. Sending is group-committed:
what is queued while a transaction is in flight goes in the next one (one statement), in call
order. Rows are deleted after `gc_after` seconds by publishing nodes; a receiver that finds
a wanted row gone (it lagged longer than that) calls `handler.on_reconnect()`, so its
channels fill the gap from the log.

One dedicated connection LISTENs (application_name `centripy-listen-<uid>`); a small pool
sends NOTIFYs and fetches large bodies. Notifications wait in a queue of at most
`max_backlog`; when a lagging node overflows it, the backlog is dropped and the handler's
`on_reconnect()` is called in its place (the channels re-read the log, which holds every
publication). Notifications are handled in arrival (= commit) order by one task on the
node's loop, in batches of up to `fetch_batch`.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import re
import time
import zlib
from collections import deque
from collections.abc import Callable
from typing import Any, NamedTuple

import asyncpg
import orjson

from centripy.engine.contracts import Broker, BrokerHandler, StorageError
from centripy.engine.types import ClientInfo, Publication
from centripy.storage.wire import (
    KIND_CONTROL,
    call_handler,
    decode_message,
    deliver_message,
    encode_control_envelope,
    encode_join_leave,
    encode_publication,
    reconnect_delay,
)

log = logging.getLogger("centripy.broker.postgres")

PG_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, asyncio.TimeoutError)
# and on the LISTEN session, asyncpg's "another operation is in progress" once the server
# cut it (a FATAL error arrived while idle)
LISTEN_ERRORS = (*PG_ERRORS, asyncpg.InternalClientError)
NOTIFY_LIMIT = 7999  # PostgreSQL rejects payloads of 8000 bytes or more
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,49}$")
MAX_SHARDS = 1024
BATCH_BYTES = 4 << 20  # a group-committed transaction stops growing past this
_OVERFLOW = None  # queued in place of a dropped backlog


def asyncpg_dsn(url: str) -> str:
    """`postgresql+asyncpg://...` (SQLAlchemy style) -> `postgresql://...` for asyncpg, which
    takes only `postgresql://` and `postgres://`. ValueError when `url` is not PostgreSQL's."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.split("+")[0] not in ("postgresql", "postgres"):
        raise ValueError(f"not a PostgreSQL URL: {url!r}")
    return f"postgresql://{rest}"


def shard_of(channel: str, shards: int) -> int:
    """The NOTIFY shard of `channel` (the same on every node and in every process)."""
    return zlib.crc32(channel.encode()) % shards


def check_identifier(name: str, what: str) -> str:
    if not _IDENT.match(name):
        raise ValueError(f"{what} {name!r} must match {_IDENT.pattern}")
    return name


class _Out(NamedTuple):
    """A message waiting for the next transaction: inline (`payload`) or stored (`body`)."""

    listen: str
    payload: str
    body: bytes | None
    kind: str
    key: str
    done: asyncio.Future[None]


class PostgresBroker(Broker):
    """LISTEN/NOTIFY broker. All methods run on the node's event loop, and so do the
    handler calls (from the notification task)."""

    def __init__(
        self,
        dsn: str,
        *,
        channel_prefix: str = "centripy",
        table: str = "centripy_broker_messages",
        pool_size: int = 4,
        connect_timeout: float = 5.0,
        io_timeout: float = 5.0,
        inline_limit: int = 7900,
        gc_after: float = 60.0,
        reconnect_backoff: tuple[float, float] = (0.05, 3.0),
        shards: int = 32,
        max_backlog: int = 10_000,
        fetch_batch: int = 256,
        notify_batch: int = 256,
    ) -> None:
        self._dsn = asyncpg_dsn(dsn)
        prefix = check_identifier(channel_prefix, "channel_prefix")
        if not 1 <= shards <= MAX_SHARDS:
            raise ValueError(f"shards must be in 1..{MAX_SHARDS}")
        if min(max_backlog, fetch_batch, notify_batch) < 1:
            raise ValueError("max_backlog, fetch_batch and notify_batch must be positive")
        self._shards = shards
        self._pub_base, self._ctl_channel = f"{prefix}_pub", f"{prefix}_ctl"
        self._table = check_identifier(table, "table")
        if not 16 <= inline_limit <= NOTIFY_LIMIT:
            raise ValueError(f"inline_limit must be in 16..{NOTIFY_LIMIT}")
        self._inline_limit = inline_limit
        self._pool_size = pool_size
        self._connect_timeout = connect_timeout
        self._io_timeout = io_timeout
        self._gc_after = gc_after
        self._backoff = reconnect_backoff
        self._uid = ""
        self._handler: BrokerHandler | None = None
        self._pool: asyncpg.Pool | None = None
        self._channels: set[str] = set()
        self._shard_counts: dict[int, int] = {}  # shard -> local channels in it
        self._listened: set[int] = set()  # shards LISTENed to on the current session
        self._conn: asyncpg.Connection | None = None  # the LISTEN session, once set up
        self._conn_lock = asyncio.Lock()  # one operation at a time on the LISTEN session
        self._max_backlog = max_backlog
        self._fetch_batch = fetch_batch
        self._queue: asyncio.Queue[str | None] = asyncio.Queue()
        self.received = 0  # notifications received (every shard and kind)
        self.overflows = 0  # backlogs dropped (each followed by on_reconnect)
        self.missed_rows = 0  # wanted stored messages found collected (or unreadable)
        self._tasks: list[asyncio.Task[None]] = []
        self._first_attempt = asyncio.Event()
        self._table_ready = False
        self._outbox: deque[_Out] = deque()
        self._sender: asyncio.Task[None] | None = None
        self._notify_batch = notify_batch
        self._table_lock = asyncio.Lock()
        self._last_gc = 0.0
        self._barriers: dict[str, asyncio.Future[None]] = {}
        self._barrier_seq = 0
        self._listening = False  # a LISTEN session is up

    # -- Broker ---------------------------------------------------------------------------

    async def start(self, node_uid: str, handler: BrokerHandler) -> None:
        """Create the pool (lazily connecting), start the listener and the notification
        task and wait until the first LISTEN succeeded or failed. Never raises for an
        unreachable database: the listener retries with backoff and publish raises
        StorageError meanwhile."""
        if not node_uid:
            raise ValueError("node_uid must not be empty")
        self._uid, self._handler = node_uid, handler
        self._pool = await asyncpg.create_pool(
            self._dsn,
            min_size=0,
            max_size=self._pool_size,
            timeout=self._connect_timeout,
            command_timeout=self._io_timeout,
        )
        self._first_attempt.clear()
        self._tasks = [
            asyncio.create_task(self._listen_loop()),
            asyncio.create_task(self._notification_loop()),
        ]
        await self._first_attempt.wait()

    async def close(self) -> None:
        if self._sender is not None:
            self._tasks.append(self._sender)
            self._sender = None
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        pool, self._pool, self._handler = self._pool, None, None
        if pool is not None:
            await pool.close()

    async def subscribe(self, channel: str) -> None:
        """Deliver this channel's messages from now on: LISTENs to its shard (when no other
        local channel did) before returning. Without a LISTEN session the channel is
        remembered and the next session LISTENs (then calls on_reconnect)."""
        if channel in self._channels:
            return
        self._channels.add(channel)
        shard = shard_of(channel, self._shards)
        self._shard_counts[shard] = self._shard_counts.get(shard, 0) + 1
        await self._sync_shard(shard)

    async def unsubscribe(self, channel: str) -> None:
        """Stop delivering; UNLISTENs from the shard after its last local channel."""
        if channel not in self._channels:
            return
        self._channels.discard(channel)
        shard = shard_of(channel, self._shards)
        left = self._shard_counts.get(shard, 0) - 1
        if left > 0:
            self._shard_counts[shard] = left
        else:
            self._shard_counts.pop(shard, None)
        await self._sync_shard(shard)

    def shard_channel(self, shard: int) -> str:
        """The LISTEN channel of `shard`."""
        return self._pub_base if self._shards == 1 else f"{self._pub_base}_{shard}"

    def listened_shards(self) -> set[int]:
        """The shards the current LISTEN session listens to (a copy)."""
        return set(self._listened)

    async def _sync_shard(self, shard: int) -> None:
        """LISTEN to / UNLISTEN from `shard` so that it matches whether a local channel is in
        it. A failure ends the session: the next one LISTENs and resyncs every channel."""
        async with self._conn_lock:
            conn = self._conn
            if conn is None or conn.is_closed():
                return
            wanted = self._shard_counts.get(shard, 0) > 0
            try:
                if wanted and shard not in self._listened:
                    await conn.add_listener(self.shard_channel(shard), self._on_notify)
                    self._listened.add(shard)
                elif not wanted and shard in self._listened:
                    self._listened.discard(shard)
                    await conn.remove_listener(self.shard_channel(shard), self._on_notify)
            except LISTEN_ERRORS as exc:
                log.warning("postgres broker: (UN)LISTEN failed, reconnecting: %r", exc)
                conn.terminate()

    async def publish(self, channel: str, pub: Publication, epoch: str) -> None:
        body = encode_publication(self._uid, channel, pub, epoch)
        await self._notify(self._pub_for(channel), body, "p", channel)

    async def publish_join_leave(self, channel: str, info: ClientInfo, join: bool) -> None:
        body = encode_join_leave(self._uid, channel, info, join)
        await self._notify(self._pub_for(channel), body, "j" if join else "l", channel)

    def _pub_for(self, channel: str) -> str:
        return self.shard_channel(shard_of(channel, self._shards))

    async def publish_control(self, data: bytes, node_uid: str = "") -> None:
        """To every other node (""), or to `node_uid` only. A node never receives its own
        control messages, even when addressed to itself."""
        body = encode_control_envelope(self._uid, data, node_uid)
        await self._notify(self._ctl_channel, body, KIND_CONTROL, node_uid)

    async def barrier(self, channel: str) -> None:
        """NOTIFY a token to ourselves on the control channel and wait until the listener
        hands it over: notifications arrive in commit order, so everything committed
        before it (any node's publications) has been handled by then."""
        if self._pool is None or not self._listening:
            return  # nothing is received now; the reconnect resyncs
        self._barrier_seq += 1
        token = f"b{self._uid}:{self._barrier_seq}"
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._barriers[token] = waiter
        try:
            await self._with_conn(
                lambda c: c.execute("SELECT pg_notify($1, $2)", self._ctl_channel, token)
            )
            await asyncio.wait_for(waiter, self._io_timeout)  # set on a lost session too
        except (StorageError, TimeoutError) as exc:
            log.debug("postgres broker: barrier failed: %s", exc)
        finally:
            self._barriers.pop(token, None)

    # -- sending --------------------------------------------------------------------------

    async def _notify(self, listen: str, body: bytes, kind: str, key: str) -> None:
        """Group commit: what is queued while a transaction is in flight goes in the next
        one, in call order (PostgreSQL serialises the commits of every NOTIFYing transaction
        of the database, so one NOTIFY per transaction caps all nodes at one commit each)."""
        if self._pool is None or self._handler is None:
            raise StorageError("postgres broker is not running")
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        stored = 1 + 4 * ((len(body) + 2) // 3) > self._inline_limit  # len("i" + base64)
        if not stored:
            payload = "i" + base64.b64encode(body).decode("ascii")
            self._outbox.append(_Out(listen, payload, None, "", "", done))
        else:
            longest = "r" + orjson.dumps(["9" * 19, self._uid, kind, key]).decode()
            if len(longest) + 6 > NOTIFY_LIMIT:  # + json_build_array's blanks after commas
                raise StorageError("channel name too long for a NOTIFY reference")
            await self._ensure_table()
            self._outbox.append(_Out(listen, "", body, kind, key, done))
        if self._sender is None or self._sender.done():
            self._sender = asyncio.create_task(self._send_outbox())
        await done
        if stored:
            await self._maybe_gc()

    async def _send_outbox(self) -> None:
        batch: list[_Out] = []
        try:
            while self._outbox:
                seen: set[tuple[str, str]] = set()
                size = 0
                while self._outbox and len(batch) < self._notify_batch and size < BATCH_BYTES:
                    out = self._outbox[0]
                    if out.body is None:
                        if (out.listen, out.payload) in seen:
                            break  # PostgreSQL would fold identical NOTIFYs of a transaction
                        seen.add((out.listen, out.payload))
                    size += len(out.payload) + len(out.body or b"")
                    batch.append(self._outbox.popleft())
                error: StorageError | None = None
                try:
                    await self._send_batch(batch)
                except StorageError as exc:
                    error = exc
                for out in batch:
                    if out.done.done():
                        continue  # its caller gave up waiting
                    if error is None:
                        out.done.set_result(None)
                    else:
                        out.done.set_exception(error)
                batch = []
        finally:
            batch.extend(self._outbox)  # cancelled (close): nothing will send these
            self._outbox.clear()
            for out in batch:
                if not out.done.done():
                    out.done.set_exception(StorageError("postgres broker closed"))

    async def _send_batch(self, batch: list[_Out]) -> None:
        """One statement (one transaction) NOTIFYing the batch in order; large bodies are
        inserted into the table by the same statement and their NOTIFY carries the row id
        (delivered at commit, once the row is visible)."""
        args: tuple[Any, ...]
        if len(batch) == 1 and batch[0].body is None:
            sql, args = "SELECT pg_notify($1, $2)", (batch[0].listen, batch[0].payload)
        elif all(out.body is None for out in batch):
            sql = (
                "SELECT pg_notify(c, p) FROM unnest($1::text[], $2::text[]) WITH ORDINALITY "
                "AS t(c, p, n) ORDER BY n"
            )
            args = ([out.listen for out in batch], [out.payload for out in batch])
        else:
            sql = (
                "WITH input AS MATERIALIZED (SELECT c, p, b, k, key, n, CASE WHEN b IS NULL "
                f"THEN NULL ELSE nextval(pg_get_serial_sequence('{self._table}', 'id')) END AS id "
                "FROM unnest($1::text[], $2::text[], $3::bytea[], $4::text[], $5::text[]) "
                "WITH ORDINALITY AS t(c, p, b, k, key, n)), "
                f"stored AS (INSERT INTO {self._table} (id, body) "
                "SELECT id, b FROM input WHERE id IS NOT NULL) "
                "SELECT pg_notify(c, CASE WHEN id IS NULL THEN p ELSE 'r' || "
                "json_build_array(id::text, $6::text, k, key)::text END) FROM input ORDER BY n"
            )
            args = (
                [out.listen for out in batch],
                [out.payload for out in batch],
                [out.body for out in batch],
                [out.kind for out in batch],
                [out.key for out in batch],
                self._uid,
            )
        await self._with_conn(lambda c: c.execute(sql, *args))

    async def _with_conn(self, action: Callable[[asyncpg.Connection], Any]) -> Any:
        """Run `action` on a pooled connection; one retry on a connection that turns out to
        be dead; StorageError on any database failure."""
        pool = self._pool
        if pool is None or self._handler is None:
            raise StorageError("postgres broker is not running")
        for attempt in (0, 1):
            try:
                async with pool.acquire(timeout=self._connect_timeout) as conn:
                    return await action(conn)
            except (asyncpg.ConnectionDoesNotExistError, asyncpg.InterfaceError) as exc:
                if attempt == 1:
                    raise StorageError(f"postgres broker: {exc}") from exc
            except PG_ERRORS as exc:
                raise StorageError(f"postgres broker: {exc}") from exc
        raise AssertionError("unreachable")

    async def _ensure_table(self) -> None:
        if self._table_ready:
            return
        ddl = (
            f"CREATE TABLE IF NOT EXISTS {self._table} (id bigserial PRIMARY KEY, "
            "body bytea NOT NULL, created_at timestamptz NOT NULL DEFAULT now())"
        )
        duplicate = (
            asyncpg.UniqueViolationError,
            asyncpg.DuplicateTableError,
            asyncpg.DuplicateObjectError,
        )
        async with self._table_lock:  # one CREATE per node, however many publish at once
            if self._table_ready:
                return
            try:
                await self._with_conn(lambda c: c.execute(ddl))
            except StorageError as exc:
                # nodes racing on CREATE TABLE IF NOT EXISTS: the losers see a duplicate
                # (the table's, or its row type's: "type ... already exists")
                if not isinstance(exc.__cause__, duplicate):
                    raise
            self._table_ready = True

    async def _maybe_gc(self) -> None:
        now = time.monotonic()
        if now - self._last_gc < min(10.0, self._gc_after):
            return
        self._last_gc = now
        sql = f"DELETE FROM {self._table} WHERE created_at < now() - make_interval(secs => $1)"
        try:
            await self._with_conn(lambda c: c.execute(sql, float(self._gc_after)))
        except StorageError as exc:
            log.warning("postgres broker: garbage collection failed: %s", exc)

    # -- receiving ------------------------------------------------------------------------

    async def _listen_loop(self) -> None:
        """One LISTEN session after another until close(); after a lost session (or a
        failed first attempt) the next one calls handler.on_reconnect() once LISTENing."""
        attempt, lost = 0, False
        while True:
            established = False
            try:
                conn = await asyncpg.connect(
                    self._dsn,
                    timeout=self._connect_timeout,
                    command_timeout=self._io_timeout,
                    server_settings={"application_name": self.listener_name()},
                )
                try:
                    established = await self._listen_session(conn, lost)
                finally:
                    self._conn = None
                    self._listened.clear()
                    self._end_barriers()
                    conn.terminate()
            except LISTEN_ERRORS as exc:
                if attempt == 0:
                    log.warning("postgres broker: listener connection failed: %r", exc)
            finally:
                self._first_attempt.set()
            lost = True
            attempt = 0 if established else attempt + 1
            await asyncio.sleep(reconnect_delay(attempt, *self._backoff))

    def _end_barriers(self) -> None:
        """The LISTEN session is gone: nothing waits for it (the reconnect resyncs)."""
        self._listening = False
        for waiter in self._barriers.values():
            if not waiter.done():
                waiter.set_result(None)

    def listener_name(self) -> str:
        """The application_name of the listening connection (tests terminate it by name)."""
        return f"centripy-listen-{self._uid}"[:63]

    async def _listen_session(self, conn: asyncpg.Connection, lost: bool) -> bool:
        closed = asyncio.Event()
        conn.add_termination_listener(lambda _conn: closed.set())
        async with self._conn_lock:
            await conn.add_listener(self._ctl_channel, self._on_notify)
            for shard in sorted(self._shard_counts):
                await conn.add_listener(self.shard_channel(shard), self._on_notify)
                self._listened.add(shard)
            self._conn = conn
        self._listening = True
        self._first_attempt.set()
        if lost:
            log.warning("postgres broker: listener reconnected")
            self._call(lambda h: h.on_reconnect())
        while not closed.is_set() and not conn.is_closed():
            try:
                await asyncio.wait_for(closed.wait(), max(0.5, self._io_timeout / 2))
            except TimeoutError:
                try:
                    async with self._conn_lock:
                        await conn.fetchval("SELECT 1", timeout=self._io_timeout)
                except LISTEN_ERRORS as exc:
                    log.warning("postgres broker: listener keep-alive failed: %r", exc)
                    break
        log.warning("postgres broker: listener connection lost, reconnecting")
        return True

    def _on_notify(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        self.received += 1
        if self._queue.qsize() < self._max_backlog:
            self._queue.put_nowait(payload)
            return
        # A lagging node: drop the backlog and resync from the log instead of growing.
        dropped = self._queue.qsize() + 1
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if item is not None and item.startswith("b"):
                self._release_barrier(item)
        if payload.startswith("b"):
            self._release_barrier(payload)
        self.overflows += 1
        log.warning(
            "postgres broker: %d notifications behind (max_backlog), dropped them; "
            "re-reading the log of every local channel",
            dropped,
        )
        self._queue.put_nowait(_OVERFLOW)

    def _release_barrier(self, token: str) -> None:
        waiter = self._barriers.pop(token, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _notification_loop(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self._fetch_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                await self._handle_batch(batch)
            except Exception:  # a bug must not end the only receiving task
                log.exception("postgres broker: a batch of notifications failed; resyncing")
                self._call(lambda h: h.on_reconnect())

    async def _handle_batch(self, batch: list[str | None]) -> None:
        """Handle queued notifications in order; the stored bodies that are wanted are
        fetched first, with one SELECT."""
        refs: dict[int, str] = {}  # row id -> kind, of wanted stored messages
        parsed: list[tuple[str, Any]] = []
        for payload in batch:
            try:
                parsed.append(self._parse(payload, refs))
            except (ValueError, TypeError) as exc:
                log.warning("postgres broker: dropped a malformed notification: %s", exc)
        bodies = await self._fetch(list(refs)) if refs else {}
        gap = False
        for what, value in parsed:
            if what == "body":
                self._deliver(value)
            elif what == "row":
                body = bodies.get(value)
                if body is not None:
                    self._deliver(body)
                elif refs[value] != KIND_CONTROL:
                    gap = True  # a publication (or join/leave) we wanted is gone
                else:
                    log.warning("postgres broker: stored control message %s lost", value)
            elif what == "barrier":
                self._release_barrier(value)
            elif what == "overflow":
                self._call(lambda h: h.on_reconnect())
        if gap:
            self.missed_rows += 1
            log.warning(
                "postgres broker: stored messages collected or unreadable before this node "
                "fetched them; re-reading the log of every local channel"
            )
            self._call(lambda h: h.on_reconnect())

    def _parse(self, payload: str | None, refs: dict[int, str]) -> tuple[str, Any]:
        if payload is None:
            return "overflow", None
        if payload.startswith("b"):
            return "barrier", payload
        if payload.startswith("r"):
            row_id, origin, kind, key = orjson.loads(payload[1:])
            if not self._wanted(origin, kind, key):
                return "skip", None
            refs[int(row_id)] = kind
            return "row", int(row_id)
        if payload.startswith("i"):
            return "body", base64.b64decode(payload[1:], validate=True)
        raise ValueError(f"unknown notification prefix {payload[:1]!r}")

    async def _fetch(self, ids: list[int]) -> dict[int, bytes]:
        sql = f"SELECT id, body FROM {self._table} WHERE id = ANY($1::bigint[])"
        try:
            rows = await self._with_conn(lambda c: c.fetch(sql, ids))
        except StorageError as exc:
            log.warning("postgres broker: could not fetch %d stored messages: %s", len(ids), exc)
            return {}
        return {int(row["id"]): bytes(row["body"]) for row in rows}

    def _deliver(self, body: bytes) -> None:
        try:
            msg = decode_message(body)
        except ValueError as exc:
            log.warning("postgres broker: dropped a malformed message: %s", exc)
            return
        key = msg.target if msg.kind == KIND_CONTROL else msg.channel
        if not self._wanted(msg.origin, msg.kind, key):
            return
        if msg.kind == KIND_CONTROL:
            data = msg.data
            self._call(lambda h: h.on_control(data))
        else:
            deliver_message(self._call, msg)

    def _wanted(self, origin: str, kind: str, key: str) -> bool:
        if origin == self._uid:
            return False
        if kind == KIND_CONTROL:
            return key in ("", self._uid)
        return key in self._channels

    def _call(self, fn: Callable[[BrokerHandler], None]) -> None:
        call_handler(self._handler, fn, "postgres")
