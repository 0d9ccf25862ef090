"""Pure recovery and positioning decisions (docs/spec/protocol.md 3.3, 3.4; centrifuge's
`internal/recovery` helpers and `isStreamRecovered`).

Used by the connection actor on the asyncio loop: on subscribe with `recover` it joins the
channel actor first (live publications are buffered), reads the log after the client's
offset, then asks `recovery_verdict` and `merge_buffered` what to send; on every live
publication of a positioned subscription it asks `check_position`. No I/O, no clocks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from centripy.engine.types import Publication, StreamPosition

PositionVerdict = Literal["deliver", "drop", "insufficient"]


def recovery_verdict(
    client: StreamPosition, top: StreamPosition, pubs: Sequence[Publication]
) -> bool:
    """Whether a stream-mode recovery succeeded.

    `client` is the position the client sent, `top` the stream top read together with
    `pubs`: the publications after `client.offset`, oldest first, at most
    `client_recovery_max_publication_limit` of them. An empty client epoch skips the epoch
    check (JS sends `recover` with no epoch to read from the beginning)."""
    if client.epoch and client.epoch != top.epoch:
        return False
    if not pubs:
        return top.offset == client.offset
    return pubs[0].offset == client.offset + 1 and pubs[-1].offset == top.offset


def merge_buffered(
    recovered: Sequence[Publication], buffered: Sequence[Publication], client_offset: int
) -> tuple[list[Publication], bool]:
    """Merge publications read from the log with those buffered live while reading.

    The result is sorted by offset, without duplicates (the log's copy wins) and without
    offsets <= `client_offset` (which drops offset-0 publications too: only use this on
    positioned streams). `ok` is False when the result does not continue `client_offset`
    without a gap; the caller then disconnects with 3010 (insufficient state). After a
    failed recovery, pass `recovered=()` and the stream top as `client_offset` to check the
    buffered tail alone."""
    by_offset: dict[int, Publication] = {}
    for pub in recovered:
        if pub.offset > client_offset:
            by_offset.setdefault(pub.offset, pub)
    for pub in buffered:
        if pub.offset > client_offset:
            by_offset.setdefault(pub.offset, pub)
    merged = [by_offset[offset] for offset in sorted(by_offset)]
    ok = not merged or merged[-1].offset == client_offset + len(merged)
    return merged, ok


def check_position(
    last_offset: int, epoch: str, pub_offset: int, pub_epoch: str
) -> PositionVerdict:
    """What to do with a live publication on a positioned subscription whose last delivered
    position is (`last_offset`, `epoch`): deliver it (and advance to `pub_offset`), drop a
    stale duplicate, or report insufficient state (epoch changed, or a gap). Publications
    with offset 0 (channels without history) bypass the checks."""
    if pub_offset == 0:
        return "deliver"
    if pub_epoch != epoch:
        return "insufficient"
    if pub_offset == last_offset + 1:
        return "deliver"
    if pub_offset <= last_offset:
        return "drop"
    return "insufficient"
