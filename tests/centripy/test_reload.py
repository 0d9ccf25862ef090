"""centripy/reload.py in-process: which keys a reload applies, what it swaps (node, connection
context, token verifier, admission, proxy routes), and what it refuses. The process-level
SIGHUP test is tests/integration/test_reload.py."""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from centripy.actors.context import ConnContext
from centripy.engine.auth import InvalidToken, TokenVerifier, make_token
from centripy.engine.config import Config, ConfigError
from centripy.engine.config_load import load_config
from centripy.engine.jwks import JWKSCache
from centripy.engine.node import Node
from centripy.engine.proxy import Proxies, ProxyRoutes
from centripy.reload import RELOADABLE, ConfigSource, Reloader, plan_reload
from tests.actors.harness import Harness

OPEN = {"allow_subscribe_for_client": True, "allow_subscribe_for_anonymous": True}
BASE: dict[str, Any] = {
    "token_hmac_secret_key": "old-secret",
    "allow_anonymous_connect_without_token": True,
    "namespaces": [{"name": "chat", **OPEN}],
}


async def _no_fetch(url: str) -> bytes:
    raise AssertionError(f"no JWKS fetch expected ({url})")


@dataclass
class Running:
    config: Config
    node: Node
    ctx: ConnContext | None


def _write(path: Path, values: dict[str, Any]) -> Path:
    path.write_text(json.dumps(values))
    return path


def _load(path: Path) -> Config:
    return load_config(str(path), {}, {})[0]


def test_plan_merges_reloadable_keys_and_names_the_others(tmp_path: Path) -> None:
    running = _load(_write(tmp_path / "a.json", BASE))
    new = _load(
        _write(
            tmp_path / "b.json",
            {
                **BASE,
                "token_hmac_secret_key": "new-secret",
                "namespaces": [{"name": "chat", **OPEN}, {"name": "news", **OPEN}],
                "log_level": "debug",
                "port": 9000,
            },
        )
    )
    plan = plan_reload(running, new)
    assert plan.changed == ("token_hmac_secret_key", "namespaces")
    assert plan.ignored == ("log_level", "port")
    merged = plan.config
    assert merged.namespace("news") is not None and merged.token_hmac_secret_key == "new-secret"
    assert (merged.log_level, merged.port) == ("info", 8000)
    assert plan_reload(merged, new).changed == ()


def test_reloadable_keys_are_config_fields() -> None:
    assert set(Config.__dataclass_fields__) >= RELOADABLE
    assert not {"port", "engine", "database_url", "api_key", "proxies"} & RELOADABLE


def test_plan_refuses_a_namespace_naming_a_proxy_the_running_config_lacks(
    tmp_path: Path,
) -> None:
    proxy = {"name": "one", "endpoint": "http://127.0.0.1:9/one"}
    granular = {**BASE, "granular_proxy_mode": True, "proxies": [proxy]}
    running = _load(_write(tmp_path / "a.json", granular))
    two = {"name": "two", "endpoint": "http://127.0.0.1:9/two"}
    namespaces = [{"name": "chat", **OPEN, "subscribe_proxy_name": "two"}]
    new = _load(
        _write(tmp_path / "b.json", {**granular, "proxies": [proxy, two], "namespaces": namespaces})
    )  # valid on its own, but `proxies` needs a restart
    with pytest.raises(ConfigError, match=r"namespaces\[0\]\.subscribe_proxy_name"):
        plan_reload(running, new)


