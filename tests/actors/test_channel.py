"""The channel actor (`actors/channel.py`) on its own: its subscriber set, one encoding per
wire format for all subscribers, join/leave only to subscribers that asked for them, and
subscribers whose actor has stopped are dropped. Subscribers are real loop-driven actors that
record what they are told (each reads the encoding of its own format, as a connection does)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from pykka import ActorRef

import centripy.actors.channel as channel_module
from centripy.actors.base import LoopActor, actor_of
from centripy.actors.channel import (
    NOT_JSON,
    AddSubscriber,
    ChannelActor,
    Deliver,
    Encoded,
    JoinLeave,
    RemoveSubscriber,
    encoded_pub,
)
from centripy.actors.transport import Format, protobuf_codec
from centripy.engine.protocol import json_codec
from centripy.engine.types import ClientInfo, Publication
from tests.support.wait import eventually

pytestmark = pytest.mark.timeout(30)

CHANNEL = "news"
ALEX = ClientInfo("42", "client-a", b'{"name":"Alex"}')


class Subscriber(LoopActor):
    """Records (kind, bytes of its format) for every Deliver and JoinLeave it is told."""

    inline = True  # as ConnectionActor: the channel's InlineFanOut may hand it messages inline

    def __init__(self, fmt: Format = Format.JSON) -> None:
        super().__init__()
        self.fmt = fmt
        self.got: list[tuple[str, bytes]] = []

    def on_receive(self, message: Any) -> Any:
        if type(message) is Deliver:
            self.got.append(("pub", message.encoded.get(self.fmt)))
        elif type(message) is JoinLeave:
            kind = "join" if message.join else "leave"
            self.got.append((kind, message.encoded.get(self.fmt)))


def recorder(ref: ActorRef[Any]) -> Subscriber:
    actor = actor_of(ref)
    assert isinstance(actor, Subscriber)
    return actor


def start_subscriber(fmt: Format = Format.JSON) -> tuple[ActorRef[Any], Subscriber]:
    ref = Subscriber.start(fmt)
    return ref, recorder(ref)


def pub(n: int) -> Publication:
    return Publication(json.dumps({"n": n}).encode(), n)


def pushed_data(raw: bytes) -> Any:
    return json.loads(raw)["push"]["pub"]["data"]


async def subscribers_of(ref: ActorRef[Any]) -> set[str]:
    """The channel's subscriber ids once every message told before has been handled (an
    `ask` is answered in inbox order)."""
    await ref.ask(RemoveSubscriber("-nobody-"), block=False)
    actor = actor_of(ref)
    assert isinstance(actor, ChannelActor)
    return set(actor.subscribers)


@pytest.fixture
async def channel() -> AsyncIterator[ActorRef[Any]]:
    ref = ChannelActor.start(CHANNEL)
    yield ref
    ref.stop(block=False)


async def test_added_subscribers_get_deliveries_and_removed_ones_stop_getting_them(
    channel: ActorRef[Any],
) -> None:
    a_ref, a = start_subscriber()
    b_ref, b = start_subscriber()
    channel.tell(AddSubscriber("a", a_ref, False))
    channel.tell(AddSubscriber("b", b_ref, False))
    assert await subscribers_of(channel) == {"a", "b"}
    channel.tell(Deliver(CHANNEL, pub(1), "ep"))
    await eventually(lambda: len(a.got) == 1 and len(b.got) == 1, 5, "both got pub 1")
    assert pushed_data(a.got[0][1]) == pushed_data(b.got[0][1]) == {"n": 1}

    channel.tell(RemoveSubscriber("a"))
    channel.tell(Deliver(CHANNEL, pub(2), "ep"))
    await eventually(lambda: len(b.got) == 2, 5, "b got pub 2")
    # pub 2 reached b, so it was fanned out after the removal: a must not have it
    assert [pushed_data(raw) for _, raw in a.got] == [{"n": 1}]
    assert [pushed_data(raw) for _, raw in b.got] == [{"n": 1}, {"n": 2}]
    assert await subscribers_of(channel) == {"b"}
    channel.tell(RemoveSubscriber("unknown"))  # removing an absent subscriber is harmless
    assert await subscribers_of(channel) == {"b"}
    for ref in (a_ref, b_ref):
        ref.stop(block=False)


async def test_deliveries_keep_the_inbox_order(channel: ActorRef[Any]) -> None:
    ref, sub = start_subscriber()
    channel.tell(AddSubscriber("a", ref, False))
    for n in range(1, 51):
        channel.tell(Deliver(CHANNEL, pub(n), "ep"))
    await eventually(lambda: len(sub.got) == 50, 5, "50 publications")
    assert [pushed_data(raw)["n"] for _, raw in sub.got] == list(range(1, 51))
    ref.stop(block=False)


class Counting:
    """Wraps an encoder function and counts its calls."""

    def __init__(self, func: Any) -> None:
        self.func = func
        self.calls: list[dict[str, Any]] = []

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls.append(kwargs)
        return self.func(*args, **kwargs)


class CountingProtobuf:
    """The real protobuf codec, with its publication encoder counted."""

    def __init__(self) -> None:
        self.codec = protobuf_codec()
        self.encode_pub_push = Counting(self.codec.encode_pub_push)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.codec, name)


async def test_a_publication_is_encoded_once_per_wire_format_whatever_the_subscribers(
    channel: ActorRef[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    json_encode = Counting(json_codec.encode_pub_push)
    monkeypatch.setattr(json_codec, "encode_pub_push", json_encode)
    protobuf = CountingProtobuf()
    monkeypatch.setattr(channel_module, "protobuf_codec", lambda: protobuf)

    formats = [Format.JSON] * 4 + [Format.JSON_UNI] * 2 + [Format.PROTOBUF] * 3
    subs = [start_subscriber(fmt) for fmt in formats]
    for i, (ref, _) in enumerate(subs):
        channel.tell(AddSubscriber(f"c{i}", ref, False))
    channel.tell(Deliver(CHANNEL, pub(7), "ep"))
    await eventually(lambda: all(len(s.got) == 1 for _, s in subs), 5, "every subscriber")

    assert sorted(call.get("unidirectional") for call in json_encode.calls) == [False, True]
    assert len(protobuf.encode_pub_push.calls) == 1
    by_format: dict[Format, set[int]] = {}
    for _, sub in subs:
        by_format.setdefault(sub.fmt, set()).add(id(sub.got[0][1]))
    # one shared bytes object per format, not a copy per subscriber
    assert {fmt: len(ids) for fmt, ids in by_format.items()} == {
        Format.JSON: 1,
        Format.JSON_UNI: 1,
        Format.PROTOBUF: 1,
    }
    json_push = json.loads(subs[0][1].got[0][1])
    assert json_push["push"]["channel"] == CHANNEL
    assert json_push["push"]["pub"] == {"data": {"n": 7}, "offset": 7}
    uni_push = json.loads(subs[4][1].got[0][1])
    assert "push" not in uni_push and uni_push["pub"]["data"] == {"n": 7}
    for ref, _ in subs:
        ref.stop(block=False)


def test_encoded_is_lazy_and_cached_per_format() -> None:
    calls: list[int] = []

    def encoder(fmt: int) -> Any:
        return lambda: calls.append(fmt) or f"enc{fmt}".encode()

    encoded = Encoded((encoder(0), encoder(1), encoder(2)))
    assert calls == []  # nothing is encoded until a subscriber of that format asks
    assert encoded.get(Format.PROTOBUF) == b"enc2"
    assert encoded.get(Format.PROTOBUF) is encoded.get(Format.PROTOBUF)
    assert encoded.get(Format.JSON) == b"enc0"
    assert calls == [2, 0]


def test_binary_data_has_no_json_encoding_but_a_protobuf_one() -> None:
    encoded = encoded_pub(CHANNEL, Publication(b"\xff\x00binary", 1))
    assert encoded.get(Format.JSON) is NOT_JSON
    assert encoded.get(Format.JSON_UNI) is NOT_JSON
    assert b"\xff\x00binary" in encoded.get(Format.PROTOBUF)


async def test_join_and_leave_reach_only_the_subscribers_that_asked_for_them(
    channel: ActorRef[Any],
) -> None:
    wants_ref, wants = start_subscriber()
    plain_ref, plain = start_subscriber()
    channel.tell(AddSubscriber("wants", wants_ref, True))
    channel.tell(AddSubscriber("plain", plain_ref, False))
    channel.tell(JoinLeave(CHANNEL, ALEX, True))
    channel.tell(JoinLeave(CHANNEL, ALEX, False))
    channel.tell(Deliver(CHANNEL, pub(1), "ep"))  # a marker both must get, after the two
    await eventually(lambda: len(plain.got) == 1 and len(wants.got) == 3, 5, "the marker")

    assert [kind for kind, _ in wants.got] == ["join", "leave", "pub"]
    assert [kind for kind, _ in plain.got] == ["pub"]
    join = json.loads(wants.got[0][1])["push"]
    assert join["channel"] == CHANNEL
    assert join["join"]["info"] == {
        "user": "42",
        "client": "client-a",
        "conn_info": {"name": "Alex"},
    }
    assert json.loads(wants.got[1][1])["push"]["leave"]["info"]["client"] == "client-a"
    for ref in (wants_ref, plain_ref):
        ref.stop(block=False)


async def test_a_subscriber_whose_actor_stopped_is_dropped_and_the_others_go_on(
    channel: ActorRef[Any],
) -> None:
    dead_ref, _ = start_subscriber()
    live_ref, live = start_subscriber()
    channel.tell(AddSubscriber("dead", dead_ref, True))
    channel.tell(AddSubscriber("live", live_ref, True))
    await dead_ref.stop(block=False)
    assert not dead_ref.is_alive()
    channel.tell(JoinLeave(CHANNEL, ALEX, True))  # a dead join_leave subscriber is skipped
    channel.tell(Deliver(CHANNEL, pub(1), "ep"))
    await eventually(lambda: len(live.got) == 2, 5, "the live subscriber got both")
    assert await subscribers_of(channel) == {"live"}
    assert channel.is_alive()
    channel.tell(Deliver(CHANNEL, pub(2), "ep"))
    await eventually(lambda: len(live.got) == 3, 5, "the live subscriber got pub 2")
    live_ref.stop(block=False)


async def test_replacement_keeps_the_channel_and_its_subscribers(channel: ActorRef[Any]) -> None:
    ref, sub = start_subscriber()
    channel.tell(AddSubscriber("a", ref, False))
    await subscribers_of(channel)
    old = actor_of(channel)
    assert isinstance(old, ChannelActor)
    await channel.stop(block=False)
    new_ref = old.replacement()
    try:
        assert new_ref.is_alive() and new_ref is not channel
        assert await subscribers_of(new_ref) == {"a"}
        new_ref.tell(Deliver(CHANNEL, pub(1), "ep"))
        await eventually(lambda: len(sub.got) == 1, 5, "delivery through the replacement")
    finally:
        new_ref.stop(block=False)
        ref.stop(block=False)
