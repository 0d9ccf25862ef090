"""The lean path on Tornado's own port: server API POSTs and WebSocket upgrades answered
outside Tornado's HTTP/1 stack.

Tornado's HTTP/1 stack (`HTTP1Connection`, `HTTPHeaders`, routing, `RequestHandler`) costs
~200 µs of CPU per request on the 2-core machines here: a bare `RequestHandler` answers
~5.1k requests/s, below what a backend publishing over single `POST /api/publish` calls
needs. `LeanHTTPServer` is Tornado's `HTTPServer` with one addition. On a plain TCP port
asyncio accepts the connections (`add_sockets`), and each starts as an
`api_protocol.ApiConnection`, which reads and parses each request head itself
(`http11.parse_request_head`):

* a POST to an API route that `http11.lean_post` accepts (Content-Length body, no
  Transfer-Encoding, Expect or Upgrade, HTTP/1.0 or 1.1) is answered with the same
  `ApiEndpoint` the Tornado handlers use, and the next request is read;
* a WebSocket handshake to the client WebSocket route (`take_upgrade`:
  `ws_protocol.accept_upgrade` and `websocket.lean_websocket`: no compression, an allowed
  Origin) hands the transport to a `websocket.LeanWebSocket`; one to uni_websocket, to a
  `uni.LeanUniWebSocket` (`uni.lean_uni_websocket`, the same conditions);
* anything else (SSE, GET, a chunked body, a route another handler owns, a handshake the
  lean path leaves to Tornado, anything unusual) goes to a new `IOStream` on the socket,
  with the bytes read put in front of its read buffer, and to Tornado's
  `HTTP1ServerConnection` for the rest of the connection's life, so every other transport
  is untouched.

With TLS, Tornado accepts, and `_serve` reads the heads from the `SSLIOStream`: API POSTs
are answered there, the rest goes to Tornado.

Accepting with asyncio spares every WebSocket connection an `IOStream`, a Tornado coroutine
reading its head, and a second transport after taking the socket from the stream (a
reconnect storm of 19,000 clients is mostly connects).

Routing follows the application's own rules (`match`). An application with host-specific
rules (`add_handlers` with a host pattern other than `.*`, or a `default_host`) is served by
Tornado alone: the lean router does not look at Host. The Tornado internal this needs
(`unread`) lives in `tornado_compat`.

Measured with wrk (64 connections, same machine): the lean path answers ~12.8k requests/s
where Tornado's stack answers ~5.1k.
"""

from __future__ import annotations

import asyncio
import email.utils
import http
import logging
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final

import tornado.httpserver
import tornado.httputil
import tornado.iostream
import tornado.routing
import tornado.web
from tornado.iostream import StreamClosedError, UnsatisfiableReadError

from centripy.transports.api_http import (
    JSON_TYPE,
    TOO_LARGE,
    ApiEndpoint,
    ApiLegacyHandler,
    ApiMethodHandler,
)
from centripy.transports.api_protocol import ApiConnection, peer_ip
from centripy.transports.http11 import (
    HEAD_END,
    MAX_HEAD,
    RequestHead,
    lean_post,
    parse_request_head,
)
from centripy.transports.linger import duplicate, linger
from centripy.transports.tornado_compat import unread
from centripy.transports.uni import UniWebSocketHandler, lean_uni_websocket
from centripy.transports.websocket import LeanWebSocket, WebSocketHandler, lean_websocket
from centripy.transports.ws_protocol import accept_upgrade

log = logging.getLogger("centripy.api")
access_log = logging.getLogger("tornado.access")

# The lean adapter of each WebSocket route's handler: the adapter returns None when Tornado
# must answer the handshake (compression, a refused Origin).
_LEAN_UPGRADES: Final[dict[type, Callable[..., LeanWebSocket | None]]] = {
    WebSocketHandler: lean_websocket,
    UniWebSocketHandler: lean_uni_websocket,
}

