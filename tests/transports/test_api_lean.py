"""The lean API path of `LeanHTTPServer`: which requests it answers itself, and that every
other request (and the rest of a connection after one) reaches Tornado unchanged. Raw
HTTP/1.x over asyncio streams against a real server on a free port. Tornado's responses
carry `Server: TornadoServer/..`; the lean path's do not, which tells the two apart."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import pytest
import tornado.web
from tornado.testing import bind_unused_port

from centripy.engine.api import Executor
from centripy.engine.config import Config
from centripy.engine.node import Node
from centripy.storage.memory import MemoryEventLog
from centripy.storage.presence_memory import MemoryPresence
from centripy.storage.writer import GroupCommitWriter
from centripy.transports.api_http import api_routes
from centripy.transports.api_lean import LeanHTTPServer, Limits, response_bytes
from centripy.transports.http11 import RequestHead, lean_post, parse_request_head
from tests.engine.test_api import RecordingSessions

KEY = "secret"


class Echo(tornado.web.RequestHandler):
    """A non-API route: answers GET and POST with the request body's length."""

    def get(self) -> None:
        self.finish({"get": True})

    def post(self) -> None:
        self.finish({"length": len(self.request.body)})


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def lean(self) -> bool:
        return "server" not in self.headers

    def json(self) -> object:
        return orjson.loads(self.body)


async def read_response(reader: asyncio.StreamReader) -> Response:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return Response(status, headers, body)


def post(path: str, body: bytes, extra: str = "", version: str = "HTTP/1.1") -> bytes:
    head = f"POST {path} {version}\r\nHost: x\r\nX-API-Key: {KEY}\r\n{extra}"
    return f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body


@contextlib.asynccontextmanager
async def lean_server(
    limits: Limits | None = None, extra_routes: Sequence[Any] = ()
) -> AsyncIterator[tuple[LeanHTTPServer, int]]:
    """A `LeanHTTPServer` on a free port (the server API, `/echo` and `extra_routes`; a
    keyword argument `endpoint_class` of theirs is replaced by an endpoint of that class)
    and its port; stopped, its connections closed, on exit."""
    config = Config(api_key=KEY)
    log = MemoryEventLog()
    await log.start()
    writer = GroupCommitWriter(log, max_delay=0.0)
    await writer.start()
    node = Node(config, log, writer.submit_many, MemoryPresence())
    sessions = RecordingSessions()
    sessions.node = node
    executor = Executor(node, sessions)
    extra = [
        (path, handler, {"endpoint": kwargs["endpoint_class"](executor, config)})
        if "endpoint_class" in kwargs
        else (path, handler, kwargs)
        for path, handler, kwargs in extra_routes
    ]
    routes = [(r"/echo", Echo), *extra, *api_routes(executor, config)]
    server = LeanHTTPServer(tornado.web.Application(routes), lean_api=True, limits=limits)
    sock, number = bind_unused_port()
    server.add_sockets([sock])
    try:
        yield server, number
    finally:
        server.stop()
        await server.close_all_connections()
        await writer.close()


@pytest.fixture
async def port() -> AsyncIterator[int]:
    async with lean_server() as (_, number):
        yield number


async def connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port)


async def test_keep_alive_api_calls_stay_on_the_lean_path(port: int) -> None:
    reader, writer = await connect(port)
    for i in range(3):
        writer.write(post("/api/publish", b'{"channel":"a","data":%d}' % i))
        response = await read_response(reader)
        assert (response.status, response.json(), response.lean) == (200, {"result": {}}, True)
        assert response.headers["content-type"] == "application/json"
        assert "date" in response.headers
    writer.close()


async def test_pipelined_requests_are_answered_in_order(port: int) -> None:
    reader, writer = await connect(port)
    writer.write(post("/api/info", b"{}") + post("/api/nope", b"{}") + post("/api/info", b"[1"))
    statuses = [(await read_response(reader)).status for _ in range(3)]
    assert statuses == [200, 404, 400]
    writer.close()


