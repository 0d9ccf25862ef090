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

Sentinel (`sentinel=`): one shard whose connections go to the master the sentinels name
(storage/redis_conn.py); the session asks them again on every ping and starts over (then
`on_reconnect`) when the master changed. Cluster (`cluster=True`): sharded PUB/SUB (Redis 7
SPUBLISH/SSUBSCRIBE), one shard per master from CLUSTER SLOTS at start, every PUB/SUB name
on the master of its hash slot (control and node names too), so publisher and subscribers of
a name meet on one server and the barrier's PING orders as on one Redis. The slot map is
read at start; when a session is lost, the shard asks the cluster again who serves its
slots and follows a failover to the promoted replica (a resharding, i.e. slots moving
between masters, is not followed).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
from collections.abc import Callable, Sequence
from typing import Any

from redis.asyncio.connection import AbstractConnection as Connection

from centripy.engine.contracts import Broker, BrokerHandler, StorageError
from centripy.engine.types import ClientInfo, Publication
from centripy.storage.redis_conn import (
    REDIS_ERRORS,
    ClusterMap,
    MasterLocator,
    RedisTarget,
    RedisTLS,
    SentinelOptions,
    close_quietly,
    cluster_slots,
    connection_kwargs,
)
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

log = logging.getLogger("centripy.broker.redis")

__all__ = ["REDIS_ERRORS", "RedisBroker", "connection_kwargs", "shard_index"]

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


# -- broker ---------------------------------------------------------------------------------


class _Shard:
    """One Redis server (or Sentinel-named master): the target's command client (publish)
    and one PUB/SUB connection owned by the shard's session task. `sharded`: Redis Cluster's
    SSUBSCRIBE/SPUBLISH instead of SUBSCRIBE/PUBLISH."""

    def __init__(self, target: RedisTarget, *, sharded: bool = False) -> None:
        self.target = target
        self.sharded = sharded
        self.sub, self.unsub = (b"SSUBSCRIBE", b"SUNSUBSCRIBE") if sharded else (
            b"SUBSCRIBE", b"UNSUBSCRIBE")  # fmt: skip
        self.kinds = (b"smessage", b"ssubscribe", b"sunsubscribe") if sharded else (
            b"message", b"subscribe", b"unsubscribe")  # fmt: skip
        self.conn: Connection | None = None
        self.names: set[bytes] = set()  # subscribed client channels (redis names)
        self.fixed: list[bytes] = []  # control/node names of this shard, always subscribed
        self.acks: dict[bytes, collections.deque[asyncio.Future[None]]] = {}
        self.unsubscribing: collections.Counter[bytes] = collections.Counter()  # sent, unanswered
        self.pongs: dict[bytes, asyncio.Future[None]] = {}  # barrier token -> waiter
        self.task: asyncio.Task[None] | None = None
        self.established = False  # the current session subscribed everything
        self.first_attempt = asyncio.Event()  # the first session is up or failed

    @property
    def label(self) -> str:
        return self.target.label

    def fail_acks(self) -> None:
        for waiters in self.acks.values():
            for waiter in waiters:
                if not waiter.done():
                    waiter.cancel()
        self.acks.clear()
        self.unsubscribing.clear()
        for pong in self.pongs.values():
            if not pong.done():
                pong.set_result(None)  # the session is gone: on_reconnect resyncs
        self.pongs.clear()

    async def publish(self, name: bytes, body: bytes) -> None:
        command = "SPUBLISH" if self.sharded else "PUBLISH"
        await self.target.client.execute_command(command, name, body)  # type: ignore[no-untyped-call]


