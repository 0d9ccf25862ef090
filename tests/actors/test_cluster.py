"""`actors/cluster.py` with a real broker: two nodes in one process, each with its own node,
hub, `RedisBroker` and `ClusterLink`, sharing one event log (as nodes share a database).

What the link does: publications and join/leave from the other node reach the local channel
actors (sequenced against the log), heartbeats fill the node registry behind `info` and
`channels`, user commands (`ClusterSessions`) act here and on the other node, undecodable
control messages are ignored. Redis runs on 127.0.0.1:6379; without it the tests skip (and
fail under CI=true)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from centripy.actors.channel import Deliver, JoinLeave
from centripy.actors.cluster import ClusterLink, ClusterSessions
from centripy.actors.connection_core import Frame
from centripy.actors.hub import Hub, ServerDisconnectMsg, ServerUnsubscribeMsg
from centripy.engine.node import Node
from centripy.engine.sessions import DisconnectCommand, UnsubscribeCommand
from centripy.engine.types import ClientInfo
from centripy.storage.broker_redis import RedisBroker
from centripy.storage.memory import MemoryEventLog
from centripy.storage.presence_memory import MemoryPresence
from centripy.storage.writer import GroupCommitWriter
from tests.actors.harness import Recorder, make_config
from tests.support.services import redis_url
from tests.support.wait import eventually

pytestmark = pytest.mark.timeout(60)

WAIT = 10.0


@dataclass
class Member:
    node: Node
    hub: Hub
    link: ClusterLink
    sessions: ClusterSessions
    writer: GroupCommitWriter


@pytest.fixture
async def cluster() -> AsyncIterator[tuple[Member, Member]]:
    url = redis_url()  # skips (or fails under CI) without Redis
    prefix = f"t{uuid.uuid4().hex[:12]}"
    log = MemoryEventLog()
    await log.start()
    members = []
    for name in ("a", "b"):
        writer = GroupCommitWriter(log)
        await writer.start()
        node = Node(make_config(name=name), log, writer.submit_many, MemoryPresence())
        broker = RedisBroker([url], prefix=prefix, io_timeout=2.0)
        hub = Hub(node, broker)
        node.attach_fanout(hub)
        node.attach_broker(broker)
        link = ClusterLink(node, hub, broker)
        await link.start()
        members.append(Member(node, hub, link, ClusterSessions(link), writer))
    yield members[0], members[1]
    for member in members:
        await member.hub.shutdown(0.1)
        await member.link.close()
        await member.writer.close()
    await log.close()


async def test_a_publication_on_one_node_reaches_subscribers_on_the_other(
    cluster: tuple[Member, Member],
) -> None:
    a, b = cluster
    ref, sub = Recorder.start_recorder()
    await b.hub.subscribe("h:room", "c1", ref, True)
    for n in range(1, 4):
        await a.node.publish("h:room", f'{{"n":{n}}}'.encode())
    await eventually(lambda: len(sub.of(Deliver)) == 3, WAIT, "three publications on b")
    assert [m.pub.offset for m in sub.of(Deliver)] == [1, 2, 3]
    assert [m.pub.data for m in sub.of(Deliver)] == [b'{"n":1}', b'{"n":2}', b'{"n":3}']

    # a publication without history (no offset) goes through too
    await b.hub.subscribe("news", "c1", ref, False)
    await a.node.publish("news", b'{"plain":true}')
    await eventually(lambda: len(sub.of(Deliver)) == 4, WAIT, "the plain publication on b")
    assert sub.of(Deliver)[-1].pub.data == b'{"plain":true}'


async def test_join_and_leave_cross_nodes(cluster: tuple[Member, Member]) -> None:
    a, b = cluster
    ref, sub = Recorder.start_recorder()
    await b.hub.subscribe("h:room", "c1", ref, True)
    info = ClientInfo("42", "remote-client")
    a.node.join("h:room", info)
    a.node.leave("h:room", info)
    await eventually(lambda: len(sub.of(JoinLeave)) == 2, WAIT, "join and leave on b")
    assert [(m.join, m.info.client) for m in sub.of(JoinLeave)] == [
        (True, "remote-client"),
        (False, "remote-client"),
    ]


async def test_heartbeats_make_each_node_known_to_the_other(
    cluster: tuple[Member, Member],
) -> None:
    a, b = cluster
    ref, _ = Recorder.start_recorder()
    await b.hub.subscribe("h:room", "c1", ref, False)
    b.hub.add_connection("c1", "alice", "", ref)
    uids = {a.node.uid, b.node.uid}
    await eventually(lambda: {n.uid for n in a.sessions.nodes()} == uids, WAIT, "a knows b")
    await eventually(lambda: {n.uid for n in b.sessions.nodes()} == uids, WAIT, "b knows a")
    assert {n.name for n in a.sessions.nodes()} == {"a", "b"}
    # b's channels and stats are in its local info at once, and in a's registry by a beat
    assert b.sessions.channels() == {"h:room": 1}
    assert b.sessions.stats().num_clients == 1


async def test_user_commands_act_here_and_on_the_other_node(
    cluster: tuple[Member, Member],
) -> None:
    a, b = cluster
    here_ref, here = Recorder.start_recorder()
    there_ref, there = Recorder.start_recorder()
    kept_ref, kept = Recorder.start_recorder()
    a.hub.add_connection("here", "alice", "", here_ref)
    b.hub.add_connection("there", "alice", "", there_ref)
    b.hub.add_connection("kept", "alice", "", kept_ref)

    await a.sessions.unsubscribe(UnsubscribeCommand("alice", "h:room"))
    await a.sessions.disconnect(DisconnectCommand("alice", 4000, "bye", whitelist=("kept",)))
    await eventually(lambda: there.of(ServerDisconnectMsg), WAIT, "the remote disconnect")
    assert here.of(ServerUnsubscribeMsg) == [ServerUnsubscribeMsg("h:room")]
    assert here.of(ServerDisconnectMsg) == [ServerDisconnectMsg(4000, "bye")]
    assert there.of(ServerUnsubscribeMsg) == [ServerUnsubscribeMsg("h:room")]
    assert there.of(ServerDisconnectMsg) == [ServerDisconnectMsg(4000, "bye")]
    # the whitelisted connection got the unsubscribe (told before), never the disconnect
    assert kept.of(ServerUnsubscribeMsg) and not kept.of(ServerDisconnectMsg)


async def test_an_emulation_request_is_forwarded_to_the_sessions_node(
    cluster: tuple[Member, Member],
) -> None:
    a, b = cluster
    ref, conn = Recorder.start_recorder()
    b.hub.add_connection("c1", "alice", "sess-b", ref)
    data = b'{"subscribe":{"channel":"c"},"id":2}'
    assert await a.link.forward_emulation(b.node.uid, "sess-b", data) == 204
    assert [f.data for f in conn.of(Frame)] == [data]  # told before the reply was sent
    assert await a.link.forward_emulation(b.node.uid, "no-such-session", b"{}") == 204
    assert len(conn.of(Frame)) == 1
    for bogus in ("", ">", "a b", "centripy.node.*"):  # no node uid: 404 at once
        assert await a.link.forward_emulation(bogus, "sess-b", b"{}", timeout=30) == 404
    gone = str(uuid.uuid4())
    assert await a.link.forward_emulation(gone, "sess-b", b"{}", timeout=0.3) == 404
    await eventually(lambda: b.node.uid in {n.uid for n in a.sessions.nodes()}, WAIT)
    b.link.on_control = lambda data: None  # type: ignore[method-assign]  # b stops answering
    assert await a.link.forward_emulation(b.node.uid, "sess-b", b"{}", timeout=0.3) == 500


async def test_undecodable_control_messages_are_ignored(cluster: tuple[Member, Member]) -> None:
    a, b = cluster
    for junk in (b"", b"not json", b'{"type":"martian"}', b"\xff\xfe"):
        a.link.on_control(junk)  # logged, not raised
    ref, sub = Recorder.start_recorder()
    await a.hub.subscribe("h:room", "c1", ref, False)
    await b.node.publish("h:room", b"{}")  # the link still works
    await eventually(lambda: sub.of(Deliver), WAIT, "a publication after the junk")
