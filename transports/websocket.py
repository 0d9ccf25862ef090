"""`/connection/websocket`: a thin WebSocket layer over a connection actor.

JSON (text frames, newline-joined messages) unless the client asks for protobuf with the
`centrifuge-protobuf` subprotocol or `?format=protobuf` / `?cf_protocol=protobuf` (binary
frames, varint-length-prefixed messages). Disconnects go in the close frame.

Two implementations of the same endpoint:

* `LeanWebSocket`: the asyncio adapter of the sans-I/O `ws_protocol.ServerProtocol` (RFC 6455
  server side without extensions). The lean HTTP server (`api_lean.py`) parses the upgrade
  request (`http11.parse_request_head`, `ws_protocol.accept_upgrade`), asks `lean_websocket`
  whether the lean path takes it, and hands it the plain TCP connection. No coroutine,
  future or Tornado object per connection or frame: Tornado's upgrade and frame reader
  cost ~45% of the CPU of a connection here (py-spy, 19,000 connections opened at once).
* `WebSocketHandler`: Tornado's, for everything else: TLS, permessage-deflate
  (`websocket_compression`), and requests the lean path does not take (a refused Origin,
  a bad handshake), which Tornado answers with its usual errors.

Both write a connection actor's batch as one frame (`frame_messages`); a fan-out push
(`channel.Push`) alone in a write is framed once per publication and its frame reused by
every subscriber.
"""

from __future__ import annotations

import asyncio
import urllib.parse
from collections.abc import Awaitable, Sequence
from typing import Any, Final

import tornado.iostream
import tornado.websocket

from centripy.actors.channel import Push
from centripy.actors.connection import ConnectionActor
from centripy.actors.connection_core import TransportClosed, tell_frame
from centripy.actors.context import ConnContext
from centripy.actors.transport import Format, protobuf_codec
from centripy.engine.config import Config
from centripy.transports.http_common import refuse_over_admission, send_to_stream
from centripy.transports.origins import origin_allowed
from centripy.transports.ws_protocol import (
    OP_BINARY,
    OP_TEXT,
    Message,
    ServerProtocol,
    State,
    Upgrade,
    frame,
)

PROTOBUF_SUBPROTOCOL = "centrifuge-protobuf"
JSON_SUBPROTOCOL = "centrifuge-json"
CLOSE_TIMEOUT: Final = 5.0  # seconds to wait for the client's close frame (as Tornado)
_OPEN: Final = State.OPEN

__all__ = [
    "CLOSE_TIMEOUT",
    "JSON_SUBPROTOCOL",
    "PROTOBUF_SUBPROTOCOL",
    "LeanWebSocket",
    "Upgrade",
    "WebSocketHandler",
    "frame",
    "frame_messages",
    "lean_may_take",
    "lean_websocket",
    "origin_allowed",
    "select_subprotocol",
    "wire_format",
]


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


def _frame_one(data: bytes, protobuf: bool) -> bytes:
    if protobuf:
        return frame(OP_BINARY, protobuf_codec().join_frame((data,)))
    return frame(OP_TEXT, data)


