"""Hostile WebSocket clients against a real server: one that never reads is dropped within
the write timeout, a command flood is capped, and a witness subscriber on the same server
keeps receiving every publication in order (issue 15, items 4 and 5)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import urllib.parse
from collections.abc import Callable
from typing import Any

import pytest

from tests.support.server import ServerFactory, ServerProcess
from tests.support.wait import eventually
from tests.support.witness import Witness

pytestmark = pytest.mark.integration

CONFIG: dict[str, Any] = {
    "allow_anonymous_connect_without_token": True,
    "allow_subscribe_for_client": True,
    "allow_subscribe_for_anonymous": True,
    "websocket_write_timeout": "1s",
    "client_queue_max_size": 262144,
}


def _masked(payload: bytes, opcode: int = 0x1) -> bytes:
    """One final, masked client frame."""
    mask = os.urandom(4)
    size = len(payload)
    if size < 126:
        head = bytes((0x80 | opcode, 0x80 | size))
    elif size <= 0xFFFF:
        head = bytes((0x80 | opcode, 0xFE)) + size.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 0xFF)) + size.to_bytes(8, "big")
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def _raw_ws(
    server: ServerProcess, rcvbuf: int = 0, path: str = "/connection/websocket"
) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(10)
    sock.connect((server.host, server.port))
    key = base64.b64encode(os.urandom(16))
    sock.sendall(
        b"GET %s HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n" % (path.encode(), key)
    )
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


def _frames(sock: socket.socket, data: bytes) -> tuple[list[bytes], bytes]:
    """Complete server frames in `data` (unmasked) and what is left."""
    out = []
    while len(data) >= 2:
        size, pos = data[1] & 0x7F, 2
        if size == 126:
            size, pos = int.from_bytes(data[2:4], "big"), 4
        elif size == 127:
            size, pos = int.from_bytes(data[2:10], "big"), 10
        if len(data) < pos + size:
            break
        out.append(data[pos : pos + size])
        data = data[pos + size :]
    return out, data


def _replies(sock: socket.socket, want: int) -> list[dict[str, Any]]:
    """Read until `want` replies (objects with an id) arrived."""
    buf, replies = b"", []
    while len(replies) < want:
        chunk = sock.recv(65536)
        assert chunk, "closed"
        frames, buf = _frames(sock, buf + chunk)
        for frame in frames:
            for line in frame.splitlines():
                message = json.loads(line) if line.strip() else {}
                if message.get("id"):
                    replies.append(message)
    return replies


def _num_clients(server: ServerProcess) -> int:
    return int(server.api_result("info")["nodes"][0]["num_clients"])


async def _num_clients_is(server: ServerProcess, wanted: Callable[[int], bool]) -> bool:
    """Whether the server's client count (asked off the loop) is `wanted`."""
    return wanted(await asyncio.to_thread(_num_clients, server))


@pytest.mark.parametrize("path", ["lean", "tornado"])
async def test_a_subscriber_that_never_reads_is_dropped(
    server_factory: ServerFactory, path: str
) -> None:
    server = server_factory({**CONFIG, "websocket_compression": path == "tornado"})
    async with Witness(server.ws_url, "witness") as witness:
        sock = _raw_ws(server, rcvbuf=4096)
        sock.sendall(_masked(b'{"id":1,"connect":{}}\n{"id":2,"subscribe":{"channel":"flood"}}'))
        assert len(_replies(sock, 2)) == 2
        assert await asyncio.to_thread(_num_clients, server) == 2
        await _flood_until_dropped(server, sock, witness, path)


async def _flood_until_dropped(
    server: ServerProcess, sock: socket.socket, witness: Witness, what: str
) -> None:
    """Publish ~8 MB to "flood", whose one subscriber (`sock`) reads nothing more: the
    server must drop it (info counts the witness only), keep the witness whole, and close
    the socket (draining it ends, never hangs)."""
    data = {"text": "x" * 40000}
    for _ in range(200):
        await asyncio.to_thread(server.api_result, "publish", {"channel": "flood", "data": data})
    await eventually(
        lambda: _num_clients_is(server, lambda n: n <= 1),
        15,
        f"the non-reading {what} client dropped",
        interval=0.2,
    )
    await witness.check(server, 10)
    sock.settimeout(5)
    total = 0
    try:
        while chunk := sock.recv(1 << 20):
            total += len(chunk)
    except ConnectionResetError:
        pass
    except TimeoutError:
        raise AssertionError(f"the server kept the {what} socket open") from None
    assert total < 8_000_000  # most of the flood was never buffered for it
    sock.close()


