"""Connections of the lean path on an asyncio transport (plain TCP; see `api_lean`).

Every connection `LeanHTTPServer` accepts starts as an `ApiConnection`, which serves the
server API's requests with none of a Tornado `IOStream`'s per-request costs (a read
re-armed and an epoll (un)registration per read, a write future, a `call_later` timer per
wait). A WebSocket upgrade to the client route (`LeanHTTPServer.take_upgrade`) hands the
transport to a `LeanWebSocket`, with the bytes after the head; a refused one (503) is
answered and closed with a linger.

An `ApiConnection` buffers what it receives and answers requests strictly in order: it
parses a head (`http11.parse_request_head`), waits for its Content-Length body, answers
it (`LeanHTTPServer.respond`) and writes the answer, and only then parses the next head
(pipelined requests wait in the buffer). What it will not answer (`LeanHTTPServer.
triage` gives no route: a GET, a chunked body, another route, a head it refuses) goes back
to Tornado, unchanged (after a 413 when it announces a body over the route's limit, as on
the stream): once everything written has left the buffer, the socket is
duplicated, the transport dropped, and a new `IOStream` on the duplicate, with the bytes
not yet consumed put back in front, goes to Tornado's `HTTPServer.handle_stream` for the
rest of the connection's life.

Bounds, as on the stream: a partial head of more than `MAX_HEAD` bytes closes the
connection; the first head must arrive within `header_timeout` of the accept, the next
within `idle_timeout` of the previous answer, a body within `body_timeout` of its head.
One timer per connection (on the timer wheel, `actors/wheel.py`) keeps them: each wait
stores a deadline, and the timer, when it fires, closes the connection or re-arms itself
for the later deadline. A 401 or 413 is answered before the body, then the connection is
closed with a linger (`linger.py`).
Reading pauses while the transport holds more than `HIGH_WATER` bytes not yet sent (a
caller pipelining requests without reading the answers) and while more than `INPUT_LIMIT`
bytes wait unparsed behind a request being answered.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from centripy.actors.wheel import WheelTimer, wheel_of
from centripy.transports.http11 import HEAD_END, MAX_HEAD, RequestHead, parse_request_head
from centripy.transports.linger import linger

if TYPE_CHECKING:
    from centripy.transports.api_lean import LeanHTTPServer, Route
    from centripy.transports.websocket import LeanWebSocket

log = logging.getLogger("centripy.api")

HIGH_WATER: Final = 65536  # bytes written but not yet sent above which reading pauses
INPUT_LIMIT: Final = 4 * MAX_HEAD  # bytes received but not yet parsed above which too

# What is done with the socket once all that was written has been sent: it goes to Tornado
# (with the bytes not consumed) or to a linger.
Release = Callable[[socket.socket | None, bytes], None]


class ApiConnection(asyncio.Protocol):
    """One connection `LeanHTTPServer` accepted (see the module docstring). Called on the
    event loop."""

    __slots__ = (
        "_body_wait",
        "_buffer",
        "_conns",
        "_deadline",
        "_eof",
        "_ip",
        "_loop",
        "_reading",
        "_release",
        "_request",
        "_route",
        "_server",
        "_started",
        "_task",
        "_timer",
        "_transport",
        "_write_paused",
        "address",
    )

    def __init__(self, server: LeanHTTPServer, conns: set[ApiConnection]) -> None:
        self._server = server
        self.address: Any = None  # the peer's, from the transport
        self._ip = "-"
        self._conns = conns
        self._buffer = bytearray()
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._request: RequestHead | None = None  # its head read, its body awaited
        self._route: Route | None = None
        self._started = 0.0
        self._body_wait = False  # the body deadline of `_request` is set
        self._task: asyncio.Task[None] | None = None  # the request being answered
        self._deadline = 0.0  # loop time when the wait in progress fails; 0: no wait
        self._timer: WheelTimer | None = None
        self._reading = True
        self._write_paused = False
        self._eof = False
        self._release: Release | None = None  # once set, no further request is read

    # -- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._conns.add(self)
        transport.set_write_buffer_limits(high=HIGH_WATER)
        self.address = transport.get_extra_info("peername")
        self._ip = peer_ip(self.address)
        if self._server.lean_rules() is None:  # host rules: Tornado serves it all
            self._release_socket(self._to_tornado)
            return
        self._wait_until(self._loop.time() + self._server.limits.header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._conns.discard(self)
        self._deadline = 0.0
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if self._task is None:
            self._process()
        else:
            self._flow()

    def eof_received(self) -> bool:
        """The caller sent FIN: the requests already received are still answered, then
        the connection closes."""
        self._eof = True
        if self._task is None:
            self._process()
        return True  # keep the transport open for the answers

    def pause_writing(self) -> None:
        self._write_paused = True
        self._flow()

    def resume_writing(self) -> None:
        # Called from inside the transport's write handler, which goes on using the
        # transport afterwards: closing it (a hand-over, an EOF) must wait until then.
        self._write_paused = False
        self._loop.call_soon(self._resumed)

    def _resumed(self) -> None:
        if self._write_paused:
            return
        if self._release is not None:
            self._released()
        elif self._task is None:
            self._process()

    # -- requests -------------------------------------------------------------------------

    def _process(self) -> None:
        """Read the next request from the buffer and start answering it; or wait for more
        bytes (closing the connection at EOF); or hand the connection over."""
        transport = self._transport
        buffer = self._buffer
        server = self._server
        while (
            self._task is None
            and self._release is None
            and not self._write_paused
            and transport is not None
            and not transport.is_closing()
        ):
            request = self._request
            if request is None:
                end = buffer.find(HEAD_END) + len(HEAD_END)
                if end < len(HEAD_END):
                    if len(buffer) > MAX_HEAD or self._eof:
                        transport.close()  # a head too large (as Tornado), or the end
                    break
                if end > MAX_HEAD:
                    transport.close()
                    return
                request = parse_request_head(bytes(buffer[:end]))
                if request is not None and request.method == "GET":
                    upgrade = server.take_upgrade(request)
                    if isinstance(upgrade, tuple):  # refused
                        del buffer[:end]
                        transport.write(server.refusal_bytes(upgrade))
                        self._release_socket(_linger)
                        return
                    if upgrade is not None:
                        del buffer[:end]
                        self._hand_to(upgrade)
                        return
                route, refusal = server.triage(request)
                if request is not None and refusal is not None:
                    del buffer[:end]
                    transport.write(server.refusal_bytes(refusal))
                    server.log_request(refusal[0], request, self._ip, time.monotonic())
                    self._release_socket(_linger)
                    return
                if request is None or route is None:
                    self._release_socket(self._to_tornado)
                    return
                del buffer[:end]
                self._started = time.monotonic()
                self._request, self._route, self._body_wait = request, route, False
            length = request.content_length
            if len(buffer) < length:
                if self._eof:
                    transport.close()
                elif not self._body_wait:
                    self._body_wait = True
                    self._wait_until(self._loop.time() + server.limits.body_timeout)
                break
            body = bytes(buffer[:length])
            del buffer[:length]
            route = self._route
            assert route is not None
            self._request = self._route = None
            self._deadline = 0.0  # no wait while answering
            self._task = self._loop.create_task(self._answer(request, route, body))
        self._flow()

    def _hand_to(self, websocket: LeanWebSocket) -> None:
        """The connection becomes `websocket`'s, with the bytes after the upgrade's head."""
        transport = self._transport
        assert transport is not None
        self._conns.discard(self)
        self._transport = None
        self._deadline = 0.0
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        websocket.early = bytes(self._buffer)
        self._buffer.clear()
        if not self._reading:
            transport.resume_reading()
        transport.set_protocol(websocket)
        websocket.connection_made(transport)

    async def _answer(self, request: RequestHead, route: Route, body: bytes) -> None:
        try:
            data = await self._server.respond(request, body, *route, self._ip, self._started)
            transport = self._transport
            if transport is None or transport.is_closing():
                return
            transport.write(data)
            if not request.keep_alive:
                transport.close()
                return
            self._wait_until(self._loop.time() + self._server.limits.idle_timeout)
            self._task = None
            self._process()
        except Exception:
            log.exception("lean HTTP connection failed")
            self.abort()

    # -- flow, deadlines, the end ----------------------------------------------------------

    def _flow(self) -> None:
        """Read while nothing holds us back: not at EOF, no hand-over under way, the answers
        written mostly sent, and not too many bytes waiting to be parsed (beyond the body
        being read)."""
        transport = self._transport
        if transport is None or self._eof:
            return
        request = self._request
        limit = INPUT_LIMIT if request is None else max(INPUT_LIMIT, request.content_length)
        reading = not self._write_paused and self._release is None and len(self._buffer) <= limit
        if reading != self._reading:
            self._reading = reading
            if reading:
                transport.resume_reading()
            else:
                transport.pause_reading()

    def _wait_until(self, deadline: float) -> None:
        """Close the connection at `deadline` (loop time) unless the wait ends before (the
        next wait replaces the deadline; answering clears it)."""
        self._deadline = deadline
        timer = self._timer
        if timer is None or timer.when() > deadline:
            if timer is not None:
                timer.cancel()
            self._timer = wheel_of(self._loop).call_at(deadline, self._check_deadline)

    def _check_deadline(self) -> None:
        self._timer = None
        deadline = self._deadline
        if not deadline:
            return
        if self._loop.time() >= deadline:
            self.abort()
        else:
            self._timer = wheel_of(self._loop).call_at(deadline, self._check_deadline)

    def _release_socket(self, release: Release) -> None:
        """Stop reading requests; once the transport has sent all it holds, give the
        socket (a duplicate: the transport then closes its own) to `release`."""
        transport = self._transport
        assert transport is not None
        self._release = release
        self._flow()
        # pause_writing now if anything is unsent; resume_writing once all is sent
        transport.set_write_buffer_limits(high=0, low=0)
        if not self._write_paused:
            self._released()

    def _released(self) -> None:
        transport, release = self._transport, self._release
        if transport is None or release is None or transport.is_closing():
            return
        self._deadline = 0.0
        try:
            raw = transport.get_extra_info("socket")
            sock: socket.socket | None = socket.socket(fileno=os.dup(raw.fileno()))
        except OSError:
            sock = None
        transport.abort()  # its socket closes; the duplicate keeps the connection
        data = bytes(self._buffer)
        self._buffer.clear()
        release(sock, data)

    def _to_tornado(self, sock: socket.socket | None, data: bytes) -> None:
        if sock is not None:
            self._server.hand_over(sock, data, self.address)

    def close(self) -> None:
        """Close after sending what was written (server shutdown)."""
        if self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()


def _linger(sock: socket.socket | None, data: bytes) -> None:
    linger(sock)


def peer_ip(address: Any) -> str:
    """The IP address of a connection's peer, for the access log ("-" when unknown)."""
    if isinstance(address, tuple) and address:
        return str(address[0])
    return "-"
