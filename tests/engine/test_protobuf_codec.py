"""engine.protocol.protobuf_codec: framing, decoding rules, encoded messages checked against
the generated classes and against centrifuge-python's own schema and codec, property tests."""

from __future__ import annotations

import base64
import inspect
from collections.abc import Callable
from typing import Any

import pytest
from centrifuge import codecs as sdk_codecs
from centrifuge.protocol import client_pb2 as sdk
from hypothesis import given, settings
from hypothesis import strategies as st

from centripy.engine.protocol import client_pb2 as pb
from centripy.engine.protocol import json_codec as jc
from centripy.engine.protocol import protobuf_codec as pc
from centripy.engine.protocol.codes import Error
from centripy.engine.protocol.commands import (
    Command,
    ConnectRequest,
    HistoryRequest,
    HistorySince,
    PresenceRequest,
    PresenceStatsRequest,
    ProtocolError,
    PublishRequest,
    RefreshRequest,
    RPCRequest,
    SendRequest,
    SubRefreshRequest,
    SubscribeRequest,
    UnsubscribeRequest,
)
from centripy.engine.types import ClientInfo, Publication

ALICE = ClientInfo("42", "9b1c6e0e-0000-4000-8000-000000000001", b'{"name":"Alex"}', b"\x00\xff")


def varint(n: int) -> bytes:
    """Independent LEB128 writer for building test frames."""
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def frame_of(*messages: Any) -> bytes:
    """Varint-delimited frame of generated messages (ours or the SDK's) or raw bytes."""
    parts = [m if isinstance(m, bytes) else m.SerializeToString() for m in messages]
    return b"".join(varint(len(p)) + p for p in parts)


def split(frame: bytes) -> list[bytes]:
    out, pos = [], 0
    while pos < len(frame):
        size, shift = 0, 0
        while True:
            byte = frame[pos]
            pos += 1
            size |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                break
        out.append(frame[pos : pos + size])
        pos += size
    assert pos == len(frame)
    return out


def reply(data: bytes) -> pb.Reply:
    msg: pb.Reply = pb.Reply.FromString(data)
    return msg


# ------------------------------------------------------------------ decoding: examples


def test_decode_connect_and_subscribe_packed_in_one_frame() -> None:
    frame = frame_of(
        pb.Command(id=1, connect=pb.ConnectRequest(token="eyJ", name="js")),
        pb.Command(id=2, subscribe=pb.SubscribeRequest(channel="chat:1", recoverable=True)),
    )
    assert pc.decode_commands(frame) == [
        Command(1, "connect", ConnectRequest(token="eyJ", name="js")),
        Command(2, "subscribe", SubscribeRequest(channel="chat:1", recoverable=True)),
    ]


def test_decode_subscribe_and_publish_packed_with_raw_bytes() -> None:
    payload = b"\x00\x01binary\xff" * 20  # > 127 bytes: a two-byte length prefix
    frame = frame_of(
        pb.Command(id=3, subscribe=pb.SubscribeRequest(channel="news", data=b"\xfe")),
        pb.Command(id=4, publish=pb.PublishRequest(channel="news", data=payload)),
    )
    assert pc.decode_commands(frame) == [
        Command(3, "subscribe", SubscribeRequest(channel="news", data=b"\xfe")),
        Command(4, "publish", PublishRequest(channel="news", data=payload)),
    ]


def test_decode_commands_encoded_by_the_python_sdk() -> None:
    """centrifuge-python's own encoder, including fields newer than v5 (flag, headers)."""
    data = base64.b64encode(b'{"x":1}').decode()
    frame = sdk_codecs._ProtobufCodec.encode_commands(
        [
            {
                "id": 1,
                "connect": {
                    "name": "python",
                    "data": data,
                    "headers": {"h": "v"},
                    "subs": {"$x": {"recover": True, "offset": 5, "epoch": "ab"}},
                },
            },
            {"id": 2, "subscribe": {"channel": "c", "flag": 3, "positioned": True}},
            {},
        ]
    )
    recovering = SubscribeRequest(channel="$x", recover=True, offset=5, epoch="ab")
    assert pc.decode_commands(frame) == [
        Command(
            1, "connect", ConnectRequest(data=b'{"x":1}', subs={"$x": recovering}, name="python")
        ),
        Command(2, "subscribe", SubscribeRequest(channel="c", positioned=True)),
        Command(0, "", None),
    ]


