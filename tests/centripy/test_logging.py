"""Logging (issue 18 item 4): Centrifugo's `log_level` values, `log_file`, `log_format: json`
(one JSON object per line), and an API access log that never holds the API key."""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from centripy.engine.config import Config, ConfigError
from centripy.engine.config_load import load_config
from centripy.logs import NONE, TRACE, LogBudget, log_level, setup_logging
from tests.support.server import ServerFactory, ServerProcess
from tests.support.wait import eventually_sync

LOGGERS = ("", "centripy", "tornado", "tornado.access")


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """setup_logging changes process-wide logging: put back what it changes."""
    loggers = [logging.getLogger(name) for name in LOGGERS]
    saved = [(lg, lg.level, list(lg.handlers), list(lg.filters)) for lg in loggers]
    yield
    for lg, level, handlers, filters in saved:
        for handler in lg.handlers:
            if handler not in handlers:
                lg.removeHandler(handler)
                handler.close()
        lg.filters[:] = filters
        lg.setLevel(level)


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _emit_all(name: str) -> None:
    logger = logging.getLogger(name)
    logger.log(TRACE, "trace line")
    logger.debug("debug line")
    logger.info("info line")
    logger.warning("warn line")
    logger.error("error line")
    logger.critical("fatal line")


@pytest.mark.parametrize(
    ("name", "level"),
    [
        ("trace", TRACE),
        ("debug", logging.DEBUG),
        ("info", logging.INFO),
        ("INFO", logging.INFO),
        ("warn", logging.WARNING),
        ("error", logging.ERROR),
        ("fatal", logging.CRITICAL),
        ("none", NONE),
        ("verbose", logging.INFO),  # unknown: info, as Centrifugo
    ],
)
def test_log_level_values_are_centrifugos(name: str, level: int) -> None:
    assert log_level(name) == level


def test_json_lines_carry_zerolog_fields(tmp_path: Path) -> None:
    path = tmp_path / "centripy.log"
    setup_logging(Config(log_file=str(path), log_format="json", log_level="debug"))
    log = logging.getLogger("centripy.test")
    log.info("two\nlines %s", "here", extra={"client": "c1"})
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("failed")
    first, second = _lines(path)  # the newline inside the message did not split the line
    assert first["level"] == "info" and first["message"] == "two\nlines here"
    assert first["logger"] == "centripy.test" and first["client"] == "c1"
    assert first["time"].endswith("Z") and first["time"][:4].isdigit()
    assert second["level"] == "error" and second["error"] == "ValueError: boom"
    assert "Traceback" in second["stack"]


def test_text_format_is_the_default(tmp_path: Path) -> None:
    path = tmp_path / "centripy.log"
    setup_logging(Config(log_file=str(path)))
    logging.getLogger("centripy.test").warning("plain %d", 1)
    (line,) = path.read_text().splitlines()
    assert line.endswith(" WARNING centripy.test: plain 1")


@pytest.mark.parametrize(
    ("level", "own", "library"),
    [
        ("trace", ["trace", "debug", "info", "warn", "error", "fatal"], 6),
        ("debug", ["debug", "info", "warn", "error", "fatal"], 4),
        ("info", ["info", "warn", "error", "fatal"], 4),
        ("warn", ["warn", "error", "fatal"], 3),
        ("error", ["error", "fatal"], 2),
        ("fatal", ["fatal"], 1),
        ("none", [], 0),
    ],
)
def test_levels_gate_centripy_and_library_loggers(
    tmp_path: Path, level: str, own: list[str], library: int
) -> None:
    """centripy's and Tornado's loggers follow log_level; other libraries' debug lines
    (aiosqlite logs every statement) appear only at trace."""
    path = tmp_path / "centripy.log"
    setup_logging(Config(log_file=str(path), log_format="json", log_level=level))
    _emit_all("centripy.test")
    _emit_all("tornado.general")
    _emit_all("aiosqlite")
    lines = _lines(path) if path.exists() else []
    by_logger: dict[str, list[str]] = {}
    for line in lines:
        by_logger.setdefault(line["logger"], []).append(line["level"])
    assert by_logger.get("centripy.test", []) == own
    assert by_logger.get("tornado.general", []) == own
    assert len(by_logger.get("aiosqlite", [])) == library


