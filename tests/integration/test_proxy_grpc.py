"""GRPC event proxies against a real `grpc.aio` back end started by the test
(tests/integration/grpc_proxy_backend.py).

First the back end class alone (`GrpcProxyBackend`: every kind, metadata, TLS, per-call
credentials, gzip, one channel, failures as ProxyError), then a real centripy process whose
proxy endpoints are `grpc://` (the same cases as the HTTP proxy tests)."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import centrifuge
import pytest

from centripy.engine.config import Config
from centripy.engine.proxy import ProxyCall, ProxyError
from centripy.proxy import proxy_pb2 as pb
from centripy.proxy.grpc import GrpcProxyBackend
from tests.integration.grpc_proxy_backend import (
    GrpcProxyBackendServer,
    self_signed_cert,
    sleep_then,
)
from tests.support.server import ServerError, ServerFactory, ServerProcess, free_port
from tests.support.wait import eventually

if TYPE_CHECKING:
    from tests.integration.conftest import TokenMaker

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


@pytest.fixture
async def backend() -> AsyncIterator[GrpcProxyBackendServer]:
    server = GrpcProxyBackendServer()
    await server.start()
    yield server
    await server.stop()


def _client(endpoint: str, **config: Any) -> GrpcProxyBackend:
    return GrpcProxyBackend.from_config(endpoint, Config(proxy_rpc_endpoint=endpoint, **config))


# ----------------------------------------------------------------------- the back end class


async def test_every_kind_round_trips(backend: GrpcProxyBackendServer) -> None:
    backend.answer(
        "connect",
        lambda r: pb.ConnectResponse(
            result=pb.ConnectResult(user="u-" + r.client, data=r.data, channels=["news"])
        ),
    )
    backend.answer("rpc", lambda r: pb.RPCResponse(result=pb.RPCResult(data=r.data)))
    backend.answer(
        "subscribe", lambda r: pb.SubscribeResponse(error=pb.Error(code=403, message="no"))
    )
    backend.answer(
        "publish", lambda r: pb.PublishResponse(disconnect=pb.Disconnect(code=4500, reason="x"))
    )
    backend.answer("refresh", lambda r: pb.RefreshResponse())
    client = _client(backend.endpoint)
    base = {"client": "c1", "transport": "websocket", "protocol": "json", "encoding": "json"}
    try:
        connect = await client.call(ProxyCall("connect", {**base, "data": {"a": 1}}, {}, 2.0))
        assert connect == {
            "result": {"user": "u-c1", "b64data": "eyJhIjoxfQ==", "channels": ["news"]}
        }
        rpc = await client.call(ProxyCall("rpc", {**base, "method": "m", "data": [1]}, {}, 2.0))
        assert rpc == {"result": {"b64data": "WzFd"}}  # b"[1]"
        assert await client.call(ProxyCall("subscribe", {**base, "channel": "c"}, {}, 2.0)) == {
            "error": {"code": 403, "message": "no", "temporary": False}
        }
        assert await client.call(ProxyCall("publish", {**base, "channel": "c"}, {}, 2.0)) == {
            "disconnect": {"code": 4500, "reason": "x"}
        }
        assert await client.call(ProxyCall("refresh", {**base, "user": "u"}, {}, 2.0)) == {}
        sub_refresh = await client.call(ProxyCall("sub_refresh", {**base, "user": "u"}, {}, 2.0))
        assert sub_refresh == {"result": {}}  # the default answer: an empty result
    finally:
        await client.close()
    assert [c.kind for c in backend.calls] == [
        "connect", "rpc", "subscribe", "publish", "refresh", "sub_refresh",
    ]  # fmt: skip
    first = backend.calls[0].request
    assert (first.client, first.transport, first.protocol, first.data) == (
        "c1", "websocket", "json", b'{"a":1}',
    )  # fmt: skip
    # one channel: every call came over the same connection
    assert len({c.peer for c in backend.calls}) == 1


async def test_headers_go_as_metadata_with_credentials(backend: GrpcProxyBackendServer) -> None:
    client = _client(
        backend.endpoint,
        proxy_http_headers=("Cookie", "Origin"),
        proxy_static_http_headers={"X-Static": "s"},
        proxy_grpc_credentials_key="X-Api-Key",
        proxy_grpc_credentials_value="secret",
    )
    headers = {"Cookie": "sid=42", "Origin": "http://app", "X-Static": "s"}
    try:
        await client.call(ProxyCall("rpc", {"user": "u"}, headers, 2.0))
    finally:
        await client.close()
    metadata = backend.calls[0].metadata
    assert metadata["cookie"] == "sid=42"
    assert metadata["origin"] == "http://app"
    assert metadata["x-api-key"] == "secret"
    assert "x-static" not in metadata  # static headers are for HTTP proxies only


async def test_tls_with_the_configured_ca(tmp_path: Path) -> None:
    cert, key = self_signed_cert(tmp_path)
    server = GrpcProxyBackendServer(tls=(cert, key))
    await server.start()
    secure = _client(server.endpoint, proxy_grpc_cert_file=str(cert))
    plain = _client(server.endpoint)
    try:
        assert await secure.call(ProxyCall("rpc", {"user": "u"}, {}, 5.0)) == {"result": {}}
        with pytest.raises(ProxyError, match="UNAVAILABLE"):
            await plain.call(ProxyCall("rpc", {"user": "u"}, {}, 2.0))
    finally:
        await secure.close()
        await plain.close()
        await server.stop()
    assert len(server.calls) == 1


async def test_gzip_compression_switch() -> None:
    # a server that accepts identity only refuses a gzip-compressed call
    server = GrpcProxyBackendServer(options=[("grpc.compression_enabled_algorithms_bitset", 1)])
    await server.start()
    gzip = _client(server.endpoint, proxy_grpc_compression=True)
    identity = _client(server.endpoint)
    try:
        assert await identity.call(ProxyCall("rpc", {}, {}, 2.0)) == {"result": {}}
        with pytest.raises(ProxyError, match=r"UNIMPLEMENTED.*gzip"):
            await gzip.call(ProxyCall("rpc", {}, {}, 2.0))
    finally:
        await gzip.close()
        await identity.close()
        await server.stop()


async def test_slow_backend_is_a_proxy_error_within_the_timeout(
    backend: GrpcProxyBackendServer,
) -> None:
    backend.answer("rpc", lambda r: sleep_then(10.0, pb.RPCResponse()))
    client = _client(backend.endpoint)
    started = time.monotonic()
    try:
        with pytest.raises(ProxyError, match="DEADLINE_EXCEEDED"):
            await client.call(ProxyCall("rpc", {}, {}, 0.3))
    finally:
        await client.close()
    assert time.monotonic() - started < 3.0  # the answer would take 10 s


async def test_a_reply_that_is_not_a_response_is_a_proxy_error(
    backend: GrpcProxyBackendServer,
) -> None:
    backend.answer("connect", lambda r: b"\xff\xff\xff")
    client = _client(backend.endpoint)
    try:
        with pytest.raises(ProxyError, match="reply is not a connect response"):
            await client.call(ProxyCall("connect", {}, {}, 2.0))
    finally:
        await client.close()


async def test_backend_down_then_up() -> None:
    port = free_port()
    client = _client(f"grpc://127.0.0.1:{port}")
    server = GrpcProxyBackendServer()
    try:
        started = time.monotonic()
        with pytest.raises(ProxyError, match="UNAVAILABLE"):
            await client.call(ProxyCall("rpc", {}, {}, 1.0))
        assert time.monotonic() - started < 3.0
        await server.start(port)

        async def answered() -> bool:
            try:
                return await client.call(ProxyCall("rpc", {}, {}, 1.0)) == {"result": {}}
            except ProxyError:
                return False

        # the same channel reconnects by itself (reconnect backoff of at most 2 s)
        await eventually(answered, 10.0, "the back end answers once it is up", interval=0.1)
    finally:
        await client.close()
        await server.stop()


# ------------------------------------------------------------- a centripy process behind it


class WsClient:
    """A raw JSON-protocol WebSocket client (aiohttp): commands get ids, replies are matched by
    id, pushes are collected, the server's pings are answered."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.replies: dict[int, dict[str, Any]] = {}
        self.pushes: list[dict[str, Any]] = []
        self.changed = asyncio.Event()
        self.close_code: int | None = None
        self.close_reason = ""
        self._next = 0
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        while True:
            message = await self.ws.receive()
            if message.type != aiohttp.WSMsgType.TEXT:
                break
            for line in message.data.splitlines():
                frame = json.loads(line)
                if not frame:
                    await self.ws.send_str("{}")  # pong
                elif "id" in frame:
                    self.replies[frame["id"]] = frame
                else:
                    self.pushes.append(frame.get("push", frame))
                self.changed.set()
        if message.type == aiohttp.WSMsgType.CLOSE:
            self.close_code, self.close_reason = message.data, message.extra or ""
        else:
            self.close_code = self.ws.close_code or 1006
        self.changed.set()

    async def command(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        """Send one command and return its reply (`{"id": .., method: {...}}` or `{"error"}`)."""
        self._next += 1
        id_ = self._next
        await self.ws.send_str(json.dumps({"id": id_, method: params}))
        return await eventually(lambda: self.replies.get(id_), WAIT, f"reply to {method}",
                                changed=self.changed)  # fmt: skip

    async def closed(self) -> int:
        await eventually(lambda: self.close_code is not None, WAIT, "close", changed=self.changed)
        assert self.close_code is not None
        return self.close_code

    async def close(self) -> None:
        await self.ws.close()
        self._reader.cancel()


WAIT = 10.0


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def _ws(
    http: aiohttp.ClientSession, server: ServerProcess, headers: dict[str, str] | None = None
) -> WsClient:
    return WsClient(await http.ws_connect(server.ws_url, headers=headers or {}))


NS = {
    "name": "sec", "proxy_subscribe": True, "allow_subscribe_for_client": True,
}  # fmt: skip
CHAT = {
    "name": "chat", "proxy_publish": True, "allow_subscribe_for_client": True,
    "allow_publish_for_subscriber": True, "allow_publish_for_client": True,
}  # fmt: skip


def _start(server_factory: ServerFactory, **config: Any) -> ServerProcess:
    return server_factory({"namespaces": [NS, CHAT], **config})


async def test_connect_with_forwarded_metadata(
    server_factory: ServerFactory, backend: GrpcProxyBackendServer, http: aiohttp.ClientSession
) -> None:
    backend.answer(
        "connect",
        lambda r: pb.ConnectResponse(
            result=pb.ConnectResult(
                user="56", data=b'{"welcome":true}', channels=["news"], info=b'{"name":"Alex"}'
            )
        ),
    )
    server = server_factory(
        {
            "proxy_connect_endpoint": backend.endpoint,
            "proxy_http_headers": ["Cookie", "X-Request-Id"],
            "proxy_static_http_headers": {"X-Static": "only-http"},
        }
    )
    client = await _ws(http, server, {"Cookie": "sid=abc", "X-Other": "no"})
    try:
        reply = await client.command("connect", {"data": {"hello": 1}, "name": "raw"})
        assert "error" not in reply, reply
        connect = reply["connect"]
        assert connect["data"] == {"welcome": True}
        assert "news" in connect.get("subs", {})
        assert "expires" not in connect
        [call] = backend.of("connect")
        assert call.request.client == connect["client"]
        assert (call.request.transport, call.request.protocol, call.request.encoding) == (
            "websocket", "json", "json",
        )  # fmt: skip
        assert call.request.data == b'{"hello":1}'
        assert call.request.name == "raw"
        assert call.metadata.get("cookie") == "sid=abc"
        assert "x-other" not in call.metadata and "x-static" not in call.metadata
        # the server-side subscription is live: the user "56" gets a publication on "news"
        await server.api_async("publish", {"channel": "news", "data": {"n": 1}})
        push = await eventually(
            lambda: next((p for p in client.pushes if p.get("channel") == "news"), None),
            WAIT, "publication on the server-side channel", changed=client.changed,
        )  # fmt: skip
        assert push["pub"]["data"] == {"n": 1}
    finally:
        await client.close()


async def test_connect_refused_with_a_disconnect(
    server_factory: ServerFactory, backend: GrpcProxyBackendServer, http: aiohttp.ClientSession
) -> None:
    backend.answer(
        "connect",
        lambda r: pb.ConnectResponse(disconnect=pb.Disconnect(code=4501, reason="unauthorized")),
    )
    server = server_factory({"proxy_connect_endpoint": backend.endpoint})
    client = await _ws(http, server)
    await client.ws.send_str(json.dumps({"id": 1, "connect": {}}))
    assert await client.closed() == 4501
    assert client.close_reason == "unauthorized"
    assert 1 not in client.replies
    await client.close()


async def test_subscribe_allowed_and_refused(
    server_factory: ServerFactory,
    backend: GrpcProxyBackendServer,
    http: aiohttp.ClientSession,
    make_token: TokenMaker,
) -> None:
    def subscribe(r: Any) -> pb.SubscribeResponse:
        if r.channel == "sec:open":
            return pb.SubscribeResponse(result=pb.SubscribeResult(data=b'{"room":"open"}'))
        return pb.SubscribeResponse(error=pb.Error(code=1000, message="custom refusal"))

    backend.answer("subscribe", subscribe)
    server = _start(server_factory, proxy_subscribe_endpoint=backend.endpoint)
    client = await _ws(http, server)
    try:
        await client.command("connect", {"token": make_token("42")})
        allowed = await client.command("subscribe", {"channel": "sec:open", "data": {"k": 1}})
        assert allowed.get("subscribe", {}).get("data") == {"room": "open"}, allowed
        refused = await client.command("subscribe", {"channel": "sec:closed"})
        assert refused["error"] == {"code": 1000, "message": "custom refusal"}
    finally:
        await client.close()
    first, second = backend.of("subscribe")
    assert (first.request.user, first.request.channel, first.request.data) == (
        "42", "sec:open", b'{"k":1}',
    )  # fmt: skip
    assert second.request.channel == "sec:closed"


async def test_publish_with_rewritten_data_reaches_another_subscriber(
    server_factory: ServerFactory,
    backend: GrpcProxyBackendServer,
    http: aiohttp.ClientSession,
    make_token: TokenMaker,
) -> None:
    def publish(r: Any) -> pb.PublishResponse:
        text = json.loads(r.data)["text"]
        rewritten = json.dumps({"text": text.upper(), "by": r.user}).encode()
        return pb.PublishResponse(result=pb.PublishResult(data=rewritten))

    backend.answer("publish", publish)
    server = _start(server_factory, proxy_publish_endpoint=backend.endpoint)
    alice, bob = await _ws(http, server), await _ws(http, server)
    try:
        for client, user in ((alice, "alice"), (bob, "bob")):
            await client.command("connect", {"token": make_token(user)})
            reply = await client.command("subscribe", {"channel": "chat:1"})
            assert "error" not in reply, reply
        reply = await alice.command("publish", {"channel": "chat:1", "data": {"text": "hi"}})
        assert "error" not in reply, reply
        push = await eventually(
            lambda: next((p for p in bob.pushes if p.get("channel") == "chat:1"), None),
            WAIT, "bob gets the publication", changed=bob.changed,
        )  # fmt: skip
        assert push["pub"]["data"] == {"text": "HI", "by": "alice"}
    finally:
        await alice.close()
        await bob.close()
    [call] = backend.of("publish")
    assert (call.request.channel, call.request.data) == ("chat:1", b'{"text":"hi"}')


async def test_rpc_returns_the_backends_data(
    server_factory: ServerFactory,
    backend: GrpcProxyBackendServer,
    http: aiohttp.ClientSession,
    make_token: TokenMaker,
) -> None:
    backend.answer(
        "rpc",
        lambda r: pb.RPCResponse(
            result=pb.RPCResult(
                data=json.dumps({"method": r.method, "echo": json.loads(r.data)}).encode()
            )
        ),
    )
    server = server_factory({"proxy_rpc_endpoint": backend.endpoint})
    client = await _ws(http, server)
    try:
        await client.command("connect", {"token": make_token("7")})
        reply = await client.command("rpc", {"method": "getPrice", "data": {"id": 12}})
        assert reply.get("rpc") == {"data": {"method": "getPrice", "echo": {"id": 12}}}, reply
    finally:
        await client.close()
    [call] = backend.of("rpc")
    assert (call.request.user, call.request.method) == ("7", "getPrice")


async def test_refresh_by_the_server(
    server_factory: ServerFactory, backend: GrpcProxyBackendServer, http: aiohttp.ClientSession
) -> None:
    backend.answer(
        "connect",
        lambda r: pb.ConnectResponse(
            result=pb.ConnectResult(user="u1", expire_at=int(time.time()) + 2)
        ),
    )
    backend.answer(
        "refresh",
        lambda r: pb.RefreshResponse(result=pb.RefreshResult(expire_at=int(time.time()) + 600)),
    )
    server = server_factory(
        {"proxy_connect_endpoint": backend.endpoint, "proxy_refresh_endpoint": backend.endpoint}
    )
    client = await _ws(http, server)
    try:
        reply = await client.command("connect", {})
        assert "error" not in reply and "expires" not in reply["connect"], reply
        await eventually(lambda: backend.of("refresh"), WAIT, "a refresh call",
                         changed=backend.changed)  # fmt: skip
        [call] = backend.of("refresh")
        assert (call.request.user, call.request.client) == ("u1", reply["connect"]["client"])
        # still connected after the first expiry: the server asks, the client is not involved
        ping = await client.command("presence_stats", {"channel": "news"})
        assert client.close_code is None, ping
    finally:
        await client.close()


async def test_refresh_expired_closes_the_connection(
    server_factory: ServerFactory, backend: GrpcProxyBackendServer, http: aiohttp.ClientSession
) -> None:
    backend.answer(
        "connect",
        lambda r: pb.ConnectResponse(
            result=pb.ConnectResult(user="u1", expire_at=int(time.time()) + 1)
        ),
    )
    backend.answer("refresh", lambda r: pb.RefreshResponse(result=pb.RefreshResult(expired=True)))
    server = server_factory(
        {"proxy_connect_endpoint": backend.endpoint, "proxy_refresh_endpoint": backend.endpoint}
    )
    client = await _ws(http, server)
    await client.command("connect", {})
    assert await client.closed() == 3005  # expired
    await client.close()


@pytest.mark.parametrize("failure", ["down", "slow"])
async def test_backend_down_or_slow_is_error_100_within_the_timeout(
    server_factory: ServerFactory,
    backend: GrpcProxyBackendServer,
    http: aiohttp.ClientSession,
    make_token: TokenMaker,
    failure: str,
) -> None:
    if failure == "down":
        endpoint = f"grpc://127.0.0.1:{free_port()}"
    else:
        backend.answer("rpc", lambda r: sleep_then(10.0, pb.RPCResponse()))
        endpoint = backend.endpoint
    server = server_factory({"proxy_rpc_endpoint": endpoint, "proxy_rpc_timeout": "500ms"})
    client = await _ws(http, server)
    try:
        await client.command("connect", {"token": make_token("7")})
        started = time.monotonic()
        reply = await client.command("rpc", {"method": "m", "data": {}})
        elapsed = time.monotonic() - started
        assert reply["error"]["code"] == 100, reply
        assert elapsed < 3.0, elapsed  # a slow answer would take 10 s
        if failure == "slow":
            assert elapsed >= 0.4, elapsed
    finally:
        await client.close()


async def test_sub_refresh_extends_or_ends_a_subscription(
    server_factory: ServerFactory,
    backend: GrpcProxyBackendServer,
    http: aiohttp.ClientSession,
    make_token: TokenMaker,
) -> None:
    backend.answer(
        "subscribe",
        lambda r: pb.SubscribeResponse(result=pb.SubscribeResult(expire_at=int(time.time()) + 1)),
    )

    def sub_refresh(r: Any) -> pb.SubRefreshResponse:
        if r.channel == "timed:keep":
            return pb.SubRefreshResponse(
                result=pb.SubRefreshResult(expire_at=int(time.time()) + 600)
            )
        return pb.SubRefreshResponse(result=pb.SubRefreshResult(expired=True))

    backend.answer("sub_refresh", sub_refresh)
    timed = {"name": "timed", "proxy_subscribe": True, "proxy_sub_refresh": True}
    server = server_factory(
        {
            "namespaces": [timed],
            "proxy_subscribe_endpoint": backend.endpoint,
            "proxy_sub_refresh_endpoint": backend.endpoint,
            # expiry is checked on the presence tick, after the close delay
            "client_presence_update_interval": "500ms",
            "client_expired_sub_close_delay": "0s",
        }
    )
    client = await _ws(http, server)
    try:
        await client.command("connect", {"token": make_token("99")})
        for channel in ("timed:keep", "timed:drop"):
            reply = await client.command("subscribe", {"channel": channel})
            assert "error" not in reply, reply
        unsubscribed = await eventually(
            lambda: next((p for p in client.pushes if "unsubscribe" in p), None),
            WAIT, "the expired subscription ends", changed=client.changed,
        )  # fmt: skip
        assert unsubscribed["channel"] == "timed:drop"
        assert unsubscribed["unsubscribe"]["code"] == 2501
        await server.api_async("publish", {"channel": "timed:keep", "data": {"still": True}})
        push = await eventually(
            lambda: next((p for p in client.pushes if p.get("channel") == "timed:keep"), None),
            WAIT, "the refreshed subscription is live", changed=client.changed,
        )  # fmt: skip
        assert push["pub"]["data"] == {"still": True}
    finally:
        await client.close()
    calls = {c.request.channel: c.request for c in backend.of("sub_refresh")}
    assert set(calls) == {"timed:keep", "timed:drop"}
    assert calls["timed:keep"].user == "99"


async def test_granular_mode_grpc_proxy_with_credentials(
    server_factory: ServerFactory, backend: GrpcProxyBackendServer, http: aiohttp.ClientSession
) -> None:
    backend.answer("connect", lambda r: pb.ConnectResponse(result=pb.ConnectResult(user="g")))
    backend.answer("rpc", lambda r: pb.RPCResponse(result=pb.RPCResult(data=b'{"ok":true}')))
    server = server_factory(
        {
            "granular_proxy_mode": True,
            "proxies": [
                {
                    "name": "backend",
                    "endpoint": backend.endpoint,
                    "http_headers": ["Authorization"],
                    "grpc_credentials_key": "x-proxy-secret",
                    "grpc_credentials_value": "s3cret",
                }
            ],
            "connect_proxy_name": "backend",
            "rpc_namespaces": [{"name": "admin", "rpc_proxy_name": "backend"}],
        }
    )
    client = await _ws(http, server, {"Authorization": "Bearer t"})
    try:
        assert (await client.command("connect", {}))["connect"]["client"]
        reply = await client.command("rpc", {"method": "admin:stats", "data": {}})
        assert reply.get("rpc") == {"data": {"ok": True}}, reply
    finally:
        await client.close()
    assert [c.kind for c in backend.calls] == ["connect", "rpc"]
    for call in backend.calls:
        assert call.metadata.get("authorization") == "Bearer t"
        assert call.metadata.get("x-proxy-secret") == "s3cret"
    assert backend.of("rpc")[0].request.method == "admin:stats"


async def test_protobuf_client_payloads_travel_as_raw_bytes(
    server_factory: ServerFactory, backend: GrpcProxyBackendServer
) -> None:
    # A protobuf client's payloads are not JSON: the back end gets and returns raw bytes.
    backend.answer(
        "connect",
        lambda r: pb.ConnectResponse(result=pb.ConnectResult(user="bin", data=r.data[::-1])),
    )
    backend.answer("rpc", lambda r: pb.RPCResponse(result=pb.RPCResult(data=r.data[::-1])))
    server = server_factory(
        {"proxy_connect_endpoint": backend.endpoint, "proxy_rpc_endpoint": backend.endpoint}
    )
    client = centrifuge.Client(
        server.ws_url, use_protobuf=True, data=b"\x00\x01\xfe", headers={"Cookie": "c=1"}
    )
    try:
        await client.connect()
        await client.ready(WAIT)
        result = await client.rpc("bytes", b"\xff\x00\x80")
        assert result.data == b"\x80\x00\xff"
    finally:
        await client.disconnect()
    connect, rpc = backend.calls
    assert (connect.request.protocol, connect.request.data) == ("protobuf", b"\x00\x01\xfe")
    assert (rpc.request.encoding, rpc.request.data, rpc.request.b64data) == (
        "json", b"\xff\x00\x80", "",
    )  # fmt: skip


async def test_binary_encoding_sends_and_accepts_base64_strings(
    server_factory: ServerFactory,
    backend: GrpcProxyBackendServer,
    http: aiohttp.ClientSession,
    make_token: TokenMaker,
) -> None:
    answer = base64.b64encode(b'{"y":2}').decode()
    backend.answer("rpc", lambda r: pb.RPCResponse(result=pb.RPCResult(b64data=answer)))
    server = server_factory({"proxy_rpc_endpoint": backend.endpoint, "proxy_binary_encoding": True})
    client = await _ws(http, server)
    try:
        await client.command("connect", {"token": make_token("7")})
        reply = await client.command("rpc", {"method": "m", "data": {"x": 1}})
        assert reply.get("rpc") == {"data": {"y": 2}}, reply
    finally:
        await client.close()
    [call] = backend.of("rpc")
    assert (call.request.encoding, call.request.data) == ("binary", b"")
    assert base64.b64decode(call.request.b64data) == b'{"x":1}'


@pytest.mark.parametrize(
    ("config", "named"),
    [
        ({"proxy_grpc_cert_file": "/nonexistent/ca.pem"}, '"proxy_grpc_cert_file": cannot read'),
        ({"proxy_grpc_credentials_key": "bad key"}, '"proxy_grpc_credentials_key"'),
    ],
)
def test_serve_refuses_bad_grpc_settings_naming_the_key(
    server_factory: ServerFactory, config: dict[str, Any], named: str
) -> None:
    server = server_factory({"proxy_rpc_endpoint": "grpc://127.0.0.1:9", **config}, start=False)
    with pytest.raises(ServerError) as info:
        server.start()
    assert f"config error: {named}" in str(info.value)
