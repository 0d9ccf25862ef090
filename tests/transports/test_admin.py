"""transports/admin.py without a server: the login form parsing and the routes it builds."""

from __future__ import annotations

import re
from typing import Any

from centripy.engine.config import Config
from centripy.transports import admin
from centripy.transports.admin import (
    UI_FILES,
    AdminApiHandler,
    AdminAuthHandler,
    AdminWebHandler,
    AdminWebProxyHandler,
    _password,
    admin_routes,
    ui_dir,
)
from centripy.transports.api_http import InFlight

FORM = "application/x-www-form-urlencoded"


def test_password_from_a_form_body_then_the_query() -> None:
    assert _password(FORM, b"password=s%20e+cret&x=1", "") == "s e cret"
    assert _password(FORM, b"password=body", "password=query") == "body"
    assert _password(FORM, b"", "password=query") == "query"
    assert _password("", b"password=x", "") == "x"  # no Content-Type: still a form
    assert _password(FORM, b"other=1", "") == ""


def test_password_from_a_json_body() -> None:
    assert _password("application/json; charset=utf-8", b'{"password": "pw"}', "") == "pw"
    for body in (b"not json", b"[]", b'{"password": 5}', b"", b"null"):
        assert _password("application/json", body, "password=q") == "", body


def _routes(**keys: Any) -> list[tuple[str, type, dict[str, Any]]]:
    return admin_routes(Config(**keys), None, InFlight())  # type: ignore[arg-type]


def _target(routes: list[tuple[str, type, dict[str, Any]]], path: str) -> type | None:
    """The handler Tornado would pick: the first rule matching the whole path."""
    for pattern, handler, _ in routes:
        if re.fullmatch(pattern, path):
            return handler
    return None


def test_no_routes_unless_admin() -> None:
    assert _routes(admin_password="pw", admin_secret="s") == []


def test_builtin_ui_routes_match_only_its_files() -> None:
    routes = _routes(admin=True, admin_password="pw", admin_secret="s")
    assert _target(routes, "/admin/auth") is AdminAuthHandler
    assert _target(routes, "/admin/api") is AdminApiHandler
    assert _target(routes, "/admin/api/publish") is AdminApiHandler
    for path in ("/", "/index.html", "/app.js", "/app.css"):
        assert _target(routes, path) is AdminWebHandler, path
    for path in ("/api", "/api/publish", "/health", "/metrics", "/connection/websocket",
                 "/x/app.js", "/app.jsx"):  # fmt: skip
        assert _target(routes, path) is None, path
    assert sorted(p.name for p in ui_dir().iterdir()) == sorted(UI_FILES)


def test_prefix_is_escaped_and_trailing_slash_dropped() -> None:
    routes = _routes(admin=True, admin_insecure=True, admin_handler_prefix="/a.b/")
    assert _target(routes, "/a.b/admin/auth") is AdminAuthHandler
    assert _target(routes, "/a.b/") is AdminWebHandler
    assert _target(routes, "/aXb/admin/auth") is None
    assert _target(routes, "/admin/auth") is None


def test_web_path_and_proxy_catch_everything_below_the_prefix() -> None:
    routes = _routes(admin=True, admin_insecure=True, admin_web_path="/srv/ui")
    assert _target(routes, "/deep/file.js") is AdminWebHandler
    assert routes[-1][2] == {"path": "/srv/ui", "default_filename": "index.html", "builtin": False}
    routes = _routes(
        admin=True, admin_insecure=True, admin_web_path="/srv/ui",
        admin_web_proxy_address="http://127.0.0.1:3000",
    )  # fmt: skip
    assert _target(routes, "/deep/file.js") is AdminWebProxyHandler  # the proxy wins
    assert _target(routes, "/admin/api") is AdminApiHandler  # endpoints come first


def test_a_missing_password_or_secret_is_logged(caplog: Any) -> None:
    with caplog.at_level("ERROR", logger=admin.log.name):
        _routes(admin=True, admin_password="pw")
    assert "admin_password and admin_secret" in caplog.text
