"""The typed configuration (docs/spec/server_api.md 3): one frozen `Config` holding every
Centrifugo v5 key centripy reads, the small typed objects inside it (consumers, proxies, RPC
namespaces) and `ConfigError`. Field names are Centrifugo's keys; durations are float seconds.

`load_config` (engine/config_load.py) builds a `Config` from the config file, the environment
and CLI overrides; `validate_config` (engine/config_check.py) checks it. Both raise
`ConfigError` naming the offending key.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from functools import cache

from centripy.engine.options import ChannelOptions, Namespace

__all__ = [
    "Config",
    "ConfigError",
    "ConsumerConfig",
    "KafkaConsumerConfig",
    "PostgresConsumerConfig",
    "ProxyConfig",
    "RpcNamespace",
    "field_kinds",
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
    log_format: str = "text"  # centripy: "text" or "json" (one JSON object per line)
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
    redis_tls: bool = False
    redis_tls_cert: str = ""
    redis_tls_key: str = ""
    redis_tls_cert_pem: str = ""
    redis_tls_key_pem: str = ""
    redis_tls_root_ca: str = ""
    redis_tls_root_ca_pem: str = ""
    redis_tls_server_name: str = ""
    redis_tls_insecure_skip_verify: bool = False
    redis_sentinel_address: tuple[str, ...] = ()  # set: the master comes from these sentinels
    redis_sentinel_master_name: str = ""
    redis_sentinel_user: str = ""
    redis_sentinel_password: str = ""
    redis_sentinel_tls: bool = False
    redis_sentinel_tls_cert: str = ""
    redis_sentinel_tls_key: str = ""
    redis_sentinel_tls_cert_pem: str = ""
    redis_sentinel_tls_key_pem: str = ""
    redis_sentinel_tls_root_ca: str = ""
    redis_sentinel_tls_root_ca_pem: str = ""
    redis_sentinel_tls_server_name: str = ""
    redis_sentinel_tls_insecure_skip_verify: bool = False
    redis_cluster_address: tuple[str, ...] = ()  # set: a Redis Cluster (sharded PUB/SUB)
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


# --------------------------------------------------------------------------- field kinds

_TYPE_KINDS = {
    "bool": "bool",
    "int": "int",
    "str": "str",
    "float": "duration",
    "tuple[str, ...]": "list",
    "Mapping[str, str]": "map",
}


@cache
def field_kinds(cls: type) -> Mapping[str, str]:
    """The fields of config dataclass `cls` that hold a scalar value, by kind: "bool", "int",
    "str", "duration" (float seconds), "list" (strings) or "map"; the loader converts values
    by it and the validator checks the ints."""
    return {f.name: _TYPE_KINDS[str(f.type)] for f in fields(cls) if str(f.type) in _TYPE_KINDS}
