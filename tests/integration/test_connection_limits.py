"""client_connection_limit and client_connection_rate_limit: a new connection over either
gets HTTP 503 before its transport starts, on every transport (as Centrifugo's middleware)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
from typing import Any

import pytest
import websockets

from tests.support.server import ServerFactory, ServerProcess
from tests.support.wait import eventually_sync

pytestmark = pytest.mark.integration

BASE: dict[str, Any] = {"allow_anonymous_connect_without_token": True, "http_stream": True}


def _status(server: ServerProcess, request: bytes) -> int:
    with socket.create_connection((server.host, server.port), timeout=10) as sock:
        sock.sendall(request)
        head = sock.recv(4096)
    return int(head.split(b" ")[1])


def _upgrade(path: str = "/connection/websocket") -> bytes:
    key = base64.b64encode(os.urandom(16))
    return (
        b"GET %s HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n" % (path.encode(), key)
    )


def _http_stream() -> bytes:
    body = json.dumps({"id": 1, "connect": {}}).encode()
    return b"POST /connection/http_stream HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (
        len(body),
        body,
    )


def _num_clients(server: ServerProcess) -> int:
    return int(server.api_result("info")["nodes"][0]["num_clients"])


@pytest.mark.parametrize("path", ["lean", "tornado"])
async def test_connection_limit_answers_503_until_one_leaves(
    server_factory: ServerFactory, path: str
) -> None:
    server = server_factory(
        {**BASE, "client_connection_limit": 2, "websocket_compression": path == "tornado"}
    )
    clients = []
    for _ in range(2):
        ws = await websockets.connect(server.ws_url)
        await ws.send(json.dumps({"id": 1, "connect": {}}))
        assert "connect" in json.loads(await asyncio.wait_for(ws.recv(), 10))
        clients.append(ws)
    assert await asyncio.to_thread(_num_clients, server) == 2
    assert await asyncio.to_thread(_status, server, _upgrade()) == 503
    assert await asyncio.to_thread(_status, server, _http_stream()) == 503
    await clients.pop().close()
    await asyncio.to_thread(eventually_sync, lambda: _num_clients(server) == 1, 10, "a client left")
    assert await asyncio.to_thread(_status, server, _upgrade()) == 101
    for ws in clients:
        await ws.close()


def test_connection_rate_limit_answers_503_beyond_the_rate(server_factory: ServerFactory) -> None:
    server = server_factory({**BASE, "client_connection_rate_limit": 3})
    statuses = [_status(server, _upgrade()) for _ in range(8)]
    assert statuses.count(101) >= 3 and statuses.count(503) >= 3, statuses


async def test_every_transport_refuses_new_connections_at_the_limit(
    server_factory: ServerFactory,
) -> None:
    """A limit of 1, held by one WebSocket client, refuses a new uni_websocket,
    uni_http_stream, uni_sse, SSE and SockJS session (xhr_streaming and websocket)."""
    server = server_factory(
        {
            **BASE,
            "client_connection_limit": 1,
            "uni_websocket": True,
            "uni_http_stream": True,
            "uni_sse": True,
            "sse": True,
            "sockjs": True,
        }
    )
    uni_stream = (
        b"POST /connection/uni_http_stream HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n"
    )
    async with websockets.connect(server.ws_url) as ws:
        await ws.send(json.dumps({"id": 1, "connect": {}}))
        assert "connect" in json.loads(await asyncio.wait_for(ws.recv(), 10))
        await asyncio.to_thread(eventually_sync, lambda: _num_clients(server) == 1, 10)
        for request in (
            _upgrade("/connection/uni_websocket"),
            uni_stream + b"{}",
            b"GET /connection/uni_sse HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET /connection/sse?cf_connect=%7B%7D HTTP/1.1\r\nHost: x\r\n\r\n",
            b"POST /connection/sockjs/000/limited/xhr_streaming HTTP/1.1\r\nHost: x\r\n"
            b"Content-Length: 0\r\n\r\n",
            _upgrade("/connection/sockjs/000/limited2/websocket"),
        ):
            assert await asyncio.to_thread(_status, server, request) == 503, request
