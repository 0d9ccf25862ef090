"""The admin endpoints over HTTP against a real `centripy serve` (transports/admin.py):
login, the token check, insecure mode, expiry, placement on the ports, the prefix, a custom
web path and the shipped UI files."""

from __future__ import annotations

import contextlib
import functools
import http.server
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from centripy.engine.admin_auth import MAX_AGE, issue_token, verify_token
from centripy.engine.config import Config, ConfigError
from centripy.engine.config_check import validate_config
from tests.support.server import ServerFactory, ServerProcess, free_port, port_accepts
from tests.support.wait import eventually_sync

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

PASSWORD = "admin-password"
SECRET = "admin-secret"
ADMIN: dict[str, Any] = {
    "admin": True,
    "admin_password": PASSWORD,
    "admin_secret": SECRET,
    "namespaces": [{"name": "news", "history_size": 50, "history_ttl": "300s", "presence": True}],
}
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
UI_DIR = Path(__file__).resolve().parents[2] / "centripy" / "admin_ui"


def request(
    port: int,
    path: str,
    body: bytes | None = None,
    headers: Mapping[str, str] | None = None,
    method: str | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of one request to 127.0.0.1:port, whatever the status."""
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", data=body, headers=dict(headers or {}), method=method
    )
    try:
        with _OPENER.open(req, timeout=10) as response:
            return int(response.status), dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        with contextlib.closing(error):
            return int(error.code), dict(error.headers), error.read()


def login(port: int, password: str = PASSWORD, prefix: str = "") -> tuple[int, bytes]:
    body = f"password={urllib.request.quote(password)}".encode()
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    status, _, out = request(port, f"{prefix}/admin/auth", body, form)
    return status, out


def token_of(port: int, prefix: str = "") -> str:
    status, body = login(port, prefix=prefix)
    assert status == 200, body
    token = json.loads(body)["token"]
    assert isinstance(token, str)
    return token


def admin_api(
    port: int, method: str, payload: object, token: str | None, prefix: str = ""
) -> tuple[int, bytes]:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"token {token}"
    path = f"{prefix}/admin/api/{method}" if method else f"{prefix}/admin/api"
    status, _, body = request(port, path, json.dumps(payload).encode(), headers)
    return status, body


@pytest.fixture
def admin_server(server_factory: ServerFactory) -> ServerProcess:
    return server_factory(ADMIN)


def test_login_gives_a_token_signed_with_admin_secret(admin_server: ServerProcess) -> None:
    status, body = login(admin_server.port)
    assert status == 200
    token = json.loads(body)["token"]
    assert verify_token(SECRET, token)
    assert not verify_token("another-secret", token)
    status, _, out = request(
        admin_server.port,
        "/admin/auth",
        json.dumps({"password": PASSWORD}).encode(),
        {"Content-Type": "application/json"},
    )
    assert status == 200 and verify_token(SECRET, json.loads(out)["token"])


def test_a_wrong_password_is_refused(admin_server: ServerProcess) -> None:
    for password in ("wrong", "", PASSWORD.upper(), PASSWORD + " "):
        status, body = login(admin_server.port, password)
        assert status == 400 and b"token" not in body, password
    status, _, _ = request(admin_server.port, "/admin/auth")
    assert status == 405  # POST only


def test_the_api_needs_a_valid_token(admin_server: ServerProcess) -> None:
    port = admin_server.port
    assert admin_api(port, "info", {}, None) == (401, b"")
    assert admin_api(port, "info", {}, "garbage") == (401, b"")
    assert admin_api(port, "", {"method": "info"}, None) == (401, b"")
    forged = issue_token("not-the-secret")
    assert admin_api(port, "info", {}, forged)[0] == 401
    # another scheme in the Authorization header is refused, even with ?token= alongside
    token = token_of(port)
    status, _, _ = request(
        port, f"/admin/api/info?token={token}", b"{}", {"Authorization": f"Bearer {token}"}
    )
    assert status == 401
    # the server API key is not an admin token
    status, _, _ = request(port, "/admin/api/info", b"{}", {"X-API-Key": admin_server.api_key})
    assert status == 401


def test_the_token_runs_server_api_methods(admin_server: ServerProcess) -> None:
    port = admin_server.port
    token = token_of(port)
    status, body = admin_api(port, "info", {}, token)
    assert status == 200
    nodes = json.loads(body)["result"]["nodes"]
    assert len(nodes) == 1 and nodes[0]["name"]
    status, body = admin_api(port, "publish", {"channel": "news:a", "data": {"n": 1}}, token)
    assert status == 200 and json.loads(body)["result"]["offset"] == 1
    # the legacy format, as Centrifugo's /admin/api; the token as a query parameter
    legacy = {"method": "publish", "params": {"channel": "news:a", "data": {"n": 2}}}
    status, _, out = request(port, f"/admin/api?token={token}", json.dumps(legacy).encode())
    assert status == 200 and json.loads(out)["result"]["offset"] == 2
    status, body = admin_api(
        port, "history", {"channel": "news:a", "limit": 10, "reverse": True}, token
    )
    result = json.loads(body)["result"]
    assert [p["data"]["n"] for p in result["publications"]] == [2, 1]
    # API errors come back as the API's own error objects
    status, body = admin_api(port, "history", {"channel": "nope:x"}, token)
    assert status == 200 and json.loads(body)["error"]["code"] == 102
    assert admin_api(port, "no_such_method", {}, token)[0] == 404
    assert admin_api(port, "publish", [], token)[0] == 400
    status, _, _ = request(port, "/admin/api/info", headers={"Authorization": f"token {token}"})
    assert status == 405
    # publications made through the admin API are the server's own: /api sees them
    history = admin_server.api_result("history", {"channel": "news:a", "limit": -1})
    assert [p["offset"] for p in history["publications"]] == [1, 2]


def test_tokens_expire_after_thirty_days(admin_server: ServerProcess) -> None:
    port = admin_server.port
    now = time.time()
    fresh_enough = issue_token(SECRET, now=now - MAX_AGE + 120)
    assert admin_api(port, "info", {}, fresh_enough)[0] == 200
    expired = issue_token(SECRET, now=now - MAX_AGE - 120)
    assert admin_api(port, "info", {}, expired) == (401, b"")


def test_settings(admin_server: ServerProcess) -> None:
    status, headers, body = request(admin_server.port, "/admin/settings")
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert json.loads(body) == {"insecure": False, "edition": "oss"}


def test_login_is_impossible_without_both_password_and_secret(
    server_factory: ServerFactory,
) -> None:
    server = server_factory({"admin": True, "admin_password": PASSWORD})
    assert login(server.port)[0] == 400
    forged = issue_token("anything")
    assert admin_api(server.port, "info", {}, forged)[0] == 401
    assert "admin_password and admin_secret" in server.stderr_path.read_text()


def test_insecure_mode_needs_no_token(server_factory: ServerFactory) -> None:
    server = server_factory({"admin": True, "admin_insecure": True})
    status, body = admin_api(server.port, "info", {}, None)
    assert status == 200 and json.loads(body)["result"]["nodes"]
    assert login(server.port, "anything") == (200, b'{"token":"insecure"}')
    _, _, settings = request(server.port, "/admin/settings")
    assert json.loads(settings)["insecure"] is True
    assert "admin_insecure" in server.stderr_path.read_text()


def test_admin_off_serves_nothing(server_factory: ServerFactory) -> None:
    server = server_factory({"admin_password": PASSWORD, "admin_secret": SECRET})
    for path in ("/", "/app.js", "/admin/settings"):
        assert request(server.port, path)[0] == 404, path
    assert login(server.port)[0] == 404


def test_the_ui_files_are_served(admin_server: ServerProcess) -> None:
    port = admin_server.port
    status, headers, body = request(port, "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert body == (UI_DIR / "index.html").read_bytes()
    assert "default-src 'self'" in headers["Content-Security-Policy"]
    for name in ("app.js", "app.css", "index.html"):
        status, _, body = request(port, f"/{name}")
        assert status == 200 and body == (UI_DIR / name).read_bytes(), name
    for path in ("/nothing.js", "/../setup.cfg", "/admin_ui/app.js", "/%2e%2e/setup.cfg"):
        assert request(port, path)[0] == 404, path
    # the server API still answers next to the UI
    assert admin_server.api_result("info")["nodes"]


def test_on_the_internal_port_unless_admin_external(server_factory: ServerFactory) -> None:
    internal = free_port()
    server = server_factory({**ADMIN, "internal_port": internal})
    eventually_sync(lambda: port_accepts("127.0.0.1", internal), 5, "the internal port")
    assert request(internal, "/")[0] == 200
    assert login(internal)[0] == 200
    assert request(server.port, "/")[0] == 404
    assert login(server.port)[0] == 404

    internal = free_port()
    server = server_factory({**ADMIN, "internal_port": internal, "admin_external": True})
    eventually_sync(lambda: port_accepts("127.0.0.1", internal), 5, "the internal port")
    assert request(server.port, "/")[0] == 200
    assert login(server.port)[0] == 200
    assert request(internal, "/")[0] == 404
    assert request(internal, "/api/info", b"{}", {"X-API-Key": server.api_key})[0] == 200


def test_handler_prefix(server_factory: ServerFactory) -> None:
    server = server_factory({**ADMIN, "admin_handler_prefix": "/adm/"})
    assert request(server.port, "/adm/")[0] == 200
    assert request(server.port, "/adm/app.js")[0] == 200
    assert request(server.port, "/")[0] == 404
    token = token_of(server.port, prefix="/adm")
    assert admin_api(server.port, "info", {}, token, prefix="/adm")[0] == 200
    assert login(server.port)[0] == 404


def test_admin_web_path_serves_another_ui(server_factory: ServerFactory, tmp_path: Path) -> None:
    web = tmp_path / "web"
    (web / "static").mkdir(parents=True)
    (web / "index.html").write_text("<p>custom</p>")
    (web / "static" / "x.js").write_text("x()")
    server = server_factory({**ADMIN, "admin_web_path": str(web)})
    status, headers, body = request(server.port, "/")
    assert (status, body) == (200, b"<p>custom</p>")
    assert "Content-Security-Policy" not in headers
    assert request(server.port, "/static/x.js")[2] == b"x()"
    assert request(server.port, "/app.js")[0] == 404
    # the catch-all comes after the API, health and the admin endpoints
    assert server.api_result("info")["nodes"]
    assert request(server.port, "/health")[0] == 200
    assert login(server.port)[0] == 200


@contextlib.contextmanager
def static_server(root: Path) -> Iterator[int]:
    """A real HTTP server (http.server) serving `root` on a free port, in a thread."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

    handler = functools.partial(Quiet, directory=str(root))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(httpd.server_address[1])
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(10)


def test_admin_web_proxy_address(server_factory: ServerFactory, tmp_path: Path) -> None:
    web = tmp_path / "dev-ui"
    (web / "js").mkdir(parents=True)
    (web / "index.html").write_text("<p>dev server</p>")
    (web / "js" / "main.js").write_text("main()")
    with static_server(web) as port:
        target = f"http://127.0.0.1:{port}"
        server = server_factory({**ADMIN, "admin_web_proxy_address": target})
        status, headers, body = request(server.port, "/")
        assert (status, body) == (200, b"<p>dev server</p>")
        assert headers["Content-Type"].startswith("text/html")
        status, headers, body = request(server.port, "/js/main.js?v=1")
        assert (status, body) == (200, b"main()")
        assert "javascript" in headers["Content-Type"]
        assert request(server.port, "/missing.js")[0] == 404
        assert request(server.port, "/js/main.js", method="HEAD")[:1] == (200,)
        # the admin endpoints and the API are not proxied
        assert login(server.port)[0] == 200
        assert server.api_result("info")["nodes"]
    assert request(server.port, "/")[0] == 502  # the dev server is gone


def test_admin_web_proxy_address_must_be_a_url() -> None:
    for bad in ("127.0.0.1:3000", "ftp://x", "http://"):
        with pytest.raises(ConfigError, match="admin_web_proxy_address"):
            validate_config(Config(admin_web_proxy_address=bad))
    validate_config(Config(admin_web_proxy_address="https://ui.example:8443/base"))
