"""The configuration reference, generated from the config definitions so it cannot drift:
every key of `Config`, of the channel options (top level and per namespace), of a granular
proxy, an RPC namespace and a consumer, with its kind, default and what centripy does with it:

* works    - the key has its effect (as in Centrifugo v5, or as a centripy extension);
* warned   - parsed, has no effect; `serve` and `checkconfig` name it when it is set
             (engine/config_check.py UNSUPPORTED and the feature prefixes of config_load);
* refused  - a config setting it is refused (running without it would be unsafe).

`python -m centripy.config_reference > docs/reference/configuration.md` writes the page;
tests/centripy/test_config_reference.py fails when the committed page is out of date.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import MISSING, fields
from typing import Any

from centripy.engine.config import (
    Config,
    ConsumerConfig,
    KafkaConsumerConfig,
    PostgresConsumerConfig,
    ProxyConfig,
    RpcNamespace,
    field_kinds,
)
from centripy.engine.config_check import UNSUPPORTED
from centripy.engine.config_load import IGNORED_KEYS, IGNORED_PREFIXES, REFUSED
from centripy.engine.options import ChannelOptions, Namespace

# Keys Centrifugo v5 does not have: centripy's own.
EXTENSIONS: dict[str, str] = {
    "database_url": "the SQL event log (SQLite file by default, PostgreSQL in production)",
    "idempotent_result_ttl": "how long an idempotency_key's result is kept",
    "reuse_port": "SO_REUSEPORT, so several processes share a port",
    "postgresql_prefix": "engine postgresql: the prefix of its channels and tables",
    "log_format": '"text" or "json" (one JSON object per line)',
    "client_max_commands_per_frame": "commands of one frame beyond this get error 111",
    "client_max_pending_frames": "a transport stops reading a connection this far behind",
    "http_read_header_timeout": "a request head must arrive within this",
    "http_read_timeout": "a request body must arrive within this",
    "http_idle_timeout": "a keep-alive connection may wait this long for a request",
    "api_max_request_body_size": "larger API bodies get 413 before being read",
    "api_max_publication_size": "larger publication data gets error 107 (0: no limit)",
}

# Keys of list items that are parsed without effect (named by load_config when set).
NESTED_WARNED: dict[str, str] = {
    "RpcNamespace.proxy_rpc": "rpc namespaces route by rpc_proxy_name (granular mode)",
}

_KIND_NAMES = {"duration": "duration", "list": "list of strings", "map": "map"}


def _default(cls: type, name: str) -> Any:
    for f in fields(cls):
        if f.name == name:
            if f.default is not MISSING:
                return f.default
            if f.default_factory is not MISSING:
                return f.default_factory()
    return None


def _show(value: Any, kind: str) -> str:
    if kind == "duration":
        return f"{value:g}s"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"' if value else '""'
    if isinstance(value, tuple | list):
        return "[]" if not value else repr(list(value))
    if isinstance(value, dict):
        return "{}" if not value else repr(value)
    return str(value)


def status(key: str) -> tuple[str, str]:
    """(works | warned | refused, why) of a top-level key."""
    if key in REFUSED:
        return "refused", REFUSED[key]
    if key in UNSUPPORTED:
        return "warned", UNSUPPORTED[key]
    if key in IGNORED_KEYS or key.startswith(IGNORED_PREFIXES):
        return "warned", "feature not implemented"
    if key in EXTENSIONS:
        return "works", f"centripy extension: {EXTENSIONS[key]}"
    return "works", ""


def rows(cls: type) -> Iterator[tuple[str, str, str, str, str]]:
    """(key, kind, default, status, note) of every scalar field of config class `cls`."""
    for key, kind in field_kinds(cls).items():
        if cls is Config:
            state, note = status(key)
        elif f"{cls.__name__}.{key}" in NESTED_WARNED:
            state, note = "warned", NESTED_WARNED[f"{cls.__name__}.{key}"]
        else:
            state, note = "works", ""
        yield key, _KIND_NAMES.get(kind, kind), _show(_default(cls, key), kind), state, note


def _table(cls: type) -> list[str]:
    out = ["| key | type | default | status | note |", "|---|---|---|---|---|"]
    for key, kind, default, state, note in rows(cls):
        out.append(f"| `{key}` | {kind} | `{default}` | {state} | {note} |")
    return out


def _unparsed() -> list[str]:
    out = ["| key or prefix | status | note |", "|---|---|---|"]
    for key, why in sorted(REFUSED.items()):
        out.append(f"| `{key}` | refused | {why} |")
    for key in sorted(IGNORED_KEYS):
        out.append(f"| `{key}` | warned | feature not implemented |")
    for prefix in sorted(IGNORED_PREFIXES):
        if prefix == "usage_stats":  # usage_stats_disable: centripy never sends any
            out.append(f"| `{prefix}*` | works | centripy never sends usage stats |")
        else:
            out.append(f"| `{prefix}*` | warned | feature not implemented |")
    return out


def render() -> str:
    """The whole reference page, Markdown."""
    counts = {"works": 0, "warned": 0, "refused": 0}
    for _, _, _, state, _ in rows(Config):
        counts[state] += 1
    parts = [
        "# Configuration reference",
        "",
        "Generated by `python -m centripy.config_reference` from the config definitions "
        "(`engine/config.py`, `engine/options.py`, `engine/config_check.py`); do not edit by "
        "hand. Keys are Centrifugo v5's flat keys: set them in the JSON/YAML/TOML file, as "
        "`CENTRIFUGO_<KEY>` environment variables or as `--<key>` flags. Durations take Go's "
        'syntax (`"25s"`, `"1m30s"`) or a number of seconds.',
        "",
        "Status: **works** (has its effect), **warned** (parsed, no effect: `serve` and "
        "`checkconfig` print `not supported by centripy: <key>` when it is set), **refused** "
        "(a config setting it does not start).",
        "",
        f"Top-level keys: {counts['works']} work, {counts['warned']} are warned about, "
        f"{counts['refused']} refused.",
        "",
        "## Top-level keys",
        "",
        *_table(Config),
        "",
        "## Channel options",
        "",
        "Set at the top level (channels without a namespace) and in each item of `namespaces` "
        "(which also takes `name`).",
        "",
        *_table(ChannelOptions),
        "",
        "## `namespaces` items",
        "",
        *_table(Namespace),
        "",
        "## `proxies` items (granular proxy mode)",
        "",
        *_table(ProxyConfig),
        "",
        "## `rpc_namespaces` items",
        "",
        *_table(RpcNamespace),
        "",
        "## `consumers` items",
        "",
        *_table(ConsumerConfig),
        "",
        "### `postgresql` consumer options",
        "",
        *_table(PostgresConsumerConfig),
        "",
        "### `kafka` consumer options",
        "",
        *_table(KafkaConsumerConfig),
        "",
        "## Keys parsed without a field",
        "",
        *_unparsed(),
        "",
    ]
    return "\n".join(parts)


if __name__ == "__main__":
    sys.stdout.write(render())
