"""A small fan-out (6 subscribers on 2 channels, 40 publications) of bench/fanout.py over one
protocol against a real centripy process, with every delivery accounted for."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parents[2] / "bench"


def small_fanout(config: dict[str, Any], tmp_path: Path, proto: str, http_url: bool) -> None:
    """Start centripy with `config`, run fanout.py with `--proto proto` (its --ws-url the
    server's http:// URL when `http_url`, for the emulation protocols), stop the server, and
    check: all connected, all acknowledged, every delivery once and in order, no errors."""
    from tests.support.server import ServerProcess

    server = ServerProcess(config, tmp_path).start()
    try:
        ws_url = server.http_url if http_url else f"ws://{server.host}:{server.port}"
        command = [
            sys.executable,
            str(BENCH / "fanout.py"),
            *("--proto", proto, "--ws-url", ws_url, "--api-url", f"{server.http_url}/api/publish"),
            *("-n", "6", "-c", "2", "-m", "40", "--drain", "2", "--settle", "0.2"),
            *("--max-seconds", "40", "--server-pid", str(server.pid)),
        ]
        done = subprocess.run(command, capture_output=True, text=True, timeout=90, check=True)
    finally:
        server.stop()
    record = json.loads(done.stdout.strip().splitlines()[-1])
    assert record["connections"] == 6 and record["connect_errors"] == {}
    assert record["publish_acked"] == 40 and record["deliveries_received"] == 6 * 20
    assert (record["lost"], record["duplicated"], record["reordered"]) == (0, 0, 0)
    assert record["client_errors"] == {} and record["disconnects"] == 0
