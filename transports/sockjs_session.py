"""SockJS 0.3 sessions: framing helpers, the session state machine, its receivers (an HTTP
response, a WebSocket) and the connection actor's transport over a session (the Tornado
handlers are in `transports/sockjs.py`).

A session is identified by the `<session>` part of `/<server>/<session>/<transport>` (HTTP
transports share one registry; each `websocket` request makes its own unregistered
session, as igm/sockjs-go does). It owns one connection actor and at most one *receiver*:
the HTTP response or WebSocket that frames go down right now.

* The first receiver gets `o`; queued messages go out as one `a[...]` frame per flush.
* A second receiver while one is attached gets `c[2010,"Another connection still open"]`.
* While a receiver is attached, `h` goes out every `heartbeat` seconds (0 = never).
* With no receiver for `disconnect_delay` seconds the session closes; so does a receiver
  whose client went away mid-request (`final`), and a closed session tells its actor
  `TransportClosed`.
* The actor's `close(code, reason)` sends `c[code,"reason"]`; the closing session lingers
  (answering every receiver with the close frame) until `disconnect_delay` passes.

Everything here runs on the event loop thread; nothing blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from enum import IntEnum
from typing import Any, Protocol

import orjson
import tornado.websocket
from tornado.iostream import StreamClosedError
from tornado.web import RequestHandler

from centripy.actors.channel import Push
from centripy.actors.connection import ConnectionActor
from centripy.actors.connection_core import TransportClosed, frames_waiting, tell_frame
from centripy.actors.context import ConnContext
from centripy.actors.transport import Format
from centripy.engine.metrics import TransportCounts
from centripy.engine.protocol.codes import DisconnectCode
from centripy.transports.http_common import WRITE_TIMEOUT, abort_unless_done

OPEN_FRAME = b"o"
HEARTBEAT_FRAME = b"h"
DISCONNECT_DELAY = 5.0  # seconds without a receiver before a session closes (sockjs-go default)
RESPONSE_LIMIT = 128 * 1024  # bytes of frames per streaming response before it ends

# Characters some browsers mangle inside a string sent down a SockJS transport (the
# `escapable` set of sockjs-node): sent as \uXXXX escapes. orjson already escapes the
# C0 controls, `"` and `\`.
_ESCAPABLE = re.compile(
    "[\u007f-\u009f\u00ad\u0600-\u0604\u070f\u17b4\u17b5\u200c-\u200f"
    "\u2028-\u202f\u2060-\u206f\ufeff\ufff0-\uffff]"
)
_HTML_ESCAPES = ((b"<", b"\\u003c"), (b">", b"\\u003e"), (b"&", b"\\u0026"))


def quote(data: bytes | str, *, html: bool = False) -> bytes:
    """`data` as a JSON string literal safe for every SockJS transport; with `html`, also
    safe inside an HTML `<script>` block (`<`, `>`, `&` escaped)."""
    text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
    out = orjson.dumps(text)
    if not text.isascii():
        out = _ESCAPABLE.sub(lambda m: f"\\u{ord(m.group()):04x}", out.decode()).encode()
    if html:
        for raw, escaped in _HTML_ESCAPES:
            if raw in out:
                out = out.replace(raw, escaped)
    return out


def array_frame(messages: Sequence[bytes]) -> bytes:
    """`a["msg1","msg2"]`."""
    return b"a[" + b",".join(quote(message) for message in messages) + b"]"


def close_frame(code: int, reason: str) -> bytes:
    """`c[code,"reason"]`."""
    return b"c[" + str(int(code)).encode() + b"," + quote(reason) + b"]"


ANOTHER_CONNECTION_FRAME = close_frame(2010, "Another connection still open")


class BadPayload(ValueError):
    """A client-to-server payload that is not a JSON array of strings (or one string); the
    message is the SockJS error text."""


def parse_messages(payload: bytes) -> list[str]:
    """The messages of an `xhr_send` / `jsonp_send` body or a `websocket` frame: a JSON
    array of strings, or a single JSON string. Raises BadPayload."""
    if not payload.strip():
        raise BadPayload("Payload expected.")
    try:
        value = orjson.loads(payload)
    except orjson.JSONDecodeError:
        raise BadPayload("Broken JSON encoding.") from None
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return value
    raise BadPayload("Broken JSON encoding.")


class Receiver(Protocol):
    """One HTTP response or WebSocket that frames go down (called on the loop).

    `on_end` is set by the session on attach; the receiver calls it exactly once when it
    ends, with `final=True` when the session must end with it (client gone, WebSocket)."""

    on_end: Callable[[bool], None] | None

    def send_frame(self, frame: bytes) -> Awaitable[None] | None:
        """Write one frame; the awaitable completes when the peer's socket took it."""
        ...

    def can_send(self) -> bool: ...

    def close(self) -> None:
        """End normally (response finished / WebSocket closed); calls `on_end`."""
        ...


