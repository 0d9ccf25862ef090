"""Centrifugo v5 event proxies: the contract of a proxy back end (HTTP or GRPC) and the pure
parts around it: which proxy answers what (`ProxyRoutes`), request bodies, and the mapping
of a response to a typed result, an `Error` reply or a `Disconnect` (docs/spec/proxy.md).
`centripy.proxy.http` and `centripy.proxy.grpc` implement `ProxyBackend`; `Proxies` joins
the routes to the back ends the composition root built and is what connection actors call.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from centripy.engine.channels import SubscribeOverride
from centripy.engine.config import Config
from centripy.engine.metrics import Metrics
from centripy.engine.options import ChannelOptions
from centripy.engine.protocol.codes import Disconnect, Error, ErrorCode
from centripy.engine.protocol.json_codec import dumps_exact, loads_exact

__all__ = [
    "KINDS",
    "ConnectResult",
    "Proxies",
    "ProxyBackend",
    "ProxyCall",
    "ProxyError",
    "ProxyRoutes",
    "ProxyTarget",
    "PublishResult",
    "RefreshResult",
    "SubOptions",
    "SubscribeResult",
]

log = logging.getLogger("centripy.proxy")
T = TypeVar("T")

KINDS = ("connect", "refresh", "subscribe", "publish", "sub_refresh", "rpc")
RETRY_AFTER_FAILED_REFRESH = 60  # seconds: a refresh call that failed is tried again then


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


# --------------------------------------------------------------------------- routing


@dataclass(frozen=True, slots=True)
class ProxyTarget:
    """One configured proxy: a named one of `proxies` (granular mode) or, without granular
    mode, the proxy of one kind (its name is the kind)."""

    name: str
    endpoint: str
    timeout: float
    http_headers: frozenset[str] = frozenset()  # lower-cased names to forward
    static_headers: Mapping[str, str] = field(default_factory=dict)
    binary: bool = False  # proxy_binary_encoding: payloads travel as b64data
    include_meta: bool = False  # proxy_include_connection_meta

    def headers(self, forwarded: Mapping[str, str]) -> dict[str, str]:
        """The headers of a call: the client's forwarded ones this proxy names, then the
        static ones."""
        out = {k: v for k, v in forwarded.items() if k.lower() in self.http_headers}
        out.update(self.static_headers)
        return out


def _lower(names: tuple[str, ...]) -> frozenset[str]:
    return frozenset(n.lower() for n in names)


class ProxyRoutes:
    """Which proxy answers a connect, refresh, subscribe, publish, sub_refresh or rpc; built
    once from the Config (pure, thread-safe)."""

    def __init__(self, config: Config) -> None:
        self.granular = config.granular_proxy_mode
        self.boundary = config.rpc_namespace_boundary
        self.targets: dict[str, ProxyTarget] = {}
        if self.granular:
            for p in config.proxies:
                self.targets[p.name] = ProxyTarget(
                    p.name,
                    p.endpoint,
                    p.timeout,
                    _lower(p.http_headers),
                    dict(p.static_http_headers),
                    p.binary_encoding,
                    p.include_connection_meta,
                )
            self.connect = self.targets.get(config.connect_proxy_name)
            self.refresh = self.targets.get(config.refresh_proxy_name)
            self._rpc_top = self.targets.get(config.rpc_proxy_name)
            self._rpc_ns = {ns.name: ns.rpc_proxy_name for ns in config.rpc_namespaces}
        else:
            c = config
            endpoints = (
                ("connect", c.proxy_connect_endpoint, c.proxy_connect_timeout),
                ("refresh", c.proxy_refresh_endpoint, c.proxy_refresh_timeout),
                ("subscribe", c.proxy_subscribe_endpoint, c.proxy_subscribe_timeout),
                ("publish", c.proxy_publish_endpoint, c.proxy_publish_timeout),
                ("sub_refresh", c.proxy_sub_refresh_endpoint, c.proxy_sub_refresh_timeout),
                ("rpc", c.proxy_rpc_endpoint, c.proxy_rpc_timeout),
            )
            for kind, endpoint, timeout in endpoints:
                if endpoint:
                    self.targets[kind] = ProxyTarget(
                        kind,
                        endpoint,
                        timeout,
                        _lower(c.proxy_http_headers),
                        dict(c.proxy_static_http_headers),
                        c.proxy_binary_encoding,
                        c.proxy_include_connection_meta,
                    )
            self.connect = self.targets.get("connect")
            self.refresh = self.targets.get("refresh")
            self._rpc_top = self.targets.get("rpc")
            self._rpc_ns = {}
        self.header_names: frozenset[str] = frozenset().union(
            *(t.http_headers for t in self.targets.values())
        )

    def subscribe(self, opts: ChannelOptions) -> ProxyTarget | None:
        if self.granular:
            return (
                self.targets.get(opts.subscribe_proxy_name) if opts.subscribe_proxy_name else None
            )
        return self.targets.get("subscribe") if opts.proxy_subscribe else None

    def publish(self, opts: ChannelOptions) -> ProxyTarget | None:
        if self.granular:
            return self.targets.get(opts.publish_proxy_name) if opts.publish_proxy_name else None
        return self.targets.get("publish") if opts.proxy_publish else None

    def sub_refresh(self, opts: ChannelOptions) -> ProxyTarget | None:
        if self.granular:
            name = opts.sub_refresh_proxy_name
            return self.targets.get(name) if name else None
        return self.targets.get("sub_refresh") if opts.proxy_sub_refresh else None

    def rpc(self, method: str) -> ProxyTarget:
        """The proxy of an rpc `method`: without granular mode the rpc proxy takes every
        method; in granular mode the method's rpc namespace (the part before
        `rpc_namespace_boundary`) names it. Raises Error 104 for an unknown namespace, 108
        when no proxy answers."""
        target = self._rpc_top
        if self.granular and self.boundary and self.boundary in method:
            namespace = method.split(self.boundary, 1)[0]
            if namespace not in self._rpc_ns:
                raise Error.of(ErrorCode.METHOD_NOT_FOUND)
            name = self._rpc_ns[namespace]
            target = self.targets.get(name) if name else None
        if target is None:
            raise Error.of(ErrorCode.NOT_AVAILABLE)
        return target

    def forwarded(self, header: Callable[[str], str | None]) -> dict[str, str]:
        """The request headers (read by name, any case, through `header`) that some proxy
        forwards: kept with the connection for its proxy calls."""
        out = {}
        for name in self.header_names:
            value = header(name)
            if value:
                out[name] = value
        return out


# --------------------------------------------------------------------------- requests


def base_request(client: str, transport: str, protocol: str, target: ProxyTarget) -> dict[str, Any]:
    """The fields every request has."""
    return {
        "client": client,
        "transport": transport,
        "protocol": protocol,
        "encoding": "binary" if target.binary else "json",
    }


def add_payload(request: dict[str, Any], key: str, payload: bytes, binary: bool) -> None:
    """Put client bytes in the request: `data` (raw JSON) or, in binary mode or for bytes
    that are not JSON (a protobuf client's), base64 in `b64data`."""
    if not payload:
        return
    if not binary:
        try:
            request[key] = loads_exact(payload)
            return
        except ValueError:
            pass
    request["b64" + key] = base64.b64encode(payload).decode()


def add_meta(request: dict[str, Any], meta: bytes, target: ProxyTarget) -> None:
    """`meta`, the connection's meta (connect result or token), when the proxy asks for it."""
    if target.include_meta and meta:
        with contextlib.suppress(ValueError):
            request["meta"] = loads_exact(meta)


# --------------------------------------------------------------------------- responses


def outcome(response: object) -> dict[str, Any] | None:
    """The `result` object of a response (None when absent or null); raises the
    `disconnect` as Disconnect and the `error` as Error; ProxyError for another shape."""
    if not isinstance(response, dict):
        raise ProxyError("response is not a JSON object")
    disconnect = response.get("disconnect")
    if disconnect is not None:
        if not isinstance(disconnect, dict):
            raise ProxyError("disconnect is not an object")
        code = _uint(disconnect, "code")
        if not 3000 <= code <= 4999:  # what a WebSocket close frame may carry
            raise ProxyError(f"disconnect code {code} is not in 3000-4999")
        return_reason = disconnect.get("reason") or ""
        if not isinstance(return_reason, str):
            raise ProxyError("disconnect reason is not a string")
        raise Disconnect(code, return_reason)
    error = response.get("error")
    if error is not None:
        if not isinstance(error, dict):
            raise ProxyError("error is not an object")
        message = error.get("message") or ""
        if not isinstance(message, str):
            raise ProxyError("error message is not a string")
        raise Error(_uint(error, "code"), message, error.get("temporary") is True)
    result = response.get("result")
    if result is None:
        return None
    if not isinstance(result, dict):
        raise ProxyError("result is not an object")
    return result


def _uint(obj: Mapping[str, Any], key: str) -> int:
    value = obj.get(key, 0)
    if value is None:
        return 0
    if type(value) is not int or value < 0:
        raise ProxyError(f"{key} is not a non-negative integer")
    return value


def _int(obj: Mapping[str, Any], key: str) -> int:
    value = obj.get(key, 0)
    if value is None:
        return 0
    if type(value) is not int:
        raise ProxyError(f"{key} is not an integer")
    return value


def _bool(obj: Mapping[str, Any], key: str) -> bool:
    value = obj.get(key, False)
    if value is None:
        return False
    if type(value) is not bool:
        raise ProxyError(f"{key} is not a boolean")
    return value


def payload(obj: Mapping[str, Any], key: str) -> bytes | None:
    """A data/info field as bytes: `b64<key>` (base64) wins over `<key>` (a JSON value, or
    bytes from a GRPC back end); None when both are absent."""
    b64 = obj.get("b64" + key)
    if b64:
        if not isinstance(b64, str):
            raise ProxyError(f"b64{key} is not a string")
        try:
            return base64.b64decode(b64, validate=True)
        except (binascii.Error, ValueError):
            raise ProxyError(f"b64{key} is not base64") from None
    value = obj.get(key)
    if value is None:
        return None
    if isinstance(value, bytes):
        return value
    try:
        return dumps_exact(value)
    except ValueError:
        raise ProxyError(f"{key} cannot be written as JSON") from None


def _override(value: object) -> SubscribeOverride:
    if value is None:
        return SubscribeOverride()
    if not isinstance(value, dict):
        raise ProxyError("override is not an object")
    flags: dict[str, bool] = {}
    for name in SubscribeOverride.__dataclass_fields__:
        item = value.get(name)
        if item is None:
            continue
        flag = item.get("value", False) if isinstance(item, dict) else None
        if not isinstance(flag, bool):
            raise ProxyError(f'override.{name} is not {{"value": bool}}')
        flags[name] = flag
    return SubscribeOverride(**flags)


@dataclass(frozen=True, slots=True)
class SubOptions:
    """One entry of a connect result's `subs`."""

    info: bytes = b""
    data: bytes = b""
    override: SubscribeOverride = field(default_factory=SubscribeOverride)


@dataclass(frozen=True, slots=True)
class ConnectResult:
    user: str = ""
    expire_at: int = 0
    info: bytes = b""
    data: bytes = b""
    channels: tuple[str, ...] = ()
    subs: dict[str, SubOptions] = field(default_factory=dict)
    meta: bytes = b""


@dataclass(frozen=True, slots=True)
class RefreshResult:
    """A refresh or sub_refresh result. `info` is None when the proxy sent none."""

    expired: bool = False
    expire_at: int = 0
    info: bytes | None = None
    meta: bytes | None = None


@dataclass(frozen=True, slots=True)
class SubscribeResult:
    info: bytes = b""
    data: bytes = b""
    override: SubscribeOverride = field(default_factory=SubscribeOverride)
    expire_at: int = 0


@dataclass(frozen=True, slots=True)
class PublishResult:
    data: bytes | None = None  # replaces the client's data when set
    skip_history: bool = False


def connect_result(result: Mapping[str, Any]) -> ConnectResult:
    user = result.get("user")
    user = "" if user is None else user
    if not isinstance(user, str):
        raise ProxyError("user is not a string")
    channels = result.get("channels")
    channels = [] if channels is None else channels
    if not isinstance(channels, list) or not all(isinstance(c, str) for c in channels):
        raise ProxyError("channels is not a list of strings")
    raw_subs = result.get("subs")
    raw_subs = {} if raw_subs is None else raw_subs
    if not isinstance(raw_subs, dict):
        raise ProxyError("subs is not an object")
    subs = {}
    for channel, opts in raw_subs.items():
        if not isinstance(opts, dict):
            raise ProxyError("subs values are not objects")
        subs[channel] = SubOptions(
            payload(opts, "info") or b"",
            payload(opts, "data") or b"",
            _override(opts.get("override")),
        )
    return ConnectResult(
        user=user,
        expire_at=_int(result, "expire_at"),
        info=payload(result, "info") or b"",
        data=payload(result, "data") or b"",
        channels=tuple(channels),
        subs=subs,
        meta=payload(result, "meta") or b"",
    )


def refresh_result(result: Mapping[str, Any]) -> RefreshResult:
    return RefreshResult(
        expired=_bool(result, "expired"),
        expire_at=_int(result, "expire_at"),
        info=payload(result, "info"),
        meta=payload(result, "meta"),
    )


def subscribe_result(result: Mapping[str, Any] | None) -> SubscribeResult:
    if result is None:
        return SubscribeResult()
    return SubscribeResult(
        info=payload(result, "info") or b"",
        data=payload(result, "data") or b"",
        override=_override(result.get("override")),
        expire_at=_int(result, "expire_at"),
    )


def publish_result(result: Mapping[str, Any] | None) -> PublishResult:
    if result is None:
        return PublishResult()
    return PublishResult(payload(result, "data"), _bool(result, "skip_history"))


def rpc_data(result: Mapping[str, Any] | None) -> bytes:
    return (payload(result, "data") or b"") if result is not None else b""


# --------------------------------------------------------------------------- runtime


class Proxies:
    """The routes and the back ends of each configured proxy (built by the composition
    root). `call` runs on the loop, in a connection actor's command handler."""

    def __init__(self, routes: ProxyRoutes, backends: Mapping[str, ProxyBackend]) -> None:
        self.routes = routes
        self._backends = dict(backends)
        # The node's metrics (set by the composition root): every call's duration, and its
        # failures, as Centrifugo's (granular_)proxy_duration_seconds and _errors.
        self.metrics: Metrics | None = None

    async def call(
        self,
        target: ProxyTarget,
        kind: str,
        request: dict[str, Any],
        forwarded: Mapping[str, str],
        parse: Callable[[dict[str, Any] | None], T],
    ) -> T:
        """`call_or_fail`, with a failed call raised as Error 100 (internal)."""
        try:
            return await self.call_or_fail(target, kind, request, forwarded, parse)
        except ProxyError:
            raise Error.of(ErrorCode.INTERNAL) from None

    async def call_or_fail(
        self,
        target: ProxyTarget,
        kind: str,
        request: dict[str, Any],
        forwarded: Mapping[str, str],
        parse: Callable[[dict[str, Any] | None], T],
    ) -> T:
        """Call `target` and map the response's `result` (None when it has none) with
        `parse`; its `error` is raised as Error and its `disconnect` as Disconnect. A failed
        call, a timeout or an undecodable response raises ProxyError (logged)."""
        call = ProxyCall(kind, request, target.headers(forwarded), target.timeout)
        started = time.perf_counter()
        try:
            # the back end times out itself; this bounds one that does not
            async with asyncio.timeout(target.timeout + 1.0):  # no task per call
                response = await self._backends[target.name].call(call)
            result = parse(outcome(response))
        except (ProxyError, TimeoutError) as exc:
            self._observe(target, kind, started, True)
            log.error("%s proxy %s failed: %r", kind, target.endpoint, exc)
            raise ProxyError(str(exc)) from None
        except (Error, Disconnect):  # the back end answered with an error or a disconnect
            self._observe(target, kind, started, False)
            raise
        self._observe(target, kind, started, False)
        return result

    def _observe(self, target: ProxyTarget, kind: str, started: float, error: bool) -> None:
        if self.metrics is not None:
            protocol = "grpc" if target.endpoint.startswith("grpc://") else "http"
            name = target.name if self.routes.granular else ""
            self.metrics.observe_proxy(protocol, kind, name, time.perf_counter() - started, error)

    async def close(self) -> None:
        for backend in self._backends.values():
            try:
                await backend.close()
            except Exception as exc:
                log.warning("closing a proxy back end failed: %r", exc)
