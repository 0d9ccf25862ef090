"""The hub (`actors/hub.py`), single node: subscriber counts and the channel actor's lifecycle,
the user and session maps behind the server API, stats, fan-out through it, replacement of a
channel actor that stopped, and shutdown. Connections are recording loop-driven actors."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from centripy.actors.channel import ChannelActor, Deliver, JoinLeave
from centripy.actors.hub import Hub, ServerDisconnectMsg, SessionsAdapter, Shutdown
from centripy.engine.sessions import DisconnectCommand, NodeStats
from centripy.engine.types import ClientInfo, Publication
from tests.actors.harness import Harness, Recorder, make_config
from tests.support.wait import eventually

pytestmark = pytest.mark.timeout(30)

INFO = ClientInfo("42", "c1")


def channel_ref(hub: Hub, channel: str) -> Any:
    return hub._channels[channel]


async def test_subscribe_counts_and_one_channel_actor_until_the_last_unsubscribe() -> None:
    hub = Hub()
    a_ref, _ = Recorder.start_recorder()
    b_ref, _ = Recorder.start_recorder()
    await hub.subscribe("news", "a", a_ref, False)
    actor = channel_ref(hub, "news")
    await hub.subscribe("news", "b", b_ref, False)
    await hub.subscribe("sport", "a", a_ref, False)
    assert channel_ref(hub, "news") is actor and actor.is_alive()
    assert hub.channels() == {"news": 2, "sport": 1}
    assert hub.stats() == NodeStats(num_clients=0, num_users=0, num_channels=2, num_subs=3)

    hub.unsubscribe("news", "a")
    assert hub.channels() == {"news": 1, "sport": 1} and channel_ref(hub, "news") is actor
    hub.unsubscribe("news", "b")
    assert hub.channels() == {"sport": 1}
    await eventually(lambda: not actor.is_alive(), 5, "the news actor stopped")
    hub.unsubscribe("news", "b")  # an unknown channel: nothing happens
    hub.deliver("news", Publication(b"{}", 0), "")  # no local subscriber: dropped
    assert hub.stats().num_channels == 1

    await hub.subscribe("news", "a", a_ref, False)  # a new actor for a new first subscriber
    assert channel_ref(hub, "news") is not actor and channel_ref(hub, "news").is_alive()
    await hub.shutdown(0.1)


async def test_deliver_join_and_leave_reach_subscribers_through_their_channel_actor() -> None:
    hub = Hub()
    a_ref, a = Recorder.start_recorder()
    b_ref, b = Recorder.start_recorder()
    await hub.subscribe("news", "a", a_ref, True)
    await hub.subscribe("news", "b", b_ref, False)
    hub.join("news", INFO)
    hub.deliver("news", Publication(b'{"n":1}', 1), "ep")
    hub.leave("news", INFO)
    hub.deliver("news", Publication(b'{"n":2}', 2), "ep")
    await eventually(lambda: len(a.got) == 4 and len(b.got) == 2, 5, "all fan-out")
    kinds = [("pub", m.pub.offset) if type(m) is Deliver else m.join for m in a.got]
    assert kinds == [True, ("pub", 1), False, ("pub", 2)]
    assert [m.pub.offset for m in b.got] == [1, 2]
    assert all(type(m) is Deliver and m.epoch == "ep" for m in b.got)
    assert not b.of(JoinLeave)


class Writer(Recorder):
    """A recorder that counts its runs, as a connection writes once per run (on_drained)."""

    def __init__(self) -> None:
        super().__init__()
        self.runs: list[list[int]] = []  # the offsets each run brought

    def on_drained(self) -> None:
        offsets = [m.pub.offset for m in self.got if type(m) is Deliver]
        done = sum(map(len, self.runs))
        if len(offsets) > done:
            self.runs.append(offsets[done:])


def start_writer() -> tuple[Any, Writer]:
    ref = Writer.start()
    actor = ref.actor_inbox._actor
    assert isinstance(actor, Writer)
    return ref, actor


async def test_publications_of_one_loop_turn_reach_each_subscriber_in_one_run() -> None:
    """What one commit fans out (several publications, several channels, no await in
    between) reaches each subscriber in order and in one run, i.e. one write."""
    hub = Hub()
    a_ref, a = start_writer()
    b_ref, b = start_writer()
    await hub.subscribe("news", "a", a_ref, False)
    await hub.subscribe("news", "b", b_ref, False)
    await hub.subscribe("sport", "b", b_ref, False)
    await asyncio.sleep(0)  # the subscriptions are in place
    for offset in (1, 2, 3):
        hub.deliver("news", Publication(b"{}", offset), "ep")
    hub.deliver("sport", Publication(b"{}", 7), "ep")
    await eventually(lambda: sum(map(len, b.runs)) == 4, 5, "all delivered")
    assert a.runs == [[1, 2, 3]]
    assert [m.pub.offset for m in b.got] == [1, 2, 3, 7]
    assert sorted(b.runs) == [[1, 2, 3], [7]]  # one run per channel at most

    hub.deliver("news", Publication(b"{}", 4), "ep")  # a later turn: a run of its own
    await eventually(lambda: a.runs == [[1, 2, 3], [4]], 5, "the next run")


async def test_a_subscriber_added_between_two_deliveries_gets_only_the_second() -> None:
    """The channel's inbox order holds while the hub has its actor in hand: a subscriber
    added after publication 1 (same loop turn) gets publication 2 and not 1."""
    hub = Hub()
    a_ref, a = Recorder.start_recorder()
    c_ref, c = Recorder.start_recorder()
    await hub.subscribe("news", "a", a_ref, False)
    await asyncio.sleep(0)
    hub.deliver("news", Publication(b"{}", 1), "ep")
    await hub.subscribe("news", "c", c_ref, False)  # no await inside without a broker
    hub.deliver("news", Publication(b"{}", 2), "ep")
    hub.unsubscribe("news", "a")
    hub.deliver("news", Publication(b"{}", 3), "ep")
    await eventually(lambda: len(c.got) == 2, 5, "c got 2 and 3")
    assert [m.pub.offset for m in c.got] == [2, 3]
    assert [m.pub.offset for m in a.got] == [1, 2]


async def test_connections_by_user_and_session() -> None:
    hub = Hub()
    refs = {name: Recorder.start_recorder() for name in ("c1", "c2", "c3")}
    hub.add_connection("c1", "alice", "s1", refs["c1"][0])
    hub.add_connection("c2", "alice", "", refs["c2"][0])
    hub.add_connection("c3", "bob", "s3", refs["c3"][0])
    assert hub.user_connection_count("alice") == 2 and hub.user_connection_count("nobody") == 0
    assert hub.by_session("s1") is refs["c1"][0] and hub.by_session("s2") is None
    assert hub.stats() == NodeStats(num_clients=3, num_users=2, num_channels=0, num_subs=0)
    assert set(hub.connections()) == {ref for ref, _ in refs.values()}

    def ids(conns: list[Any]) -> set[str]:
        return {c.client_id for c in conns}

    assert ids(hub.matching("alice", "", "")) == {"c1", "c2"}
    assert ids(hub.matching("alice", "", "s1")) == {"c1"}
    assert ids(hub.matching("", "c3", "")) == {"c3"}
    assert ids(hub.matching("alice", "c3", "")) == set()  # the client is not alice's
    assert ids(hub.matching("carol", "", "")) == set()

    # the Sessions adapter acts on exactly the matching connections
    sessions = SessionsAdapter(hub, Harness(make_config()).node)
    await sessions.disconnect(DisconnectCommand("alice", 4000, "bye", whitelist=("c2",)))
    await eventually(lambda: refs["c1"][1].of(ServerDisconnectMsg), 5, "c1 told")
    assert refs["c1"][1].of(ServerDisconnectMsg) == [ServerDisconnectMsg(4000, "bye")]
    await hub.shutdown(0.0)  # a marker every connection gets, after the disconnect
    await eventually(lambda: all(r.of(Shutdown) for _, r in refs.values()), 5, "shutdown")
    assert not refs["c2"][1].of(ServerDisconnectMsg)  # whitelisted
    assert not refs["c3"][1].of(ServerDisconnectMsg)  # another user

    hub.remove_connection("c1")
    hub.remove_connection("c1")  # twice: harmless
    assert hub.user_connection_count("alice") == 1 and hub.by_session("s1") is None
    hub.remove_connection("c2")
    assert hub.stats() == NodeStats(num_clients=1, num_users=1, num_channels=0, num_subs=0)


async def test_tell_skips_connections_whose_actor_stopped() -> None:
    hub = Hub()
    dead_ref, _ = Recorder.start_recorder()
    live_ref, live = Recorder.start_recorder()
    hub.add_connection("dead", "u", "", dead_ref)
    hub.add_connection("live", "u", "", live_ref)
    await dead_ref.stop(block=False)
    hub.tell(hub.matching("u", "", ""), ServerDisconnectMsg(3000, "x"))
    await eventually(lambda: live.got, 5, "the live connection was told")


async def test_a_stopped_channel_actor_is_replaced_with_its_subscribers() -> None:
    hub = Hub()
    ref, sub = Recorder.start_recorder()
    await hub.subscribe("news", "a", ref, False)
    old = channel_ref(hub, "news")
    hub.deliver("news", Publication(b"{}", 1), "")
    await eventually(lambda: len(sub.got) == 1, 5, "delivery by the first actor")
    await old.stop(block=False)
    assert not old.is_alive()

    hub.deliver("news", Publication(b"{}", 2), "")
    new = channel_ref(hub, "news")
    assert new is not old and new.is_alive()
    await eventually(lambda: len(sub.got) == 2, 5, "delivery by the replacement")
    assert [m.pub.offset for m in sub.got] == [1, 2]
    assert hub.channels() == {"news": 1}
    actor = new.actor_inbox._actor
    assert isinstance(actor, ChannelActor) and set(actor.subscribers) == {"a"}
    hub.unsubscribe("news", "a")
    await eventually(lambda: not new.is_alive(), 5, "the replacement stopped")


async def test_shutdown_waits_for_connections_to_leave_but_is_bounded() -> None:
    hub = Hub()
    for i in range(3):
        client_id = f"c{i}"
        ref, _ = Recorder.start_recorder(lambda c=client_id: hub.remove_connection(c))
        hub.add_connection(client_id, "u", "", ref)
    started = time.monotonic()
    await hub.shutdown(5.0)
    assert hub.stats().num_clients == 0 and time.monotonic() - started < 4.0

    stuck_ref, stuck = Recorder.start_recorder()  # told, but never leaves
    hub.add_connection("stuck", "u", "", stuck_ref)
    started = time.monotonic()
    await hub.shutdown(0.2)
    assert 0.15 <= time.monotonic() - started < 2.0
    assert stuck.of(Shutdown) and hub.stats().num_clients == 1
    await asyncio.sleep(0)
