"""Storage failures in the middle of a subscribe or a gap fill leave no half state (issue 16,
item 1): a subscribe whose stream-top read fails is refused with 100 and can be retried (not
105, not counted by the hub); a gap fill whose second log read fails leaves the channel actor
alive, and it fills once the log is back.

Several nodes' setting (a hub with a real RedisBroker, so channel actors are sequenced) over
a memory event log with an outage switch (`FlakyLog`, as a database that is down).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

import centripy.actors.channel as channel_module
from centripy.actors.channel import (
    AddSubscriber,
    Deliver,
    Init,
    Insufficient,
    Resync,
    SequencedChannelActor,
)
from centripy.actors.context import ConnContext
from centripy.actors.hub import Hub
from centripy.engine.auth import TokenVerifier
from centripy.engine.contracts import AppendRequest, HistoryQuery, HistoryResult, StorageError
from centripy.engine.node import Node
from centripy.storage.broker_redis import RedisBroker
from centripy.storage.memory import MemoryEventLog
from centripy.storage.presence_memory import MemoryPresence
from centripy.storage.writer import GroupCommitWriter
from tests.actors.harness import Client, Recorder, make_config
from tests.support.services import redis_url
from tests.support.wait import eventually

pytestmark = pytest.mark.timeout(60)

CHANNEL = "h:faults"


class FlakyLog(MemoryEventLog):
    """The memory event log; reads matching `failing` raise StorageError (storage down)."""

    def __init__(self) -> None:
        self.clock = time.time()
        super().__init__(now=lambda: self.clock)
        self.failing: Callable[[HistoryQuery], bool] | None = None
        self.refused = 0

    async def history(self, query: HistoryQuery) -> HistoryResult:
        if self.failing is not None and self.failing(query):
            self.refused += 1
            raise StorageError("event log is down")
        return await super().history(query)


class Setup:
    def __init__(self, log: FlakyLog, node: Node, hub: Hub, ctx: ConnContext) -> None:
        self.log, self.node, self.hub, self.ctx = log, node, hub, ctx

    async def client(self) -> Client:
        client = Client(self.ctx)
        reply = await client.call("connect", {})
        assert "connect" in reply, reply
        return client


@pytest.fixture
async def setup() -> AsyncIterator[Setup]:
    url = redis_url()  # skips (or fails under CI) without Redis
    log = FlakyLog()
    await log.start()
    writer = GroupCommitWriter(log)
    await writer.start()
    config = make_config(allow_anonymous_connect_without_token=True)
    node = Node(config, log, writer.submit_many, MemoryPresence())
    broker = RedisBroker([url], prefix=f"t{uuid.uuid4().hex[:12]}", io_timeout=2.0)
    hub = Hub(node, broker)
    node.attach_fanout(hub)
    node.attach_broker(broker)
    await broker.start(node.uid, _NoHandler())
    yield Setup(log, node, hub, ConnContext(config, node, hub, TokenVerifier(config)))
    await hub.shutdown(1.0)
    await broker.close()
    await writer.close()
    await log.close()


class _NoHandler:
    """Nothing arrives from other nodes in these tests (a node alone on its broker)."""

    def on_publication(self, *_args: Any) -> None: ...

    def on_join(self, *_args: Any) -> None: ...

    def on_leave(self, *_args: Any) -> None: ...

    def on_control(self, *_args: Any) -> None: ...

    def on_reconnect(self) -> None: ...


async def test_a_subscribe_whose_stream_top_read_fails_can_be_retried(setup: Setup) -> None:
    client = await setup.client()
    setup.log.failing = lambda _query: True
    reply = await client.call("subscribe", {"channel": CHANNEL})
    assert reply["error"]["code"] == 100 and reply["error"].get("temporary") is True, reply
    assert setup.hub.channels() == {}  # nothing counted, no actor left behind

    setup.log.failing = None
    reply = await client.call("subscribe", {"channel": CHANNEL})
    assert "subscribe" in reply, reply  # not 105: the failed one left nothing recorded
    assert setup.hub.channels() == {CHANNEL: 1}
    await setup.node.publish(CHANNEL, b'{"n":1}')
    await eventually(lambda: [p["offset"] for p in client.pubs(CHANNEL)] == [1], 5, "delivery")


async def test_a_second_subscriber_failing_its_subscribe_leaves_the_first_alone(
    setup: Setup,
) -> None:
    first = await setup.client()
    assert "subscribe" in await first.call("subscribe", {"channel": CHANNEL})
    second = await setup.client()
    setup.log.failing = lambda _query: True
    positioned = {"channel": CHANNEL, "positioned": True}  # reads the stream top
    reply = await second.call("subscribe", positioned)
    assert reply["error"]["code"] == 100, reply
    assert setup.hub.channels() == {CHANNEL: 1}
    setup.log.failing = None
    await setup.node.publish(CHANNEL, b'{"n":1}')
    await eventually(lambda: len(first.pubs(CHANNEL)) == 1, 5, "delivery to the first")
    reply = await second.call("subscribe", positioned)
    assert reply["subscribe"]["offset"] == 1, reply
    assert setup.hub.channels() == {CHANNEL: 2}


def _request(data: bytes) -> AppendRequest:
    return AppendRequest(CHANNEL, data, history_size=100, history_ttl=300.0, meta_ttl=300.0)


async def test_a_gap_fill_whose_second_read_fails_keeps_the_actor_and_fills_later(
    setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(channel_module, "RETRY_DELAY", 0.1)
    log = setup.log
    await log.append_many([_request(b'{"n":1}')])
    ref = SequencedChannelActor.start(CHANNEL, setup.node)
    sub_ref, sub = Recorder.start_recorder()
    await ref.ask(Init(), block=False)
    await ref.ask(AddSubscriber("c1", sub_ref, False), block=False)
    # The stream is forgotten and re-created (new epoch): a read since the old position
    # answers 112, and the second read, of the whole new stream, fails.
    log.clock += 2592000.0 + 1  # global_history_meta_ttl
    await log.gc()
    await log.append_many([_request(b'{"n":1}'), _request(b'{"n":2}')])
    log.failing = lambda query: query.since is None and query.limit == -1
    ref.tell(Resync())
    await eventually(lambda: log.refused >= 1, 5, "the second read refused")
    assert ref.is_alive()
    log.failing = None
    await eventually(lambda: len(sub.of(Deliver)) == 2, 5, "the new stream delivered")
    assert [m.pub.offset for m in sub.of(Deliver)] == [1, 2]
    assert len(sub.of(Insufficient)) == 1  # the epoch changed: positioned subscribers resync
    assert ref.is_alive()
    ref.stop(block=False)
