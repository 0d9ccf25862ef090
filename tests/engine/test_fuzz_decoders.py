"""Fuzzing the engine's decoders: for any input, a decoder returns its typed result or raises
its documented error (`ProtocolError` for client commands, `DecodeError` / `Error` 104 for the
server API), never anything else.

- the client command decoders the connection actor calls (`ConnContext.decode` ->
  `json_codec.decode_commands` / `protobuf_codec.decode_commands`), the bare connect request
  of unidirectional transports and the protobuf emulation body: random bytes, and
  structured input (valid-looking commands with wrong types, deep nesting, huge numbers,
  invalid UTF-8, NaN/Infinity, lone surrogates, truncated or corrupted protobuf);
- `engine.api.decode_request` for every server-API method.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from types import SimpleNamespace
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from centripy.actors.context import ConnContext
from centripy.actors.transport import Format
from centripy.engine import api_requests as api
from centripy.engine.channels import SubscribeOverride
from centripy.engine.protocol import client_pb2 as pb
from centripy.engine.protocol import commands as c
from centripy.engine.protocol import json_codec, protobuf_codec
from centripy.engine.protocol.codes import Error

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MANY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

REQUEST_TYPES: dict[str, type] = {
    "connect": c.ConnectRequest,
    "subscribe": c.SubscribeRequest,
    "unsubscribe": c.UnsubscribeRequest,
    "publish": c.PublishRequest,
    "presence": c.PresenceRequest,
    "presence_stats": c.PresenceStatsRequest,
    "history": c.HistoryRequest,
    "rpc": c.RPCRequest,
    "send": c.SendRequest,
    "refresh": c.RefreshRequest,
    "sub_refresh": c.SubRefreshRequest,
}
assert set(REQUEST_TYPES) == set(c.METHODS)

# What a decoded request's fields may hold (str, bool, bytes, bounded int).
U64 = 2**64 - 1


def check_request(request: object) -> None:
    """Every field of a decoded request has its declared type and range."""
    if isinstance(request, c.ConnectRequest):
        for channel, sub in request.subs.items():
            assert isinstance(channel, str) and sub.channel == channel
            check_request(sub)
    if isinstance(request, c.HistoryRequest):
        assert -(2**31) <= request.limit < 2**31
        if request.since is not None:
            assert 0 <= request.since.offset <= U64 and isinstance(request.since.epoch, str)
    for name in request.__slots__:  # type: ignore[attr-defined]
        value = getattr(request, name)
        if name in ("channel", "token", "epoch", "delta", "name", "version", "method"):
            assert isinstance(value, str)
            value.encode()  # no lone surrogate
        elif name in ("recover", "positioned", "recoverable", "join_leave", "reverse"):
            assert isinstance(value, bool)
        elif name == "data":
            assert isinstance(value, bytes)
        elif name == "offset":
            assert type(value) is int and 0 <= value <= U64


def check_commands(commands: object, json_data: bool) -> None:
    assert isinstance(commands, list) and commands
    for cmd in commands:
        assert isinstance(cmd, c.Command)
        assert type(cmd.id) is int and 0 <= cmd.id < 2**32
        if cmd.method == "":
            assert cmd.request is None
            continue
        assert isinstance(cmd.request, REQUEST_TYPES[cmd.method])
        check_request(cmd.request)
        data = getattr(cmd.request, "data", b"")
        if json_data and data:
            orjson.loads(data)  # raw JSON payloads stay valid JSON
            assert b"\n" not in data  # and cannot break the JSON-lines framing


def decode_or_protocol_error(fmt: Format, frame: bytes) -> list[c.Command] | None:
    """What the connection actor does (`self.ctx.decode(self.fmt, data)`)."""
    ctx: Any = SimpleNamespace(codec=lambda f: ConnContext.codec(ctx, f))
    try:
        commands = ConnContext.decode(ctx, fmt, frame)
    except c.ProtocolError:
        return None
    check_commands(commands, json_data=fmt == Format.JSON)
    return commands


# --- JSON: structured input --------------------------------------------------------------------


class Raw:
    """A JSON text fragment put verbatim into the generated document."""

    def __init__(self, text: bytes) -> None:
        self.text = text


def render(value: object) -> bytes:
    """JSON bytes of `value`, `Raw` fragments verbatim (so the output may be hostile)."""
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, dict):
        return b"{" + b",".join(render(k) + b":" + render(v) for k, v in value.items()) + b"}"
    if isinstance(value, list):
        return b"[" + b",".join(render(v) for v in value) + b"]"
    return json.dumps(value).encode()


HOSTILE = st.sampled_from(
    [
        Raw(b"NaN"), Raw(b"-Infinity"), Raw(b"Infinity"), Raw(b"1e400"), Raw(b"-1e400"),
        Raw(b"1" * 5000), Raw(b"-" + b"9" * 30), Raw(b"18446744073709551616"),
        Raw(b"18446744073709551615"), Raw(b"4294967296"), Raw(b"4294967295"), Raw(b"-1"),
        Raw(b"-0"), Raw(b"1.0"), Raw(b"1e2"), Raw(b"0x10"), Raw(b"01"), Raw(b'"\xff"'),
        Raw(b'"\xed\xa0\x80"'), Raw(b'"\\ud800"'), Raw(b'"\\udc00x"'), Raw(b'"a\x00b"'),
        Raw(b'"\xc0\xaf"'), Raw(b"[" * 300 + b"]" * 300), Raw(b"[" * 1100 + b"]" * 1100),
        Raw(b'{"a":' * 600 + b"1" + b"}" * 600), Raw(b"[" * 50), Raw(b"tru"), Raw(b"'x'"),
        Raw(b'"\n"'), Raw(b"\n"), Raw(b'"\\u2028"'), Raw(b"true false"), Raw(b""),
    ]
)  # fmt: skip
SCALARS = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.text(max_size=8)
FIELD_VALUES = st.recursive(
    SCALARS | HOSTILE | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=8,
)
KEYS = [
    "channel", "token", "recover", "epoch", "offset", "data", "positioned", "recoverable",
    "join_leave", "delta", "subs", "name", "version", "limit", "since", "reverse", "method",
    "flag", "headers", "tf", "type",
]  # fmt: skip
METHOD_KEYS = [*c.METHODS, "ping", "Connect", "PUBLISH", ""]


@st.composite
def json_bodies(draw: st.DrawFn) -> object:
    keys = draw(st.lists(st.sampled_from(KEYS), max_size=6))
    return (
        {key: draw(FIELD_VALUES) for key in keys} if draw(st.integers(0, 6)) else draw(FIELD_VALUES)
    )


@st.composite
def json_commands(draw: st.DrawFn) -> object:
    cmd: dict[str, object] = {}
    if draw(st.booleans()):
        cmd["id"] = draw(st.integers(-1, 2**32) | FIELD_VALUES)
    for method in draw(st.lists(st.sampled_from(METHOD_KEYS), max_size=2)):
        cmd[method] = draw(json_bodies())
    return cmd if draw(st.integers(0, 8)) else draw(FIELD_VALUES)


@st.composite
def json_frames(draw: st.DrawFn) -> bytes:
    lines = [render(cmd) for cmd in draw(st.lists(json_commands(), min_size=1, max_size=3))]
    frame = draw(st.sampled_from([b"\n", b"\r\n", b"\n\n"])).join(lines)
    if draw(st.booleans()):
        frame += draw(st.sampled_from([b"\n", b"\n\n", b" ", b"\x00", b"\xff"]))
    return frame


@MANY
@given(json_frames())
def test_json_structured_commands_decode_or_protocol_error(frame: bytes) -> None:
    decode_or_protocol_error(Format.JSON, frame)


@FAST
@given(st.binary(max_size=200))
def test_json_random_bytes_decode_or_protocol_error(frame: bytes) -> None:
    decode_or_protocol_error(Format.JSON, frame)


@FAST
@given(json_bodies().map(render) | st.binary(max_size=80))
def test_json_bare_connect_request_decodes_or_protocol_error(body: bytes) -> None:
    try:
        request = json_codec.decode_connect_request(body)
    except c.ProtocolError:
        return
    assert isinstance(request, c.ConnectRequest)
    check_request(request)


@pytest.mark.parametrize(
    "frame",
    [
        b'{"id":NaN}', b'{"id":Infinity,"connect":{}}', b'{"id":1e400}', b'{"id":-1}',
        b'{"id":4294967296,"connect":{}}', b'{"id":1.0,"connect":{}}', b'{"id":"1"}',
        b'{"id":1,"publish":{"channel":"\xff"}}', b'{"id":1,"publish":{"channel":"\\ud800"}}',
        b'{"id":1,"subscribe":{"offset":18446744073709551616}}',
        b'{"id":1,"subscribe":{"offset":-1}}', b'{"id":1,"history":{"limit":2147483648}}',
        b'{"id":1,"subscribe":{"recover":1}}', b'{"id":1,"connect":{"subs":[]}}',
        b'{"id":1,"connect":{"subs":{"a":1}}}', b'{"id":1,"history":{"since":[]}}',
        b'{"id":1,"publish":{"data":' + b"[" * 1100 + b"]" * 1100 + b"}}",
        b'{"id":1,"publish":{"data":1e400}}', b'{"id":1,"publish":[]}', b"[]", b"",
        b"\n", b'{"id":1}\n\n', b'{"id":1}\n{', b"\xef\xbb\xbf{}",
    ],
)  # fmt: skip
def test_json_hostile_frames_are_protocol_errors(frame: bytes) -> None:
    assert decode_or_protocol_error(Format.JSON, frame) is None


@FAST
@given(
    st.integers(0, 2**32 - 1),
    st.text(max_size=10),
    st.integers(0, U64),
    st.booleans(),
    st.recursive(
        st.none() | st.booleans() | st.integers(-(2**63), U64) | st.text(max_size=6),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner),
        max_leaves=6,
    ),
)
def test_json_well_typed_commands_decode_to_their_values(
    ident: int, channel: str, offset: int, recover: bool, data: object
) -> None:
    sub = {"channel": channel, "offset": offset, "recover": recover, "data": data, "flag": 7}
    frame = orjson.dumps({"id": ident, "subscribe": sub}) + b"\n" + orjson.dumps({})
    commands = decode_or_protocol_error(Format.JSON, frame)
    assert commands is not None
    first, pong = commands
    assert first.id == ident and first.method == "subscribe"
    request = first.request
    assert isinstance(request, c.SubscribeRequest)
    assert (request.channel, request.offset, request.recover) == (channel, offset, recover)
    assert orjson.loads(request.data) == data if data is not None else request.data == b""
    assert pong == c.Command(0, "", None)


def test_json_data_keeps_big_integers() -> None:
    frame = b'{"id":1,"publish":{"channel":"a","data":{"n":123456789012345678901234567890}}}'
    (cmd,) = json_codec.decode_commands(frame)
    assert isinstance(cmd.request, c.PublishRequest)
    assert cmd.request.data == b'{"n":123456789012345678901234567890}'


# --- protobuf ----------------------------------------------------------------------------------


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def field(number: int, wire: int, payload: bytes) -> bytes:
    tag = varint(number << 3 | wire)
    return tag + (varint(len(payload)) + payload if wire == 2 else payload)


@st.composite
def pb_commands(draw: st.DrawFn) -> bytes:
    """A serialised Command with random fields, from the generated classes."""
    cmd = pb.Command(id=draw(st.integers(0, 2**32 - 1)))
    method = draw(st.sampled_from([*c.METHODS, None]))
    text, blob = st.text(max_size=8), st.binary(max_size=16)
    if method == "connect":
        cmd.connect.token = draw(text)
        cmd.connect.data = draw(blob)
        for channel in draw(st.lists(text, max_size=2)):
            cmd.connect.subs[channel].offset = draw(st.integers(0, U64))
    elif method == "subscribe":
        cmd.subscribe.channel, cmd.subscribe.offset = draw(text), draw(st.integers(0, U64))
        cmd.subscribe.recover, cmd.subscribe.data = draw(st.booleans()), draw(blob)
    elif method == "history":
        cmd.history.channel, cmd.history.limit = draw(text), draw(st.integers(-(2**31), 2**31 - 1))
        if draw(st.booleans()):
            cmd.history.since.offset = draw(st.integers(0, U64))
    elif method in ("publish", "rpc", "send"):
        getattr(cmd, method).data = draw(blob)
    elif method is not None:
        getattr(cmd, method).SetInParent()
    data: bytes = cmd.SerializeToString()
    return data


HOSTILE_PB_MESSAGES = [
    field(5, 2, field(1, 2, b"\xff")),  # subscribe.channel not UTF-8
    field(7, 2, field(1, 2, b"\xed\xa0\x80")),  # publish.channel: an encoded surrogate
    field(4, 2, field(1, 2, b"\xc0\xaf")),  # connect.token: an overlong form
    field(4, 2, field(3, 2, field(1, 2, b"\xff") + field(2, 2, b""))),  # subs key
    field(1, 2, b"x"),  # id with the wrong wire type
    field(5, 0, varint(3)),  # a message field as a varint
    field(1, 0, b"\xff" * 10 + b"\x01"),  # an 11-byte varint
    field(1, 0, b"\xff" * 9 + b"\x7f"),  # a varint beyond 64 bits
    field(1, 0, b"\x80"),  # a truncated varint
    varint(5 << 3 | 2) + varint(1000) + b"x",  # a length beyond the message
    varint(99 << 3 | 3) * 200,  # deeply nested (unclosed) groups
    varint(99 << 3 | 3) * 50 + varint(99 << 3 | 4) * 50,  # nested groups
    varint(99 << 3 | 4),  # an end-group without a start
    varint(0),  # field number 0
    varint(99 << 3 | 6),  # wire type 6
    varint(99 << 3 | 7),  # wire type 7
    varint(2**29 << 3 | 0) + b"\x01",  # field number beyond the maximum
    field(5, 2, b"\x0a" * 200),  # truncated sub-messages
    field(10, 2, field(3, 2, b"\x08" + b"\xff" * 12)),  # history.since: bad varint
]
HOSTILE_PB = st.sampled_from(HOSTILE_PB_MESSAGES)


@st.composite
def pb_frames(draw: st.DrawFn) -> bytes:
    """Varint-delimited Commands: valid, hostile, or a valid one corrupted."""
    frame = b""
    for _ in range(draw(st.integers(1, 3))):
        msg = draw(pb_commands() | HOSTILE_PB)
        if msg and draw(st.integers(0, 3)) == 0:  # corrupt one byte, or truncate
            at = draw(st.integers(0, len(msg) - 1))
            if draw(st.booleans()):
                msg = msg[:at] + bytes([draw(st.integers(0, 255))]) + msg[at + 1 :]
            else:
                msg = msg[:at]
        size = len(msg) + draw(st.sampled_from([0, 0, 0, 1, -1, 2**64, 2**70]))
        prefix = varint(max(size, 0))
        if draw(st.integers(0, 9)) == 0:
            prefix = b"\xff" * draw(st.integers(1, 12))  # a broken length prefix
        frame += prefix + msg
    return frame


@MANY
@given(pb_frames())
def test_protobuf_structured_commands_decode_or_protocol_error(frame: bytes) -> None:
    decode_or_protocol_error(Format.PROTOBUF, frame)


@FAST
@given(st.binary(max_size=200))
def test_protobuf_random_bytes_decode_or_protocol_error(frame: bytes) -> None:
    decode_or_protocol_error(Format.PROTOBUF, frame)


@FAST
@given(st.lists(pb_commands(), min_size=1, max_size=4))
def test_protobuf_valid_commands_decode_to_their_values(messages: list[bytes]) -> None:
    frame = b"".join(varint(len(m)) + m for m in messages)
    commands = decode_or_protocol_error(Format.PROTOBUF, frame)
    assert commands is not None and len(commands) == len(messages)
    for cmd, msg in zip(commands, messages, strict=True):
        parsed = pb.Command.FromString(msg)
        assert cmd.id == parsed.id
        set_methods = [m for m in c.METHODS if parsed.HasField(m)]
        assert cmd.method == (set_methods[0] if set_methods else "")
        if cmd.method in ("publish", "rpc", "send"):
            assert cmd.request.data == getattr(parsed, cmd.method).data  # type: ignore[union-attr]
        if cmd.method == "subscribe":
            assert cmd.request.offset == parsed.subscribe.offset  # type: ignore[union-attr]


# What protobuf itself accepts: a known field with another wire type is an unknown field,
# a 10-byte varint is truncated to 64 bits, a closed group of an unknown field is skipped.
LENIENT = {
    field(1, 2, b"x"),
    field(5, 0, varint(3)),
    field(1, 0, b"\xff" * 9 + b"\x7f"),
    varint(99 << 3 | 3) * 50 + varint(99 << 3 | 4) * 50,
    field(10, 2, field(3, 2, b"\x08" + b"\xff" * 12)),
}


@pytest.mark.parametrize(
    "msg", HOSTILE_PB_MESSAGES, ids=[f"pb{i}" for i in range(len(HOSTILE_PB_MESSAGES))]
)
def test_protobuf_hostile_messages_are_protocol_errors(msg: bytes) -> None:
    commands = decode_or_protocol_error(Format.PROTOBUF, varint(len(msg)) + msg)
    assert (commands is None) != (msg in LENIENT)


@FAST
@given(pb_commands() | HOSTILE_PB | st.binary(max_size=80))
def test_protobuf_bare_bodies_decode_or_protocol_error(body: bytes) -> None:
    try:
        request = protobuf_codec.decode_connect_request(body)
    except c.ProtocolError:
        pass
    else:
        assert isinstance(request, c.ConnectRequest)
        check_request(request)
    try:
        emulation = protobuf_codec.decode_emulation_request(body)
    except c.ProtocolError:
        return
    assert isinstance(emulation.node, str) and isinstance(emulation.session, str)
    assert isinstance(emulation.data, bytes)


# --- the server API ------------------------------------------------------------------------

TEXT, FLAG = st.text(max_size=6), st.booleans()
POSITION = st.fixed_dictionaries({}, optional={"offset": st.integers(0, U64), "epoch": TEXT})
OVERRIDE = st.dictionaries(
    st.sampled_from(["presence", "join_leave", "force_recovery", "force_positioning"]),
    st.fixed_dictionaries({"value": FLAG}),
)
PUBLISH = {
    "channel": TEXT, "data": FIELD_VALUES, "b64data": TEXT, "skip_history": FLAG,
    "tags": st.dictionaries(TEXT, TEXT, max_size=2), "idempotency_key": TEXT,
}  # fmt: skip
SESSION = {"user": TEXT, "client": TEXT, "session": TEXT}
API_FIELDS: dict[str, dict[str, st.SearchStrategy[Any]]] = {
    "publish": PUBLISH,
    "broadcast": {**PUBLISH, "channels": st.lists(TEXT, max_size=3)},
    "subscribe": {
        **SESSION,
        "channel": TEXT,
        "info": FIELD_VALUES,
        "data": FIELD_VALUES,
        "b64info": TEXT,
        "b64data": TEXT,
        "expire_at": st.integers(-(2**63), 2**63 - 1),
        "recover_since": POSITION,
        "override": OVERRIDE,
    },
    "unsubscribe": {**SESSION, "channel": TEXT},
    "disconnect": {
        **SESSION,
        "whitelist": st.lists(TEXT, max_size=2),
        "disconnect": st.fixed_dictionaries({"code": st.integers(0, 2**32 - 1), "reason": TEXT}),
    },
    "refresh": {
        **SESSION,
        "expired": FLAG,
        "expire_at": st.integers(-(2**63), 2**63 - 1),
        "info": FIELD_VALUES,
    },
    "presence": {"channel": TEXT},
    "presence_stats": {"channel": TEXT},
    "history": {
        "channel": TEXT,
        "limit": st.integers(-(2**31), 2**31 - 1),
        "since": POSITION,
        "reverse": FLAG,
    },
    "history_remove": {"channel": TEXT},
    "info": {},
    "rpc": {"method": TEXT, "params": FIELD_VALUES},
    "channels": {"pattern": TEXT},
    "batch": {"parallel": FLAG},
}
assert set(API_FIELDS) == set(api.METHODS)
ANY_VALUE = st.recursive(
    SCALARS | st.floats(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
    max_leaves=10,
)


def unraw(value: object) -> object:
    """`Raw` fragments as the Python value the json module reads from them (or a string)."""
    if isinstance(value, Raw):
        if value.text.count(b"[") + value.text.count(b"{") > 200:
            # Deep: json.loads may succeed, and recursing over its result here (under
            # pytest's and hypothesis's frames) would hit the recursion limit in the draw.
            return value.text.decode("utf-8", "replace")
        try:
            return json.loads(value.text)
        except (ValueError, RecursionError):
            return value.text.decode("utf-8", "replace")
    if isinstance(value, dict):
        return {k: unraw(v) for k, v in value.items()}
    if isinstance(value, list):
        return [unraw(v) for v in value]
    return value


@st.composite
def api_requests(draw: st.DrawFn, method: str) -> object:
    """The method's request with each key well-typed or not, in any letter case."""
    fields = API_FIELDS[method]
    obj: dict[str, object] = {}
    for key in draw(st.lists(st.sampled_from(sorted(fields) or ["x"]), max_size=5)):
        good = fields.get(key, ANY_VALUE)
        value = draw(good if draw(st.integers(0, 2)) else ANY_VALUE)
        obj[draw(st.sampled_from([key, key.upper(), key.title()]))] = value
    if method == "batch" and draw(st.booleans()):
        inner = draw(st.sampled_from(sorted(API_FIELDS)))
        obj["commands"] = [{inner: draw(api_requests(inner))}, draw(ANY_VALUE)]
    return unraw(obj if draw(st.integers(0, 6)) else draw(ANY_VALUE))


