"""Config loading, precedence, parsing and validation (docs/spec/server_api.md 2.2-2.3, 3, 4)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import given
from hypothesis import strategies as st

from centripy.engine.config import Config, ConfigError
from centripy.engine.config_load import load_config, parse_go_bool, parse_go_duration
from centripy.engine.options import ChannelOptions

ROOT = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, data: dict[str, Any], name: str = "config.json") -> str:
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return str(path)


def load(
    tmp_path: Path,
    data: dict[str, Any],
    env: dict[str, str] | None = None,
    overrides: dict[str, object] | None = None,
) -> tuple[Config, list[str]]:
    return load_config(write(tmp_path, data), env or {}, overrides or {})


def error_of(
    tmp_path: Path, data: dict[str, Any], env: dict[str, str] | None = None
) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, data, env)
    return info.value


def public_pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


# --------------------------------------------------------------------------- sources


def test_defaults_and_missing_file_warning(tmp_path: Path) -> None:
    config, warnings = load_config(str(tmp_path / "nope.json"), {}, {})
    assert any("config file not found" in w for w in warnings)
    assert config.port == 8000
    assert config.engine == "memory"
    assert config.ping_interval == 25.0 and config.pong_timeout == 8.0
    assert config.client_channel_limit == 128
    assert config.client_queue_max_size == 1048576
    assert config.global_history_meta_ttl == 720 * 3600
    assert config.redis_address == ("redis://127.0.0.1:6379",)
    assert config.database_url == "sqlite+aiosqlite:///centripy.db"
    assert config.idempotent_result_ttl == 300.0
    assert config.channel_options == ChannelOptions()
    assert config.namespaces == () and config.consumers == ()


def test_json_file_values(tmp_path: Path) -> None:
    config, warnings = load(
        tmp_path,
        {"port": "9001", "api_key": "k", "presence": True, "allowed_origins": ["http://a"]},
    )
    assert warnings == []
    assert config.port == 9001
    assert config.api_key == "k"
    assert config.channel_options.presence is True
    assert config.allowed_origins == ("http://a",)


def test_yaml_and_toml_files(tmp_path: Path) -> None:
    yml = tmp_path / "c.yaml"
    yml.write_text(
        "port: 9100\nping_interval: 30s\nnamespaces:\n  - name: chat\n    presence: true\n"
    )
    config, _ = load_config(str(yml), {}, {})
    assert config.port == 9100 and config.ping_interval == 30.0
    assert config.namespace("chat") == ChannelOptions(presence=True)
    toml = tmp_path / "c.toml"
    toml.write_text(
        'port = 9200\n[[namespaces]]\nname = "news"\nhistory_size = 5\nhistory_ttl = "60s"\n'
    )
    config, _ = load_config(str(toml), {}, {})
    assert config.port == 9200
    ns = config.namespace("news")
    assert ns is not None and ns.history_size == 5 and ns.history_ttl == 60.0


def test_json_parse_error_has_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('{\n  "port": 8000,\n  "api_key" "x"\n}')
    with pytest.raises(ConfigError, match=r"line 3, column 13") as info:
        load_config(str(path), {}, {})
    assert info.value.key == str(path)


def test_yaml_parse_error_and_non_object_root(tmp_path: Path) -> None:
    path = tmp_path / "bad.yml"
    path.write_text("a: [\n")
    with pytest.raises(ConfigError, match="invalid YAML at line"):
        load_config(str(path), {}, {})
    path = tmp_path / "list.json"
    path.write_text("[1]")
    with pytest.raises(ConfigError, match="root must be an object"):
        load_config(str(path), {}, {})


def test_precedence_cli_over_env_over_file(tmp_path: Path) -> None:
    data = {"port": 1000, "api_key": "file", "log_level": "debug"}
    env = {"CENTRIFUGO_PORT": "2000", "CENTRIFUGO_API_KEY": "env"}
    config, _ = load(tmp_path, data, env, {"port": 3000})
    assert (config.port, config.api_key, config.log_level) == (3000, "env", "debug")


def test_env_parsing(tmp_path: Path) -> None:
    env = {
        "CENTRIFUGO_CLIENT_INSECURE": "T",
        "CENTRIFUGO_HEALTH": "1",
        "CENTRIFUGO_ALLOWED_ORIGINS": "https://a https://b",
        "CENTRIFUGO_PING_INTERVAL": "1h30m",
        "CENTRIFUGO_NAMESPACES": '[{"name":"ns1","presence":true}]',
        "CENTRIFUGO_PROXY_STATIC_HTTP_HEADERS": '{"X-A":"1"}',
        "CENTRIFUGO_API_KEY": "",  # empty = unset
        "CENTRIFUGO_PRESENCE": "false",
    }
    config, warnings = load(tmp_path, {"api_key": "from-file", "presence": True}, env)
    assert [w for w in warnings if not w.startswith("not supported by centripy")] == []
    assert not any('"proxy_static_http_headers"' in w for w in warnings)  # proxies read it
    assert config.client_insecure is True and config.health is True
    assert config.allowed_origins == ("https://a", "https://b")
    assert config.ping_interval == 5400.0
    assert config.namespace("ns1") == ChannelOptions(presence=True)
    assert config.proxy_static_http_headers == {"X-A": "1"}
    assert config.api_key == "from-file"
    assert config.channel_options.presence is False


def test_env_bad_values_name_the_key(tmp_path: Path) -> None:
    assert error_of(tmp_path, {}, {"CENTRIFUGO_ADMIN": "yes"}).key == "admin"
    assert error_of(tmp_path, {}, {"CENTRIFUGO_PORT": "80a"}).key == "port"
    assert error_of(tmp_path, {}, {"CENTRIFUGO_NAMESPACES": "[{"}).key == "namespaces"


def test_database_url_env_names(tmp_path: Path) -> None:
    config, _ = load(tmp_path, {}, {"CENTRIPY_DATABASE_URL": "sqlite+aiosqlite:///x.db"})
    assert config.database_url == "sqlite+aiosqlite:///x.db"
    both = {"CENTRIPY_DATABASE_URL": "a://x", "CENTRIFUGO_DATABASE_URL": "b://y"}
    config, _ = load(tmp_path, {}, both)
    assert config.database_url == "b://y"


def test_redis_address_string_or_list(tmp_path: Path) -> None:
    config, _ = load(tmp_path, {"redis_address": "redis://h:1"})
    assert config.redis_address == ("redis://h:1",)
    config, _ = load(tmp_path, {"redis_address": ["redis://a:1", "redis://b:2"]})
    assert config.redis_address == ("redis://a:1", "redis://b:2")


def test_unknown_keys_warn(tmp_path: Path) -> None:
    data = {
        "foo": 1,
        "grpc_api_port": 10000,
        "namespaces": [{"name": "chat", "bar": True}],
        "proxies": [{"name": "p1", "endpoint": "http://x", "baz": 1}],
        "consumers": [
            {
                "name": "c1",
                "type": "kafka",
                "disabled": True,
                "qux": 1,
                "kafka": {"zz": 1, "brokers": ["b"]},
            }
        ],
    }
    _, warnings = load(tmp_path, data, {"CENTRIFUGO_NOPE": "1"})
    text = "\n".join(warnings)
    for name in ("foo", "bar", "baz", "qux", "zz", "CENTRIFUGO_NOPE"):
        assert f'"{name}"' in text
    assert 'unknown key "grpc_api_port"' not in text  # a valid Centrifugo key...
    assert 'not supported by centripy: "grpc_api_port"' in text  # ...that centripy names


def test_unsupported_feature_warning(tmp_path: Path) -> None:
    _, warnings = load(tmp_path, {"grpc_api": True})
    assert any(w.startswith('not supported by centripy: "grpc_api"') for w in warnings)


def test_unknown_override_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, {}, overrides={"not_a_key": 1})
    assert info.value.key == "not_a_key"


# --------------------------------------------------------------------------- types


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"port": True}, "port"),
        ({"presence": "yes"}, "presence"),
        ({"api_key": 5}, "api_key"),
        ({"allowed_origins": [1]}, "allowed_origins[0]"),
        ({"namespaces": {"name": "x"}}, "namespaces"),
        ({"namespaces": ["x"]}, "namespaces[0]"),
        ({"namespaces": [{"name": "chat", "history_size": "many"}]}, "namespaces[0].history_size"),
        ({"proxy_static_http_headers": {"a": 1}}, "proxy_static_http_headers.a"),
        ({"client_channel_limit": -1}, "client_channel_limit"),
        ({"port": 70000}, "port"),
    ],
)
def test_wrong_types_name_the_key(tmp_path: Path, data: dict[str, Any], key: str) -> None:
    assert error_of(tmp_path, data).key == key


def test_top_level_durations(tmp_path: Path) -> None:
    config, _ = load(tmp_path, {"client_stale_close_delay": "300ms", "shutdown_timeout": 0})
    assert config.client_stale_close_delay == 0.3 and config.shutdown_timeout == 0.0
    err = error_of(tmp_path, {"ping_interval": 25})
    assert err.key == "ping_interval" and "missing unit" in str(err)
    assert error_of(tmp_path, {"pong_timeout": "5 seconds"}).key == "pong_timeout"
    assert error_of(tmp_path, {"pong_timeout": "1us"}).key == "pong_timeout"
    assert error_of(tmp_path, {"pong_timeout": "-1s"}).key == "pong_timeout"
    err = error_of(tmp_path, {"history_size": 1, "history_ttl": "1500ms"})
    assert err.key == "history_ttl" and "sub-second" in str(err)


def test_nested_durations_numbers_are_nanoseconds(tmp_path: Path) -> None:
    data = {"namespaces": [{"name": "chat", "history_size": 10, "history_ttl": 300_000_000_000}]}
    config, _ = load(tmp_path, data)
    ns = config.namespace("chat")
    assert ns is not None and ns.history_ttl == 300.0
    data["namespaces"][0]["history_ttl"] = 300
    err = error_of(tmp_path, data)
    assert err.key == "namespaces[0].history_ttl" and "nanoseconds" in str(err)


def test_go_duration_parser() -> None:
    assert parse_go_duration("0") == 0
    assert parse_go_duration("1h30m") == 5400 * 10**9
    assert parse_go_duration("1.5s") == 1_500_000_000
    assert parse_go_duration("2us") == parse_go_duration("2µs") == 2000
    assert parse_go_duration("-3m") == -180 * 10**9
    for bad in ("", "5", "1d", "s", ".s", "1h5"):
        with pytest.raises(ValueError):
            parse_go_duration(bad)


@given(
    h=st.integers(0, 1000),
    m=st.integers(0, 59),
    s=st.integers(0, 59),
    ms=st.integers(0, 999),
)
def test_go_duration_components_add_up(h: int, m: int, s: int, ms: int) -> None:
    text = f"{h}h{m}m{s}s{ms}ms"
    expected = ((h * 3600 + m * 60 + s) * 1000 + ms) * 1_000_000
    assert parse_go_duration(text) == expected


def test_go_bool_parser() -> None:
    for text in ("1", "t", "T", "TRUE", "true", "True"):
        assert parse_go_bool(text) is True
    for text in ("0", "f", "F", "FALSE", "false", "False"):
        assert parse_go_bool(text) is False
    with pytest.raises(ValueError):
        parse_go_bool("yes")


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"history_size": 10}, "history_size"),
        ({"history_ttl": "10s"}, "history_size"),
        ({"force_recovery": True}, "force_recovery"),
        ({"channel_regex": "("}, "channel_regex"),
        ({"namespaces": [{"name": "a"}]}, "namespaces[0].name"),
        ({"namespaces": [{"name": "a:b"}]}, "namespaces[0].name"),
        ({"namespaces": [{"name": "ab"}, {"name": "ab"}]}, "namespaces[1].name"),
        ({"namespaces": [{"name": "ab", "history_size": 3}]}, "namespaces[0].history_size"),
        ({"rpc_namespaces": [{"name": "x"}]}, "rpc_namespaces[0].name"),
        (
            {"user_subscribe_to_personal": True, "user_personal_channel_namespace": "missing"},
            "user_personal_channel_namespace",
        ),
        ({"user_personal_single_connection": True}, "user_personal_single_connection"),
        ({"ping_interval": "5s", "pong_timeout": "5s"}, "ping_interval"),
        ({"api_error_mode": "http"}, "api_error_mode"),
        ({"tls": True, "tls_cert": "c.pem"}, "tls_key"),
        ({"tls": True}, "tls_cert"),
        ({"engine": "tarantool"}, "engine"),
        ({"broker": "kafka"}, "broker"),
        ({"token_audience_regex": "["}, "token_audience_regex"),
        ({"token_rsa_public_key": "not a pem"}, "token_rsa_public_key"),
        ({"proxy_subscribe_stream": True, "proxy_subscribe": True}, "proxy_subscribe_stream"),
        ({"proxies": [{"name": "p1"}]}, "proxies[0].endpoint"),
        ({"granular_proxy_mode": True, "connect_proxy_name": "nope"}, "connect_proxy_name"),
        (
            {
                "granular_proxy_mode": True,
                "namespaces": [{"name": "ns", "publish_proxy_name": "x"}],
            },
            "namespaces[0].publish_proxy_name",
        ),
    ],
)
def test_validation_errors_name_the_key(tmp_path: Path, data: dict[str, Any], key: str) -> None:
    err = error_of(tmp_path, data)
    assert err.key == key
    assert str(err).startswith(f'config error: "{key}": ')


def test_ping_interval_message(tmp_path: Path) -> None:
    err = error_of(tmp_path, {"ping_interval": "5s", "pong_timeout": "8s"})
    assert str(err) == 'config error: "ping_interval": must be greater than pong_timeout'


def test_valid_combinations(tmp_path: Path) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    data = {
        "tls": True,
        "tls_cert_pem": "cert",
        "tls_key_pem": "key",
        "token_rsa_public_key": public_pem(key),
        "token_ecdsa_public_key": public_pem(ec_key),
        "user_subscribe_to_personal": True,
        "user_personal_single_connection": True,
        "user_personal_channel_namespace": "personal",
        "granular_proxy_mode": True,
        "proxies": [{"name": "p1", "endpoint": "http://x", "timeout": "2s"}],
        "connect_proxy_name": "p1",
        "namespaces": [{"name": "personal", "presence": True, "subscribe_proxy_name": "p1"}],
        "rpc_namespaces": [{"name": "rpc", "rpc_proxy_name": "p1"}],
    }
    config, _ = load(tmp_path, data)
    proxy = config.proxy("p1")
    assert proxy is not None and proxy.timeout == 2.0
    assert config.rpc_namespaces[0].rpc_proxy_name == "p1"


def test_wrong_key_kind_for_pem(tmp_path: Path) -> None:
    ec_key = ec.generate_private_key(ec.SECP256R1())
    err = error_of(tmp_path, {"token_rsa_public_key": public_pem(ec_key)})
    assert err.key == "token_rsa_public_key" and "RSA" in str(err)


def test_namespace_lookup(tmp_path: Path) -> None:
    config, _ = load(
        tmp_path, {"presence": True, "namespaces": [{"name": "chat", "join_leave": True}]}
    )
    assert config.namespace("") == ChannelOptions(presence=True)
    assert config.namespace("chat") == ChannelOptions(join_leave=True)
    assert config.namespace("other") is None
    assert Config().namespace("") == ChannelOptions()


# --------------------------------------------------------------------------- consumers

PG = {"dsn": "postgresql://u@h/db", "outbox_table_name": "outbox"}
KAFKA = {"brokers": ["k:9092"], "topics": ["t"], "consumer_group": "g"}


def test_consumers_parse_with_defaults(tmp_path: Path) -> None:
    data = {
        "consumers": [
            {"name": "pg_outbox", "type": "postgresql", "postgresql": PG},
            {
                "name": "kafka_in",
                "type": "kafka",
                "kafka": {**KAFKA, "tls": True, "sasl_mechanism": "plain"},
            },
        ]
    }
    config, warnings = load(tmp_path, data)
    assert warnings == []
    pg, kafka = config.consumers
    assert pg.postgresql is not None and pg.kafka is None and not pg.disabled
    assert pg.postgresql.num_partitions == 1
    assert pg.postgresql.partition_select_limit == 100
    assert pg.postgresql.partition_poll_interval == 0.3
    assert pg.postgresql.partition_notification_channel == ""
    assert kafka.kafka is not None
    assert kafka.kafka.brokers == ("k:9092",) and kafka.kafka.max_poll_records == 100
    assert kafka.kafka.tls is True and kafka.kafka.sasl_mechanism == "plain"


def test_consumer_disabled_and_enabled_quirk(tmp_path: Path) -> None:
    data = {
        "consumers": [
            {"name": "off", "type": "postgresql", "disabled": True},
            {"name": "quirk", "type": "kafka", "enabled": True},
            {"name": "on", "type": "kafka", "enabled": False, "kafka": KAFKA},
        ]
    }
    config, warnings = load(tmp_path, data)
    assert [c.disabled for c in config.consumers] == [True, True, False]
    assert sum('"enabled"' in w or ".enabled" in w for w in warnings) == 2


@pytest.mark.parametrize(
    ("consumer", "key"),
    [
        ({"name": "x", "type": "kafka", "kafka": KAFKA}, "consumers[0].name"),
        ({"name": "bad-name", "type": "kafka", "kafka": KAFKA}, "consumers[0].name"),
        ({"name": "c1", "type": "redis"}, "consumers[0].type"),
        ({"name": "c1", "type": "postgresql"}, "consumers[0].postgresql"),
        (
            {"name": "c1", "type": "postgresql", "postgresql": {"dsn": "x"}},
            "consumers[0].postgresql.outbox_table_name",
        ),
        (
            {"name": "c1", "type": "kafka", "kafka": {**KAFKA, "topics": []}},
            "consumers[0].kafka.topics",
        ),
        (
            {"name": "c1", "type": "kafka", "kafka": {**KAFKA, "sasl_mechanism": "scram"}},
            "consumers[0].kafka.sasl_mechanism",
        ),
        (
            {"name": "c1", "type": "postgresql", "postgresql": {**PG, "num_partitions": 0}},
            "consumers[0].postgresql.num_partitions",
        ),
        (
            {
                "name": "c1",
                "type": "postgresql",
                "postgresql": {**PG, "partition_poll_interval": "x"},
            },
            "consumers[0].postgresql.partition_poll_interval",
        ),
    ],
)
def test_consumer_errors(tmp_path: Path, consumer: dict[str, Any], key: str) -> None:
    assert error_of(tmp_path, {"consumers": [consumer]}).key == key


def test_duplicate_consumer_names(tmp_path: Path) -> None:
    data = {"consumers": [{"name": "c1", "type": "kafka", "kafka": KAFKA}] * 2}
    assert error_of(tmp_path, data).key == "consumers[1].name"


def test_consumer_env_overrides(tmp_path: Path) -> None:
    data = {
        "consumers": [
            {"name": "pg_outbox", "type": "postgresql", "postgresql": {"outbox_table_name": "o"}},
            {"name": "kin", "type": "kafka", "kafka": {"topics": ["t"], "consumer_group": "g"}},
        ]
    }
    env = {
        "CENTRIFUGO_CONSUMERS_POSTGRESQL_PG_OUTBOX_DSN": "postgresql://env/db",
        "CENTRIFUGO_CONSUMERS_KAFKA_KIN_BROKERS": "a:1 b:2",
        "CENTRIFUGO_CONSUMERS_KAFKA_KIN_SASL_USER": "u",
        "CENTRIFUGO_CONSUMERS_KAFKA_KIN_SASL_PASSWORD": "p",
    }
    config, warnings = load(tmp_path, data, env)
    assert warnings == []
    pg, kafka = config.consumers
    assert pg.postgresql is not None and pg.postgresql.dsn == "postgresql://env/db"
    assert kafka.kafka is not None
    assert kafka.kafka.brokers == ("a:1", "b:2")
    assert (kafka.kafka.sasl_user, kafka.kafka.sasl_password) == ("u", "p")


def test_consumers_from_env_json(tmp_path: Path) -> None:
    env = {"CENTRIFUGO_CONSUMERS": json.dumps([{"name": "c1", "type": "kafka", "kafka": KAFKA}])}
    config, _ = load(tmp_path, {}, env)
    assert config.consumers[0].name == "c1"


def test_example_config_is_valid() -> None:
    config, warnings = load_config(str(ROOT / "examples" / "config.json"), {}, {})
    assert warnings == []
    chat = config.namespace("chat")
    assert chat is not None and chat.history_enabled and chat.force_recovery
    assert config.allow_anonymous_connect_without_token and config.api_key == "demo-api-key"


def test_several_nodes_on_a_sqlite_log_are_refused() -> None:
    from centripy.engine.config import ConfigError
    from centripy.engine.config_load import load_config

    with pytest.raises(ConfigError) as err:
        load_config(None, {}, {"engine": "redis"})
    assert err.value.key == "database_url" and "PostgreSQL" in str(err.value)
    config, _ = load_config(
        None, {}, {"engine": "redis", "database_url": "postgresql://postgres@127.0.0.1/test"}
    )
    assert config.engine == "redis"
