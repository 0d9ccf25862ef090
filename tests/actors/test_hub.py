"""The hub (`actors/hub.py`), single node: subscriber counts and the channel actor's lifecycle,
the user and session maps behind the server API, stats, fan-out through it, replacement of a
channel actor that stopped, and shutdown. Connections are recording loop-driven actors."""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any, cast

import pytest

from centripy.actors.base import actor_of
from centripy.actors.channel import AddSubscriber, ChannelActor, Deliver, JoinLeave
from centripy.actors.hub import Coalescing, Hub, ServerDisconnectMsg, SessionsAdapter, Shutdown
from centripy.engine.contracts import Broker
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


async def publish_paced(hub: Hub, channel: str, offsets: range, pause: float) -> None:
    for offset in offsets:
        hub.deliver(channel, Publication(b"{}", offset), "ep")
        await asyncio.sleep(pause)


class SlowWriter(Writer):
    """A writer whose every write costs `cost` seconds of the loop (thousands of sockets)."""

    cost = 0.0

    def on_drained(self) -> None:
        super().on_drained()
        until = time.monotonic() + self.cost
        while time.monotonic() < until:
            pass


async def written_once(
    hub: Hub, channel: str = "news", cost: float = 0.0
) -> tuple[Hub, SlowWriter]:
    """`hub` with one subscriber to `channel` (whose writes cost `cost` s) that has just
    written publication 0 (a channel never written before is not held), so that the next
    publication finds it saturated."""
    ref = SlowWriter.start()
    writer = actor_of(ref)
    assert isinstance(writer, SlowWriter)
    writer.cost = cost
    await hub.subscribe(channel, f"{channel}-subscriber", ref, False)
    await asyncio.sleep(0)
    hub.deliver(channel, Publication(b"{}", 0), "ep")
    await eventually(lambda: writer.runs == [[0]], 5, "the first run")
    return hub, writer


async def test_a_saturated_channel_writes_once_its_publications_pause() -> None:
    """A publication that comes soon (`after`) after its channel's subscribers wrote was
    waiting behind that write: the channel's fan-out is held, and later publications join
    it, until none came for `gap`; then each subscriber writes them all at once."""
    hub = Hub(coalescing=Coalescing(after=5.0, gap=0.4, limit=30.0))
    a_ref, a = start_writer()
    b_ref, b = start_writer()
    await hub.subscribe("news", "a", a_ref, False)
    await hub.subscribe("news", "b", b_ref, False)
    await hub.subscribe("sport", "b", b_ref, False)
    await asyncio.sleep(0)
    hub.deliver("news", Publication(b"{}", 1), "ep")  # never written before: at once
    await eventually(lambda: a.runs == [[1]], 5, "the first run")

    hub.deliver("sport", Publication(b"{}", 9), "ep")  # not saturated: not held
    await publish_paced(hub, "news", range(2, 6), 0.05)  # each within the gap
    paused = time.monotonic()
    assert a.runs == [[1]]  # news is held
    assert [9] in b.runs
    await eventually(lambda: len(a.runs) == 2, 5, "news's held run")
    assert time.monotonic() - paused >= 0.2  # the gap, from the last publication
    assert a.runs == [[1], [2, 3, 4, 5]]
    # b, held by sport's fan-out when 2 came, wrote 2 after 9, alone: same order
    assert [m.pub.offset for m in b.got] == [1, 9, 2, 3, 4, 5]


async def test_a_channel_not_saturated_writes_in_the_next_loop_iteration() -> None:
    """A publication long (`after`) after its channel's last write is not held."""
    hub = Hub(coalescing=Coalescing(after=0.2, gap=20.0, limit=30.0))
    a_ref, a = start_writer()
    await hub.subscribe("news", "a", a_ref, False)
    await asyncio.sleep(0)
    for offset in (1, 2, 3):
        await asyncio.sleep(0.3)
        started = time.monotonic()
        hub.deliver("news", Publication(b"{}", offset), "ep")
        await eventually(lambda o=offset: len(a.runs) == o, 5, "a run of its own")
        assert time.monotonic() - started < 5.0  # not held for the 20 s gap
    assert a.runs == [[1], [2], [3]]


async def test_a_hold_ends_at_its_limit_while_publications_keep_coming() -> None:
    hub, a = await written_once(Hub(coalescing=Coalescing(after=5.0, gap=2.0, limit=0.3)))
    started = time.monotonic()
    await publish_paced(hub, "news", range(1, 25), 0.05)  # 1.2 s, never a 2 s pause
    assert len(a.runs) >= 3  # cut at the 0.3 s limit, not held for the whole burst
    await eventually(lambda: sum(map(len, a.runs)) == 25, 10, "everything written")
    assert [o for run in a.runs for o in run] == list(range(25))
    assert time.monotonic() - started < 1.2 + 2.0 + 5.0


