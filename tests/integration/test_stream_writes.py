"""How the streaming transports put their messages on the wire, seen byte for byte against a
real `centripy serve` process: every HTTP-streaming write is one well-formed chunk of an
HTTP/1.1 response, in order even when the socket takes only part of a write (a reader with a
tiny receive buffer), and an HTTP/1.0 request gets the bare stream, ended by closing the
connection (Tornado's framing of both; transports/http_common.py `StreamingHandler.send`);
uni_websocket writes one text frame per push (transports/uni.py)."""

from __future__ import annotations

import asyncio
import json
import socket
import urllib.parse
from typing import Any

import pytest
import tornado.websocket

from tests.integration.conftest import make_jwt
from tests.integration.test_emulation import wait_no_clients
from tests.support.server import ServerFactory

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

WAIT = 20.0
BIG = {"name": "big", "allow_subscribe_for_client": True}
CONFIG: dict[str, Any] = {
    "http_stream": True,
    "sse": True,
    "namespaces": [BIG],
    # what waits while the reader pauses is neither "slow" nor a stalled write
    "client_queue_max_size": 64 << 20,
    "websocket_write_timeout": "10s",
}


async def open_raw(
    port: int, request: bytes, rcvbuf: int = 0
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=1 << 17)
    writer.write(request)
    await writer.drain()
    return reader, writer


async def read_head(reader: asyncio.StreamReader) -> tuple[str, dict[str, str]]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    return lines[0], headers


async def read_chunk(reader: asyncio.StreamReader) -> bytes:
    """One chunk, strictly: `<hex>\\r\\n<data>\\r\\n`; b"" for the last one."""
    size_line = await reader.readuntil(b"\r\n")
    size = int(size_line[:-2], 16)
    data = await reader.readexactly(size)
    assert await reader.readexactly(2) == b"\r\n", "chunk data not followed by CRLF"
    if size == 0:
        return b""
    assert data, "a zero-size chunk before the end"
    return data


def published(lines: list[dict[str, Any]]) -> list[int]:
    """The `n` of each publication pushed, in the order received."""
    return [m["push"]["pub"]["data"]["n"] for m in lines if "pub" in m.get("push", {})]


async def test_http_stream_chunks_stay_whole_and_ordered_under_back_pressure(
    server_factory: ServerFactory,
) -> None:
    server = server_factory(CONFIG)
    body = (
        json.dumps({"connect": {"token": make_jwt("reader")}, "id": 1})
        + "\n"
        + json.dumps({"subscribe": {"channel": "big:1"}, "id": 2})
    ).encode()
    request = (
        b"POST /connection/http_stream HTTP/1.1\r\nHost: x\r\n"
        b"Content-Length: %d\r\n\r\n%b" % (len(body), body)
    )
    reader, writer = await open_raw(server.port, request, rcvbuf=4096)
    count, size = 120, 60_000
    try:
        async with asyncio.timeout(WAIT):
            status, headers = await read_head(reader)
            assert status == "HTTP/1.1 200 OK" and headers["transfer-encoding"] == "chunked"
            received: list[dict[str, Any]] = []
            subscribed, resume = asyncio.Event(), asyncio.Event()

            async def read_all() -> None:
                while len(published(received)) < count:
                    if subscribed.is_set():
                        await resume.wait()
                    chunk = await read_chunk(reader)
                    assert chunk.endswith(b"\n"), "a chunk holds whole lines"
                    received.extend(json.loads(line) for line in chunk.splitlines())
                    if any("subscribe" in m for m in received):
                        subscribed.set()

            reading = asyncio.ensure_future(read_all())
            await asyncio.wait(
                [reading, asyncio.ensure_future(subscribed.wait())],
                return_when=asyncio.FIRST_COMPLETED,
            )
            assert subscribed.is_set(), reading.exception()
            # The reader pauses while the first half goes out (3.6 MB, more than the ~2.8 MB
            # the server's socket buffer grows to): the server's writes then leave part of
            # a chunk for later, and the next ones queue behind it.
            for n in range(count):
                if n == count // 2:
                    resume.set()
                data = {"n": n, "x": "y" * size}
                await server.api_async("publish", {"channel": "big:1", "data": data})
            await reading
        assert published(received) == list(range(count))
    finally:
        writer.close()
    await wait_no_clients(server)