def test_decode_every_method_with_every_field() -> None:
    sub = pb.SubscribeRequest(
        channel="c", token="t", recover=True, epoch="e", offset=2**64 - 1, data=b"d",
        positioned=True, recoverable=True, join_leave=True, delta="fossil",
    )  # fmt: skip
    commands = [
        pb.Command(id=1, connect=pb.ConnectRequest(
            token="t", data=b"d", subs={"s": pb.SubscribeRequest(channel="ignored", token="x")},
            name="n", version="v",
        )),
        pb.Command(id=2, subscribe=sub),
        pb.Command(id=3, unsubscribe=pb.UnsubscribeRequest(channel="c")),
        pb.Command(id=4, publish=pb.PublishRequest(channel="c", data=b"d")),
        pb.Command(id=5, presence=pb.PresenceRequest(channel="c")),
        pb.Command(id=6, presence_stats=pb.PresenceStatsRequest(channel="c")),
        pb.Command(id=7, history=pb.HistoryRequest(
            channel="c", limit=-(2**31), since=pb.StreamPosition(offset=9, epoch="e"), reverse=True
        )),
        pb.Command(id=8, rpc=pb.RPCRequest(method="m", data=b"d")),
        pb.Command(send=pb.SendRequest(data=b"d")),
        pb.Command(id=10, refresh=pb.RefreshRequest(token="t")),
        pb.Command(id=2**32 - 1, sub_refresh=pb.SubRefreshRequest(channel="c", token="t")),
    ]  # fmt: skip
    assert pc.decode_commands(frame_of(*commands)) == [
        Command(1, "connect", ConnectRequest(
            token="t", data=b"d", subs={"s": SubscribeRequest(channel="s", token="x")},
            name="n", version="v",
        )),
        Command(2, "subscribe", SubscribeRequest(
            channel="c", token="t", recover=True, epoch="e", offset=2**64 - 1, data=b"d",
            positioned=True, recoverable=True, join_leave=True, delta="fossil",
        )),
        Command(3, "unsubscribe", UnsubscribeRequest(channel="c")),
        Command(4, "publish", PublishRequest(channel="c", data=b"d")),
        Command(5, "presence", PresenceRequest(channel="c")),
        Command(6, "presence_stats", PresenceStatsRequest(channel="c")),
        Command(7, "history", HistoryRequest(
            channel="c", limit=-(2**31), since=HistorySince(9, "e"), reverse=True
        )),
        Command(8, "rpc", RPCRequest(method="m", data=b"d")),
        Command(0, "send", SendRequest(data=b"d")),
        Command(10, "refresh", RefreshRequest(token="t")),
        Command(2**32 - 1, "sub_refresh", SubRefreshRequest(channel="c", token="t")),
    ]  # fmt: skip


def test_decode_history_since_presence_is_kept() -> None:
    without = pb.Command(id=1, history=pb.HistoryRequest(channel="c"))
    with_empty = pb.Command(id=2, history=pb.HistoryRequest(channel="c", since={}))
    decoded = pc.decode_commands(frame_of(without, with_empty))
    assert decoded[0].request == HistoryRequest(channel="c", since=None)
    assert decoded[1].request == HistoryRequest(channel="c", since=HistorySince(0, ""))


def test_decode_method_precedence_and_empty_requests() -> None:
    both = pb.Command(id=1, subscribe={}, connect={})
    rpc_and_send = pb.Command(id=2, send={}, rpc=pb.RPCRequest(method="m"))
    assert pc.decode_commands(frame_of(both, rpc_and_send)) == [
        Command(1, "connect", ConnectRequest()),
        Command(2, "rpc", RPCRequest(method="m")),
    ]


