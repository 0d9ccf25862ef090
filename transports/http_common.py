"""Shared pieces of the HTTP streaming transports (`emulation.py`, `uni.py`).

- Pure helpers: the framings of a batch of encoded messages (JSON lines, SSE events), the
  CORS decision, the anti-cache headers Centrifugo sets on streaming responses.
- `LimitedBodyHandler`: a Tornado handler that reads the request body with a size limit
  (413 beyond it), answers CORS, and exposes the body to `post()`.
- `StreamingHandler` + `StreamTransport`: a long-lived response driven by a connection
  actor. The handler starts the actor, waits until the response ends, and tells the actor
  `TransportClosed()` when the peer goes away; the transport frames what the actor writes
  and, on `close`, writes the disconnect push and ends the response. No protocol state here.

Everything runs on the server's event loop (Tornado calls the handler methods there, and the
connection actor drains its inbox there).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import tornado.iostream
import tornado.web
from pykka import ActorDeadError

from centripy.actors.channel import Push
from centripy.actors.connection import ConnectionActor
from centripy.actors.connection_core import TransportClosed
from centripy.actors.context import ConnContext
from centripy.actors.transport import Format
from centripy.transports.linger import duplicate, linger
from centripy.transports.origins import origin_allowed

# Centrifugo gives each streamed write (and the response head) one second.
WRITE_TIMEOUT = 1.0

STREAM_HEADERS: tuple[tuple[str, str], ...] = (
    ("X-Accel-Buffering", "no"),
    ("Cache-Control", "private, no-cache, no-store, must-revalidate, max-age=0"),
    ("Pragma", "no-cache"),
    ("Expire", "0"),  # sic: Centrifugo sends "Expire", not "Expires"
)
SSE_CONTENT_TYPE = "text/event-stream; charset=utf-8"
# Centrifugo sets no Content-Type on HTTP-streaming responses; Go sniffs the first write:
# a JSON line sniffs as text/plain, protobuf bytes as application/octet-stream.
JSON_STREAM_CONTENT_TYPE = "text/plain; charset=utf-8"
PROTOBUF_CONTENT_TYPE = "application/octet-stream"
SSE_PREAMBLE = b"\r\n"


# -- pure helpers ---------------------------------------------------------------------------


def frame_lines(messages: Sequence[bytes]) -> bytes:
    """HTTP-streaming JSON framing: each message followed by `\\n`."""
    return b"".join(message + b"\n" for message in messages)


def frame_sse(messages: Sequence[bytes]) -> bytes:
    """Server-sent events framing: each message as one `data:` event."""
    return b"".join(b"data: " + message + b"\n\n" for message in messages)


def chunk(data: bytes) -> bytes:
    """One HTTP/1.1 chunk (RFC 9112 7.1): `<hex size>\r\n<data>\r\n`."""
    return b"%x\r\n%b\r\n" % (len(data), data)


class Framing:
    """One framing of a streaming transport (`frame`: JSON lines, SSE events, Protobuf),
    and the chunk of the last fan-out `Push` it framed, kept for the next subscriber: a
    fan-out writes the same `Push` to each subscriber in a row, so one entry serves them
    all, and each delivery costs no framing and no chunk formatting. (`Push.framed` is the
    WebSocket frame; a JSON `Push` also goes to WebSocket subscribers.) One per route and
    wire format, made by the transports' `routes()`; used on the loop only."""

    __slots__ = ("_chunk", "_push", "frame")

    def __init__(self, frame: Callable[[Sequence[bytes]], bytes]) -> None:
        self.frame = frame
        self._push: bytes | None = None  # held, so its identity is not reused meanwhile
        self._chunk = b""

    def chunk(self, messages: Sequence[bytes]) -> bytes:
        """The chunk of the frame of `messages`."""
        if len(messages) == 1:
            data = messages[0]
            if data is self._push:
                return self._chunk
            if type(data) is Push:
                self._chunk = out = chunk(self.frame(messages))
                self._push = data
                return out
        return chunk(self.frame(messages))


