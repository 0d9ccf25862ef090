"""Fuzzing the transports' decoders: whatever a client sends, each one returns its result or
raises its documented error, never anything else, and never hangs.

- `LeanWebSocket.data_received` (the lean RFC 6455 frame parser) against a reference parser
  written here from the RFC, with the byte stream split at arbitrary points;
- `http11.parse_request_head` (the lean path's one HTTP head parser): None or a request
  head, which `lean_post` and `ws_protocol.accept_upgrade` then take or leave;
- `/emulation` bodies (`BadEmulationRequest`), SockJS payloads (`BadPayload`), legacy
  server-API bodies (`DecodeError`).
"""

from __future__ import annotations

import asyncio
import json
import os
import struct
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from centripy.actors.connection_core import Frame
from centripy.actors.transport import Format
from centripy.engine.api_requests import DecodeError
from centripy.engine.config import Config
from centripy.engine.metrics import Metrics
from centripy.engine.protocol import client_pb2
from centripy.transports.api_http import LegacyCommand, decode_legacy
from centripy.transports.emulation import (
    BadEmulationRequest,
    EmulationRequest,
    decode_emulation_request,
)
from centripy.transports.http11 import RequestHead, lean_post, parse_request_head
from centripy.transports.sockjs_session import BadPayload, parse_messages
from centripy.transports.websocket import LeanWebSocket
from centripy.transports.ws_protocol import Upgrade, accept_upgrade

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MANY = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --- the lean WebSocket frame parser ---------------------------------------------------------


class FakeTransport:
    """The asyncio transport `LeanWebSocket` writes to: records the bytes and the close."""

    def __init__(self) -> None:
        self.out = bytearray()
        self.closed = False
        self.aborted = False

    def write(self, data: bytes) -> None:
        assert not self.closed, "write after close"
        self.out += data

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = self.closed = True


class FakeActor:
    """The connection actor: records the messages it is told."""

    actor_inbox = None  # not a LoopActor: tell_frame only tells it

    def __init__(self) -> None:
        self.told: list[bytes] = []

    def tell(self, message: object) -> None:
        assert isinstance(message, Frame)
        self.told.append(message.data)

    def is_alive(self) -> bool:
        return True


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """`LeanWebSocket.close` arms its close timeout on the running loop."""
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def feed(
    loop: asyncio.AbstractEventLoop, chunks: list[bytes], max_size: int
) -> tuple[list[bytes], list[tuple[int, bytes]], FakeTransport]:
    """Feed `chunks` to a fresh LeanWebSocket; (messages told, frames written, transport)."""
    ctx: Any = SimpleNamespace(
        config=Config(websocket_message_size_limit=max_size),
        node=SimpleNamespace(metrics=Metrics()),
    )
    ws = LeanWebSocket(ctx, Format.JSON, b"", set())
    transport, actor = FakeTransport(), FakeActor()
    ws._transport = transport  # type: ignore[assignment]  # connection_made, without an actor
    ws._actor = actor

    async def run() -> None:
        for chunk in chunks:
            ws.data_received(chunk)

    loop.run_until_complete(run())
    return actor.told, server_frames(bytes(transport.out)), transport


def server_frames(data: bytes) -> list[tuple[int, bytes]]:
    """The frames the server wrote: final, unmasked, minimal lengths."""
    frames, pos = [], 0
    while pos < len(data):
        b0, b1 = data[pos], data[pos + 1]
        assert b0 & 0xF0 == 0x80 and not b1 & 0x80, data[pos : pos + 2]
        size, pos = b1, pos + 2
        if size == 126:
            size, pos = struct.unpack("!H", data[pos : pos + 2])[0], pos + 2
        elif size == 127:
            size, pos = struct.unpack("!Q", data[pos : pos + 8])[0], pos + 8
        frames.append((b0 & 0x0F, data[pos : pos + size]))
        pos += size
    assert pos == len(data)
    return frames


def utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def reference(stream: bytes, max_size: int) -> tuple[list[bytes], list[tuple[int, bytes]], str]:
    """RFC 6455 server-side reading of a whole stream at once: (messages, frames the server
    sends, end) where end is "open" (more bytes expected), "closed" (the client's close
    frame) or "failed" (the connection is failed; the last frame sent is the close)."""
    messages: list[bytes] = []
    sent: list[tuple[int, bytes]] = []
    frag: list[bytes] | None = None
    frag_text = False

    def fail(code: int) -> tuple[list[bytes], list[tuple[int, bytes]], str]:
        sent.append((0x8, struct.pack("!H", code)))
        return messages, sent, "failed"

    pos = 0
    while True:
        if len(stream) - pos < 2:
            return messages, sent, "open"
        b0, b1 = stream[pos], stream[pos + 1]
        fin, opcode, length = b0 & 0x80, b0 & 0x0F, b1 & 0x7F
        if b0 & 0x70 or not b1 & 0x80:  # 5.2: no extension negotiated; 5.1: masked
            return fail(1002)
        if opcode >= 0x8 and length > 125:  # 5.5: control payloads are at most 125 bytes
            return fail(1002)
        head = 2
        if length == 126:
            head = 4
        elif length == 127:
            head = 10
        # (the parser reads an extended length together with the masking key)
        if len(stream) - pos < (head + 4 if head > 2 else 2):
            return messages, sent, "open"
        size = int.from_bytes(stream[pos + 2 : pos + head], "big") if head > 2 else length
        if size + sum(map(len, frag or [])) > max_size:
            return fail(1009)
        if len(stream) - pos < head + 4 + size:
            return messages, sent, "open"
        key = stream[pos + head : pos + head + 4]
        body = stream[pos + head + 4 : pos + head + 4 + size]
        payload = bytes(b ^ key[i % 4] for i, b in enumerate(body))
        pos += head + 4 + size
        if opcode >= 0x8:
            if not fin:  # 5.5: control frames are not fragmented
                return fail(1002)
            if opcode == 0x8:
                if not utf8(payload[2:]):  # 5.5.1 / 8.1: the reason is UTF-8
                    return fail(1007)
                sent.append((0x8, payload[:2] if len(payload) >= 2 else b""))
                return messages, sent, "closed"
            if opcode == 0x9:
                sent.append((0xA, payload))
            elif opcode != 0xA:  # reserved control opcodes
                return fail(1002)
            continue
        if opcode == 0x0:
            if frag is None:
                return fail(1002)
            frag.append(payload)
            if not fin:
                continue
            payload, text, frag = b"".join(frag), frag_text, None
        elif opcode > 0x2 or frag is not None:
            return fail(1002)
        elif not fin:
            frag, frag_text = [payload], opcode == 0x1
            continue
        else:
            text = opcode == 0x1
        if text and not utf8(payload):
            return fail(1007)
        messages.append(payload)


def client_frame(opcode: int, payload: bytes, fin: bool = True, key: bytes = b"") -> bytes:
    key = key or os.urandom(4)
    b0 = (0x80 if fin else 0) | opcode
    size = len(payload)
    if size < 126:
        head = bytes((b0, 0x80 | size))
    elif size <= 0xFFFF:
        head = struct.pack("!BBH", b0, 0xFE, size)
    else:
        head = struct.pack("!BBQ", b0, 0xFF, size)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


@st.composite
def raw_frames(draw: st.DrawFn) -> bytes:
    """A frame with any header bits, length encoding (also non-minimal or huge) and payload;
    masked most of the time so that parsing goes past the first check."""
    b0 = draw(st.integers(0, 255))
    masked = draw(st.integers(0, 9)) > 0
    payload = draw(st.binary(max_size=140) | st.text(max_size=40).map(str.encode))
    encoding = draw(st.sampled_from(["7", "16", "64", "huge"]))
    size = len(payload)
    if encoding == "7" and size < 126:
        head = bytes((b0, masked << 7 | size))
    elif encoding in ("7", "16"):
        head = struct.pack("!BBH", b0, masked << 7 | 126, size)
    elif encoding == "64":
        head = struct.pack("!BBQ", b0, masked << 7 | 127, size)
    else:  # a length the payload does not have (over the limit, or the top bit set)
        head = struct.pack("!BBQ", b0, masked << 7 | 127, draw(st.integers(size, 2**64 - 1)))
    if not masked:
        return head + payload
    key = draw(st.binary(min_size=4, max_size=4))
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


