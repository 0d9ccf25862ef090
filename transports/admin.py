"""The admin web UI and its endpoints (Centrifugo v5's `admin` switch), thin Tornado handlers.

Under `admin_handler_prefix` (default ""), on the internal port unless `admin_external`:

* `GET  /admin/settings` -> `{"insecure": bool, "edition": "oss"}` (no auth; the UI reads it
  first to know whether to show the login form);
* `POST /admin/auth` with the form field `password` -> `{"token": "..."}` (a token signed
  with `admin_secret`, valid 30 days: engine/admin_auth.py); a wrong password, or
  `admin_password`/`admin_secret` not both set -> 400. centripy also accepts a JSON body
  `{"password": "..."}`. In `admin_insecure` mode the answer is `{"token": "insecure"}`;
* `POST /admin/api`: the legacy API format (`{"method": .., "params": ..}`, one command a
  line), as Centrifugo; centripy adds `POST /admin/api/<method>` with the method's JSON
  request, as `/api/<method>` (any method, `batch` too). Both need `Authorization: token
  <t>` (or `?token=`) unless `admin_insecure`; without a valid token -> 401, empty body;
* `GET /` (and its files): the UI shipped in the package (centripy/admin_ui), or the files
  of `admin_web_path`, or those of the HTTP server at `admin_web_proxy_address` (proxied).

The UI's channel inspector reads a channel's history with the `history` method (newest
first, paged by offset with `reverse` + `since`) and tails it by polling `history` forward
from the last offset it saw, every 500 ms: the event log is the source, so the tail neither
misses nor repeats a publication, across reconnects too. Handlers run on the event loop.
"""

from __future__ import annotations

import importlib.resources
import json
import logging
import re
from pathlib import Path
from typing import Any, Final
from urllib.parse import parse_qs

import orjson
import tornado.httpclient
import tornado.web

from centripy.engine import admin_auth
from centripy.engine.api import Executor
from centripy.engine.api_requests import METHODS, DecodeError
from centripy.engine.config import Config
from centripy.transports.api_http import (
    BAD_REQUEST,
    JSON_TYPE,
    NOT_FOUND,
    TEXT_TYPE,
    TOO_LARGE,
    GoAnswers,
    InFlight,
    answer_method,
    decode_legacy,
    legacy_reply,
)

log = logging.getLogger("centripy.admin")

UI_FILES: Final = ("index.html", "app.js", "app.css")
# The built-in UI loads nothing from elsewhere and talks only to its own origin.
UI_POLICY: Final = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)
AUTH_BODY_LIMIT: Final = 1024 * 1024  # as Centrifugo's MaxBytesReader on /admin/auth


def ui_dir() -> Path:
    """The built-in UI's files: the package data folder centripy/admin_ui."""
    return Path(str(importlib.resources.files("centripy").joinpath("admin_ui")))


class _AdminHandler(GoAnswers):
    def initialize(self, config: Config) -> None:
        self.config = config

    def set_default_headers(self) -> None:
        self.set_header("Cache-Control", "no-store")


class AdminSettingsHandler(_AdminHandler):
    def get(self) -> None:
        body = {"insecure": self.config.admin_insecure, "edition": "oss"}
        self._answer(200, orjson.dumps(body), JSON_TYPE)


def _password(content_type: str, body: bytes, query: str) -> str:
    """The `password` a login request gives: a JSON body's field, else the form field
    (body first, then query string, as Go's `FormValue`)."""
    if content_type.split(";")[0].strip().lower() == "application/json":
        try:
            value = json.loads(body or b"null")
        except ValueError:
            return ""
        given = value.get("password") if isinstance(value, dict) else None
        return given if isinstance(given, str) else ""
    for source in (body.decode("utf-8", "replace"), query):
        values = parse_qs(source, keep_blank_values=True).get("password")
        if values:
            return values[0]
    return ""


class AdminAuthHandler(_AdminHandler):
    def post(self) -> None:
        if len(self.request.body) > AUTH_BODY_LIMIT:
            self._answer(400, BAD_REQUEST, TEXT_TYPE)
            return
        config = self.config
        if config.admin_insecure:
            token = admin_auth.INSECURE_TOKEN
            self._answer(200, orjson.dumps({"token": token}), JSON_TYPE)
            return
        if not config.admin_password or not config.admin_secret:
            log.error("admin_password and admin_secret must be set in configuration")
            self._answer(400, BAD_REQUEST, TEXT_TYPE)
            return
        content_type = self.request.headers.get("Content-Type", "")
        given = _password(content_type, self.request.body, self.request.query)
        if not admin_auth.password_matches(config.admin_password, given):
            log.warning("admin login with a wrong password from %s", self.request.remote_ip)
            self._answer(400, BAD_REQUEST, TEXT_TYPE)
            return
        token = admin_auth.issue_token(config.admin_secret)
        self._answer(200, orjson.dumps({"token": token}), JSON_TYPE)


