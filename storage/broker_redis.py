"""Cross-node fan-out over Redis PUB/SUB (engine `redis`), plus the Redis connection helpers
the Redis presence shares. Message bodies are `storage/wire.py`'s.

PUB/SUB channels (Centrifugo's layout, our own message bodies):

* `<prefix>.client.<channel>`: publications, join and leave of `channel`; a node SUBSCRIBEs
  only while it has local subscribers of `channel`;
* `<prefix>.control`: control messages to every node;
* `<prefix>.node.<uid>`: control messages to one node.

With several addresses, channel `<prefix>.client.<channel>` lives on shard
`jump_hash(fnv1a64(channel), n)` (Centrifugo's `consistentIndex`); control and node channels
are subscribed on every shard and published round-robin.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
from collections.abc import Callable, Sequence
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.connection import (
    Connection,
    SSLConnection,
    UnixDomainSocketConnection,
    parse_url,
)
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from centripy.engine.contracts import Broker, BrokerHandler, StorageError
from centripy.engine.types import ClientInfo, Publication
from centripy.storage.wire import (
    KIND_CONTROL,
    decode_message,
    deliver_message,
    encode_control_envelope,
    encode_join_leave,
    encode_publication,
    reconnect_delay,
)

log = logging.getLogger("centripy.broker.redis")

# -- sharding -------------------------------------------------------------------------------

_MASK64 = (1 << 64) - 1


def fnv1a64(data: bytes) -> int:
    h = 0xCBF29CE484222325
    for byte in data:
        h = ((h ^ byte) * 0x100000001B3) & _MASK64
    return h


def jump_hash(key: int, buckets: int) -> int:
    """Lamping & Veach's Jump consistent hash (go-jump), a bucket in [0, buckets)."""
    b, j = -1, 0
    while j < buckets:
        b = j
        key = (key * 2862933555777941757 + 1) & _MASK64
        j = int(float(b + 1) * (float(1 << 31) / float((key >> 33) + 1)))
    return max(b, 0)


def shard_index(channel: str, shards: int) -> int:
    """Centrifugo's `consistentIndex(channel, shards)`."""
    return 0 if shards <= 1 else jump_hash(fnv1a64(channel.encode()), shards)


def connection_kwargs(
    address: str,
    *,
    db: int = 0,
    user: str = "",
    password: str = "",
    connect_timeout: float = 1.0,
    io_timeout: float = 4.0,
) -> dict[str, Any]:
    """redis-py connection kwargs for `address` ("host:port" or a redis:// URL; values in
    the URL win over the arguments). Raises ValueError for an unusable address."""
    url = address if "://" in address else f"redis://{address}"
    try:
        parsed: dict[str, Any] = dict(parse_url(url))
    except ValueError as exc:
        raise ValueError(f"invalid redis address {address!r}: {exc}") from exc
    if "host" not in parsed and "path" not in parsed:
        raise ValueError(f"invalid redis address {address!r}: no host")
    kwargs: dict[str, Any] = {
        "db": db,
        "username": user or None,
        "password": password or None,
        "socket_connect_timeout": connect_timeout,
        "socket_timeout": io_timeout,
        "protocol": 2,
    }
    kwargs.update(parsed)
    return kwargs


def make_client(kwargs: dict[str, Any], retries: int = 1) -> Redis:
    """A pooled client for commands (one retry on a fresh connection: pooled connections
    are stale after a Redis restart)."""
    options = {k: v for k, v in kwargs.items() if k != "connection_class"}
    cls = kwargs.get("connection_class")
    if cls is not None and issubclass(cls, UnixDomainSocketConnection):
        options["unix_socket_path"] = options.pop("path")
    elif cls is not None and issubclass(cls, SSLConnection):
        options["ssl"] = True
    return Redis(**options, retry=Retry(NoBackoff(), retries))


REDIS_ERRORS = (RedisError, OSError, asyncio.TimeoutError)


# -- broker ---------------------------------------------------------------------------------


