"""engine.recovery: verdict, merge and position checks, with property tests."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from centripy.engine.contracts import AppendRequest, HistoryQuery
from centripy.engine.recovery import check_position, merge_buffered, recovery_verdict
from centripy.engine.types import Publication, StreamPosition
from centripy.storage.memory import MemoryEventLog


def pubs(*offsets: int) -> list[Publication]:
    return [Publication(data=b'{"o":%d}' % o, offset=o) for o in offsets]


def offsets(items: list[Publication]) -> list[int]:
    return [p.offset for p in items]


# ------------------------------------------------------------------ recovery_verdict


def test_verdict_examples() -> None:
    top = StreamPosition(19, "xQzA")
    assert recovery_verdict(StreamPosition(17, "xQzA"), top, pubs(18, 19))
    assert not recovery_verdict(StreamPosition(17, "other"), top, pubs(18, 19))
    assert not recovery_verdict(StreamPosition(16, "xQzA"), top, pubs(18, 19))  # evicted 17
    assert not recovery_verdict(StreamPosition(17, "xQzA"), top, pubs(18))  # limit hit
    assert recovery_verdict(StreamPosition(19, "xQzA"), top, [])  # already at top
    assert not recovery_verdict(StreamPosition(20, "xQzA"), top, [])  # ahead of the stream
    assert not recovery_verdict(StreamPosition(5, "xQzA"), top, [])  # history expired


def test_verdict_empty_client_epoch_skips_epoch_check() -> None:
    top = StreamPosition(2, "xQzA")
    assert recovery_verdict(StreamPosition(0, ""), top, pubs(1, 2))
    assert not recovery_verdict(StreamPosition(0, ""), top, pubs(2))
    assert recovery_verdict(StreamPosition(0, ""), StreamPosition(0, "new"), [])


@given(
    top=st.integers(0, 30),
    window=st.integers(0, 30),
    client_offset=st.integers(0, 35),
    limit=st.integers(1, 40),
    client_epoch=st.sampled_from(["", "A", "B"]),
    stream_epoch=st.sampled_from(["A", "B"]),
)
def test_verdict_matches_brute_force_model(
    top: int, window: int, client_offset: int, limit: int, client_epoch: str, stream_epoch: str
) -> None:
    # The log retains offsets [top-window+1 .. top]; a history read after client_offset
    # returns at most `limit` of them, oldest first.
    retained = range(max(1, top - window + 1), top + 1)
    read = [o for o in retained if o > client_offset][:limit]
    verdict = recovery_verdict(
        StreamPosition(client_offset, client_epoch), StreamPosition(top, stream_epoch), pubs(*read)
    )
    # Model: recovered iff the epoch is compatible and the client receives exactly every
    # offset it missed, client_offset+1 .. top.
    epoch_ok = client_epoch in ("", stream_epoch)
    model = epoch_ok and client_offset <= top and read == list(range(client_offset + 1, top + 1))
    assert verdict == model


# ------------------------------------------------------------------ merge_buffered


def test_merge_examples() -> None:
    merged, ok = merge_buffered(pubs(18, 19), pubs(19, 20, 21), 17)
    assert ok and offsets(merged) == [18, 19, 20, 21]
    merged, ok = merge_buffered(pubs(18, 19), pubs(21), 17)
    assert not ok
    merged, ok = merge_buffered([], [], 17)
    assert ok and merged == []
    merged, ok = merge_buffered([], pubs(16, 17, 18), 17)
    assert ok and offsets(merged) == [18]
    merged, ok = merge_buffered(pubs(19), [], 17)
    assert not ok


def test_merge_keeps_the_log_copy_of_a_duplicate() -> None:
    from_log = Publication(data=b'"log"', offset=5)
    live = Publication(data=b'"live"', offset=5)
    merged, ok = merge_buffered([from_log], [live], 4)
    assert ok and merged == [from_log]


_offset_lists = st.lists(st.integers(0, 40), max_size=25)


@given(_offset_lists, _offset_lists, st.integers(0, 30))
def test_merge_is_sorted_unique_and_contiguous_or_not_ok(
    recovered: list[int], buffered: list[int], client_offset: int
) -> None:
    merged, ok = merge_buffered(pubs(*recovered), pubs(*buffered), client_offset)
    got = offsets(merged)
    assert got == sorted(set(got))  # sorted and unique
    assert all(o > client_offset for o in got)
    expected_set = {o for o in recovered + buffered if o > client_offset}
    assert set(got) == expected_set  # nothing above the client offset is lost
    contiguous = got == list(range(client_offset + 1, client_offset + 1 + len(got)))
    assert ok == contiguous


# ------------------------------------------------------------------ check_position


def test_check_position() -> None:
    assert check_position(5, "e", 6, "e") == "deliver"
    assert check_position(5, "e", 5, "e") == "drop"
    assert check_position(5, "e", 3, "e") == "drop"
    assert check_position(5, "e", 7, "e") == "insufficient"
    assert check_position(5, "e", 6, "f") == "insufficient"
    assert check_position(5, "e", 5, "f") == "insufficient"  # epoch is checked first
    assert check_position(5, "e", 0, "f") == "deliver"  # offset 0 bypasses
    assert check_position(0, "", 1, "") == "deliver"


@given(st.lists(st.integers(0, 12), max_size=30), st.integers(0, 5))
def test_delivered_offsets_strictly_increase_without_gaps(stream: list[int], start: int) -> None:
    last = start
    delivered: list[int] = []
    for offset in stream:
        verdict = check_position(last, "e", offset, "e")
        if verdict == "insufficient":
            assert offset > last + 1
            break
        if verdict == "deliver" and offset:
            delivered.append(offset)
            last = offset
    assert delivered == list(range(start + 1, start + 1 + len(delivered)))


# -- positions read before a channel's first publication (reads store nothing) -------------


async def test_position_read_before_the_first_publication_stays_valid() -> None:
    """A subscriber positioned on a channel without a stream (the read stored nothing)
    continues with the first publication, and a later recovery from that position
    succeeds: the read reported the epoch the first append gets."""
    log = MemoryEventLog()
    month = 2_592_000.0
    top = (await log.history(HistoryQuery("chat:new", meta_ttl=month))).position
    assert top.offset == 0 and top.epoch
    appended = [
        await log.append(
            AppendRequest("chat:new", b"%d" % i, history_size=10, history_ttl=60, meta_ttl=month)
        )
        for i in range(3)
    ]
    first = appended[0]
    verdict = check_position(top.offset, top.epoch, first.publication.offset, first.epoch)
    assert verdict == "deliver"
    read = await log.history(HistoryQuery("chat:new", 100, since=top, meta_ttl=month))
    assert recovery_verdict(top, read.position, read.publications)
    assert [p.offset for p in read.publications] == [1, 2, 3]