# The endpoint of the route and the API method (None for the legacy `POST <prefix>`).
Route = tuple[ApiEndpoint, str | None]
# The listen backlog of a port asyncio accepts on (asyncio's create_server calls listen()
# again): the same as centripy.server's, for a reconnect storm's thousands of SYNs at once.
LISTEN_BACKLOG: Final = 4096
# The handler class a path routes to, its keyword arguments and its path arguments.
Match = tuple[type, dict[str, Any], list[bytes]]
# What to answer, before reading it, to a request announcing a body: status, body, type.
Refusal = tuple[int, bytes, str]
_ANY_HOST: Final = ".*$"  # HostMatches(".*")


class _DateHeader:
    """The `Date` header value, formatted once per second."""

    def __init__(self) -> None:
        self._second = -1
        self._value = b""

    def value(self) -> bytes:
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._value = email.utils.formatdate(now, usegmt=True).encode()
        return self._value


def response_bytes(
    status: int,
    body: bytes,
    content_type: str,
    date: bytes,
    keep_alive_10: bool = False,
    close: bool = False,
) -> bytes:
    """A complete HTTP/1.1 response with a Content-Length."""
    connection = b"Connection: close\r\n" if close else _KEEP_ALIVE if keep_alive_10 else b""
    return b"%sContent-Length: %d\r\nDate: %s\r\n%s\r\n%s" % (
        _status_head(status, content_type),
        len(body),
        date,
        connection,
        body,
    )


_KEEP_ALIVE: Final = b"Connection: keep-alive\r\n"
_status_heads: dict[tuple[int, str], bytes] = {}


def _status_head(status: int, content_type: str) -> bytes:
    """The status line and Content-Type of a response (remembered)."""
    key = (status, content_type)
    head = _status_heads.get(key)
    if head is None:
        head = b"HTTP/1.1 %d %s\r\n" % (status, http.HTTPStatus(status).phrase.encode())
        if content_type:
            head += b"Content-Type: " + content_type.encode() + b"\r\n"
        if len(_status_heads) < 256:
            _status_heads[key] = head
    return head


@dataclass(frozen=True, slots=True)
class Limits:
    """What one HTTP connection may take (config keys `http_read_header_timeout`,
    `http_read_timeout`, `http_idle_timeout`, `api_max_request_body_size`)."""

    header_timeout: float = 10.0  # the first request head must arrive within this
    body_timeout: float = 30.0  # a request body must arrive within this
    idle_timeout: float = 60.0  # a keep-alive connection waits this long for the next head
    max_body: int = 10 << 20  # bodies of routes without a limit of their own


def _path_rules(app: tornado.web.Application) -> list[tornado.routing.Rule] | None:
    """The rules of `app` that route by path, flattened in Tornado's order (each host rule
    of the default router in turn, the catch-all last), or None when one depends on Host."""
    rules: list[tornado.routing.Rule] = []
    for rule in app.default_router.rules:
        matcher, target = rule.matcher, rule.target
        any_host = isinstance(matcher, tornado.routing.AnyMatches) or (
            isinstance(matcher, tornado.routing.HostMatches)
            and matcher.host_pattern.pattern == _ANY_HOST
        )
        if not any_host or not isinstance(target, tornado.routing.RuleRouter):
            return None
        for inner in target.rules:
            if not isinstance(inner.matcher, tornado.routing.PathMatches):
                return None  # e.g. DefaultHostMatches (a `default_host` with host rules)
            rules.append(inner)
    return rules


def _report_failure(serving: asyncio.Task[asyncio.Server]) -> None:
    if not serving.cancelled() and serving.exception() is not None:
        log.error("cannot accept connections", exc_info=serving.exception())


def _expire(stream: tornado.iostream.IOStream) -> None:
    """A read deadline passed: drop the connection (the pending read then fails)."""
    stream.close()


