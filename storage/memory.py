"""In-memory event log: the reference implementation of the `EventLog` contract.

Used by the tests, as the model the SQL back ends are checked against, and for a
single-node server without persistence (`memory://`). Everything is lost on restart.

The pure helpers at the top (`check_append`, `check_query`, `history_enabled`,
`history_range`, `stream_epoch`) state the shared rules once; the SQL back ends use them too.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import math
import os
import string
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from centripy.engine.contracts import (
    AppendRequest,
    AppendResult,
    EventLog,
    HistoryQuery,
    HistoryResult,
    UnrecoverablePosition,
)
from centripy.engine.types import EMPTY_TAGS, Publication, StreamPosition

Clock = Callable[[], float]

_EPOCH_LETTERS = (string.ascii_letters).encode()
EPOCH_LENGTH = 8
DEFAULT_GC_INTERVAL = 60.0


# --- pure helpers shared with the SQL back ends -------------------------------------------


def new_salt() -> bytes:
    """A random key for `stream_epoch` (from os.urandom: safe after fork)."""
    return os.urandom(16)


def stream_epoch(salt: bytes, channel: str, meta_ttl: float, now: float) -> str:
    """The epoch of a stream of `channel` created at `now`: 8 ASCII letters, opaque.

    Deterministic, so that a read of a channel without a stream can report the epoch the
    first append will give it without storing anything (reads never write rows for unknown
    channels). The inputs make incarnations differ: `salt` is per database (per memory
    log), and the time bucket `now // meta_ttl` moves on between a stream's creation and
    its re-creation, which needs `meta_ttl` without access. With `meta_ttl` 0 (never
    forgotten) the bucket is fixed. A read and the first append that fall into different
    buckets (once per `meta_ttl`) disagree: a subscriber positioned in between is told
    "insufficient state" or "not recovered", never silently skipped."""
    bucket = math.floor(now / meta_ttl) if meta_ttl > 0 else 0
    digest = hashlib.blake2b(
        f"{meta_ttl!r}/{bucket}/".encode() + channel.encode("utf-8", "surrogatepass"),
        key=salt[:64],
        digest_size=EPOCH_LENGTH,
    ).digest()
    return bytes(_EPOCH_LETTERS[b % len(_EPOCH_LETTERS)] for b in digest).decode()


def history_enabled(req: AppendRequest) -> bool:
    """Centrifugo: history is on only when both size and ttl are positive."""
    return req.history_size > 0 and req.history_ttl > 0


def _check_duration(name: str, value: float) -> None:
    if not isinstance(value, int | float) or not 0 <= value < math.inf:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def _plain_append(req: AppendRequest) -> bool:
    """The common, valid case in one expression (the hot path of every publish)."""
    return (
        type(req.channel) is str
        and req.channel != ""
        and type(req.data) is bytes
        and type(req.history_size) is int
        and req.history_size >= 0
        and 0 <= req.history_ttl < math.inf
        and 0 <= req.meta_ttl < math.inf
        and 0 < req.idempotent_ttl < math.inf
        and type(req.idempotency_key) is str
        and all(
            type(p) is tuple and len(p) == 2 and type(p[0]) is str and type(p[1]) is str
            for p in req.tags
        )
    )


def check_append(req: AppendRequest) -> None:
    """Raise ValueError naming the bad field of an append request."""
    with contextlib.suppress(TypeError):  # e.g. a str where a number belongs
        if _plain_append(req):
            return
    if not isinstance(req.channel, str) or not req.channel:
        raise ValueError("AppendRequest.channel must be a non-empty string")
    if not isinstance(req.data, bytes):
        raise ValueError(f"AppendRequest.data must be bytes, got {type(req.data).__name__}")
    if not isinstance(req.history_size, int) or req.history_size < 0:
        raise ValueError(
            f"AppendRequest.history_size must be an int >= 0, got {req.history_size!r}"
        )
    _check_duration("AppendRequest.history_ttl", req.history_ttl)
    _check_duration("AppendRequest.meta_ttl", req.meta_ttl)
    _check_duration("AppendRequest.idempotent_ttl", req.idempotent_ttl)
    if not isinstance(req.idempotency_key, str):
        raise ValueError("AppendRequest.idempotency_key must be a string")
    if req.idempotency_key and req.idempotent_ttl <= 0:
        raise ValueError("AppendRequest.idempotent_ttl must be > 0 with an idempotency_key")
    for pair in req.tags:
        if (
            not isinstance(pair, tuple)
            or len(pair) != 2
            or not all(isinstance(x, str) for x in pair)
        ):
            raise ValueError(f"AppendRequest.tags must be (str, str) pairs, got {pair!r}")


def check_query(query: HistoryQuery) -> None:
    """Raise ValueError naming the bad field of a history query."""
    if not isinstance(query.channel, str) or not query.channel:
        raise ValueError("HistoryQuery.channel must be a non-empty string")
    if not isinstance(query.limit, int) or query.limit < -1:
        raise ValueError(f"HistoryQuery.limit must be -1, 0 or positive, got {query.limit!r}")
    if query.since is not None and query.since.offset < 0:
        raise ValueError(f"HistoryQuery.since.offset must be >= 0, got {query.since.offset}")
    _check_duration("HistoryQuery.meta_ttl", query.meta_ttl)


def check_epoch(query: HistoryQuery, epoch: str) -> None:
    """Raise UnrecoverablePosition when `since` names another incarnation of the stream."""
    since = query.since
    if since is not None and since.epoch and since.epoch != epoch:
        raise UnrecoverablePosition(
            f"channel {query.channel!r}: epoch {since.epoch!r} is not the current epoch"
        )


def history_range(first: int, top: int, query: HistoryQuery) -> tuple[int, int] | None:
    """Inclusive offset range [lo, hi] a query reads from kept publications first..top.

    None when nothing is to be read (limit 0 or an empty range). Forward reads ascend from
    lo, reverse reads descend from hi; the caller applies `query.limit` (> 0) as a count.
    """
    if query.limit == 0:
        return None
    lo, hi = first, top
    if query.since is not None:
        if query.reverse:
            hi = min(hi, query.since.offset - 1)
        else:
            lo = max(lo, query.since.offset + 1)
    return (lo, hi) if lo <= hi else None


def publication_of(req: AppendRequest, offset: int, now: float) -> Publication:
    """The publication stored (or returned) for `req` at `offset`, stamped with `now`."""
    tags = dict(req.tags) if req.tags else EMPTY_TAGS
    return Publication(data=req.data, offset=offset, info=req.info, tags=tags, time=int(now * 1000))


def meta_expiry(now: float, meta_ttl: float) -> float | None:
    """When stream meta touched at `now` is forgotten (None: never)."""
    return now + meta_ttl if meta_ttl > 0 else None


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
        for req in requests:
            check_append(req)
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
