"""Logging of `centripy serve`: `log_level`, `log_file`, `log_format` (docs/spec/server_api.md 3).

- `log_level` as Centrifugo v5: trace, debug, info (default), warn, error, fatal, none; an
  unknown level is read as info (the loader warns). centripy's own loggers (`centripy.*`) and
  Tornado's (`tornado.*`, whose `tornado.access` is the API access log) follow it; other
  libraries' loggers log at info or above except at trace, which lets everything through.
- `log_file`: append to that file (reopened when logrotate moves it away) instead of stderr.
- `log_format` (a centripy extension; Centrifugo v5 has no flat key for it): "text" (default)
  or "json", one JSON object per line with zerolog's field names (`level`, `time`, `message`)
  plus `logger`, and `error`/`stack` for an exception.

`LogBudget` caps the access log's lines a second. `setup_logging` runs once on the main thread
before the event loop starts; the handlers are thread-safe (the stdlib's lock).
"""

from __future__ import annotations

import datetime
import logging
import logging.handlers
import time
import traceback
from collections.abc import Callable
from typing import Any

import orjson

from centripy.engine.config import Config, ConfigError

__all__ = ["LOG_FORMATS", "JsonFormatter", "LogBudget", "log_level", "setup_logging"]

TRACE = 5  # below logging.DEBUG: Centrifugo's trace level
NONE = logging.CRITICAL + 10  # above every level: nothing is logged
LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Loggers that follow `log_level` down to debug; the others stop at info unless it is trace.
OWN_LOGGERS = ("centripy", "tornado")

_LEVELS = {
    "trace": TRACE,
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "error": logging.ERROR,
    "fatal": logging.CRITICAL,
    "none": NONE,
}
# zerolog's level names, which Centrifugo's JSON log lines carry
_JSON_LEVELS: tuple[tuple[int, str], ...] = (
    (logging.CRITICAL, "fatal"),
    (logging.ERROR, "error"),
    (logging.WARNING, "warn"),
    (logging.INFO, "info"),
    (logging.DEBUG, "debug"),
)
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message"}

logging.addLevelName(TRACE, "TRACE")


def log_level(name: str) -> int:
    """The logging level of a Centrifugo `log_level` value (case-insensitive; info if unknown)."""
    return _LEVELS.get(name.lower(), logging.INFO)


def _json_level(levelno: int) -> str:
    for floor, name in _JSON_LEVELS:
        if levelno >= floor:
            return name
    return "trace"


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (newlines inside values are escaped)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "level": _json_level(record.levelno),
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():  # `extra=` fields
            if key not in _STANDARD and not key.startswith("_"):
                entry.setdefault(key, value)
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            entry["error"] = f"{type(exc).__name__}: {exc}"
            entry["stack"] = "".join(traceback.format_exception(*record.exc_info))
        elif record.stack_info:
            entry["stack"] = record.stack_info
        return orjson.dumps(entry, default=str).decode()


class LogBudget(logging.Filter):
    """At most `per_second` records a second pass (hostile clients must not be able to flood
    the log with failed requests); the first one after a throttled second says how many
    were dropped."""

    def __init__(self, per_second: int = 20, clock: Callable[[], float] = time.monotonic):
        super().__init__()
        self._per_second = per_second
        self._clock = clock
        self._second = -1
        self._passed = 0
        self._dropped = 0

    def filter(self, record: logging.LogRecord) -> bool:
        second = int(self._clock())
        if second != self._second:
            self._second, self._passed = second, 0
            if self._dropped:
                record.msg = f"{record.msg} (and {self._dropped} similar lines dropped)"
                self._dropped = 0
        self._passed += 1
        if self._passed > self._per_second:
            self._dropped += 1
            return False
        return True


def _handler(config: Config) -> logging.Handler:
    if not config.log_file:
        return logging.StreamHandler()
    try:
        return logging.handlers.WatchedFileHandler(config.log_file, encoding="utf-8")
    except OSError as exc:
        raise ConfigError("log_file", f"can not open {config.log_file}: {exc}") from None


_installed: list[logging.Handler] = []  # the handler setup_logging put on the root logger


def setup_logging(config: Config) -> logging.Handler:
    """Install the one handler of the process on the root logger (replacing the one this
    function installed before) and set the levels; returns the handler. ConfigError when
    `log_file` can not be opened. `config.log_format` was validated by the loader."""
    level = log_level(config.log_level)
    handler = _handler(config)
    formatter = JsonFormatter() if config.log_format == "json" else logging.Formatter(TEXT_FORMAT)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    while _installed:
        old = _installed.pop()
        root.removeHandler(old)
        old.close()
    _installed.append(handler)
    root.addHandler(handler)
    root.setLevel(level if level <= TRACE else max(level, logging.INFO))
    for name in OWN_LOGGERS:
        logging.getLogger(name).setLevel(level)
    access = logging.getLogger("tornado.access")
    if not any(isinstance(f, LogBudget) for f in access.filters):
        access.addFilter(LogBudget())
    return handler