def test_setup_twice_keeps_one_handler(tmp_path: Path) -> None:
    first, second = tmp_path / "a.log", tmp_path / "b.log"
    setup_logging(Config(log_file=str(first)))
    setup_logging(Config(log_file=str(second)))
    logging.getLogger("centripy.test").warning("once")
    assert "once" not in first.read_text()
    assert second.read_text().count("once") == 1
    budgets = [f for f in logging.getLogger("tornado.access").filters if isinstance(f, LogBudget)]
    assert len(budgets) == 1


def test_log_file_is_reopened_after_rotation(tmp_path: Path) -> None:
    path = tmp_path / "centripy.log"
    setup_logging(Config(log_file=str(path)))
    log = logging.getLogger("centripy.test")
    log.warning("before rotation")
    path.rename(tmp_path / "centripy.log.1")  # what logrotate does
    log.warning("after rotation")
    assert "before rotation" in (tmp_path / "centripy.log.1").read_text()
    assert "after rotation" in path.read_text()


def test_unopenable_log_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="log_file"):
        setup_logging(Config(log_file=str(tmp_path / "missing" / "dir" / "x.log")))


def test_unknown_log_format_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text('{"log_format": "xml"}')
    with pytest.raises(ConfigError, match='"log_format": unknown format "xml"'):
        load_config(str(path), {}, {})
    config, _ = load_config(str(path), {"CENTRIFUGO_LOG_FORMAT": "json"}, {})
    assert config.log_format == "json"


# --------------------------------------------------------------------------- access log

API_KEY = "secret-api-key-4f1c9b"
WRONG_KEY = "wrong-key-a7d2e0"


def _post(server: ServerProcess, path: str, headers: dict[str, str]) -> int:
    request = urllib.request.Request(
        f"{server.http_url}{path}",
        data=json.dumps({"channel": "chat", "data": {"n": 1}}).encode(),
        headers={"Content-Type": "application/json", **headers},
        method="POST",
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        error.close()
        return int(error.code)


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_api_access_log_never_holds_the_api_key(tmp_path: Path) -> None:
    """Every API call is in the access log at debug (failures at warning) on both HTTP
    paths, with its path and status but never the key, whether it came in a header, an
    Authorization value or the query string, right or wrong."""
    log_file = tmp_path / "access.log"
    base = {
        "api_key": API_KEY,
        "log_level": "debug",
        "log_format": "json",
        "log_file": str(log_file),
        "allow_publish_for_client": True,
    }
    factory = ServerFactory(tmp_path, base)
    try:
        server = factory()
        calls = [
            ("/api/publish", {"X-API-Key": API_KEY}, 200),
            ("/api/publish", {"Authorization": f"apikey {API_KEY}"}, 200),
            (f"/api/publish?api_key={API_KEY}", {}, 200),
            (f"/api/publish?api_key={WRONG_KEY}", {}, 401),
            ("/api/publish", {"X-API-Key": WRONG_KEY}, 401),
            # chunked: Tornado's path, not the lean one
            ("/api/publish", {"X-API-Key": API_KEY, "Transfer-Encoding": "chunked"}, 200),
            (f"/api/publish?api_key={WRONG_KEY}", {"Transfer-Encoding": "chunked"}, 401),
        ]
        for path, headers, status in calls:
            assert _post(server, path, headers) == status, (path, headers)

        def access_lines() -> list[dict[str, Any]]:
            lines = _lines(log_file)
            found = [line for line in lines if line["logger"] == "tornado.access"]
            return found if len(found) >= len(calls) else []

        lines = eventually_sync(access_lines, 10, "an access line per API call")
        statuses = sorted(int(line["message"].split()[0]) for line in lines)
        assert statuses == sorted(status for _, _, status in calls)
        for line in lines:
            assert "/api/publish" in line["message"]
            expected = "warn" if line["message"].startswith("401") else "debug"
            assert line["level"] == expected, line
        text = log_file.read_text() + server.stderr_path.read_text()
        assert API_KEY not in text and WRONG_KEY not in text
    finally:
        factory.stop_all()