def frame_messages(messages: Sequence[bytes], protobuf: bool) -> bytes:
    """The one frame for a write of the connection actor: its messages joined by `\\n`
    (JSON, a text frame) or varint-prefixed (protobuf, a binary frame). A `Push` alone is
    framed on its first write and its frame kept in `Push.framed` for the next subscriber
    (a `Push` belongs to one wire format, so its frame is the same for all of them)."""
    if len(messages) == 1:
        data = messages[0]
        if type(data) is Push:
            framed = data.framed
            if framed is None:
                framed = data.framed = _frame_one(data, protobuf)
            return framed
        return _frame_one(data, protobuf)
    if protobuf:
        return frame(OP_BINARY, protobuf_codec().join_frame(messages))
    return frame(OP_TEXT, b"\n".join(messages))


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
        self._counts = handler.ctx.node.metrics.transport(self.name)

    def write(self, messages: Sequence[bytes]) -> Awaitable[None] | None:
        protobuf = self.format == Format.PROTOBUF
        conn = self._handler.ws_connection
        stream: tornado.iostream.IOStream | None = getattr(conn, "stream", None)
        if conn is None or stream is None or conn.is_closing():
            raise tornado.websocket.WebSocketClosedError()
        self._counts.sent(messages, type(messages[0]) is Push)
        if self._compress:
            if protobuf:
                data = protobuf_codec().join_frame(messages)
            else:
                data = messages[0] if len(messages) == 1 else b"\n".join(messages)
            return self._handler.write_message(data, binary=protobuf)
        # Straight to the stream: Tornado's write_message wraps each write in a new task,
        # which cost ~10% of a fan-out. Server frames are unmasked, so this is all it does.
        return send_to_stream(stream, frame_messages(messages, protobuf))

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

    def prepare(self) -> None:
        refuse_over_admission(self, self.ctx)

    def select_subprotocol(self, subprotocols: list[str]) -> str | None:
        return select_subprotocol(subprotocols)

    def get_compression_options(self) -> dict[str, Any] | None:
        return {} if self.ctx.config.websocket_compression else None

    def open(self, *args: str, **kwargs: str) -> None:
        query = urllib.parse.parse_qs(self.request.query, keep_blank_values=True)
        transport = _WebSocketTransport(self, wire_format(self.selected_subprotocol, query))
        headers = self.ctx.proxy_headers(self.request.headers.get)
        self.actor = ConnectionActor.start(self.ctx, transport, headers)

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


