"""Sans-I/O WebSocket, server side (RFC 6455, no extensions), in the manner of
python-websockets' `Protocol`: bytes in, events out, bytes out; no sockets, loops, clocks or
actors. The asyncio adapter is `websocket.LeanWebSocket`; what needs time (the close
timeout), backpressure and the connection actor live there only.

- The handshake: `accept_upgrade(request)` takes the `http11.RequestHead` of a GET and
  returns the `Upgrade` to answer (its `response()` is the 101), or None when the request is
  not a well-formed handshake (Tornado then answers it with its own errors).
- Frames in: `ServerProtocol.receive_data(data)`; then the caller writes
  `data_to_send()` (pongs, close frames) and handles `events_received()`: a `Message` per
  complete data message (fragments joined, text checked as UTF-8), a `Close` when the
  connection is over (the caller then closes the TCP connection; RFC 6455 7.1.1: the server
  closes first).
- Pongs: `pongs` counts the pong frames received, for a caller that sends pings.
- Frames out: `frame(opcode, data)` for data frames, written by the caller itself while
  `state is State.OPEN` (the fan-out hot path: no buffer or call in between); the closing
  handshake through `send_close`.

Errors never raise: a peer that breaks the protocol gets a close frame with 1002 (framing),
1007 (invalid UTF-8) or 1009 (a message over `max_size`) and a `Close(failed=True)` event.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

from centripy.transports.http11 import RequestHead
from centripy.transports.tornado_compat import websocket_mask

OP_CONT: Final = 0x0
OP_TEXT: Final = 0x1
OP_BINARY: Final = 0x2
OP_CLOSE: Final = 0x8
OP_PING: Final = 0x9
OP_PONG: Final = 0xA

_GUID: Final = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 1.3
_VERSIONS: Final = ("13", "8", "7")  # what Tornado accepts
_NOTHING: Final[tuple[()]] = ()


class State(enum.Enum):
    OPEN = 1  # messages flow both ways
    CLOSING = 2  # our close frame is sent; waiting for the peer's (messages in are dropped)
    CLOSED = 3  # the peer's close frame arrived, or it broke the protocol: close TCP now


@dataclass(frozen=True, slots=True)
class Message:
    """A complete data message from the peer."""

    data: bytes
    text: bool


@dataclass(frozen=True, slots=True)
class Close:
    """The connection is over: the peer's close frame arrived (`code` is its status code,
    None for an empty body) or the peer broke the protocol (`failed`; `code` is the one we
    sent, or None when we had sent our close frame already)."""

    code: int | None
    failed: bool


Event = Message | Close


def frame(opcode: int, data: bytes) -> bytes:
    """One final, unmasked WebSocket frame (RFC 6455 5.2), as a server sends it."""
    size = len(data)
    if size < 126:
        header = bytes((0x80 | opcode, size))
    elif size <= 0xFFFF:
        header = struct.pack("!BBH", 0x80 | opcode, 126, size)
    else:
        header = struct.pack("!BBQ", 0x80 | opcode, 127, size)
    return header + data


def utf8(data: bytes) -> bool:
    """True when `data` is valid UTF-8 (RFC 3629: no surrogates, no overlong forms)."""
    if data.isascii():
        return True
    try:
        data.decode()
    except UnicodeDecodeError:
        return False
    return True


# -- the handshake --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Upgrade:
    """A WebSocket handshake the lean path may answer (see `accept_upgrade`)."""

    path: str
    query: str
    key: bytes
    subprotocols: tuple[str, ...]
    origin: str | None  # Origin (or the old Sec-WebSocket-Origin); None when absent
    headers: Mapping[str, str] = field(default_factory=dict)  # lower-cased names, first value

    def response(self, subprotocol: str | None) -> bytes:
        """The `101 Switching Protocols` answer (RFC 6455 4.2.2)."""
        accept = base64.b64encode(hashlib.sha1(self.key + _GUID).digest())
        head = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
        head += b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n"
        if subprotocol:
            head += b"Sec-WebSocket-Protocol: " + subprotocol.encode() + b"\r\n"
        return head + b"\r\n"


def accept_upgrade(request: RequestHead) -> Upgrade | None:
    """The handshake in `request` when it is a well-formed one (RFC 6455 4.2.1, with
    Tornado's checks: GET, HTTP/1.1, Host, `Upgrade: websocket`, `Connection: upgrade`, a
    key, version 7, 8 or 13; repeated headers count joined by commas); None otherwise."""
    if request.method != "GET" or request.http10:
        return None
    joined = request.joined
    connection = {token.strip() for token in (joined("connection") or "").lower().split(",")}
    key = joined("sec-websocket-key")
    if (
        (joined("upgrade") or "").lower() != "websocket"
        or "upgrade" not in connection
        or not joined("host")
        or not key
        or joined("sec-websocket-version") not in _VERSIONS
    ):
        return None
    offered = joined("sec-websocket-protocol")
    origin = joined("origin")
    return Upgrade(
        path=request.path,
        query=request.query,
        key=key.encode("latin-1"),
        subprotocols=tuple(p.strip() for p in offered.split(",")) if offered else (),
        origin=joined("sec-websocket-origin") if origin is None else origin,
        headers=request.headers,
    )


# -- the connection -------------------------------------------------------------------------


class ServerProtocol:
    """One server-side WebSocket connection after the handshake. Called from one thread
    (the event loop's); every method returns at once."""

    __slots__ = (
        "_buf",
        "_events",
        "_frag",
        "_frag_size",
        "_frag_text",
        "_need",
        "_out",
        "max_size",
        "pongs",
        "state",
    )

    def __init__(self, max_size: int) -> None:
        self.state = State.OPEN
        self.max_size = max_size  # the largest message (fragments joined) we accept
        self._buf = bytearray()  # an incomplete frame
        self._need = 2  # bytes _buf must hold before the next parse
        self._frag: list[bytes] | None = None  # parts of a fragmented message
        self._frag_size = 0
        self._frag_text = False  # the fragmented message is a text one (UTF-8 checked)
        self._out: list[bytes] = []  # frames to send (pongs, close frames)
        self._events: list[Event] = []
        self.pongs = 0  # pong frames received (a caller that pings watches it)

    @property
    def closed(self) -> bool:
        """True once the connection is over (CLOSED): the caller closes TCP."""
        return self.state is State.CLOSED

    # -- bytes in -------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Bytes from the peer, split anyhow. Then the caller must write `data_to_send()`,
        then handle `events_received()`. Ignored once the state is CLOSED."""
        if self.closed:
            return
        buf = self._buf
        if buf:
            buf += data
            if len(buf) < self._need:
                return
            data = bytes(buf)
            buf.clear()
        pos, end = 0, len(data)
        while end - pos >= 2:
            b0, b1 = data[pos], data[pos + 1]
            # reserved bits (no extension), unmasked, a control frame over 125 bytes
            if b0 & 0x70 or not b1 & 0x80 or (b0 & 0x08 and b1 & 0x7F > 125):
                self._fail(1002)
                return
            size = b1 & 0x7F
            if size < 126:
                head = pos + 6
            elif size == 126:
                head = pos + 8
                if end < head:
                    break
                size = int.from_bytes(data[pos + 2 : pos + 4], "big")
            else:
                head = pos + 14
                if end < head:
                    break
                size = int.from_bytes(data[pos + 2 : pos + 10], "big")
            if size + self._frag_size > self.max_size:
                self._fail(1009, "message too big")
                return
            stop = head + size
            if end < stop:
                break
            payload = websocket_mask(data[head - 4 : head], data[head:stop])
            pos = stop
            self._on_frame(b0 & 0x80, b0 & 0x0F, payload)
            if self.closed:
                return
        if pos < end:
            buf += data[pos:]
            self._need = 2 if end - pos < 2 else _frame_size(data, pos)

    def receive_eof(self) -> None:
        """The TCP connection is gone: nothing more can be sent or received."""
        self.state = State.CLOSED
        self._buf.clear()
        self._frag = None

    def _on_frame(self, fin: int, opcode: int, payload: bytes) -> None:
        if opcode >= OP_CLOSE:
            if not fin:
                self._fail(1002)  # control frames are not fragmented (5.5)
            elif opcode == OP_CLOSE:
                self._on_close_frame(payload)
            elif opcode == OP_PING:
                if self.state is State.OPEN:
                    self._out.append(frame(OP_PONG, payload))
            elif opcode == OP_PONG:
                self.pongs += 1
            else:  # a reserved control opcode
                self._fail(1002)
            return
        if opcode == OP_CONT:
            if self._frag is None:
                self._fail(1002)  # a continuation of nothing
                return
            self._frag.append(payload)
            self._frag_size += len(payload)
            if not fin:
                return
            payload = b"".join(self._frag)
            self._frag, self._frag_size = None, 0
            text = self._frag_text
        elif opcode > OP_BINARY or self._frag is not None:  # unknown opcode, or a new
            self._fail(1002)  # message inside a fragmented one
            return
        elif not fin:
            self._frag, self._frag_size = [payload], len(payload)
            self._frag_text = opcode == OP_TEXT
            return
        else:
            text = opcode == OP_TEXT
        if self.state is not State.OPEN:
            return  # after our close frame, messages are dropped
        if text and not utf8(payload):
            self._fail(1007)  # RFC 6455 8.1 (Tornado aborts without a close frame)
            return
        self._events.append(Message(payload, text))

    def _on_close_frame(self, payload: bytes) -> None:
        """The peer's close: echo its code (5.5.1) unless we closed first. Like Tornado, any
        code is echoed and a 1-byte body gets an empty close frame; a reason that is not
        UTF-8 fails the connection (1007; Tornado drops it without a close frame)."""
        if not utf8(payload[2:]):
            self._fail(1007)
            return
        code = payload[:2] if len(payload) >= 2 else b""
        if self.state is State.OPEN:
            self._out.append(frame(OP_CLOSE, code))
        self.state = State.CLOSED
        self._events.append(Close(int.from_bytes(code, "big") if code else None, False))

    def _fail(self, code: int, reason: str = "") -> None:
        """The peer broke the protocol: our close frame with `code` (unless sent already),
        and the connection is over."""
        sent = self.state is State.OPEN
        if sent:
            self._out.append(frame(OP_CLOSE, code.to_bytes(2, "big") + reason.encode()))
        self.state = State.CLOSED
        self._events.append(Close(code if sent else None, True))

    # -- bytes and events out -------------------------------------------------------------

    def send_close(self, code: int, reason: str = "") -> None:
        """Start the closing handshake (OPEN -> CLOSING; nothing in another state). Then the
        caller must write `data_to_send()` and close the TCP connection if the peer's close
        frame does not arrive in time."""
        if self.state is not State.OPEN:
            return
        self.state = State.CLOSING
        self._out.append(frame(OP_CLOSE, code.to_bytes(2, "big") + reason.encode()[:123]))

    def data_to_send(self) -> bytes:
        """The frames the protocol produced since the last call (b"" when none)."""
        out = self._out
        if not out:
            return b""
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        return data

    def events_received(self) -> list[Event] | tuple[()]:
        """The events since the last call, in order."""
        events = self._events
        if not events:
            return _NOTHING
        self._events = []
        return events


def _frame_size(data: bytes, pos: int) -> int:
    """Bytes from `pos` up to the end of the frame starting there (or of its header)."""
    size = data[pos + 1] & 0x7F
    if size < 126:
        return 6 + size
    head = 8 if size == 126 else 14
    if len(data) - pos < head:
        return head
    return head + int.from_bytes(data[pos + 2 : head - 4 + pos], "big")