def test_decode_pong_and_ping_only_commands() -> None:
    assert pc.decode_commands(b"\x00") == [Command(0, "", None)]
    assert pc.decode_commands(pc.PONG_FRAME) == [Command(0, "", None)]  # the actor's fast path
    assert pc.decode_commands(b"\x00\x00") == [Command(0, "", None)] * 2
    assert pc.decode_commands(frame_of(pb.Command(id=7, ping={}))) == [Command(7, "", None)]


@pytest.mark.parametrize(
    "frame",
    [
        b"",  # empty frame
        b"\x80",  # truncated prefix
        b"\x05\x08\x01",  # length beyond the frame
        b"\x00\x02\x08",  # second message truncated
        b"\xff" * 10 + b"\x01",  # prefix longer than 10 bytes
        b"\xff" * 9 + b"\x7f",  # prefix over 64 bits
        b"\x02\xff\xff",  # malformed tag
        b"\x02\x08\x80",  # truncated varint field
        frame_of(b"\x22\x02\x0a\x05"),  # connect whose token overruns it
        frame_of(b"\x2a\x04\x0a\x02\xc3\x28"),  # subscribe channel that is not UTF-8
        frame_of(b"\x0b"),  # start-group with no end
    ],
)
def test_decode_malformed_frames(frame: bytes) -> None:
    with pytest.raises(ProtocolError):
        pc.decode_commands(frame)


def test_decode_connect_request_and_emulation_request() -> None:
    body = pb.ConnectRequest(token="t", subs={"a": pb.SubscribeRequest(recover=True)})
    assert pc.decode_connect_request(body.SerializeToString()) == ConnectRequest(
        token="t", subs={"a": SubscribeRequest(channel="a", recover=True)}
    )
    assert pc.decode_connect_request(b"") == ConnectRequest()
    commands = frame_of(pb.Command(id=2, subscribe=pb.SubscribeRequest(channel="x")))
    emu = pb.EmulationRequest(node="n", session="s", data=commands)
    decoded = pc.decode_emulation_request(emu.SerializeToString())
    assert decoded == pc.EmulationRequest("n", "s", commands)
    assert pc.decode_commands(decoded.data) == [
        Command(2, "subscribe", SubscribeRequest(channel="x"))
    ]
    with pytest.raises(ProtocolError):
        pc.decode_connect_request(b"\x0a\x05")
    with pytest.raises(ProtocolError):
        pc.decode_emulation_request(b"\xff")


# ------------------------------------------------------------------ decoding: properties


@settings(max_examples=500)
@given(st.binary(max_size=200))
def test_decode_arbitrary_bytes_returns_commands_or_raises_protocol_error(data: bytes) -> None:
    try:
        commands = pc.decode_commands(data)
    except ProtocolError:
        return
    assert commands and all(isinstance(c, Command) for c in commands)


@settings(max_examples=300)
@given(st.lists(st.binary(max_size=40), min_size=1, max_size=5))
def test_decode_arbitrary_messages_in_valid_framing(messages: list[bytes]) -> None:
    try:
        commands = pc.decode_commands(frame_of(*messages))
    except ProtocolError:
        return
    assert len(commands) == len(messages)


texts = st.text(max_size=20)
subscribe_requests = st.builds(
    SubscribeRequest,
    channel=texts,
    token=texts,
    recover=st.booleans(),
    epoch=texts,
    offset=st.integers(0, 2**64 - 1),
    data=st.binary(max_size=30),
    positioned=st.booleans(),
    recoverable=st.booleans(),
    join_leave=st.booleans(),
    delta=texts,
)


