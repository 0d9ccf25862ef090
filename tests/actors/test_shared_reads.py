"""Shared stream reads of subscribing connections (`actors/shared_reads.py`): callers of one
key share a read that started after they called, never the one in flight when they came."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest

from centripy.actors.shared_reads import SharedReads
from centripy.engine.contracts import HistoryResult
from centripy.engine.protocol.codes import Error, ErrorCode
from centripy.engine.types import Publication, StreamPosition
from tests.support.wait import eventually

pytestmark = pytest.mark.timeout(30)

NAME: Any = None  # the fake node ignores the resolved name


class GatedNode:
    """A node whose batched history reads snapshot the stream top when they start and
    finish only when the test opens their gate (or fail with the test's error)."""

    def __init__(self) -> None:
        self.top = 0
        self.started: list[
            tuple[list[tuple[str, int, StreamPosition | None]], asyncio.Future[None]]
        ] = []
        self.errors: dict[str, Error] = {}  # per channel: its read fails with this

    async def history_many(
        self, reads: list[tuple[str, int, StreamPosition | None, Any]]
    ) -> list[HistoryResult | Error]:
        top = self.top
        gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.started.append(([(c, lim, since) for c, lim, since, _ in reads], gate))
        await gate
        out: list[HistoryResult | Error] = []
        for channel, _, since, _ in reads:
            if channel in self.errors:
                out.append(self.errors[channel])
                continue
            first = since.offset + 1 if since is not None else top + 1
            pubs = [Publication(b"{}", o) for o in range(first, top + 1)]
            out.append(HistoryResult(pubs, pos(top)))
        return out

    def open(self, index: int, error: BaseException | None = None) -> None:
        gate = self.started[index][1]
        if error is None:
            gate.set_result(None)
        else:
            gate.set_exception(error)


def pos(offset: int) -> StreamPosition:
    return StreamPosition(offset, "ep")


def reader(node: GatedNode) -> SharedReads:
    return SharedReads(cast(Any, node))


def offsets(result: HistoryResult) -> list[int]:
    return [p.offset for p in result.publications]


async def test_callers_during_a_read_share_the_next_read_which_sees_what_came_meanwhile() -> None:
    node = GatedNode()
    reads = reader(node)
    node.top = 3
    first = asyncio.create_task(reads.history("ch", limit=100, since=pos(1), name=NAME))
    await eventually(lambda: len(node.started) == 1, 5, "the first read started")
    node.top = 5  # committed after the first read's snapshot, before the others call
    later = [
        asyncio.create_task(reads.history("ch", limit=100, since=pos(1), name=NAME))
        for _ in range(3)
    ]
    await asyncio.sleep(0)  # the three are queued, not reading
    assert len(node.started) == 1
    node.open(0)
    assert offsets(await first) == [2, 3]
    await eventually(lambda: len(node.started) == 2, 5, "one shared second read")
    node.open(1)
    results = await asyncio.gather(*later)
    assert [offsets(r) for r in results] == [[2, 3, 4, 5]] * 3
    assert all(r.position == pos(5) for r in results)
    assert reads.reads == 2 and not reads._waiting


async def test_different_keys_share_one_read_with_one_query_each() -> None:
    node = GatedNode()
    reads = reader(node)
    node.top = 4
    calls = [
        reads.history("a", limit=100, since=pos(1), name=NAME),
        reads.history("a", limit=100, since=pos(2), name=NAME),
        reads.history("a", limit=10, since=pos(1), name=NAME),
        reads.history("a", limit=100, since=StreamPosition(1, "other"), name=NAME),
        reads.history("a", limit=0, since=None, name=NAME),
        reads.history("b", limit=100, since=pos(1), name=NAME),
        reads.history("a", limit=100, since=pos(1), name=NAME),  # the first one's key
    ]
    tasks = [asyncio.create_task(c) for c in calls]
    await eventually(lambda: len(node.started) == 1, 5, "one read")
    assert len(node.started[0][0]) == 6  # one query per key
    node.errors["b"] = Error.of(ErrorCode.UNRECOVERABLE_POSITION)
    node.open(0)
    results = await asyncio.gather(*tasks, return_exceptions=True)
    ok = [r for r in results if isinstance(r, HistoryResult)]
    assert len(ok) == 6 and not isinstance(results[5], HistoryResult)
    assert offsets(ok[0]) == [2, 3, 4] and offsets(ok[1]) == [3, 4] and offsets(ok[2]) == [2, 3, 4]
    assert offsets(ok[4]) == [] and ok[4].position == pos(4)
    assert isinstance(results[5], Error) and results[5].code == ErrorCode.UNRECOVERABLE_POSITION
    assert results[6] is results[0]
    assert reads.reads == 1 and reads.keys == 6


async def test_callers_of_many_channels_during_a_read_share_the_next_one() -> None:
    node = GatedNode()
    reads = reader(node)
    first = asyncio.create_task(reads.history("c0", limit=0, since=None, name=NAME))
    await eventually(lambda: len(node.started) == 1, 5, "the first read started")
    node.top = 7
    later = [
        asyncio.create_task(reads.history(f"c{i}", limit=0, since=None, name=NAME))
        for i in range(50)
    ]
    await asyncio.sleep(0)
    node.open(0)
    assert (await first).position == pos(0)
    await eventually(lambda: len(node.started) == 2, 5, "one shared second read")
    assert sorted(c for c, _, _ in node.started[1][0]) == sorted(f"c{i}" for i in range(50))
    node.open(1)
    assert all(r.position == pos(7) for r in await asyncio.gather(*later))
    assert reads.reads == 2


async def test_a_read_takes_at_most_max_batch_keys_the_rest_read_next() -> None:
    node = GatedNode()
    reads = SharedReads(cast(Any, node), max_batch=3)
    tasks = [
        asyncio.create_task(reads.history(f"c{i}", limit=0, since=None, name=NAME))
        for i in range(5)
    ]
    await eventually(lambda: len(node.started) == 1, 5, "the first read started")
    assert [c for c, _, _ in node.started[0][0]] == ["c0", "c1", "c2"]
    node.open(0)
    await eventually(lambda: len(node.started) == 2, 5, "the rest read next")
    assert [c for c, _, _ in node.started[1][0]] == ["c3", "c4"]
    node.open(1)
    await asyncio.gather(*tasks)
    assert reads._task is None or reads._task.done()


async def test_an_error_reaches_every_sharer_and_the_key_is_read_again_afterwards() -> None:
    node = GatedNode()
    reads = reader(node)
    first = asyncio.create_task(reads.history("ch", limit=0, since=None, name=NAME))
    await eventually(lambda: len(node.started) == 1, 5, "the first read started")
    waiting = [
        asyncio.create_task(reads.history("ch", limit=0, since=None, name=NAME)) for _ in range(2)
    ]
    await asyncio.sleep(0)
    node.open(0)
    await first
    await eventually(lambda: len(node.started) == 2, 5, "the shared read started")
    node.open(1, Error.of(ErrorCode.INTERNAL))
    for task in waiting:
        with pytest.raises(Error) as info:
            await task
        assert info.value.code == ErrorCode.INTERNAL
    assert not reads._waiting
    again = asyncio.create_task(reads.history("ch", limit=0, since=None, name=NAME))
    await eventually(lambda: len(node.started) == 3, 5, "a fresh read")
    node.open(2)
    assert (await again).position == pos(0)


async def test_a_cancelled_caller_leaves_the_others_their_result() -> None:
    node = GatedNode()
    reads = reader(node)
    first = asyncio.create_task(reads.history("ch", limit=0, since=None, name=NAME))
    await eventually(lambda: len(node.started) == 1, 5, "the first read started")
    gone = asyncio.create_task(reads.history("ch", limit=0, since=None, name=NAME))
    stays = asyncio.create_task(reads.history("ch", limit=0, since=None, name=NAME))
    await asyncio.sleep(0)
    gone.cancel()
    first.cancel()  # the first caller goes away too: its read still ends and starts the next
    with pytest.raises(asyncio.CancelledError):
        await first
    with pytest.raises(asyncio.CancelledError):
        await gone
    node.open(0)
    await eventually(lambda: len(node.started) == 2, 5, "the next read started")
    node.open(1)
    assert (await stays).position == pos(0)
    assert not reads._waiting