class SessionState(IntEnum):
    OPENING = 0  # no receiver seen yet: the first one gets `o`
    ACTIVE = 1
    CLOSING = 2  # closed by the application: receivers get the close frame
    CLOSED = 3  # gone from the registry


class Session:
    """One SockJS session and its connection actor; see the module docstring."""

    def __init__(
        self,
        session_id: str,
        *,
        heartbeat: float,
        disconnect_delay: float = DISCONNECT_DELAY,
        on_closed: Callable[[Session], None] | None = None,
    ) -> None:
        self.id = session_id
        self.state = SessionState.OPENING
        self.actor: Any = None
        self._heartbeat = heartbeat
        self._disconnect_delay = disconnect_delay
        self._on_closed = on_closed
        self._recv: Receiver | None = None
        self._buffer: list[bytes] = []
        self._pending: asyncio.Future[None] | None = None
        self._close_frame = b""
        self._timer: asyncio.TimerHandle | None = None
        self._resumed: asyncio.Future[None] | None = None

    def start(self, ctx: ConnContext, headers: Mapping[str, str] | None = None) -> None:
        """Start the connection actor and the no-receiver timeout. Called by the handler
        that creates the session, which attaches its receiver next; `headers` are those
        of its request the proxies forward."""
        transport = SockJSTransport(self, ctx.node.metrics.transport(SockJSTransport.name))
        self.actor = ConnectionActor.start(ctx, transport, headers)
        self._set_timer(self._disconnect_delay, self.close)

    # -- client to server -----------------------------------------------------------------

    def accept(self, messages: Sequence[str]) -> bool:
        """Hand client messages (one Centrifuge frame each) to the actor, in order. False if
        the session no longer takes messages."""
        if self.state >= SessionState.CLOSING or self.actor is None:
            return False
        if self._actor_lost():
            self.close_with(DisconnectCode.INTERNAL, "internal server error")
            return False
        for message in messages:
            tell_frame(self.actor, message.encode())
        return True

    def saturated(self, limit: int) -> bool:
        """The actor has `limit` frames or more waiting: take no more for now."""
        return self.actor is not None and frames_waiting(self.actor) >= limit

    def resumed(self) -> asyncio.Future[None]:
        """Completes when the actor has worked its waiting frames down (`resume_reading`)."""
        if self._resumed is None:
            self._resumed = asyncio.get_running_loop().create_future()
        return self._resumed

    def resume_reading(self) -> None:
        resumed, self._resumed = self._resumed, None
        if resumed is not None and not resumed.done():
            resumed.set_result(None)

    # -- server to client -----------------------------------------------------------------

    def send(self, data: bytes) -> Awaitable[None] | None:
        """Queue one message. Returns an awaitable that completes once the message went to a
        receiver (at once if one is attached): the actor's writer waits on it, so a client
        that does not poll fills the actor's bounded queue, not this session."""
        if self.state >= SessionState.CLOSING:
            raise ConnectionError(f"sockjs session {self.id} is closed")
        self._buffer.append(data)
        recv = self._recv
        if recv is not None and recv.can_send():
            return self._flush(recv)
        if self._pending is None:
            self._pending = asyncio.get_running_loop().create_future()
        return self._pending

    def close_with(self, code: int, reason: str) -> None:
        """The application closes the session: `c[code,"reason"]` to the receiver (now or
        when the client comes back). Idempotent."""
        if self.state >= SessionState.CLOSING:
            return
        self._close_frame = close_frame(code, reason)
        self.state = SessionState.CLOSING
        recv = self._recv
        if recv is not None:
            recv.send_frame(self._close_frame)
            recv.close()

    def close(self) -> None:
        """End the session for good: drop it from the registry and tell the actor the
        transport is gone. Idempotent."""
        if self.state == SessionState.CLOSED:
            return
        self.state = SessionState.CLOSED
        self._cancel_timer()
        recv, self._recv = self._recv, None
        if recv is not None and recv.can_send():
            recv.close()
        if self._on_closed is not None:
            self._on_closed(self)
        if self.actor is not None and self.actor.is_alive():
            self.actor.tell(TransportClosed())

    # -- receivers ------------------------------------------------------------------------

    def attach(self, recv: Receiver) -> bool:
        """Make `recv` the session's receiver; False (nothing sent) if another one is
        attached or the session is closed."""
        if self._recv is not None or self.state == SessionState.CLOSED:
            return False
        if self._actor_lost():
            self.close_with(DisconnectCode.INTERNAL, "internal server error")
        self._recv = recv
        recv.on_end = lambda final: self._receiver_ended(recv, final)
        self._cancel_timer()
        if self.state == SessionState.CLOSING:
            recv.send_frame(self._close_frame)
            recv.close()
            return True
        if self.state == SessionState.OPENING:
            self.state = SessionState.ACTIVE
            recv.send_frame(OPEN_FRAME)
        if self._recv is recv and self._buffer and recv.can_send():
            self._flush(recv)
        if self._recv is recv and self._heartbeat > 0:
            self._set_timer(self._heartbeat, self._send_heartbeat)
        return True

    def _actor_lost(self) -> bool:
        """The actor stopped without closing the session (it failed): the client is told
        to reconnect rather than left polling a session nobody serves."""
        return (
            self.state < SessionState.CLOSING
            and self.actor is not None
            and not self.actor.is_alive()
        )

    def _receiver_ended(self, recv: Receiver, final: bool) -> None:
        if self._recv is not recv:
            return
        self._recv = None
        self._cancel_timer()
        if final:
            self.close()
        elif self.state != SessionState.CLOSED:
            self._set_timer(self._disconnect_delay, self.close)

    def _flush(self, recv: Receiver) -> Awaitable[None] | None:
        frame = array_frame(self._buffer)
        self._buffer = []
        pending, self._pending = self._pending, None
        if pending is not None and not pending.done():
            pending.set_result(None)
        return recv.send_frame(frame)

    def _send_heartbeat(self) -> None:
        self._timer = None
        recv = self._recv
        if recv is None or not recv.can_send():
            return
        recv.send_frame(HEARTBEAT_FRAME)
        if self._recv is recv:
            self._set_timer(self._heartbeat, self._send_heartbeat)

    def _set_timer(self, delay: float, callback: Callable[[], None]) -> None:
        self._cancel_timer()
        self._timer = asyncio.get_running_loop().call_later(delay, callback)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


