"""The `centripy` command line (docs/spec/server_api.md 3.2), shaped like Centrifugo's.

`centripy [flags]` or `centripy serve [flags]` runs the server; the other subcommands are
`version`, `genconfig`, `checkconfig`, `gentoken`, `gensubtoken`, `checktoken`,
`checksubtoken` and `migrate`. Every error goes to stderr with exit code 1. Runs on the main
thread; commands that need a loop start their own with `asyncio.run`.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import json
import os
import re
import sys
import urllib.request
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

import yaml

from centripy.engine.auth import (
    JWKSFetchError,
    TokenError,
    TokenVerifier,
    make_token,
    token_payload,
)
from centripy.engine.config import Config, ConfigError
from centripy.engine.config_load import load_config
from centripy.engine.jwks import JWKSCache

__all__ = ["format_go_duration", "main"]

_STRING_FLAGS: tuple[tuple[str, ...], ...] = (
    ("-p", "--port"),
    ("-a", "--address"),
    ("--internal_port",),
    ("--internal_address",),
    ("--log_level",),
    ("--log_file",),
    ("--pid_file",),
    ("-n", "--name"),
    ("-e", "--engine"),
    ("--broker",),
    ("--tls_cert",),
    ("--tls_key",),
    ("--redis_address",),
    ("--nats_url",),
    ("--database_url",),
)
_BOOL_FLAGS = (
    "client_insecure",
    "api_insecure",
    "api_external",
    "admin",
    "admin_insecure",
    "admin_external",
    "debug",
    "health",
    "prometheus",
    "swagger",
    "sse",
    "http_stream",
    "sockjs",
    "uni_websocket",
    "uni_sse",
    "uni_http_stream",
    "tls",
    "tls_external",
)


class _UsageError(Exception):
    """A bad command line or a failed command: printed to stderr, exit code 1."""


class _Exit(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser that raises instead of calling sys.exit."""

    def error(self, message: str) -> NoReturn:
        raise _UsageError(f"{self.prog}: error: {message}")

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        if message:
            sys.stderr.write(message)
        raise _Exit(status)


