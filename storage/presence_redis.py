"""Presence in Redis with Centrifugo's layout (engine `redis`).

Per channel, on the shard `shard_index(channel, len(addresses))`:

* HASH `<prefix>.presence.data.<channel>`: client id -> `encode_client_info(info)`;
* ZSET `<prefix>.presence.expire.<channel>`: client id scored by its expiry (unix seconds).

`add` and `remove` are Lua scripts (atomic); every read prunes members whose score has passed
(hash fields included) before returning the rest. Both keys get `EXPIRE ceil(ttl)` on each
add, so an abandoned channel disappears by itself. Scores use the `now` clock of the
calling node (as Centrifugo does), so the nodes' clocks must roughly agree.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

from redis.asyncio import Redis
from redis.commands.core import AsyncScript

from centripy.engine.contracts import PresenceManager, PresenceStats, StorageError
from centripy.engine.types import ClientInfo
from centripy.storage.broker_redis import REDIS_ERRORS, connection_kwargs, make_client, shard_index
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
    """Runs on the loop. Every method raises StorageError when Redis fails."""

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
    ) -> None:
        if not addresses:
            raise ValueError("RedisPresence needs at least one address")
        self._prefix = prefix
        self._now = now
        self._clients: list[Redis] = [
            make_client(
                connection_kwargs(
                    address,
                    db=db,
                    user=user,
                    password=password,
                    connect_timeout=connect_timeout,
                    io_timeout=io_timeout,
                )
            )
            for address in addresses
        ]
        self._add = [c.register_script(_ADD) for c in self._clients]
        self._remove = [c.register_script(_REMOVE) for c in self._clients]
        self._read = [c.register_script(_PRESENCE) for c in self._clients]

    def keys(self, channel: str) -> tuple[str, str]:
        """(expire zset, data hash) key names of `channel`."""
        return (
            f"{self._prefix}.presence.expire.{channel}",
            f"{self._prefix}.presence.data.{channel}",
        )

    async def _run(
        self, scripts: list[AsyncScript], channel: str, *args: bytes | str | int
    ) -> object:
        index = shard_index(channel, len(self._clients))
        try:
            return await scripts[index](keys=self.keys(channel), args=list(args))
        except REDIS_ERRORS as exc:
            raise StorageError(f"redis presence failed for {channel!r}: {exc}") from exc

    async def add(self, channel: str, info: ClientInfo, ttl: float) -> None:
        if ttl <= 0:
            raise ValueError("presence ttl must be positive")
        expires = repr(self._now() + ttl)
        key_ttl = max(1, math.ceil(ttl))
        await self._run(self._add, channel, key_ttl, expires, info.client, encode_client_info(info))

    async def remove(self, channel: str, client_id: str) -> None:
        await self._run(self._remove, channel, client_id)

    async def presence(self, channel: str) -> dict[str, ClientInfo]:
        reply = await self._run(self._read, channel, repr(self._now()))
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
        for client in self._clients:
            await client.aclose()