INT_BOUNDS = {
    "limit": (-(2**31), 2**31 - 1),
    "expire_at": (-(2**63), 2**63 - 1),
    "code": (0, 2**32 - 1),
    "offset": (0, U64),
}
OPTIONAL_FLAGS = {f.name for f in dataclasses.fields(SubscribeOverride)}


def check_api_value(name: str, value: object) -> None:
    """A decoded server-API request holds only the types its fields declare."""
    if dataclasses.is_dataclass(value):
        for f in dataclasses.fields(value):
            check_api_value(f.name, getattr(value, f.name))
    elif name in INT_BOUNDS:
        low, high = INT_BOUNDS[name]
        assert type(value) is int and low <= value <= high, (name, value)
    elif name in OPTIONAL_FLAGS:
        assert value is None or type(value) is bool, (name, value)
    elif name in ("skip_history", "expired", "reverse", "parallel"):
        assert type(value) is bool, (name, value)
    elif name in ("data", "info", "params"):
        assert value is None or type(value) is bytes, (name, value)
        if value:
            orjson.loads(value)  # raw JSON, re-serialised
    elif name == "tags":
        assert isinstance(value, dict)
        assert all(type(k) is str and type(v) is str for k, v in value.items())
    elif name in ("channels", "whitelist"):
        assert type(value) is tuple and all(type(v) is str for v in value), (name, value)
    elif name == "commands":
        assert type(value) is tuple
        for command in value:
            if command is not None:
                assert command[0] in api.BATCH_ORDER
                check_api_value(command[0], command[1])
    elif name in ("recover_since", "since", "override"):
        assert value is None, (name, value)  # otherwise a dataclass, handled above
    else:
        assert type(value) is str, (name, value)
        value.encode()