@given(st.lists(st.tuples(st.integers(1, 2**32 - 1), subscribe_requests), max_size=6))
def test_subscribe_commands_round_trip(items: list[tuple[int, SubscribeRequest]]) -> None:
    frame = b"\x00" + frame_of(
        *(
            pb.Command(id=cmd_id, subscribe=pb.SubscribeRequest(
                channel=r.channel, token=r.token, recover=r.recover, epoch=r.epoch,
                offset=r.offset, data=r.data, positioned=r.positioned,
                recoverable=r.recoverable, join_leave=r.join_leave, delta=r.delta,
            ))
            for cmd_id, r in items
        )
    )  # fmt: skip
    expected = [Command(0, "", None)] + [Command(i, "subscribe", r) for i, r in items]
    assert pc.decode_commands(frame) == expected


# ------------------------------------------------------------------ encoding: replies


def test_connect_reply_with_subs() -> None:
    sub = pc.subscribe_result_obj(recoverable=True, epoch="xQzA", offset=17, positioned=True)
    result = pc.connect_result_obj(
        client="c1", version="5.4.9", expires=True, ttl=3591, data=b"\x01",
        subs={"#42": sub}, ping=25, pong=True, session="s", node="n", time=1700000000000,
    )  # fmt: skip
    msg = reply(pc.encode_reply(1, "connect", result))
    assert msg.id == 1
    assert msg.connect == pb.ConnectResult(
        client="c1", version="5.4.9", expires=True, ttl=3591, data=b"\x01",
        subs={"#42": pb.SubscribeResult(recoverable=True, epoch="xQzA", offset=17,
                                        positioned=True)},
        ping=25, pong=True, session="s", node="n", time=1700000000000,
    )  # fmt: skip


def test_subscribe_reply_with_recovered_publications() -> None:
    pubs = [Publication(b'{"a":1}', 18, ALICE, {"k": "v"}), Publication(b"\x00", 19)]
    result = pc.subscribe_result_obj(
        expires=True, ttl=60, recoverable=True, epoch="e", publications=pubs, recovered=True,
        offset=17, positioned=True, data=b"d", was_recovering=True,
    )  # fmt: skip
    msg = reply(pc.encode_reply(2, "subscribe", result)).subscribe
    assert (msg.expires, msg.ttl, msg.recoverable, msg.epoch) == (True, 60, True, "e")
    assert (msg.recovered, msg.offset, msg.positioned, msg.data) == (True, 17, True, b"d")
    assert msg.was_recovering
    first, second = msg.publications
    assert (first.data, first.offset, dict(first.tags)) == (b'{"a":1}', 18, {"k": "v"})
    assert first.info == pb.ClientInfo(
        user="42", client=ALICE.client, conn_info=b'{"name":"Alex"}', chan_info=b"\x00\xff"
    )
    assert (second.data, second.offset, second.HasField("info")) == (b"\x00", 19, False)


@pytest.mark.parametrize("key", ["unsubscribe", "publish"])
def test_empty_results_are_present(key: str) -> None:
    data = pc.encode_reply(5, key, {})
    msg = reply(data)
    assert msg.id == 5 and msg.HasField(key)
    assert data == pb.Reply(id=5, **{key: {}}).SerializeToString()


def test_empty_subscribe_result_is_present() -> None:
    msg = reply(pc.encode_reply(5, "subscribe", pc.subscribe_result_obj()))
    assert msg.HasField("subscribe") and msg.subscribe == pb.SubscribeResult()


def test_other_replies() -> None:
    pubs = [Publication(b"x", 3)]
    history = reply(pc.encode_reply(3, "history", pc.history_result_obj(pubs, "e", 3))).history
    assert [(p.data, p.offset) for p in history.publications] == [(b"x", 3)]
    assert (history.epoch, history.offset) == ("e", 3)
    presence = reply(pc.encode_reply(4, "presence", pc.presence_result_obj({"c": ALICE})))
    assert presence.presence.presence["c"] == pc.client_info_obj(ALICE)
    empty = reply(pc.encode_reply(4, "presence", pc.presence_result_obj({})))
    assert empty.HasField("presence") and not empty.presence.presence
    stats = reply(pc.encode_reply(5, "presence_stats", pc.presence_stats_result_obj(2, 1)))
    assert (stats.presence_stats.num_clients, stats.presence_stats.num_users) == (2, 1)
    rpc = reply(pc.encode_reply(6, "rpc", pc.rpc_result_obj(b"\xff")))
    assert rpc.rpc.data == b"\xff"
    refresh = reply(pc.encode_reply(7, "refresh", pc.refresh_result_obj(True, 3600)))
    assert refresh.refresh == pb.RefreshResult(expires=True, ttl=3600)


