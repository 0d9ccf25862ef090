"""centripy/proxy: the backend factory and `HttpProxyBackend` against a real aiohttp app
(tests/integration/http_proxy_backend.py): JSON POST with the call's headers, failures as
ProxyError, one keep-alive pool shared by every HTTP proxy."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from centripy.engine.config import Config, ConfigError, ProxyConfig
from centripy.engine.config_check import validate_config
from centripy.engine.proxy import ProxyCall, ProxyError, ProxyRoutes
from centripy.proxy import build_proxies
from centripy.proxy.http import HttpPool, HttpProxyBackend
from tests.integration.http_proxy_backend import ProxyBackend, proxy_backend, slow
from tests.support.server import free_port


@pytest.fixture
async def backend() -> AsyncIterator[ProxyBackend]:
    async with proxy_backend() as b:
        yield b


def call(kind: str = "rpc", timeout: float = 2.0, **request: Any) -> ProxyCall:
    return ProxyCall(kind, {"client": "c", **request}, {"Cookie": "a=1"}, timeout)


async def test_posts_json_with_headers_and_returns_the_answer(backend: ProxyBackend) -> None:
    backend.answers["rpc"] = {"result": {"data": {"n": 12345678901234567890123}}}
    pool = HttpPool()
    proxy = HttpProxyBackend(backend.url("rpc"), pool)
    try:
        answer = await proxy.call(call(data={"big": 12345678901234567890123}))
        assert answer == {"result": {"data": {"n": 12345678901234567890123}}}
        (seen,) = backend.of("rpc")
        assert seen.body == {"client": "c", "data": {"big": 12345678901234567890123}}
        assert seen.headers["Cookie"] == "a=1"
        assert seen.headers["Content-Type"] == "application/json"
        for _ in range(5):
            await proxy.call(call())
        assert len({r.peer_port for r in backend.requests}) == 1  # keep-alive
    finally:
        await proxy.close()


@pytest.mark.parametrize(
    "answer",
    [
        web.Response(status=500, text="{}"),
        web.Response(status=200, text="not json"),
        web.Response(status=200, text="[1]", content_type="application/json"),
    ],
)
async def test_bad_answers_are_proxy_errors(backend: ProxyBackend, answer: web.Response) -> None:
    backend.answers["rpc"] = lambda body: answer
    proxy = HttpProxyBackend(backend.url("rpc"), HttpPool())
    try:
        with pytest.raises(ProxyError):
            await proxy.call(call())
    finally:
        await proxy.close()


async def test_timeout_and_refused_connection_are_proxy_errors(backend: ProxyBackend) -> None:
    backend.answers["rpc"] = slow(3.0, {"result": {}})
    pool = HttpPool()
    proxy = HttpProxyBackend(backend.url("rpc"), pool)
    down = HttpProxyBackend(f"http://127.0.0.1:{free_port()}/rpc", pool)
    try:
        started = time.monotonic()
        with pytest.raises(ProxyError):
            await proxy.call(call(timeout=0.3))
        assert time.monotonic() - started < 1.5
        with pytest.raises(ProxyError):
            await down.call(call())
    finally:
        await proxy.close()


async def test_factory_builds_one_backend_per_proxy_sharing_one_pool() -> None:
    assert build_proxies(Config()) is None
    config = Config(
        proxy_connect_endpoint="http://127.0.0.1:1/c", proxy_rpc_endpoint="https://h/rpc"
    )
    proxies = build_proxies(config)
    assert proxies is not None
    backends = proxies._backends
    assert set(backends) == {"connect", "rpc"}
    connect, rpc = backends["connect"], backends["rpc"]
    assert isinstance(connect, HttpProxyBackend) and isinstance(rpc, HttpProxyBackend)
    assert connect._pool is rpc._pool
    await proxies.close()


def test_an_endpoint_of_another_scheme_is_a_config_error_naming_the_key() -> None:
    with pytest.raises(ConfigError) as info:
        validate_config(Config(proxy_subscribe_endpoint="ftp://h/x"))
    assert info.value.key == "proxy_subscribe_endpoint"
    granular = Config(
        granular_proxy_mode=True, proxies=(ProxyConfig(name="main", endpoint="tcp://h:1"),)
    )
    with pytest.raises(ConfigError) as info:
        validate_config(granular)
    assert info.value.key == "proxies[0].endpoint"
    assert ProxyRoutes(Config(proxy_subscribe_endpoint="http://h/")).targets  # accepted