class AdminApiHandler(_AdminHandler):
    """`POST /admin/api` (legacy) and `POST /admin/api/<method>`, after the token check."""

    def initialize(  # type: ignore[override]
        self, config: Config, executor: Executor, inflight: InFlight
    ) -> None:
        super().initialize(config)
        self.executor = executor
        self.inflight = inflight

    def prepare(self) -> None:
        if self.request.method != "POST":
            self._answer(405)
            return
        query = parse_qs(self.request.query, keep_blank_values=True).get("token") or [""]
        header = self.request.headers.get("Authorization", "")
        if not admin_auth.authorized(
            self.config.admin_secret, self.config.admin_insecure, header, query[0]
        ):
            if not self.config.admin_insecure and not self.config.admin_secret:
                log.error("no admin secret key found in configuration")
            self._answer(401)
            return
        if len(self.request.body) > self.config.api_max_request_body_size:
            self._answer(413, TOO_LARGE, JSON_TYPE)

    async def post(self, method: str | None = None) -> None:
        body = self.request.body
        if method is None:
            await self._legacy(body)
            return
        if method not in METHODS:
            self._answer(404, NOT_FOUND, TEXT_TYPE)
            return
        with self.inflight.track():
            try:
                status, out = await answer_method(self.executor, method, body, False)
            except DecodeError:
                self._answer(400, BAD_REQUEST, TEXT_TYPE)
                return
        self._answer(status, out, JSON_TYPE)

    async def _legacy(self, body: bytes) -> None:
        if self.executor.node.shutting_down:
            self._answer(503)
            return
        with self.inflight.track():
            try:
                if not body:
                    raise DecodeError("empty request body")
                commands = decode_legacy(body)
            except DecodeError:
                self._answer(400, BAD_REQUEST, TEXT_TYPE)
                return
            replies = [await legacy_reply(self.executor, command) for command in commands]
        self._answer(200, b"\n".join(replies), JSON_TYPE)


class AdminWebHandler(tornado.web.StaticFileHandler):
    """The UI's files; the built-in UI gets a strict Content-Security-Policy."""

    def initialize(  # type: ignore[override]
        self, path: str, default_filename: str | None = None, builtin: bool = True
    ) -> None:
        super().initialize(path, default_filename)
        self.builtin = builtin

    def set_extra_headers(self, path: str) -> None:
        self.set_header("Cache-Control", "no-cache")
        self.set_header("X-Content-Type-Options", "nosniff")
        if self.builtin:
            self.set_header("Content-Security-Policy", UI_POLICY)
            self.set_header("X-Frame-Options", "DENY")


# Response headers of the proxied UI that do not pass: hop-by-hop ones, and those the client
# already undid (the body arrives decompressed and whole).
_HOP_HEADERS: Final = frozenset(
    {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
     "transfer-encoding", "upgrade", "content-length", "content-encoding", "server", "date"}
)  # fmt: skip
_FORWARDED_HEADERS: Final = ("Accept", "Accept-Language", "If-None-Match", "If-Modified-Since")


class AdminWebProxyHandler(tornado.web.RequestHandler):
    """`admin_web_proxy_address`: the UI's files fetched from another HTTP server (a UI in
    development), as Centrifugo's reverse proxy. GET and HEAD only; 502 when it is down."""

    SUPPORTED_METHODS = ("GET", "HEAD")

    def initialize(self, target: str) -> None:
        self.target = target.rstrip("/")

    async def get(self, path: str) -> None:
        url = f"{self.target}/{path}"
        if self.request.query:
            url += f"?{self.request.query}"
        headers = {k: v for k in _FORWARDED_HEADERS if (v := self.request.headers.get(k))}
        try:
            response = await tornado.httpclient.AsyncHTTPClient().fetch(
                url,
                method=self.request.method or "GET",
                headers=headers,
                follow_redirects=False,
                raise_error=False,
                request_timeout=10,
            )
        except (OSError, tornado.httpclient.HTTPClientError) as exc:  # no HTTP answer
            log.warning("admin web proxy %s: %s", self.target, exc)
            self.set_status(502)
            self.finish(b"Bad Gateway\n")
            return
        self.set_status(response.code, response.reason)
        self.clear_header("Content-Type")
        for name, value in response.headers.get_all():
            if name.lower() not in _HOP_HEADERS:
                self.add_header(name, value)
        if self.request.method == "HEAD" or response.code in (204, 304):
            self.finish()
        else:
            self.finish(response.body)

    async def head(self, path: str) -> None:
        await self.get(path)


def admin_routes(
    config: Config, executor: Executor, inflight: InFlight
) -> list[tuple[str, type, dict[str, Any]]]:
    """Tornado rules of the admin endpoints and UI ([] unless `admin`). With
    `admin_web_proxy_address` or `admin_web_path` the last rule catches every path below
    the prefix: put these rules last."""
    if not config.admin:
        return []
    if not config.admin_insecure and not (config.admin_password and config.admin_secret):
        log.error(
            "admin is on but admin_password and admin_secret are not both set: "
            "nobody can log in (or set admin_insecure, only behind a firewall)"
        )
    if config.admin_insecure:
        log.warning("admin_insecure: the admin UI and /admin/api need no password or token")
    prefix = re.escape(config.admin_handler_prefix.rstrip("/"))
    base: dict[str, Any] = {"config": config}
    api: dict[str, Any] = {**base, "executor": executor, "inflight": inflight}
    routes: list[tuple[str, type, dict[str, Any]]] = [
        (prefix + "/admin/settings", AdminSettingsHandler, base),
        (prefix + "/admin/auth", AdminAuthHandler, base),
        (prefix + "/admin/api", AdminApiHandler, api),
        (prefix + "/admin/api/([a-z_]+)", AdminApiHandler, api),
    ]
    if config.admin_web_proxy_address:
        proxy: dict[str, Any] = {"target": config.admin_web_proxy_address}
        routes.append((prefix + "/(.*)", AdminWebProxyHandler, proxy))
    elif config.admin_web_path:
        web: dict[str, Any] = {
            "path": config.admin_web_path,
            "default_filename": "index.html",
            "builtin": False,
        }
        routes.append((prefix + "/(.*)", AdminWebHandler, web))
    else:
        files = "|".join(re.escape(name) for name in UI_FILES)
        web = {"path": str(ui_dir()), "default_filename": "index.html", "builtin": True}
        routes.append((prefix + f"/((?:{files})?)", AdminWebHandler, web))
    return routes
