"""The rules every event log back end applies, stated once (pure functions, no I/O).

`MemoryEventLog` (storage/memory.py) and the SQL logs (storage/sql.py) both use them:
validation of append requests and history queries (`check_append`, `check_query`,
`check_epoch`), the deterministic stream epoch (`stream_epoch`), whether a publication is
kept (`history_enabled`), which offsets a query reads (`history_range`), the stored
publication (`publication_of`) and when stream meta is forgotten (`meta_expiry`). The group
commit writer validates with `check_append` before queueing. Everything here is pure and
thread-safe.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import string
from collections.abc import Sequence

from centripy.engine.contracts import AppendRequest, HistoryQuery, UnrecoverablePosition
from centripy.engine.types import EMPTY_TAGS, Publication

_EPOCH_LETTERS = (string.ascii_letters).encode()
EPOCH_LENGTH = 8
DEFAULT_GC_INTERVAL = 60.0


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
    "insufficient state" or "not recovered", never silently skipped.

    Every append of a batch asks for its channel's epoch (the upsert needs it in case the
    stream is new), so the digests are cached per (salt, channel, meta_ttl, bucket)."""
    bucket = math.floor(now / meta_ttl) if meta_ttl > 0 else 0
    return _epoch(salt, channel, meta_ttl, bucket)


# Byte b of the digest -> letter b % 52 (bytes.translate: one C call for the 8 bytes).
_EPOCH_TABLE = bytes(_EPOCH_LETTERS[b % len(_EPOCH_LETTERS)] for b in range(256))


@functools.lru_cache(maxsize=1 << 16)
def _epoch(salt: bytes, channel: str, meta_ttl: float, bucket: int) -> str:
    digest = hashlib.blake2b(
        f"{meta_ttl!r}/{bucket}/".encode() + channel.encode("utf-8", "surrogatepass"),
        key=salt[:64],
        digest_size=EPOCH_LENGTH,
    ).digest()
    return digest.translate(_EPOCH_TABLE).decode()


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
        and (
            not req.tags
            or all(
                type(p) is tuple and len(p) == 2 and type(p[0]) is str and type(p[1]) is str
                for p in req.tags
            )
        )
    )


class Checked(list[AppendRequest]):
    """Append requests that already passed `check_append` (the group-commit writer's
    batches): the logs' `append_many` does not check them again."""


def check_all(requests: Sequence[AppendRequest]) -> None:
    """`check_append` for each request, unless they come `Checked`."""
    if type(requests) is not Checked:
        for req in requests:
            check_append(req)


def check_append(req: AppendRequest) -> None:
    """Raise ValueError naming the bad field of an append request."""
    try:  # not contextlib.suppress: that builds a context manager per publication
        if _plain_append(req):
            return
    except TypeError:  # e.g. a str where a number belongs
        pass
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


TOUCH_SLACK = 0.1  # a read rewrites a stream's expiry only when it is this fraction stale


def needs_touch(stored: float | None, now: float, meta_ttl: float) -> bool:
    """Whether a read at `now` must rewrite a live stream's meta expiry `stored`: when the
    expiry it wants differs in kind (never vs some time), or the stored one is earlier than
    now + (1 - TOUCH_SLACK) * meta_ttl. So a read keeps the stream at least that long and
    a storm of reads of recently touched streams writes nothing."""
    if meta_ttl <= 0 or stored is None:
        return (meta_ttl > 0) != (stored is not None)
    return stored < now + meta_ttl * (1.0 - TOUCH_SLACK)
