"""Presence in Redis with Centrifugo's layout (engine `redis`).

Per channel, on the shard `shard_index(channel, len(addresses))`:

* HASH `<prefix>.presence.data.<channel>`: client id -> `encode_client_info(info)`;
* ZSET `<prefix>.presence.expire.<channel>`: client id scored by its expiry (unix seconds).

`add` and `remove` are Lua scripts (atomic); every read prunes members whose score has passed
(hash fields included) before returning the rest. Both keys get `EXPIRE ceil(ttl)` on each
add, so an abandoned channel disappears by itself. Scores use the `now` clock of the
calling node (as Centrifugo does), so the nodes' clocks must roughly agree.

With `sentinel`, one shard: the master the sentinels name. With `cluster`, the keys carry the
channel as hash tag (`<prefix>.presence.data.{<channel>}`, both keys in one slot, as a
script needs) and go to the master of that slot (CLUSTER SLOTS, read again after an error).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

from redis.commands.core import AsyncScript

from centripy.engine.contracts import PresenceManager, PresenceStats, StorageError
from centripy.engine.types import ClientInfo
from centripy.storage.broker_redis import shard_index
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
from centripy.storage.wire import decode_client_info, encode_client_info

# KEYS[1] expire zset, KEYS[2] data hash; ARGV[1] key ttl (s), ARGV[2] expiry score,
# ARGV[3] client id, ARGV[4] encoded info.
_ADD = """
redis.call("zadd", KEYS[1], ARGV[2], ARGV[3])
redis.call("hset", KEYS[2], ARGV[3], ARGV[4])
redis.call("expire", KEYS[1], ARGV[1])
redis.call("expire", KEYS[2], ARGV[1])
return 1
"""

# KEYS[1] expire zset, KEYS[2] data hash; ARGV[1] client id.
_REMOVE = """
redis.call("hdel", KEYS[2], ARGV[1])
redis.call("zrem", KEYS[1], ARGV[1])
return 1
"""

# KEYS[1] expire zset, KEYS[2] data hash; ARGV[1] now. Returns HGETALL of what is left.
_PRESENCE = """
local expired = redis.call("zrangebyscore", KEYS[1], "-inf", ARGV[1])
if #expired > 0 then
  for i = 1, #expired, 1000 do
    redis.call("hdel", KEYS[2], unpack(expired, i, math.min(i + 999, #expired)))
  end
  redis.call("zremrangebyscore", KEYS[1], "-inf", ARGV[1])
end
return redis.call("hgetall", KEYS[2])
"""


class RedisPresence(PresenceManager):
    """Runs on the loop. Every method raises StorageError when Redis fails. `addresses`:
    the Redis servers (shards); with `sentinel`, the sentinels; with `cluster`, seeds."""

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
        now: Callable[[], float] = time.time,
        tls: RedisTLS | None = None,
        sentinel: SentinelOptions | None = None,
        cluster: bool = False,
    ) -> None:
        if not addresses:
            raise ValueError("RedisPresence needs at least one address")
        if sentinel is not None and cluster:
            raise ValueError("redis: Sentinel and Cluster exclude each other")
        self._prefix = prefix
        self._now = now
        self._kw: dict[str, Any] = {
            "db": db,
            "user": user,
            "password": password,
            "connect_timeout": connect_timeout,
            "io_timeout": io_timeout,
        }
        self._tls = tls
        self._cluster = cluster
        self._sentinel = sentinel is not None
        self._map: ClusterMap | None = None
        self._map_lock = asyncio.Lock()
        self._seeds: list[RedisTarget] = []
        self._targets: list[RedisTarget] = []
        if sentinel is not None:
            locate = MasterLocator(
                addresses, sentinel, connect_timeout=connect_timeout, io_timeout=io_timeout
            )
            kwargs = connection_kwargs(addresses[0], **self._kw)
            self._set_targets([RedisTarget(kwargs, tls, locate=locate)])
        elif cluster:
            self._seeds = [RedisTarget(connection_kwargs(a, **self._kw), tls) for a in addresses]
        else:
            self._set_targets(
                [RedisTarget(connection_kwargs(a, **self._kw), tls) for a in addresses]
            )

    def _set_targets(self, targets: list[RedisTarget]) -> None:
        self._targets = targets
        self._add = [t.client.register_script(_ADD) for t in targets]
        self._remove = [t.client.register_script(_REMOVE) for t in targets]
        self._read = [t.client.register_script(_PRESENCE) for t in targets]

    def keys(self, channel: str) -> tuple[str, str]:
        """(expire zset, data hash) key names of `channel`."""
        tag = f"{{{channel}}}" if self._cluster else channel
        return (
            f"{self._prefix}.presence.expire.{tag}",
            f"{self._prefix}.presence.data.{tag}",
        )

    async def _index(self, key: str) -> int:
        """The shard of `key` (cluster: the master of its slot, mapping the cluster first)."""
        if not self._cluster:
            return -1
        async with self._map_lock:
            if self._map is None:
                cluster = await cluster_slots(self._seeds + self._targets)
                old = self._targets
                self._set_targets(
                    [
                        RedisTarget(connection_kwargs(m, **self._kw), self._tls)
                        for m in cluster.masters
                    ]
                )
                self._map = cluster
                await close_quietly(old)
            return self._map.index(key)

    async def _run(
        self, scripts: Callable[[], list[AsyncScript]], channel: str, *args: bytes | str | int
    ) -> object:
        keys = self.keys(channel)
        try:
            index = await self._index(keys[0])
            if index < 0:
                index = shard_index(channel, len(self._targets))
            return await scripts()[index](keys=keys, args=list(args))
        except REDIS_ERRORS as exc:
            if self._cluster:
                self._map = None  # MOVED, a failover, a dead master: map again next time
            elif self._sentinel:
                # READONLY from a demoted master: pooled connections go, new ones ask the
                # sentinels again
                await self._targets[0].client.connection_pool.disconnect()
            raise StorageError(f"redis presence failed for {channel!r}: {exc}") from exc

    async def add(self, channel: str, info: ClientInfo, ttl: float) -> None:
        if ttl <= 0:
            raise ValueError("presence ttl must be positive")
        expires = repr(self._now() + ttl)
        key_ttl = max(1, math.ceil(ttl))
        args = (key_ttl, expires, info.client, encode_client_info(info))
        await self._run(lambda: self._add, channel, *args)

    async def remove(self, channel: str, client_id: str) -> None:
        await self._run(lambda: self._remove, channel, client_id)

    async def presence(self, channel: str) -> dict[str, ClientInfo]:
        reply = await self._run(lambda: self._read, channel, repr(self._now()))
        if not isinstance(reply, list):
            raise StorageError(f"unexpected presence reply for {channel!r}")
        out: dict[str, ClientInfo] = {}
        for i in range(0, len(reply) - 1, 2):
            try:
                info = decode_client_info(reply[i + 1])
            except (ValueError, TypeError):
                continue  # a value written by something else: not ours to report
            out[reply[i].decode()] = info
        return out

    async def stats(self, channel: str) -> PresenceStats:
        entries = await self.presence(channel)
        users = {info.user for info in entries.values()}
        return PresenceStats(num_clients=len(entries), num_users=len(users))

    async def close(self) -> None:
        await close_quietly(self._targets + self._seeds)