class _Shard:
    """One Redis instance: a command client (publish) and one PUB/SUB connection owned by
    the shard's session task."""

    def __init__(self, kwargs: dict[str, Any]) -> None:
        self.kwargs = kwargs
        self.label = f"{kwargs.get('host', kwargs.get('path'))}:{kwargs.get('port', '')}"
        self.client = make_client(kwargs)
        self.conn: Connection | None = None
        self.names: set[bytes] = set()  # subscribed client channels (redis names)
        self.acks: dict[bytes, collections.deque[asyncio.Future[None]]] = {}
        self.pongs: dict[bytes, asyncio.Future[None]] = {}  # barrier token -> waiter
        self.task: asyncio.Task[None] | None = None
        self.established = False  # the current session subscribed everything
        self.first_attempt = asyncio.Event()  # the first session is up or failed

    def new_connection(self, client_name: str) -> Connection:
        options = {k: v for k, v in self.kwargs.items() if k != "connection_class"}
        cls = self.kwargs.get("connection_class") or Connection
        conn: Connection = cls(**options, retry=Retry(NoBackoff(), 0), client_name=client_name)
        return conn

    def fail_acks(self) -> None:
        for waiters in self.acks.values():
            for waiter in waiters:
                if not waiter.done():
                    waiter.cancel()
        self.acks.clear()
        for pong in self.pongs.values():
            if not pong.done():
                pong.set_result(None)  # the session is gone: on_reconnect resyncs
        self.pongs.clear()


