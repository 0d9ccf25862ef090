"""`engine/node.py`: publish with and without history, idempotency keys, `publish_many`
ordering, storage failures as error 100, and channel resolution through namespaces. A real
`MemoryEventLog` behind the real group-commit writer, `MemoryPresence`, and a fan-out that
records what the node hands it."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest

from centripy.engine.contracts import AppendRequest, AppendResult, StorageError
from centripy.engine.node import Node, PublishItem, PublishResult
from centripy.engine.protocol.codes import Error, ErrorCode
from centripy.engine.types import ClientInfo, Publication
from centripy.storage.memory import MemoryEventLog
from centripy.storage.presence_memory import MemoryPresence
from centripy.storage.writer import GroupCommitWriter
from tests.actors.harness import make_config

pytestmark = pytest.mark.timeout(30)


class FanoutRecorder:
    """The node's `Fanout`: records (kind, channel, payload) in call order."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, Any]] = []

    def deliver(self, channel: str, pub: Publication, epoch: str) -> None:
        self.calls.append(("pub", channel, (pub, epoch)))

    def join(self, channel: str, info: ClientInfo) -> None:
        self.calls.append(("join", channel, info))

    def leave(self, channel: str, info: ClientInfo) -> None:
        self.calls.append(("leave", channel, info))

    def pubs(self, channel: str | None = None) -> list[tuple[bytes, int, str]]:
        return [
            (pub.data, pub.offset, epoch)
            for kind, ch, (pub, epoch) in (c for c in self.calls if c[0] == "pub")
            if channel is None or ch == channel
        ]


