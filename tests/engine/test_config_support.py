"""No silent key: every Centrifugo key centripy parses either has its effect (the server reads
it) or is named by `serve`/`checkconfig` as not supported, or the config is refused when
running without it would be unsafe (issue 17, point 4)."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from centripy.engine.config import Config, ConfigError
from centripy.engine.config_check import UNSUPPORTED
from centripy.engine.config_load import load_config

ROOT = Path(__file__).resolve().parents[2]
# Read through methods or by name prefix rather than as `.field`.
READ_INDIRECTLY = {
    "namespaces": "Config.namespace()",
    "channel_options": "Config.namespace()",
    "_namespace_index": "Config.namespace()",
}
TOKEN_SETTINGS = re.compile(r"^(subscription_)?token_")  # engine/auth.py reads prefix + name


def _server_source() -> str:
    parts = []
    for folder in ("engine", "actors", "transports", "storage", "centripy"):
        for path in (ROOT / folder).rglob("*.py"):
            if path.parent.name == "engine" and path.name.startswith("config"):
                continue  # the config's own modules parse and validate every key
            parts.append(path.read_text())
    return "\n".join(parts)


def _read_by_server(name: str, source: str) -> bool:
    if name in READ_INDIRECTLY or TOKEN_SETTINGS.match(name):
        return True
    # an attribute read, not a method call of the same name (log.debug)
    return re.search(rf"\.{re.escape(name)}\b(?!\s*\()", source) is not None


def test_every_key_is_read_by_the_server_or_listed_as_not_supported() -> None:
    source = _server_source()
    silent = [
        f.name
        for f in dataclasses.fields(Config)
        if not _read_by_server(f.name, source) and f.name not in UNSUPPORTED
    ]
    assert silent == [], "keys parsed but neither used nor reported as not supported"
    stale = [key for key in UNSUPPORTED if _read_by_server(key, source)]
    assert stale == [], "keys listed as not supported that the server reads"
    fields = {f.name for f in dataclasses.fields(Config)}
    assert set(UNSUPPORTED) <= fields


def test_serve_and_checkconfig_name_each_unsupported_key(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(
        '{"proxy_subscribe_stream_endpoint": "http://127.0.0.1:9/s", "redis_use_lists": true,'
        ' "grpc_api": true, "redis_sentinel_client_name": "x",'
        ' "usage_stats_disable": true, "api_key": "k"}'
    )
    env = {"CENTRIFUGO_WEBSOCKET_READ_BUFFER_SIZE": "8192"}
    _, warnings = load_config(str(path), env, {})
    named = [w for w in warnings if w.startswith("not supported by centripy")]
    for key in ("proxy_subscribe_stream_endpoint", "redis_use_lists", "grpc_api",
                "redis_sentinel_client_name", "websocket_read_buffer_size"):  # fmt: skip
        assert any(f'"{key}"' in w for w in named), (key, warnings)
    assert not any("usage_stats" in w for w in warnings)
    assert not any('"api_key"' in w for w in warnings)


@pytest.mark.parametrize(
    ("config", "key"),
    [
        ('{"broker": "nats"}', "database_url"),
        (
            '{"engine": "redis", "redis_sentinel_address": "127.0.0.1:26379"}',
            "redis_sentinel_master_name",
        ),
        (
            '{"engine": "redis", "redis_cluster_address": ["h:7000,k:7000", "j:7000"]}',
            "redis_cluster_address",
        ),
    ],
)
def test_unsafe_to_ignore_keys_refuse_the_config(tmp_path: Path, config: str, key: str) -> None:
    path = tmp_path / "config.json"
    path.write_text(config)
    with pytest.raises(ConfigError) as info:
        load_config(str(path), {}, {})
    assert info.value.key == key
