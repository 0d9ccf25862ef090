"""ChannelSequencer: unit tests and a hypothesis state machine over several simulated nodes
that reorder, duplicate and drop publications, with gaps filled from a model log."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from centripy.engine.sequencer import ChannelSequencer, InsufficientReason
from centripy.engine.types import Publication, StreamPosition


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def pub(offset: int, data: bytes = b"{}") -> Publication:
    return Publication(data=data, offset=offset)


def offsets(pubs: list[Publication]) -> list[int]:
    return [p.offset for p in pubs]


def make(clock: Clock | None = None) -> tuple[ChannelSequencer, list[InsufficientReason]]:
    reports: list[InsufficientReason] = []
    seq = ChannelSequencer(now=clock or Clock(), on_insufficient=reports.append)
    return seq, reports


def test_in_order_publications_pass_through() -> None:
    seq, reports = make()
    seq.reset(StreamPosition(0, "E"))
    assert [offsets(seq.offer(pub(i), "E")) for i in (1, 2, 3)] == [[1], [2], [3]]
    assert seq.position == StreamPosition(3, "E")
    assert reports == []


def test_offset_zero_passes_through_without_touching_the_position() -> None:
    seq, _ = make()
    seq.reset(StreamPosition(5, "E"))
    assert seq.offer(pub(0, b"x"), "") == [pub(0, b"x")]
    assert seq.position == StreamPosition(5, "E")


def test_duplicates_and_old_offsets_are_dropped() -> None:
    seq, _ = make()
    seq.reset(StreamPosition(3, "E"))
    assert seq.offer(pub(2), "E") == []
    assert offsets(seq.offer(pub(4), "E")) == [4]
    assert seq.offer(pub(4), "E") == []


def test_reordered_publications_are_held_and_released_in_order() -> None:
    seq, _ = make()
    seq.reset(StreamPosition(0, "E"))
    assert seq.offer(pub(3), "E") == []
    assert seq.offer(pub(2), "E") == []
    assert seq.held == 2
    assert offsets(seq.offer(pub(1), "E")) == [1, 2, 3]
    assert seq.held == 0
    assert seq.next_deadline() is None


def test_gap_is_reported_only_after_max_wait_and_then_filled() -> None:
    clock = Clock()
    seq, reports = make(clock)
    seq.reset(StreamPosition(1, "E"))
    seq.offer(pub(4), "E")
    assert seq.missing() is None
    assert seq.next_deadline() == pytest.approx(clock.t + 0.2)
    clock.t += 0.2
    assert seq.missing() == (1, 3)
    assert seq.missing() is None  # asked already: not again until retry_after
    assert offsets(seq.fill([pub(2), pub(3), pub(4)], "E")) == [2, 3, 4]
    assert seq.position == StreamPosition(4, "E")
    assert reports == []


def test_unanswered_gap_is_reported_again_after_retry_after() -> None:
    clock = Clock()
    seq, _ = make(clock)
    seq.reset(StreamPosition(0, "E"))
    seq.offer(pub(2), "E")
    clock.t += 0.2
    assert seq.missing() == (0, 1)
    clock.t += 0.99
    assert seq.missing() is None
    clock.t += 0.01
    assert seq.missing() == (0, 1)


def test_late_arrival_closes_the_gap_without_a_fill() -> None:
    clock = Clock()
    seq, _ = make(clock)
    seq.reset(StreamPosition(0, "E"))
    seq.offer(pub(2), "E")
    clock.t += 0.3
    assert seq.missing() == (0, 1)
    assert offsets(seq.offer(pub(1), "E")) == [1, 2]
    assert seq.missing() is None and seq.next_deadline() is None


def test_fill_returning_later_offsets_only_means_they_were_lost() -> None:
    clock = Clock()
    seq, reports = make(clock)
    seq.reset(StreamPosition(0, "E"))
    seq.offer(pub(5), "E")
    clock.t += 0.2
    assert seq.missing() == (0, 4)
    # history was trimmed: the log only has 3..5
    assert offsets(seq.fill([pub(3), pub(4), pub(5)], "E")) == [3, 4, 5]
    assert reports == ["gap"]


def test_empty_fill_skips_the_reported_gap() -> None:
    clock = Clock()
    seq, reports = make(clock)
    seq.reset(StreamPosition(0, "E"))
    seq.offer(pub(3), "E")
    seq.offer(pub(6), "E")
    clock.t += 0.2
    assert seq.missing() == (0, 2)
    assert offsets(seq.fill([], "E")) == [3]  # 1..2 are gone; 4..5 may still arrive
    assert reports == ["gap"]
    assert seq.position == StreamPosition(3, "E")
    assert seq.held == 1


def test_fill_without_a_reported_gap_just_catches_up() -> None:
    seq, reports = make()
    seq.reset(StreamPosition(2, "E"))
    assert offsets(seq.fill([pub(3), pub(4)], "E")) == [3, 4]
    assert offsets(seq.fill([pub(4), pub(5)], "E")) == [5]
    assert reports == []


def test_unknown_epoch_is_held_until_the_log_confirms_it() -> None:
    clock = Clock()
    seq, reports = make(clock)
    seq.reset(StreamPosition(7, "OLD"))
    seq.offer(pub(9), "OLD")  # buffered behind 8, then lost with the old stream
    assert seq.offer(pub(2), "NEW") == []  # straggler or new stream? only the log knows
    assert seq.held == 2 and reports == []
    clock.t += 0.2
    assert seq.missing() == (7, 8)
    # the read since (7, OLD) raised UnrecoverablePosition; the stream read from its start:
    assert offsets(seq.fill([pub(1)], "NEW")) == [1, 2]
    assert reports == ["epoch"]
    assert seq.position == StreamPosition(2, "NEW")
    assert seq.held == 0
    assert seq.offer(pub(10), "OLD") == []  # OLD is retired
    assert offsets(seq.offer(pub(3), "NEW")) == [3]
    assert reports == ["epoch"]


def test_straggler_of_an_older_unseen_epoch_is_dropped_after_the_log_read() -> None:
    clock = Clock()
    seq, reports = make(clock)
    seq.reset(StreamPosition(3, "CUR"))
    assert seq.offer(pub(5), "ANCIENT") == []
    clock.t += 0.2
    assert seq.missing() == (3, 3)  # nothing missing in CUR: the read confirms the epoch
    clock.t += 0.01
    assert seq.offer(pub(6), "ANCIENT") == []  # same epoch, arrived after the ask
    assert seq.fill([], "CUR") == []
    assert seq.held == 0 and seq.next_deadline() is None
    assert seq.offer(pub(7), "ANCIENT") == []
    assert seq.held == 0
    assert reports == []
    assert seq.position == StreamPosition(3, "CUR")


def test_publications_of_an_unknown_epoch_arriving_after_the_ask_are_kept() -> None:
    clock = Clock()
    seq, _ = make(clock)
    seq.reset(StreamPosition(0, "CUR"))
    seq.offer(pub(2), "CUR")
    clock.t += 0.2
    assert seq.missing() == (0, 1)
    clock.t += 0.01
    seq.offer(pub(1), "LATER")  # e.g. the stream was re-created after the read began
    assert offsets(seq.fill([pub(1), pub(2)], "CUR")) == [1, 2]
    assert seq.held == 1
    clock.t += 0.2
    assert seq.missing() == (2, 2)
    assert offsets(seq.fill([pub(1)], "LATER")) == [1]


def test_new_epoch_from_a_fill_starts_from_the_beginning() -> None:
    seq, reports = make()
    seq.reset(StreamPosition(4, "OLD"))
    assert offsets(seq.fill([pub(1), pub(2)], "NEW")) == [1, 2]
    assert reports == ["epoch"]
    assert seq.fill([pub(5)], "OLD") == []


def test_reset_never_moves_back_in_the_same_epoch_and_releases_the_buffer() -> None:
    seq, _ = make()
    seq.reset(StreamPosition(0, "E"))
    seq.offer(pub(4), "E")
    seq.offer(pub(5), "E")
    assert offsets(seq.reset(StreamPosition(3, "E"))) == [4, 5]
    assert seq.reset(StreamPosition(1, "E")) == []
    assert seq.position == StreamPosition(5, "E")
    assert seq.reset(StreamPosition(2, "OTHER")) == []
    assert seq.position == StreamPosition(2, "OTHER")


def test_unpositioned_sequencer_starts_at_the_first_publication() -> None:
    seq, reports = make()
    assert seq.position is None
    assert offsets(seq.offer(pub(10), "E")) == [10]
    assert offsets(seq.offer(pub(11), "E")) == [11]
    assert reports == []


def test_bad_input_is_rejected() -> None:
    seq, _ = make()
    with pytest.raises(ValueError):
        seq.offer(pub(-1), "E")
    with pytest.raises(ValueError):
        seq.offer(pub(1), "")
    with pytest.raises(ValueError):
        seq.reset(StreamPosition(-1, "E"))
    with pytest.raises(ValueError):
        ChannelSequencer(max_wait=-1)


# -- state machine --------------------------------------------------------------------------

NODES = 3


class SequencerMachine(RuleBasedStateMachine):
    """A channel whose stream may be re-created (new epoch, offsets from 1 again), published
    to from NODES nodes; every publication travels to the consumer over a lossy link that
    reorders and duplicates. The consumer fills gaps from the model log like a channel actor.
    """

    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock()
        self.reports: list[InsufficientReason] = []
        self.seq = ChannelSequencer(now=self.clock, on_insufficient=self.reports.append)
        self.epochs: list[str] = []
        self.log: list[Publication] = []  # the current epoch's stream
        self.in_flight: list[tuple[int, Publication, str]] = []  # (node, pub, epoch)
        self.seen: list[tuple[str, int]] = []

    @initialize()
    def start(self) -> None:
        self.epochs.append("E0")
        self.deliver(self.seq.reset(StreamPosition(0, "E0")))

    def deliver(self, pubs: list[Publication]) -> None:
        position = self.seq.position
        assert position is not None
        self.seen.extend((position.epoch, p.offset) for p in pubs)

    @property
    def epoch(self) -> str:
        return self.epochs[-1]

    @rule(node=st.integers(0, NODES - 1), copies=st.integers(0, 2))
    def publish(self, node: int, copies: int) -> None:
        """Commit on `node`; 0 copies = the broker dropped it."""
        p = pub(len(self.log) + 1, str(node).encode())
        self.log.append(p)
        self.in_flight.extend((node, p, self.epoch) for _ in range(copies))

    @precondition(lambda self: self.in_flight)
    @rule(data=st.data())
    def arrive(self, data: st.DataObject) -> None:
        index = data.draw(st.integers(0, len(self.in_flight) - 1))
        _, p, epoch = self.in_flight.pop(index)
        self.deliver(self.seq.offer(p, epoch))

    @rule(seconds=st.sampled_from([0.05, 0.2, 1.0]))
    def tick(self, seconds: float) -> None:
        self.clock.t += seconds
        gap = self.seq.missing()
        if gap is not None:
            self.read_log(gap[0])

    def read_log(self, after: int) -> None:
        position = self.seq.position
        assert position is not None
        if position.epoch == self.epoch:
            self.deliver(self.seq.fill(self.log[after:], self.epoch))
        else:  # UnrecoverablePosition: read the new stream from its start
            self.deliver(self.seq.fill(list(self.log), self.epoch))

    @precondition(lambda self: len(self.epochs) < 4)
    @rule()
    def recreate_stream(self) -> None:
        self.epochs.append(f"E{len(self.epochs)}")
        self.log = []

    @invariant()
    def every_epoch_is_a_gap_free_prefix_in_order(self) -> None:
        segments: list[tuple[str, list[int]]] = []
        for epoch, offset in self.seen:
            if not segments or segments[-1][0] != epoch:
                segments.append((epoch, []))
            segments[-1][1].append(offset)
        order = [self.epochs.index(epoch) for epoch, _ in segments]
        assert order == sorted(set(order)), f"epochs out of order: {segments}"
        for epoch, offs in segments:
            assert offs == list(range(1, len(offs) + 1)), f"{epoch}: {offs}"
        assert "gap" not in self.reports  # the model log is never trimmed

    def teardown(self) -> None:
        self.clock.t += 10  # whatever is still in flight is lost
        gap = self.seq.missing()
        if gap is not None:
            self.read_log(gap[0])
        position = self.seq.position
        assert position is not None
        self.read_log(position.offset if position.epoch == self.epoch else 0)
        final = [offset for epoch, offset in self.seen if epoch == self.epoch]
        assert final == list(range(1, len(self.log) + 1))
        assert self.seq.held == 0
        switched = sum(1 for a, b in zip(self.seen, self.seen[1:], strict=False) if a[0] != b[0])
        assert self.reports.count("epoch") >= switched


TestSequencerMachine = SequencerMachine.TestCase
TestSequencerMachine.settings = settings(max_examples=300, stateful_step_count=60, deadline=None)
