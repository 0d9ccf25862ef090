"""The admin web UI in a real browser: a `centripy serve` process with the admin on, Debian's
Chromium driven headlessly by tests/js/admin_ui.mjs through playwright-core (see the
script's header for the steps: login, the node live, channels, the API console's `publish`
arriving in the channel inspector's live tail of a second page, history paging).

The screenshots are saved under the test's tmp dir and, when CENTRIPY_SCREENSHOT_DIR is set,
copied there; their paths are printed. Without Chromium, Node or the npm packages the test
skips (fails under CI=true).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import make_jwt
from tests.integration.test_browser_chat import CHROMIUM, require_browser, run_browser
from tests.support.server import ServerFactory, ServerProcess

pytestmark = [pytest.mark.integration, pytest.mark.node, pytest.mark.timeout(150)]

PASSWORD = "admin-browser-password"
CHANNEL = "news:room"
PAGING_CHANNEL = "news:paging"
PAGING_COUNT = 25
SCRIPT_TIMEOUT = 110.0
STEP_TIMEOUT_MS = 20_000
CONFIG: dict[str, Any] = {
    "admin": True,
    "admin_password": PASSWORD,
    "admin_secret": "admin-browser-secret",
    "namespaces": [{"name": "news", "history_size": 100, "history_ttl": "600s", "presence": True}],
}


def one(events: list[dict[str, Any]], name: str) -> dict[str, Any]:
    found = [event for event in events if event["event"] == name]
    assert len(found) == 1, (name, events)
    return found[0]


def keep_screenshots(paths: list[Path]) -> list[Path]:
    """Copy the screenshots to CENTRIPY_SCREENSHOT_DIR when set; print every path."""
    kept = list(paths)
    target = os.environ.get("CENTRIPY_SCREENSHOT_DIR")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        kept += [Path(shutil.copy(path, Path(target) / path.name)) for path in paths]
    for path in kept:
        print(f"admin UI screenshot: {path}")
    return kept


def history_epoch(server: ServerProcess, channel: str) -> str:
    epoch = server.api_result("history", {"channel": channel})["epoch"]
    assert isinstance(epoch, str) and epoch
    return epoch


def test_admin_ui_in_chromium(server_factory: ServerFactory, tmp_path: Path) -> None:
    node = require_browser()
    server = server_factory(CONFIG)
    shots = {name: tmp_path / f"admin_ui_{name}.png" for name in ("inspector", "nodes", "history")}
    scenario = {
        "baseUrl": f"{server.http_url}/",
        "password": PASSWORD,
        "apiUrl": server.api_url,
        "apiKey": server.api_key,
        "wsUrl": server.ws_url,
        "watcherToken": make_jwt("watcher", channels=[CHANNEL]),
        "channel": CHANNEL,
        "pagingChannel": PAGING_CHANNEL,
        "pagingCount": PAGING_COUNT,
        "executablePath": str(CHROMIUM),
        "userDataDir": str(tmp_path / "chromium-profile"),
        "screenshot": str(shots["inspector"]),
        "nodesScreenshot": str(shots["nodes"]),
        "historyScreenshot": str(shots["history"]),
        "timeoutMs": int(SCRIPT_TIMEOUT * 1000),
        "stepTimeoutMs": STEP_TIMEOUT_MS,
    }
    events = run_browser(node, scenario, server.diagnostics(), "admin_ui.mjs", SCRIPT_TIMEOUT + 10)

    assert one(events, "login-refused")["message"] == "Wrong password."
    info = server.api_result("info")["nodes"][0]
    shown = one(events, "node")
    assert (shown["name"], shown["uid"], shown["clients"]) == (info["name"], info["uid"], 0)
    assert one(events, "watcher-connected")["subs"] == [CHANNEL]
    assert one(events, "channel-listed")["subscribers"] == 1
    presence = one(events, "presence")
    assert len(presence["clients"]) == 1 and presence["clients"][0].startswith("watcher ")
    assert presence["offset"] == 0

    result = one(events, "console-result")
    published = result["result"]["result"]
    assert published["offset"] == 1 and published["epoch"] == history_epoch(server, CHANNEL)
    assert result["status"].startswith("publish: HTTP 200")
    tail_event = one(events, "tail")
    print(f"console publish -> shown in the live tail: {tail_event['latencyMs']} ms")
    tail = tail_event["items"]
    assert [item["offset"] for item in tail] == [1]
    assert json.loads(tail[0]["text"])["text"] == "hello from the console"
    assert one(events, "watcher-received")["offsets"] == [1]
    history = server.api_result("history", {"channel": CHANNEL, "limit": -1})
    assert [p["data"]["text"] for p in history["publications"]] == ["hello from the console"]

    pages = one(events, "history-pages")
    newest = list(range(PAGING_COUNT, PAGING_COUNT - 10, -1))
    middle = list(range(PAGING_COUNT - 10, PAGING_COUNT - 20, -1))
    assert pages["pages"] == [newest, middle, list(range(PAGING_COUNT - 20, 0, -1)), middle, newest]
    assert pages["lastOlderDisabled"] is True
    assert [json.loads(data)["n"] for data in pages["firstPageData"]] == newest
    assert pages["range"] == f"offsets {PAGING_COUNT} to {PAGING_COUNT - 9} of {PAGING_COUNT}"
    assert one(events, "history-buttons") == {
        "event": "history-buttons", "newer": True, "older": False,
    }  # fmt: skip

    for path in keep_screenshots(list(shots.values())):
        assert path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n"), path