def retrieve(future: asyncio.Future[Any]) -> None:
    """Done-callback marking a write future's exception as seen (the peer may be gone)."""
    if not future.cancelled():
        future.exception()


class HttpReceiver:
    """A receiving HTTP response. Frames are written and flushed at once; the response
    ends after `limit` bytes of frames (so what Tornado buffers for a slow client stays
    bounded by the limit, and later messages wait in the session). Loop only."""

    def __init__(
        self,
        handler: RequestHandler,
        encode: Callable[[bytes], bytes],
        limit: int,
        write_timeout: float = WRITE_TIMEOUT,
    ):
        self.on_end: Callable[[bool], None] | None = None
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._handler = handler
        self._encode = encode
        self._limit = limit
        self._size = 0
        self._timeout = write_timeout  # a peer not taking a write within it is dropped

    def can_send(self) -> bool:
        return not self.done.done()

    def send_frame(self, frame: bytes) -> None:
        if self.done.done():
            return
        data = self._encode(frame)
        self._size += len(data)
        try:
            self._handler.write(data)
            if self._size >= self._limit:
                self._timed(self._handler.finish())
                self._end(False)
            else:
                self._timed(self._handler.flush())
        except (RuntimeError, StreamClosedError):
            self._end(True)

    def close(self) -> None:
        if self.done.done():
            return
        with contextlib.suppress(RuntimeError, StreamClosedError):
            self._timed(self._handler.finish())
        self._end(False)

    def _timed(self, flushed: asyncio.Future[None]) -> None:
        abort_unless_done(flushed, self._timeout, self._abort)

    def _abort(self) -> None:
        """The peer took nothing within the write timeout: drop its TCP connection."""
        connection: Any = self._handler.request.connection
        with contextlib.suppress(Exception):
            connection.close()
        self.interrupt()

    def interrupt(self) -> None:
        """The client went away before the response ended."""
        if not self.done.done():
            self._end(True)

    def _end(self, final: bool) -> None:
        self.done.set_result(None)
        on_end, self.on_end = self.on_end, None
        if on_end is not None:
            on_end(final)