def cors_headers(
    allowed: Sequence[str], origin: str | None, request_headers: str | None
) -> list[tuple[str, str]]:
    """The CORS headers of a response to a request from `origin` (the check never rejects
    an HTTP transport request: it only decides whether the browser may read the answer)."""
    if not origin or not origin_allowed(allowed, origin):
        return []
    headers = [
        ("Access-Control-Allow-Origin", origin),
        ("Access-Control-Allow-Credentials", "true"),
    ]
    if request_headers and request_headers != "null":
        headers.append(("Access-Control-Allow-Headers", request_headers))
    return headers


def content_length_exceeds(value: str | None, limit: int) -> bool:
    """True when a Content-Length header announces more than `limit` bytes."""
    return value is not None and value.strip().isdigit() and int(value) > limit


# -- request side -----------------------------------------------------------------------------


@tornado.web.stream_request_body
class LimitedBodyHandler(tornado.web.RequestHandler):
    """Reads the body in chunks up to `body_limit` bytes; `post()` gets it from `body()`
    (None when it was larger: answer 413). Subclasses set `ctx` and `body_limit` in
    `initialize`. Tornado calls every method on the loop."""

    ctx: ConnContext
    body_limit: int = 65536

    _lingering: socket.socket | None = None

    def prepare(self) -> None:
        self._set_cors_headers()
        self._chunks: list[bytes] = []
        self._size = 0
        self._too_large = False
        length = self.request.headers.get("Content-Length")
        if self.request.method == "POST" and content_length_exceeds(length, self.body_limit):
            self._too_large = True
            # The body is never read: Tornado closes its stream, and a duplicate of the
            # socket lingers once the answer is flushed (see `write_error`).
            self._lingering = duplicate(self.request.connection.stream)  # type: ignore[union-attr]
            self.send_error(413)

    def data_received(self, chunk: bytes) -> None:
        if self._too_large:
            return
        self._size += len(chunk)
        if self._size > self.body_limit:
            self._too_large = True
            self._chunks = []
            return
        self._chunks.append(chunk)

    def body(self) -> bytes | None:
        """The request body, or None (after answering 413) when it exceeded the limit."""
        if self._too_large:
            self.send_error(413)
            return None
        return b"".join(self._chunks)

    def options(self, *args: str) -> None:
        """CORS preflight: 200 with the CORS headers set in `prepare`."""
        self.set_status(200)
        self.finish()

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        """An empty body, as Centrifugo answers errors here (`send_error` cleared the
        headers: the CORS ones are set again)."""
        self.clear_header("Content-Type")
        self._set_cors_headers()
        sock, self._lingering = self._lingering, None
        self.finish().add_done_callback(lambda _: linger(sock))

    def _set_cors_headers(self) -> None:
        headers = self.request.headers
        for name, value in cors_headers(
            self.ctx.config.allowed_origins,
            headers.get("Origin"),
            headers.get("Access-Control-Request-Headers"),
        ):
            self.set_header(name, value)


# -- response side ----------------------------------------------------------------------------