def test_sub_refresh_reply_uses_its_own_message() -> None:
    data = pc.encode_reply(8, "sub_refresh", pc.refresh_result_obj(True, 600))
    assert data == pb.Reply(id=8, sub_refresh={"expires": True, "ttl": 600}).SerializeToString()
    assert sdk.Reply.FromString(data).sub_refresh.ttl == 600


def test_reply_id_zero_is_omitted_and_large_ids_round_trip() -> None:
    assert pc.encode_reply(0, "publish", {}) == b"\x42\x00"
    assert reply(pc.encode_reply(2**32 - 1, "publish", {})).id == 2**32 - 1


def test_encode_reply_rejects_wrong_results() -> None:
    with pytest.raises(TypeError, match="PublishResult"):
        pc.encode_reply(1, "publish", {"data": 1})
    with pytest.raises(TypeError, match="HistoryResult"):
        pc.encode_reply(1, "history", pc.rpc_result_obj(b""))
    with pytest.raises(TypeError):
        pc.encode_reply(1, "connect", jc.connect_result_obj(client="c", version="v"))
    with pytest.raises(ValueError, match="send"):
        pc.encode_reply(1, "send", {})


def test_encode_error() -> None:
    data = pc.encode_error(9, Error.of(100))
    assert reply(data) == pb.Reply(
        id=9, error=pb.Error(code=100, message="internal server error", temporary=True)
    )
    assert data == reply(data).SerializeToString()
    plain = reply(pc.encode_error(0, Error(4000, "custom")))
    assert (plain.id, plain.error.code, plain.error.message) == (0, 4000, "custom")
    assert not plain.error.temporary


# ------------------------------------------------------------------ encoding: pushes


def push_of(data: bytes, unidirectional: bool) -> pb.Push:
    if unidirectional:
        push: pb.Push = pb.Push.FromString(data)
        return push
    msg = reply(data)
    assert msg.id == 0 and msg.HasField("push") and not msg.HasField("error")
    return msg.push


def test_pub_push_matches_generated_encoding_exactly() -> None:
    pub = Publication(b'{"text":"hi"}', 18, ALICE, {"k": "v"})
    expected = pb.Push(channel="chat", pub=pc.publication_obj(pub))
    assert pc.encode_pub_push("chat", pub) == pb.Reply(push=expected).SerializeToString()
    assert pc.encode_pub_push("chat", pub, unidirectional=True) == expected.SerializeToString()


def test_pub_push_minimal_and_large() -> None:
    assert push_of(pc.encode_pub_push("c", Publication(b"")), False) == pb.Push(channel="c", pub={})
    big = Publication(b"\x00" * 70000, 2**64 - 1)
    push = push_of(pc.encode_pub_push("c" * 300, big), False)
    assert (push.channel, push.pub.data, push.pub.offset) == ("c" * 300, big.data, 2**64 - 1)


infos = st.builds(ClientInfo, texts, texts, st.binary(max_size=20), st.binary(max_size=20))
publications = st.builds(
    Publication,
    data=st.binary(max_size=300),
    offset=st.integers(0, 2**64 - 1),
    info=st.none() | infos,
    tags=st.dictionaries(texts, texts, max_size=3),
)