@pytest.mark.parametrize("method", sorted(api.METHODS))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_api_decode_request_returns_a_request_or_decode_error(
    method: str, data: st.DataObject
) -> None:
    value = data.draw(api_requests(method))
    try:
        request = api.decode_request(method, value)
    except api.DecodeError:
        return
    assert isinstance(request, api.Request.__args__)  # type: ignore[attr-defined]
    check_api_value(method, request)


JSONISH = st.recursive(
    SCALARS | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=8,
)
PUBLISH_KEYS = ["channel", "data", "Channel", "DATA", "tags", "b64data", "idempotency_key"]


def generic_publish(value: object) -> object:
    """The field-by-field reader's publish request, or its DecodeError's message."""
    try:
        return api._DECODERS["publish"](api._Obj(value, ("publish",)))
    except api.DecodeError as exc:
        return str(exc)


@MANY
@given(st.dictionaries(st.sampled_from(PUBLISH_KEYS), JSONISH, max_size=4) | JSONISH)
def test_api_plain_publish_fast_path_decodes_as_the_generic_reader(value: object) -> None:
    """`{"channel", "data"}` takes a fast path (alone and in a batch); whatever takes it
    decodes exactly as the generic reader does, and everything else goes that way."""
    expected = generic_publish(value)
    fast = api._plain_publish(value)
    if fast is not None:
        assert fast == expected
    try:
        single: object = api.decode_request("publish", value)
    except api.DecodeError as exc:
        single = str(exc)
    assert single == expected
    if isinstance(expected, api.PublishRequest) and value is not None:  # null: no command
        batch = api.decode_request("batch", {"commands": [{"publish": value}]})
        assert isinstance(batch, api.BatchRequest)
        assert batch.commands == (("publish", expected),)