class WebSocketReceiver:
    """The session `websocket`: one text message per frame; the session ends with it."""

    def __init__(self, handler: tornado.websocket.WebSocketHandler) -> None:
        self.on_end: Callable[[bool], None] | None = None
        self._handler = handler
        self._ended = False

    def can_send(self) -> bool:
        return not self._ended

    def send_frame(self, frame: bytes) -> asyncio.Future[None] | None:
        if self._ended:
            return None
        try:
            future = self._handler.write_message(frame)
        except tornado.websocket.WebSocketClosedError:
            self.end()
            return None
        future.add_done_callback(retrieve)
        return future

    def close(self) -> None:
        if not self._ended:
            self._handler.close()
            self.end()

    def end(self) -> None:
        if self._ended:
            return
        self._ended = True
        on_end, self.on_end = self.on_end, None
        if on_end is not None:
            on_end(True)


class SessionRegistry:
    """The HTTP transports' sessions by id (one registry per SockJS endpoint; loop only)."""

    def __init__(self, ctx: ConnContext, heartbeat: float) -> None:
        self.ctx = ctx
        self.heartbeat = heartbeat
        self._sessions: dict[str, Session] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    def get(self, session_id: str) -> Session | None:
        return self._sessions.get(session_id)

    def get_or_create(self, session_id: str, headers: Mapping[str, str] | None = None) -> Session:
        """The session `session_id`, created (with its actor) if new."""
        session = self._sessions.get(session_id)
        if session is None:
            session = Session(session_id, heartbeat=self.heartbeat, on_closed=self._remove)
            self._sessions[session_id] = session
            session.start(self.ctx, headers)
        return session

    def _remove(self, session: Session) -> None:
        if self._sessions.get(session.id) is session:
            del self._sessions[session.id]


class SockJSTransport:
    """The connection actor's view of a session: every write is one SockJS message holding
    one Centrifuge frame (the replies joined by newlines); a disconnect is a close frame."""

    name = "sockjs"
    format = Format.JSON
    emulation = False
    unidirectional = False
    pong = True

    def __init__(self, session: Session, counts: TransportCounts | None = None) -> None:
        self._session = session
        self._counts = counts or TransportCounts()  # the node's counts of "sockjs"

    def write(self, messages: Sequence[bytes]) -> Awaitable[None] | None:
        """Called by the actor's writer on the loop, one call at a time."""
        self._counts.sent(messages, type(messages[0]) is Push)
        data = messages[0] if len(messages) == 1 else b"\n".join(messages)
        return self._session.send(data)

    def close(self, code: int, reason: str) -> None:
        """Called once by the actor on the loop, after its queue was flushed."""
        self._session.close_with(code, reason)

    def resume_reading(self) -> None:
        self._session.resume_reading()

    def abort(self) -> None:
        """A write failed: the session ends (its receiver, if any, is closed), unless it
        is closing already (its close frame waits for the client's next poll)."""
        if self._session.state < SessionState.CLOSING:
            self._session.close()


__all__ = [
    "ANOTHER_CONNECTION_FRAME",
    "DISCONNECT_DELAY",
    "RESPONSE_LIMIT",
    "BadPayload",
    "HttpReceiver",
    "Receiver",
    "Session",
    "SessionRegistry",
    "SessionState",
    "SockJSTransport",
    "WebSocketReceiver",
    "array_frame",
    "close_frame",
    "parse_messages",
    "quote",
    "retrieve",
]