class LeanHTTPServer(tornado.httpserver.HTTPServer):
    """`LeanHTTPServer(app, lean_api=True, ...)`: Tornado's server, with requests to the
    application's API routes answered on the lean path. Without `lean_api` (or when `app`
    is not a `tornado.web.Application`) it is exactly Tornado's `HTTPServer`."""

    def initialize(  # type: ignore[override]
        self,
        request_callback: Any,
        lean_api: bool = False,
        limits: Limits | None = None,
        **kwargs: Any,
    ) -> None:
        limits = limits or Limits()
        kwargs.setdefault("idle_connection_timeout", limits.idle_timeout)
        kwargs.setdefault("body_timeout", limits.body_timeout)
        kwargs.setdefault("max_body_size", limits.max_body)
        super().initialize(request_callback, **kwargs)
        self._limits = limits
        app = request_callback
        self._app = app if lean_api and isinstance(app, tornado.web.Application) else None
        self._matches: dict[str, Match | None] = {}
        self._rules_key = (-1, -1)
        self._rules: list[tornado.routing.Rule] | None = None
        self._lean: set[tornado.iostream.IOStream] = set()
        self._api_connections: set[ApiConnection] = set()
        self._websockets: set[LeanWebSocket] = set()
        self._date = _DateHeader()
        self._accepting: list[tuple[socket.socket, asyncio.Task[asyncio.Server]]] = []

    def add_sockets(self, sockets: Iterable[socket.socket]) -> None:
        """With the lean path on a plain TCP port, asyncio accepts: each connection starts
        as an `ApiConnection` (see the module docstring). With TLS, Tornado accepts."""
        if self._app is None or self.ssl_options is not None:
            return super().add_sockets(sockets)
        loop = asyncio.get_running_loop()
        for sock in sockets:
            serving = loop.create_task(
                loop.create_server(self._accepted, sock=sock, backlog=LISTEN_BACKLOG)
            )
            serving.add_done_callback(_report_failure)
            self._accepting.append((sock, serving))
        return None

    def _accepted(self) -> ApiConnection:
        return ApiConnection(self, self._api_connections)

    def stop(self) -> None:
        accepting, self._accepting = self._accepting, []
        for sock, task in accepting:
            if task.done() and not task.cancelled() and task.exception() is None:
                task.result().close()
            else:
                task.cancel()
            sock.close()
        super().stop()

    def handle_stream(self, stream: tornado.iostream.IOStream, address: tuple[Any, ...]) -> Any:
        if self._app is None or self.lean_rules() is None:
            return super().handle_stream(stream, address)
        return self._serve(stream, address)

    async def close_all_connections(self) -> None:
        for stream in list(self._lean):
            stream.close()
        for connection in list(self._api_connections):
            connection.close()
        for ws in list(self._websockets):
            ws.abort()
        await super().close_all_connections()

    @property
    def limits(self) -> Limits:
        return self._limits

    def lean_rules(self) -> list[tornado.routing.Rule] | None:
        """The application's path rules, in the order Tornado tries them, when routing does
        not depend on the Host header; None when it does (host patterns other than `.*`, a
        `default_host`, a rule that is not a path rule): then Tornado serves every request,
        since the lean path cannot route like it without looking at Host. Rechecked when the
        application's rules change (`add_handlers` after start-up)."""
        app = self._app
        if app is None:
            return None
        key = (len(app.default_router.rules), len(app.wildcard_router.rules))
        if key != self._rules_key:
            self._rules_key = key
            self._rules = _path_rules(app)
            self._matches.clear()
        return self._rules

    def match(self, path: str) -> Match | None:
        """The handler the application routes `path` to (its own rules, in order; remembered
        per path), or None (also when routing depends on Host: see `lean_rules`)."""
        rules = self.lean_rules()
        if path in self._matches:
            return self._matches[path]
        found: Match | None = None
        if rules is not None:
            line = tornado.httputil.RequestStartLine("GET", path, "HTTP/1.1")
            headers = tornado.httputil.HTTPHeaders({"Host": "localhost"})
            request = tornado.httputil.HTTPServerRequest(start_line=line, headers=headers)
            for rule in rules:
                params = rule.matcher.match(request)
                if params is not None:
                    target = rule.target if isinstance(rule.target, type) else type(rule.target)
                    found = (target, rule.target_kwargs or {}, params.get("path_args") or [])
                    break
        if len(self._matches) < 1024:
            self._matches[path] = found
        return found

    def body_limit(self, path: str) -> int:
        """The largest body a request to `path` may announce: the route's own
        `body_limit` (emulation, SockJS, uni transports) or the server's `max_body`."""
        found = self.match(path)
        if found is not None:
            target, kwargs, _ = found
            limit = kwargs.get("body_limit") or getattr(target, "body_limit", None)
            if isinstance(limit, int) and limit > 0:
                return min(limit, self._limits.max_body)
        return self._limits.max_body

    def triage(self, request: RequestHead | None) -> tuple[Route | None, Refusal | None]:
        """What the lean path does with a request head: (the API route it answers the
        request on, or None when Tornado must answer it: no head `parse_request_head`
        accepts, not a `lean_post`, another route; what to answer before reading the body
        the request announces, or None: see `refusal`, which applies to every route)."""
        if request is None or not lean_post(request):
            return None, None
        route = self.route(request.path)
        return route, self.refusal(request, route) if request.content_length else None

    def route(self, path: str) -> Route | None:
        """The API route a POST to `path` takes, or None when the application routes `path`
        to another handler (or nowhere)."""
        found = self.match(path)
        if found is None:
            return None
        target, kwargs, path_args = found
        endpoint = kwargs.get("endpoint")
        if target is ApiLegacyHandler and endpoint is not None:
            return (endpoint, None)
        if target is ApiMethodHandler and endpoint is not None and path_args:
            return (endpoint, path_args[0].decode("latin-1"))
        return None

    async def _serve(self, stream: tornado.iostream.IOStream, address: tuple[Any, ...]) -> None:
        """Every wait is bounded: the first head by `header_timeout`, the next ones of a
        keep-alive connection by `idle_timeout`, a body by `body_timeout` (the stream is
        closed when one passes); what Tornado takes over gets the same bounds."""
        self._lean.add(stream)
        loop = asyncio.get_running_loop()
        wait = self._limits.header_timeout
        try:
            while True:
                timer = loop.call_later(wait, _expire, stream)
                try:
                    head = await stream.read_until(HEAD_END, max_bytes=MAX_HEAD)
                except (StreamClosedError, UnsatisfiableReadError):
                    stream.close()
                    return
                finally:
                    timer.cancel()
                wait = self._limits.idle_timeout
                request = parse_request_head(head)
                route, refusal = self.triage(request)
                if request is not None and refusal is not None:
                    await self._refuse(stream, refusal)
                    self.log_request(refusal[0], request, peer_ip(address), time.monotonic())
                    return
                if request is None or route is None:
                    unread(stream, head)
                    self._lean.discard(stream)
                    super().handle_stream(stream, address)
                    return
                if not await self._answer(stream, request, *route, peer_ip(address)):
                    stream.close()
                    return
        except StreamClosedError:
            return
        except Exception:
            log.exception("lean HTTP connection failed")
            stream.close()
        finally:
            self._lean.discard(stream)

    def hand_over(self, sock: socket.socket, data: bytes, address: Any) -> None:
        """Give a connection an `ApiConnection` served back to Tornado: a new stream on
        `sock`, `data` (bytes received, not consumed) in front of its read buffer."""
        stream = tornado.iostream.IOStream(
            sock, max_buffer_size=self.max_buffer_size, read_chunk_size=self.read_chunk_size
        )
        unread(stream, data)
        super().handle_stream(stream, address)

    def take_upgrade(self, request: RequestHead) -> LeanWebSocket | Refusal | None:
        """The `LeanWebSocket` for a WebSocket upgrade to a client WebSocket route (the
        bidirectional one, or uni_websocket: `LeanUniWebSocket`), or the
        refusal to answer (503: client_connection_limit / _rate_limit); None when Tornado
        must answer it (another route, compression, a refused Origin, a handshake
        `accept_upgrade` does not accept)."""
        upgrade = accept_upgrade(request)
        found = None if upgrade is None else self.match(request.path)
        if upgrade is None or found is None:
            return None
        adapter = _LEAN_UPGRADES.get(found[0])
        if adapter is None:
            return None
        ctx = found[1]["ctx"]
        protocol = adapter(ctx, upgrade, self._websockets)
        if protocol is None:
            return None
        if not ctx.admission.admit():
            return 503, b"", ""
        return protocol

    async def _answer(
        self,
        stream: tornado.iostream.IOStream,
        request: RequestHead,
        endpoint: ApiEndpoint,
        method: str | None,
        ip: str,
    ) -> bool:
        """Answer one request; True when the connection stays open for the next one."""
        started = time.monotonic()
        body = b""
        if request.content_length:
            loop = asyncio.get_running_loop()
            timer = loop.call_later(self._limits.body_timeout, _expire, stream)
            try:
                body = await stream.read_bytes(request.content_length)
            finally:
                timer.cancel()
        await stream.write(await self.respond(request, body, endpoint, method, ip, started))
        return request.keep_alive

    async def respond(
        self,
        request: RequestHead,
        body: bytes,
        endpoint: ApiEndpoint,
        method: str | None,
        ip: str,
        started: float,
    ) -> bytes:
        """The response to `request` (`endpoint.answer`; 500 when it fails), logged."""
        try:
            status, out, content_type = await endpoint.answer(
                method, body, request.header, request.query
            )
        except Exception:
            log.exception("server API request to %s failed", request.path)
            status, out, content_type = 500, b"Internal Server Error\n", "text/plain; charset=utf-8"
        if status >= 400 or access_log.isEnabledFor(logging.DEBUG):
            self.log_request(status, request, ip, started)
        keep_10 = request.keep_alive and request.http10
        return response_bytes(status, out, content_type, self._date.value(), keep_10)

    def refusal(self, request: RequestHead, route: Route | None) -> Refusal | None:
        """What to answer, before reading it, to a request announcing a body: 401 to an API
        caller without the key, 413 beyond the body limit of the route (any route: Tornado
        would answer 400); None to go on."""
        if route is not None and not route[0].authorized(request.header, request.query):
            return 401, b"", ""
        if request.content_length > self.body_limit(request.path):
            return 413, TOO_LARGE, JSON_TYPE
        return None

    def refusal_bytes(self, refusal: Refusal) -> bytes:
        """The answer of a refusal; the connection then closes (with a linger)."""
        status, body, content_type = refusal
        return response_bytes(status, body, content_type, self._date.value(), close=True)

    async def _refuse(self, stream: tornado.iostream.IOStream, refusal: Refusal) -> None:
        """Answer `refusal` without reading the request body, and close the connection (a
        refused caller never makes us buffer its body) with a linger, so that a caller still
        sending its body reads the answer rather than a reset."""
        sock = None
        try:
            await stream.write(self.refusal_bytes(refusal))
            sock = duplicate(stream)
        finally:
            stream.close()
        linger(sock)

    @staticmethod
    def log_request(status: int, request: RequestHead, ip: str, started: float) -> None:
        """Access log of a request, as Tornado's path logs it (centripy/server.py): failures
        at warning (error for 5xx), the others at debug; the path only, never the query or
        the headers (they may hold the API key)."""
        level = (
            logging.ERROR if status >= 500 else logging.WARNING if status >= 400 else logging.DEBUG
        )
        millis = 1000.0 * (time.monotonic() - started)
        access_log.log(level, "%d POST %s (%s) %.2fms", status, request.path, ip, millis)
