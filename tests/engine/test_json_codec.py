"""engine.protocol.json_codec: decoding rules, exact encoded bytes, property tests."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from centripy.engine.protocol import json_codec as jc
from centripy.engine.protocol.codes import Error
from centripy.engine.protocol.commands import (
    METHODS,
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

# ------------------------------------------------------------------ decoding: examples


def test_decode_js_frame_connect_and_subscribe() -> None:
    frame = (
        b'{"connect":{"token":"eyJ","name":"js"},"id":1}\n'
        b'{"subscribe":{"channel":"chat:1","recoverable":true},"id":2}'
    )
    assert jc.decode_commands(frame) == [
        Command(1, "connect", ConnectRequest(token="eyJ", name="js")),
        Command(2, "subscribe", SubscribeRequest(channel="chat:1", recoverable=True)),
    ]


def test_decode_single_trailing_newline_is_accepted() -> None:
    assert jc.decode_commands(b"{}\n") == [Command(0, "", None)]
    assert jc.decode_commands(jc.PONG_FRAME) == [Command(0, "", None)]  # the actor's fast path


@pytest.mark.parametrize(
    "frame",
    [b"", b"\n", b"{}\n\n", b"{}\n\n{}", b"\n{}", b"{", b"[]", b"1", b'"x"', b"{}\n[1]"],
)
def test_decode_malformed_frames(frame: bytes) -> None:
    with pytest.raises(ProtocolError):
        jc.decode_commands(frame)


def test_decode_pong_and_null_line() -> None:
    assert jc.decode_commands(b"{}") == [Command(0, "", None)]
    assert jc.decode_commands(b"null") == [Command(0, "", None)]


@pytest.mark.parametrize(
    "id_text", ["-1", "1.0", "1.5", "true", '"1"', "4294967296", "[1]", "{}", "1e3"]
)
def test_decode_rejects_bad_ids(id_text: str) -> None:
    with pytest.raises(ProtocolError):
        jc.decode_commands(b'{"id":' + id_text.encode() + b',"publish":{"channel":"a"}}')


def test_decode_id_bounds_and_null() -> None:
    assert jc.decode_commands(b'{"id":4294967295,"presence":{"channel":"a"}}') == [
        Command(4294967295, "presence", PresenceRequest(channel="a"))
    ]
    assert jc.decode_commands(b'{"id":null,"send":{"data":1}}') == [
        Command(0, "send", SendRequest(data=b"1"))
    ]


def test_method_precedence_and_null_methods() -> None:
    frame = b'{"id":3,"rpc":{"method":"m"},"publish":{"channel":"c","data":1},"connect":null}'
    assert jc.decode_commands(frame) == [
        Command(3, "publish", PublishRequest(channel="c", data=b"1"))
    ]


def test_unknown_keys_are_ignored_and_unknown_method_gives_empty_command() -> None:
    frame = (
        b'{"id":4,"subscribe":{"channel":"c","flag":3,"tf":{"x":1},"type":4},"headers":{}}\n'
        b'{"id":5,"ping":{}}'
    )
    assert jc.decode_commands(frame) == [
        Command(4, "subscribe", SubscribeRequest(channel="c")),
        Command(5, "", None),
    ]


@pytest.mark.parametrize(
    "line",
    [
        b'{"id":1,"connect":5}',
        b'{"id":1,"subscribe":[]}',
        b'{"id":1,"subscribe":{"channel":5}}',
        b'{"id":1,"subscribe":{"channel":"c","recover":1}}',
        b'{"id":1,"subscribe":{"channel":"c","offset":-1}}',
        b'{"id":1,"subscribe":{"channel":"c","offset":1.0}}',
        b'{"id":1,"subscribe":{"channel":"c","offset":18446744073709551616}}',
        b'{"id":1,"history":{"channel":"c","limit":2147483648}}',
        b'{"id":1,"history":{"channel":"c","limit":-2147483649}}',
        b'{"id":1,"history":{"channel":"c","limit":"10"}}',
        b'{"id":1,"history":{"channel":"c","since":5}}',
        b'{"id":1,"history":{"channel":"c","since":{"offset":"1"}}}',
        b'{"id":1,"history":{"channel":"c","reverse":"yes"}}',
        b'{"id":1,"connect":{"subs":[]}}',
        b'{"id":1,"connect":{"subs":{"a":1}}}',
        b'{"id":1,"connect":{"name":1}}',
        b'{"id":1,"rpc":{"method":{}}}',
        b'{"id":1,"refresh":{"token":true}}',
    ],
)
def test_wrong_field_types_are_protocol_errors(line: bytes) -> None:
    with pytest.raises(ProtocolError):
        jc.decode_commands(line)


def test_decode_every_method() -> None:
    lines = [
        b'{"id":1,"unsubscribe":{"channel":"a"}}',
        b'{"id":2,"publish":{"channel":"a","data":{"text" : "hi",\t"n":[1, 2]}}}',
        b'{"id":3,"presence_stats":{"channel":"a"}}',
        b'{"id":4,"history":{"channel":"a","limit":-1,"since":{"offset":15,"epoch":"xQzA"},'
        b'"reverse":true}}',
        b'{"id":5,"rpc":{"method":"getUser","data":"s"}}',
        b'{"send":{"data":{"any":"thing"}}}',
        b'{"id":6,"refresh":{"token":"t"}}',
        b'{"id":7,"sub_refresh":{"channel":"$p","token":"t"}}',
        b'{"id":8,"history":{"channel":"a","since":null}}',
    ]
    assert jc.decode_commands(b"\n".join(lines)) == [
        Command(1, "unsubscribe", UnsubscribeRequest(channel="a")),
        Command(2, "publish", PublishRequest(channel="a", data=b'{"text":"hi","n":[1,2]}')),
        Command(3, "presence_stats", PresenceStatsRequest(channel="a")),
        Command(
            4,
            "history",
            HistoryRequest(
                channel="a", limit=-1, since=HistorySince(offset=15, epoch="xQzA"), reverse=True
            ),
        ),
        Command(5, "rpc", RPCRequest(method="getUser", data=b'"s"')),
        Command(0, "send", SendRequest(data=b'{"any":"thing"}')),
        Command(6, "refresh", RefreshRequest(token="t")),
        Command(7, "sub_refresh", SubRefreshRequest(channel="$p", token="t")),
        Command(8, "history", HistoryRequest(channel="a")),
    ]


def test_decode_subscribe_all_fields_and_data_forms() -> None:
    line = (
        b'{"id":9,"subscribe":{"channel":"chat:1","token":"tok","recover":true,"epoch":"xQzA",'
        b'"offset":17,"data":[1,\n2],"positioned":true,"recoverable":true,"join_leave":true,'
        b'"delta":"fossil"}}'
    )
    # The newline inside `data` makes this two lines: it must fail, as in Centrifugo.
    with pytest.raises(ProtocolError):
        jc.decode_commands(line)
    (cmd,) = jc.decode_commands(line.replace(b"\n", b" "))
    assert cmd == Command(
        9,
        "subscribe",
        SubscribeRequest(
            channel="chat:1",
            token="tok",
            recover=True,
            epoch="xQzA",
            offset=17,
            data=b"[1,2]",
            positioned=True,
            recoverable=True,
            join_leave=True,
            delta="fossil",
        ),
    )


def test_empty_string_data_is_not_empty_payload() -> None:
    (cmd,) = jc.decode_commands(b'{"id":1,"publish":{"channel":"a","data":""}}')
    assert cmd.request == PublishRequest(channel="a", data=b'""')
    (cmd,) = jc.decode_commands(b'{"id":1,"publish":{"channel":"a"}}')
    assert cmd.request == PublishRequest(channel="a", data=b"")


def test_decode_connect_subs_are_keyed_by_channel() -> None:
    line = (
        b'{"id":1,"connect":{"token":"t","data":{"a":1},"name":"python","version":"0.7",'
        b'"subs":{"news":{"recover":true,"offset":5,"epoch":"e","channel":"other"},"x":null},'
        b'"headers":{"h":"v"}}}'
    )
    assert jc.decode_commands(line) == [
        Command(
            1,
            "connect",
            ConnectRequest(
                token="t",
                data=b'{"a":1}',
                name="python",
                version="0.7",
                subs={
                    "news": SubscribeRequest(channel="news", recover=True, offset=5, epoch="e"),
                    "x": SubscribeRequest(channel="x"),
                },
            ),
        )
    ]


def test_deeply_nested_data_survives_reserialisation() -> None:
    depth = 500
    body = b"[" * depth + b"]" * depth
    (cmd,) = jc.decode_commands(b'{"id":1,"publish":{"channel":"a","data":' + body + b"}}")
    assert isinstance(cmd.request, PublishRequest)
    assert cmd.request.data == body


def test_decode_connect_request_for_unidirectional() -> None:
    body = b'{"token":"eyJ","subs":{"abc":{}},"name":"n"}'
    assert jc.decode_connect_request(body) == ConnectRequest(
        token="eyJ", name="n", subs={"abc": SubscribeRequest(channel="abc")}
    )
    assert jc.decode_connect_request(b"null") == ConnectRequest()
    for bad in (b"", b"[]", b"{", b'{"subs":5}', b'{"token":1}'):
        with pytest.raises(ProtocolError):
            jc.decode_connect_request(bad)


def test_is_valid_json() -> None:
    assert jc.is_valid_json(b'{"a":1}')
    assert jc.is_valid_json(b'"s"')
    assert not jc.is_valid_json(b"")
    assert not jc.is_valid_json(b"\x00\x01binary")
    assert not jc.is_valid_json(b"{")


# ------------------------------------------------------------------ decoding: properties


@settings(max_examples=500)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_decode_or_protocol_error(frame: bytes) -> None:
    _assert_commands_or_protocol_error(frame)


_KEYS = st.sampled_from(
    [
        *METHODS,
        "id",
        "channel",
        "token",
        "data",
        "subs",
        "since",
        "offset",
        "epoch",
        "limit",
        "recover",
        "reverse",
        "method",
        "name",
        "version",
        "positioned",
        "x",
        "ping",
    ]
)
_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=8),
)
_json_values = st.recursive(
    _scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(_KEYS | st.text(max_size=3), inner, max_size=4)
    ),
    max_leaves=8,
)
# Top-level commands whose method bodies are objects of known field names, so that many
# inputs get past the envelope checks and exercise the field readers.
_bodies = st.one_of(_scalars, st.dictionaries(_KEYS, _json_values, max_size=5))


@settings(max_examples=500)
@given(st.lists(st.dictionaries(_KEYS, _bodies, max_size=4), min_size=1, max_size=3))
def test_arbitrary_json_structures_decode_or_protocol_error(objs: list[dict[str, Any]]) -> None:
    frame = b"\n".join(json.dumps(obj).encode() for obj in objs)
    _assert_commands_or_protocol_error(frame)


def _assert_commands_or_protocol_error(frame: bytes) -> None:
    try:
        commands = jc.decode_commands(frame)
    except ProtocolError:
        return
    assert commands
    for cmd in commands:
        assert isinstance(cmd, Command)
        assert 0 <= cmd.id <= 2**32 - 1
        assert (cmd.method == "") == (cmd.request is None)
        assert cmd.method == "" or cmd.method in METHODS


_payloads = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**63 - 1), st.text(max_size=10)),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=10,
)


@given(
    st.integers(1, 2**32 - 1),
    st.text(max_size=20),
    st.booleans(),
    st.integers(0, 2**64 - 1),
    _payloads,
)
def test_subscribe_round_trip(
    cmd_id: int, channel: str, recover: bool, offset: int, data: object
) -> None:
    line = json.dumps(
        {
            "subscribe": {"channel": channel, "recover": recover, "offset": offset, "data": data},
            "id": cmd_id,
        },
        indent=None,
    ).encode()
    (cmd,) = jc.decode_commands(line)
    assert cmd.id == cmd_id and cmd.method == "subscribe"
    assert isinstance(cmd.request, SubscribeRequest)
    assert (cmd.request.channel, cmd.request.recover, cmd.request.offset) == (
        channel,
        recover,
        offset,
    )
    if data is None:
        assert cmd.request.data == b""
    else:
        assert json.loads(cmd.request.data) == data


# ------------------------------------------------------------------ encoding: exact bytes

ALEX = ClientInfo(user="42", client="9b1c", conn_info=b'{"name":"Alex"}')


def test_reply_and_error_bytes() -> None:
    assert jc.encode_reply(5, "subscribe", {}) == b'{"id":5,"subscribe":{}}'
    assert (
        jc.encode_error(5, Error.of(103))
        == b'{"id":5,"error":{"code":103,"message":"permission denied"}}'
    )
    assert jc.encode_error(7, Error.of(100)) == (
        b'{"id":7,"error":{"code":100,"message":"internal server error","temporary":true}}'
    )


def test_pub_push_bytes() -> None:
    pub = Publication(data=b'{"text":"hi"}', offset=18, info=ALEX)
    assert jc.encode_pub_push("chat", pub) == (
        b'{"push":{"channel":"chat","pub":{"data":{"text":"hi"},'
        b'"info":{"user":"42","client":"9b1c","conn_info":{"name":"Alex"}},"offset":18}}}'
    )
    assert jc.encode_pub_push("news", Publication(data=b'{"x":1}', offset=4)) == (
        b'{"push":{"channel":"news","pub":{"data":{"x":1},"offset":4}}}'
    )
    tagged = Publication(data=b"1", tags={"k": "v"}, time=123)
    assert (
        jc.encode_pub_push("c", tagged)
        == b'{"push":{"channel":"c","pub":{"data":1,"tags":{"k":"v"}}}}'
    )


def test_unidirectional_pushes_have_no_envelope() -> None:
    pub = Publication(data=b'{"input":"hello"}')
    assert jc.encode_pub_push("#test_user", pub, unidirectional=True) == (
        b'{"channel":"#test_user","pub":{"data":{"input":"hello"}}}'
    )
    assert jc.encode_disconnect_push(3005, "connection expired", unidirectional=True) == (
        b'{"disconnect":{"code":3005,"reason":"connection expired"}}'
    )
    result = jc.connect_result_obj(
        client="bfd2",
        version="5.4.9",
        subs={"#test_user": {}},
        expires=True,
        ttl=604407,
        ping=25,
        session="57b1",
    )
    assert jc.encode_connect_push(result, unidirectional=True) == (
        b'{"connect":{"client":"bfd2","version":"5.4.9","expires":true,"ttl":604407,'
        b'"subs":{"#test_user":{}},"ping":25,"session":"57b1"}}'
    )


def test_other_push_bytes() -> None:
    chan = ClientInfo(
        user="42", client="9b1c", conn_info=b'{"name":"Alex"}', chan_info=b'{"role":"mod"}'
    )
    assert jc.encode_join_push("chat", chan) == (
        b'{"push":{"channel":"chat","join":{"info":{"user":"42","client":"9b1c",'
        b'"conn_info":{"name":"Alex"},"chan_info":{"role":"mod"}}}}}'
    )
    assert jc.encode_leave_push("chat", ClientInfo(user="42", client="9b1c")) == (
        b'{"push":{"channel":"chat","leave":{"info":{"user":"42","client":"9b1c"}}}}'
    )
    assert jc.encode_leave_push("chat", ClientInfo(user="", client="c")) == (
        b'{"push":{"channel":"chat","leave":{"info":{"user":"","client":"c"}}}}'
    )
    assert jc.encode_unsubscribe_push("chat", 2500, "insufficient state") == (
        b'{"push":{"channel":"chat","unsubscribe":{"code":2500,"reason":"insufficient state"}}}'
    )
    sub = jc.subscribe_result_obj(recoverable=True, epoch="xQzA", offset=3, positioned=True)
    assert jc.encode_subscribe_push("#42", sub) == (
        b'{"push":{"channel":"#42","subscribe":{"recoverable":true,"epoch":"xQzA","offset":3,'
        b'"positioned":true}}}'
    )
    assert (
        jc.encode_message_push(b'{"alert":"x"}') == b'{"push":{"message":{"data":{"alert":"x"}}}}'
    )
    assert jc.encode_message_push(b"") == b'{"push":{"message":{}}}'
    assert jc.encode_disconnect_push(3001, "shutdown") == (
        b'{"push":{"disconnect":{"code":3001,"reason":"shutdown"}}}'
    )
    assert jc.encode_refresh_push(True, 3600) == b'{"push":{"refresh":{"expires":true,"ttl":3600}}}'


def test_connect_reply_bytes() -> None:
    result = jc.connect_result_obj(
        client="5f1b", version="5.4.9", expires=True, ttl=3591, ping=25, pong=True
    )
    assert jc.encode_reply(1, "connect", result) == (
        b'{"id":1,"connect":{"client":"5f1b","version":"5.4.9","expires":true,"ttl":3591,'
        b'"ping":25,"pong":true}}'
    )
    subs = {
        "news": jc.subscribe_result_obj(recoverable=True, epoch="xQzA", offset=7, positioned=True),
        "#42": jc.subscribe_result_obj(),
    }
    result = jc.connect_result_obj(
        client="5f1b",
        version="5.4.9",
        subs=subs,
        ping=25,
        pong=True,
        session="s",
        node="n",
        data=b'{"d":1}',
        time=17,
    )
    assert jc.encode_reply(1, "connect", result) == (
        b'{"id":1,"connect":{"client":"5f1b","version":"5.4.9","data":{"d":1},'
        b'"subs":{"news":{"recoverable":true,"epoch":"xQzA","offset":7,"positioned":true},'
        b'"#42":{}},"ping":25,"pong":true,"session":"s","node":"n","time":17}}'
    )


def test_subscribe_reply_bytes() -> None:
    assert jc.encode_reply(2, "subscribe", jc.subscribe_result_obj()) == b'{"id":2,"subscribe":{}}'
    pubs = [Publication(data=b'{"t":"a"}', offset=18), Publication(data=b'{"t":"b"}', offset=19)]
    result = jc.subscribe_result_obj(
        recoverable=True,
        epoch="xQzA",
        publications=pubs,
        recovered=True,
        offset=17,
        positioned=True,
        was_recovering=True,
    )
    assert jc.encode_reply(9, "subscribe", result) == (
        b'{"id":9,"subscribe":{"recoverable":true,"epoch":"xQzA","publications":'
        b'[{"data":{"t":"a"},"offset":18},{"data":{"t":"b"},"offset":19}],"recovered":true,'
        b'"offset":17,"positioned":true,"was_recovering":true}}'
    )
    result = jc.subscribe_result_obj(expires=True, ttl=600, data=b'"x"')
    assert jc.encode_reply(3, "subscribe", result) == (
        b'{"id":3,"subscribe":{"expires":true,"ttl":600,"data":"x"}}'
    )


def test_other_reply_bytes() -> None:
    presence = jc.presence_result_obj({"5f1b": ClientInfo("42", "5f1b", b'{"name":"Alex"}')})
    assert jc.encode_reply(4, "presence", presence) == (
        b'{"id":4,"presence":{"presence":{"5f1b":{"user":"42","client":"5f1b",'
        b'"conn_info":{"name":"Alex"}}}}}'
    )
    assert (
        jc.encode_reply(4, "presence", jc.presence_result_obj({}))
        == b'{"id":4,"presence":{"presence":{}}}'
    )
    assert jc.encode_reply(5, "presence_stats", jc.presence_stats_result_obj(0, 0)) == (
        b'{"id":5,"presence_stats":{"num_clients":0,"num_users":0}}'
    )
    history = jc.history_result_obj([Publication(b'{"t":"a"}', 16)], "xQzA", 16)
    assert jc.encode_reply(12, "history", history) == (
        b'{"id":12,"history":{"publications":[{"data":{"t":"a"},"offset":16}],'
        b'"epoch":"xQzA","offset":16}}'
    )
    assert jc.encode_reply(12, "history", jc.history_result_obj([], "", 0)) == (
        b'{"id":12,"history":{"publications":[],"epoch":"","offset":0}}'
    )
    assert (
        jc.encode_reply(7, "rpc", jc.rpc_result_obj(b'{"name":"x"}'))
        == b'{"id":7,"rpc":{"data":{"name":"x"}}}'
    )
    assert jc.encode_reply(7, "rpc", jc.rpc_result_obj(b"")) == b'{"id":7,"rpc":{}}'
    assert jc.encode_reply(10, "refresh", jc.refresh_result_obj(True, 3600)) == (
        b'{"id":10,"refresh":{"expires":true,"ttl":3600}}'
    )
    assert (
        jc.encode_reply(11, "sub_refresh", jc.refresh_result_obj(False, 0))
        == b'{"id":11,"sub_refresh":{}}'
    )


def test_raw_strips_newlines_and_refuses_empty() -> None:
    pub = Publication(data=b'{\r\n  "a": [1,\n 2]\n}\n', offset=1)
    line = jc.encode_pub_push("c", pub)
    assert b"\n" not in line and b"\r" not in line
    assert json.loads(line) == {
        "push": {"channel": "c", "pub": {"data": {"a": [1, 2]}, "offset": 1}}
    }
    with pytest.raises(ValueError):
        jc.raw(b"")


def test_ping_and_join_frame() -> None:
    assert jc.PING == b"{}"
    assert jc.join_frame([b'{"id":1,"publish":{}}', jc.PING]) == b'{"id":1,"publish":{}}\n{}'
    assert jc.join_frame([jc.PING]) == b"{}"


# ------------------------------------------------------------------ encoding: properties

_infos = st.builds(
    ClientInfo,
    user=st.text(max_size=8),
    client=st.text(max_size=8),
    conn_info=st.one_of(st.just(b""), _payloads.map(lambda v: json.dumps(v, indent=2).encode())),
    chan_info=st.one_of(st.just(b""), _payloads.map(lambda v: json.dumps(v).encode())),
)


def _info_dict(info: ClientInfo) -> dict[str, Any]:
    out: dict[str, Any] = {"user": info.user, "client": info.client}
    if info.conn_info:
        out["conn_info"] = json.loads(info.conn_info)
    if info.chan_info:
        out["chan_info"] = json.loads(info.chan_info)
    return out


@given(
    st.text(min_size=1, max_size=10),
    _payloads,
    st.integers(0, 2**64 - 1),
    st.none() | _infos,
    st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3),
    st.booleans(),
)
def test_pub_push_round_trip(
    channel: str,
    data: object,
    offset: int,
    info: ClientInfo | None,
    tags: dict[str, str],
    uni: bool,
) -> None:
    pub = Publication(data=json.dumps(data, indent=1).encode(), offset=offset, info=info, tags=tags)
    line = jc.encode_pub_push(channel, pub, unidirectional=uni)
    assert b"\n" not in line
    expected: dict[str, Any] = {"data": data}
    if info is not None:
        expected["info"] = _info_dict(info)
    if offset:
        expected["offset"] = offset
    if tags:
        expected["tags"] = tags
    push = {"channel": channel, "pub": expected}
    assert json.loads(line) == (push if uni else {"push": push})


@given(st.integers(1, 2**32 - 1), st.dictionaries(st.text(max_size=5), _infos, max_size=3))
def test_presence_reply_round_trip(cmd_id: int, presence: dict[str, ClientInfo]) -> None:
    line = jc.encode_reply(cmd_id, "presence", jc.presence_result_obj(presence))
    assert b"\n" not in line
    assert json.loads(line) == {
        "id": cmd_id,
        "presence": {"presence": {k: _info_dict(v) for k, v in presence.items()}},
    }


@given(st.integers(1, 2**32 - 1), st.integers(100, 1999), st.text(max_size=20))
def test_error_round_trip(cmd_id: int, code: int, message: str) -> None:
    err = Error(code, message, code in (100, 111))
    decoded = json.loads(jc.encode_error(cmd_id, err))
    assert decoded["id"] == cmd_id
    assert decoded["error"]["code"] == code and decoded["error"]["message"] == message
    assert decoded["error"].get("temporary", False) is (code in (100, 111))


def test_loads_exact_keeps_integers_beyond_64_bits_and_nothing_else_changes() -> None:
    from centripy.engine.protocol.json_codec import dumps_exact, loads_exact

    doc = b'{"big":-123456789012345678901234567890,"s":"12345678901234567890","f":1.5}'
    value = loads_exact(doc)
    assert value["big"] == -123456789012345678901234567890
    assert dumps_exact(value) == doc
    assert loads_exact(b'{"n":18446744073709551615}') == {"n": 2**64 - 1}
    for bad in (b"NaN", b'{"a":1', b"1" * 5000, b"[" * 2000 + b"1" * 20 + b"]" * 2000):
        with pytest.raises(ValueError):
            loads_exact(bad)