class LeanWebSocket(asyncio.Protocol):
    """The asyncio adapter of a `ServerProtocol`, and the connection actor's transport.

    Called on the event loop. Bytes received go to the protocol; what it answers (pongs,
    close frames) is written at once; each `Message` is told to the actor (`tell_frame`),
    and reading pauses while the actor has `client_max_pending_frames` frames waiting (it
    calls `resume_reading`); a `Close` closes the TCP connection. `write` puts one frame on
    the asyncio transport, which sends at once when its buffer is empty; when the socket
    did not take it all (the high-water mark is 0) `write` returns a future that completes
    when the buffer has drained (the actor drops the connection after `write_timeout`),
    so the actor's bounded queue takes the backlog (3008) and batches it into frames.
    `close` starts the closing handshake and cuts the connection if the client does not
    answer within `CLOSE_TIMEOUT` seconds."""

    name = "websocket"
    emulation = False
    unidirectional = False
    pong = True

    __slots__ = (
        "_actor",
        "_conns",
        "_counts",
        "_ctx",
        "_drained",
        "_max_pending",
        "_paused",
        "_protobuf",
        "_protocol",
        "_response",
        "_timeout",
        "_transport",
        "early",
        "format",
        "proxy_headers",
        "write_timeout",
    )

    def __init__(
        self, ctx: ConnContext, fmt: Format, response: bytes, conns: set[LeanWebSocket]
    ) -> None:
        self._ctx = ctx
        self.format = fmt
        self._protobuf = fmt == Format.PROTOBUF
        self._response = response  # the 101 answer, written on connection_made
        self.early = b""  # bytes read with the request head (frames sent without waiting)
        self._conns = conns
        self._protocol = ServerProtocol(ctx.config.websocket_message_size_limit)
        self._transport: asyncio.Transport | None = None
        self._actor: Any = None
        self._drained: asyncio.Future[None] | None = None
        self._timeout: asyncio.TimerHandle | None = None
        self._max_pending = ctx.config.client_max_pending_frames
        self._paused = False  # reading paused: the actor has _max_pending frames waiting
        self.write_timeout = ctx.config.websocket_write_timeout
        self.proxy_headers: dict[str, str] = {}  # of the upgrade request (lean_websocket)
        self._counts = ctx.node.metrics.transport(self.name)

    @property
    def state(self) -> State:
        return self._protocol.state

    # -- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._conns.add(self)
        # Pause (`pause_writing`) as soon as the socket leaves anything unsent, as the
        # Tornado transports' writes do: the actor then waits and joins what comes
        # meanwhile into its next frame, instead of one `transport.write` and frame per
        # message into a 64 KiB buffer (500 subscribers x 1000 msgs, server CPU per
        # delivery, median of 5 alternating runs: 4.4 -> 3.1 us).
        transport.set_write_buffer_limits(high=0)
        transport.write(self._response)
        self._response = b""
        self._opened()
        early, self.early = self.early, b""
        if early:
            self.data_received(early)

    def _opened(self) -> None:
        """The handshake is answered: start the connection actor."""
        self._actor = ConnectionActor.start(self._ctx, self, self.proxy_headers)

    def connection_lost(self, exc: Exception | None) -> None:
        self._conns.discard(self)
        self._protocol.receive_eof()
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
        protocol = self._protocol
        protocol.receive_data(data)
        out = protocol.data_to_send()
        if out:
            self._send(out)
        for event in protocol.events_received():
            if type(event) is Message:
                self._received(event.data)
            elif self._transport is not None:  # Close: the server closes TCP first (7.1.1)
                self._transport.close()

    def eof_received(self) -> bool | None:
        return None  # close the transport (-> connection_lost)

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
        """Called by the actor's writer; raises ConnectionResetError once closing."""
        transport = self._transport
        if transport is None or self._protocol.state is not _OPEN or transport.is_closing():
            raise ConnectionResetError("websocket closed")
        counts = self._counts
        if len(messages) == 1:  # a fan-out's push, framed already: no call, no allocation
            data = messages[0]
            if type(data) is Push:
                counts.pushes += 1
                counts.push_bytes += len(data)
                framed = data.framed
            else:
                counts.replies += 1
                counts.reply_bytes += len(data)
                framed = None
            transport.write(framed or frame_messages(messages, self._protobuf))
        else:
            counts.sent(messages, type(messages[0]) is Push)
            transport.write(self._frames(messages))
        return self._drained

    def _frames(self, messages: Sequence[bytes]) -> bytes:
        """What a write of several messages sends: one frame (`frame_messages`)."""
        return frame_messages(messages, self._protobuf)

    def close(self, code: int, reason: str) -> None:
        """Our close frame (called once by the actor); the TCP connection closes when the
        client answers it, or after CLOSE_TIMEOUT seconds."""
        protocol = self._protocol
        if protocol.state is not State.OPEN or self._transport is None:
            return
        protocol.send_close(code, reason)
        self._send(protocol.data_to_send())
        self._timeout = asyncio.get_running_loop().call_later(CLOSE_TIMEOUT, self.abort)

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()


def lean_may_take(config: Config, upgrade: Upgrade, compression: bool) -> bool:
    """Whether the lean path may answer `upgrade`: not with compression (Tornado's
    permessage-deflate), nor an Origin the configuration refuses (Tornado answers 403)."""
    if compression:
        return False
    return upgrade.origin is None or origin_allowed(config.allowed_origins, upgrade.origin)


def lean_websocket(
    ctx: ConnContext, upgrade: Upgrade, conns: set[LeanWebSocket]
) -> LeanWebSocket | None:
    """The adapter for a lean upgrade (its `early` bytes still to set), or None when
    Tornado must answer it (compression switched on, or an Origin the configuration
    refuses: Tornado answers 403)."""
    if not lean_may_take(ctx.config, upgrade, ctx.config.websocket_compression):
        return None
    subprotocol = select_subprotocol(upgrade.subprotocols)
    query = urllib.parse.parse_qs(upgrade.query, keep_blank_values=True) if upgrade.query else {}
    fmt = wire_format(subprotocol, query)
    protocol = LeanWebSocket(ctx, fmt, upgrade.response(subprotocol), conns)
    protocol.proxy_headers = ctx.proxy_headers(upgrade.headers.get)
    return protocol