async def test_reload_swaps_what_commands_read(tmp_path: Path) -> None:
    path = _write(tmp_path / "config.json", BASE)
    config = _load(path)
    async with Harness(config) as harness:
        running = Running(config, harness.node, harness.ctx)
        client = await harness.client()
        refused = await client.call("subscribe", {"channel": "news:1"})
        assert refused["error"]["code"] == 102
        harness.ctx.admission.refused = 3
        old_admission, old_verifier = harness.ctx.admission, harness.ctx.verifier
        _write(
            path,
            {
                **BASE,
                "token_hmac_secret_key": "new-secret",
                "namespaces": [{"name": "chat", **OPEN}, {"name": "news", **OPEN}],
                "client_connection_limit": 5,
            },
        )
        reloader = Reloader(ConfigSource(str(path), {}, {}), _no_fetch)
        reloader.attach(running)
        assert reloader() is True

        new = harness.ctx.config
        assert running.config is new and harness.node.config is new
        assert new.namespace("news") is not None
        assert harness.ctx.admission is not old_admission
        assert harness.ctx.admission.refused == 3
        verifier = harness.ctx.verifier
        assert verifier is not old_verifier
        assert verifier.verify_connection_token(make_token("new-secret", "u", 60)).user_id == "u"
        with pytest.raises(InvalidToken):
            verifier.verify_connection_token(make_token("old-secret", "u", 60))
        # the connection made before the reload subscribes to the new namespace
        ok = await client.call("subscribe", {"channel": "news:1"})
        assert "subscribe" in ok, ok


async def test_a_refused_reload_changes_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = _write(tmp_path / "config.json", BASE)
    config = _load(path)
    async with Harness(config) as harness:
        running = Running(config, harness.node, harness.ctx)
        before = (harness.ctx.config, harness.ctx.verifier, harness.ctx.admission)
        reloader = Reloader(ConfigSource(str(path), {}, {}), _no_fetch)
        reloader.attach(running)
        bad = {**BASE, "namespaces": [{"name": "x", **OPEN}]}  # names need 2 characters
        _write(path, bad)
        with caplog.at_level(logging.INFO, "centripy.reload"):
            assert reloader() is False
            path.write_text("namespaces = [")  # not JSON at all
            assert reloader() is False
            no_source = Reloader(None, _no_fetch)
            no_source.attach(running)
            assert no_source() is False
        assert (harness.ctx.config, harness.ctx.verifier, harness.ctx.admission) == before
        assert harness.node.config is config and running.config is config
        errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 3
        assert '"namespaces[0].name"' in errors[0] and "invalid JSON" in errors[1]
        assert "not started from a file" in errors[2]


async def test_sighup_before_attach_is_acted_on_once_started(tmp_path: Path) -> None:
    path = _write(tmp_path / "config.json", BASE)
    config = _load(path)
    async with Harness(config) as harness:
        reloader = Reloader(ConfigSource(str(path), {}, {}), _no_fetch)
        assert reloader() is False  # still starting: remembered
        _write(path, {**BASE, "namespaces": [{"name": "news", **OPEN}]})
        reloader.attach(Running(config, harness.node, harness.ctx))
        assert harness.node.config.namespace("news") is not None
        assert harness.node.config.namespace("chat") is None


async def test_reload_rebuilds_proxy_routes_and_keeps_the_jwks_cache(tmp_path: Path) -> None:
    proxies = [
        {"name": "one", "endpoint": "http://127.0.0.1:9/one"},
        {"name": "two", "endpoint": "http://127.0.0.1:9/two"},
    ]
    values = {
        **BASE,
        "granular_proxy_mode": True,
        "proxies": proxies,
        "rpc_namespaces": [{"name": "calc", "rpc_proxy_name": "one"}],
        "token_jwks_public_endpoint": "http://127.0.0.1:9/jwks",
    }
    path = _write(tmp_path / "config.json", values)
    config = _load(path)
    # the harness verifies with config keys; the reload's running config has the endpoint
    async with Harness(dataclasses.replace(config, token_jwks_public_endpoint="")) as harness:
        jwks = JWKSCache(_no_fetch)
        harness.ctx.verifier = TokenVerifier(config, jwks=jwks)
        harness.ctx.proxies = Proxies(ProxyRoutes(config), {})
        assert harness.ctx.proxies.routes.rpc("calc:add").name == "one"
        _write(path, {**values, "rpc_namespaces": [{"name": "calc", "rpc_proxy_name": "two"}]})
        reloader = Reloader(ConfigSource(str(path), {}, {}), _no_fetch)
        reloader.attach(Running(config, harness.node, harness.ctx))
        assert reloader() is True
        assert harness.ctx.proxies.routes.rpc("calc:add").name == "two"
        assert harness.ctx.verifier.jwks is jwks
