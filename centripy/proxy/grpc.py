"""The GRPC event proxy: Centrifugo v5's `grpc://host:port` endpoints (docs/spec/proxy.md).

Each proxy call is one unary GRPC call of the service
`centrifugal.centrifugo.proxy.CentrifugoProxy` (method `Connect`, `Refresh`, `Subscribe`,
`Publish`, `RPC` or `SubRefresh`) with the messages of `proxy.proto`. The JSON-shaped request of
`engine/proxy.py` becomes the proto request (`data`/`meta`: their JSON bytes; `b64data`: the
client's bytes in `data`, or the base64 string field in binary mode, as Centrifugo sends them)
and the proto reply becomes the JSON-shaped response (bytes `data`/`info` as `b64data`/
`b64info`). The forwarded client headers go as GRPC metadata; `proxy_static_http_headers` are
for HTTP proxies only, as in Centrifugo.

One long-lived `grpc.aio` channel per back end, opened on the event loop by the first call.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import urlsplit

import grpc
import grpc.aio
import orjson
from google.protobuf.message import Message

from centripy.engine.config import Config, ConfigError
from centripy.engine.protocol.json_codec import dumps_exact
from centripy.engine.proxy import ProxyCall, ProxyError
from centripy.proxy import proxy_pb2 as pb

__all__ = ["SERVICE", "GrpcProxyBackend", "GrpcSettings", "decode_response", "encode_request"]

SERVICE: Final = "centrifugal.centrifugo.proxy.CentrifugoProxy"

# kind -> (method name, request message, response message)
METHODS: Final[dict[str, tuple[str, type[Message], type[Message]]]] = {
    "connect": ("Connect", pb.ConnectRequest, pb.ConnectResponse),
    "refresh": ("Refresh", pb.RefreshRequest, pb.RefreshResponse),
    "subscribe": ("Subscribe", pb.SubscribeRequest, pb.SubscribeResponse),
    "publish": ("Publish", pb.PublishRequest, pb.PublishResponse),
    "sub_refresh": ("SubRefresh", pb.SubRefreshRequest, pb.SubRefreshResponse),
    "rpc": ("RPC", pb.RPCRequest, pb.RPCResponse),
}

_ENDPOINT_KEYS: Final = tuple(f"proxy_{kind}_endpoint" for kind in METHODS)
_METADATA_KEY = re.compile(r"^[0-9a-z_.-]+$")
_PRINTABLE_ASCII = re.compile(r"^[\x20-\x7e]*$")
# Headers HTTP/2 and GRPC own; a forwarded copy would be refused or would confuse the channel.
_RESERVED_METADATA: Final = frozenset(
    {"connection", "content-length", "content-type", "host", "keep-alive", "proxy-connection",
     "te", "trailer", "transfer-encoding", "upgrade", "user-agent"}
)  # fmt: skip
# Client reconnect backoff after the back end went away (grpc's default grows to 120 s).
_CHANNEL_OPTIONS: Final = (
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
)


# --------------------------------------------------------------------------- codec (pure)


def _json_bytes(value: Any) -> bytes:
    try:
        return dumps_exact(value)
    except (TypeError, ValueError) as exc:
        raise ProxyError(f"proxy request: a value is not JSON: {exc}") from None


def _b64decode(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ProxyError("proxy request: b64data is not base64") from None


def encode_request(kind: str, request: Mapping[str, Any]) -> Message:
    """The proto request of a `kind` call for the JSON-shaped `request` (the HTTP proxy body).
    `data` and `meta` (JSON values, `orjson.Fragment` included) travel as their JSON bytes.
    `b64data` stays the base64 string field in binary mode (`encoding: "binary"`, as Centrifugo
    sends it); otherwise, as Centrifugo puts the client's bytes in `data` whatever they are, it
    is decoded into `data`. Keys the message has no field for are left out. Raises ValueError
    for an unknown kind and ProxyError for a value of the wrong type."""
    if kind not in METHODS:
        raise ValueError(f"unknown proxy call kind {kind!r}")
    message = METHODS[kind][1]()
    fields = message.DESCRIPTOR.fields_by_name
    binary = request.get("encoding") == "binary"
    for key, value in request.items():
        if value is None or key not in fields:
            continue
        try:
            if key in ("data", "meta"):
                setattr(message, key, _json_bytes(value))
            elif key == "b64data" and not binary:
                message.data = _b64decode(value)
            elif key == "channels":
                getattr(message, key).extend(value)
            else:
                setattr(message, key, value)
        except (TypeError, ValueError) as exc:
            raise ProxyError(f"proxy request field {key!r}: {exc}") from None
    return message


def _b64(value: bytes) -> str:
    return base64.b64encode(value).decode("ascii")


def _override(message: Message) -> dict[str, Any]:
    return {field.name: {"value": value.value} for field, value in message.ListFields()}


def _options(message: Message) -> dict[str, Any]:
    """A result (or a server-side subscription's options) as the HTTP proxy's JSON object:
    only the fields the back end set; bytes `info`/`data` as `b64info`/`b64data` (a set
    base64 string field wins, as in Centrifugo); `meta` parsed from its JSON bytes."""
    out: dict[str, Any] = {}
    for field, value in message.ListFields():
        name = field.name
        if name in ("info", "data"):
            out.setdefault(f"b64{name}", _b64(value))
        elif name in ("b64info", "b64data"):
            out[name] = value
        elif name == "meta":
            try:
                out["meta"] = orjson.loads(value)
            except orjson.JSONDecodeError:
                raise ProxyError("proxy result: meta is not JSON") from None
        elif name == "channels":
            out[name] = list(value)
        elif name == "subs":
            out[name] = {channel: _options(opts) for channel, opts in value.items()}
        elif name == "override":
            out[name] = _override(value)
        else:  # user, expire_at, expired, skip_history
            out[name] = value
    return out


def decode_response(response: Message) -> dict[str, Any]:
    """The JSON-shaped response of a proto reply: `{"disconnect": ...}` if set, else
    `{"error": ...}` if set, else `{"result": {...}}` if set (an empty one included), else
    `{}` (no result: e.g. a connect without credentials)."""
    if response.HasField("disconnect"):
        d = response.disconnect
        return {"disconnect": {"code": d.code, "reason": d.reason}}
    if response.HasField("error"):
        e = response.error
        return {"error": {"code": e.code, "message": e.message, "temporary": e.temporary}}
    if response.HasField("result"):
        result = response.result
        out = _options(result)
        if isinstance(result, pb.ConnectResult):
            out.setdefault("user", "")
        return {"result": out}
    return {}


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True, slots=True)
class GrpcSettings:
    """What a GRPC back end needs from the config."""

    endpoint: str
    target: str  # host:port
    root_certificates: bytes | None = None  # TLS with this CA when set, plaintext otherwise
    credentials: tuple[str, str] | None = None  # per-call metadata key and value
    compression: bool = False  # gzip
    static_only: frozenset[str] = frozenset()  # static HTTP header names not to forward


def parse_endpoint(endpoint: str, key: str) -> str:
    """`grpc://host:port` -> `host:port`; ConfigError naming `key` otherwise."""
    parts = urlsplit(endpoint)
    if parts.scheme != "grpc" or not parts.netloc or parts.username or parts.password:
        raise ConfigError(key, f"{endpoint!r} is not a GRPC proxy endpoint grpc://host:port")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigError(key, f"{endpoint!r}: a GRPC proxy endpoint has no path or query")
    try:
        parts.port  # noqa: B018 - validates the port
    except ValueError as exc:
        raise ConfigError(key, f"{endpoint!r}: {exc}") from None
    return parts.netloc


def _read_cert(path: str, key: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise ConfigError(key, f"cannot read {path!r}: {exc.strerror}") from None


def _settings(
    endpoint: str,
    endpoint_key: str,
    prefix: str,
    cert_file: str,
    cred_key: str,
    cred_value: str,
    compression: bool,
    forwarded: Iterable[str],
    static: Iterable[str],
) -> GrpcSettings:
    credentials = None
    if cred_key:
        name = cred_key.lower()
        if not _METADATA_KEY.match(name) or name.startswith("grpc-"):
            raise ConfigError(
                f"{prefix}grpc_credentials_key", f"{cred_key!r} is no GRPC metadata key"
            )
        if not _PRINTABLE_ASCII.match(cred_value):
            raise ConfigError(f"{prefix}grpc_credentials_value", "must be printable ASCII")
        credentials = (name, cred_value)
    forwarded_names = {h.lower() for h in forwarded}
    return GrpcSettings(
        endpoint=endpoint,
        target=parse_endpoint(endpoint, endpoint_key),
        root_certificates=_read_cert(cert_file, f"{prefix}grpc_cert_file") if cert_file else None,
        credentials=credentials,
        compression=compression,
        static_only=frozenset(h.lower() for h in static) - forwarded_names,
    )


def settings_from_config(endpoint: str, config: Config, name: str = "") -> GrpcSettings:
    """The settings of the back end at `endpoint`: in granular proxy mode those of the
    `proxies` item called `name` (or, without a name, the first with that endpoint), else
    the top-level `proxy_grpc_*` keys."""
    if config.granular_proxy_mode:
        for i, proxy in enumerate(config.proxies):
            if proxy.endpoint == endpoint and (not name or proxy.name == name):
                return _settings(
                    endpoint,
                    f"proxies[{i}].endpoint",
                    f"proxies[{i}].",
                    proxy.grpc_cert_file,
                    proxy.grpc_credentials_key,
                    proxy.grpc_credentials_value,
                    proxy.grpc_compression,
                    proxy.http_headers,
                    proxy.static_http_headers,
                )
        raise ConfigError("proxies", f"no proxy has the endpoint {endpoint!r}")
    key = next((k for k in _ENDPOINT_KEYS if getattr(config, k) == endpoint), "proxy endpoint")
    return _settings(
        endpoint,
        key,
        "proxy_",
        config.proxy_grpc_cert_file,
        config.proxy_grpc_credentials_key,
        config.proxy_grpc_credentials_value,
        config.proxy_grpc_compression,
        config.proxy_http_headers,
        config.proxy_static_http_headers,
    )


def call_metadata(
    headers: Mapping[str, str], settings: GrpcSettings
) -> tuple[tuple[str, Any], ...]:
    """The GRPC metadata of a call: the forwarded headers under lower-case keys (static-only
    ones, HTTP/2-owned ones and values GRPC cannot carry left out), then the credentials."""
    out: list[tuple[str, Any]] = []
    for name, value in headers.items():
        key = name.lower()
        if key in settings.static_only or key in _RESERVED_METADATA or key.startswith("grpc-"):
            continue
        if not _METADATA_KEY.match(key):
            continue
        if key.endswith("-bin"):
            out.append((key, value.encode("utf-8", "surrogateescape")))
        elif _PRINTABLE_ASCII.match(value):
            out.append((key, value))
    if settings.credentials is not None:
        out.append(settings.credentials)
    return tuple(out)


# --------------------------------------------------------------------------- back end


class GrpcProxyBackend:
    """A `ProxyBackend` over one `grpc.aio` channel. `call` and `close` run on the server's
    event loop; the channel is opened by the first call and lives until `close`."""

    def __init__(self, settings: GrpcSettings) -> None:
        self.settings = settings
        self._channel: grpc.aio.Channel | None = None
        self._callables: dict[str, Any] = {}

    @classmethod
    def from_config(cls, endpoint: str, config: Config, name: str = "") -> GrpcProxyBackend:
        """The back end of `endpoint` (`grpc://host:port`); in granular mode `name` picks the
        `proxies` item when several share the endpoint. Raises ConfigError naming the key of
        a malformed endpoint, an unreadable cert file or a bad credentials key."""
        return cls(settings_from_config(endpoint, config, name))

    def _open(self) -> grpc.aio.Channel:
        s = self.settings
        compression = grpc.Compression.Gzip if s.compression else None
        if s.root_certificates is not None:
            creds = grpc.ssl_channel_credentials(root_certificates=s.root_certificates)
            return grpc.aio.secure_channel(s.target, creds, _CHANNEL_OPTIONS, compression)
        return grpc.aio.insecure_channel(s.target, _CHANNEL_OPTIONS, compression)

    def _callable(self, kind: str) -> Any:
        found = self._callables.get(kind)
        if found is None:
            if self._channel is None:
                self._channel = self._open()
            method, request, response = METHODS[kind]
            found = self._channel.unary_unary(
                f"/{SERVICE}/{method}",
                request_serializer=request.SerializeToString,
                response_deserializer=response.FromString,
            )
            self._callables[kind] = found
        return found

    async def call(self, call: ProxyCall) -> dict[str, Any]:
        """One proxy call within `call.timeout`; raises ProxyError on any GRPC failure
        (unavailable, deadline exceeded, a status other than OK, an undecodable reply)."""
        request = encode_request(call.kind, call.request)
        invoke = self._callable(call.kind)
        try:
            response = await invoke(
                request,
                timeout=call.timeout,
                metadata=call_metadata(call.headers, self.settings),
            )
        except grpc.RpcError as exc:
            code = exc.code() if isinstance(exc, grpc.aio.AioRpcError) else None
            details = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
            name = code.name if code is not None else "ERROR"
            raise ProxyError(f"{self.settings.endpoint} {call.kind}: {name} {details}") from None
        if response is None:  # grpc logs the undecodable reply and hands over None
            raise ProxyError(
                f"{self.settings.endpoint} {call.kind}: reply is not a {call.kind} response"
            )
        return decode_response(response)

    async def close(self) -> None:
        """Close the channel (calls under way are cancelled)."""
        channel, self._channel = self._channel, None
        self._callables.clear()
        if channel is not None:
            await channel.close()
