"""Hostile WebSocket clients against a real server: one that never reads is dropped within
the write timeout, a command flood is capped, and a witness subscriber on the same server
keeps receiving every publication in order (issue 15, items 4 and 5)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import time
from typing import Any

import pytest

from tests.support.server import ServerFactory, ServerProcess
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


def _raw_ws(server: ServerProcess, rcvbuf: int = 0) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(10)
    sock.connect((server.host, server.port))
    key = base64.b64encode(os.urandom(16))
    sock.sendall(
        b"GET /connection/websocket HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n" % key
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
        # ~8 MB of publications towards a client that reads nothing more.
        data = {"text": "x" * 40000}
        for _ in range(200):
            await asyncio.to_thread(
                server.api_result, "publish", {"channel": "flood", "data": data}
            )
        deadline = time.monotonic() + 10
        while await asyncio.to_thread(_num_clients, server) > 1:
            assert time.monotonic() < deadline, "the non-reading client was never dropped"
            await asyncio.sleep(0.2)
        await witness.check(server, 20)
        # The socket was dropped by the server: draining it ends, never hangs.
        sock.settimeout(5)
        total = 0
        try:
            while chunk := sock.recv(1 << 20):
                total += len(chunk)
        except ConnectionResetError:
            pass
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
