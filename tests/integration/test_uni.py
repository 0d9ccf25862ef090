"""uni_websocket, uni_sse and uni_http_stream against a real `centripy serve` process, with
raw HTTP and WebSocket clients. Expected behaviour: docs/spec/protocol.md 1.7, 4.4, 5.4 and 8
(trap 12): a bare ConnectRequest in, pushes without the `{"push":..}` envelope out, the
`connect` push first, a `disconnect` push last."""

from __future__ import annotations

import asyncio
import json
import urllib.parse
from typing import Any

import pytest
import tornado.httpclient
import tornado.websocket

from tests.integration.conftest import make_jwt
from tests.integration.test_emulation import (
    WAIT,
    RawStream,
    api_disconnect,
    post,
    wait_no_clients,
)
from tests.support.server import ServerFactory, ServerProcess

pytestmark = [pytest.mark.integration, pytest.mark.timeout(30)]

NEWS = {"name": "news", "history_size": 10, "history_ttl": "300s", "force_recovery": True}
CONFIG: dict[str, Any] = {
    "uni_websocket": True,
    "uni_sse": True,
    "uni_http_stream": True,
    "namespaces": [NEWS],
}


def connect_request(user: str = "u1", **fields: Any) -> bytes:
    return json.dumps({"token": make_jwt(user, channels=["news:1"]), **fields}).encode()


def uni_disconnect(code: int, reason: str) -> dict[str, Any]:
    return {"disconnect": {"code": code, "reason": reason}}


async def publish(server: ServerProcess, channel: str, data: Any) -> None:
    await server.api_async("publish", {"channel": channel, "data": data})


# --- uni_http_stream -------------------------------------------------------------------------


async def test_uni_http_stream_session(server_factory: ServerFactory) -> None:
    server = server_factory(CONFIG)
    stream = await post(server.port, "/connection/uni_http_stream", connect_request())
    assert stream.status == 200
    assert stream.headers["cache-control"].startswith("private, no-cache")
    assert stream.headers["x-accel-buffering"] == "no"
    connect = (await stream.line())["connect"]
    assert connect["session"] and connect["client"] and connect["ping"] == 25
    assert "pong" not in connect and "node" not in connect
    assert connect["subs"]["news:1"]["recoverable"] is True

    await publish(server, "news:1", {"n": 1})
    assert await stream.line() == {"channel": "news:1", "pub": {"data": {"n": 1}, "offset": 1}}
    await server.api_async("subscribe", {"user": "u1", "channel": "news:2"})
    pushed = await stream.line()
    assert pushed["channel"] == "news:2" and "subscribe" in pushed
    await publish(server, "news:2", "two")
    assert (await stream.line())["pub"]["data"] == "two"
    await server.api_async("disconnect", api_disconnect("u1", 4000, "later"))
    assert await stream.line() == uni_disconnect(4000, "later")
    assert await stream.rest() == b""
    await wait_no_clients(server)


async def test_uni_http_stream_pings_and_peer_going_away(server_factory: ServerFactory) -> None:
    server = server_factory({**CONFIG, "ping_interval": "1s", "pong_timeout": "500ms"})
    stream = await post(server.port, "/connection/uni_http_stream", connect_request())
    assert (await stream.line())["connect"]["ping"] == 1
    # Nobody answers pings on a unidirectional transport, and nobody needs to.
    for _ in range(3):
        assert await stream.line() == {}
    stream.close()
    await wait_no_clients(server)


async def test_uni_http_stream_bad_requests(server_factory: ServerFactory) -> None:
    server = server_factory({**CONFIG, "uni_http_stream_max_request_body_size": 300})
    port, path = server.port, "/connection/uni_http_stream"
    assert (await RawStream.open(port, "GET", path)).status == 405
    assert (await RawStream.open(port, "OPTIONS", path)).status == 200
    assert (await post(port, path, b"{not json")).status == 400
    assert (await post(port, path, b"")).status == 400
    assert (await post(port, path, b"{}" + b" " * 299)).status == 413
    # A well-formed request without credentials: the connect error becomes a disconnect.
    stream = await post(port, path, b"{}")
    assert stream.status == 200
    assert await stream.line() == uni_disconnect(3501, "bad request")
    assert await stream.rest() == b""


async def test_uni_connect_errors_map_to_disconnects(server_factory: ServerFactory) -> None:
    server = server_factory(CONFIG)
    expired = json.dumps({"token": make_jwt("u", exp_in=-60)}).encode()
    stream = await post(server.port, "/connection/uni_http_stream", expired)
    assert await stream.line() == uni_disconnect(3005, "connection expired")
    invalid = json.dumps({"token": make_jwt("u", secret="wrong")}).encode()
    stream = await post(server.port, "/connection/uni_http_stream", invalid)
    assert await stream.line() == uni_disconnect(3500, "invalid token")