class StreamingHandler(LimitedBodyHandler):
    """A response that lives as long as its connection actor. `stream()` starts the actor
    and returns when the response has ended (the actor closed it, a write failed, or the
    peer went away)."""

    def initialize(
        self, ctx: ConnContext, body_limit: int, framings: Mapping[str, Framing] | None = None
    ) -> None:
        self.ctx = ctx
        self.body_limit = body_limit
        self._framings = framings or {}  # the route's, by name (shared by its responses)
        self.actor: Any = None
        self._ended = asyncio.Event()
        self._stream: tornado.iostream.IOStream | None = None  # set once the head is out
        self._chunked = False

    def prepare(self) -> None:
        super().prepare()
        if self.request.method in ("GET", "POST") and not self._finished:
            refuse_over_admission(self, self.ctx)

    def framing(self, name: str, frame: Callable[[Sequence[bytes]], bytes]) -> Framing:
        """The route's framing `name` (`routes()` made it), or a new one of `frame`."""
        return self._framings.get(name) or Framing(frame)

    def start_response(self, content_type: str | None, preamble: bytes = b"") -> None:
        """Status 200, Centrifugo's streaming headers, then the head (and `preamble`) are
        flushed at once so the client sees the stream open."""
        self.set_status(200)
        if content_type is None:
            self.clear_header("Content-Type")
        else:
            self.set_header("Content-Type", content_type)
        if self.request.version == "HTTP/1.1":
            self.set_header("Connection", "keep-alive")
        for name, value in STREAM_HEADERS:
            self.set_header(name, value)
        if preamble:
            self.write(preamble)
        _ignore_failure(self.flush())
        stream = getattr(self.request.connection, "stream", None)  # HTTP1Connection.stream
        if isinstance(stream, tornado.iostream.IOStream):
            self._stream = stream
            # Tornado chunks a 200 without Content-Length exactly when the request is 1.1
            self._chunked = self.request.version == "HTTP/1.1"

    async def stream(self, transport: StreamTransport, first_message: Any) -> None:
        """Start the connection actor, tell it `first_message` (a `Frame` or `UniConnect`),
        and wait until the response has ended."""
        if self._ended.is_set():  # the peer left while we were reading the request
            return
        headers = self.ctx.proxy_headers(self.request.headers.get)
        self.actor = ConnectionActor.start(self.ctx, transport, headers)
        self.actor.tell(first_message)
        await self._ended.wait()

    # -- called by StreamTransport, on the loop, from the connection actor's writer ---------

    def send(self, messages: Sequence[bytes], framing: Framing) -> Awaitable[None] | None:
        """Write `messages`, framed by `framing`, as one chunk of the response; None when
        the socket took it all, else an awaitable that fails if the peer is gone. A peer
        that does not take the data within the transport's `write_timeout` is dropped by
        the connection actor (`StreamTransport.abort`).

        Once the head is out (`start_response`), chunks go straight to the connection's
        stream (`send_to_stream`), not through `RequestHandler.write` + `flush` and
        `HTTP1Connection.write`, whose buffers, futures and callbacks cost ~60% of a
        fan-out delivery here (py-spy, 500 SSE subscribers). The framing is Tornado's own:
        a chunk `<hex size>\r\n<data>\r\n` on an HTTP/1.1 response, the bare bytes on an
        HTTP/1.0 one (which Tornado ends by closing the connection); `finish()` then adds
        the last chunk after them, in order, through the same stream."""
        if self._ended.is_set() or self._finished:
            raise tornado.iostream.StreamClosedError()
        stream = self._stream
        if stream is None:
            self.write(framing.frame(messages))
            return self.flush()
        if self._chunked:
            return send_to_stream(stream, framing.chunk(messages))
        return send_to_stream(stream, framing.frame(messages))

    def end(self, data: bytes) -> None:
        """Write the last message (the disconnect push) and finish the response; a peer
        that does not take it within the write timeout is dropped."""
        if self._ended.is_set() or self._finished:
            return
        self._ended.set()
        with contextlib.suppress(tornado.iostream.StreamClosedError):
            self.write(data)
            finished = self.finish()
            abort_unless_done(finished, write_timeout(self.ctx), self.abort)

    def abort(self) -> None:
        """Drop the TCP connection without finishing the response (a failed write)."""
        self._ended.set()
        connection: Any = self.request.connection
        with contextlib.suppress(Exception):
            connection.close()

    # -- Tornado callbacks ---------------------------------------------------------------------

    def on_connection_close(self) -> None:
        """The peer went away: the actor releases the connection."""
        super().on_connection_close()
        self._ended.set()
        actor = self.actor
        if actor is not None:
            with contextlib.suppress(ActorDeadError):
                actor.tell(TransportClosed())

    def on_finish(self) -> None:
        self._ended.set()


