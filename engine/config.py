"""Typed, validated configuration read from Centrifugo v5 config sources
(docs/spec/server_api.md 3).

`load_config` merges the config file (JSON, YAML or TOML), `CENTRIFUGO_<KEY>` environment
variables and CLI overrides (in increasing precedence) into one frozen `Config`, then validates
it. Every error is a `ConfigError` naming the offending key. Field names are Centrifugo's keys;
durations are float seconds. Pure: the caller passes the environment in; the only I/O is reading
the config file. Called once at start-up (and on reload) from the main thread.
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from decimal import Decimal, InvalidOperation
from functools import cache
from pathlib import Path
from typing import Any, Literal

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePublicKey
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey

from centripy.engine.options import ChannelOptions, Namespace

__all__ = [
    "Config",
    "ConfigError",
    "ConsumerConfig",
    "KafkaConsumerConfig",
    "PostgresConsumerConfig",
    "ProxyConfig",
    "RpcNamespace",
    "load_config",
    "load_public_key",
    "parse_go_bool",
    "parse_go_duration",
    "validate_channel_options",
    "validate_config",
]


class ConfigError(Exception):
    """An invalid configuration. `key` is the offending key path (e.g. `namespaces[0].name`)."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f'config error: "{key}": {reason}')
        self.key = key
        self.reason = reason


# --------------------------------------------------------------------------- typed objects


@dataclass(frozen=True, slots=True)
class PostgresConsumerConfig:
    dsn: str = ""
    outbox_table_name: str = ""
    num_partitions: int = 1
    partition_select_limit: int = 100
    partition_poll_interval: float = 0.3
    partition_notification_channel: str = ""


@dataclass(frozen=True, slots=True)
class KafkaConsumerConfig:
    brokers: tuple[str, ...] = ()
    topics: tuple[str, ...] = ()
    consumer_group: str = ""
    max_poll_records: int = 100
    sasl_mechanism: str = ""
    sasl_user: str = ""
    sasl_password: str = ""
    tls: bool = False
    tls_cert: str = ""
    tls_key: str = ""
    tls_cert_pem: str = ""
    tls_key_pem: str = ""
    tls_root_ca: str = ""
    tls_root_ca_pem: str = ""
    tls_client_ca: str = ""
    tls_client_ca_pem: str = ""
    tls_server_name: str = ""
    tls_insecure_skip_verify: bool = False


@dataclass(frozen=True, slots=True)
class ConsumerConfig:
    name: str
    type: str
    disabled: bool = False
    postgresql: PostgresConsumerConfig | None = None
    kafka: KafkaConsumerConfig | None = None


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    """One item of `proxies` (granular proxy mode)."""

    name: str = ""
    endpoint: str = ""
    timeout: float = 1.0
    http_headers: tuple[str, ...] = ()
    grpc_metadata: tuple[str, ...] = ()
    static_http_headers: Mapping[str, str] = field(default_factory=dict)
    binary_encoding: bool = False
    include_connection_meta: bool = False
    grpc_cert_file: str = ""
    grpc_credentials_key: str = ""
    grpc_credentials_value: str = ""
    grpc_compression: bool = False


@dataclass(frozen=True, slots=True)
class RpcNamespace:
    name: str
    proxy_rpc: bool = False
    rpc_proxy_name: str = ""


