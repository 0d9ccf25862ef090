"""In-memory event log: the reference implementation of the `EventLog` contract.

Used by the tests, as the model the SQL back ends are checked against, and for a
single-node server without persistence (`memory://`). Everything is lost on restart.

The rules it shares with the SQL back ends (validation, epochs, history ranges) live in
`storage/rules.py`.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from centripy.engine.contracts import (
    AppendRequest,
    AppendResult,
    EventLog,
    HistoryQuery,
    HistoryResult,
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
    new_salt,
    publication_of,
    stream_epoch,
)

Clock = Callable[[], float]


# --- the in-memory log ---------------------------------------------------------------------


@dataclass(slots=True)
class _Stream:
    epoch: str
    top: int = 0
    pubs: collections.deque[Publication] = field(default_factory=collections.deque)
    pubs_expire_at: float | None = None  # None: no publications kept
    meta_expires_at: float | None = None  # None: never forgotten


@dataclass(frozen=True, slots=True)
class _Seen:
    offset: int
    epoch: str
    expires_at: float


class MemoryEventLog(EventLog):
    """Dictionaries of streams and idempotency keys. Every method runs on the event loop and
    completes without awaiting, so each call is atomic with respect to the others.
    Expired keys and streams are swept by `gc()`, called from `append_many` at most every
    `gc_interval` seconds of `now` (None: only when called explicitly)."""

    def __init__(
        self, now: Clock = time.time, gc_interval: float | None = DEFAULT_GC_INTERVAL
    ) -> None:
        self._now = now
        self._gc_interval = gc_interval
        self._streams: dict[str, _Stream] = {}
        self._seen: dict[tuple[str, str], _Seen] = {}
        self._last_gc = now()
        self._salt = new_salt()

    async def start(self) -> None:
        """Nothing to open."""

    async def close(self) -> None:
        """Nothing to release; data stays readable until the object is dropped."""

    async def append_many(self, requests: Sequence[AppendRequest]) -> list[AppendResult]:
        """Validate all requests, then apply them in order (as sequential calls)."""
        check_all(requests)
        now = self._now()
        if self._gc_interval is not None and now - self._last_gc >= self._gc_interval:
            self._sweep()
        return [self._append_one(req, now) for req in requests]

    async def history(self, query: HistoryQuery) -> HistoryResult:
        """Read a stream, touching its meta. A channel without a live stream is reported
        at offset 0 with the epoch its first append will get, and nothing is created."""
        check_query(query)
        now = self._now()
        stream = self._live(query.channel, now)
        if stream is None:
            epoch = stream_epoch(self._salt, query.channel, query.meta_ttl, now)
            check_epoch(query, epoch)
            return HistoryResult([], StreamPosition(0, epoch))
        stream.meta_expires_at = meta_expiry(now, query.meta_ttl)
        check_epoch(query, stream.epoch)
        position = StreamPosition(stream.top, stream.epoch)
        rng = history_range(self._first_kept(stream), stream.top, query)
        if rng is None:
            return HistoryResult([], position)
        pubs = list(stream.pubs)
        base = pubs[0].offset
        selected = pubs[rng[0] - base : rng[1] - base + 1]
        if query.reverse:
            selected.reverse()
        if query.limit > 0:
            selected = selected[: query.limit]
        return HistoryResult(selected, position)

    async def remove_history(self, channel: str) -> None:
        stream = self._streams.get(channel)
        if stream is not None:
            stream.pubs.clear()
            stream.pubs_expire_at = None

    async def gc(self) -> None:
        """Drop expired idempotency keys, forgotten streams and expired publications."""
        self._sweep()

    def _sweep(self) -> None:
        now = self._now()
        self._last_gc = now
        self._seen = {k: v for k, v in self._seen.items() if v.expires_at >= now}
        for channel, stream in list(self._streams.items()):
            if stream.meta_expires_at is not None and stream.meta_expires_at < now:
                del self._streams[channel]
            elif stream.pubs_expire_at is not None and stream.pubs_expire_at < now:
                stream.pubs.clear()
                stream.pubs_expire_at = None

    def _append_one(self, req: AppendRequest, now: float) -> AppendResult:
        key = (req.channel, req.idempotency_key)
        if req.idempotency_key:
            seen = self._seen.get(key)
            if seen is not None and seen.expires_at >= now:
                return AppendResult(publication_of(req, seen.offset, now), seen.epoch, True)
        if history_enabled(req):
            stream = self._touch(req.channel, now, req.meta_ttl)
            stream.top += 1
            pub = publication_of(req, stream.top, now)
            stream.pubs.append(pub)
            while len(stream.pubs) > req.history_size:
                stream.pubs.popleft()
            stream.pubs_expire_at = now + req.history_ttl
            result = AppendResult(pub, stream.epoch)
        else:
            result = AppendResult(publication_of(req, 0, now), "")
        if req.idempotency_key:
            self._seen[key] = _Seen(
                result.publication.offset, result.epoch, now + req.idempotent_ttl
            )
        return result

    def _live(self, channel: str, now: float) -> _Stream | None:
        """The stream of `channel` unless missing or forgotten (then dropped); expired
        publications are cleared."""
        stream = self._streams.get(channel)
        if stream is None:
            return None
        if stream.meta_expires_at is not None and stream.meta_expires_at < now:
            del self._streams[channel]
            return None
        if stream.pubs_expire_at is not None and stream.pubs_expire_at < now:
            stream.pubs.clear()
            stream.pubs_expire_at = None
        return stream

    def _touch(self, channel: str, now: float, meta_ttl: float) -> _Stream:
        """The live stream of `channel` for an append (created or re-created), touched."""
        stream = self._live(channel, now)
        if stream is None:
            epoch = stream_epoch(self._salt, channel, meta_ttl, now)
            stream = self._streams[channel] = _Stream(epoch)
        stream.meta_expires_at = meta_expiry(now, meta_ttl)
        return stream

    @staticmethod
    def _first_kept(stream: _Stream) -> int:
        return stream.pubs[0].offset if stream.pubs else stream.top + 1