@st.composite
def valid_frames(draw: st.DrawFn) -> bytes:
    """One well-formed client frame: a text/binary message in 1-3 fragments, a ping, a pong."""
    kind = draw(st.sampled_from(["text", "binary", "ping", "pong"]))
    if kind in ("ping", "pong"):
        return client_frame(0x9 if kind == "ping" else 0xA, draw(st.binary(max_size=125)))
    data = draw(st.text(max_size=60)).encode() if kind == "text" else draw(st.binary(max_size=90))
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=2)))
    parts = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    out = b""
    for i, part in enumerate(parts):
        opcode = 0 if i else (0x1 if kind == "text" else 0x2)
        out += client_frame(opcode, part, fin=i == len(parts) - 1)
    return out


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


def check_against_reference(
    loop: asyncio.AbstractEventLoop, stream: bytes, cuts: list[int], max_size: int
) -> str:
    told, written, transport = feed(loop, split(stream, cuts), max_size)
    messages, sent, end = reference(stream, max_size)
    assert told == messages
    assert [(op, data if op != 0x8 else data[:2]) for op, data in written] == sent
    assert transport.closed == (end != "open")
    if end == "failed":
        assert sent[-1][0] == 0x8
        assert struct.unpack("!H", sent[-1][1])[0] in (1002, 1007, 1009)
    return end


@MANY
@given(
    st.lists(raw_frames() | valid_frames() | st.binary(max_size=8), max_size=6),
    st.lists(st.integers(0, 2000), max_size=8),
    st.integers(0, 300),
)
def test_lean_parser_matches_the_reference(
    loop: asyncio.AbstractEventLoop, frames: list[bytes], cuts: list[int], max_size: int
) -> None:
    check_against_reference(loop, b"".join(frames), cuts, max_size)


@FAST
@given(st.binary(max_size=400), st.lists(st.integers(0, 400), max_size=10))
def test_lean_parser_on_random_bytes(
    loop: asyncio.AbstractEventLoop, stream: bytes, cuts: list[int]
) -> None:
    check_against_reference(loop, stream, cuts, 65536)


@FAST
@given(st.lists(valid_frames(), min_size=1, max_size=8), st.data())
def test_valid_frames_split_anywhere_deliver_the_same_messages(
    loop: asyncio.AbstractEventLoop, frames: list[bytes], data: st.DataObject
) -> None:
    stream = b"".join(frames)
    whole = feed(loop, [stream], 65536)
    assert check_against_reference(loop, stream, [], 65536) == "open"
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=len(stream)))
    told, written, transport = feed(loop, split(stream, cuts), 65536)
    assert (told, written) == whole[:2]
    assert not transport.closed and all(op == 0xA for op, _ in written)
    byte_by_byte = feed(loop, [stream[i : i + 1] for i in range(len(stream))], 65536)
    assert byte_by_byte[:2] == whole[:2]


@pytest.mark.parametrize(
    ("stream", "code"),
    [
        (client_frame(0x1, b"\xff"), 1007),
        (client_frame(0x1, "é".encode()[:1], fin=False) + client_frame(0x0, b"x"), 1007),
        (client_frame(0x1, b"\xed\xa0\x80"), 1007),  # an encoded surrogate
        (client_frame(0x1, b"\xc0\xaf"), 1007),  # an overlong form
        (client_frame(0x8, b"\x03\xe8\xff"), 1007),  # a close reason that is not UTF-8
        (b"\x89\xfe\x00\x7e" + b"k" * 4, 1002),  # a ping announcing 126 bytes, no payload yet
        (b"\x81\xff" + b"\xff" * 8 + b"k" * 4, 1009),  # a 2^64-1 byte message
    ],
    ids=["bad", "split-char", "surrogate", "overlong", "close-reason", "long-ping", "huge"],
)
def test_failures_close_with_the_rfc_code(
    loop: asyncio.AbstractEventLoop, stream: bytes, code: int
) -> None:
    told, written, transport = feed(loop, [stream], 65536)
    assert told == [] and transport.closed
    assert written[-1][0] == 0x8 and struct.unpack("!H", written[-1][1][:2])[0] == code


def test_text_fragments_split_inside_a_character_are_valid(
    loop: asyncio.AbstractEventLoop,
) -> None:
    data = "é€😀".encode()
    stream = b"".join(
        client_frame(0x1 if i == 0 else 0x0, data[i : i + 1], fin=i == len(data) - 1)
        for i in range(len(data))
    )
    told, written, transport = feed(loop, [stream], 65536)
    assert told == [data] and written == [] and not transport.closed


