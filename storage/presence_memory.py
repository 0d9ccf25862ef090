"""In-memory presence for a single node (Centrifugo's memory engine keeps presence in process)."""

from __future__ import annotations

import time
from collections.abc import Callable

from centripy.engine.contracts import PresenceManager, PresenceStats
from centripy.engine.types import ClientInfo


class MemoryPresence(PresenceManager):
    """channel -> client id -> (info, expires_at). Expired entries are pruned on read."""

    def __init__(self, now: Callable[[], float] = time.monotonic) -> None:
        self._now = now
        self._channels: dict[str, dict[str, tuple[ClientInfo, float]]] = {}

    async def add(self, channel: str, info: ClientInfo, ttl: float) -> None:
        self._channels.setdefault(channel, {})[info.client] = (info, self._now() + ttl)

    async def remove(self, channel: str, client_id: str) -> None:
        entries = self._channels.get(channel)
        if entries is None:
            return
        entries.pop(client_id, None)
        if not entries:
            del self._channels[channel]

    def _live(self, channel: str) -> dict[str, tuple[ClientInfo, float]]:
        entries = self._channels.get(channel)
        if not entries:
            return {}
        now = self._now()
        expired = [cid for cid, (_, exp) in entries.items() if exp <= now]
        for cid in expired:
            del entries[cid]
        if not entries:
            del self._channels[channel]
        return entries

    async def presence(self, channel: str) -> dict[str, ClientInfo]:
        return {cid: info for cid, (info, _) in self._live(channel).items()}

    async def stats(self, channel: str) -> PresenceStats:
        entries = self._live(channel)
        users = {info.user for info, _ in entries.values()}
        return PresenceStats(num_clients=len(entries), num_users=len(users))
