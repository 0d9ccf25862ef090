"""examples/chat in a real browser: a `centripy serve` process with the example's config (its
`allowed_origins` pointed at the page's free port), the example's static server (serve.py),
and Debian's Chromium driven headlessly by tests/js/browser_chat.mjs through playwright-core.

For each transport (WebSocket, SSE, HTTP-streaming) two pages join a room; the script checks
the connected transport, a message sent from one page arriving in the other, a server API
publish arriving in both, presence and join/leave, history on join and recovery on rejoin (see
the script's header). Without Chromium, Node or the npm packages the test skips, or fails under
CI=true. Everything here runs in the test's thread.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.server import ServerFactory, ServerProcess, free_port, port_accepts, tail
from tests.support.services import unavailable

pytestmark = [pytest.mark.integration, pytest.mark.node, pytest.mark.timeout(60)]

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "chat"
JS_DIR = ROOT / "tests" / "js"
CHROMIUM = Path("/usr/bin/chromium")
TRANSPORTS = ("websocket", "sse", "http_stream")
NAMESPACE = "chat"
SCRIPT_TIMEOUT = 45.0  # the whole browser scenario, all three transports
STEP_TIMEOUT_MS = 10_000
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def require_browser() -> str:
    """The node executable, after checking Chromium and playwright-core are there."""
    node = shutil.which("node")
    if node is None:
        unavailable("node is not installed (the browser test needs Node.js 20)")
    if not (JS_DIR / "node_modules" / "playwright-core").is_dir():
        unavailable("tests/js/node_modules has no playwright-core: run ./scripts/setup.sh")
    if not os.access(CHROMIUM, os.X_OK):
        unavailable(f"{CHROMIUM} is missing (./scripts/setup.sh installs it when run as root)")
    return node


def chat_config(page_origin: str) -> dict[str, Any]:
    """examples/chat/config.json with `allowed_origins` set to the test page's origin."""
    config: dict[str, Any] = json.loads((EXAMPLE / "config.json").read_text())
    config["allowed_origins"] = [page_origin]
    return config


class PageServer:
    """examples/chat/serve.py in its own process on a free port."""

    def __init__(self, workdir: Path, server_url: str, port: int) -> None:
        self.port = port
        self.log = workdir / "serve.log"
        self.command = [
            sys.executable, str(EXAMPLE / "serve.py"), "--port", str(self.port),
            "--server", server_url, "--namespace", NAMESPACE,
        ]  # fmt: skip
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

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
                self.stop()
                raise AssertionError(f"serve.py did not start ({code}):\n{tail(self.log)}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            with _OPENER.open(f"http://127.0.0.1:{self.port}{path}", timeout=10) as response:
                return int(response.status), response.read()
        except urllib.error.HTTPError as error:
            with contextlib.closing(error):
                return int(error.code), error.read()


@pytest.fixture
def chat(
    tmp_path: Path, server_factory: ServerFactory
) -> Iterator[tuple[ServerProcess, PageServer]]:
    """centripy (the example config, adapted) and the page server, both started."""
    page_port = free_port()
    server = server_factory(chat_config(f"http://127.0.0.1:{page_port}"))
    page = PageServer(tmp_path, server.http_url, page_port)
    page.start()
    try:
        yield server, page
    finally:
        page.stop()


def run_browser(
    node: str,
    scenario: dict[str, Any],
    diagnostics: str,
    script: str = "browser_chat.mjs",
    timeout: float = SCRIPT_TIMEOUT + 5,
) -> list[dict[str, Any]]:
    """Run `script` (in tests/js) on `scenario` in its own process group (so Chromium goes too
    if it has to be killed); returns its events, or fails the test with everything it printed."""
    proc = subprocess.Popen(
        [node, str(JS_DIR / script)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=JS_DIR,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(json.dumps(scenario).encode(), timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
    events = [json.loads(line) for line in out.decode().splitlines() if line.strip()]
    if proc.returncode != 0 or not events or events[-1].get("event") != "done":
        lines = "\n".join(json.dumps(event) for event in events)
        raise AssertionError(
            f"{script} exited with {proc.returncode}\nevents:\n{lines}\n"
            f"stderr:\n{err.decode(errors='replace')[-4000:]}\n{diagnostics}"
        )
    return events


def messages_of(events: list[dict[str, Any]], transport: str, page: str) -> list[tuple[str, str]]:
    wanted = {"event": "messages", "transport": transport, "page": page}
    for event in events:
        if wanted.items() <= event.items():
            return [(message["text"], message["kind"]) for message in event["messages"]]
    raise AssertionError(f"no messages reported for {page} on {transport}: {events}")


def test_chat_page_on_every_transport_in_chromium(
    chat: tuple[ServerProcess, PageServer], tmp_path: Path
) -> None:
    node = require_browser()
    server, page = chat
    screenshot = tmp_path / "chat.png"
    scenario = {
        "pageUrl": page.url,
        "apiUrl": server.api_url,
        "apiKey": server.api_key,
        "executablePath": str(CHROMIUM),
        "userDataDir": str(tmp_path / "chromium-profile"),
        "screenshot": str(screenshot),
        "transports": list(TRANSPORTS),
        "namespace": NAMESPACE,
        "timeoutMs": int(SCRIPT_TIMEOUT * 1000),
        "stepTimeoutMs": STEP_TIMEOUT_MS,
    }
    diagnostics = f"{server.diagnostics()}\n--- serve.py ---\n{tail(page.log)}"
    events = run_browser(node, scenario, diagnostics)

    connected = {(e["transport"], e["page"]): e["via"] for e in events if e["event"] == "connected"}
    assert connected == {(t, who): t for t in TRANSPORTS for who in ("alice", "bob")}
    for transport in TRANSPORTS:
        texts = [
            f"before bob {transport}",
            f"hello from alice {transport}",
            f"from the api {transport}",
            f"while bob was away {transport}",
        ]
        assert messages_of(events, transport, "alice") == [(text, "live") for text in texts]
        assert messages_of(events, transport, "bob") == list(
            zip(texts, ["history", "live", "live", "recovered"], strict=True)
        )
    assert screenshot.stat().st_size > 0
    assert screenshot.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_page_server_serves_only_the_page_files(chat: tuple[ServerProcess, PageServer]) -> None:
    server, page = chat
    status, html = page.get("/")
    assert status == 200 and b'<script src="/chat.js"></script>' in html
    assert page.get("/chat.js") == (200, (EXAMPLE / "chat.js").read_bytes())
    status, script = page.get("/centrifuge.js")
    assert status == 200 and b"globalThis.Centrifuge" in script
    status, settings = page.get("/settings.js")
    expected = {"server": server.http_url, "namespace": NAMESPACE}
    assert (
        status == 200 and settings.decode() == f"window.CHAT_SETTINGS = {json.dumps(expected)};\n"
    )
    for private in ("/serve.py", "/config.json", "/README.md", "/../config.json"):
        assert page.get(private)[0] == 404, private


def test_page_server_rejects_a_bad_server_url(tmp_path: Path) -> None:
    completed = subprocess.run(
        [sys.executable, str(EXAMPLE / "serve.py"), "--server", "ws://127.0.0.1:8000/x"],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert completed.returncode == 2
    assert "expected http(s)://host:port" in completed.stderr