@given(st.text(max_size=300), publications, st.booleans())
def test_pub_push_round_trips(channel: str, pub: Publication, unidirectional: bool) -> None:
    push = push_of(pc.encode_pub_push(channel, pub, unidirectional=unidirectional), unidirectional)
    assert push == pb.Push(channel=channel, pub=pc.publication_obj(pub))
    assert (push.pub.data, push.pub.offset, dict(push.pub.tags)) == (pub.data, pub.offset, pub.tags)
    if pub.info is not None:
        assert push.pub.info == pb.ClientInfo(
            user=pub.info.user, client=pub.info.client,
            conn_info=pub.info.conn_info, chan_info=pub.info.chan_info,
        )  # fmt: skip


@given(st.text(max_size=30), infos, st.booleans())
def test_join_and_leave_pushes(channel: str, info: ClientInfo, unidirectional: bool) -> None:
    join = push_of(
        pc.encode_join_push(channel, info, unidirectional=unidirectional), unidirectional
    )
    leave = push_of(
        pc.encode_leave_push(channel, info, unidirectional=unidirectional), unidirectional
    )
    assert join == pb.Push(channel=channel, join=pb.Join(info=pc.client_info_obj(info)))
    assert leave == pb.Push(channel=channel, leave=pb.Leave(info=pc.client_info_obj(info)))
    assert join.HasField("join") and join.join.HasField("info")


PUSH_CASES: list[tuple[Callable[..., bytes], tuple[Any, ...], pb.Push]] = [
    (pc.encode_unsubscribe_push, ("c", 2500, "insufficient state"),
     pb.Push(channel="c", unsubscribe=pb.Unsubscribe(code=2500, reason="insufficient state"))),
    (pc.encode_subscribe_push,
     ("#42", pc.subscribe_result_obj(expires=True, ttl=9, recoverable=True, epoch="e",
                                     offset=3, positioned=True, data=b"d")),
     pb.Push(channel="#42", subscribe=pb.Subscribe(recoverable=True, epoch="e", offset=3,
                                                   positioned=True, data=b"d"))),
    (pc.encode_subscribe_push, ("#42", pc.subscribe_result_obj()),
     pb.Push(channel="#42", subscribe={})),
    (pc.encode_message_push, (b"\x01\x02",), pb.Push(message=pb.Message(data=b"\x01\x02"))),
    (pc.encode_message_push, (b"",), pb.Push(message={})),
    (pc.encode_disconnect_push, (3001, "shutdown"),
     pb.Push(disconnect=pb.Disconnect(code=3001, reason="shutdown"))),
    (pc.encode_refresh_push, (True, 3600), pb.Push(refresh=pb.Refresh(expires=True, ttl=3600))),
    (pc.encode_connect_push,
     (pc.connect_result_obj(client="c", version="5.4.9", expires=True, ttl=5, data=b"d",
                            subs={"a": pc.subscribe_result_obj(offset=4)}, ping=25,
                            session="s", time=-1),),
     pb.Push(connect=pb.Connect(client="c", version="5.4.9", expires=True, ttl=5, data=b"d",
                                subs={"a": pb.SubscribeResult(offset=4)}, ping=25,
                                session="s", time=-1))),
]  # fmt: skip


@pytest.mark.parametrize("unidirectional", [False, True])
@pytest.mark.parametrize(("encode", "args", "expected"), PUSH_CASES)
def test_pushes(
    encode: Callable[..., bytes], args: tuple[Any, ...], expected: pb.Push, unidirectional: bool
) -> None:
    data = encode(*args, unidirectional=unidirectional)
    push = push_of(data, unidirectional)
    assert push == expected
    assert data == (expected if unidirectional else pb.Reply(push=expected)).SerializeToString()


# ------------------------------------------------------------------ framing and SDK decoding


def test_ping_and_join_frame() -> None:
    assert pc.PING == b""
    assert pc.join_frame([pc.PING]) == b"\x00"
    messages = [pc.encode_reply(1, "publish", {}), pc.PING, b"x" * 200]
    frame = pc.join_frame(messages)
    assert frame.startswith(b"\x04\x08\x01\x42\x00\x00\xc8\x01")
    assert split(frame) == messages
    assert pc.join_frame([]) == b""