def test_a_one_byte_close_body_gets_an_empty_close(loop: asyncio.AbstractEventLoop) -> None:
    _, written, transport = feed(loop, [client_frame(0x8, b"\x03")], 65536)
    assert written == [(0x8, b"")] and transport.closed


# --- HTTP heads --------------------------------------------------------------------------------

HEADER_NAMES = [
    b"Host", b"Content-Length", b"content-length", b"Transfer-Encoding", b"Expect", b"Upgrade",
    b"Connection", b"Sec-WebSocket-Key", b"Sec-WebSocket-Version", b"Sec-WebSocket-Protocol",
    b"Origin", b"Sec-WebSocket-Origin", b"X-API-Key", b"Authorization", b" Host", b"Ho st", b"",
]  # fmt: skip
HEADER_VALUES = [
    b"websocket", b"Upgrade", b"keep-alive, Upgrade", b"close", b"13", b"8", b"7", b"12",
    b"dGhlIHNhbXBsZSBub25jZQ==", b"centrifuge-protobuf, centrifuge-json", b"0", b"12", b"-1",
    b"+5", b" 7 ", b"1_000", "\u0663".encode(), "\u00b2".encode("latin-1"), b"\xff\xfe",
    b"18446744073709551616", b"chunked", b"100-continue", b"", b"a:b", b"\x00",
]  # fmt: skip
MANGLES = [b"\r", b"\n", b"\r\n", b"\t", b" ", b":", b"\x00", b"\xff", b"%", b"#", b"?"]


@st.composite
def heads(draw: st.DrawFn) -> bytes:
    """A request head built from plausible and hostile pieces, often one byte mangled."""
    method = draw(st.sampled_from([b"POST", b"GET", b"post", b"PUT", b"", b"POST "]))
    target = draw(
        st.sampled_from([b"/api", b"/api/publish", b"/connection/websocket", b"*", b""])
        | st.binary(max_size=20)
    )
    if draw(st.booleans()):
        target += b"?" + draw(st.binary(max_size=10))
    version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2", b"http/1.1", b""]))
    lines = [method + b" " + target + b" " + version]
    for _ in range(draw(st.integers(0, 8))):
        name = draw(st.sampled_from(HEADER_NAMES) | st.binary(max_size=8))
        value = draw(st.sampled_from(HEADER_VALUES) | st.binary(max_size=12))
        lines.append(name + draw(st.sampled_from([b": ", b":", b" : ", b""])) + value)
    head = b"\r\n".join(lines)
    if head and draw(st.booleans()):
        at = draw(st.integers(0, len(head)))
        head = head[:at] + draw(st.sampled_from(MANGLES)) + head[at:]
    return head + b"\r\n\r\n"


ANY_HEAD = heads() | st.binary(max_size=200).map(lambda b: b + b"\r\n\r\n")


@MANY
@given(ANY_HEAD)
def test_parse_request_head_returns_none_or_a_request(head: bytes) -> None:
    request = parse_request_head(head)
    if request is None:
        return
    assert isinstance(request, RequestHead)
    assert request.path.startswith("/") and request.content_length >= 0
    assert all(name == name.lower() for name in request.headers)
    assert set(request.headers) == {name for name, _ in request.fields}
    if lean_post(request):
        assert head.startswith(b"POST /")
        assert not {"transfer-encoding", "expect", "upgrade"} & set(request.headers)
    upgrade = accept_upgrade(request)
    if upgrade is not None:
        assert isinstance(upgrade, Upgrade)
        assert head.startswith(b"GET /") and upgrade.path.startswith("/") and upgrade.key
        assert upgrade.response(None).startswith(b"HTTP/1.1 101 ")


def test_parse_request_head_content_length_of_5000_digits() -> None:
    head = b"POST /api HTTP/1.1\r\nContent-Length: " + b"1" * 5000 + b"\r\n\r\n"
    assert parse_request_head(head) is None  # Tornado answers it (400)


# --- /emulation bodies -----------------------------------------------------------------------

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=12,
)


def as_json(value: object) -> bytes:
    return json.dumps(value).encode()  # NaN/Infinity and huge ints: not JSON, must be refused