def format_go_duration(seconds: int) -> str:
    """Whole seconds the way Go prints a time.Duration: 604800 -> "168h0m0s"."""
    if seconds == 0:
        return "0s"
    sign, seconds = ("-", -seconds) if seconds < 0 else ("", seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{sign}{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{sign}{minutes}m{secs}s"
    return f"{sign}{secs}s"


def _version() -> str:
    try:
        return importlib.metadata.version("centripy")
    except importlib.metadata.PackageNotFoundError:
        return "0.1.0+source"


def _config_arg(parser: argparse.ArgumentParser, help_text: str) -> None:
    parser.add_argument("-c", "--config", default="config.json", help=help_text)


def _load(path: str, *, must_exist: bool = False) -> Config:
    """load_config with the process environment; warnings go to stderr."""
    if must_exist and not Path(path).is_file():
        raise _UsageError(f'unable to locate config file "{path}", use "-c" flag to define path')
    config, warnings = load_config(path, os.environ, {})
    _print_warnings(warnings)
    return config


def _print_warnings(warnings: list[str]) -> None:
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)


# --------------------------------------------------------------------------- serve


def _serve(argv: list[str]) -> int:
    parser = _Parser(
        prog="centripy",
        description="Centrifugo v5 compatible messaging server",
        epilog="commands: serve (default), version, genconfig, checkconfig, gentoken, "
        "gensubtoken, checktoken, checksubtoken, migrate (see centripy <command> --help)",
    )
    _config_arg(parser, "path to config file")
    for names in _STRING_FLAGS:
        parser.add_argument(*names, default=argparse.SUPPRESS)
    for name in _BOOL_FLAGS:
        parser.add_argument(
            f"--{name}", nargs="?", const="true", default=argparse.SUPPRESS, metavar="BOOL"
        )
    args = vars(parser.parse_args(argv))
    path = str(args.pop("config"))
    config, warnings = load_config(path, os.environ, args)
    _print_warnings(warnings)
    try:
        from centripy.server import run  # the composition root; imported only to serve
    except ModuleNotFoundError as exc:
        if exc.name != "centripy.server":
            raise
        raise _UsageError("the server module centripy.server is not installed") from None
    from centripy.reload import ConfigSource

    # SIGHUP re-reads the same file with the same environment and flags
    return int(run(config, ConfigSource(path, os.environ, args)))


# --------------------------------------------------------------------------- config files


def _render_config(suffix: str, values: dict[str, object]) -> str:
    if suffix == ".json":
        return json.dumps(values, indent=2) + "\n"
    if suffix in (".yaml", ".yml"):
        return str(yaml.safe_dump(values, sort_keys=False))
    lines = [f"{key} = {json.dumps(value)}" for key, value in values.items()]
    return "\n".join(lines) + "\n"


def _genconfig(argv: list[str]) -> int:
    parser = _Parser(prog="centripy genconfig", description="Generate a minimal config file")
    _config_arg(parser, "path to the output config file")
    path = Path(parser.parse_args(argv).config)
    suffix = path.suffix.lower()
    if suffix not in (".json", ".yaml", ".yml", ".toml"):
        raise _UsageError("output config file must have one of extensions: json, yaml, yml, toml")
    values: dict[str, object] = {
        "token_hmac_secret_key": str(uuid.uuid4()),
        "admin_password": str(uuid.uuid4()),
        "admin_secret": str(uuid.uuid4()),
        "api_key": str(uuid.uuid4()),
        "allowed_origins": [],
    }
    try:
        # it holds secrets: owner-only from the start (O_EXCL: never reuse an existing file)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with open(fd, "w", encoding="utf-8") as out:
            out.write(_render_config(suffix, values))
    except FileExistsError:
        raise _UsageError(f"output config file already exists: {path}") from None
    except OSError as exc:
        raise _UsageError(f"can not write {path}: {exc}") from None
    load_config(str(path), {}, {})
    return 0


def _checkconfig(argv: list[str]) -> int:
    parser = _Parser(prog="centripy checkconfig", description="Check a config file")
    _config_arg(parser, "path to the config file to check")
    _load(parser.parse_args(argv).config, must_exist=True)
    return 0


# --------------------------------------------------------------------------- tokens


def _token_parser(prog: str, description: str, *, channel: bool) -> _Parser:
    parser = _Parser(prog=prog, description=description)
    _config_arg(parser, "path to config file")
    parser.add_argument("-u", "--user", default="", help="user ID (empty: anonymous)")
    parser.add_argument("-t", "--ttl", type=int, default=604800, help="seconds; -1: no exp")
    parser.add_argument("-q", "--quiet", action="store_true", help="print only the token")
    if channel:
        parser.add_argument("-s", "--channel", default="", help="channel (required)")
    return parser


def _expiration(ttl: int) -> str:
    return f"with expiration TTL {format_go_duration(ttl)}" if ttl >= 0 else "without expiration"


def _user_label(user: str) -> str:
    return f'user "{user}"' if user else "anonymous user"


def _gentoken(argv: list[str]) -> int:
    args = _token_parser(
        "centripy gentoken", "Generate a connection token", channel=False
    ).parse_args(argv)
    config = _load(args.config)
    if not config.token_hmac_secret_key:
        raise _UsageError("no HMAC secret key set (token_hmac_secret_key)")
    token = make_token(config.token_hmac_secret_key, args.user, args.ttl)
    if args.quiet:
        print(token)
    else:
        print(f"HMAC SHA-256 JWT for {_user_label(args.user)} {_expiration(args.ttl)}:\n{token}")
    return 0


def _gensubtoken(argv: list[str]) -> int:
    parser = _token_parser("centripy gensubtoken", "Generate a subscription token", channel=True)
    args = parser.parse_args(argv)
    if not args.channel:
        raise _UsageError("provide channel to generate subscription token for (-s)")
    config = _load(args.config)
    key = "token_hmac_secret_key"
    if config.separate_subscription_token_config:
        key = "subscription_token_hmac_secret_key"
    secret = str(getattr(config, key))
    if not secret:
        raise _UsageError(f"no HMAC secret key set ({key})")
    token = make_token(secret, args.user, args.ttl, channel=args.channel)
    if args.quiet:
        print(token)
    else:
        target = f'{_user_label(args.user)} and channel "{args.channel}"'
        print(f"HMAC SHA-256 JWT for {target} {_expiration(args.ttl)}:\n{token}")
    return 0


async def _http_fetch(url: str) -> bytes:
    """Fetch a JWKS document (used only by the token-checking commands)."""

    def get() -> bytes:
        with urllib.request.urlopen(url, timeout=10) as response:
            body: bytes = response.read()
            return body

    return await asyncio.to_thread(get)


def _check(argv: list[str], prog: str, *, subscription: bool) -> int:
    parser = _Parser(prog=prog, description="Verify a token with the config's keys")
    _config_arg(parser, "path to config file")
    parser.add_argument("token", nargs="?", default="")
    args = parser.parse_args(argv)
    if not args.token:
        raise _UsageError(f"provide token to check [{prog} <TOKEN>]")
    config = _load(args.config)
    verifier = TokenVerifier(config, jwks=JWKSCache(_http_fetch))
    try:
        if subscription:
            user = asyncio.run(verifier.verify_subscription_token_async(args.token)).user_id
        else:
            user = asyncio.run(verifier.verify_connection_token_async(args.token)).user_id
    except (TokenError, JWKSFetchError) as exc:
        raise _UsageError(f"error verifying token: {exc}") from None
    label = f"user {user}" if user else "anonymous user"
    print(f"valid token for {label}\npayload: {token_payload(args.token).decode()}")
    return 0


def _checktoken(argv: list[str]) -> int:
    return _check(argv, "centripy checktoken", subscription=False)


def _checksubtoken(argv: list[str]) -> int:
    return _check(argv, "centripy checksubtoken", subscription=True)


# --------------------------------------------------------------------------- misc


def _version_cmd(argv: list[str]) -> int:
    _Parser(prog="centripy version", description="Print the version").parse_args(argv)
    print(f"centripy {_version()} (Centrifugo v5 compatible)")
    return 0


def _redact(url: str) -> str:
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)


def _migrate(argv: list[str]) -> int:
    parser = _Parser(prog="centripy migrate", description="Create or upgrade the database schema")
    _config_arg(parser, "path to config file")
    config = _load(parser.parse_args(argv).config)
    from centripy.storage.factory import migrate  # storage back ends load only when needed

    asyncio.run(migrate(config.database_url))
    print(f"database schema is up to date: {_redact(config.database_url)}")
    return 0


_COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "serve": _serve,
    "version": _version_cmd,
    "genconfig": _genconfig,
    "checkconfig": _checkconfig,
    "gentoken": _gentoken,
    "gensubtoken": _gensubtoken,
    "checktoken": _checktoken,
    "checksubtoken": _checksubtoken,
    "migrate": _migrate,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Console script entry point; returns the process exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    command = "serve"
    if args and not args[0].startswith("-"):
        command, args = args[0], args[1:]
    handler = _COMMANDS.get(command)
    if handler is None:
        print(f'error: unknown command "{command}" for "centripy"', file=sys.stderr)
        return 1
    try:
        return handler(args)
    except _Exit as exc:
        return exc.code
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    except _UsageError as exc:
        text = str(exc)
        print(text if text.startswith("centripy") else f"error: {text}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