@dataclass(frozen=True)
class Config:
    """Every server-relevant Centrifugo v5.2 option (plus centripy's `database_url` and
    `idempotent_result_ttl`). Build it with `load_config`; `Config()` gives the defaults."""

    # node, engine, logging
    name: str = ""
    engine: str = "memory"
    broker: str = ""
    log_level: str = "info"
    log_file: str = ""
    pid_file: str = ""
    gomaxprocs: int = 0
    database_url: str = "sqlite+aiosqlite:///centripy.db"
    idempotent_result_ttl: float = 300.0
    reuse_port: bool = False  # centripy: SO_REUSEPORT, so several processes share a port
    postgresql_prefix: str = "centripy"  # centripy: engine postgresql channel/table prefix
    # listening, API, admin
    address: str = ""
    port: int = 8000
    internal_address: str = ""
    internal_port: int = 0  # 0: serve internal endpoints on `port`
    api_key: str = ""
    api_insecure: bool = False
    api_disable: bool = False
    api_external: bool = False
    api_error_mode: str = ""
    admin: bool = False
    admin_password: str = ""
    admin_secret: str = ""
    admin_insecure: bool = False
    admin_external: bool = False
    admin_web_path: str = ""
    admin_web_proxy_address: str = ""
    allowed_origins: tuple[str, ...] = ()
    # client authentication
    client_insecure: bool = False
    client_insecure_skip_token_signature_verify: bool = False
    allow_anonymous_connect_without_token: bool = False
    disallow_anonymous_connection_tokens: bool = False
    client_user_id_http_header: str = ""
    # tokens
    token_hmac_secret_key: str = ""
    token_rsa_public_key: str = ""
    token_ecdsa_public_key: str = ""
    token_jwks_public_endpoint: str = ""
    token_audience: str = ""
    token_audience_regex: str = ""
    token_issuer: str = ""
    token_issuer_regex: str = ""
    token_user_id_claim: str = ""
    separate_subscription_token_config: bool = False
    subscription_token_hmac_secret_key: str = ""
    subscription_token_rsa_public_key: str = ""
    subscription_token_ecdsa_public_key: str = ""
    subscription_token_jwks_public_endpoint: str = ""
    subscription_token_audience: str = ""
    subscription_token_audience_regex: str = ""
    subscription_token_issuer: str = ""
    subscription_token_issuer_regex: str = ""
    subscription_token_user_id_claim: str = ""
    # client limits and timing
    client_channel_limit: int = 128
    client_user_connection_limit: int = 0
    client_connection_limit: int = 0
    client_connection_rate_limit: int = 0
    client_queue_max_size: int = 1048576
    client_concurrency: int = 0
    client_expired_close_delay: float = 25.0
    client_expired_sub_close_delay: float = 25.0
    client_stale_close_delay: float = 10.0
    client_presence_update_interval: float = 27.0
    client_channel_position_check_delay: float = 40.0
    client_history_max_publication_limit: int = 300
    # centripy's own: commands of one frame beyond this get error 111 (not handled); a
    # transport stops reading a connection with this many frames not handled yet
    client_max_commands_per_frame: int = 512
    client_max_pending_frames: int = 16
    client_recovery_max_publication_limit: int = 300
    # channel names and personal channels
    channel_max_length: int = 255
    channel_private_prefix: str = "$"
    channel_namespace_boundary: str = ":"
    channel_user_boundary: str = "#"
    channel_user_separator: str = ","
    rpc_namespace_boundary: str = ":"
    user_subscribe_to_personal: bool = False
    user_personal_channel_namespace: str = ""
    user_personal_single_connection: bool = False
    # history, presence, ping
    global_history_meta_ttl: float = 2592000.0
    global_presence_ttl: float = 60.0
    global_redis_presence_user_mapping: bool = False
    node_info_metrics_aggregate_interval: float = 60.0
    ping_interval: float = 25.0
    pong_timeout: float = 8.0
    # websocket
    websocket_disable: bool = False
    websocket_compression: bool = False
    websocket_compression_min_size: int = 0
    websocket_compression_level: int = 1
    websocket_read_buffer_size: int = 0
    websocket_write_buffer_size: int = 0
    websocket_use_write_buffer_pool: bool = False
    websocket_write_timeout: float = 1.0
    websocket_message_size_limit: int = 65536
    uni_websocket: bool = False
    uni_websocket_compression: bool = False
    uni_websocket_compression_min_size: int = 0
    uni_websocket_compression_level: int = 1
    uni_websocket_read_buffer_size: int = 0
    uni_websocket_write_buffer_size: int = 0
    uni_websocket_use_write_buffer_pool: bool = False
    uni_websocket_write_timeout: float = 1.0
    uni_websocket_message_size_limit: int = 65536
    # other transports
    sse: bool = False
    http_stream: bool = False
    uni_sse: bool = False
    uni_http_stream: bool = False
    sockjs: bool = False
    sockjs_url: str = "https://cdn.jsdelivr.net/npm/sockjs-client@1/dist/sockjs.min.js"
    sockjs_heartbeat_delay: float = 25.0
    http_stream_max_request_body_size: int = 65536
    sse_max_request_body_size: int = 65536
    emulation_max_request_body_size: int = 65536
    uni_sse_max_request_body_size: int = 65536
    uni_http_stream_max_request_body_size: int = 65536
    # handler prefixes
    websocket_handler_prefix: str = "/connection/websocket"
    http_stream_handler_prefix: str = "/connection/http_stream"
    sse_handler_prefix: str = "/connection/sse"
    sockjs_handler_prefix: str = "/connection/sockjs"
    uni_websocket_handler_prefix: str = "/connection/uni_websocket"
    uni_sse_handler_prefix: str = "/connection/uni_sse"
    uni_http_stream_handler_prefix: str = "/connection/uni_http_stream"
    emulation_handler_prefix: str = "/emulation"
    api_handler_prefix: str = "/api"
    admin_handler_prefix: str = ""
    prometheus_handler_prefix: str = "/metrics"
    health_handler_prefix: str = "/health"
    swagger_handler_prefix: str = "/swagger"
    # observability, shutdown
    prometheus: bool = False
    health: bool = False
    debug: bool = False
    swagger: bool = False
    shutdown_timeout: float = 30.0
    shutdown_termination_delay: float = 0.0
    # HTTP listeners (centripy's own keys: Centrifugo v5 relies on Go's defaults)
    http_read_header_timeout: float = 10.0  # a request head must arrive within this
    http_read_timeout: float = 30.0  # a request body must arrive within this
    http_idle_timeout: float = 60.0  # a keep-alive connection may wait this long for a request
    api_max_request_body_size: int = 10485760  # larger API bodies get 413 before being read
    api_max_publication_size: int = 1048576  # larger publication data: error 107 (0: no limit)
    # TLS
    tls: bool = False
    tls_cert: str = ""
    tls_key: str = ""
    tls_cert_pem: str = ""
    tls_key_pem: str = ""
    tls_root_ca: str = ""
    tls_root_ca_pem: str = ""
    tls_client_ca: str = ""
    tls_client_ca_pem: str = ""
    tls_server_name: str = ""
    tls_insecure_skip_verify: bool = False
    tls_external: bool = False
    # redis, nats
    redis_address: tuple[str, ...] = ("redis://127.0.0.1:6379",)
    redis_prefix: str = "centrifugo"
    redis_db: int = 0
    redis_user: str = ""
    redis_password: str = ""
    redis_client_name: str = ""
    redis_connect_timeout: float = 1.0
    redis_io_timeout: float = 4.0
    redis_use_lists: bool = False
    redis_force_resp2: bool = False
    nats_url: str = "nats://127.0.0.1:4222"
    nats_prefix: str = "centrifugo"
    nats_dial_timeout: float = 1.0
    nats_write_timeout: float = 1.0
    # proxies
    proxy_connect_endpoint: str = ""
    proxy_refresh_endpoint: str = ""
    proxy_subscribe_endpoint: str = ""
    proxy_publish_endpoint: str = ""
    proxy_sub_refresh_endpoint: str = ""
    proxy_rpc_endpoint: str = ""
    proxy_subscribe_stream_endpoint: str = ""
    proxy_connect_timeout: float = 1.0
    proxy_refresh_timeout: float = 1.0
    proxy_subscribe_timeout: float = 1.0
    proxy_publish_timeout: float = 1.0
    proxy_sub_refresh_timeout: float = 1.0
    proxy_rpc_timeout: float = 1.0
    proxy_subscribe_stream_timeout: float = 1.0
    proxy_http_headers: tuple[str, ...] = ()
    proxy_static_http_headers: Mapping[str, str] = field(default_factory=dict)
    proxy_grpc_metadata: tuple[str, ...] = ()
    proxy_binary_encoding: bool = False
    proxy_include_connection_meta: bool = False
    proxy_grpc_cert_file: str = ""
    proxy_grpc_credentials_key: str = ""
    proxy_grpc_credentials_value: str = ""
    proxy_grpc_compression: bool = False
    granular_proxy_mode: bool = False
    connect_proxy_name: str = ""
    refresh_proxy_name: str = ""
    rpc_proxy_name: str = ""
    proxies: tuple[ProxyConfig, ...] = ()
    # channels and consumers
    channel_options: ChannelOptions = field(default_factory=ChannelOptions)
    namespaces: tuple[Namespace, ...] = ()
    rpc_namespaces: tuple[RpcNamespace, ...] = ()
    consumers: tuple[ConsumerConfig, ...] = ()
    _namespace_index: Mapping[str, ChannelOptions] = field(
        init=False, repr=False, compare=False, default_factory=dict
    )

    def __post_init__(self) -> None:
        index = {ns.name: ns.options for ns in self.namespaces}
        index[""] = self.channel_options
        object.__setattr__(self, "_namespace_index", index)

    def namespace(self, name: str) -> ChannelOptions | None:
        """Options of namespace `name` ("" = the top-level options); None if unknown."""
        return self._namespace_index.get(name)

    def proxy(self, name: str) -> ProxyConfig | None:
        """The granular proxy called `name`, or None."""
        return next((p for p in self.proxies if p.name == name), None)