async def test_command_flood_is_capped_per_frame(server_factory: ServerFactory) -> None:
    server = server_factory({**CONFIG, "client_max_commands_per_frame": 50})
    async with Witness(server.ws_url, "witness") as witness:
        sock = _raw_ws(server)
        sock.sendall(_masked(b'{"id":1,"connect":{}}'))
        _replies(sock, 1)
        flood = "\n".join(
            json.dumps({"id": i, "presence_stats": {"channel": f"c{i}"}}) for i in range(2, 202)
        ).encode()
        sock.sendall(_masked(flood))
        replies = await asyncio.to_thread(_replies, sock, 200)
        codes = [reply["error"]["code"] for reply in replies]
        assert codes.count(111) == 150  # beyond the cap: too many requests, not handled
        assert codes.count(108) == 50  # the first 50 were handled (presence is off: 108)
        await witness.check(server, 10)
        sock.close()


# -- the other transports: a subscriber that stops reading is dropped too ----------------------

CONNECT = {"subs": {"flood": {}}}  # server-side subscription at connect (client-allowed)


def _http(
    server: ServerProcess, request: bytes, then: Callable[[], None] | None = None
) -> socket.socket:
    """Send `request` on a socket with a small receive buffer; read until the connect reply
    (or push) went by, then read no more."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(10)
    sock.connect((server.host, server.port))
    sock.sendall(request)
    seen = b""
    if then is not None:  # e.g. a SockJS send once the stream is open
        while b"\no\n" not in seen:
            chunk = sock.recv(4096)
            assert chunk, seen
            seen += chunk
        then()
    while b'\\"client\\"' not in seen and b'"client"' not in seen:
        chunk = sock.recv(4096)
        assert chunk, seen
        seen += chunk
    return sock


def _post(path: str, body: bytes) -> bytes:
    return b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (
        path.encode(),
        len(body),
        body,
    )


def _get(path: str) -> bytes:
    return b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path.encode()


def _open(server: ServerProcess, transport: str) -> socket.socket:
    bidi = json.dumps({"id": 1, "connect": CONNECT}).encode()
    uni = json.dumps(CONNECT).encode()
    if transport == "http_stream":
        return _http(server, _post("/connection/http_stream", bidi))
    if transport == "sse":
        return _http(server, _get("/connection/sse?cf_connect=" + quote(bidi)))
    if transport == "uni_http_stream":
        return _http(server, _post("/connection/uni_http_stream", uni))
    if transport == "uni_sse":
        return _http(server, _get("/connection/uni_sse?cf_connect=" + quote(uni)))
    if transport == "uni_websocket":
        sock = _raw_ws(server, rcvbuf=4096, path="/connection/uni_websocket")
        sock.sendall(_masked(uni))
        seen = b""
        while b'"client"' not in seen:
            chunk = sock.recv(4096)
            assert chunk, seen
            seen += chunk
        return sock
    assert transport == "sockjs"
    send = json.dumps([bidi.decode()]).encode()

    def connect() -> None:
        with socket.create_connection((server.host, server.port), timeout=10) as sender:
            sender.sendall(_post("/connection/sockjs/000/hostile1/xhr_send", send))
            assert sender.recv(4096).startswith(b"HTTP/1.1 204")

    return _http(server, _post("/connection/sockjs/000/hostile1/xhr_streaming", b""), connect)


def quote(data: bytes) -> str:
    return urllib.parse.quote(data.decode(), safe="")


@pytest.mark.parametrize(
    "transport", ["http_stream", "sse", "uni_http_stream", "uni_sse", "uni_websocket", "sockjs"]
)
async def test_a_non_reading_client_is_dropped_on_every_transport(
    server_factory: ServerFactory, transport: str
) -> None:
    server = server_factory(
        {
            **CONFIG,
            "http_stream": True,
            "sse": True,
            "uni_http_stream": True,
            "uni_sse": True,
            "uni_websocket": True,
            "sockjs": True,
            "uni_websocket_write_timeout": "1s",
            # a SockJS response that ended into the kernel's buffers leaves a keep-alive
            # connection: it is closed when idle
            "http_idle_timeout": "2s",
        }
    )
    async with Witness(server.ws_url, "witness") as witness:
        sock = await asyncio.to_thread(_open, server, transport)
        await eventually(
            lambda: _num_clients_is(server, lambda n: n >= 2),
            5,
            "the hostile client connected",
            interval=0.1,
        )
        await _flood_until_dropped(server, sock, witness, transport)