class RedisBroker(Broker):
    """Redis PUB/SUB broker. All methods run on the node's event loop; the shard session
    tasks call the handler on the same loop."""

    def __init__(
        self,
        addresses: Sequence[str],
        prefix: str = "centrifugo",
        db: int = 0,
        user: str = "",
        password: str = "",
        connect_timeout: float = 1.0,
        io_timeout: float = 4.0,
        *,
        reconnect_backoff: tuple[float, float] = (0.05, 3.0),
    ) -> None:
        if not addresses:
            raise ValueError("RedisBroker needs at least one address")
        if not prefix:
            raise ValueError("RedisBroker needs a non-empty prefix")
        self._shards = [
            _Shard(
                connection_kwargs(
                    address,
                    db=db,
                    user=user,
                    password=password,
                    connect_timeout=connect_timeout,
                    io_timeout=io_timeout,
                ),
            )
            for address in addresses
        ]
        self._prefix = prefix
        self._io_timeout = io_timeout
        self._ping_interval = max(0.5, io_timeout / 2)
        self._backoff = reconnect_backoff
        self._round = itertools.count()
        self._uid = ""
        self._handler: BrokerHandler | None = None
        self._closing = False

    # -- names ----------------------------------------------------------------------------

    def _client_name(self, channel: str) -> bytes:
        return f"{self._prefix}.client.{channel}".encode()

    def _control_name(self) -> bytes:
        return f"{self._prefix}.control".encode()

    def _node_name(self, uid: str) -> bytes:
        return f"{self._prefix}.node.{uid}".encode()

    def _shard_for(self, channel: str) -> _Shard:
        return self._shards[shard_index(channel, len(self._shards))]

    # -- Broker ---------------------------------------------------------------------------

    async def start(self, node_uid: str, handler: BrokerHandler) -> None:
        """Start one session task per shard and wait until each has subscribed or failed
        its first attempt. Never raises for an unreachable Redis: it is retried with
        backoff (publish raises StorageError meanwhile, `subscribe` only remembers)."""
        if not node_uid:
            raise ValueError("node_uid must not be empty")
        self._uid, self._handler, self._closing = node_uid, handler, False
        for shard in self._shards:
            shard.first_attempt.clear()
            shard.task = asyncio.create_task(self._session_loop(shard))
        await asyncio.gather(*(s.first_attempt.wait() for s in self._shards))

    async def close(self) -> None:
        self._closing = True
        tasks = [s.task for s in self._shards if s.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for shard in self._shards:
            shard.task = None
            await shard.client.aclose()

    async def subscribe(self, channel: str) -> None:
        """SUBSCRIBE `<prefix>.client.<channel>` and wait (up to io_timeout) for Redis to
        confirm it. While the shard is disconnected the channel is only remembered: the
        next session subscribes it and then calls `handler.on_reconnect()`."""
        shard = self._shard_for(channel)
        name = self._client_name(channel)
        if name in shard.names:
            return
        shard.names.add(name)
        await self._send_subscribe(shard, [name])

    async def unsubscribe(self, channel: str) -> None:
        """Stop delivering `channel` at once (later messages are dropped) and UNSUBSCRIBE."""
        shard = self._shard_for(channel)
        name = self._client_name(channel)
        if name not in shard.names:
            return
        shard.names.discard(name)
        conn = shard.conn
        if conn is not None:
            try:
                await _send(conn, "UNSUBSCRIBE", name)
            except REDIS_ERRORS as exc:
                log.debug("redis broker: unsubscribe %s failed: %s", channel, exc)

    async def publish(self, channel: str, pub: Publication, epoch: str) -> None:
        body = encode_publication(self._uid, channel, pub, epoch)
        await self._publish(self._shard_for(channel), self._client_name(channel), body)

    async def publish_join_leave(self, channel: str, info: ClientInfo, join: bool) -> None:
        body = encode_join_leave(self._uid, channel, info, join)
        await self._publish(self._shard_for(channel), self._client_name(channel), body)

    async def publish_control(self, data: bytes, node_uid: str = "") -> None:
        """To every other node (""), or to `node_uid` only. A node never receives its own
        control messages, even when addressed to itself."""
        name = self._node_name(node_uid) if node_uid else self._control_name()
        shard = self._shards[next(self._round) % len(self._shards)]
        await self._publish(shard, name, encode_control_envelope(self._uid, data, node_uid))

    async def barrier(self, channel: str) -> None:
        """PING <token> on the channel's PUB/SUB connection: Redis answers in order, after
        every message it had sent on it before."""
        shard = self._shard_for(channel)
        conn = shard.conn
        if conn is None or not shard.established:
            return
        token = f"b{next(self._round)}".encode()
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        shard.pongs[token] = waiter
        try:
            await _send(conn, "PING", token)
            await asyncio.wait_for(waiter, self._io_timeout)  # set on a lost session too
        except REDIS_ERRORS as exc:
            log.debug("redis broker: barrier on %s failed: %s", shard.label, exc)
        finally:
            shard.pongs.pop(token, None)

    # -- internals ------------------------------------------------------------------------

    async def _publish(self, shard: _Shard, name: bytes, body: bytes) -> None:
        if self._handler is None or self._closing:
            raise StorageError("redis broker is not running")
        try:
            await shard.client.publish(name, body)
        except REDIS_ERRORS as exc:
            raise StorageError(f"redis publish to {shard.label} failed: {exc}") from exc

    async def _send_subscribe(self, shard: _Shard, names: Sequence[bytes]) -> None:
        """SUBSCRIBE `names` on the live session (if any) and wait up to io_timeout for the
        confirmations; a lost connection ends the wait (the next session re-subscribes)."""
        conn = shard.conn
        if conn is None or not names:
            return
        loop = asyncio.get_running_loop()
        waiters: list[asyncio.Future[None]] = []
        for name in names:
            waiter: asyncio.Future[None] = loop.create_future()
            shard.acks.setdefault(name, collections.deque()).append(waiter)
            waiters.append(waiter)
        try:
            await _send(conn, "SUBSCRIBE", *names)
        except REDIS_ERRORS as exc:
            log.debug("redis broker: subscribe on %s failed: %s", shard.label, exc)
            return
        _, pending = await asyncio.wait(waiters, timeout=self._io_timeout)
        if pending:
            log.debug("redis broker: %d subscriptions unconfirmed on %s", len(pending), shard.label)

    async def _session_loop(self, shard: _Shard) -> None:
        """One PUB/SUB session after another until close(): connect, SUBSCRIBE everything,
        call handler.on_reconnect() unless this is the first session and nothing failed
        before it, read until the connection is lost, back off, repeat."""
        attempt, lost = 0, False
        while not self._closing:
            conn = shard.new_connection(f"centripy-pubsub-{self._uid[:24]}")
            shard.established = False
            try:
                await conn.connect()  # type: ignore[no-untyped-call]
                await self._run_session(shard, conn, lost)
            except REDIS_ERRORS as exc:
                if shard.established:
                    log.warning("redis broker: lost %s (%s), reconnecting", shard.label, exc)
                elif attempt == 0:
                    log.warning("redis broker: cannot reach %s (%s), retrying", shard.label, exc)
            finally:
                shard.first_attempt.set()
                shard.conn = None
                shard.fail_acks()
                await conn.disconnect(nowait=True)
            lost = True
            if shard.established:
                attempt = 0
            await asyncio.sleep(reconnect_delay(attempt, *self._backoff))
            attempt += 1

    async def _run_session(self, shard: _Shard, conn: Connection, lost: bool) -> None:
        shard.conn = conn
        reader = asyncio.create_task(self._read_loop(shard, conn))
        pinger = asyncio.create_task(self._ping_loop(conn))
        try:
            names = [self._control_name(), self._node_name(self._uid), *sorted(shard.names)]
            for start in range(0, len(names), 512):
                await self._send_subscribe(shard, names[start : start + 512])
            if not reader.done():
                shard.established = True
                shard.first_attempt.set()
                if lost:
                    log.warning("redis broker: reconnected to %s, re-subscribed", shard.label)
                    self._call(lambda h: h.on_reconnect())
            await reader  # ends only by raising: the connection is gone
        finally:
            pinger.cancel()
            reader.cancel()
            await asyncio.gather(pinger, reader, return_exceptions=True)

    async def _ping_loop(self, conn: Connection) -> None:
        while True:
            await asyncio.sleep(self._ping_interval)
            await _send(conn, "PING")

    async def _read_loop(self, shard: _Shard, conn: Connection) -> None:
        timeout = self._ping_interval + self._io_timeout
        while True:
            reply = await conn.read_response(timeout=timeout)
            if isinstance(reply, bytes):  # RESP3: PING <token> answers the token
                self._pong(shard, reply)
                continue
            if not isinstance(reply, list) or not reply:
                continue
            kind = reply[0]
            if kind == b"pong":
                self._pong(shard, reply[1] if len(reply) > 1 else b"")
                continue
            if kind == b"message":
                self._dispatch(shard, reply[1], reply[2])
            elif kind == b"subscribe":
                waiters = shard.acks.get(reply[1])
                if waiters:
                    waiter = waiters.popleft()
                    if not waiter.done():
                        waiter.set_result(None)

    @staticmethod
    def _pong(shard: _Shard, token: bytes) -> None:
        waiter = shard.pongs.pop(token, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _dispatch(self, shard: _Shard, name: bytes, body: bytes) -> None:
        try:
            msg = decode_message(body)
        except ValueError as exc:
            log.warning("redis broker: dropped a malformed message on %r: %s", name, exc)
            return
        if msg.origin == self._uid:
            return
        if msg.kind == KIND_CONTROL:
            data = msg.data
            self._call(lambda h: h.on_control(data))
        elif name in shard.names:
            deliver_message(self._call, msg)

    def _call(self, fn: Callable[[BrokerHandler], None]) -> None:
        handler = self._handler
        if handler is None:
            return
        try:
            fn(handler)
        except Exception:
            log.exception("redis broker: handler failed")


async def _send(conn: Connection, *args: Any) -> None:
    """Send on a live connection only (redis-py would silently reconnect a dropped one)."""
    if not conn.is_connected:
        raise ConnectionError("redis connection is closed")
    await conn.send_command(*args)