async def test_sse_over_http_1_0_is_the_bare_stream_ended_by_close(
    server_factory: ServerFactory,
) -> None:
    server = server_factory(CONFIG)
    connect = json.dumps({"connect": {"token": make_jwt("old")}, "id": 1})
    target = "/connection/sse?cf_connect=" + urllib.parse.quote(connect)
    request = f"GET {target} HTTP/1.0\r\nHost: x\r\n\r\n".encode()
    reader, writer = await open_raw(server.port, request)
    try:
        async with asyncio.timeout(WAIT):
            status, headers = await read_head(reader)
            assert status.split()[1] == "200"
            assert "transfer-encoding" not in headers and "content-length" not in headers
            assert headers["content-type"] == "text/event-stream; charset=utf-8"
            assert await reader.readexactly(2) == b"\r\n"  # the SSE preamble
            event = await reader.readuntil(b"\n\n")
            assert event.startswith(b"data: ") and "connect" in json.loads(event[6:])
            result = json.loads(event[6:])["connect"]
            subscribe = json.dumps({"subscribe": {"channel": "big:2"}, "id": 2})
            emulation = {"session": result["session"], "node": result["node"], "data": subscribe}
            answered = await _post_json(server.port, "/emulation", emulation)
            assert answered.startswith(b"HTTP/1.1 204")
            reply = json.loads((await reader.readuntil(b"\n\n"))[6:])
            assert reply["id"] == 2 and "subscribe" in reply
            await server.api_async("publish", {"channel": "big:2", "data": {"n": 1}})
            push = json.loads((await reader.readuntil(b"\n\n"))[6:])
            assert push["push"]["pub"]["data"] == {"n": 1}
            disconnect = {"user": "old", "disconnect": {"code": 4000, "reason": "bye"}}
            await server.api_async("disconnect", disconnect)
            last = json.loads((await reader.readuntil(b"\n\n"))[6:])
            assert last == {"push": {"disconnect": {"code": 4000, "reason": "bye"}}}
            assert await reader.read() == b""  # the end of an HTTP/1.0 body: the close
    finally:
        writer.close()


async def _post_json(port: int, path: str, body: dict[str, Any]) -> bytes:
    data = json.dumps(body).encode()
    request = (
        b"POST %b HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Connection: close\r\nContent-Length: %d\r\n\r\n%b" % (path.encode(), len(data), data)
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        return await reader.read()
    finally:
        writer.close()


@pytest.mark.parametrize("compression", [False, True])
async def test_uni_websocket_writes_one_text_frame_per_push(
    server_factory: ServerFactory, compression: bool
) -> None:
    """A burst of publications leaves the connection actor in writes of several pushes;
    each push is still a text frame of its own, in order (with permessage-deflate, Tornado
    frames them; without, the transport does)."""
    server = server_factory(
        {"uni_websocket": True, "uni_websocket_compression": compression, "namespaces": [BIG]}
    )
    url = f"ws://127.0.0.1:{server.port}/connection/uni_websocket"
    options = {} if compression else None
    ws = await tornado.websocket.websocket_connect(
        url, connect_timeout=WAIT, compression_options=options
    )
    try:
        token = make_jwt("burst", channels=["big:3"])
        await ws.write_message(json.dumps({"token": token}))
        async with asyncio.timeout(WAIT):
            connect = json.loads(await ws.read_message() or "null")
            assert "big:3" in connect["connect"]["subs"]
            count = 40
            commands = [{"publish": {"channel": "big:3", "data": {"n": n}}} for n in range(count)]
            await server.api_async("batch", {"commands": commands})
            seen: list[int] = []
            while len(seen) < count:
                message = await ws.read_message()
                assert isinstance(message, str), message
                push = json.loads(message)  # one JSON object per frame, nothing joined
                if push:
                    seen.append(push["pub"]["data"]["n"])
        assert seen == list(range(count))
    finally:
        ws.close()