@st.composite
def emulation_bodies(draw: st.DrawFn) -> bytes:
    """`{"node","session","data"}` with the right or a wrong type in each key."""
    obj = {}
    for key, good in (("node", st.text(max_size=8)), ("session", st.text(max_size=8))):
        if draw(st.booleans()):
            obj[key] = draw(good | JSON_VALUES)
    if draw(st.integers(0, 3)):
        obj["data"] = draw(st.text(max_size=30) | JSON_VALUES)
    return as_json(obj if draw(st.integers(0, 5)) else draw(JSON_VALUES))


@MANY
@given(emulation_bodies() | st.binary(max_size=80), st.booleans())
def test_emulation_body_decodes_or_is_bad(body: bytes, protobuf: bool) -> None:
    try:
        req = decode_emulation_request(body, protobuf=protobuf)
    except BadEmulationRequest:
        return
    assert isinstance(req, EmulationRequest)
    assert isinstance(req.node, str) and isinstance(req.session, str)
    assert isinstance(req.data, bytes)


@FAST
@given(st.text(max_size=10), st.text(max_size=10), st.text(max_size=40))
def test_emulation_json_body_round_trip(node: str, session: str, data: str) -> None:
    body = as_json({"node": node, "session": session, "data": data})
    assert decode_emulation_request(body, protobuf=False) == (node, session, data.encode())


@FAST
@given(st.text(max_size=10), st.text(max_size=10), st.binary(max_size=40))
def test_emulation_protobuf_body_round_trip(node: str, session: str, data: bytes) -> None:
    body = client_pb2.EmulationRequest(node=node, session=session, data=data).SerializeToString()
    assert decode_emulation_request(body, protobuf=True) == (node, session, data)


# --- SockJS payloads --------------------------------------------------------------------------


@MANY
@given(
    st.binary(max_size=80)
    | JSON_VALUES.map(as_json)
    | st.lists(st.text(max_size=8), max_size=4).map(as_json)
)
def test_sockjs_payload_parses_or_is_bad(payload: bytes) -> None:
    try:
        messages = parse_messages(payload)
    except BadPayload as exc:
        assert str(exc) in ("Payload expected.", "Broken JSON encoding.")
        return
    assert isinstance(messages, list) and all(isinstance(m, str) for m in messages)
    for message in messages:
        message.encode()  # what Session.accept does with each: never a lone surrogate


@pytest.mark.parametrize(
    "payload",
    [b'["\\ud800"]', b'"\\udfff"', b"[" * 5000, b'["' + b"\xff" + b'"]', b"[1e999]", b"NaN"],
    ids=["surrogate", "low-surrogate", "nesting", "not-utf8", "infinity", "nan"],
)
def test_sockjs_hostile_payloads_are_bad(payload: bytes) -> None:
    with pytest.raises(BadPayload):
        parse_messages(payload)


# --- legacy server-API bodies ------------------------------------------------------------------


@st.composite
def legacy_commands(draw: st.DrawFn) -> object:
    obj: dict[str, object] = {}
    if draw(st.booleans()):
        obj[draw(st.sampled_from(["id", "ID"]))] = draw(st.integers(-1, 2**32) | JSON_VALUES)
    if draw(st.booleans()):
        obj[draw(st.sampled_from(["method", "Method"]))] = draw(
            st.sampled_from(["publish", "PUBLISH", "info", "connections", "nope", 0, 12, 99])
            | JSON_VALUES
        )
    if draw(st.booleans()):
        obj["params"] = draw(JSON_VALUES)
    return obj if draw(st.integers(0, 5)) else draw(JSON_VALUES)


LEGACY_BODIES = st.lists(legacy_commands(), max_size=3).map(
    lambda cmds: b"\n".join(as_json(c) for c in cmds)
) | st.binary(max_size=60)


@MANY
@given(LEGACY_BODIES)
def test_legacy_body_decodes_or_is_a_decode_error(body: bytes) -> None:
    try:
        commands = decode_legacy(body)
    except DecodeError:
        return
    assert all(isinstance(c, LegacyCommand) for c in commands)
    assert all(0 <= c.id <= 2**32 - 1 for c in commands)


@pytest.mark.parametrize(
    "body", [b"1" * 5000, b'{"params":' + b"[" * 100_000 + b"}"], ids=["digits", "nesting"]
)
def test_legacy_body_hostile_json_is_a_decode_error(body: bytes) -> None:
    with pytest.raises(DecodeError):
        decode_legacy(body)
