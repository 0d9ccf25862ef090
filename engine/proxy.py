"""Centrifugo v5 event proxies: the contract of a proxy back end (HTTP or GRPC) and the pure
parts around it, request bodies and response mapping (docs/spec/proxy.md). No I/O here:
`centripy.proxy.http` and `centripy.proxy.grpc` implement `ProxyBackend`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

__all__ = ["KINDS", "ProxyBackend", "ProxyCall", "ProxyError"]

KINDS = ("connect", "refresh", "subscribe", "publish", "sub_refresh", "rpc")


class ProxyError(Exception):
    """The proxy call failed: transport failure, timeout, non-200 status or an undecodable
    response. The client gets error 100 (internal)."""


@dataclass(frozen=True, slots=True)
class ProxyCall:
    """One proxy request."""

    kind: str  # one of KINDS
    request: dict[str, Any]  # the JSON body Centrifugo's HTTP proxy POSTs for that kind
    headers: Mapping[str, str]  # forwarded proxy_http_headers + static headers (GRPC: metadata)
    timeout: float  # seconds


class ProxyBackend(Protocol):
    """A proxy endpoint. `call` runs on the event loop and returns the JSON-shaped response
    object: `{"result": {...}}`, `{"error": {...}}` or `{"disconnect": {...}}`; data/info
    fields may come as `data`/`info` (raw JSON) or `b64data`/`b64info` (base64). Raises
    `ProxyError`."""

    async def call(self, call: ProxyCall) -> dict[str, Any]: ...

    async def close(self) -> None: ...
