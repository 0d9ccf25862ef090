"""The `centripy` command line, run in-process through `main()`."""

from __future__ import annotations

import json
import os
import stat
import sys
import tomllib
import types
from pathlib import Path
from typing import Any

import pytest
import yaml

from centripy.cli import format_go_duration, main
from centripy.engine.auth import TokenVerifier, make_token
from centripy.engine.config import Config
from centripy.engine.config_load import load_config
from centripy.reload import ConfigSource

ROOT = Path(__file__).resolve().parents[2]
Capture = pytest.CaptureFixture[str]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith(("CENTRIFUGO_", "CENTRIPY_")):
            monkeypatch.delenv(name)


def write_config(tmp_path: Path, data: dict[str, Any]) -> str:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data))
    return str(path)


def run(capsys: Capture, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_version(capsys: Capture) -> None:
    code, out, _ = run(capsys, "version")
    assert code == 0
    assert out.startswith("centripy ") and out.rstrip().endswith("(Centrifugo v5 compatible)")


@pytest.mark.parametrize("name", ["c.json", "c.yaml", "c.yml", "c.toml"])
def test_genconfig_formats(tmp_path: Path, capsys: Capture, name: str) -> None:
    path = tmp_path / name
    code, _, err = run(capsys, "genconfig", "-c", str(path))
    assert (code, err) == (0, "")
    text = path.read_text()
    if name.endswith(".json"):
        data = json.loads(text)
    elif name.endswith(".toml"):
        data = tomllib.loads(text)
    else:
        data = yaml.safe_load(text)
    assert set(data) == {
        "token_hmac_secret_key",
        "admin_password",
        "admin_secret",
        "api_key",
        "allowed_origins",
    }
    assert data["allowed_origins"] == []
    assert len({data["api_key"], data["admin_secret"], data["token_hmac_secret_key"]}) == 3
    config, _ = load_config(str(path), {}, {})
    assert config.api_key == data["api_key"]


def test_genconfig_refuses_overwrite_and_bad_extension(tmp_path: Path, capsys: Capture) -> None:
    path = tmp_path / "c.json"
    path.write_text("{}")
    code, _, err = run(capsys, "genconfig", "-c", str(path))
    assert code == 1 and "already exists" in err
    assert path.read_text() == "{}"
    code, _, err = run(capsys, "genconfig", "-c", str(tmp_path / "c.ini"))
    assert code == 1 and "extension" in err


@pytest.mark.parametrize("umask", [0o000, 0o022])
def test_genconfig_output_is_owner_only(tmp_path: Path, capsys: Capture, umask: int) -> None:
    path = tmp_path / "secrets.json"
    previous = os.umask(umask)  # even a permissive umask must not expose the secrets
    try:
        code, _, err = run(capsys, "genconfig", "-c", str(path))
    finally:
        os.umask(previous)
    assert (code, err) == (0, "")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert "api_key" in json.loads(path.read_text())


def test_checkconfig(tmp_path: Path, capsys: Capture) -> None:
    assert run(capsys, "checkconfig", "-c", str(ROOT / "examples" / "config.json")) == (0, "", "")
    bad = write_config(tmp_path, {"ping_interval": "5s", "pong_timeout": "8s"})
    code, _, err = run(capsys, "checkconfig", "-c", bad)
    assert code == 1
    assert err.strip() == 'config error: "ping_interval": must be greater than pong_timeout'
    code, _, err = run(capsys, "checkconfig", "-c", str(tmp_path / "missing.json"))
    assert code == 1 and "unable to locate config file" in err


def test_checkconfig_warnings_go_to_stderr(tmp_path: Path, capsys: Capture) -> None:
    code, out, err = run(capsys, "checkconfig", "-c", write_config(tmp_path, {"foo": 1}))
    assert (code, out) == (0, "")
    assert 'warning: unknown key "foo"' in err


def test_checkconfig_namespace_error(tmp_path: Path, capsys: Capture) -> None:
    path = write_config(tmp_path, {"namespaces": [{"name": "chat", "history_size": 10}]})
    code, _, err = run(capsys, "checkconfig", "-c", path)
    assert code == 1 and '"namespaces[0].history_size"' in err


def test_gentoken_and_checktoken(tmp_path: Path, capsys: Capture) -> None:
    path = write_config(tmp_path, {"token_hmac_secret_key": "s3cret"})
    code, out, _ = run(capsys, "gentoken", "-c", path, "-u", "42")
    assert code == 0
    header, token = out.strip().split("\n")
    assert header == 'HMAC SHA-256 JWT for user "42" with expiration TTL 168h0m0s:'
    verified = TokenVerifier(Config(token_hmac_secret_key="s3cret")).verify_connection_token(token)
    assert verified.user_id == "42" and verified.expire_at is not None
    code, out, _ = run(capsys, "checktoken", "-c", path, token)
    assert code == 0
    first, second = out.strip().split("\n")
    assert first == "valid token for user 42"
    assert json.loads(second.removeprefix("payload: "))["sub"] == "42"


def test_gentoken_quiet_without_expiration(tmp_path: Path, capsys: Capture) -> None:
    path = write_config(tmp_path, {"token_hmac_secret_key": "s3cret"})
    code, out, _ = run(capsys, "gentoken", "-c", path, "-t", "-1", "-q")
    assert code == 0
    token = out.strip()
    assert (
        TokenVerifier(Config(token_hmac_secret_key="s3cret"))
        .verify_connection_token(token)
        .expire_at
        is None
    )
    code, out, _ = run(capsys, "gentoken", "-c", path, "-t", "-1")
    assert out.startswith("HMAC SHA-256 JWT for anonymous user without expiration:")


def test_gentoken_needs_secret(tmp_path: Path, capsys: Capture) -> None:
    code, _, err = run(capsys, "gentoken", "-c", write_config(tmp_path, {}), "-u", "1")
    assert code == 1 and "no HMAC secret key" in err


def test_checktoken_failures(tmp_path: Path, capsys: Capture) -> None:
    path = write_config(tmp_path, {"token_hmac_secret_key": "s3cret"})
    code, _, err = run(capsys, "checktoken", "-c", path, make_token("other", "1", 60))
    assert code == 1 and err.startswith("error: error verifying token")
    code, _, err = run(capsys, "checktoken", "-c", path, make_token("s3cret", "1", 60, now=1000))
    assert code == 1 and "expired" in err
    code, _, err = run(capsys, "checktoken", "-c", path)
    assert code == 1 and "provide token" in err


def test_gensubtoken_and_checksubtoken(tmp_path: Path, capsys: Capture) -> None:
    path = write_config(
        tmp_path,
        {
            "token_hmac_secret_key": "conn",
            "separate_subscription_token_config": True,
            "subscription_token_hmac_secret_key": "subs",
        },
    )
    code, _, err = run(capsys, "gensubtoken", "-c", path, "-u", "1")
    assert code == 1 and "channel" in err
    code, out, _ = run(capsys, "gensubtoken", "-c", path, "-u", "1", "-s", "$news", "-t", "60")
    assert code == 0
    header, token = out.strip().split("\n")
    assert header == 'HMAC SHA-256 JWT for user "1" and channel "$news" with expiration TTL 1m0s:'
    code, out, _ = run(capsys, "checksubtoken", "-c", path, token)
    assert code == 0 and out.startswith("valid token for user 1\npayload: ")
    code, _, _ = run(capsys, "checktoken", "-c", path, token)
    assert code == 1  # signed with the subscription key, and carries a channel claim


def test_serve_passes_overrides_to_server(
    tmp_path: Path, capsys: Capture, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[Config] = []
    sources: list[ConfigSource] = []

    def fake_run(config: Config, source: ConfigSource) -> int:
        seen.append(config)
        sources.append(source)
        return 7

    module = types.ModuleType("centripy.server")
    module.run = fake_run  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "centripy.server", module)
    monkeypatch.setenv("CENTRIFUGO_ADDRESS", "127.0.0.2")
    path = write_config(tmp_path, {"port": 1000, "api_key": "k", "foo": 1})
    code, _, err = run(
        capsys, "-c", path, "-p", "9001", "--admin", "--health=false", "--engine", "memory"
    )
    assert code == 7
    assert 'unknown key "foo"' in err
    (config,) = seen
    assert (config.port, config.api_key, config.address) == (9001, "k", "127.0.0.2")
    assert config.admin is True and config.health is False
    # SIGHUP reloads from the same file, environment and flags
    assert sources[0].path == path and sources[0].overrides["port"] == "9001"
    assert sources[0].load()[0] == config
    code, _, _ = run(capsys, "serve", "-c", path, "--client_insecure")
    assert code == 7 and seen[-1].client_insecure is True


def test_serve_config_errors(tmp_path: Path, capsys: Capture) -> None:
    path = write_config(tmp_path, {"engine": "tarantool"})
    code, _, err = run(capsys, "-c", path)
    assert code == 1 and err.startswith('config error: "engine"')
    code, _, err = run(capsys, "-c", str(tmp_path / "none.json"), "--port", "eighty")
    assert code == 1 and '"port"' in err
    code, _, err = run(capsys, "--no-such-flag")
    assert code == 1 and "unrecognized arguments" in err


def test_unknown_command(capsys: Capture) -> None:
    code, _, err = run(capsys, "frobnicate")
    assert code == 1 and "unknown command" in err


def test_help_exits_zero(capsys: Capture) -> None:
    code, out, _ = run(capsys, "gentoken", "--help")
    assert code == 0 and "--ttl" in out


def test_migrate_calls_storage(
    tmp_path: Path, capsys: Capture, monkeypatch: pytest.MonkeyPatch
) -> None:
    urls: list[str] = []

    async def fake_migrate(database_url: str) -> None:
        urls.append(database_url)

    module = types.ModuleType("centripy.storage.factory")
    module.migrate = fake_migrate  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "centripy.storage.factory", module)
    path = write_config(tmp_path, {"database_url": "postgresql+asyncpg://u:pw@h/db"})
    code, out, _ = run(capsys, "migrate", "-c", path)
    assert code == 0 and urls == ["postgresql+asyncpg://u:pw@h/db"]
    assert "pw" not in out and "***" in out


def test_format_go_duration() -> None:
    assert format_go_duration(604800) == "168h0m0s"
    assert format_go_duration(3600) == "1h0m0s"
    assert format_go_duration(90) == "1m30s"
    assert format_go_duration(5) == "5s"
    assert format_go_duration(0) == "0s"