class OutageEventLog(MemoryEventLog):
    """The memory event log with an outage switch (as a database that went away)."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False

    async def append_many(self, requests: Sequence[AppendRequest]) -> list[AppendResult]:
        if self.down:
            raise StorageError("event log is down")
        return await super().append_many(requests)

    async def history(self, query: Any) -> Any:
        if self.down:
            raise StorageError("event log is down")
        return await super().history(query)


@dataclasses.dataclass
class Setup:
    node: Node
    log: OutageEventLog
    fanout: FanoutRecorder


@pytest.fixture
async def setup() -> AsyncIterator[Setup]:
    log = OutageEventLog()
    writer = GroupCommitWriter(log)
    await log.start()
    await writer.start()
    node = Node(make_config(channel_max_length=40), log, writer.submit_many, MemoryPresence())
    fanout = FanoutRecorder()
    node.attach_fanout(fanout)
    yield Setup(node, log, fanout)
    await writer.close()
    await log.close()


async def test_publish_without_history_is_delivered_but_not_logged(setup: Setup) -> None:
    result = await setup.node.publish("news", b'{"n":1}', tags={"b": "2", "a": "1"})
    assert result == PublishResult(0, "", False)
    assert setup.fanout.pubs() == [(b'{"n":1}', 0, "")]
    (_, _, (pub, _)) = setup.fanout.calls[0]
    assert list(pub.tags.items()) == [("a", "1"), ("b", "2")]  # sorted by key
    with pytest.raises(Error) as info:
        await setup.node.history("news")
    assert info.value.code == ErrorCode.NOT_AVAILABLE


async def test_publish_with_history_gets_offsets_and_is_readable(setup: Setup) -> None:
    first = await setup.node.publish("h:room", b'{"n":1}')
    second = await setup.node.publish("h:room", b'{"n":2}', skip_history=False)
    assert (first.offset, second.offset) == (1, 2) and first.epoch == second.epoch != ""
    assert setup.fanout.pubs("h:room") == [
        (b'{"n":1}', 1, first.epoch),
        (b'{"n":2}', 2, first.epoch),
    ]
    res = await setup.node.history("h:room", limit=-1)
    assert [p.data for p in res.publications] == [b'{"n":1}', b'{"n":2}']
    assert res.position.offset == 2 and (await setup.node.stream_top("h:room")).offset == 2


async def test_skip_history_publishes_without_logging(setup: Setup) -> None:
    await setup.node.publish("h:room", b'{"n":1}')
    skipped = await setup.node.publish("h:room", b'{"n":2}', skip_history=True)
    assert skipped.offset == 0
    assert [data for data, _, _ in setup.fanout.pubs()] == [b'{"n":1}', b'{"n":2}']
    assert (await setup.node.stream_top("h:room")).offset == 1


async def test_an_idempotency_key_suppresses_the_repeat(setup: Setup) -> None:
    first = await setup.node.publish("h:room", b'{"n":1}', idempotency_key="k1")
    again = await setup.node.publish("h:room", b'{"n":1}', idempotency_key="k1")
    other = await setup.node.publish("h:room", b'{"n":2}', idempotency_key="k2")
    assert not first.suppressed and again.suppressed
    assert (again.offset, again.epoch) == (first.offset, first.epoch)  # the first one's result
    assert other.offset == first.offset + 1 and not other.suppressed
    assert [offset for _, offset, _ in setup.fanout.pubs()] == [1, 2]  # the repeat: not sent

    # without history, the key still goes through the log (which keeps no publication)
    plain = await setup.node.publish("news", b"{}", idempotency_key="k1")
    repeat = await setup.node.publish("news", b"{}", idempotency_key="k1")
    assert not plain.suppressed and repeat.suppressed
    assert len(setup.fanout.pubs("news")) == 1


async def test_publish_many_keeps_item_order_in_results_and_log_order(setup: Setup) -> None:
    node = setup.node
    items = [
        PublishItem(node.resolve("h:a"), b'{"i":0}'),
        PublishItem(node.resolve("news"), b'{"i":1}'),
        PublishItem(node.resolve("h:a"), b'{"i":2}'),
        PublishItem(node.resolve("h:b"), b'{"i":3}'),
        PublishItem(node.resolve("h:a"), b'{"i":4}'),
    ]
    results = await node.publish_many(items)
    assert [(r.offset, r.suppressed) for r in results if isinstance(r, PublishResult)] == [
        (1, False),
        (0, False),
        (2, False),
        (1, False),
        (3, False),
    ]
    # the unlogged item goes out at once; the logged ones after their commit, in item order
    assert [data for data, _, _ in setup.fanout.pubs()] == [
        b'{"i":1}',
        b'{"i":0}',
        b'{"i":2}',
        b'{"i":3}',
        b'{"i":4}',
    ]
    assert [offset for _, offset, _ in setup.fanout.pubs("h:a")] == [1, 2, 3]
    assert await node.publish_many([]) == []


async def test_a_failed_commit_is_error_100_for_logged_items_only(setup: Setup) -> None:
    node = setup.node
    setup.log.down = True
    with pytest.raises(Error) as info:
        await node.publish("h:room", b"{}")
    assert info.value.code == ErrorCode.INTERNAL
    results = await node.publish_many(
        [PublishItem(node.resolve("h:room"), b'{"i":0}'), PublishItem(node.resolve("news"), b"{}")]
    )
    assert isinstance(results[0], Error) and results[0].code == ErrorCode.INTERNAL
    assert results[1] == PublishResult(0, "", False)
    assert setup.fanout.pubs() == [(b"{}", 0, "")]  # only the unlogged one went out
    with pytest.raises(Error) as info:
        await node.history("h:room")
    assert info.value.code == ErrorCode.INTERNAL

    setup.log.down = False  # the storage is back: publishing works again
    assert (await node.publish("h:room", b"{}")).offset == 1


async def test_resolve_applies_namespaces_and_name_rules(setup: Setup) -> None:
    node = setup.node
    assert node.resolve("h:room").options.history_size == 1000
    assert node.resolve("room").options.history_size == 0
    for name, code in (
        ("", ErrorCode.UNKNOWN_CHANNEL),
        ("nope:room", ErrorCode.UNKNOWN_CHANNEL),
        ("x" * 41, ErrorCode.BAD_REQUEST),
    ):
        with pytest.raises(Error) as info:
            node.resolve(name)
        assert info.value.code == code, name
    with pytest.raises(Error) as info:
        await node.publish("nope:room", b"{}")
    assert info.value.code == ErrorCode.UNKNOWN_CHANNEL
    assert setup.fanout.calls == []


async def test_join_leave_and_presence_follow_channel_options(setup: Setup) -> None:
    node = setup.node
    info = ClientInfo("42", "c1")
    node.join("h:room", info)
    node.leave("h:room", info)
    assert [(kind, ch) for kind, ch, _ in setup.fanout.calls] == [
        ("join", "h:room"),
        ("leave", "h:room"),
    ]
    await node.presence_manager.add("h:room", info, 60.0)
    assert set(await node.presence("h:room")) == {"c1"}
    assert (await node.presence_stats("h:room")).num_clients == 1
    for call in (node.presence, node.presence_stats, node.history_remove):
        with pytest.raises(Error) as err:
            await call("news")  # no presence, no history in the top-level options
        assert err.value.code == ErrorCode.NOT_AVAILABLE
