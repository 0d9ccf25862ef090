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
    """A node whose history reads snapshot the stream top when they start and finish only
    when the test opens their gate (or fail with the test's error)."""

    def __init__(self) -> None:
        self.top = 0
        self.started: list[tuple[str, int, StreamPosition | None, asyncio.Future[None]]] = []

    async def history(
        self, channel: str, *, limit: int, since: StreamPosition | None, name: Any
    ) -> HistoryResult:
        top = self.top
        gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.started.append((channel, limit, since, gate))
        await gate
        first = since.offset + 1 if since is not None else top + 1
        return HistoryResult([Publication(b"{}", o) for o in range(first, top + 1)], pos(top))

    def open(self, index: int, error: BaseException | None = None) -> None:
        gate = self.started[index][3]
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
    assert reads.reads == 2 and not reads._slots


async def test_different_keys_read_on_their_own() -> None:
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
    ]
    tasks = [asyncio.create_task(c) for c in calls]
    await eventually(lambda: len(node.started) == len(tasks), 5, "one read per key at once")
    for i in range(len(tasks)):
        node.open(i)
    results = await asyncio.gather(*tasks)
    assert offsets(results[0]) == [2, 3, 4] and offsets(results[1]) == [3, 4]
    assert offsets(results[4]) == [] and results[4].position == pos(4)


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
    assert not reads._slots
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
    first.cancel()  # the reader itself goes away: the end of its read starts the next
    with pytest.raises(asyncio.CancelledError):
        await first
    with pytest.raises(asyncio.CancelledError):
        await gone
    await eventually(lambda: len(node.started) == 2, 5, "the next read started")
    node.open(1)
    assert (await stays).position == pos(0)
    assert not reads._slots