class StreamTransport:
    """The `Transport` of one streaming response: frames what the connection actor writes
    and ends the response with a disconnect push. Methods run on the loop, called by the
    connection actor."""

    def __init__(
        self,
        handler: StreamingHandler,
        *,
        name: str,
        fmt: Format,
        emulation: bool,
        framing: Framing,
        disconnect: Callable[[int, str], bytes],
    ) -> None:
        self._handler = handler
        self.name = name
        self.format = fmt
        self.emulation = emulation
        self.unidirectional = fmt == Format.JSON_UNI
        self.pong = not self.unidirectional
        self._framing = framing
        self._disconnect = disconnect
        self.write_timeout = write_timeout(handler.ctx)
        self._counts = handler.ctx.node.metrics.transport(name)

    def write(self, messages: Sequence[bytes]) -> Awaitable[None] | None:
        self._counts.sent(messages, type(messages[0]) is Push)
        return self._handler.send(messages, self._framing)

    def abort(self) -> None:
        self._handler.abort()

    def close(self, code: int, reason: str) -> None:
        self._handler.end(self._framing.frame([self._disconnect(code, reason)]))


def send_to_stream(stream: tornado.iostream.IOStream, data: bytes) -> Awaitable[None] | None:
    """Write `data` to `stream`; None when it is all written already. On a plain TCP stream
    with nothing queued, one `send` on the socket usually takes it all, without the
    future and buffer bookkeeping of `IOStream.write` (~20% of a fan-out's CPU); what the
    socket does not take (or an error) goes through `IOStream.write`, which queues it after
    anything queued before and handles errors as always (a closed stream raises
    `StreamClosedError`)."""
    if type(stream) is tornado.iostream.IOStream and not stream.writing() and not stream.closed():
        try:
            sent = stream.socket.send(data)
        except OSError:  # BlockingIOError (buffer full), or an error IOStream will raise
            sent = 0
        if sent == len(data):
            return None
        data = data[sent:]
    return stream.write(data)


def prefix_route(prefix: str) -> str:
    """A Tornado route pattern matching exactly the configured path."""
    return re.escape(prefix)


def refuse_over_admission(handler: tornado.web.RequestHandler, ctx: ConnContext) -> bool:
    """A new connection over `client_connection_limit` or `client_connection_rate_limit`
    gets 503 before its transport starts (as Centrifugo's middleware answers); True when
    `handler` (in its `prepare`, or before it starts a session) was answered so."""
    if ctx.admission.admit():
        return False
    handler.set_status(503)
    handler.finish()
    return True


def write_timeout(ctx: ConnContext) -> float:
    """Seconds a peer may take to accept a write before it is dropped (every transport
    uses `websocket_write_timeout`, as Centrifugo's own writers do)."""
    return ctx.config.websocket_write_timeout or WRITE_TIMEOUT


def abort_unless_done(
    future: asyncio.Future[Any], timeout: float, abort: Callable[[], Any]
) -> None:
    """Call `abort` unless `future` (a flush) completes within `timeout` seconds: a timer
    and a done-callback, no task per write."""
    handle = asyncio.get_running_loop().call_later(timeout, abort)

    def done(f: asyncio.Future[Any]) -> None:
        handle.cancel()
        if not f.cancelled():
            f.exception()

    future.add_done_callback(done)


def _ignore_failure(future: asyncio.Future[None]) -> None:
    """A write nobody awaits: a dead peer is noticed by `on_connection_close` instead."""
    future.add_done_callback(lambda f: f.cancelled() or f.exception())


__all__ = [
    "JSON_STREAM_CONTENT_TYPE",
    "PROTOBUF_CONTENT_TYPE",
    "SSE_CONTENT_TYPE",
    "SSE_PREAMBLE",
    "STREAM_HEADERS",
    "WRITE_TIMEOUT",
    "Framing",
    "LimitedBodyHandler",
    "StreamTransport",
    "StreamingHandler",
    "abort_unless_done",
    "chunk",
    "content_length_exceeds",
    "cors_headers",
    "frame_lines",
    "frame_sse",
    "prefix_route",
    "send_to_stream",
    "write_timeout",
]
