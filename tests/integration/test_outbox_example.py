"""examples/outbox_app end to end: the example web app (its own process) writes its row and
the outbox row in one transaction into a SQLite file; a real `centripy serve` process with the
example's config consumes the outbox; a real centrifuge-python subscriber receives the
message. Also checks the page and the centrifuge-js file the app serves."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest

from tests.integration.conftest import BASE_CONFIG, TEST_SECRET
from tests.integration.consumers_support import WAIT, server_log, subscriber
from tests.support.server import ServerFactory, free_port, port_accepts, tail

pytestmark = [pytest.mark.integration, pytest.mark.timeout(30)]

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "outbox_app"
JS_FILE = ROOT / "tests" / "js" / "node_modules" / "centrifuge" / "dist" / "centrifuge.js"
CHANNEL = "chat:messages"
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class App:
    """The example app process; requests are blocking (run them in a thread)."""

    def __init__(self, workdir: Path, db: Path, websocket_url: str) -> None:
        self.port = free_port()
        self.log = workdir / "app.log"
        self.command = [
            sys.executable, str(EXAMPLE / "app.py"), "--port", str(self.port),
            "--database-url", f"sqlite+aiosqlite:///{db}", "--centrifugo-url", websocket_url,
            "--token-secret", TEST_SECRET, "--channel", CHANNEL,
        ]  # fmt: skip
        self.proc: subprocess.Popen[bytes] | None = None

    def init_db(self) -> None:
        subprocess.run([*self.command, "--init-only"], check=True, timeout=20, cwd=EXAMPLE)

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(self.command, stdout=log, stderr=log, cwd=EXAMPLE)
        deadline = time.monotonic() + 15
        while not port_accepts("127.0.0.1", self.port):
            try:
                code = self.proc.wait(timeout=0.05)
            except subprocess.TimeoutExpired:
                code = None
            if code is not None or time.monotonic() > deadline:
                raise AssertionError(f"app did not start ({code}):\n{tail(self.log)}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def request(self, path: str, body: Any = None) -> tuple[int, bytes]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=data)
        try:
            with _OPENER.open(request, timeout=10) as response:
                return int(response.status), response.read()
        except urllib.error.HTTPError as error:
            with contextlib.closing(error):
                return int(error.code), error.read()

    async def call(self, path: str, body: Any = None) -> tuple[int, Any]:
        status, raw = await asyncio.to_thread(self.request, path, body)
        return status, raw


def example_config(db: Path) -> dict[str, Any]:
    """The example's centripy.json with the test's secret and the test's database file."""
    config: dict[str, Any] = json.loads((EXAMPLE / "centripy.json").read_text())
    config.update({k: BASE_CONFIG[k] for k in ("api_key", "token_hmac_secret_key")})
    config["consumers"][0]["postgresql"]["dsn"] = f"sqlite:///{db}"
    return config


@pytest.fixture
def app_and_server(tmp_path: Path, server_factory: ServerFactory) -> Iterator[tuple[App, Any]]:
    if not JS_FILE.is_file():
        pytest.skip("tests/js/node_modules is missing: run ./scripts/setup.sh")
    db = tmp_path / "app.db"
    server = server_factory(example_config(db), start=False)
    app = App(tmp_path, db, server.ws_url)
    app.init_db()
    server.start()
    app.start()
    try:
        yield app, server
    finally:
        app.stop()


async def test_post_reaches_the_subscriber_through_the_outbox(
    app_and_server: tuple[App, Any],
) -> None:
    app, server = app_and_server
    async with subscriber(server, CHANNEL) as sub:
        status, body = await app.call("/messages", {"text": "hello"})
        assert (status, json.loads(body)) == (201, {"id": 1})
        assert await sub.wait_count(1, within=WAIT) == [{"id": 1, "text": "hello"}]
        for text in ("two", "three", "four"):
            assert (await app.call("/messages", {"text": text}))[0] == 201
        received = await sub.wait_count(4, within=WAIT)
    assert [m["text"] for m in received] == ["hello", "two", "three", "four"]
    assert [m["id"] for m in received] == [1, 2, 3, 4]
    status, body = await app.call("/messages")
    assert status == 200
    assert [m["text"] for m in json.loads(body)["messages"]] == ["hello", "two", "three", "four"]
    assert "skipping" not in server_log(server)


async def test_invalid_message_is_refused_and_nothing_is_published(
    app_and_server: tuple[App, Any],
) -> None:
    app, server = app_and_server
    async with subscriber(server, CHANNEL) as sub:
        assert (await app.call("/messages", {"text": ""}))[0] == 400
        assert (await app.call("/messages", {"nope": 1}))[0] == 400
        assert (await app.call("/messages", {"text": "ok"}))[0] == 201
        assert await sub.wait_count(1, within=WAIT) == [{"id": 1, "text": "ok"}]


async def test_page_script_and_token(app_and_server: tuple[App, Any]) -> None:
    app, server = app_and_server
    status, page = await app.call("/")
    assert status == 200
    html = page.decode()
    assert '<script src="/static/centrifuge.js"></script>' in html
    assert json.dumps(server.ws_url) in html and json.dumps(CHANNEL) in html
    status, script = await app.call("/static/centrifuge.js")
    assert status == 200 and script == JS_FILE.read_bytes()
    assert b"globalThis.Centrifuge" in script
    status, token = await app.call("/token")
    with warnings.catch_warnings():  # the test secret is short on purpose
        warnings.simplefilter("ignore", jwt.warnings.InsecureKeyLengthWarning)
        claims = jwt.decode(json.loads(token)["token"], TEST_SECRET, algorithms=["HS256"])
    assert status == 200 and claims["sub"].startswith("visitor-")
