"""Connects per second through the HTTP connect proxy against JWT connects (not a test).

A real `centripy serve` process; a local backend app (aiohttp, in its own process) answering
the connect proxy with a user; WebSocket clients (aiohttp, in this process) that each open a
WebSocket, send `connect`, wait for the reply and close, `--concurrency` at a time. The
same run with a JWT and no proxy call is the baseline. Prints one JSON line per mode, and
for the proxy mode the number of proxy requests and of distinct TCP connections the backend
saw (keep-alive pooling: far fewer connections than requests). The server's CPU per
connect is the figure to compare on a busy machine (every record carries the loadavg):

    .venv/bin/python bench/bench_proxy.py --connects 3000 --concurrency 50
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
from common import CpuWindow, load_average

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.integration.conftest import make_jwt
from tests.support.server import ServerProcess, free_port, port_accepts

SECRET = "bench-secret-bench-secret-bench-secret"

BACKEND = """
import sys
from aiohttp import web

requests, peers = 0, set()

async def connect(request):
    global requests
    requests += 1
    peers.add(request.transport.get_extra_info("peername")[1])
    await request.read()
    return web.json_response({"result": {"user": "user-%d" % requests}})

async def stats(request):
    return web.json_response({"requests": requests, "connections": len(peers)})

app = web.Application()
app.router.add_post("/connect", connect)
app.router.add_get("/stats", stats)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)
"""


async def one_connect(session: aiohttp.ClientSession, url: str, token: str) -> None:
    async with session.ws_connect(url) as ws:
        body: dict[str, Any] = {"token": token} if token else {}
        await ws.send_str(json.dumps({"id": 1, "connect": body}))
        msg = await ws.receive(timeout=10)
        reply = json.loads(msg.data)
        if "connect" not in reply:
            raise RuntimeError(f"connect failed: {reply}")


async def run(url: str, total: int, concurrency: int, token: str) -> dict[str, Any]:
    """`total` connects, `concurrency` at a time; connects/s and latency percentiles."""
    latencies: list[float] = []
    queue = iter(range(total))
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            for _ in queue:
                started = time.perf_counter()
                await one_connect(session, url, token)
                latencies.append(time.perf_counter() - started)

        began = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - began
    latencies.sort()

    def pct(p: float) -> float:
        return round(1000 * latencies[min(len(latencies) - 1, int(p * len(latencies)))], 2)

    return {
        "connects": total,
        "concurrency": concurrency,
        "seconds": round(elapsed, 3),
        "connects_per_s": round(total / elapsed, 1),
        "p50_ms": pct(0.5),
        "p95_ms": pct(0.95),
        "p99_ms": pct(0.99),
    }


async def backend_stats(endpoint: str) -> dict[str, Any]:
    url = endpoint.removesuffix("/connect") + "/stats"
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        stats: dict[str, Any] = await response.json()
        return stats


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connects", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=200)
    return parser.parse_args()


def compare(
    args: argparse.Namespace,
    backend_script: str,
    endpoint_of: Callable[[int], str],
    mode: str,
    stats_of: Callable[[str], Awaitable[dict[str, Any]]],
) -> None:
    """Start the back end (`backend_script` run with its port) and a server whose connect
    proxy is `endpoint_of(port)`; print one JSON line for JWT connects and one for connects
    through the proxy (`mode`), with the back end's `stats_of(endpoint)`."""
    port = free_port()
    endpoint = endpoint_of(port)
    backend = subprocess.Popen([sys.executable, "-c", backend_script, str(port)])
    try:
        deadline = time.monotonic() + 10
        while not port_accepts("127.0.0.1", port):
            if time.monotonic() > deadline or backend.poll() is not None:
                raise SystemExit("backend did not start")
            time.sleep(0.05)
        config = {
            "api_key": "bench",
            "token_hmac_secret_key": SECRET,
            "log_level": "warn",
            "proxy_connect_endpoint": endpoint,
            "client_connection_rate_limit": 0,
        }
        with tempfile.TemporaryDirectory() as workdir:
            server = ServerProcess(config, Path(workdir)).start()
            try:
                token = make_jwt("jwt-user", secret=SECRET)
                for name, tok in (("jwt", token), (mode, "")):
                    asyncio.run(run(server.ws_url, args.warmup, args.concurrency, tok))
                    assert server.pid is not None
                    with CpuWindow(server.pid) as cpu:
                        result = asyncio.run(
                            run(server.ws_url, args.connects, args.concurrency, tok)
                        )
                    result["mode"] = name
                    result["server_cpu_ms_per_connect"] = round(
                        1000 * cpu.server_cpu / args.connects, 3
                    )
                    result["loadavg"] = load_average()
                    if name == mode:
                        result["backend"] = asyncio.run(stats_of(endpoint))
                    print(json.dumps(result), flush=True)
            finally:
                server.stop()
    finally:
        backend.terminate()
        backend.wait(10)


def main() -> None:
    compare(
        parse_args(),
        BACKEND,
        lambda port: f"http://127.0.0.1:{port}/connect",
        "connect_proxy",
        backend_stats,
    )


if __name__ == "__main__":
    main()
