"""Unidirectional transports: `uni_websocket`, `uni_sse`, `uni_http_stream` (JSON only).

The client sends one bare `ConnectRequest` object (not a command); the server answers with
pushes without the `{"push": ...}` envelope: a `connect` push first, then publications,
joins, leaves, `{}` pings and finally a `disconnect` push (docs/spec/protocol.md 5.4). Only
server-side subscriptions exist; nothing the client sends later is a command.

- uni_websocket: the first text message is the ConnectRequest (malformed: the connection is
  just closed); later messages are ignored. One text frame per push; native WebSocket pings
  every 25 s. A disconnect is the disconnect push, then the TCP connection is closed without
  a close frame (Centrifugo closes the socket).
  Served by `LeanUniWebSocket` on the lean path (asyncio, as the bidirectional
  WebSocket's `LeanWebSocket`) unless compression is on or the Origin is refused; then
  by Tornado (`UniWebSocketHandler`).
- uni_sse: `GET ?cf_connect=<ConnectRequest JSON>` (absent: an empty request) or `POST` with
  the JSON body; SSE framing (`\\r\\n`, then `data: <json>\\n\\n`).
- uni_http_stream: `POST` with the JSON body; each push is a JSON line + `\\n`.

Handlers run on the loop (Tornado); they hold no protocol state.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Sequence
from typing import Any

import tornado.iostream
import tornado.websocket
from pykka import ActorDeadError

from centripy.actors.channel import Push
from centripy.actors.connection import ConnectionActor
from centripy.actors.connection_core import TransportClosed, UniConnect
from centripy.actors.context import ConnContext
from centripy.actors.transport import Format
from centripy.engine.config import Config
from centripy.engine.protocol import json_codec
from centripy.engine.protocol.commands import ConnectRequest, ProtocolError
from centripy.transports.http_common import (
    SSE_CONTENT_TYPE,
    SSE_PREAMBLE,
    WRITE_TIMEOUT,
    Framing,
    StreamingHandler,
    StreamTransport,
    frame_lines,
    frame_sse,
    prefix_route,
    refuse_over_admission,
    send_to_stream,
)
from centripy.transports.origins import origin_allowed
from centripy.transports.websocket import LeanWebSocket, frame_messages, lean_may_take
from centripy.transports.ws_protocol import (
    OP_PING,
    OP_TEXT,
    ServerProtocol,
    State,
    Upgrade,
    frame,
)

CONNECT_PARAM = "cf_connect"
# Centrifugo's uni_websocket pings natively every 25 s and drops a connection that sent
# nothing (not even a pong, nor the connect request) for 10/9 of that.
UNI_WS_PING_INTERVAL = 25.0
UNI_WS_READ_TIMEOUT = UNI_WS_PING_INTERVAL * 10 / 9


def _encode_uni_disconnect(code: int, reason: str) -> bytes:
    return json_codec.encode_disconnect_push(code, reason, unidirectional=True)


def decode_uni_connect(body: bytes | None) -> ConnectRequest:
    """The ConnectRequest of a uni transport; None (no `cf_connect` parameter) is an empty
    request, i.e. an anonymous attempt. Raises ProtocolError when malformed (an empty body
    included)."""
    if body is None:
        return ConnectRequest()
    return json_codec.decode_connect_request(body)


# -- HTTP streaming ---------------------------------------------------------------------------


class _UniStreamHandler(StreamingHandler):
    name = ""
    content_type: str | None = None
    preamble = b""

    async def serve(self, body: bytes | None) -> None:
        try:
            req = decode_uni_connect(body)
        except ProtocolError:
            self.send_error(400)
            return
        if self.content_type == SSE_CONTENT_TYPE:
            framing = self.framing("sse", frame_sse)
        else:
            framing = self.framing("lines", frame_lines)
        transport = StreamTransport(
            self,
            name=self.name,
            fmt=Format.JSON_UNI,
            emulation=False,
            framing=framing,
            disconnect=_encode_uni_disconnect,
        )
        self.start_response(self.content_type, self.preamble)
        await self.stream(transport, UniConnect(req))


class UniHttpStreamHandler(_UniStreamHandler):
    """`POST /connection/uni_http_stream` with the ConnectRequest JSON; OPTIONS 200, other
    methods 405; a malformed body is 400."""

    name = "uni_http_stream"

    async def post(self) -> None:
        body = self.body()
        if body is not None:
            await self.serve(body)


class UniSseHandler(_UniStreamHandler):
    """`GET /connection/uni_sse?cf_connect=...` or `POST` with the ConnectRequest JSON;
    other methods (OPTIONS included) 405; a malformed request is 400."""

    SUPPORTED_METHODS = ("GET", "POST")
    name = "uni_sse"
    content_type = SSE_CONTENT_TYPE
    preamble = SSE_PREAMBLE

    async def get(self) -> None:
        request = self.get_query_argument(CONNECT_PARAM, "")
        await self.serve(request.encode() if request else None)

    async def post(self) -> None:
        body = self.body()
        if body is not None:
            await self.serve(body)


# -- WebSocket --------------------------------------------------------------------------------


class _UniWebSocketTransport:
    name = "uni_websocket"
    format = Format.JSON_UNI
    emulation = False
    unidirectional = True
    pong = False

    def __init__(self, handler: UniWebSocketHandler) -> None:
        self._handler = handler
        # a write pending longer than this drops the peer (the connection actor's timer)
        self.write_timeout = handler.ctx.config.uni_websocket_write_timeout or WRITE_TIMEOUT
        self._compress = handler.ctx.config.uni_websocket_compression
        self._counts = handler.ctx.node.metrics.transport(self.name)

    def write(self, messages: Sequence[bytes]) -> Awaitable[None] | None:
        """One text frame per message, all in one write; the awaitable (None when the
        socket took everything at once) completes when the last was sent.

        Without compression the frames go straight to the connection's stream
        (`send_to_stream`), as the bidirectional WebSocket's do: Tornado's `write_message`
        wraps each write in a task and frames each message for each subscriber. A fan-out
        `Push` is framed once and its frame kept in `Push.framed` (a JSON_UNI push is
        written by this transport only among the WebSocket ones)."""
        handler = self._handler
        self._counts.sent(messages, type(messages[0]) is Push)
        if self._compress:
            last: Awaitable[None] | None = None
            for message in messages:
                last = handler.write_message(message, binary=False)
            return last
        conn = handler.ws_connection
        stream: tornado.iostream.IOStream | None = getattr(conn, "stream", None)
        if conn is None or stream is None or conn.is_closing():
            raise tornado.websocket.WebSocketClosedError()
        if len(messages) == 1:
            return send_to_stream(stream, frame_messages(messages, protobuf=False))
        return send_to_stream(
            stream, b"".join(frame_messages((m,), protobuf=False) for m in messages)
        )

    def abort(self) -> None:
        self._handler.drop()

    def close(self, code: int, reason: str) -> None:
        """The disconnect push, then drop the TCP connection (no close frame)."""
        handler = self._handler
        try:
            sent = handler.write_message(_encode_uni_disconnect(code, reason), binary=False)
        except tornado.websocket.WebSocketClosedError:
            return
        task = asyncio.get_running_loop().create_task(_drop_after(handler, sent))
        handler.ctx.background.add(task)
        task.add_done_callback(handler.ctx.background.discard)


async def _within(pending: Awaitable[None], timeout: float) -> None:
    async with asyncio.timeout(timeout):
        await pending


async def _drop_after(handler: UniWebSocketHandler, sent: Awaitable[None]) -> None:
    with contextlib.suppress(Exception):
        await _within(sent, WRITE_TIMEOUT)
    handler.drop()


class UniWebSocketHandler(tornado.websocket.WebSocketHandler):
    def initialize(self, ctx: ConnContext) -> None:
        self.ctx = ctx
        self.actor: Any = None
        self._read_timer: asyncio.TimerHandle | None = None

    def check_origin(self, origin: str) -> bool:
        return origin_allowed(self.ctx.config.allowed_origins, origin)

    def prepare(self) -> None:
        refuse_over_admission(self, self.ctx)

    @property
    def ping_interval(self) -> float | None:
        return UNI_WS_PING_INTERVAL

    @property
    def ping_timeout(self) -> float | None:
        """The pong to a ping must come within 1/9 of the interval (as on the lean path)."""
        return UNI_WS_PING_INTERVAL / 9

    @property
    def max_message_size(self) -> int:
        return self.ctx.config.uni_websocket_message_size_limit

    def get_compression_options(self) -> dict[str, Any] | None:
        return {} if self.ctx.config.uni_websocket_compression else None

    def open(self, *args: str, **kwargs: str) -> None:
        loop = asyncio.get_running_loop()
        self._read_timer = loop.call_later(UNI_WS_READ_TIMEOUT, self.drop)

    def on_message(self, message: str | bytes) -> None:
        """The first message is the ConnectRequest; later ones are read and ignored."""
        if self.actor is not None or self._read_timer is None:
            return
        self._read_timer.cancel()
        self._read_timer = None
        data = message.encode() if isinstance(message, str) else message
        try:
            req = json_codec.decode_connect_request(data)
        except ProtocolError:
            self.drop()
            return
        headers = self.ctx.proxy_headers(self.request.headers.get)
        self.actor = ConnectionActor.start(self.ctx, _UniWebSocketTransport(self), headers)
        self.actor.tell(UniConnect(req))

    def drop(self) -> None:
        """Close the TCP connection without a close frame (Centrifugo's uni_websocket)."""
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None
        connection = self.ws_connection
        if connection is not None and connection.stream is not None:
            connection.stream.close()

    def on_close(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None
        if self.actor is not None:
            with contextlib.suppress(ActorDeadError):
                self.actor.tell(TransportClosed())


# -- the lean path --------------------------------------------------------------------------


class LeanUniWebSocket(LeanWebSocket):
    """uni_websocket on the lean path (`api_lean.LeanHTTPServer.take_upgrade`), as
    `LeanWebSocket` is for the bidirectional one: no Tornado stream, handler or task per
    connection or write. What differs from `LeanWebSocket`:

    - the connection actor starts on the first message, a ConnectRequest (malformed: the
      TCP connection is dropped); later messages are read and ignored;
    - each message of a write is a text frame of its own;
    - a native ping every `ping_interval` seconds. The connection is dropped when no pong
      came within 10/9 of the interval since the previous one (Centrifugo's read deadline:
      the pong to a ping must come within `ping_interval / 9` of it), or when the
      ConnectRequest has not come by the first deadline;
    - `close` writes the disconnect push, then closes TCP without a close frame (aborted
      when the peer takes nothing within the write timeout).

    The liveness timer and the closing timer share `_timeout` (a closing connection pings
    no more)."""

    name = "uni_websocket"
    unidirectional = True
    pong = False
    ping_interval = UNI_WS_PING_INTERVAL  # an instance may set its own (tests)

    __slots__ = ("_pongs",)

    def __init__(self, ctx: ConnContext, response: bytes, conns: set[LeanWebSocket]) -> None:
        super().__init__(ctx, Format.JSON_UNI, response, conns)
        config = ctx.config
        self._protocol = ServerProtocol(config.uni_websocket_message_size_limit)
        self.write_timeout = config.uni_websocket_write_timeout or WRITE_TIMEOUT
        self._pongs = 0  # the protocol's pong count when the last ping was sent

    def _opened(self) -> None:
        """No actor until the ConnectRequest: only the timer, whose first deadline is
        10/9 of the ping interval from now, with the first ping at the interval."""
        self._timeout = asyncio.get_running_loop().call_later(self.ping_interval, self._ping)

    def _ping(self) -> None:
        transport = self._transport
        if transport is None or transport.is_closing() or self._protocol.state is not State.OPEN:
            self._timeout = None
            return
        self._pongs = self._protocol.pongs
        transport.write(frame(OP_PING, b""))
        self._timeout = asyncio.get_running_loop().call_later(self.ping_interval / 9, self._check)

    def _check(self) -> None:
        """A ping's deadline: a pong must have come, and the ConnectRequest."""
        if self._protocol.pongs == self._pongs or self._actor is None:
            self._timeout = None
            self.abort()
            return
        wait = self.ping_interval * 8 / 9
        self._timeout = asyncio.get_running_loop().call_later(wait, self._ping)

    def _received(self, payload: bytes) -> None:
        """The first message is the ConnectRequest; later ones are read and ignored."""
        if self._actor is not None:
            return
        try:
            request = json_codec.decode_connect_request(payload)
        except ProtocolError:
            self.abort()
            return
        self._actor = ConnectionActor.start(self._ctx, self, self.proxy_headers)
        self._actor.tell(UniConnect(request))

    def _frames(self, messages: Sequence[bytes]) -> bytes:
        """A text frame per message (a fan-out `Push` framed once, in `Push.framed`)."""
        return b"".join(frame_messages((m,), protobuf=False) for m in messages)

    def close(self, code: int, reason: str) -> None:
        """The disconnect push, then TCP closes without a close frame once it is sent."""
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        if self._timeout is not None:
            self._timeout.cancel()
        transport.write(frame(OP_TEXT, _encode_uni_disconnect(code, reason)))
        transport.close()  # after the buffer is flushed
        self._timeout = asyncio.get_running_loop().call_later(self.write_timeout, self.abort)


def lean_uni_websocket(
    ctx: ConnContext, upgrade: Upgrade, conns: set[LeanWebSocket]
) -> LeanUniWebSocket | None:
    """The adapter for a lean uni_websocket upgrade, or None when Tornado must answer it
    (compression switched on, or an Origin the configuration refuses)."""
    if not lean_may_take(ctx.config, upgrade, ctx.config.uni_websocket_compression):
        return None
    protocol = LeanUniWebSocket(ctx, upgrade.response(None), conns)
    protocol.proxy_headers = ctx.proxy_headers(upgrade.headers.get)
    return protocol


def routes(config: Config, ctx: ConnContext) -> list[Any]:
    """The routes of the enabled unidirectional transports."""
    out: list[Any] = []
    if config.uni_websocket:
        route = prefix_route(config.uni_websocket_handler_prefix)
        out.append((route, UniWebSocketHandler, {"ctx": ctx}))
    if config.uni_sse:
        limit = config.uni_sse_max_request_body_size
        kwargs = {"ctx": ctx, "body_limit": limit, "framings": {"sse": Framing(frame_sse)}}
        out.append((prefix_route(config.uni_sse_handler_prefix), UniSseHandler, kwargs))
    if config.uni_http_stream:
        limit = config.uni_http_stream_max_request_body_size
        kwargs = {"ctx": ctx, "body_limit": limit, "framings": {"lines": Framing(frame_lines)}}
        out.append(
            (prefix_route(config.uni_http_stream_handler_prefix), UniHttpStreamHandler, kwargs)
        )
    return out