async def test_a_hold_lasts_as_long_as_the_last_write_when_that_took_longer() -> None:
    """Writing a channel's fan-out took longer than the limit: holding the next ones as long
    adds no more than that write did, and each subscriber writes several at once."""
    hub, slow = await written_once(Hub(coalescing=Coalescing(5.0, 2.0, 0.02)), cost=0.3)
    await publish_paced(hub, "news", range(1, 13), 0.05)  # 0.6 s
    await eventually(lambda: sum(map(len, slow.runs)) == 13, 10, "everything written")
    assert [o for run in slow.runs for o in run] == list(range(13))
    assert max(map(len, slow.runs[1:])) >= 4, slow.runs  # not cut at the 20 ms limit


async def test_the_gap_of_a_slow_channels_hold_is_a_share_of_its_write_round() -> None:
    """Publications 60 ms apart, well past the 2 ms gap: after a write round of 1 s, the gap
    is 10% of that round (100 ms), so they are held together, not written one per round."""
    hub, slow = await written_once(Hub(coalescing=Coalescing(5.0, 0.002, 0.02, 0.1)), cost=1.0)
    await publish_paced(hub, "news", range(1, 6), 0.06)
    await eventually(lambda: sum(map(len, slow.runs)) == 6, 10, "everything written")
    assert slow.runs == [[0], [1, 2, 3, 4, 5]]


async def test_a_slow_write_of_another_channel_does_not_lengthen_a_hold() -> None:
    hub, a = await written_once(Hub(coalescing=Coalescing(after=5.0, gap=2.0, limit=0.05)))
    await written_once(hub, "big", cost=0.5)  # one write round of 0.5 s
    await publish_paced(hub, "news", range(1, 21), 0.02)  # 0.4 s
    await eventually(lambda: sum(map(len, a.runs)) == 21, 10, "everything written")
    assert [o for run in a.runs for o in run] == list(range(21))
    assert len(a.runs) >= 5  # cut at news's own 50 ms limit, not held for 0.5 s


async def test_nothing_is_held_on_several_nodes() -> None:
    """With a broker the hub holds nothing (see Hub.__init__): each publication is written
    in its own run however soon it follows the last write."""
    hub = Hub(broker=cast(Broker, object()), coalescing=Coalescing(5.0, 30.0, 60.0))
    ref, writer = start_writer()
    channel = ChannelActor.start("news")  # as subscribe makes it, without the broker's part
    hub._channels["news"], hub._channel_subs["news"] = channel, 1
    channel.tell(AddSubscriber("a", ref, False))
    await asyncio.sleep(0)
    for offset in range(3):
        hub.deliver("news", Publication(b"{}", offset), "ep")
        await eventually(lambda o=offset: len(writer.runs) == o + 1, 5, "a run of its own")
    assert writer.runs == [[0], [1], [2]]


async def test_held_and_not_held_fan_outs_keep_each_channel_in_order() -> None:
    """Publications, join/leave and new subscribers to two channels at random paces, some
    held and some not: each subscriber gets each channel's publications in order, once."""
    rng = random.Random(20)
    hub = Hub(coalescing=Coalescing(after=0.004, gap=0.003, limit=0.02))
    writers = [start_writer() for _ in range(4)]
    channels = ("a", "b")
    for ref, _ in writers[:2]:
        for channel in channels:
            await hub.subscribe(channel, str(id(ref)), ref, True)
    await asyncio.sleep(0)
    offsets = dict.fromkeys(channels, 0)
    for step in range(400):
        channel = rng.choice(channels)
        offsets[channel] += 1
        hub.deliver(channel, Publication(channel.encode(), offsets[channel]), "ep")
        if step % 97 == 0:
            hub.join(channel, INFO)
        if step == 200:
            late = (channel, offsets[channel])
            for ref, _ in writers[2:]:
                await hub.subscribe(channel, str(id(ref)), ref, False)
        pause = rng.choice((0, 0, 0.0005, 0.002, 0.006))
        await asyncio.sleep(pause)

    def got(writer: Writer, channel: str) -> list[int]:
        return [m.pub.offset for m in writer.of(Deliver) if m.channel == channel]

    await eventually(
        lambda: all(got(w, c)[-1:] == [offsets[c]] for _, w in writers[:2] for c in channels),
        10,
        "every publication written",
    )
    for _, writer in writers[:2]:
        for channel in channels:
            assert got(writer, channel) == list(range(1, offsets[channel] + 1))
    channel, before = late
    for _, writer in writers[2:]:
        assert got(writer, channel) == list(range(before + 1, offsets[channel] + 1))
    await hub.shutdown(0.1)


async def test_shutdown_writes_a_held_fan_out_at_once() -> None:
    hub, a = await written_once(Hub(coalescing=Coalescing(after=5.0, gap=30.0, limit=60.0)))
    hub.deliver("news", Publication(b"{}", 1), "ep")  # held for the 30 s gap
    await asyncio.sleep(0.05)
    assert a.runs == [[0]]
    await hub.shutdown(0.1)
    await eventually(lambda: a.runs == [[0], [1]], 5, "the held run, at shutdown")


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
