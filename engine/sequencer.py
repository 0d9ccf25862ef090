"""Per-channel sequencing of publications that arrive from several nodes.

On several nodes a channel actor receives its channel's publications from the local node
(in commit order) and from the broker (other nodes: any order, duplicated, or lost). The
`ChannelSequencer` turns them into what subscribers must see: within one epoch, offsets
strictly increasing with no gap. It is pure (no I/O, an injectable clock) and owned by the
channel actor; every method is called from that actor's handler on the loop.

How the channel actor uses it:

1. When the channel gets its first local subscriber: subscribe the broker, read the stream
   top from the log, `reset(top)` (before offering anything; an unpositioned sequencer
   starts at the first publication offered) and deliver what it returns.
2. Every publication (local or remote) goes through `offer(pub, epoch)`; deliver the
   returned list, in order. Offset-0 publications (no history) pass straight through.
3. Gaps and publications of an unknown epoch are held back for `max_wait` (200 ms) in case
   the missing ones are merely late. Arm a timer at `next_deadline()`; when it fires,
   `missing()` returns `(after, up_to)` if something is still held back: read the log
   forward since `StreamPosition(after, position.epoch)` (without blocking the actor) and
   call `fill(pubs, epoch)` with the result; deliver what it returns. If that read raises
   UnrecoverablePosition, the stream has a new epoch: read it from the start (`since=None`)
   and `fill` with the log's epoch (or `reset` to its top). Read one gap at a time.
4. After `BrokerHandler.on_reconnect` (messages may be lost) and on the periodic position
   check: read the log since `position` and `fill` the same way.
5. `on_insufficient(reason)` ("epoch": the stream was re-created; "gap": offsets were lost
   from the log, e.g. trimmed history) is called synchronously inside `offer`/`fill` before
   they return: tell positioned/recovering subscribers "insufficient state"; the returned
   publications still go to everyone else.

Epochs are random strings, so a publication of an epoch the sequencer has not seen in the
log may be a straggler of an older stream or the first of a re-created one: only a log
read decides. Until then it is held back (a `missing()` with `after == up_to` asks for it).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Literal

from centripy.engine.types import Publication, StreamPosition

InsufficientReason = Literal["epoch", "gap"]

MAX_WAIT = 0.2  # seconds a gap may stay open before the log is read
RETRY_AFTER = 1.0  # seconds before a reported gap is reported again without a fill
_RETIRED_EPOCHS = 16
_Held = dict[int, tuple[Publication, float]]  # offset -> (publication, arrival time)


class ChannelSequencer:
    def __init__(
        self,
        *,
        max_wait: float = MAX_WAIT,
        retry_after: float = RETRY_AFTER,
        now: Callable[[], float] = time.monotonic,
        on_insufficient: Callable[[InsufficientReason], None] | None = None,
    ) -> None:
        if max_wait < 0 or retry_after <= 0:
            raise ValueError("max_wait must be >= 0 and retry_after > 0")
        self._max_wait = max_wait
        self._retry_after = retry_after
        self._now = now
        self._on_insufficient = on_insufficient
        self._epoch: str | None = None
        self._top = 0
        self._buffer: _Held = {}  # current epoch, above a gap
        self._foreign: dict[str, _Held] = {}  # epochs not (yet) confirmed by the log
        self._retired: deque[str] = deque(maxlen=_RETIRED_EPOCHS)
        self._requested: tuple[int, float] | None = None  # (up_to, asked_at) of missing()

    # -- queries --------------------------------------------------------------------------

    @property
    def position(self) -> StreamPosition | None:
        """The last delivered position (None before the first reset/offer)."""
        return None if self._epoch is None else StreamPosition(self._top, self._epoch)

    @property
    def held(self) -> int:
        """Publications held back (behind a gap or of an unconfirmed epoch)."""
        return len(self._buffer) + sum(len(h) for h in self._foreign.values())

    def next_deadline(self) -> float | None:
        """Clock time at which `missing()` will report (None: nothing is held back)."""
        arrivals = [a for h in (self._buffer, *self._foreign.values()) for _, a in h.values()]
        if not arrivals:
            return None
        if self._requested is not None:
            return self._requested[1] + self._retry_after
        return min(arrivals) + self._max_wait

    def missing(self) -> tuple[int, int] | None:
        """`(after_offset, up_to_offset)` to read from the log once something was held back
        for `max_wait`, else None. Once reported, it is reported again only after
        `retry_after` without a fill."""
        deadline = self.next_deadline()
        now = self._now()
        if deadline is None or now < deadline:
            return None
        up_to = min(self._buffer) - 1 if self._buffer else self._top
        self._requested = (up_to, now)
        return self._top, up_to

    # -- updates --------------------------------------------------------------------------

    def reset(self, top: StreamPosition) -> list[Publication]:
        """Continue after `top` (the stream top just read from the log). A different epoch
        drops what was held for the old one (without reporting: the caller knows); the same
        epoch never moves back. Returns held publications that became deliverable."""
        if top.offset < 0:
            raise ValueError("offset must be >= 0")
        if self._epoch == top.epoch and top.offset <= self._top:
            return []
        if self._epoch != top.epoch:
            self._enter_epoch(top.epoch)
        self._top = top.offset
        for off in [o for o in self._buffer if o <= self._top]:
            del self._buffer[off]
        return self._drain()

    def offer(self, pub: Publication, epoch: str) -> list[Publication]:
        """One publication from any node; returns what can be delivered now, in order."""
        if pub.offset == 0:
            return [pub]
        self._check(pub, epoch)
        if self._epoch is None:
            self._epoch, self._top = epoch, pub.offset - 1  # first sight: start here
        if epoch in self._retired:
            return []  # a straggler of a stream that was re-created since
        held = self._buffer if epoch == self._epoch else self._foreign.setdefault(epoch, {})
        if pub.offset in held or (held is self._buffer and pub.offset <= self._top):
            return []
        held[pub.offset] = (pub, self._now())
        return self._drain()

    def fill(self, pubs: Iterable[Publication], epoch: str) -> list[Publication]:
        """Publications read from the log after the offset `missing()` reported (or after
        `position.offset`), with the epoch the log returned. The log is authoritative:
        offsets up to the last of `pubs`, and up to the reported gap, that it does not
        hold are lost (skipped with on_insufficient("gap")); held publications of other
        epochs that arrived before the reported `missing()` are stale and dropped."""
        requested, self._requested = self._requested, None
        ordered = sorted((p for p in pubs if p.offset > 0), key=lambda p: p.offset)
        for pub in ordered:
            self._check(pub, epoch)
        if epoch in self._retired:
            return []  # read before the stream was re-created
        if self._epoch is None:
            self._epoch, self._top = epoch, ordered[0].offset - 1 if ordered else 0
        elif epoch != self._epoch:
            self._enter_epoch(epoch)
            self._report("epoch")
            requested = None if requested is None else (0, requested[1])
        if requested is not None:
            self._drop_stale(requested[1])
        known = max(requested[0] if requested else 0, ordered[-1].offset if ordered else 0)
        now = self._now()
        for pub in ordered:
            if pub.offset > self._top:
                self._buffer.setdefault(pub.offset, (pub, now))
        return self._drain() + self._skip_lost(known)

    # -- helpers --------------------------------------------------------------------------

    @staticmethod
    def _check(pub: Publication, epoch: str) -> None:
        if pub.offset < 0:
            raise ValueError(f"negative offset {pub.offset}")
        if not epoch:
            raise ValueError(f"publication with offset {pub.offset} has no epoch")

    def _drain(self) -> list[Publication]:
        out: list[Publication] = []
        while self._top + 1 in self._buffer:
            self._top += 1
            out.append(self._buffer.pop(self._top)[0])
        requested = self._requested
        if (
            requested is not None
            and not self._foreign
            and (not self._buffer or self._top >= requested[0])
        ):
            self._requested = None
        return out

    def _skip_lost(self, known: int) -> list[Publication]:
        """Offsets up to `known` still missing after an authoritative read are gone."""
        if self._top >= known:
            return []
        self._report("gap")
        out: list[Publication] = []
        while self._top < known:
            following = min(self._buffer) if self._buffer else known + 1
            self._top = min(following - 1, known)
            out += self._drain()
        return out

    def _enter_epoch(self, epoch: str) -> None:
        """Switch to `epoch` (confirmed by the log) at offset 0, keeping what was held for
        it; the previous epoch is retired."""
        if self._epoch is not None and self._epoch not in self._retired:
            self._retired.append(self._epoch)
        self._epoch, self._top = epoch, 0
        self._buffer = self._foreign.pop(epoch, {})
        self._requested = None

    def _drop_stale(self, asked_at: float) -> None:
        """An epoch held back with a publication that arrived before the log read was asked
        for was committed before that read; the log showing another epoch, it is older:
        retire it with everything held for it."""
        for epoch, held in list(self._foreign.items()):
            if any(arrived <= asked_at for _, arrived in held.values()):
                del self._foreign[epoch]
                if epoch not in self._retired:
                    self._retired.append(epoch)

    def _report(self, reason: InsufficientReason) -> None:
        if self._on_insufficient is not None:
            self._on_insufficient(reason)
