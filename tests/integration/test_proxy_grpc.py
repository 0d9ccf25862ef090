"""GRPC event proxies against a real `grpc.aio` back end started by the test
(tests/integration/grpc_proxy_backend.py).

First the back end class alone (`GrpcProxyBackend`: every kind, metadata, TLS, per-call
credentials, gzip, one channel, failures as ProxyError), then a real centripy process whose
proxy endpoints are `grpc://` (the same cases as the HTTP proxy tests)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

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
from tests.support.server import free_port
from tests.support.wait import eventually

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
    backend.answer("rpc", lambda r: sleep_then(5.0, pb.RPCResponse()))
    client = _client(backend.endpoint)
    started = time.monotonic()
    try:
        with pytest.raises(ProxyError, match="DEADLINE_EXCEEDED"):
            await client.call(ProxyCall("rpc", {}, {}, 0.3))
    finally:
        await client.close()
    assert time.monotonic() - started < 2.0


async def test_backend_down_then_up() -> None:
    port = free_port()
    client = _client(f"grpc://127.0.0.1:{port}")
    server = GrpcProxyBackendServer()
    try:
        started = time.monotonic()
        with pytest.raises(ProxyError, match="UNAVAILABLE"):
            await client.call(ProxyCall("rpc", {}, {}, 1.0))
        assert time.monotonic() - started < 1.5
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
