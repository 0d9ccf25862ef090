"""The generated configuration reference (centripy/config_reference.py) is committed up to
date and gives every key a status consistent with what `load_config` does with it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from centripy import config_reference
from centripy.engine.config import Config, ConfigError, field_kinds
from centripy.engine.config_check import UNSUPPORTED
from centripy.engine.config_load import load_config

PAGE = Path(__file__).resolve().parents[2] / "docs" / "reference" / "configuration.md"


def test_committed_page_is_generated_from_the_current_definitions() -> None:
    assert PAGE.read_text() == config_reference.render(), (
        "docs/reference/configuration.md is stale: run "
        "`.venv/bin/python -m centripy.config_reference > docs/reference/configuration.md`"
    )


def test_every_top_level_key_is_in_the_page_with_one_status() -> None:
    states = {key: state for key, _, _, state, _ in config_reference.rows(Config)}
    assert set(states) == set(field_kinds(Config))
    assert {k for k, s in states.items() if s == "warned"} >= set(UNSUPPORTED)


@pytest.mark.parametrize("key", sorted(UNSUPPORTED))
def test_a_warned_key_is_named_by_load_config_when_set(key: str, tmp_path: Path) -> None:
    kind = field_kinds(Config)[key]
    value = {"bool": True, "int": 7, "str": "x", "duration": "3s", "list": ["a"]}[kind]
    path = tmp_path / "config.json"
    path.write_text(f'{{"{key}": {json.dumps(value)}}}')
    _, warnings = load_config(str(path), {}, {})
    assert any(f'not supported by centripy: "{key}"' in w for w in warnings), warnings


@pytest.mark.parametrize("key", sorted(config_reference.REFUSED))
def test_a_refused_key_stops_load_config(key: str, tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(f'{{"{key}": true}}')
    with pytest.raises(ConfigError, match=key):
        load_config(str(path), {}, {})


def test_proxy_rpc_in_an_rpc_namespace_is_named(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text('{"rpc_namespaces": [{"name": "ns", "proxy_rpc": true}]}')
    _, warnings = load_config(str(path), {}, {})
    assert any('"rpc_namespaces[0].proxy_rpc"' in w for w in warnings), warnings
