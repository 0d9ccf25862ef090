"""The HTTP proxy back end: `POST` of the JSON request to the endpoint (docs/spec/proxy.md).

Every HTTP proxy of a node shares one `HttpPool` (one aiohttp session, one keep-alive
connection pool), so a proxy call per command reuses open TCP connections. Runs on the
server's event loop.
"""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson

from centripy.engine.protocol.json_codec import dumps_exact, loads_exact
from centripy.engine.proxy import ProxyCall, ProxyError

__all__ = ["HttpPool", "HttpProxyBackend"]

_JSON = {"Content-Type": "application/json"}


class HttpPool:
    """One aiohttp session with a keep-alive pool, created on first use (on the loop)."""

    def __init__(self, limit: int = 1000, keepalive: float = 60.0) -> None:
        self._limit = limit
        self._keepalive = keepalive
        self._session: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(
                limit=self._limit, limit_per_host=0, keepalive_timeout=self._keepalive
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                json_serialize=lambda v: dumps_exact(v).decode(),
                skip_auto_headers=("User-Agent",),
            )
        return self._session

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None and not session.closed:
            await session.close()


class HttpProxyBackend:
    """A `ProxyBackend` posting to one `http://` or `https://` endpoint."""

    def __init__(self, endpoint: str, pool: HttpPool) -> None:
        self.endpoint = endpoint
        self._pool = pool

    async def call(self, call: ProxyCall) -> dict[str, Any]:
        """POST the request; a 200 answer's JSON object is returned. Raises ProxyError on
        a connection failure, timeout, other status or a body that is not a JSON object."""
        try:
            body = dumps_exact(call.request)
        except ValueError as exc:
            raise ProxyError(f"request cannot be encoded: {exc}") from None
        headers = {**call.headers, **_JSON}
        timeout = aiohttp.ClientTimeout(total=call.timeout)
        try:
            async with self._pool.session().post(
                self.endpoint, data=body, headers=headers, timeout=timeout
            ) as response:
                data = await response.read()
                status = response.status
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise ProxyError(f"{type(exc).__name__}: {exc}") from None
        if status != 200:
            raise ProxyError(f"unexpected status {status}")
        try:
            value = loads_exact(data)
        except (ValueError, orjson.JSONDecodeError):
            raise ProxyError("response is not JSON") from None
        if not isinstance(value, dict):
            raise ProxyError("response is not a JSON object")
        return value

    async def close(self) -> None:
        await self._pool.close()