class RedisBroker(Broker):
    """Redis PUB/SUB broker. All methods run on the node's event loop; the shard session
    tasks call the handler on the same loop.

    `addresses`: the Redis servers (shards); with `sentinel`, the sentinels instead; with
    `cluster`, seed nodes of a Redis Cluster."""

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
        tls: RedisTLS | None = None,
        sentinel: SentinelOptions | None = None,
        cluster: bool = False,
    ) -> None:
        if not addresses:
            raise ValueError("RedisBroker needs at least one address")
        if not prefix:
            raise ValueError("RedisBroker needs a non-empty prefix")
        if sentinel is not None and cluster:
            raise ValueError("redis: Sentinel and Cluster exclude each other")
        kw: dict[str, Any] = {
            "db": db,
            "user": user,
            "password": password,
            "connect_timeout": connect_timeout,
            "io_timeout": io_timeout,
        }
        self._kw, self._tls = kw, tls
        self._locator: MasterLocator | None = None
        self._seeds: list[RedisTarget] = []
        if sentinel is not None:
            self._locator = MasterLocator(
                addresses, sentinel, connect_timeout=connect_timeout, io_timeout=io_timeout
            )
            master = RedisTarget(connection_kwargs(addresses[0], **kw), tls, locate=self._locator)
            self._shards = [_Shard(master)]
        elif cluster:
            self._seeds = [RedisTarget(connection_kwargs(a, **kw), tls) for a in addresses]
            self._shards = []  # from CLUSTER SLOTS in start()
        else:
            self._shards = [_Shard(RedisTarget(connection_kwargs(a, **kw), tls)) for a in addresses]
        self._cluster: ClusterMap | None = None
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
        if self._cluster is not None:
            return self._shards[self._cluster.index(self._client_name(channel))]
        return self._shards[shard_index(channel, len(self._shards))]

    def _control_shard(self, name: bytes) -> _Shard:
        if self._cluster is not None:
            return self._shards[self._cluster.index(name)]
        return self._shards[next(self._round) % len(self._shards)]

    # -- Broker ---------------------------------------------------------------------------

    async def start(self, node_uid: str, handler: BrokerHandler) -> None:
        """Start one session task per shard and wait until each has subscribed or failed
        its first attempt. Never raises for an unreachable Redis: it is retried with
        backoff (publish raises StorageError meanwhile, `subscribe` only remembers). With a
        cluster, raises StorageError when no seed node tells the slot map."""
        if not node_uid:
            raise ValueError("node_uid must not be empty")
        self._uid, self._handler, self._closing = node_uid, handler, False
        if self._seeds and self._cluster is None:
            await self._map_cluster()
        control, mine = self._control_name(), self._node_name(node_uid)
        for shard in self._shards:
            shard.fixed = [control, mine]
        if self._cluster is not None:
            for shard in self._shards:
                shard.fixed = []
            self._control_shard(control).fixed.append(control)
            self._control_shard(mine).fixed.append(mine)
        for shard in self._shards:
            shard.first_attempt.clear()
            shard.task = asyncio.create_task(self._session_loop(shard))
        await asyncio.gather(*(s.first_attempt.wait() for s in self._shards))

    async def _map_cluster(self) -> None:
        try:
            self._cluster = await cluster_slots(self._seeds)
        except REDIS_ERRORS as exc:
            raise StorageError(f"redis cluster: {exc}") from exc
        self._shards = [
            _Shard(RedisTarget(connection_kwargs(m, **self._kw), self._tls), sharded=True)
            for m in self._cluster.masters
        ]
        log.info("redis broker: cluster of %d masters", len(self._shards))

    async def close(self) -> None:
        self._closing = True
        tasks = [s.task for s in self._shards if s.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for shard in self._shards:
            shard.task = None
        await close_quietly([s.target for s in self._shards] + self._seeds)

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
                await _send(conn, shard.unsub, name)
                shard.unsubscribing[name] += 1
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
        if not self._shards:
            raise StorageError("redis broker is not running")
        shard = self._control_shard(name)
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
            await shard.publish(name, body)
        except REDIS_ERRORS as exc:
            raise StorageError(f"redis publish to {shard.label} failed: {exc}") from exc

    async def _send_subscribe(self, shard: _Shard, names: Sequence[bytes]) -> None:
        """SUBSCRIBE `names` on the live session (if any) and wait up to io_timeout for the
        confirmations; a lost connection ends the wait (the next session re-subscribes).
        SSUBSCRIBE takes one name per command (names of one command share a slot)."""
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
            if shard.sharded:
                for name in names:
                    await _send(conn, shard.sub, name)
            else:
                await _send(conn, shard.sub, *names)
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
            if lost and self._cluster is not None:
                await self._follow_failover(shard)
            conn = shard.target.new_connection(f"centripy-pubsub-{self._uid[:24]}")
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

    async def _follow_failover(self, shard: _Shard) -> None:
        """Cluster, after a lost session: ask the cluster which master serves this shard's
        slots now (a replica promoted by a failover) and point the shard there."""
        assert self._cluster is not None
        slot = self._cluster.slots.index(self._shards.index(shard))
        seeds = [s.target for s in self._shards if s is not shard] + self._seeds
        try:
            fresh = await cluster_slots(seeds)
        except REDIS_ERRORS as exc:
            log.debug("redis broker: cluster map unavailable: %s", exc)
            return
        address = fresh.masters[fresh.slots[slot]]
        if address == shard.target.label:
            return
        log.warning("redis broker: slot %d moved from %s to %s", slot, shard.label, address)
        old, shard.target = (
            shard.target,
            RedisTarget(connection_kwargs(address, **self._kw), self._tls),
        )
        await close_quietly([old])

    async def _run_session(self, shard: _Shard, conn: Connection, lost: bool) -> None:
        shard.conn = conn
        reader = asyncio.create_task(self._read_loop(shard, conn))
        pinger = asyncio.create_task(self._ping_loop(shard, conn))
        try:
            names = [*shard.fixed, *sorted(shard.names)]
            for start in range(0, len(names), 512):
                await self._send_subscribe(shard, names[start : start + 512])
            if not reader.done():
                shard.established = True
                shard.first_attempt.set()
                if lost:
                    log.warning("redis broker: reconnected to %s, re-subscribed", shard.label)
                    self._call(lambda h: h.on_reconnect())
            await asyncio.wait((reader, pinger), return_when=asyncio.FIRST_COMPLETED)
            for task in (reader, pinger):
                if task.done():
                    task.result()  # raises: the connection is gone or the master moved
        finally:
            pinger.cancel()
            reader.cancel()
            await asyncio.gather(pinger, reader, return_exceptions=True)

    async def _ping_loop(self, shard: _Shard, conn: Connection) -> None:
        """PING every ping interval; with Sentinel, also ask the sentinels where the master
        is and end the session (with the command pool) when it is no longer this one."""
        while True:
            await asyncio.sleep(self._ping_interval)
            await _send(conn, "PING")
            if self._locator is not None:
                here = (getattr(conn, "host", ""), getattr(conn, "port", 0))
                try:
                    master = await self._locator()
                except REDIS_ERRORS as exc:
                    log.debug("redis broker: sentinels unreachable: %s", exc)
                    continue
                if master != here:
                    await shard.target.client.connection_pool.disconnect()
                    raise ConnectionError(f"the sentinels moved the master to {master}")

    async def _read_loop(self, shard: _Shard, conn: Connection) -> None:
        timeout = self._ping_interval + self._io_timeout
        message, subscribed, unsubscribed = shard.kinds
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
            if kind == message:
                self._dispatch(shard, reply[1], reply[2])
            elif kind == subscribed:
                waiters = shard.acks.get(reply[1])
                if waiters:
                    waiter = waiters.popleft()
                    if not waiter.done():
                        waiter.set_result(None)
            elif kind == unsubscribed and shard.sharded:
                if shard.unsubscribing[reply[1]] > 0:
                    shard.unsubscribing[reply[1]] -= 1  # the answer to our SUNSUBSCRIBE
                elif reply[1] in shard.names or reply[1] in shard.fixed:
                    # The server dropped a sharded subscription (its slot moved).
                    raise ConnectionError(f"redis cluster unsubscribed {reply[1]!r}")

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
        call_handler(self._handler, fn, "redis")


async def _send(conn: Connection, *args: Any) -> None:
    """Send on a live connection only (redis-py would silently reconnect a dropped one)."""
    if not conn.is_connected:
        raise ConnectionError("redis connection is closed")
    await conn.send_command(*args)