def test_frames_decode_with_the_python_sdk_codec() -> None:
    """centrifuge-python's own reply decoder and schema read what we write."""
    sub = pc.subscribe_result_obj(recoverable=True, epoch="e", offset=2, positioned=True)
    frame = pc.join_frame(
        [
            pc.encode_reply(1, "connect", pc.connect_result_obj(
                client="c", version="5.4.9", ping=25, pong=True, subs={"#1": sub})),
            pc.encode_reply(2, "subscribe", sub),
            pc.encode_pub_push("news", Publication(b'{"a":1}', 3, ALICE, {"t": "1"})),
            pc.encode_join_push("news", ALICE),
            pc.encode_unsubscribe_push("news", 2000, "server unsubscribe"),
            pc.encode_error(3, Error.of(103)),
            pc.PING,
        ]
    )  # fmt: skip
    replies = sdk_codecs._ProtobufCodec.decode_replies(frame)
    b64 = base64.b64encode
    assert replies == [
        {"id": 1, "connect": {"client": "c", "version": "5.4.9", "ping": 25, "pong": True,
                              "subs": {"#1": {"recoverable": True, "epoch": "e",
                                              "offset": "2", "positioned": True}}}},
        {"id": 2, "subscribe": {"recoverable": True, "epoch": "e", "offset": "2",
                                "positioned": True}},
        {"push": {"channel": "news", "pub": {
            "data": b64(b'{"a":1}').decode(), "offset": "3", "tags": {"t": "1"},
            "info": {"user": "42", "client": ALICE.client,
                     "conn_info": b64(ALICE.conn_info).decode(),
                     "chan_info": b64(ALICE.chan_info).decode()}}}},
        {"push": {"channel": "news", "join": {"info": {
            "user": "42", "client": ALICE.client, "conn_info": b64(ALICE.conn_info).decode(),
            "chan_info": b64(ALICE.chan_info).decode()}}}},
        {"push": {"channel": "news", "unsubscribe": {"code": 2000,
                                                     "reason": "server unsubscribe"}}},
        {"id": 3, "error": {"code": 103, "message": "permission denied"}},
        {},
    ]  # fmt: skip


def test_schema_numbers_match_the_sdk_schema() -> None:
    """Every field of our schema has the same number and type in centrifuge-python's."""
    for name, ours in pb.DESCRIPTOR.message_types_by_name.items():
        theirs = sdk.DESCRIPTOR.message_types_by_name[name]
        for field in ours.fields:
            other = theirs.fields_by_name[field.name]
            assert (field.number, field.type) == (other.number, other.type), (name, field.name)
            if field.message_type is not None:
                assert field.message_type.name == other.message_type.name


# ------------------------------------------------------------------ API parity


PARITY = [
    "decode_commands", "decode_connect_request", "encode_reply", "encode_error",
    "encode_pub_push", "encode_join_push", "encode_leave_push", "encode_unsubscribe_push",
    "encode_subscribe_push", "encode_message_push", "encode_disconnect_push",
    "encode_refresh_push", "encode_connect_push", "join_frame", "connect_result_obj",
    "subscribe_result_obj", "history_result_obj", "presence_result_obj",
    "presence_stats_result_obj", "refresh_result_obj", "rpc_result_obj", "client_info_obj",
    "publication_obj",
]  # fmt: skip


@pytest.mark.parametrize("name", PARITY)
def test_same_signatures_as_json_codec(name: str) -> None:
    def shape(fn: Any) -> list[tuple[str, Any, Any]]:
        params = inspect.signature(fn).parameters.values()
        return [(p.name, p.kind, p.default) for p in params]

    assert shape(getattr(pc, name)) == shape(getattr(jc, name))
    assert isinstance(pc.PING, bytes) and isinstance(jc.PING, bytes)