def test_api_plain_publish_fast_path_is_taken_for_the_common_shape() -> None:
    value = {"channel": "news", "data": {"text": "hi", "n": 2**70}}
    fast = api._plain_publish(value)
    assert fast == generic_publish(value)
    assert fast is not None and fast.body.data == b'{"text":"hi","n":1180591620717411303424}'
    assert api._plain_publish({"channel": "news"}) == generic_publish({"channel": "news"})
    assert api._plain_publish({"Channel": "news", "data": 1}) is None  # the generic reader's


@FAST
@given(st.binary(max_size=120), st.sampled_from(sorted(api.METHODS)))
def test_api_bodies_parsed_by_orjson(body: bytes, method: str) -> None:
    """What the HTTP API and the consumers do: orjson, then decode_request."""
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError:
        return
    with contextlib.suppress(api.DecodeError):
        check_api_value(method, api.decode_request(method, value))


def _nested(depth: int) -> list[object]:
    value: list[object] = []
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ({"channel": "a", "data": 2**64}, True),  # beyond 64 bits: written exactly
        ({"channel": "a", "data": json.loads("[" * 200 + "]" * 200)}, True),
        ({"channel": "a", "data": json.loads("[" * 400 + "]" * 400)}, True),  # json writes it
        ({"channel": "a", "data": _nested(5000)}, False),  # deeper than the encoders go
        ({"channel": "a", "data": float("nan")}, True),  # from a consumer's json: null
        ({"channel": "a", "tags": {"k": 1}}, False),
        ({"channel": "a", "tags": []}, False),
        ({"channel": 1}, False),
        ({"channel": True}, False),
        ({"Channel": "a", "CHANNEL": ["b"]}, False),  # the last matching key wins
        ({"CHANNEL": ["b"], "Channel": "a"}, True),
        ([], False),
        (None, True),
    ],
)
def test_api_hostile_publish_requests(value: object, ok: bool) -> None:
    if not ok:
        with pytest.raises(api.DecodeError):
            api.decode_request("publish", value)
        return
    assert isinstance(api.decode_request("publish", value), api.PublishRequest)


def test_api_unknown_method_is_error_104() -> None:
    with pytest.raises(Error) as info:
        api.decode_request("connections", {})
    assert info.value.code == 104
