"""HTTP-streaming, SSE and `/emulation` against a real `centripy serve` process, driven by a
raw HTTP/1.1 client (so framing, status codes and headers are seen byte for byte). The pure
helpers are tested in tests/transports/test_emulation.py. Expected behaviour:
docs/spec/protocol.md 4.4, 5.2 and 8 (traps 10-11)."""

from __future__ import annotations

import asyncio
import json
import urllib.parse
from collections.abc import Callable, Mapping
from typing import Any

import pytest

from tests.integration.conftest import make_jwt
from tests.support.server import ServerFactory, ServerProcess
from tests.support.wait import eventually

pytestmark = pytest.mark.integration

WAIT = 10.0
CHAT = {
    "name": "chat",
    "presence": True,
    "history_size": 100,
    "history_ttl": "300s",
    "force_recovery": True,
    "allow_subscribe_for_client": True,
    "allow_presence_for_subscriber": True,
}
CONFIG: dict[str, Any] = {"http_stream": True, "sse": True, "namespaces": [CHAT]}


# --- a raw HTTP/1.1 client (runs on the test's loop) ------------------------------------------


class RawStream:
    """One HTTP/1.1 request over its own TCP connection; the response body is decoded
    (chunked or not) incrementally so a streamed response can be read message by message."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.status = 0
        self.headers: dict[str, str] = {}
        self.buffer = b""
        self.ended = False
        self._chunked = False
        self._length: int | None = None

    @classmethod
    async def open(
        cls,
        port: int,
        method: str,
        target: str,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        *,
        chunked_body: bool = False,
    ) -> RawStream:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        stream = cls(reader, writer)
        head = [f"{method} {target} HTTP/1.1", f"Host: 127.0.0.1:{port}"]
        head += [f"{name}: {value}" for name, value in (headers or {}).items()]
        payload = b""
        if body is not None and chunked_body:
            head.append("Transfer-Encoding: chunked")
            payload = f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"
        elif body is not None:
            head.append(f"Content-Length: {len(body)}")
            payload = body
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + payload)
        await writer.drain()
        async with asyncio.timeout(WAIT):
            await stream._read_head()
        return stream

    async def _read_head(self) -> None:
        status_line = await self.reader.readline()
        self.status = int(status_line.split()[1])
        while True:
            line = (await self.reader.readline()).decode().rstrip("\r\n")
            if not line:
                break
            name, _, value = line.partition(":")
            self.headers[name.strip().lower()] = value.strip()
        self._chunked = self.headers.get("transfer-encoding", "").lower() == "chunked"
        if "content-length" in self.headers:
            self._length = int(self.headers["content-length"])
        self.ended = self.status in (204, 304) or self._length == 0

    async def _read_more(self) -> None:
        if self.ended:
            raise EOFError("the response has ended")
        if self._chunked:
            size = int((await self.reader.readline()).strip() or b"0", 16)
            if size == 0:
                await self.reader.readline()
                self.ended = True
                return
            self.buffer += await self.reader.readexactly(size)
            await self.reader.readexactly(2)
        elif self._length is not None:
            self.buffer += await self.reader.readexactly(self._length)
            self.ended = True
        else:
            data = await self.reader.read(65536)
            self.buffer += data
            self.ended = not data

    async def read_until(self, separator: bytes, within: float = WAIT) -> bytes:
        """The body up to and including the next `separator`."""
        async with asyncio.timeout(within):
            while separator not in self.buffer:
                await self._read_more()
        index = self.buffer.index(separator) + len(separator)
        out, self.buffer = self.buffer[:index], self.buffer[index:]
        return out

    async def line(self, within: float = WAIT) -> Any:
        """The next JSON line of an HTTP-stream body."""
        return json.loads(await self.read_until(b"\n", within))

    async def event(self, within: float = WAIT) -> Any:
        """The next SSE `data:` event, decoded."""
        raw = await self.read_until(b"\n\n", within)
        assert raw.startswith(b"data: "), raw
        return json.loads(raw[len(b"data: ") : -2])

    async def until(
        self, read: Callable[[], Any], match: Callable[[Any], bool], within: float = WAIT
    ) -> Any:
        """Skip messages (e.g. pings) until one matches."""
        async with asyncio.timeout(within):
            while True:
                message = await read()
                if match(message):
                    return message

    async def rest(self, within: float = WAIT) -> bytes:
        """Everything until the response ends."""
        async with asyncio.timeout(within):
            while not self.ended:
                await self._read_more()
        out, self.buffer = self.buffer, b""
        return out

    def close(self) -> None:
        self.writer.close()


async def post(
    port: int, path: str, body: bytes, headers: Mapping[str, str] | None = None, **kw: Any
) -> RawStream:
    return await RawStream.open(port, "POST", path, body, headers, **kw)


def disconnect_push(code: int, reason: str) -> dict[str, Any]:
    return {"push": {"disconnect": {"code": code, "reason": reason}}}


def api_disconnect(user: str, code: int, reason: str) -> dict[str, Any]:
    return {"user": user, "disconnect": {"code": code, "reason": reason}}


async def wait_no_clients(server: ServerProcess, within: float = WAIT) -> None:
    """Poll the `info` API (bounded) until the node reports no connected client."""

    async def none_connected() -> bool:
        info = await server.api_async("info")
        return all(node["num_clients"] == 0 for node in info["result"]["nodes"])

    await eventually(none_connected, within, "no connected client", interval=0.05)


def connect_cmd(token: str = "", cmd_id: int = 1) -> bytes:
    body = {"token": token} if token else {}
    return json.dumps({"connect": body, "id": cmd_id}).encode()


async def emulate(server: ServerProcess, session: str, node: str, data: str) -> RawStream:
    body = json.dumps({"session": session, "node": node, "data": data}).encode()
    response = await post(server.port, "/emulation", body, {"Content-Type": "application/json"})
    await response.rest()
    response.close()
    return response


# --- HTTP-streaming ---------------------------------------------------------------------------


@pytest.mark.timeout(30)
async def test_http_stream_session_end_to_end(server_factory: ServerFactory) -> None:
    server = server_factory(CONFIG)
    stream = await post(
        server.port, "/connection/http_stream", connect_cmd(make_jwt("u1")), {"Accept": "*/*"}
    )
    assert stream.status == 200
    assert stream.headers["cache-control"] == (
        "private, no-cache, no-store, must-revalidate, max-age=0"
    )
    assert stream.headers["pragma"] == "no-cache"
    assert stream.headers["expire"] == "0"
    assert stream.headers["x-accel-buffering"] == "no"
    assert stream.headers["transfer-encoding"] == "chunked"
    reply = await stream.line()
    result = reply["connect"]
    assert reply["id"] == 1
    assert result["pong"] is True and result["ping"] == 25
    assert result["session"] and result["node"] and result["client"]

    subscribe = json.dumps({"subscribe": {"channel": "chat:1"}, "id": 2})
    answer = await emulate(server, result["session"], result["node"], subscribe)
    assert answer.status == 204
    reply = await stream.line()
    assert reply["id"] == 2 and reply["subscribe"]["recoverable"] is True

    await server.api_async("publish", {"channel": "chat:1", "data": {"text": "hi"}})
    push = await stream.line()
    assert push["push"]["channel"] == "chat:1"
    assert push["push"]["pub"]["data"] == {"text": "hi"} and push["push"]["pub"]["offset"] == 1

    presence = json.dumps({"presence": {"channel": "chat:1"}, "id": 3})
    await emulate(server, result["session"], result["node"], presence)
    reply = await stream.line()
    assert reply["id"] == 3 and list(reply["presence"]["presence"]) == [result["client"]]
    stream.close()
    await wait_no_clients(server)


@pytest.mark.timeout(30)
async def test_http_stream_pongs_arrive_via_emulation(server_factory: ServerFactory) -> None:
    server = server_factory(
        {**CONFIG, "ping_interval": "1s", "pong_timeout": "500ms", "client_insecure": True}
    )
    answering = await post(server.port, "/connection/http_stream", connect_cmd())
    silent = await post(server.port, "/connection/http_stream", connect_cmd())
    result = (await answering.line())["connect"]
    assert (await silent.line())["connect"]["ping"] == 1
    for _ in range(3):
        assert await answering.line() == {}
        assert (await emulate(server, result["session"], result["node"], "{}")).status == 204
    assert not answering.ended
    # No pong: the disconnect push, then the response ends.
    assert await silent.line() == {}
    assert await silent.line() == disconnect_push(3012, "no pong")
    assert await silent.rest() == b""
    answering.close()


@pytest.mark.timeout(30)
async def test_http_stream_api_disconnect_is_a_push_then_the_end(
    server_factory: ServerFactory,
) -> None:
    server = server_factory(CONFIG)
    stream = await post(server.port, "/connection/http_stream", connect_cmd(make_jwt("42")))
    await stream.line()
    await server.api_async("disconnect", api_disconnect("42", 4500, "bye"))
    assert await stream.line() == disconnect_push(4500, "bye")
    assert await stream.rest() == b""
    await wait_no_clients(server)


@pytest.mark.timeout(30)
async def test_http_stream_bad_requests(server_factory: ServerFactory) -> None:
    server = server_factory({**CONFIG, "http_stream_max_request_body_size": 400})
    port, path = server.port, "/connection/http_stream"
    assert (await RawStream.open(port, "GET", path)).status == 405
    assert (await RawStream.open(port, "OPTIONS", path)).status == 200
    assert (await post(port, path, b"x" * 401)).status == 413
    assert (await post(port, path, b"x" * 401, chunked_body=True)).status == 413
    for body in (b"", b"not json", b'{"subscribe":{"channel":"x"},"id":1}'):
        stream = await post(port, path, body)
        assert stream.status == 200
        assert await stream.line() == {
            "push": {"disconnect": {"code": 3501, "reason": "bad request"}}
        }
        assert await stream.rest() == b""
    # The first commands may be several lines; connect must come first.
    two = connect_cmd(make_jwt("7")) + b"\n" + b'{"subscribe":{"channel":"chat:2"},"id":2}'
    stream = await post(port, path, two)
    assert (await stream.line())["id"] == 1
    reply = await stream.line()
    assert reply["id"] == 2 and reply["subscribe"]["recoverable"] is True
    stream.close()


@pytest.mark.timeout(30)
async def test_cors_headers_follow_allowed_origins(server_factory: ServerFactory) -> None:
    server = server_factory({**CONFIG, "allowed_origins": ["http://*.example.com"]})
    preflight = {
        "Origin": "http://app.example.com",
        "Access-Control-Request-Headers": "content-type",
    }
    for path in ("/connection/http_stream", "/emulation"):
        answer = await RawStream.open(server.port, "OPTIONS", path, None, preflight)
        assert answer.status == 200
        assert answer.headers["access-control-allow-origin"] == "http://app.example.com"
        assert answer.headers["access-control-allow-credentials"] == "true"
        assert answer.headers["access-control-allow-headers"] == "content-type"
    # Error answers carry them too.
    origin = {"Origin": "http://app.example.com"}
    refused = await post(server.port, "/emulation", b"{bad", origin)
    assert refused.status == 400
    assert refused.headers["access-control-allow-origin"] == "http://app.example.com"
    # A foreign origin still gets its stream; only the CORS headers are missing.
    foreign = await post(
        server.port,
        "/connection/http_stream",
        connect_cmd(make_jwt("1")),
        {"Origin": "http://evil.com"},
    )
    assert foreign.status == 200 and "access-control-allow-origin" not in foreign.headers
    assert "connect" in await foreign.line()
    foreign.close()


@pytest.mark.timeout(30)
async def test_shutdown_disconnects_streams_with_3001(server_factory: ServerFactory) -> None:
    server = server_factory(CONFIG)
    stream = await post(server.port, "/connection/http_stream", connect_cmd(make_jwt("s")))
    assert "connect" in await stream.line()
    stopping = asyncio.ensure_future(asyncio.to_thread(server.stop))
    assert await stream.line() == disconnect_push(3001, "shutdown")
    assert await stream.rest() == b""
    assert await stopping == 0


@pytest.mark.timeout(30)
async def test_a_reader_that_stalls_is_dropped(server_factory: ServerFactory) -> None:
    """A client that stops reading: the server's writes stall (1 s write deadline) or its
    queue overflows (3008); either way the connection is released, nothing hangs."""
    big = {"name": "big", "allow_subscribe_for_client": True}
    server = server_factory({"http_stream": True, "namespaces": [big]})
    first = connect_cmd(make_jwt("slow")) + b"\n" + b'{"subscribe":{"channel":"big:1"},"id":2}'
    stream = await post(server.port, "/connection/http_stream", first)
    await stream.line()
    await stream.line()
    payload = {"x": "y" * 200_000}
    for _ in range(60):  # 12 MB: more than the socket buffers and the 1 MiB queue
        await server.api_async("publish", {"channel": "big:1", "data": payload})
    await wait_no_clients(server)
    stream.close()


# --- /emulation -------------------------------------------------------------------------------


@pytest.mark.timeout(30)
async def test_emulation_status_codes(server_factory: ServerFactory) -> None:
    server = server_factory({**CONFIG, "emulation_max_request_body_size": 200})
    stream = await post(server.port, "/connection/http_stream", connect_cmd(make_jwt("1")))
    result = (await stream.line())["connect"]
    port, json_type = server.port, {"Content-Type": "application/json"}

    async def status(body: bytes, **kw: Any) -> int:
        answer = await post(port, "/emulation", body, json_type, **kw)
        answer.close()
        return answer.status

    def request(**fields: Any) -> bytes:
        base = {"session": result["session"], "node": result["node"], "data": "{}"}
        return json.dumps({**base, **fields}).encode()

    assert (await RawStream.open(port, "OPTIONS", "/emulation")).status == 200
    assert (await RawStream.open(port, "GET", "/emulation")).status == 405
    assert await status(request(session="unknown")) == 204
    assert await status(request(node="another-node")) == 404
    assert await status(b"{not json") == 400
    assert await status(request(data={"connect": {}})) == 400
    assert await status(request(data="x" * 300)) == 413
    assert await status(request(data="x" * 300), chunked_body=True) == 413
    # A bad command sent through the emulation endpoint disconnects the session's stream.
    assert await status(request(data="[1]")) == 204
    assert await stream.line() == disconnect_push(3501, "bad request")
    assert await stream.rest() == b""


# --- SSE --------------------------------------------------------------------------------------


@pytest.mark.timeout(30)
async def test_sse_get_and_post(server_factory: ServerFactory) -> None:
    server = server_factory(CONFIG)
    query = urllib.parse.quote(connect_cmd(make_jwt("9")).decode())
    stream = await RawStream.open(server.port, "GET", f"/connection/sse?cf_connect={query}")
    assert stream.status == 200
    assert stream.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert stream.headers["cache-control"].startswith("private, no-cache")
    assert await stream.read_until(b"\r\n") == b"\r\n"
    result = (await stream.event())["connect"]
    assert result["session"] and result["node"] and result["pong"] is True

    subscribe = json.dumps({"subscribe": {"channel": "chat:sse"}, "id": 2})
    await emulate(server, result["session"], result["node"], subscribe)
    reply = await stream.event()
    assert reply["id"] == 2 and "subscribe" in reply
    await server.api_async("publish", {"channel": "chat:sse", "data": {"n": 1}})
    push = await stream.event()
    assert push["push"]["pub"]["data"] == {"n": 1}
    await server.api_async("disconnect", api_disconnect("9", 4000, "re"))
    assert await stream.event() == disconnect_push(4000, "re")
    assert await stream.rest() == b""

    posted = await post(server.port, "/connection/sse", connect_cmd(make_jwt("9")))
    assert posted.status == 200 and await posted.read_until(b"\r\n") == b"\r\n"
    assert "connect" in await posted.event()
    posted.close()
    await wait_no_clients(server)


@pytest.mark.timeout(30)
async def test_sse_bad_requests(server_factory: ServerFactory) -> None:
    server = server_factory({**CONFIG, "sse_max_request_body_size": 50})
    port = server.port
    assert (await RawStream.open(port, "GET", "/connection/sse")).status == 400
    assert (await RawStream.open(port, "OPTIONS", "/connection/sse")).status == 405
    assert (await RawStream.open(port, "PUT", "/connection/sse", b"")).status == 405
    assert (await post(port, "/connection/sse", b"x" * 51)).status == 413


@pytest.mark.timeout(30)
async def test_transports_are_off_by_default(server_factory: ServerFactory) -> None:
    server = server_factory({})
    for path in ("/connection/http_stream", "/connection/sse", "/emulation"):
        answer = await post(server.port, path, connect_cmd())
        assert answer.status == 404
        answer.close()


# --- protobuf over HTTP-streaming -------------------------------------------------------------


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _parse_varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def _parse_fields(buf: bytes) -> dict[int, Any]:
    """Top-level fields of a protobuf message (varint and length-delimited only)."""
    fields: dict[int, Any] = {}
    pos = 0
    while pos < len(buf):
        key, pos = _parse_varint(buf, pos)
        if key & 7 == 0:
            fields[key >> 3], pos = _parse_varint(buf, pos)
        else:
            assert key & 7 == 2
            size, pos = _parse_varint(buf, pos)
            fields[key >> 3] = buf[pos : pos + size]
            pos += size
    return fields


def _field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


@pytest.mark.timeout(30)
async def test_http_stream_protobuf(server_factory: ServerFactory) -> None:
    pytest.importorskip("centripy.engine.protocol.protobuf_codec")
    server = server_factory(CONFIG)
    # Command{id=1, connect=ConnectRequest{token=...}}, varint-length-prefixed.
    command = b"\x08\x01" + _field(4, _field(1, make_jwt("pb").encode()))
    stream = await post(
        server.port,
        "/connection/http_stream",
        _varint(len(command)) + command,
        {"Content-Type": "application/octet-stream"},
    )
    assert stream.status == 200
    assert stream.headers["content-type"] == "application/octet-stream"
    async with asyncio.timeout(WAIT):
        while True:
            try:
                size, start = _parse_varint(stream.buffer, 0)
            except IndexError:
                size, start = 1 << 30, 0
            if len(stream.buffer) >= start + size:
                break
            await stream._read_more()
    reply = _parse_fields(stream.buffer[start : start + size])
    assert reply[1] == 1  # Reply.id
    result = _parse_fields(reply[5])  # Reply.connect = ConnectResult
    assert result[8] == 1  # pong
    assert len(result[9]) == 36 and len(result[10]) == 36  # session, node (UUIDs)
    stream.close()