# --- uni_sse ----------------------------------------------------------------------------------


async def test_uni_sse_get_and_post(server_factory: ServerFactory) -> None:
    server = server_factory(CONFIG)
    query = urllib.parse.quote(connect_request("s1").decode())
    stream = await RawStream.open(server.port, "GET", f"/connection/uni_sse?cf_connect={query}")
    assert stream.status == 200
    assert stream.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert await stream.read_until(b"\r\n") == b"\r\n"
    connect = (await stream.event())["connect"]
    assert "news:1" in connect["subs"] and "pong" not in connect
    await publish(server, "news:1", {"sse": True})
    assert await stream.event() == {
        "channel": "news:1",
        "pub": {"data": {"sse": True}, "offset": 1},
    }
    await server.api_async("disconnect", api_disconnect("s1", 4501, "stop"))
    assert await stream.event() == uni_disconnect(4501, "stop")
    assert await stream.rest() == b""

    posted = await post(server.port, "/connection/uni_sse", connect_request("s2"))
    assert await posted.read_until(b"\r\n") == b"\r\n"
    assert "connect" in await posted.event()
    posted.close()
    await wait_no_clients(server)


async def test_uni_sse_requests(server_factory: ServerFactory) -> None:
    server = server_factory(
        {**CONFIG, "uni_sse_max_request_body_size": 300, "client_insecure": True}
    )
    port, path = server.port, "/connection/uni_sse"
    # No cf_connect: an empty request, i.e. an anonymous attempt (allowed when insecure).
    stream = await RawStream.open(port, "GET", path)
    assert stream.status == 200 and await stream.read_until(b"\r\n") == b"\r\n"
    connect = (await stream.event())["connect"]
    assert connect["client"] and "subs" not in connect
    stream.close()
    assert (await RawStream.open(port, "OPTIONS", path)).status == 405
    assert (await RawStream.open(port, "GET", path + "?cf_connect=%7Bx")).status == 400
    assert (await post(port, path, b"{}" + b" " * 299)).status == 413


# --- uni_websocket ----------------------------------------------------------------------------


async def ws_open(server: ServerProcess) -> tornado.websocket.WebSocketClientConnection:
    url = f"ws://127.0.0.1:{server.port}/connection/uni_websocket"
    return await tornado.websocket.websocket_connect(url, connect_timeout=WAIT)


async def ws_read(ws: tornado.websocket.WebSocketClientConnection) -> Any:
    async with asyncio.timeout(WAIT):
        message = await ws.read_message()
    return None if message is None else json.loads(message)


async def test_uni_websocket_session(server_factory: ServerFactory) -> None:
    server = server_factory({**CONFIG, "ping_interval": "1s", "pong_timeout": "500ms"})
    ws = await ws_open(server)
    await ws.write_message(connect_request("w1"))
    connect = (await ws_read(ws))["connect"]
    assert connect["session"] and connect["ping"] == 1 and "pong" not in connect
    await ws.write_message("ignored: not a command")  # later messages are read and ignored
    await publish(server, "news:1", [1, 2])
    message = await ws_read(ws)
    while message == {}:  # pings may come first
        message = await ws_read(ws)
    assert message == {"channel": "news:1", "pub": {"data": [1, 2], "offset": 1}}
    assert await ws_read(ws) == {}  # a ping, one text frame of its own
    await server.api_async("disconnect", api_disconnect("w1", 4500, "bye"))
    message = await ws_read(ws)
    while message == {}:
        message = await ws_read(ws)
    assert message == uni_disconnect(4500, "bye")
    # Then the TCP connection is closed without a close frame (no close code).
    assert await ws_read(ws) is None
    assert ws.close_code is None
    await wait_no_clients(server)


async def test_uni_websocket_malformed_connect_closes(server_factory: ServerFactory) -> None:
    server = server_factory(CONFIG)
    ws = await ws_open(server)
    await ws.write_message("{not json")
    assert await ws_read(ws) is None
    assert ws.close_code is None


async def test_uni_websocket_peer_going_away(server_factory: ServerFactory) -> None:
    server = server_factory(CONFIG)
    ws = await ws_open(server)
    await ws.write_message(connect_request("w2"))
    assert "connect" in await ws_read(ws)
    ws.close()
    await wait_no_clients(server)


async def test_uni_transports_are_off_by_default(server_factory: ServerFactory) -> None:
    server = server_factory({})
    for path in ("/connection/uni_http_stream", "/connection/uni_sse"):
        answer = await post(server.port, path, b"{}")
        assert answer.status == 404
        answer.close()
    with pytest.raises(tornado.httpclient.HTTPClientError) as failure:
        await ws_open(server)
    assert failure.value.code == 404
