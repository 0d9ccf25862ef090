"""Keep-alive server API connections served by `api_protocol.ApiConnection` (an asyncio
transport, after the first lean request of a plain TCP connection): pipelining, the hand
back to Tornado, refusals, the limits, errors, back-pressure and shutdown. Raw HTTP/1.x
against a real `LeanHTTPServer` on a free port (`Response.lean`: answered by the lean
path, not by Tornado)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Callable
from typing import Any

import pytest

from centripy.transports.api_http import ApiEndpoint, ApiMethodHandler
from centripy.transports.api_lean import LeanHTTPServer, Limits
from centripy.transports.api_protocol import HIGH_WATER
from tests.transports.test_api_lean import (
    KEY,
    Echo,
    connect,
    lean_server,
    post,
    read_response,
)

BODY = b'{"channel": "c", "data": {}}' + b" " * 40_000


def connections(server: LeanHTTPServer) -> int:
    """How many connections `ApiConnection`s serve."""
    return len(server._api_connections)


async def eventually(check: Callable[[], bool], seconds: float = 3.0) -> None:
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < seconds, "not in time"
        await asyncio.sleep(0.01)


async def closed_after(reader: asyncio.StreamReader, seconds: float = 5.0) -> float:
    """Seconds until the server closes the connection (EOF or a reset)."""
    started = time.monotonic()
    with contextlib.suppress(ConnectionResetError):
        assert await asyncio.wait_for(reader.read(), seconds) == b""
    return time.monotonic() - started


async def test_a_keep_alive_connection_moves_to_the_protocol() -> None:
    async with lean_server() as (server, port):
        reader, writer = await connect(port)
        for i in range(3):
            writer.write(post("/api/publish", b'{"channel":"a","data":%d}' % i))
            response = await read_response(reader)
            assert (response.status, response.json(), response.lean) == (200, {"result": {}}, True)
            assert connections(server) == 1
        writer.close()
        await eventually(lambda: connections(server) == 0)
        # a request that closes the connection stays on the stream
        reader, writer = await connect(port)
        writer.write(post("/api/info", b"{}", version="HTTP/1.0"))
        assert (await read_response(reader)).lean
        assert connections(server) == 0
        assert await reader.read() == b""


async def test_many_pipelined_requests_split_anywhere_are_answered_in_order() -> None:
    stream = b"".join(post("/api/publish", b'{"channel":"a","data":%d}' % i) for i in range(50))
    stream += post("/api/nope", b"{}") + post("/api/info", b"[1")
    async with lean_server() as (_, port):
        reader, writer = await connect(port)
        for start in range(0, len(stream), 37):  # heads and bodies cut at every place
            writer.write(stream[start : start + 37])
            await writer.drain()
        statuses = [(await read_response(reader)).status for _ in range(52)]
        assert statuses == [200] * 50 + [404, 400]
        writer.close()


@pytest.mark.parametrize(
    ("follower", "expected"),
    [
        (b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n", (200, {"get": True})),
        (b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc", (200, {"length": 3})),
        (
            b"POST /api/info HTTP/1.1\r\nHost: x\r\nX-API-Key: %s\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n" % KEY.encode(),
            (200, None),
        ),
        (b"POST /api/info HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n", (400, None)),
    ],
    ids=["get", "another-route", "chunked", "malformed"],
)
async def test_what_the_protocol_does_not_answer_goes_to_tornado(
    follower: bytes, expected: tuple[int, Any]
) -> None:
    """Pipelined behind lean requests, in one write or cut in two: Tornado reads the
    request unchanged after the lean answers, and keeps the connection."""
    async with lean_server() as (server, port):
        for cut in (len(follower), 7):
            reader, writer = await connect(port)
            writer.write(post("/api/info", b"{}") + post("/api/info", b"{}") + follower[:cut])
            first, second = await read_response(reader), await read_response(reader)
            assert (first.lean, second.lean) == (True, True)
            await asyncio.sleep(0.05)
            writer.write(follower[cut:])
            response = await read_response(reader)
            status, body = expected
            assert response.status == status
            # Tornado's answers carry Server (its 400 to a malformed head not even Date)
            assert not response.lean or "date" not in response.headers
            if body is not None:
                assert response.json() == body
            if status == 200:  # the rest of the connection is Tornado's
                writer.write(post("/api/info", b"{}"))
                again = await read_response(reader)
                assert (again.status, again.lean) == (200, False)
            assert connections(server) == 0
            writer.close()


@pytest.mark.parametrize(
    ("key", "length", "status"), [("wrong", len(BODY), 401), (KEY, 11 << 20, 413)]
)
async def test_a_refusal_on_the_protocol_is_answered_before_the_body_with_a_linger(
    key: str, length: int, status: int
) -> None:
    async with lean_server() as (server, port):
        reader, writer = await connect(port)
        writer.write(post("/api/info", b"{}"))
        assert (await read_response(reader)).lean
        head = f"POST /api/publish HTTP/1.1\r\nHost: x\r\nX-API-Key: {key}\r\n"
        writer.write(f"{head}Content-Length: {length}\r\n\r\n".encode())
        response = await read_response(reader)
        assert (response.status, response.headers["connection"]) == (status, "close")
        for start in range(0, len(BODY), 8192):  # a reset here would raise
            writer.write(BODY[start : start + 8192])
            await writer.drain()
            await asyncio.sleep(0.005)
        assert await asyncio.wait_for(reader.read(), 5) == b""
        assert connections(server) == 0
        writer.close()


class Limited(Echo):
    """A non-API route with a body limit of its own (as SockJS and the emulation)."""

    body_limit = 100


async def test_a_body_over_the_limit_of_another_route_is_refused_as_on_the_stream() -> None:
    """The lean path answers 413 to a POST over a route's own limit (Tornado would answer
    400 and close): on the protocol as on the stream."""
    async with lean_server(extra_routes=[(r"/limited", Limited, {})]) as (_, port):
        for first in (b"", post("/api/info", b"{}")):
            reader, writer = await connect(port)
            writer.write(first + post("/limited", b"x" * 101))
            if first:
                assert (await read_response(reader)).lean
            response = await read_response(reader)
            assert (response.status, response.lean) == (413, True)
            assert await asyncio.wait_for(reader.read(), 5) == b""
            writer.close()
        reader, writer = await connect(port)
        writer.write(post("/api/info", b"{}") + post("/limited", b"x" * 100))
        assert (await read_response(reader)).lean
        response = await read_response(reader)
        assert (response.status, response.json(), response.lean) == (200, {"length": 100}, False)
        writer.close()


async def test_connection_close_and_http10_on_the_protocol() -> None:
    async with lean_server() as (_, port):
        reader, writer = await connect(port)
        writer.write(post("/api/info", b"{}") + post("/api/info", b"{}", "Connection: close\r\n"))
        assert [(await read_response(reader)).status for _ in range(2)] == [200, 200]
        assert await reader.read() == b""
        reader, writer = await connect(port)
        keep = post("/api/info", b"{}", "Connection: keep-alive\r\n", "HTTP/1.0")
        writer.write(keep + keep + post("/api/info", b"{}", version="HTTP/1.0"))
        responses = [await read_response(reader) for _ in range(3)]
        assert [r.headers.get("connection") for r in responses] == ["keep-alive"] * 2 + [None]
        assert await reader.read() == b""


async def test_requests_sent_before_a_half_close_are_answered() -> None:
    async with lean_server() as (_, port):
        sock = socket.create_connection(("127.0.0.1", port))
        reader, writer = await asyncio.open_connection(sock=sock)
        writer.write(post("/api/info", b"{}"))
        assert (await read_response(reader)).lean
        writer.write(post("/api/info", b"{}") * 3 + post("/api/info", b"{}")[:20])
        await writer.drain()
        sock.shutdown(socket.SHUT_WR)
        assert [(await read_response(reader)).status for _ in range(3)] == [200] * 3
        assert await asyncio.wait_for(reader.read(), 5) == b""  # the partial one: closed


async def test_idle_and_body_timeouts_with_one_timer() -> None:
    limits = Limits(idle_timeout=0.3, body_timeout=0.3)
    async with lean_server(limits) as (server, port):
        # busy for longer than the idle timeout: the deadline moves with each request
        reader, writer = await connect(port)
        for _ in range(8):
            writer.write(post("/api/info", b"{}"))
            assert (await read_response(reader)).status == 200
            await asyncio.sleep(0.1)
        assert connections(server) == 1
        assert 0.1 < await closed_after(reader) < 1.5  # then idle: closed
        # a body that does not come in time
        reader, writer = await connect(port)
        writer.write(post("/api/info", b"{}"))
        assert (await read_response(reader)).lean
        writer.write(post("/api/info", b"{}")[:-1])
        assert 0.1 < await closed_after(reader) < 1.5
        # a head that does not come in time
        reader, writer = await connect(port)
        writer.write(post("/api/info", b"{}") + b"POST /api/info HTTP/1.1\r\n")
        assert (await read_response(reader)).lean
        assert 0.1 < await closed_after(reader) < 1.5
        await eventually(lambda: connections(server) == 0)


async def test_a_head_over_the_limit_closes_the_connection() -> None:
    async with lean_server() as (_, port):
        reader, writer = await connect(port)
        writer.write(post("/api/info", b"{}"))
        assert (await read_response(reader)).lean
        writer.write(b"POST /api/info HTTP/1.1\r\nX-Big: " + b"a" * 70_000)
        assert await closed_after(reader) < 5


class Failing(ApiEndpoint):
    """An endpoint whose answer fails with an unexpected exception."""

    async def answer(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("boom")


async def test_a_failing_answer_is_a_500_and_the_connection_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    routes = [(r"/failing/(.*)", ApiMethodHandler, {"endpoint_class": Failing})]
    async with lean_server(extra_routes=routes) as (_, port):
        reader, writer = await connect(port)
        writer.write(post("/api/info", b"{}") + post("/failing/info", b"{}"))
        writer.write(post("/api/info", b"{}"))
        responses = [await read_response(reader) for _ in range(3)]
        assert [(r.status, r.lean) for r in responses] == [(200, True), (500, True), (200, True)]
        assert responses[1].body == b"Internal Server Error\n"
        assert "server API request to /failing/info failed" in caplog.text
        assert "500 POST /failing/info" in caplog.text
        writer.close()


async def test_reading_pauses_while_the_caller_does_not_read_its_answers() -> None:
    """Requests pipelined by a caller that does not read: once the answers fill the
    socket and `HIGH_WATER` bytes wait in the transport, the server stops reading (and
    answering); the caller then reads every answer, in order."""
    async with lean_server() as (server, port):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", port))
        sock.setblocking(False)
        reader, writer = await asyncio.open_connection(sock=sock)
        writer.write(post("/api/info", b"{}"))
        assert (await read_response(reader)).lean
        (connection,) = server._api_connections
        transport = connection._transport
        assert transport is not None
        count = 0
        while transport.get_write_buffer_size() <= HIGH_WATER:
            writer.write(post("/api/info", b"{}") * 100)
            count += 100
            await asyncio.sleep(0.01)
            assert count < 200_000, "the answers never filled the transport"
        assert not transport.is_reading()
        await asyncio.sleep(0.1)
        assert not transport.is_reading()  # still: the caller has not read
        writer.write(post("/api/publish", b'{"channel":"a","data":"last"}'))
        for _ in range(count):
            assert (await read_response(reader)).status == 200
        last = await read_response(reader)
        assert (last.status, last.json()) == (200, {"result": {}})
        writer.close()


async def test_close_all_connections_closes_protocol_connections() -> None:
    async with lean_server() as (server, port):
        reader, writer = await connect(port)
        writer.write(post("/api/info", b"{}"))
        assert (await read_response(reader)).lean
        assert connections(server) == 1
        await server.close_all_connections()
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