async def test_a_non_api_request_hands_the_connection_to_tornado(port: int) -> None:
    reader, writer = await connect(port)
    writer.write(post("/api/info", b"{}"))
    assert (await read_response(reader)).lean
    writer.write(b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")
    response = await read_response(reader)
    assert (response.status, response.json(), response.lean) == (200, {"get": True}, False)
    # the rest of the connection is Tornado's, API calls included
    writer.write(post("/api/info", b"{}") + post("/echo", b"12345"))
    first, second = await read_response(reader), await read_response(reader)
    assert (first.status, first.lean, second.json()) == (200, False, {"length": 5})
    writer.close()


@pytest.mark.parametrize(
    "extra",
    ["Transfer-Encoding: chunked\r\n", "Expect: 100-continue\r\n"],
)
async def test_what_tornado_implements_goes_to_tornado(port: int, extra: str) -> None:
    reader, writer = await connect(port)
    body = b'{"channel":"a","data":1}'
    if "chunked" in extra:
        raw = f"POST /api/publish HTTP/1.1\r\nHost: x\r\nX-API-Key: {KEY}\r\n{extra}\r\n".encode()
        raw += b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
        writer.write(raw)
    else:
        writer.write(post("/api/publish", b"", extra)[: -len(b"Content-Length: 0\r\n\r\n")])
        writer.write(f"Content-Length: {len(body)}\r\n\r\n".encode())
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 100")
        writer.write(body)
    response = await read_response(reader)
    assert (response.status, response.json(), response.lean) == (200, {"result": {}}, False)
    writer.close()


async def test_http10_closes_unless_keep_alive(port: int) -> None:
    reader, writer = await connect(port)
    writer.write(post("/api/info", b"{}", version="HTTP/1.0"))
    response = await read_response(reader)
    assert (response.status, response.lean) == (200, True)
    assert await reader.read() == b""  # closed by the server
    reader, writer = await connect(port)
    writer.write(post("/api/info", b"{}", "Connection: keep-alive\r\n", "HTTP/1.0") * 2)
    for _ in range(2):
        response = await read_response(reader)
        assert response.headers["connection"] == "keep-alive"
    writer.close()


async def test_connection_close_is_honoured(port: int) -> None:
    reader, writer = await connect(port)
    writer.write(post("/api/info", b"{}", "Connection: close\r\n"))
    assert (await read_response(reader)).status == 200
    assert await reader.read() == b""


async def test_bad_key_and_oversized_head(port: int) -> None:
    reader, writer = await connect(port)
    writer.write(b"POST /api/info HTTP/1.1\r\nX-API-Key: no\r\nContent-Length: 2\r\n\r\n{}")
    response = await read_response(reader)
    assert (response.status, response.body, response.lean) == (401, b"", True)
    writer.write(b"POST /api/info HTTP/1.1\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n")
    assert await reader.read() == b""  # beyond 64 KiB of head: closed, as Tornado does
    writer.close()


async def test_close_all_connections_closes_idle_lean_connections(port: int) -> None:
    reader, writer = await connect(port)
    writer.write(post("/api/info", b"{}"))
    assert (await read_response(reader)).lean
    # the fixture's teardown must not hang on this idle keep-alive connection
    writer.close()


@pytest.mark.parametrize(
    ("head", "why"),
    [
        (b"GET /api/info HTTP/1.1\r\n\r\n", "not POST"),
        (b"POST /api/info HTTP/2.0\r\n\r\n", "version"),
        (b"POST http://x/api/info HTTP/1.1\r\n\r\n", "absolute form"),
        (b"POST /api/%69nfo HTTP/1.1\r\n\r\n", "percent-encoded"),
        (b"POST /api/info HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", "chunked"),
        (b"POST /api/info HTTP/1.1\r\nUpgrade: websocket\r\n\r\n", "upgrade"),
        (b"POST /api/info HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", "two"),
        (b"POST /api/info HTTP/1.1\r\nContent-Length: -1\r\n\r\n", "negative length"),
        (b"POST /api/info HTTP/1.1\r\nX-A: 1\r\n folded\r\n\r\n", "obs-fold"),
        (b"POST /api/info HTTP/1.1\r\nBad Name: 1\r\n\r\n", "space in a name"),
        (b"POST /api/info HTTP/1.1\r\nNoColon\r\n\r\n", "no colon"),
    ],
)
def test_the_unusual_is_left_to_tornado(head: bytes, why: str) -> None:
    request = parse_request_head(head)
    assert request is None or not lean_post(request), why


def parse_head(head: bytes) -> RequestHead | None:
    """The request when the API fast path may answer it."""
    request = parse_request_head(head)
    return request if request is not None and lean_post(request) else None


def test_a_plain_post_is_lean() -> None:
    head = b"POST /api/publish?api_key=k HTTP/1.1\r\nX-API-Key: a\r\nx-api-key: b\r\n"
    request = parse_head(head + b"Content-Length: 12\r\nConnection: Close\r\n\r\n")
    assert request is not None
    assert (request.path, request.query, request.content_length) == (
        "/api/publish",
        "api_key=k",
        12,
    )
    assert request.header("X-API-Key") == "a"  # the first value counts
    assert (request.keep_alive, request.http10) == (False, False)
    request = parse_head(b"POST /api HTTP/1.0\r\n\r\n")
    assert request is not None and (request.content_length, request.keep_alive) == (0, False)


def test_response_bytes() -> None:
    raw = response_bytes(404, b"x\n", "text/plain", b"Thu, 01 Jan 1970 00:00:00 GMT")
    assert raw == (
        b"HTTP/1.1 404 Not Found\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n"
        b"Date: Thu, 01 Jan 1970 00:00:00 GMT\r\n\r\nx\n"
    )
    assert b"Content-Type" not in response_bytes(401, b"", "", b"d")


async def serve_app(app: tornado.web.Application) -> tuple[LeanHTTPServer, int]:
    server = LeanHTTPServer(app, lean_api=True)
    sock, number = bind_unused_port()
    server.add_sockets([sock])
    return server, number


async def test_host_rules_send_everything_to_tornado() -> None:
    """Tornado routes by Host as well; the lean router does not look at Host, so an
    application with host-specific rules is Tornado's alone (here the API route would
    otherwise be answered on the lean path for a host Tornado routes to `Echo`)."""
    config = Config(api_key=KEY)
    node = Node(config, MemoryEventLog(), None, MemoryPresence())  # type: ignore[arg-type]
    app = tornado.web.Application(api_routes(Executor(node, RecordingSessions()), config))
    app.add_handlers(r"other\.example", [(r"/api/info", Echo)])
    server, number = await serve_app(app)
    assert server.lean_rules() is None
    try:
        reader, writer = await connect(number)
        writer.write(post("/api/info", b"{}").replace(b"Host: x", b"Host: other.example"))
        response = await read_response(reader)
        assert (response.json(), response.lean) == ({"length": 2}, False)
        writer.close()
    finally:
        server.stop()
        await server.close_all_connections()


async def test_any_host_rules_are_followed_in_order() -> None:
    config = Config(api_key=KEY)
    node = Node(config, MemoryEventLog(), None, MemoryPresence())  # type: ignore[arg-type]
    app = tornado.web.Application(api_routes(Executor(node, RecordingSessions()), config))
    app.add_handlers(r".*", [(r"/api/info", Echo)])  # tried before the application's own
    server, number = await serve_app(app)
    rules = server.lean_rules()
    assert rules is not None and rules[0].target is Echo
    try:
        reader, writer = await connect(number)
        writer.write(post("/api/info", b"{}") + post("/api/publish", b"{}"))
        first = await read_response(reader)
        assert (first.json(), first.lean) == ({"length": 2}, False)  # Echo, on Tornado
        writer.close()
    finally:
        server.stop()
        await server.close_all_connections()


async def test_asyncio_accepts_the_port_until_stop() -> None:
    """A plain TCP port is accepted by asyncio (`add_sockets`): it serves at once, and stop()
    closes it, even before the accepting task ran."""
    for wait in (True, False):
        server = LeanHTTPServer(tornado.web.Application([(r"/echo", Echo)]), lean_api=True)
        sock, number = bind_unused_port()
        server.add_sockets([sock])
        if wait:
            reader, writer = await asyncio.open_connection("127.0.0.1", number)
            writer.write(b"GET /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert (await reader.read()).startswith(b"HTTP/1.1 200 OK")  # given to Tornado
            writer.close()
        server.stop()
        await server.close_all_connections()
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", number)
        assert sock.fileno() == -1