# --------------------------------------------------------------------------- key tables

_TYPE_KINDS = {
    "bool": "bool",
    "int": "int",
    "str": "str",
    "float": "duration",
    "tuple[str, ...]": "list",
    "Mapping[str, str]": "map",
}
_LIST_KEYS = ("namespaces", "rpc_namespaces", "proxies", "consumers")
# Valid Centrifugo v5.2 keys that centripy accepts without using them.
_IGNORED_KEYS = frozenset({"redis_cluster_address", "redis_sentinel_address", "http3"})
_IGNORED_PREFIXES = (
    "grpc_api",
    "uni_grpc",
    "graphite",
    "opentelemetry",
    "usage_stats",
    "tarantool_",
    "tls_autocert",
    "redis_tls",
    "redis_sentinel_",
    "webtransport",
)
_UNSUPPORTED_FEATURES = ("grpc_api", "uni_grpc", "graphite", "opentelemetry", "tls_autocert")
_SECONDS_PRECISION = frozenset({"history_ttl", "history_meta_ttl", "global_history_meta_ttl"})
_NAMESPACE_RE = re.compile(r"^[-a-zA-Z0-9_.]{2,}$")
_CONSUMER_RE = re.compile(r"^[a-zA-Z0-9_]{2,}$")
_ENGINES = ("memory", "redis", "postgresql")
_BROKERS = ("", "nats")
_LOG_LEVELS = ("trace", "debug", "info", "warn", "error", "fatal", "none")
_CONSUMER_ENV_RE = re.compile(r"^CENTRIFUGO_CONSUMERS_(POSTGRESQL|KAFKA)_")


