"""`/connection/websocket`: a thin Tornado handler over a connection actor.

JSON (text frames, newline-joined messages) unless the client asks for protobuf with the
`centrifuge-protobuf` subprotocol or `?format=protobuf` / `?cf_protocol=protobuf` (binary
frames, varint-length-prefixed messages). Disconnects go in the close frame.
"""

from __future__ import annotations

import fnmatch
import struct
from collections.abc import Awaitable, Sequence
from typing import Any

import tornado.iostream
import tornado.websocket

from actors.connection import ConnectionActor
from actors.connection_core import Frame, TransportClosed
from actors.context import ConnContext
from actors.transport import Format, protobuf_codec

PROTOBUF_SUBPROTOCOL = "centrifuge-protobuf"
JSON_SUBPROTOCOL = "centrifuge-json"


def origin_allowed(allowed: Sequence[str], origin: str) -> bool:
    """Centrifugo's rule: no patterns -> only Origin-less requests pass (handled by the
    caller); `*` and `https://*.example.com` style wildcards match case-insensitively."""
    origin = origin.lower()
    return any(fnmatch.fnmatchcase(origin, pattern.lower()) for pattern in allowed)


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
        return send(stream, frame(0x2 if protobuf else 0x1, data))

    def close(self, code: int, reason: str) -> None:
        self._handler.close(code, reason)


class WebSocketHandler(tornado.websocket.WebSocketHandler):
    def initialize(self, ctx: ConnContext) -> None:
        self.ctx = ctx
        self.actor: Any = None

    def check_origin(self, origin: str) -> bool:
        return origin_allowed(self.ctx.config.allowed_origins, origin)

    def select_subprotocol(self, subprotocols: list[str]) -> str | None:
        for proto in (PROTOBUF_SUBPROTOCOL, JSON_SUBPROTOCOL):
            if proto in subprotocols:
                return proto
        return None

    def get_compression_options(self) -> dict[str, Any] | None:
        return {} if self.ctx.config.websocket_compression else None

    def _format(self) -> Format:
        if self.selected_subprotocol == PROTOBUF_SUBPROTOCOL:
            return Format.PROTOBUF
        args = self.request.query_arguments
        for key in ("format", "cf_protocol"):
            if args.get(key, [b""])[0] == b"protobuf":
                return Format.PROTOBUF
        return Format.JSON

    def open(self, *args: str, **kwargs: str) -> None:
        transport = _WebSocketTransport(self, self._format())
        self.actor = ConnectionActor.start(self.ctx, transport, register=False)

    def on_message(self, message: str | bytes) -> None:
        if isinstance(message, str):
            message = message.encode()
        self.actor.tell(Frame(message))

    def on_close(self) -> None:
        if self.actor is not None and self.actor.is_alive():
            self.actor.tell(TransportClosed())
