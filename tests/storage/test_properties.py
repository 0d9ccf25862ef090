"""Property tests (hypothesis) of the event log, on every back end:

* offsets of a channel are exactly 1..n under any interleaving of appends across channels
  and batches (direct batches, and concurrent callers through the GroupCommitWriter);
* the same idempotency key returns the same position (and nothing is stored twice);
* history since/limit/reverse agrees with a simple list model.

Each example uses fresh channel names, so one opened log serves all examples of a test.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from centripy.engine.contracts import AppendRequest, AppendResult, EventLog, HistoryQuery
from centripy.engine.types import StreamPosition
from centripy.storage.writer import GroupCommitWriter
from tests.storage.conftest import BACKENDS, FakeClock, LogFactory

pytestmark = pytest.mark.timeout(300)
EXAMPLES = {"memory": 150, "sqlite": 40, "postgres": 25}
_ids = itertools.count()

Op = tuple[int, int | None, bool]  # (channel index, key index or None, history on)
ops = st.tuples(st.integers(0, 2), st.none() | st.integers(0, 3), st.booleans() | st.just(True))
batches = st.lists(st.lists(ops, min_size=1, max_size=8), min_size=1, max_size=8)


class Harness:
    """One event loop and one open log for all examples of a test."""

    def __init__(self, factory: LogFactory) -> None:
        self.runner = asyncio.Runner()
        self.factory = factory
        self.log: EventLog = self.run(factory.open())
        self.examples = EXAMPLES[factory.kind]

    def run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return self.runner.run(coro)

    def close(self) -> None:
        try:
            self.run(self.factory.aclose())
        finally:
            self.runner.close()


@pytest.fixture(params=BACKENDS)
def harness(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Harness]:
    pg = request.getfixturevalue("pg_url") if request.param == "postgres" else None
    h = Harness(LogFactory(request.param, FakeClock(), tmp_path, pg))
    try:
        yield h
    finally:
        h.close()


def requests_for(batch_ops: list[list[Op]], tag: str) -> list[list[AppendRequest]]:
    return [
        [
            AppendRequest(
                f"{tag}-ch{ch}",
                b"[%d,%d]" % (b, i),
                history_size=1000 if history else 0,
                history_ttl=600.0,
                idempotency_key="" if key is None else f"key{key}",
            )
            for i, (ch, key, history) in enumerate(batch)
        ]
        for b, batch in enumerate(batch_ops)
    ]


def model(flat: list[AppendRequest]) -> list[tuple[int, bool, int]]:
    """Sequential semantics: (offset, suppressed, index of the first call) per request."""
    tops: dict[str, int] = {}
    firsts: dict[tuple[str, str], tuple[int, int]] = {}
    out = []
    for i, r in enumerate(flat):
        key = (r.channel, r.idempotency_key)
        if r.idempotency_key and key in firsts:
            offset, first = firsts[key]
            out.append((offset, True, first))
            continue
        offset = 0
        if r.history_size:
            offset = tops[r.channel] = tops.get(r.channel, 0) + 1
        if r.idempotency_key:
            firsts[key] = (offset, i)
        out.append((offset, False, i))
    return out


async def check_stored(
    log: EventLog, flat: list[AppendRequest], results: list[AppendResult]
) -> None:
    for channel in {r.channel for r in flat}:
        expected = [
            (res.publication.offset, req.data)
            for req, res in zip(flat, results, strict=True)
            if req.channel == channel and res.publication.offset and not res.suppressed
        ]
        history = await log.history(HistoryQuery(channel, limit=-1))
        assert [(p.offset, p.data) for p in history.publications] == sorted(expected)
        assert [o for o, _ in sorted(expected)] == list(range(1, len(expected) + 1))


def assert_matches_model(flat: list[AppendRequest], results: list[AppendResult]) -> None:
    epochs: dict[str, str] = {}
    for (offset, suppressed, first), res, req in zip(model(flat), results, flat, strict=True):
        assert (res.publication.offset, res.suppressed) == (offset, suppressed)
        assert res.epoch == results[first].epoch
        if offset and not suppressed:
            assert epochs.setdefault(req.channel, res.epoch) == res.epoch


def run_property(
    h: Harness, strategy: st.SearchStrategy[Any], body: Callable[[Any], Coroutine[Any, Any, None]]
) -> None:
    @settings(max_examples=h.examples, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(strategy)
    def check(value: Any) -> None:
        h.run(body(value))

    check()


def test_offsets_are_1_to_n_in_direct_batches(harness: Harness) -> None:
    async def body(batch_ops: list[list[Op]]) -> None:
        results: list[AppendResult] = []
        grouped = requests_for(batch_ops, f"d{next(_ids)}")
        for batch in grouped:
            results.extend(await harness.log.append_many(batch))
        flat = [r for batch in grouped for r in batch]
        assert_matches_model(flat, results)
        await check_stored(harness.log, flat, results)

    run_property(harness, batches, body)


def test_offsets_are_1_to_n_through_concurrent_writer(harness: Harness) -> None:
    async def body(args: tuple[list[list[Op]], int]) -> None:
        batch_ops, max_batch = args
        writer = GroupCommitWriter(harness.log, max_batch=max_batch, max_delay=0.001)
        await writer.start()
        callers = requests_for(batch_ops, f"w{next(_ids)}")  # each "batch" is one caller

        async def caller(reqs: list[AppendRequest]) -> list[tuple[AppendRequest, AppendResult]]:
            return [(r, await writer.submit(r)) for r in reqs]

        done = await asyncio.gather(*(caller(reqs) for reqs in callers))
        await writer.close()
        pairs = [pair for chunk in done for pair in chunk]
        flat, results = [p[0] for p in pairs], [p[1] for p in pairs]
        by_key: dict[tuple[str, str], list[AppendResult]] = {}
        for req, res in pairs:
            if req.idempotency_key:
                by_key.setdefault((req.channel, req.idempotency_key), []).append(res)
        for same in by_key.values():
            assert len({(r.publication.offset, r.epoch) for r in same}) == 1
            assert sum(not r.suppressed for r in same) == 1
        await check_stored(harness.log, flat, results)

    run_property(harness, st.tuples(batches, st.integers(1, 6)), body)


queries = st.lists(
    st.tuples(st.sampled_from([-1, 0, 1, 2, 5]), st.none() | st.integers(0, 40), st.booleans()),
    min_size=1,
    max_size=6,
)


def test_history_agrees_with_list_model(harness: Harness) -> None:
    async def body(args: tuple[int, int, list[tuple[int, int | None, bool]]]) -> None:
        count, size, qs = args
        channel = f"h{next(_ids)}"
        reqs = [
            AppendRequest(channel, b"%d" % i, history_size=size, history_ttl=60)
            for i in range(count)
        ]
        epoch = ""
        for chunk in (reqs[: count // 2], reqs[count // 2 :]):
            if chunk:
                epoch = (await harness.log.append_many(chunk))[0].epoch
        kept = list(range(max(1, count - size + 1), count + 1))
        for limit, since, reverse in qs:
            pos = None if since is None else StreamPosition(since, epoch)
            result = await harness.log.history(HistoryQuery(channel, limit, pos, reverse))
            expected = kept[::-1] if reverse else kept
            if since is not None:
                expected = [o for o in expected if (o < since if reverse else o > since)]
            expected = [] if limit == 0 else expected if limit < 0 else expected[:limit]
            assert [p.offset for p in result.publications] == expected
            assert [p.data for p in result.publications] == [b"%d" % (o - 1) for o in expected]
            assert result.position.offset == count

    run_property(harness, st.tuples(st.integers(0, 30), st.integers(1, 12), queries), body)


# (channel index, True: append with history / False: read with limit -1)
steps = st.lists(st.tuples(st.integers(0, 3), st.booleans()), min_size=1, max_size=16)


def test_reads_store_nothing_and_agree_with_the_first_append(harness: Harness) -> None:
    """Reads interleaved with appends on fresh channels: a read before a channel's first
    append reports offset 0 and the epoch that append then gets; afterwards it reports the
    append's position; only channels that got an append have a stream."""

    async def body(ops: list[tuple[int, bool]]) -> None:
        tag = f"r{next(_ids)}"
        streams_before = (await harness.factory.counts())[0]
        seen: dict[str, StreamPosition] = {}
        tops: dict[str, int] = {}
        for index, append in ops:
            channel = f"{tag}-ch{index}"
            if append:
                res = await harness.log.append(
                    AppendRequest(channel, b"x", history_size=100, history_ttl=600.0)
                )
                tops[channel] = tops.get(channel, 0) + 1
                assert res.publication.offset == tops[channel]
                position = StreamPosition(res.publication.offset, res.epoch)
            else:
                position = (await harness.log.history(HistoryQuery(channel, limit=-1))).position
                assert position.offset == tops.get(channel, 0)
            if channel in seen:
                assert position.epoch == seen[channel].epoch
            seen[channel] = position
        streams = (await harness.factory.counts())[0] - streams_before
        assert streams == len(tops)

    run_property(harness, steps, body)
