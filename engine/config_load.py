"""Loading the configuration (docs/spec/server_api.md 3): `load_config` merges the config file
(JSON, YAML or TOML), `CENTRIFUGO_<KEY>` environment variables and CLI overrides (in increasing
precedence) into one frozen `Config`, then validates it (engine/config_check.py). Every error
is a `ConfigError` naming the offending key. Also here: the conversions of raw values to
typed ones and Go's duration and boolean syntax (`parse_go_duration`, `parse_go_bool`).

Pure: the caller passes the environment in; the only I/O is reading the config file. Called
once at start-up (and on reload) from the main thread.
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from functools import cache
from pathlib import Path
from typing import Any, Final

import yaml

from centripy.engine.config import (
    Config,
    ConfigError,
    ConsumerConfig,
    KafkaConsumerConfig,
    PostgresConsumerConfig,
    ProxyConfig,
    RpcNamespace,
    field_kinds,
)
from centripy.engine.config_check import UNSUPPORTED, validate_config
from centripy.engine.options import ChannelOptions, Namespace

__all__ = ["load_config", "parse_go_bool", "parse_go_duration"]

# --------------------------------------------------------------------------- key tables

_LIST_KEYS = ("namespaces", "rpc_namespaces", "proxies", "consumers")
# Valid Centrifugo v5.2 keys that centripy accepts without using them (warned when set).
IGNORED_KEYS: Final = frozenset(
    {"http3", "redis_sentinel_client_name", "redis_tls_client_ca", "redis_tls_client_ca_pem"}
)
IGNORED_PREFIXES: Final = (
    "grpc_api",
    "uni_grpc",
    "graphite",
    "opentelemetry",
    "usage_stats",
    "tarantool_",
    "tls_autocert",
    "webtransport",
)
# Keys a config may not set: running without them would be unsafe.
REFUSED: Final[dict[str, str]] = {}
_SECONDS_PRECISION = frozenset({"history_ttl", "history_meta_ttl", "global_history_meta_ttl"})
_LOG_LEVELS = ("trace", "debug", "info", "warn", "error", "fatal", "none")
_CONSUMER_ENV_RE = re.compile(r"^CENTRIFUGO_CONSUMERS_(POSTGRESQL|KAFKA)_")


@cache
def _top_level_keys() -> frozenset[str]:
    return (
        frozenset(field_kinds(Config))
        | frozenset(field_kinds(ChannelOptions))
        | frozenset(_LIST_KEYS)
    )


def _is_ignored(key: str) -> bool:
    return key in IGNORED_KEYS or key.startswith(IGNORED_PREFIXES)


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
    kinds = field_kinds(cls)
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
        if out[-1].proxy_rpc:
            warnings.append(
                f'not supported by centripy: "{path}.proxy_rpc" (rpc namespaces route to a '
                "proxy by rpc_proxy_name in granular mode; without it every rpc goes to "
                "proxy_rpc_endpoint); ignored"
            )
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


_DEFAULTS: dict[str, object] = {key: getattr(Config(), key) for key in UNSUPPORTED}


def _truthy(value: object) -> bool:
    return value is True or (isinstance(value, str) and value.lower() in ("1", "t", "true"))


def _unsupported_warnings(merged: Mapping[str, object], config: Config) -> list[str]:
    """One warning per key the configuration sets, to something else than its default, that
    centripy does not act on: the keys of `UNSUPPORTED` and the features it does not have
    (grpc_api, ...). Refuses the keys of REFUSED (none today)."""
    for key, why in REFUSED.items():
        if _truthy(merged.get(key)):
            raise ConfigError(key, why)
    out = []
    for key in sorted(merged):
        if key in UNSUPPORTED:
            if getattr(config, key) == _DEFAULTS[key]:
                continue  # e.g. "admin": false, which is what centripy does anyway
            out.append(f'not supported by centripy: "{key}" ({UNSUPPORTED[key]}); ignored')
        elif (
            _is_ignored(key)
            and not key.startswith("usage_stats")  # centripy never sends usage stats
            and merged[key] not in (False, "", 0, None, [], {})
        ):
            out.append(f'not supported by centripy: "{key}"; ignored')
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
    warnings.extend(_unsupported_warnings(merged, config))
    if config.log_level.lower() not in _LOG_LEVELS:
        warnings.append(f'log_level: unknown level "{config.log_level}", using "info"')
    return config, warnings
