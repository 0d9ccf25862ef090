"""GroupCommitWriter: batching, one batch in flight, failure fan-out, drain on close."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from centripy.engine.contracts import (
    AppendRequest,
    AppendResult,
    EventLog,
    HistoryQuery,
    HistoryResult,
    OnCommit,
    StorageError,
)
from centripy.storage.memory import MemoryEventLog
from centripy.storage.rules import Checked, check_all
from centripy.storage.writer import GroupCommitWriter
from tests.storage.conftest import LogFactory

pytestmark = pytest.mark.timeout(30)


def req(channel: str = "ch", n: int = 0, key: str = "") -> AppendRequest:
    return AppendRequest(channel, b"%d" % n, history_size=1000, history_ttl=60, idempotency_key=key)


class SpyLog(EventLog):
    """Wraps a MemoryEventLog; records batches; can hold a batch open or fail it."""

    def __init__(self) -> None:
        self.inner = MemoryEventLog()
        self.batches: list[list[AppendRequest]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.gate: asyncio.Event | None = None
        self.entered = asyncio.Event()
        self.fail_with: BaseException | None = None

    async def start(self) -> None:
        await self.inner.start()

    async def close(self) -> None:
        await self.inner.close()

    async def append_many(self, requests: Sequence[AppendRequest]) -> list[AppendResult]:
        self.batches.append(list(requests))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        self.entered.set()
        try:
            if self.gate is not None:
                await self.gate.wait()
            if self.fail_with is not None:
                raise self.fail_with
            return await self.inner.append_many(requests)
        finally:
            self.in_flight -= 1

    async def history(self, query: HistoryQuery) -> HistoryResult:
        return await self.inner.history(query)

    async def remove_history(self, channel: str) -> None:
        await self.inner.remove_history(channel)


@pytest.fixture
async def spy() -> SpyLog:
    return SpyLog()


async def started(log: EventLog, **kw: float) -> GroupCommitWriter:
    writer = GroupCommitWriter(log, **kw)  # type: ignore[arg-type]
    await writer.start()
    return writer


async def test_concurrent_submits_are_batched(spy: SpyLog) -> None:
    writer = await started(spy, max_batch=100, max_delay=0.05)
    results = await asyncio.gather(*(writer.submit(req(n=i)) for i in range(250)))
    await writer.close()
    assert [r.publication.offset for r in results] == list(range(1, 251))
    assert [len(b) for b in spy.batches] == [100, 100, 50]
    assert spy.max_in_flight == 1


async def test_requests_arriving_during_commit_form_next_batch(spy: SpyLog) -> None:
    writer = await started(spy, max_batch=100, max_delay=0)
    spy.gate = asyncio.Event()
    first = asyncio.ensure_future(writer.submit(req(n=0)))
    await asyncio.wait_for(spy.entered.wait(), 5)
    later = [asyncio.ensure_future(writer.submit(req(n=i))) for i in range(1, 6)]
    await asyncio.sleep(0)
    assert len(spy.batches) == 1 and writer.pending == 5
    spy.gate.set()
    results = await asyncio.gather(first, *later)
    assert [len(b) for b in spy.batches] == [1, 5]
    assert [r.publication.offset for r in results] == [1, 2, 3, 4, 5, 6]
    assert spy.max_in_flight == 1
    await writer.close()


async def test_lone_request_does_not_wait_for_company(spy: SpyLog) -> None:
    writer = await started(spy, max_batch=100, max_delay=60.0)
    result = await asyncio.wait_for(writer.submit(req()), 5)  # far less than max_delay
    assert result.publication.offset == 1 and len(spy.batches) == 1
    await writer.close()


async def test_steady_trickle_is_cut_by_max_delay(spy: SpyLog) -> None:
    writer = await started(spy, max_batch=100_000, max_delay=0.005)
    futures: list[asyncio.Future[AppendResult]] = []
    loop = asyncio.get_running_loop()
    give_up = loop.time() + 10
    while len(spy.batches) < 3 and loop.time() < give_up:  # a request every loop iteration
        futures.append(asyncio.ensure_future(writer.submit(req(n=len(futures)))))
        await asyncio.sleep(0)
    results = await asyncio.gather(*futures)
    await writer.close()
    assert [r.publication.offset for r in results] == list(range(1, len(futures) + 1))
    assert len(spy.batches) >= 3  # arrivals never paused, so only max_delay cut the batches


async def test_failed_batch_fails_every_waiter_then_recovers(spy: SpyLog) -> None:
    writer = await started(spy, max_batch=10, max_delay=0.01)
    spy.fail_with = StorageError("disk on fire")
    outcomes = await asyncio.gather(
        *(writer.submit(req(n=i)) for i in range(3)), return_exceptions=True
    )
    assert all(isinstance(o, StorageError) for o in outcomes)
    assert all(isinstance(o, BaseException) and o.__cause__ is spy.fail_with for o in outcomes)
    assert len({id(o) for o in outcomes}) == 3  # one exception object per waiter
    spy.fail_with = None
    assert (await writer.submit(req())).publication.offset == 1
    await writer.close()


async def test_unexpected_error_becomes_storage_error(spy: SpyLog) -> None:
    writer = await started(spy, max_delay=0)
    spy.fail_with = RuntimeError("bug")
    with pytest.raises(StorageError) as info:
        await writer.submit(req())
    assert isinstance(info.value.__cause__, RuntimeError)
    spy.fail_with = None
    assert (await writer.submit(req())).publication.offset == 1
    await writer.close()


async def test_invalid_request_fails_only_its_caller(spy: SpyLog) -> None:
    writer = await started(spy, max_delay=0.01)
    good = asyncio.ensure_future(writer.submit(req()))
    with pytest.raises(ValueError):
        await writer.submit(AppendRequest("", b"x"))
    assert (await good).publication.offset == 1
    await writer.close()


async def test_batches_reach_the_log_marked_checked(spy: SpyLog) -> None:
    """The writer checked every request: the log does not check them again (`Checked`),
    while a plain list given to `append_many` is still checked."""
    seen: list[type] = []
    inner = spy.inner.append_many

    async def record(requests: Sequence[AppendRequest]) -> list[AppendResult]:
        seen.append(type(requests))
        return await inner(requests)

    spy.inner.append_many = record  # type: ignore[method-assign]
    writer = await started(spy)
    await writer.submit(req())
    await writer.close()
    assert seen == [Checked]
    with pytest.raises(ValueError, match="channel"):
        await spy.inner.append_many([AppendRequest("", b"x")])
    check_all(Checked([AppendRequest("", b"x")]))  # trusted as checked


async def test_same_key_in_one_batch_behaves_sequentially(spy: SpyLog) -> None:
    writer = await started(spy, max_batch=10, max_delay=0.05)
    results = await asyncio.gather(
        writer.submit(req(n=1, key="k")), writer.submit(req(n=2)), writer.submit(req(n=3, key="k"))
    )
    assert len(spy.batches) == 1
    assert [(r.publication.offset, r.suppressed) for r in results] == [
        (1, False),
        (2, False),
        (1, True),
    ]
    await writer.close()


async def test_close_drains_pending_then_refuses(spy: SpyLog) -> None:
    writer = await started(spy, max_batch=7, max_delay=10.0)
    tasks = [asyncio.ensure_future(writer.submit(req(n=i))) for i in range(20)]
    await asyncio.sleep(0)
    await asyncio.wait_for(writer.close(), 5)
    assert [t.result().publication.offset for t in tasks] == list(range(1, 21))
    with pytest.raises(StorageError):
        await writer.submit(req())
    with pytest.raises(StorageError):
        await writer.start()


async def test_submit_before_start_is_refused(spy: SpyLog) -> None:
    with pytest.raises(StorageError):
        await GroupCommitWriter(spy).submit(req())


async def test_cancelled_caller_is_dropped_before_its_batch(spy: SpyLog) -> None:
    writer = await started(spy, max_batch=10, max_delay=0)
    spy.gate = asyncio.Event()
    first = asyncio.ensure_future(writer.submit(req(n=0)))
    await asyncio.wait_for(spy.entered.wait(), 5)
    doomed = asyncio.ensure_future(writer.submit(req(n=1)))
    kept = asyncio.ensure_future(writer.submit(req(n=2)))
    await asyncio.sleep(0)
    doomed.cancel()
    spy.gate.set()
    assert (await first).publication.offset == 1
    assert (await kept).publication.offset == 2
    assert [[r.data for r in b] for b in spy.batches] == [[b"0"], [b"2"]]
    await writer.close()


def test_bad_parameters_are_refused() -> None:
    log = MemoryEventLog()
    with pytest.raises(ValueError, match="max_batch"):
        GroupCommitWriter(log, max_batch=0)
    with pytest.raises(ValueError, match="max_delay"):
        GroupCommitWriter(log, max_delay=-1)


async def test_writer_on_real_backends(logs: LogFactory) -> None:
    log = await logs.open()
    writer = await started(log, max_batch=50, max_delay=0.002)
    # 40 distinct (channel, key) pairs, each submitted three times, concurrently
    requests = [req(f"c{i % 4}", i, key=f"k{i % 40}") for i in range(120)]
    results = await asyncio.gather(*(writer.submit(r) for r in requests))
    await writer.close()
    firsts: dict[tuple[str, str], AppendResult] = {}
    for request, result in zip(requests, results, strict=True):
        firsts.setdefault((request.channel, request.idempotency_key), result)
        first = firsts[(request.channel, request.idempotency_key)]
        assert (result.publication.offset, result.epoch) == (first.publication.offset, first.epoch)
    assert sum(not r.suppressed for r in results) == 40
    for channel in ("c0", "c1", "c2", "c3"):
        offsets = sorted(
            res.publication.offset
            for request, res in zip(requests, results, strict=True)
            if request.channel == channel and not res.suppressed
        )
        assert offsets == list(range(1, 11))
        history = await log.history(HistoryQuery(channel, limit=-1))
        assert [p.offset for p in history.publications] == offsets


async def test_submit_many_shares_one_batch_in_order(spy: SpyLog) -> None:
    writer = await started(spy, max_batch=10, max_delay=0.05)
    spy.gate = asyncio.Event()
    first = asyncio.ensure_future(writer.submit(req(n=0)))
    await asyncio.wait_for(spy.entered.wait(), 5)
    units = [
        asyncio.ensure_future(writer.submit_many([req(n=i) for i in range(1, 4)])),
        asyncio.ensure_future(writer.submit_many([req("big", n=i) for i in range(25)])),
        asyncio.ensure_future(writer.submit(req(n=4))),
        asyncio.ensure_future(writer.submit_many([])),
    ]
    await asyncio.sleep(0)
    assert writer.pending == 29
    spy.gate.set()
    small, big, single, empty = await asyncio.gather(*units)
    await first
    await writer.close()
    # a unit is never split; one beyond max_batch goes alone; later units keep their order
    assert [len(b) for b in spy.batches] == [1, 3, 25, 1]
    assert [r.publication.offset for r in small] == [2, 3, 4]
    assert [r.publication.offset for r in big] == list(range(1, 26))
    assert (single.publication.offset, empty) == (5, [])


async def test_submit_many_checks_every_request_first(spy: SpyLog) -> None:
    writer = await started(spy)
    with pytest.raises(ValueError, match="channel"):
        await writer.submit_many([req(n=1), AppendRequest("", b"x")])
    await writer.close()
    assert spy.batches == []


async def test_on_commit_runs_in_commit_order_before_the_callers_resume(spy: SpyLog) -> None:
    """Each unit's on_commit runs right after its batch commits, units in order, before
    any submitter resumes; a cancelled submitter's committed unit still gets it; one that
    raises is logged and the rest go on."""
    writer = await started(spy, max_batch=100, max_delay=0.05)
    spy.gate = asyncio.Event()
    seen: list[tuple[str, list[int]]] = []
    resumed: list[str] = []

    def on_commit(name: str) -> OnCommit:
        def record(results: list[AppendResult]) -> None:
            seen.append((name, [r.publication.offset for r in results]))
            if name == "b":
                raise RuntimeError("a subscriber blew up")

        return record

    async def unit(name: str, n: int) -> None:
        await writer.submit_many([req(n=i) for i in range(n)], on_commit=on_commit(name))
        resumed.append(name)

    first = asyncio.ensure_future(unit("first", 1))
    await asyncio.wait_for(spy.entered.wait(), 5)
    tasks = {name: asyncio.ensure_future(unit(name, n)) for name, n in (("a", 2), ("b", 1))}
    tasks["c"] = asyncio.ensure_future(unit("c", 2))
    held, spy.gate = spy.gate, asyncio.Event()
    spy.entered.clear()
    held.set()  # the first batch commits; the second (a, b, c) waits in the log
    await first
    await asyncio.wait_for(spy.entered.wait(), 5)
    tasks["c"].cancel()  # taken into the batch, then cancelled: still committed
    spy.gate.set()
    await asyncio.gather(tasks["a"], tasks["b"])
    await writer.close()
    assert seen == [("first", [1]), ("a", [2, 3]), ("b", [4]), ("c", [5, 6])]
    assert resumed == ["first", "a", "b"]
