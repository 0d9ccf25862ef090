"""Mass reconnect with stream recovery against a real server (not a test).

N WebSocket clients (protocol v2 JSON, `client_insecure`) subscribe with `recoverable: true` in
a namespace with `force_recovery` (variant `one`: all on one channel; `each`: every client on its
own channel), remember epoch/offset and disconnect. M publications are then made through the
HTTP API (batch of publishes for `one`, broadcast for `each`). Then all N reconnect at once,
sending `connect` and `subscribe {recover: true, offset, epoch}` in one frame, and the clock
runs until every client has its reply with `recovered: true` and exactly the M missed
publications, contiguous after its offset. One JSON line per run, one median line per case:

    .venv/bin/python bench/bench_recovery.py                      # N=1000, M=100,1000, 3 repeats
    .venv/bin/python bench/bench_recovery.py --variants one --missed 100 --backends sqlite

With --storm, a reconnect storm after a server restart instead (issue 20 target 4; 19,000
clients, 4 processes, M=10; see recovery_storm.py):

    .venv/bin/python bench/bench_recovery.py --storm --backends sqlite --variants one
    .venv/bin/python bench/bench_recovery.py --storm --clients 2000          # quick

The clients live in --procs processes (aiohttp); every wait is bounded by --timeout.
`client_recovery_max_publication_limit` is set to max(M) (Centrifugo's default, 300, would make
M=1000 unrecoverable by design).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import recovery_storm as storm
from common import (
    API_KEY,
    PG_URL,
    CpuWindow,
    ServerProcess,
    backend_database,
    bench_server,
    emit,
    load_average,
    median_summary,
    profile_summary,
    py_spy,
    run_backends,
    run_id,
)

NAMESPACE = "rec"
TARGET_SECONDS = 5.0  # issue 7: 1,000 clients x 100 missed, all recovered
SUMMARY_KEYS = (
    "seconds",
    "delivered_per_s",
    "client_p50_s",
    "client_p99_s",
    "server_cpu_s",
    "client_cpu_s",
    "publish_seconds",
)


def server_config(database_url: str, max_missed: int, log_level: str) -> dict[str, Any]:
    config: dict[str, Any] = {
        "database_url": database_url,
        "client_insecure": True,
        "client_recovery_max_publication_limit": max(300, max_missed),
        "namespaces": [
            {
                "name": NAMESPACE,
                "history_size": max(1000, max_missed),
                "history_ttl": "600s",
                "force_recovery": True,
            }
        ],
    }
    if log_level:
        config["log_level"] = log_level
    return config


# --- clients (run in worker processes, each on its own loop) -------------------------------


@dataclass
class Position:
    channel: str
    epoch: str
    offset: int


@dataclass
class PhaseResult:
    started: float  # CLOCK_MONOTONIC, comparable across processes
    client_cpu: float = 0.0
    positions: list[Position] = field(default_factory=list)
    done_at: list[float] = field(default_factory=list)  # per recovered client
    delivered: int = 0
    failures: list[str] = field(default_factory=list)


def connect_frame(subscribe: dict[str, Any]) -> str:
    """`connect` and `subscribe` in one frame, as centrifuge-js sends them."""
    return '{"id":1,"connect":{}}\n' + orjson.dumps({"id": 2, "subscribe": subscribe}).decode()


async def await_subscribe_reply(ws: aiohttp.ClientWebSocketResponse) -> dict[str, Any]:
    """Read frames until the reply to command 2; raises RuntimeError on an error reply or a
    close. Pushes and pings before it are skipped (the caller bounds the wait)."""
    while True:
        msg = await ws.receive()
        if msg.type != aiohttp.WSMsgType.TEXT:
            raise RuntimeError(f"socket {msg.type.name} (code {ws.close_code}) before reply")
        for line in msg.data.split("\n"):
            reply = orjson.loads(line)
            if reply.get("id") in (1, 2) and "error" in reply:
                raise RuntimeError(f"reply {reply['id']}: error {reply['error']}")
            if reply.get("id") == 2:
                result: dict[str, Any] = reply["subscribe"]
                return result


def check_recovered(result: dict[str, Any], pos: Position, missed: int) -> str:
    """'' if the subscribe result recovered exactly the `missed` publications after `pos`."""
    if result.get("recovered") is not True:
        return f"recovered={result.get('recovered')} epoch={result.get('epoch')}"
    if result.get("epoch") != pos.epoch:
        return f"epoch {result.get('epoch')} != {pos.epoch}"
    offsets = [p.get("offset") for p in result.get("publications", [])]
    if offsets != list(range(pos.offset + 1, pos.offset + missed + 1)):
        return f"{len(offsets)} publications, offsets {offsets[:3]}..., want {missed}"
    return ""


async def subscribe_all(ws_url: str, channels: list[str], timeout: float) -> PhaseResult:
    """Phase 1: every client subscribes (at most 100 handshakes at a time), all stay connected
    until the last has its position, then all disconnect."""
    cpu0 = time.process_time()
    result = PhaseResult(time.monotonic())
    gate = asyncio.Semaphore(100)
    subscribed = 0
    everyone = asyncio.Event()

    async def client(session: aiohttp.ClientSession, channel: str) -> None:
        nonlocal subscribed
        async with gate:
            ws = await session.ws_connect(ws_url, autoping=True)
        try:
            await ws.send_str(connect_frame({"channel": channel, "recoverable": True}))
            reply = await await_subscribe_reply(ws)
            result.positions.append(Position(channel, reply["epoch"], reply.get("offset", 0)))
            subscribed += 1
            if subscribed == len(channels):
                everyone.set()
            await everyone.wait()
        finally:
            await ws.close()

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session, asyncio.timeout(timeout):
        await asyncio.gather(*(client(session, c) for c in channels))
    result.client_cpu = time.process_time() - cpu0
    return result


async def recover_all(
    ws_url: str, positions: list[Position], missed: int, timeout: float
) -> PhaseResult:
    """Phase 2: all clients reconnect at once with recover; each records when its reply has
    been checked. Failures (including timeouts) are collected, not raised."""
    cpu0 = time.process_time()
    result = PhaseResult(time.monotonic())

    async def client(session: aiohttp.ClientSession, pos: Position) -> None:
        subscribe = {
            "channel": pos.channel,
            "recoverable": True,
            "recover": True,
            "offset": pos.offset,
            "epoch": pos.epoch,
        }
        try:
            async with asyncio.timeout(timeout), session.ws_connect(ws_url) as ws:
                await ws.send_str(connect_frame(subscribe))
                reply = await await_subscribe_reply(ws)
                problem = check_recovered(reply, pos, missed)
                if problem:
                    result.failures.append(f"{pos.channel}: {problem}")
                    return
                result.done_at.append(time.monotonic())
                result.delivered += missed
        except (TimeoutError, aiohttp.ClientError, RuntimeError, OSError) as error:
            result.failures.append(f"{pos.channel}: {type(error).__name__}: {error}")

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(client(session, p) for p in positions))
    result.client_cpu = time.process_time() - cpu0
    return result


def subscribe_entry(ws_url: str, channels: list[str], timeout: float) -> PhaseResult:
    return asyncio.run(subscribe_all(ws_url, channels, timeout))


def recover_entry(ws_url: str, positions: list[Position], missed: int, t: float) -> PhaseResult:
    return asyncio.run(recover_all(ws_url, positions, missed, t))


def warm_worker(_: int) -> int:
    import os

    return os.getpid()


# --- publishing the missed publications (main process) -------------------------------------


async def publish_missed(api_url: str, channels: list[str], missed: int, tag: str) -> float:
    """Publish `missed` publications into every channel of `channels` (a batch of publishes
    for one channel, broadcasts for several), 4 callers; returns the seconds it took."""
    headers = {"X-API-Key": API_KEY, "Content-Type": "application/json"}
    if len(channels) == 1:
        bodies = [
            (
                "batch",
                orjson.dumps(
                    {
                        "commands": [
                            {"publish": {"channel": channels[0], "data": {"i": i, "t": tag}}}
                            for i in range(k, min(k + 100, missed))
                        ]
                    }
                ),
            )
            for k in range(0, missed, 100)
        ]
    else:
        bodies = [
            ("broadcast", orjson.dumps({"channels": channels, "data": {"i": i, "t": tag}}))
            for i in range(missed)
        ]
    work = iter(bodies)
    started = time.monotonic()

    async def caller(session: aiohttp.ClientSession) -> None:
        for method, body in work:
            async with session.post(f"{api_url}/{method}", data=body) as response:
                text = await response.read()
                if response.status != 200 or b'"error"' in text:
                    raise RuntimeError(f"/api/{method}: HTTP {response.status} {text[:300]!r}")

    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(headers=headers, timeout=timeout) as session:
        await asyncio.gather(*(caller(session) for _ in range(4)))
    return time.monotonic() - started


# --- runs and cases ------------------------------------------------------------------------


def split(items: list[Any], parts: int) -> list[list[Any]]:
    return [items[p::parts] for p in range(parts) if items[p::parts]]


def one_run(
    args: argparse.Namespace,
    pool: ProcessPoolExecutor,
    server: ServerProcess,
    case: dict[str, Any],
    profile: Path | None = None,
) -> dict[str, Any]:
    tag = run_id()
    n, missed = args.clients, case["missed"]
    if case["variant"] == "one":
        names = [f"{NAMESPACE}:one-{tag}"] * n
    else:
        names = [f"{NAMESPACE}:each-{tag}-{i}" for i in range(n)]
    parts = split(names, args.procs)
    phase1 = list(
        pool.map(subscribe_entry, [server.ws_url] * len(parts), parts, [args.timeout] * len(parts))
    )
    positions = [p for r in phase1 for p in r.positions]
    if len(positions) != n:
        raise RuntimeError(f"only {len(positions)} of {n} clients subscribed")
    publish_seconds = asyncio.run(publish_missed(server.api_url, sorted(set(names)), missed, tag))
    groups = split(positions, args.procs)
    assert server.pid is not None
    with py_spy(server.pid, profile), CpuWindow(server.pid) as window:
        t0 = time.monotonic()
        futures = [
            pool.submit(recover_entry, server.ws_url, g, missed, args.timeout) for g in groups
        ]
        phase2 = [f.result() for f in futures]
    done = sorted(t for r in phase2 for t in r.done_at)
    failures = [f for r in phase2 for f in r.failures]
    seconds = (done[-1] - t0) if done else float("nan")
    latencies = [t - t0 for t in done]
    delivered = sum(r.delivered for r in phase2)
    return {
        **case,
        "run": tag,
        "clients": n,
        "recovered": len(done),
        "failed": len(failures),
        "failures_sample": failures[:3],
        "seconds": round(seconds, 3),
        "delivered": delivered,
        "delivered_per_s": round(delivered / seconds) if done else 0,
        "client_p50_s": round(statistics.median(latencies), 3) if done else None,
        "client_p99_s": round(latencies[int(0.99 * (len(latencies) - 1))], 3) if done else None,
        "server_cpu_s": round(window.server_cpu, 2),
        "client_cpu_s": round(sum(r.client_cpu for r in phase2), 2),
        "dispatch_lag_s": round(max(r.started for r in phase2) - t0, 3),
        "publish_seconds": round(publish_seconds, 2),
        "loadavg": load_average(),
    }


def run_backend(args: argparse.Namespace, pool: ProcessPoolExecutor, backend: str) -> None:
    with (
        backend_database(backend, args.pg_url) as url,
        bench_server(
            server_config(url, max(args.missed), args.log_level), f"recovery-{backend}"
        ) as server,
    ):
        warm = argparse.Namespace(**{**vars(args), "clients": min(args.clients, 100)})
        one_run(warm, pool, server, {"variant": "one", "missed": 10})
        for variant, missed in itertools.product(args.variants, args.missed):
            case = {"backend": backend, "variant": variant, "missed": missed}
            runs = []
            for repeat in range(args.repeat):
                name = f"recovery-{backend}-{variant}-{missed}.txt"
                profile = Path(args.profile) / name if args.profile and repeat == 0 else None
                record = one_run(args, pool, server, case, profile)
                emit(record)
                if profile is not None:
                    emit(profile_summary(profile))
                runs.append(record)
            summary = median_summary(runs, SUMMARY_KEYS, {**case, "clients": args.clients})
            summary["all_recovered"] = all(r["failed"] == 0 for r in runs)
            if missed == 100 and args.clients == 1000:
                summary["target_seconds"] = TARGET_SECONDS
                summary["meets_target"] = summary.get("seconds", 1e9) < TARGET_SECONDS
            emit(summary)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="sqlite,postgres")
    parser.add_argument("--variants", default="one,each")
    parser.add_argument(
        "--missed", default="", help="M values, comma-separated (100,1000; --storm: 10)"
    )
    parser.add_argument("--clients", type=int, default=0, help="N (1000; --storm: 19000)")
    parser.add_argument("--procs", type=int, default=0, help="client processes (2; --storm: 4)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=60.0, help="bound of every phase")
    parser.add_argument("--log-level", default="", help="server log_level ('' = its default)")
    parser.add_argument("--pg-url", default=PG_URL)
    parser.add_argument(
        "--profile", default="", help="folder: py-spy the server in each case's first run"
    )
    storm.add_arguments(parser)
    args = parser.parse_args()
    args.variants = args.variants.split(",")
    args.missed = [int(m) for m in (args.missed or ("10" if args.storm else "100,1000")).split(",")]
    args.clients = args.clients or (19_000 if args.storm else 1000)
    args.procs = args.procs or (4 if args.storm else 2)
    if args.storm:
        storm.main(args)
        return
    run_backends(args, warm_worker, run_backend)


if __name__ == "__main__":
    main()