@cache
def _kinds(cls: type) -> Mapping[str, str]:
    return {f.name: _TYPE_KINDS[str(f.type)] for f in fields(cls) if str(f.type) in _TYPE_KINDS}


@cache
def _top_level_keys() -> frozenset[str]:
    return frozenset(_kinds(Config)) | frozenset(_kinds(ChannelOptions)) | frozenset(_LIST_KEYS)


def _is_ignored(key: str) -> bool:
    return key in _IGNORED_KEYS or key.startswith(_IGNORED_PREFIXES)


# --------------------------------------------------------------------------- value parsing

_DURATION_UNITS_NS = {
    "ns": 1,
    "us": 1_000,
    "µs": 1_000,
    "μs": 1_000,
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "m": 60_000_000_000,
    "h": 3_600_000_000_000,
}
_DURATION_PART = re.compile(r"([0-9]*(?:\.[0-9]*)?)([^0-9.]*)")
_GO_TRUE = frozenset({"1", "t", "T", "TRUE", "true", "True"})
_GO_FALSE = frozenset({"0", "f", "F", "FALSE", "false", "False"})


def parse_go_duration(text: str) -> int:
    """Parse a Go duration string ("300ms", "1h30m", "0") into nanoseconds; ValueError if bad."""
    s, negative = text, False
    if s[:1] in ("+", "-"):
        negative, s = s[0] == "-", s[1:]
    if s == "0":
        return 0
    if not s:
        raise ValueError(f'invalid duration "{text}"')
    total, pos = Decimal(0), 0
    while pos < len(s):
        match = _DURATION_PART.match(s, pos)
        assert match is not None  # the pattern matches the empty string
        number, unit = match.group(1), match.group(2)
        if number in ("", "."):
            raise ValueError(f'invalid duration "{text}"')
        if not unit:
            raise ValueError(f'missing unit in duration "{text}"')
        if unit not in _DURATION_UNITS_NS:
            raise ValueError(f'unknown unit "{unit}" in duration "{text}"')
        try:
            total += Decimal(number) * _DURATION_UNITS_NS[unit]
        except InvalidOperation as exc:
            raise ValueError(f'invalid duration "{text}"') from exc
        pos = match.end()
    return -int(total) if negative else int(total)


def parse_go_bool(text: str) -> bool:
    """Go `strconv.ParseBool`: 1/t/T/TRUE/true/True and their false twins; ValueError else."""
    if text in _GO_TRUE:
        return True
    if text in _GO_FALSE:
        return False
    raise ValueError(f'invalid boolean "{text}"')


def _type_name(value: object) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean"}.get(
        type(value), "null" if value is None else type(value).__name__
    )


