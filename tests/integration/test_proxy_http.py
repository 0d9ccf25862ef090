"""HTTP event proxies against a real centripy process and a real backend app started by the
test (tests/integration/http_proxy_backend.py, recording each proxy request), with
centrifuge-python, centrifuge-js and raw WebSocket frames as clients. Expected behaviour:
docs/spec/proxy.md (Centrifugo v5)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import aiohttp
import cent
import pytest
from centrifuge import Client

from tests.integration.http_proxy_backend import ProxyBackend, proxy_backend, slow
from tests.integration.test_websocket_sdks import ClientEvents, SubEvents
from tests.support.server import ServerFactory, ServerProcess, free_port
from tests.support.wait import eventually

if TYPE_CHECKING:
    from tests.integration.conftest import JsClient, TokenMaker

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

WAIT = 10.0


@pytest.fixture
async def backend() -> AsyncIterator[ProxyBackend]:
    async with proxy_backend() as b:
        yield b


@pytest.fixture
async def clients() -> AsyncIterator[list[Client]]:
    made: list[Client] = []
    yield made
    for client in made:
        await client.disconnect()


def proxy_config(backend: ProxyBackend, *kinds: str, **extra: Any) -> dict[str, Any]:
    config: dict[str, Any] = {f"proxy_{k}_endpoint": backend.url(k) for k in kinds}
    config.update(extra)
    return config


def py_client(
    server: ServerProcess, made: list[Client], **options: Any
) -> tuple[Client, ClientEvents]:
    events = ClientEvents()
    client = Client(server.ws_url, events=events, proxy=None, **options)
    made.append(client)
    return client, events


class RawWs:
    """Client protocol frames over a plain WebSocket (JSON)."""

    def __init__(self, session: aiohttp.ClientSession, ws: aiohttp.ClientWebSocketResponse):
        self.session = session
        self.ws = ws
        self.next_id = 0

    async def call(self, method: str, body: dict[str, Any]) -> dict[str, Any]:
        self.next_id += 1
        await self.ws.send_str(json.dumps({"id": self.next_id, method: body}))
        while True:
            msg = await asyncio.wait_for(self.ws.receive(), WAIT)
            if msg.type != aiohttp.WSMsgType.TEXT:
                return {"closed": self.ws.close_code, "reason": msg.extra}
            for line in msg.data.splitlines():
                reply = json.loads(line)
                if reply.get("id") == self.next_id:
                    return dict(reply)

    async def closed(self) -> tuple[int | None, str]:
        while True:
            msg = await asyncio.wait_for(self.ws.receive(), WAIT)
            if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED):
                return self.ws.close_code, str(msg.extra or "")


@pytest.fixture
async def raw_ws() -> AsyncIterator[Any]:
    sessions: list[aiohttp.ClientSession] = []

    async def connect(server: ServerProcess, headers: dict[str, str] | None = None) -> RawWs:
        session = aiohttp.ClientSession()
        sessions.append(session)
        ws = await session.ws_connect(server.ws_url, headers=headers or {})
        return RawWs(session, ws)

    yield connect
    for session in sessions:
        await session.close()


# -- connect -----------------------------------------------------------------------------------


async def test_connect_proxy_with_forwarded_cookie_gives_user_data_and_server_subscription(
    server_factory: ServerFactory, backend: ProxyBackend, clients: list[Client]
) -> None:
    backend.answers["connect"] = {
        "result": {
            "user": "alice",
            "info": {"name": "Alice"},
            "data": {"welcome": "alice"},
            "channels": ["news:alice"],
        }
    }
    server = server_factory(
        proxy_config(
            backend,
            "connect",
            proxy_http_headers=["Cookie", "X-Trace"],
            proxy_static_http_headers={"X-Static": "yes"},
            namespaces=[{"name": "news", "presence": True}],
        )
    )
    client, events = py_client(
        server,
        clients,
        headers={"Cookie": "session=s3cr3t", "X-Other": "not forwarded"},
        name="py-app",
        data={"hello": 1},
    )
    await client.connect()
    connected = await events.wait_for("connected")
    assert connected.data == {"welcome": "alice"}
    (call,) = await backend.wait_for("connect")
    assert call.body["client"] == connected.client
    assert call.body["transport"] == "websocket"
    assert (call.body["protocol"], call.body["encoding"]) == ("json", "json")
    assert call.body["name"] == "py-app"
    assert call.body["data"] == {"hello": 1}
    assert call.headers["Cookie"] == "session=s3cr3t"
    assert call.headers["X-Static"] == "yes"
    assert "X-Other" not in call.headers and "X-Trace" not in call.headers
    assert call.headers["Content-Type"] == "application/json"

    api = cent.AsyncClient(server.api_url, server.api_key)
    try:
        presence = await eventually(
            lambda: _presence(api, "news:alice"), WAIT, "alice in the server-side channel"
        )
        (entry,) = presence.values()
        assert entry.user == "alice" and entry.conn_info == {"name": "Alice"}
        await api.publish(cent.PublishRequest(channel="news:alice", data={"n": 1}))
        pub = await events.wait_for("publication")
        assert pub.channel == "news:alice" and pub.pub.data == {"n": 1}
    finally:
        await api.close()


async def _presence(api: cent.AsyncClient, channel: str) -> dict[str, Any] | None:
    result = await api.presence(cent.PresenceRequest(channel=channel))
    return dict(result.presence) or None


async def test_connect_proxy_disconnect_closes_with_its_code_and_reason(
    server_factory: ServerFactory, backend: ProxyBackend, clients: list[Client]
) -> None:
    backend.answers["connect"] = {"disconnect": {"code": 4501, "reason": "banned"}}
    server = server_factory(proxy_config(backend, "connect"))
    client, events = py_client(server, clients)
    await client.connect()
    disconnected = await events.wait_for("disconnected")
    assert (disconnected.code, disconnected.reason) == (4501, "banned")


async def test_connect_proxy_error_is_the_connect_reply(
    server_factory: ServerFactory, backend: ProxyBackend, raw_ws: Any
) -> None:
    backend.answers["connect"] = {"error": {"code": 1001, "message": "try later"}}
    server = server_factory(proxy_config(backend, "connect"))
    ws = await raw_ws(server)
    reply = await ws.call("connect", {})
    assert reply["error"] == {"code": 1001, "message": "try later"}


async def test_token_login_skips_the_connect_proxy(
    server_factory: ServerFactory,
    backend: ProxyBackend,
    clients: list[Client],
    make_token: TokenMaker,
) -> None:
    server = server_factory(proxy_config(backend, "connect", "rpc"))
    client, events = py_client(server, clients, token=make_token("bob"))
    await client.connect()
    await events.wait_for("connected")
    # rpc reaches the backend with the token's user: the connection is up, no connect call
    await client.rpc("whoami", {})
    (rpc,) = await backend.wait_for("rpc")
    assert rpc.body["user"] == "bob"
    assert backend.of("connect") == []


# -- subscribe, publish, rpc -------------------------------------------------------------------


async def test_subscribe_proxy_allows_and_refuses_with_a_custom_error(
    server_factory: ServerFactory, backend: ProxyBackend, clients: list[Client]
) -> None:
    def subscribe(body: dict[str, Any]) -> dict[str, Any]:
        if body["channel"] == "room:open":
            return {"result": {"data": {"topic": "open"}, "info": {"role": "member"}}}
        return {"error": {"code": 1403, "message": "members only"}}

    backend.answers["connect"] = {"result": {"user": "carol"}}
    backend.answers["subscribe"] = subscribe
    server = server_factory(
        proxy_config(
            backend, "connect", "subscribe", namespaces=[{"name": "room", "proxy_subscribe": True}]
        )
    )
    client, _ = py_client(server, clients)
    await client.connect()
    await client.ready(timeout=WAIT)

    open_events = SubEvents()
    sub = client.new_subscription("room:open", events=open_events, data={"please": True})
    await sub.subscribe()
    subscribed = await open_events.wait_for("subscribed")
    assert subscribed.data == {"topic": "open"}
    (call,) = await backend.wait_for("subscribe")
    assert call.body["user"] == "carol" and call.body["channel"] == "room:open"
    assert call.body["data"] == {"please": True}

    closed_events = SubEvents()
    refused = client.new_subscription("room:closed", events=closed_events)
    await refused.subscribe()
    unsubscribed = await closed_events.wait_for("unsubscribed")
    assert (unsubscribed.code, unsubscribed.reason) == (1403, "members only")


async def test_publish_proxy_rewrites_the_data_another_subscriber_receives(
    server_factory: ServerFactory,
    backend: ProxyBackend,
    clients: list[Client],
    js_client: JsClient,
) -> None:
    def publish(body: dict[str, Any]) -> dict[str, Any]:
        return {"result": {"data": {**body["data"], "moderated": True}}}

    backend.answers["connect"] = {"result": {"user": "dave"}}
    backend.answers["publish"] = publish
    chat = {"name": "chat", "proxy_publish": True, "allow_subscribe_for_client": True}
    server = server_factory(proxy_config(backend, "connect", "publish", namespaces=[chat]))
    reader, _ = py_client(server, clients)
    await reader.connect()
    await reader.ready(timeout=WAIT)
    reader_events = SubEvents()
    sub = reader.new_subscription("chat:1", events=reader_events)
    await sub.subscribe()
    await sub.ready(timeout=WAIT)

    events = await asyncio.to_thread(
        js_client,
        {
            "endpoint": server.ws_url,
            "steps": [
                {"op": "connect"},
                {"op": "publish", "channel": "chat:1", "data": {"text": "hi"}},
            ],
        },
    )
    assert any(e["event"] == "connected" for e in events)
    pub = await reader_events.wait_for("publication")
    assert pub.pub.data == {"text": "hi", "moderated": True}
    (call,) = backend.of("publish")
    assert call.body["channel"] == "chat:1" and call.body["data"] == {"text": "hi"}
    assert call.body["user"] == "dave" and call.body["transport"] == "websocket"


async def test_publish_proxy_error_refuses_the_publication(
    server_factory: ServerFactory, backend: ProxyBackend, raw_ws: Any
) -> None:
    backend.answers["connect"] = {"result": {"user": "eve"}}
    backend.answers["publish"] = {"error": {"code": 1409, "message": "spam"}}
    chat = {"name": "chat", "proxy_publish": True}
    server = server_factory(proxy_config(backend, "connect", "publish", namespaces=[chat]))
    ws = await raw_ws(server)
    assert "connect" in await ws.call("connect", {})
    reply = await ws.call("publish", {"channel": "chat:1", "data": {"x": 1}})
    assert reply["error"] == {"code": 1409, "message": "spam"}


async def test_rpc_proxy_returns_the_backends_data_to_centrifuge_js(
    server_factory: ServerFactory, backend: ProxyBackend, js_client: JsClient
) -> None:
    def rpc(body: dict[str, Any]) -> dict[str, Any]:
        return {"result": {"data": {"method": body["method"], "echo": body["data"]}}}

    backend.answers["connect"] = {"result": {"user": "frank"}}
    backend.answers["rpc"] = rpc
    server = server_factory(proxy_config(backend, "connect", "rpc"))
    events = await asyncio.to_thread(
        js_client,
        {
            "endpoint": server.ws_url,
            "steps": [{"op": "connect"}, {"op": "rpc", "method": "sum", "data": {"a": 1}}],
        },
    )
    (result,) = [e for e in events if e["event"] == "result" and e["op"] == "rpc"]
    assert result["value"]["data"] == {"method": "sum", "echo": {"a": 1}}
    (call,) = backend.of("rpc")
    assert call.body["user"] == "frank"


async def test_granular_mode_routes_connect_and_rpc_namespaces(
    server_factory: ServerFactory, backend: ProxyBackend, raw_ws: Any
) -> None:
    backend.answers["connect"] = {"result": {"user": "gina"}}
    backend.answers["rpc"] = {"result": {"data": {"ok": True}}}
    server = server_factory(
        {
            "granular_proxy_mode": True,
            "proxies": [
                {"name": "auth", "endpoint": backend.url("connect"), "timeout": "2s"},
                {
                    "name": "admin",
                    "endpoint": backend.url("rpc"),
                    "http_headers": ["Authorization"],
                },
            ],
            "connect_proxy_name": "auth",
            "rpc_namespaces": [{"name": "admin", "rpc_proxy_name": "admin"}, {"name": "off"}],
        }
    )
    ws = await raw_ws(server, {"Authorization": "Bearer t"})
    assert (await ws.call("connect", {}))["connect"]["client"]
    reply = await ws.call("rpc", {"method": "admin:stats", "data": {}})
    assert reply["rpc"] == {"data": {"ok": True}}
    (call,) = backend.of("rpc")
    assert call.body["method"] == "admin:stats" and call.headers["Authorization"] == "Bearer t"
    assert (await ws.call("rpc", {"method": "off:x"}))["error"]["code"] == 108
    assert (await ws.call("rpc", {"method": "unknown:x"}))["error"]["code"] == 104
    assert (await ws.call("rpc", {"method": "plain"}))["error"]["code"] == 108


# -- refresh, failures -------------------------------------------------------------------------


async def test_refresh_proxy_refreshes_on_the_server_then_expires(
    server_factory: ServerFactory, backend: ProxyBackend, raw_ws: Any
) -> None:
    backend.answers["connect"] = lambda body: {
        "result": {"user": "hal", "expire_at": int(time.time()) + 2}
    }
    refreshes = 0

    def refresh(body: dict[str, Any]) -> dict[str, Any]:
        nonlocal refreshes
        refreshes += 1
        if refreshes == 1:
            return {"result": {"expire_at": int(time.time()) + 2}}
        return {"result": {"expired": True}}

    backend.answers["refresh"] = refresh
    server = server_factory(proxy_config(backend, "connect", "refresh"))
    ws = await raw_ws(server)
    connect = (await ws.call("connect", {}))["connect"]
    assert "expires" not in connect and "ttl" not in connect  # the server refreshes
    first = (await backend.wait_for("refresh", 1, within=8.0))[0]
    assert first.body["user"] == "hal" and first.body["client"] == connect["client"]
    await backend.wait_for("refresh", 2, within=8.0)
    code, reason = await ws.closed()
    assert (code, reason) == (3005, "connection expired")


async def test_backend_down_is_error_100(server_factory: ServerFactory, raw_ws: Any) -> None:
    down = f"http://127.0.0.1:{free_port()}/connect"
    server = server_factory({"proxy_connect_endpoint": down})
    ws = await raw_ws(server)
    reply = await ws.call("connect", {})
    assert reply["error"]["code"] == 100 and reply["error"]["temporary"] is True


async def test_backend_slow_is_error_100_within_the_timeout(
    server_factory: ServerFactory, backend: ProxyBackend, raw_ws: Any
) -> None:
    backend.answers["connect"] = {"result": {"user": "ivy"}}
    backend.answers["rpc"] = slow(5.0, {"result": {"data": {"late": True}}})
    server = server_factory(proxy_config(backend, "connect", "rpc", proxy_rpc_timeout="500ms"))
    ws = await raw_ws(server)
    assert "connect" in await ws.call("connect", {})
    started = time.monotonic()
    reply = await ws.call("rpc", {"method": "slow"})
    elapsed = time.monotonic() - started
    assert reply["error"]["code"] == 100
    assert 0.4 <= elapsed < 2.0, elapsed


async def test_proxy_calls_reuse_keep_alive_connections(
    server_factory: ServerFactory, backend: ProxyBackend, raw_ws: Any
) -> None:
    backend.answers["connect"] = {"result": {"user": "kim"}}
    backend.answers["rpc"] = {"result": {"data": {}}}
    server = server_factory(proxy_config(backend, "connect", "rpc"))
    ws = await raw_ws(server)
    assert "connect" in await ws.call("connect", {})
    for _ in range(20):
        assert "rpc" in await ws.call("rpc", {"method": "m"})
    ports = {r.peer_port for r in backend.requests}
    assert len(backend.requests) == 21
    assert len(ports) == 1, ports  # one TCP connection for 21 sequential calls


async def test_sub_refresh_proxy_refreshes_a_proxied_subscription_then_expires_it(
    server_factory: ServerFactory, backend: ProxyBackend, raw_ws: Any
) -> None:
    backend.answers["connect"] = {"result": {"user": "lee"}}
    backend.answers["subscribe"] = lambda body: {"result": {"expire_at": int(time.time()) + 1}}
    calls = 0

    def sub_refresh(body: dict[str, Any]) -> dict[str, Any]:
        nonlocal calls
        calls += 1
        if calls == 1:
            return {"result": {"expire_at": int(time.time()) + 1}}
        return {"result": {"expired": True}}

    backend.answers["sub_refresh"] = sub_refresh
    room = {"name": "room", "proxy_subscribe": True, "proxy_sub_refresh": True}
    server = server_factory(
        proxy_config(
            backend,
            "connect",
            "subscribe",
            "sub_refresh",
            namespaces=[room],
            client_presence_update_interval="300ms",
            client_expired_sub_close_delay="0s",
        )
    )
    ws = await raw_ws(server)
    assert "connect" in await ws.call("connect", {})
    subscribed = (await ws.call("subscribe", {"channel": "room:1"}))["subscribe"]
    assert "expires" not in subscribed and "ttl" not in subscribed  # the server refreshes
    first = (await backend.wait_for("sub_refresh", 1))[0]
    assert first.body["channel"] == "room:1" and first.body["user"] == "lee"
    await backend.wait_for("sub_refresh", 2)
    push = await _next_push(ws)
    assert push == {
        "channel": "room:1",
        "unsubscribe": {"code": 2501, "reason": "subscription expired"},
    }


async def _next_push(ws: RawWs) -> dict[str, Any]:
    while True:
        msg = await asyncio.wait_for(ws.ws.receive(), WAIT)
        assert msg.type == aiohttp.WSMsgType.TEXT, msg
        for line in msg.data.splitlines():
            frame = json.loads(line)
            if "push" in frame:
                return dict(frame["push"])


async def test_connection_meta_reaches_later_proxy_calls_when_included(
    server_factory: ServerFactory, backend: ProxyBackend, raw_ws: Any
) -> None:
    backend.answers["connect"] = {"result": {"user": "mo", "meta": {"plan": "pro"}}}
    backend.answers["rpc"] = {"result": {"b64data": "eyJiIjoxfQ=="}}  # {"b":1}
    server = server_factory(
        proxy_config(backend, "connect", "rpc", proxy_include_connection_meta=True)
    )
    ws = await raw_ws(server)
    assert "connect" in await ws.call("connect", {})
    reply = await ws.call("rpc", {"method": "m", "data": {"a": 1}})
    assert reply["rpc"] == {"data": {"b": 1}}
    (call,) = backend.of("rpc")
    assert call.body["meta"] == {"plan": "pro"} and call.body["data"] == {"a": 1}
    assert "meta" not in backend.of("connect")[0].body


async def test_uni_http_stream_connect_goes_through_the_proxy_with_forwarded_headers(
    server_factory: ServerFactory, backend: ProxyBackend
) -> None:
    backend.answers["connect"] = {"result": {"user": "uma", "data": {"hi": "uma"}}}
    server = server_factory(
        proxy_config(backend, "connect", uni_http_stream=True, proxy_http_headers=["Cookie"])
    )
    url = f"{server.http_url}/connection/uni_http_stream"
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, data=b'{"name": "curl"}', headers={"Cookie": "sid=9"}) as response,
    ):
        assert response.status == 200
        line = await asyncio.wait_for(response.content.readline(), WAIT)
    connect = json.loads(line)["connect"]
    assert connect["data"] == {"hi": "uma"}
    (call,) = backend.of("connect")
    assert call.body["transport"] == "uni_http_stream" and call.body["name"] == "curl"
    assert call.headers["Cookie"] == "sid=9"


async def test_protobuf_client_through_the_connect_and_rpc_proxies(
    server_factory: ServerFactory, backend: ProxyBackend, clients: list[Client]
) -> None:
    backend.answers["connect"] = {"result": {"user": "pat", "data": {"p": 1}}}
    backend.answers["rpc"] = lambda body: {"result": {"data": {"echo": body["data"]}}}
    server = server_factory(proxy_config(backend, "connect", "rpc"))
    client, events = py_client(server, clients, use_protobuf=True, data=b'{"hello": 1}')
    await client.connect()
    connected = await events.wait_for("connected")
    assert json.loads(connected.data) == {"p": 1}
    (call,) = await backend.wait_for("connect")
    assert (call.body["protocol"], call.body["encoding"]) == ("protobuf", "json")
    assert call.body["data"] == {"hello": 1}
    reply = await client.rpc("m", b'{"x": 2}')
    assert json.loads(reply.data) == {"echo": {"x": 2}}


async def test_binary_encoding_sends_and_takes_base64_payloads(
    server_factory: ServerFactory, backend: ProxyBackend, clients: list[Client]
) -> None:
    backend.answers["connect"] = {"result": {"user": "bin", "b64data": "AQID"}}  # 01 02 03
    server = server_factory(proxy_config(backend, "connect", proxy_binary_encoding=True))
    client, events = py_client(server, clients, use_protobuf=True, data=b"\x00\xff")
    await client.connect()
    connected = await events.wait_for("connected")
    assert connected.data == b"\x01\x02\x03"
    (call,) = backend.of("connect")
    assert call.body["encoding"] == "binary" and call.body["b64data"] == "AP8="
    assert "data" not in call.body
