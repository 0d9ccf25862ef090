"""`/connection/websocket`: a thin WebSocket layer over a connection actor.

JSON (text frames, newline-joined messages) unless the client asks for protobuf with the
`centrifuge-protobuf` subprotocol or `?format=protobuf` / `?cf_protocol=protobuf` (binary
frames, varint-length-prefixed messages). Disconnects go in the close frame.

Two implementations of the same endpoint:

* `LeanWebSocket`: an asyncio protocol the lean HTTP server (`api_lean.py`) hands a plain
  TCP connection to after a well-formed upgrade request (`parse_upgrade`). RFC 6455 server
  side without extensions: no coroutine, future or Tornado object per connection or frame.
  Tornado's upgrade and frame reader cost ~45% of the CPU of a connection here (py-spy,
  19,000 connections opened at once).
* `WebSocketHandler`: Tornado's, for everything else: TLS, permessage-deflate
  (`websocket_compression`), and requests the lean path does not take (a refused Origin,
  a bad handshake), which Tornado answers with its usual errors.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import struct
import urllib.parse
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import tornado.iostream
import tornado.websocket
from tornado.util import _websocket_mask

from centripy.actors.connection import ConnectionActor
from centripy.actors.connection_core import TransportClosed, tell_frame
from centripy.actors.context import ConnContext
from centripy.actors.transport import Format, protobuf_codec
from centripy.transports.origins import origin_allowed

PROTOBUF_SUBPROTOCOL = "centrifuge-protobuf"
JSON_SUBPROTOCOL = "centrifuge-json"
_GUID: Final = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 1.3
_VERSIONS: Final = (b"13", b"8", b"7")  # what Tornado accepts
CLOSE_TIMEOUT: Final = 5.0  # seconds to wait for the client's close frame (as Tornado)


def select_subprotocol(offered: Sequence[str]) -> str | None:
    for proto in (PROTOBUF_SUBPROTOCOL, JSON_SUBPROTOCOL):
        if proto in offered:
            return proto
    return None


def wire_format(subprotocol: str | None, query: dict[str, list[str]]) -> Format:
    if subprotocol == PROTOBUF_SUBPROTOCOL:
        return Format.PROTOBUF
    for key in ("format", "cf_protocol"):
        if query.get(key, [""])[0] == "protobuf":
            return Format.PROTOBUF
    return Format.JSON


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


class _LastFrame:
    """The frame of the last single JSON message written: a fan-out writes the same
    message object to every subscriber in a row, so it is framed once, not per write."""

    data = b""
    framed = frame(0x1, b"")


def text_frame(data: bytes) -> bytes:
    """`frame(0x1, data)`, remembered for the same `data` object."""
    last = _LastFrame
    if data is not last.data:
        last.framed = frame(0x1, data)
        last.data = data
    return last.framed


def send(stream: tornado.iostream.IOStream, data: bytes) -> Awaitable[None] | None:
    """Write `data` to `stream`; None when it is all written already. On a plain TCP stream
    with nothing queued, one `send` on the socket usually takes it all, without the
    future and buffer bookkeeping of `IOStream.write` (~20% of a fan-out's CPU); what the
    socket does not take (or an error) goes through `IOStream.write`, which queues it and
    handles errors as always."""
    if type(stream) is tornado.iostream.IOStream and not stream.writing() and not stream.closed():
        try:
            sent = stream.socket.send(data)
        except OSError:  # BlockingIOError (buffer full), or an error IOStream will raise
            sent = 0
        if sent == len(data):
            return None
        data = data[sent:]
    return stream.write(data)


class _WebSocketTransport:
    name = "websocket"
    emulation = False
    unidirectional = False
    pong = True

    def __init__(self, handler: WebSocketHandler, fmt: Format) -> None:
        self._handler = handler
        self.format = fmt
        self._compress = handler.ctx.config.websocket_compression
        self.write_timeout = handler.ctx.config.websocket_write_timeout

    def write(self, messages: Sequence[bytes]) -> Awaitable[None] | None:
        protobuf = self.format == Format.PROTOBUF
        if protobuf:
            data = protobuf_codec().join_frame(messages)
        else:
            data = messages[0] if len(messages) == 1 else b"\n".join(messages)
        conn = self._handler.ws_connection
        stream: tornado.iostream.IOStream | None = getattr(conn, "stream", None)
        if conn is None or stream is None or conn.is_closing():
            raise tornado.websocket.WebSocketClosedError()
        if self._compress:
            return self._handler.write_message(data, binary=protobuf)
        # Straight to the stream: Tornado's write_message wraps each write in a new task,
        # which cost ~10% of a fan-out. Server frames are unmasked, so this is all it does.
        return send(stream, frame(0x2, data) if protobuf else text_frame(data))

    def close(self, code: int, reason: str) -> None:
        self._handler.close(code, reason)

    def abort(self) -> None:
        """Drop the TCP connection (the peer stopped reading)."""
        stream = getattr(self._handler.ws_connection, "stream", None)
        if stream is not None:
            stream.close()

    def resume_reading(self) -> None:
        self._handler.resume_reading()


class WebSocketHandler(tornado.websocket.WebSocketHandler):
    def initialize(self, ctx: ConnContext) -> None:
        self.ctx = ctx
        self.actor: Any = None
        self._paused: asyncio.Future[None] | None = None

    def check_origin(self, origin: str) -> bool:
        return origin_allowed(self.ctx.config.allowed_origins, origin)

    def select_subprotocol(self, subprotocols: list[str]) -> str | None:
        return select_subprotocol(subprotocols)

    def get_compression_options(self) -> dict[str, Any] | None:
        return {} if self.ctx.config.websocket_compression else None

    def open(self, *args: str, **kwargs: str) -> None:
        query = urllib.parse.parse_qs(self.request.query, keep_blank_values=True)
        transport = _WebSocketTransport(self, wire_format(self.selected_subprotocol, query))
        self.actor = ConnectionActor.start(self.ctx, transport, register=False)

    def on_message(self, message: str | bytes) -> Awaitable[None] | None:
        """Tell the actor; with `client_max_pending_frames` frames waiting, Tornado reads
        no further message until the actor resumes us (read backpressure)."""
        if isinstance(message, str):
            message = message.encode()
        if tell_frame(self.actor, message) < self.ctx.config.client_max_pending_frames:
            return None
        self._paused = asyncio.get_running_loop().create_future()
        return self._paused

    def resume_reading(self) -> None:
        paused, self._paused = self._paused, None
        if paused is not None and not paused.done():
            paused.set_result(None)

    def on_close(self) -> None:
        if self.actor is not None and self.actor.is_alive():
            self.actor.tell(TransportClosed())


# -- the lean path --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Upgrade:
    """A WebSocket upgrade request the lean path may answer (see `parse_upgrade`)."""

    path: str
    query: str
    key: bytes
    subprotocols: tuple[str, ...]
    origin: str | None  # Origin (or the old Sec-WebSocket-Origin); None when absent

    def response(self, subprotocol: str | None) -> bytes:
        """The `101 Switching Protocols` answer (RFC 6455 4.2.2)."""
        accept = base64.b64encode(hashlib.sha1(self.key + _GUID).digest())
        head = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
        head += b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n"
        if subprotocol:
            head += b"Sec-WebSocket-Protocol: " + subprotocol.encode() + b"\r\n"
        return head + b"\r\n"


def parse_upgrade(head: bytes) -> Upgrade | None:
    """The upgrade in `head` (request line and headers, ending with an empty line) when it
    is a well-formed WebSocket handshake (RFC 6455 4.2.1, with Tornado's checks: GET,
    HTTP/1.1, Host, `Upgrade: websocket`, `Connection: upgrade`, a key, version 7, 8 or 13);
    None for anything else, which Tornado then answers with its own errors."""
    lines = head[:-4].split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or parts[0] != b"GET" or parts[2] != b"HTTP/1.1":
        return None
    target = parts[1]
    if not target.startswith(b"/") or b"%" in target or b"#" in target:
        return None
    headers: dict[bytes, bytes] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not name or b" " in name or b"\t" in name:
            return None  # no colon, whitespace in the name, or an obsolete folded line
        key = name.lower()
        value = value.strip()
        headers[key] = headers[key] + b"," + value if key in headers else value
    connection = {token.strip() for token in headers.get(b"connection", b"").lower().split(b",")}
    key = headers.get(b"sec-websocket-key", b"")
    if (
        headers.get(b"upgrade", b"").lower() != b"websocket"
        or b"upgrade" not in connection
        or not headers.get(b"host")
        or not key
        or headers.get(b"sec-websocket-version") not in _VERSIONS
    ):
        return None
    offered = headers.get(b"sec-websocket-protocol", b"").decode("latin-1")
    origin = headers.get(b"origin", headers.get(b"sec-websocket-origin"))
    path, _, query = target.decode("latin-1").partition("?")
    return Upgrade(
        path=path,
        query=query,
        key=key,
        subprotocols=tuple(p.strip() for p in offered.split(",")) if offered else (),
        origin=None if origin is None else origin.decode("latin-1"),
    )


class LeanWebSocket(asyncio.Protocol):
    """A server WebSocket connection (RFC 6455, no extensions) as an asyncio protocol, and
    the connection actor's transport. Frames are parsed in `data_received`; complete
    messages are told to the actor as `Frame`s; control frames are answered here (pong,
    close echo). `write` puts one frame on the asyncio transport, which sends at once when
    its buffer is empty; above its high-water mark `write` returns a future that completes
    when the buffer has drained, so the actor's bounded queue takes the backlog (3008)."""

    name = "websocket"
    emulation = False
    unidirectional = False
    pong = True

    __slots__ = (
        "_actor",
        "_buf",
        "_client_closed",
        "_closing",
        "_conns",
        "_ctx",
        "_drained",
        "_early",
        "_frag",
        "_frag_size",
        "_frag_text",
        "_max_pending",
        "_max_size",
        "_need",
        "_opcode",
        "_paused",
        "_response",
        "_timeout",
        "_transport",
        "format",
        "write_timeout",
    )

    def __init__(
        self,
        ctx: ConnContext,
        fmt: Format,
        response: bytes,
        early: bytes,
        conns: set[LeanWebSocket],
    ) -> None:
        self._ctx = ctx
        self.format = fmt
        self._opcode = 0x2 if fmt == Format.PROTOBUF else 0x1
        self._response = response
        self._early = early  # bytes read with the request head (frames sent without waiting)
        self._conns = conns
        self._max_size = ctx.config.websocket_message_size_limit
        self._transport: asyncio.Transport | None = None
        self._actor: Any = None
        self._buf = bytearray()  # an incomplete frame
        self._need = 2  # bytes _buf must hold before the next parse
        self._frag: list[bytes] | None = None  # parts of a fragmented message
        self._frag_size = 0
        self._frag_text = False  # the fragmented message is a text one (UTF-8 checked)
        self._closing = False  # our close frame is sent
        self._client_closed = False  # the client's close frame arrived
        self._drained: asyncio.Future[None] | None = None
        self._timeout: asyncio.TimerHandle | None = None
        self._max_pending = ctx.config.client_max_pending_frames
        self._paused = False  # reading paused: the actor has _max_pending frames waiting
        self.write_timeout = ctx.config.websocket_write_timeout

    # -- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._conns.add(self)
        transport.write(self._response)
        self._response = b""
        self._actor = ConnectionActor.start(self._ctx, self, register=False)
        early, self._early = self._early, b""
        if early:
            self.data_received(early)

    def connection_lost(self, exc: Exception | None) -> None:
        self._conns.discard(self)
        self._closing = True
        if self._timeout is not None:
            self._timeout.cancel()
            self._timeout = None
        drained, self._drained = self._drained, None
        if drained is not None:
            drained.cancel()  # a writer waiting on it gives up (the actor then terminates)
        if self._actor is not None and self._actor.is_alive():
            self._actor.tell(TransportClosed())

    def pause_writing(self) -> None:
        if self._drained is None:
            self._drained = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        drained, self._drained = self._drained, None
        if drained is not None and not drained.done():
            drained.set_result(None)

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        if buf:
            buf += data
            if len(buf) < self._need:
                return
            data = bytes(buf)
            buf.clear()
        pos, end = 0, len(data)
        while end - pos >= 2 and self._transport is not None:
            b0, b1 = data[pos], data[pos + 1]
            # reserved bits (no extension), unmasked, a control frame over 125 bytes
            if b0 & 0x70 or not b1 & 0x80 or (b0 & 0x08 and b1 & 0x7F > 125):
                self.fail(1002)
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
            if size + self._frag_size > self._max_size:
                self.fail(1009, "message too big")
                return
            stop = head + size
            if end < stop:
                break
            payload = _websocket_mask(data[head - 4 : head], data[head:stop])
            pos = stop
            self._on_frame(b0 & 0x80, b0 & 0x0F, payload)
        if pos < end and self._transport is not None:
            buf += data[pos:]
            self._need = 2 if end - pos < 2 else _frame_size(data, pos)

    def eof_received(self) -> bool | None:
        return None  # close the transport (-> connection_lost)

    # -- frames in ------------------------------------------------------------------------

    def _on_frame(self, fin: int, opcode: int, payload: bytes) -> None:
        if opcode >= 0x8:
            if not fin or len(payload) > 125:
                self.fail(1002)
            elif opcode == 0x8:
                self._on_close_frame(payload)
            elif opcode == 0x9:
                if not self._closing:
                    self._send(frame(0xA, payload))
            elif opcode != 0xA:
                self.fail(1002)
            return
        if opcode == 0x0:
            if self._frag is None:
                self.fail(1002)
                return
            self._frag.append(payload)
            self._frag_size += len(payload)
            if not fin:
                return
            payload = b"".join(self._frag)
            self._frag, self._frag_size = None, 0
            text = self._frag_text
        elif opcode > 0x2 or self._frag is not None:  # unknown opcode, or a new message
            self.fail(1002)  # inside a fragmented one
            return
        elif not fin:
            self._frag, self._frag_size = [payload], len(payload)
            self._frag_text = opcode == 0x1
            return
        else:
            text = opcode == 0x1
        if self._closing:
            return
        if text and not _utf8(payload):
            self.fail(1007)  # RFC 6455 8.1 (Tornado aborts without a close frame)
            return
        self._received(payload)

    def _on_close_frame(self, payload: bytes) -> None:
        """The client closes: echo its code (RFC 6455 5.5.1) unless we closed first, then
        close the TCP connection. Like Tornado, any code is echoed and a 1-byte body gets an
        empty close frame; a reason that is not UTF-8 fails the connection (1007; Tornado
        drops it without a close frame)."""
        self._client_closed = True
        if not _utf8(payload[2:]):
            self.fail(1007)
            return
        if not self._closing:
            self._closing = True
            self._send(frame(0x8, payload[:2] if len(payload) >= 2 else b""))
        if self._transport is not None:
            self._transport.close()

    def _received(self, payload: bytes) -> None:
        """A complete message: to the actor; pause reading while it has too many waiting."""
        if tell_frame(self._actor, payload) >= self._max_pending and not self._paused:
            self._paused = True
            if self._transport is not None:
                self._transport.pause_reading()

    def resume_reading(self) -> None:
        """Called by the actor once its waiting frames are down to half the bound."""
        if self._paused:
            self._paused = False
            transport = self._transport
            if transport is not None and not transport.is_closing():
                transport.resume_reading()

    # -- frames out -----------------------------------------------------------------------

    def _send(self, data: bytes) -> None:
        transport = self._transport
        if transport is not None and not transport.is_closing():
            transport.write(data)

    def write(self, messages: Sequence[bytes]) -> Awaitable[None] | None:
        transport = self._transport
        if transport is None or self._closing or transport.is_closing():
            raise ConnectionResetError("websocket closed")
        if self._opcode == 0x2:
            transport.write(frame(0x2, protobuf_codec().join_frame(messages)))
        elif len(messages) == 1:
            transport.write(text_frame(messages[0]))
        else:
            transport.write(frame(0x1, b"\n".join(messages)))
        return self._drained

    def close(self, code: int, reason: str) -> None:
        """Our close frame; the TCP connection closes when the client answers it (or after
        CLOSE_TIMEOUT seconds)."""
        if self._closing or self._transport is None:
            return
        self._closing = True
        self._send(frame(0x8, code.to_bytes(2, "big") + reason.encode()[:123]))
        if self._client_closed:
            self._transport.close()
        else:
            loop = asyncio.get_running_loop()
            self._timeout = loop.call_later(CLOSE_TIMEOUT, self.abort)

    def fail(self, code: int, reason: str = "") -> None:
        """A protocol error by the client: close frame with `code`, then close at once."""
        self.close(code, reason)
        if self._transport is not None:
            self._transport.close()
        self._transport = None

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()


def _utf8(data: bytes) -> bool:
    """True when `data` is valid UTF-8 (RFC 3629: no surrogates, no overlong forms)."""
    if data.isascii():
        return True
    try:
        data.decode()
    except UnicodeDecodeError:
        return False
    return True


def _frame_size(data: bytes, pos: int) -> int:
    """Bytes from `pos` up to the end of the frame starting there (or of its header)."""
    size = data[pos + 1] & 0x7F
    if size < 126:
        return 6 + size
    head = 8 if size == 126 else 14
    if len(data) - pos < head:
        return head
    return head + int.from_bytes(data[pos + 2 : head - 4 + pos], "big")


def lean_websocket(
    ctx: ConnContext, upgrade: Upgrade, early: bytes, conns: set[LeanWebSocket]
) -> LeanWebSocket | None:
    """The protocol for a lean upgrade, or None when Tornado must answer it (compression
    switched on, or an Origin the configuration refuses: Tornado answers 403)."""
    config = ctx.config
    if config.websocket_compression:
        return None
    if upgrade.origin is not None and not origin_allowed(config.allowed_origins, upgrade.origin):
        return None
    subprotocol = select_subprotocol(upgrade.subprotocols)
    query = urllib.parse.parse_qs(upgrade.query, keep_blank_values=True) if upgrade.query else {}
    fmt = wire_format(subprotocol, query)
    return LeanWebSocket(ctx, fmt, upgrade.response(subprotocol), early, conns)