def _to_bool(key: str, value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        try:
            return parse_go_bool(value.strip())
        except ValueError as exc:
            raise ConfigError(key, str(exc)) from None
    raise ConfigError(key, f"must be a boolean, got {_type_name(value)}")


def _to_int(key: str, value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            raise ConfigError(key, f'invalid integer "{value}"') from None
    raise ConfigError(key, f"must be an integer, got {_type_name(value)}")


def _to_str(key: str, value: object) -> str:
    if isinstance(value, str):
        return value
    raise ConfigError(key, f"must be a string, got {_type_name(value)}")


def _to_duration(key: str, value: object, *, nested: bool) -> float:
    """Seconds. Strings are Go durations; a number is nanoseconds inside namespace, proxy and
    consumer objects and invalid at the top level (except 0), as in Centrifugo."""
    if isinstance(value, str):
        try:
            ns = parse_go_duration(value.strip())
        except ValueError as exc:
            raise ConfigError(key, f"malformed duration: {exc}") from None
    elif isinstance(value, int | float) and not isinstance(value, bool):
        if not nested and value != 0:
            raise ConfigError(
                key, f'malformed duration: missing unit in "{value}" (use "{value}s")'
            )
        ns = int(value)
    else:
        raise ConfigError(key, f"must be a duration string, got {_type_name(value)}")
    if ns < 0:
        raise ConfigError(key, "duration must not be negative")
    if 0 < ns < 1_000_000:
        hint = (
            " (a JSON number here is nanoseconds)" if nested and not isinstance(value, str) else ""
        )
        raise ConfigError(key, f"minimal duration resolution is 1ms{hint}")
    base = key.rsplit(".", 1)[-1]
    if not nested and base in _SECONDS_PRECISION and ns % 1_000_000_000:
        raise ConfigError(key, "sub-second precision is not supported for this key")
    return ns / 1e9


def _to_list(key: str, value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        return tuple(value.split())
    if isinstance(value, list | tuple):
        return tuple(_to_str(f"{key}[{i}]", item) for i, item in enumerate(value))
    raise ConfigError(key, f"must be an array of strings, got {_type_name(value)}")


def _json_value(key: str, value: object) -> object:
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as exc:
        raise ConfigError(key, f"invalid JSON: {exc}") from None


def _to_map(key: str, value: object) -> dict[str, str]:
    value = _json_value(key, value)
    if not isinstance(value, dict):
        raise ConfigError(key, f"must be an object, got {_type_name(value)}")
    return {str(k): _to_str(f"{key}.{k}", v) for k, v in value.items()}


def _convert(key: str, kind: str, value: object, *, nested: bool) -> object:
    if kind == "bool":
        return _to_bool(key, value)
    if kind == "int":
        return _to_int(key, value)
    if kind == "str":
        return _to_str(key, value)
    if kind == "duration":
        return _to_duration(key, value, nested=nested)
    if kind == "list":
        return _to_list(key, value)
    return _to_map(key, value)


def _object_kwargs(
    cls: type, raw: Mapping[str, object], path: str, warnings: list[str], *, nested: bool
) -> dict[str, Any]:
    """Convert the keys of `raw` that `cls` declares; warn about the others (nested only)."""
    kinds = _kinds(cls)
    out: dict[str, Any] = {}
    for key, value in raw.items():
        full = f"{path}.{key}" if path else key
        if key in kinds:
            out[key] = _convert(full, kinds[key], value, nested=nested)
        elif nested:
            warnings.append(f'unknown key "{key}" found in {path}')
    return out


def _as_objects(key: str, value: object) -> list[Mapping[str, object]]:
    value = _json_value(key, value)
    if not isinstance(value, list):
        raise ConfigError(key, f"must be an array, got {_type_name(value)}")
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise ConfigError(f"{key}[{i}]", f"must be an object, got {_type_name(item)}")
    return value


# --------------------------------------------------------------------------- nested builders


def _build_namespaces(value: object, key: str, warnings: list[str]) -> tuple[Namespace, ...]:
    out = []
    for i, raw in enumerate(_as_objects(key, value)):
        path = f"{key}[{i}]"
        name = _to_str(f"{path}.name", raw.get("name", ""))
        rest = {k: v for k, v in raw.items() if k != "name"}
        opts = ChannelOptions(**_object_kwargs(ChannelOptions, rest, path, warnings, nested=True))
        out.append(Namespace(name=name, options=opts))
    return tuple(out)


def _build_rpc_namespaces(value: object, warnings: list[str]) -> tuple[RpcNamespace, ...]:
    out = []
    for i, raw in enumerate(_as_objects("rpc_namespaces", value)):
        path = f"rpc_namespaces[{i}]"
        kwargs = _object_kwargs(RpcNamespace, raw, path, warnings, nested=True)
        out.append(RpcNamespace(**{"name": "", **kwargs}))
    return tuple(out)


def _build_proxies(value: object, warnings: list[str]) -> tuple[ProxyConfig, ...]:
    out = []
    for i, raw in enumerate(_as_objects("proxies", value)):
        path = f"proxies[{i}]"
        out.append(ProxyConfig(**_object_kwargs(ProxyConfig, raw, path, warnings, nested=True)))
    return tuple(out)


def _consumer_env_overrides(raw: Mapping[str, object], env: Mapping[str, str]) -> dict[str, Any]:
    """Apply CENTRIFUGO_CONSUMERS_<TYPE>_<NAME>_* variables to one raw consumer object."""
    name, ctype = raw.get("name"), raw.get("type")
    out = dict(raw)
    if not isinstance(name, str) or ctype not in ("postgresql", "kafka"):
        return out
    prefix = f"CENTRIFUGO_CONSUMERS_{str(ctype).upper()}_{name.upper()}_"
    inner_raw = out.get(str(ctype))
    inner: dict[str, object] = dict(inner_raw) if isinstance(inner_raw, dict) else {}
    keys = ("DSN",) if ctype == "postgresql" else ("BROKERS", "SASL_USER", "SASL_PASSWORD")
    for suffix in keys:
        if env.get(prefix + suffix):
            inner[suffix.lower()] = env[prefix + suffix]
    if inner or isinstance(inner_raw, dict):
        out[str(ctype)] = inner
    return out


def _build_consumer(raw: Mapping[str, object], path: str, warnings: list[str]) -> ConsumerConfig:
    known = {"name", "type", "disabled", "enabled", "postgresql", "kafka"}
    for key in raw:
        if key not in known:
            warnings.append(f'unknown key "{key}" found in {path}')
    name = _to_str(f"{path}.name", raw.get("name", ""))
    disabled = _to_bool(f"{path}.disabled", raw.get("disabled", False))
    if "enabled" in raw:
        quirk = _to_bool(f"{path}.enabled", raw["enabled"])
        warnings.append(
            f'{path}.enabled: read as "disabled" (Centrifugo v5.2 quirk: "enabled": true '
            f'disables consumer "{name}"); use "disabled" instead'
        )
        disabled = disabled or quirk
    pg = kafka = None
    if "postgresql" in raw:
        pg_raw = _as_object(f"{path}.postgresql", raw["postgresql"])
        pg = PostgresConsumerConfig(
            **_object_kwargs(
                PostgresConsumerConfig, pg_raw, f"{path}.postgresql", warnings, nested=True
            )
        )
    if "kafka" in raw:
        k_raw = dict(_as_object(f"{path}.kafka", raw["kafka"]))
        if "server_name" in k_raw:  # documented alias of tls_server_name
            k_raw.setdefault("tls_server_name", k_raw.pop("server_name"))
        kafka = KafkaConsumerConfig(
            **_object_kwargs(KafkaConsumerConfig, k_raw, f"{path}.kafka", warnings, nested=True)
        )
    ctype = _to_str(f"{path}.type", raw.get("type", ""))
    return ConsumerConfig(name=name, type=ctype, disabled=disabled, postgresql=pg, kafka=kafka)


def _as_object(key: str, value: object) -> Mapping[str, object]:
    value = _json_value(key, value)
    if not isinstance(value, dict):
        raise ConfigError(key, f"must be an object, got {_type_name(value)}")
    return value


def _build_consumers(
    value: object, env: Mapping[str, str], warnings: list[str]
) -> tuple[ConsumerConfig, ...]:
    return tuple(
        _build_consumer(_consumer_env_overrides(raw, env), f"consumers[{i}]", warnings)
        for i, raw in enumerate(_as_objects("consumers", value))
    )


def _build_config(
    merged: Mapping[str, object], env: Mapping[str, str], warnings: list[str]
) -> Config:
    kwargs = _object_kwargs(Config, merged, "", warnings, nested=False)
    top = _object_kwargs(ChannelOptions, merged, "", warnings, nested=False)
    kwargs["channel_options"] = ChannelOptions(**top)
    kwargs["namespaces"] = _build_namespaces(merged.get("namespaces", []), "namespaces", warnings)
    kwargs["rpc_namespaces"] = _build_rpc_namespaces(merged.get("rpc_namespaces", []), warnings)
    kwargs["proxies"] = _build_proxies(merged.get("proxies", []), warnings)
    kwargs["consumers"] = _build_consumers(merged.get("consumers", []), env, warnings)
    return Config(**kwargs)


# --------------------------------------------------------------------------- sources


def _read_file(path: str, warnings: list[str]) -> dict[str, object]:
    """The file's top-level object; {} with a warning when it does not exist."""
    file = Path(path)
    if not file.is_file():
        warnings.append(f"config file not found: {path}")
        return {}
    text = file.read_text(encoding="utf-8")
    data = _parse_text(path, file.suffix.lower(), text)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(path, f"config root must be an object, got {_type_name(data)}")
    return {str(k): v for k, v in data.items()}


def _parse_text(path: str, suffix: str, text: str) -> object:
    if suffix in (".yaml", ".yml"):
        try:
            return yaml.safe_load(text)
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise ConfigError(path, f"invalid YAML{where}: {exc.problem}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(path, f"invalid YAML: {exc}") from None
    if suffix == ".toml":
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(path, f"invalid TOML: {exc}") from None
    try:
        return json.loads(text) if text.strip() else {}
    except json.JSONDecodeError as exc:
        raise ConfigError(
            path, f"invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"
        ) from None


def _env_layer(env: Mapping[str, str], warnings: list[str]) -> dict[str, object]:
    """Values of the CENTRIFUGO_<KEY> variables that are set and non-empty (still strings)."""
    known = _top_level_keys()
    out: dict[str, object] = {}
    for name, value in env.items():
        if not name.startswith("CENTRIFUGO_") or value == "":
            continue
        key = name[len("CENTRIFUGO_") :].lower()
        if key in known:
            out[key] = value
        elif not (_is_ignored(key) or _CONSUMER_ENV_RE.match(name)):
            warnings.append(f'unknown key "{name}" found in the environment')
    if "database_url" not in out and env.get("CENTRIPY_DATABASE_URL"):
        out["database_url"] = env["CENTRIPY_DATABASE_URL"]
    return out


def _unsupported_warnings(merged: Mapping[str, object]) -> list[str]:
    out = []
    for key in _UNSUPPORTED_FEATURES:
        value = merged.get(key)
        if value is True or (isinstance(value, str) and value.lower() in ("1", "t", "true")):
            out.append(f'"{key}" is not supported by centripy and is ignored')
    return out


def load_config(
    path: str | None, env: Mapping[str, str], overrides: Mapping[str, object]
) -> tuple[Config, list[str]]:
    """Build and validate the config: `overrides` (CLI) > `env` > the file at `path`.

    Returns the config and human-readable warnings (missing file, unknown keys, quirks).
    Raises ConfigError naming the offending key. Called from the main thread at start-up.
    """
    warnings: list[str] = []
    file_data = _read_file(path, warnings) if path else {}
    known = _top_level_keys()
    for key in file_data:
        if key not in known and not _is_ignored(key):
            warnings.append(f'unknown key "{key}" found in the configuration file')
    for key in overrides:
        if key not in known:
            raise ConfigError(key, "unknown option")
    merged: dict[str, object] = {**file_data, **_env_layer(env, warnings), **overrides}
    config = _build_config(merged, env, warnings)
    validate_config(config)
    warnings.extend(_unsupported_warnings(merged))
    if config.log_level.lower() not in _LOG_LEVELS:
        warnings.append(f'log_level: unknown level "{config.log_level}", using "info"')
    return config, warnings


# --------------------------------------------------------------------------- validation


def load_public_key(
    pem: str, kind: Literal["rsa", "ec"], key: str
) -> RSAPublicKey | EllipticCurvePublicKey:
    """Parse a PEM public key (or certificate) for token verification; ConfigError if bad."""
    data = pem.strip().encode()
    try:
        public = serialization.load_pem_public_key(data)
    except ValueError:
        try:
            public = x509.load_pem_x509_certificate(data).public_key()
        except ValueError:
            raise ConfigError(key, "not a valid PEM public key or certificate") from None
    expected = RSAPublicKey if kind == "rsa" else EllipticCurvePublicKey
    if not isinstance(public, expected):
        raise ConfigError(key, f"not an {kind.upper()} public key")
    return public


def validate_channel_options(opts: ChannelOptions, prefix: str) -> None:
    """Centrifugo's `ValidateChannelOptions`; `prefix` is "" or "namespaces[i]."."""
    if opts.history_size < 0:
        raise ConfigError(f"{prefix}history_size", "must not be negative")
    if (opts.history_size != 0) != (opts.history_ttl != 0):
        raise ConfigError(
            f"{prefix}history_size", "both history size and history ttl required for history"
        )
    if opts.force_recovery and not opts.history_enabled:
        raise ConfigError(
            f"{prefix}force_recovery", "recovery requires history_size and history_ttl"
        )
    if opts.channel_regex:
        try:
            re.compile(opts.channel_regex)
        except re.error as exc:
            raise ConfigError(
                f"{prefix}channel_regex", f"invalid regular expression: {exc}"
            ) from None
    stream = opts.proxy_subscribe_stream or opts.subscribe_stream_proxy_name
    others = (
        opts.proxy_subscribe
        or opts.proxy_publish
        or opts.proxy_sub_refresh
        or opts.subscribe_proxy_name
        or opts.publish_proxy_name
        or opts.sub_refresh_proxy_name
    )
    if stream and others:
        raise ConfigError(
            f"{prefix}proxy_subscribe_stream",
            "a subscribe stream proxy can not be combined with subscribe, publish or "
            "sub_refresh proxies",
        )


def _check_names(items: list[str], key: str, pattern: re.Pattern[str]) -> None:
    seen: set[str] = set()
    for i, name in enumerate(items):
        if not pattern.match(name):
            raise ConfigError(
                f"{key}[{i}].name", f'invalid name "{name}": must match {pattern.pattern}'
            )
        if name in seen:
            raise ConfigError(f"{key}[{i}].name", f'duplicate name "{name}"')
        seen.add(name)


def _validate_core(c: Config) -> None:
    if c.engine not in _ENGINES:
        raise ConfigError(
            "engine", f'unknown engine "{c.engine}": use one of {", ".join(_ENGINES)}'
        )
    if c.broker not in _BROKERS:
        raise ConfigError("broker", f'unknown broker "{c.broker}": only "nats" is allowed')
    if c.api_error_mode not in ("", "transport"):
        raise ConfigError("api_error_mode", f'unknown mode "{c.api_error_mode}": use "transport"')
    if c.ping_interval <= c.pong_timeout:
        raise ConfigError("ping_interval", "must be greater than pong_timeout")
    for key in ("port", "internal_port"):
        if not 0 <= getattr(c, key) <= 65535:
            raise ConfigError(key, "must be a port number between 0 and 65535")
    for key, kind in _kinds(Config).items():
        if kind == "int" and getattr(c, key) < 0:
            raise ConfigError(key, "must not be negative")
    if c.engine != "memory" and not c.database_url.startswith(("postgresql", "postgres")):
        raise ConfigError(
            "database_url",
            f'engine "{c.engine}" runs several nodes, which must share one event log: '
            "point database_url at PostgreSQL (a SQLite file is local to one node)",
        )
    for key in ("http_read_header_timeout", "http_read_timeout", "http_idle_timeout"):
        if getattr(c, key) <= 0:
            raise ConfigError(key, "must be a positive duration")
    if c.api_max_request_body_size <= 0:
        raise ConfigError("api_max_request_body_size", "must be a positive number of bytes")
    if c.tls and not ((c.tls_cert or c.tls_cert_pem) and (c.tls_key or c.tls_key_pem)):
        key = "tls_cert" if not (c.tls_cert or c.tls_cert_pem) else "tls_key"
        raise ConfigError(
            key, "tls is on: set tls_cert and tls_key (or tls_cert_pem and tls_key_pem)"
        )


def _validate_tokens(c: Config) -> None:
    for prefix in ("token_", "subscription_token_"):
        for suffix in ("audience_regex", "issuer_regex"):
            key = prefix + suffix
            try:
                re.compile(getattr(c, key))
            except re.error as exc:
                raise ConfigError(key, f"invalid regular expression: {exc}") from None
        if getattr(c, prefix + "rsa_public_key"):
            load_public_key(getattr(c, prefix + "rsa_public_key"), "rsa", prefix + "rsa_public_key")
        if getattr(c, prefix + "ecdsa_public_key"):
            load_public_key(
                getattr(c, prefix + "ecdsa_public_key"), "ec", prefix + "ecdsa_public_key"
            )


def _validate_namespaces(c: Config) -> None:
    validate_channel_options(c.channel_options, "")
    _check_names([ns.name for ns in c.namespaces], "namespaces", _NAMESPACE_RE)
    for i, ns in enumerate(c.namespaces):
        validate_channel_options(ns.options, f"namespaces[{i}].")
    _check_names([ns.name for ns in c.rpc_namespaces], "rpc_namespaces", _NAMESPACE_RE)
    personal = c.channel_options
    if c.user_subscribe_to_personal and c.user_personal_channel_namespace:
        found = c.namespace(c.user_personal_channel_namespace)
        if found is None:
            raise ConfigError(
                "user_personal_channel_namespace",
                f'namespace "{c.user_personal_channel_namespace}" for personal channels not found',
            )
        personal = found
    if c.user_personal_single_connection and not personal.presence:
        raise ConfigError(
            "user_personal_single_connection",
            "presence must be enabled in the personal channel namespace",
        )


def _validate_proxies(c: Config) -> None:
    _check_names([p.name for p in c.proxies], "proxies", _NAMESPACE_RE)
    for i, proxy in enumerate(c.proxies):
        if not proxy.endpoint:
            raise ConfigError(f"proxies[{i}].endpoint", f'proxy "{proxy.name}": endpoint required')
    if not c.granular_proxy_mode:
        return
    refs: list[tuple[str, str]] = [
        (key, getattr(c, key))
        for key in ("connect_proxy_name", "refresh_proxy_name", "rpc_proxy_name")
    ]
    refs += [
        (f"rpc_namespaces[{i}].rpc_proxy_name", r.rpc_proxy_name)
        for i, r in enumerate(c.rpc_namespaces)
    ]
    scopes = [("", c.channel_options)] + [
        (f"namespaces[{i}].", n.options) for i, n in enumerate(c.namespaces)
    ]
    for prefix, opts in scopes:
        for key in (
            "subscribe_proxy_name",
            "publish_proxy_name",
            "sub_refresh_proxy_name",
            "subscribe_stream_proxy_name",
        ):
            refs.append((prefix + key, getattr(opts, key)))
    for key, name in refs:
        if name and c.proxy(name) is None:
            raise ConfigError(key, f'proxy "{name}" not found in proxies')


def _validate_consumer(consumer: ConsumerConfig, path: str) -> None:
    if consumer.type not in ("postgresql", "kafka"):
        raise ConfigError(
            f"{path}.type", f'unknown consumer type "{consumer.type}": use postgresql or kafka'
        )
    if consumer.disabled:
        return
    if consumer.type == "postgresql":
        pg = consumer.postgresql
        if pg is None:
            raise ConfigError(f"{path}.postgresql", "required for a postgresql consumer")
        _require(path + ".postgresql", pg, ("dsn", "outbox_table_name"))
        _positive(path + ".postgresql", pg, ("num_partitions", "partition_select_limit"))
        return
    kafka = consumer.kafka
    if kafka is None:
        raise ConfigError(f"{path}.kafka", "required for a kafka consumer")
    _require(path + ".kafka", kafka, ("brokers", "topics", "consumer_group"))
    _positive(path + ".kafka", kafka, ("max_poll_records",))
    if kafka.sasl_mechanism not in ("", "plain"):
        raise ConfigError(
            f"{path}.kafka.sasl_mechanism", f'unsupported "{kafka.sasl_mechanism}": only "plain"'
        )


def _require(path: str, obj: object, keys: tuple[str, ...]) -> None:
    for key in keys:
        if not getattr(obj, key):
            raise ConfigError(f"{path}.{key}", "required")


def _positive(path: str, obj: object, keys: tuple[str, ...]) -> None:
    for key in keys:
        if getattr(obj, key) < 1:
            raise ConfigError(f"{path}.{key}", "must be at least 1")


def validate_config(config: Config) -> None:
    """Centrifugo's start-up validation (docs/spec/server_api.md 2.3 and 3); raises ConfigError."""
    _validate_core(config)
    _validate_tokens(config)
    _validate_namespaces(config)
    _validate_proxies(config)
    _check_names([c.name for c in config.consumers], "consumers", _CONSUMER_RE)
    for i, consumer in enumerate(config.consumers):
        _validate_consumer(consumer, f"consumers[{i}]")
