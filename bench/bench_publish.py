"""Acknowledged publications per second through a real server's HTTP API (not a test).

For each back end (SQLite file, PostgreSQL) one `centripy serve` process is started; then for
each mode (`batch`: POST /api/batch of --batch-size publishes with `parallel: true` from
--batch-callers concurrent callers; `single`: POST /api/publish from --callers concurrent
keep-alive callers) and each namespace (`hist`: history_size 1000, history_ttl 600s; `nohist`:
no history, the reference) it runs --repeat timed runs of --count publications spread over
--channels fresh channels. One JSON line per run and one median summary line per case:

    .venv/bin/python bench/bench_publish.py                       # everything, 3 repeats
    .venv/bin/python bench/bench_publish.py --backends sqlite --modes single --procs 2

The load comes from --procs client processes (raw keep-alive HTTP/1.1 connections, one per
caller). Every acknowledged offset is checked (per channel exactly 1..n); for the first run of
each history case the history API is read back too. Server CPU comes from /proc/<pid>/stat.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import math
import statistics
import time
import urllib.parse
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
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

HISTORY_SIZE = 1000
# Targets of issue 7 for publications with history on (publications/s).
TARGETS: dict[tuple[str, str], int] = {
    ("sqlite", "batch"): 20_000,
    ("sqlite", "single"): 5_000,
    ("postgres", "batch"): 10_000,
    ("postgres", "single"): 3_000,
}
SUMMARY_KEYS = ("pubs_per_s", "seconds", "server_cpu_s_per_1k", "server_busy", "client_cpu_s")


def server_config(database_url: str, log_level: str) -> dict[str, Any]:
    """The server config: namespace `hist` with history, `nohist` without."""
    config: dict[str, Any] = {
        "database_url": database_url,
        "namespaces": [
            {"name": "hist", "history_size": HISTORY_SIZE, "history_ttl": "600s"},
            {"name": "nohist"},
        ],
    }
    if log_level:
        config["log_level"] = log_level
    return config


# --- load generator (runs in a worker process, on that process's own loop) -----------------


@dataclass
class Job:
    """One worker's share of a run: publications `indexes` (channel = channels[i % K])."""

    api_url: str
    mode: str  # "batch" | "single"
    channels: list[str]
    indexes: list[int]
    concurrency: int
    batch_size: int


@dataclass
class JobResult:
    started: float  # CLOCK_MONOTONIC, comparable across processes
    finished: float
    client_cpu: float
    acked: int = 0
    errors: int = 0
    first_error: str = ""
    offsets: dict[str, list[int]] = field(default_factory=dict)
    ack_s: list[float] = field(default_factory=list)  # per request: send -> whole reply read


def publish_command(channel: str, i: int) -> dict[str, Any]:
    return {"channel": channel, "data": {"i": i, "text": "hello world, this is a bench message"}}


class HttpConnection:
    """One keep-alive HTTP/1.1 connection sending POSTs with a Content-Length and reading
    Content-Length responses: the cheapest client asyncio allows (aiohttp's client costs
    ~200 µs of CPU per request, which on 2 cores starves the server under test)."""

    def __init__(self, api_url: str) -> None:
        url = urllib.parse.urlsplit(api_url)
        self.host, self.port, self.prefix = url.hostname or "", url.port or 80, url.path
        head = f"Host: {url.netloc}\r\nX-API-Key: {API_KEY}\r\nContent-Type: application/json\r\n"
        self.head = head.encode()

    async def __aenter__(self) -> HttpConnection:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.writer.close()

    async def post(self, method: str, body: bytes) -> Any:
        line = f"POST {self.prefix}/{method} HTTP/1.1\r\n".encode()
        self.writer.write(line + self.head + b"Content-Length: %d\r\n\r\n" % len(body) + body)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        start = head.lower().index(b"content-length:") + 15
        length = int(head[start : head.index(b"\r\n", start)])
        payload = await self.reader.readexactly(length)
        if status != 200:
            raise RuntimeError(f"/api/{method}: HTTP {status} {payload[:200]!r}")
        return orjson.loads(payload)


class Load:
    """Callers of one worker process; they take work from one shared iterator."""

    def __init__(self, job: Job, result: JobResult) -> None:
        self.job = job
        self.result = result
        step = job.batch_size if job.mode == "batch" else 1
        self.chunks = iter([job.indexes[k : k + step] for k in range(0, len(job.indexes), step)])

    def record(self, channel: str, reply: Mapping[str, Any]) -> None:
        """Count one reply: a publish result (its offset kept when history is on) or an error."""
        if "error" in reply:
            self.result.errors += 1
            self.result.first_error = self.result.first_error or str(reply["error"])
            return
        self.result.acked += 1
        offset = reply.get("offset")
        if isinstance(offset, int):
            self.result.offsets.setdefault(channel, []).append(offset)

    async def caller(self) -> None:
        async with HttpConnection(self.job.api_url) as conn:
            await self.calls(conn)

    async def calls(self, conn: HttpConnection) -> None:
        channels = self.job.channels
        post = conn.post
        ack_s = self.result.ack_s
        clock = time.monotonic
        for chunk in self.chunks:
            names = [channels[i % len(channels)] for i in chunk]
            if self.job.mode == "batch":
                commands = [
                    {"publish": publish_command(c, i)} for c, i in zip(names, chunk, strict=True)
                ]
                body = orjson.dumps({"commands": commands, "parallel": True})
                sent = clock()
                answer = await post("batch", body)
                ack_s.append(clock() - sent)
                for name, reply in zip(names, answer["replies"], strict=True):
                    self.record(name, reply.get("publish", reply))
            else:
                body = orjson.dumps(publish_command(names[0], chunk[0]))
                sent = clock()
                reply = await post("publish", body)
                ack_s.append(clock() - sent)
                self.record(names[0], reply.get("result", reply))


async def run_job(job: Job) -> JobResult:
    cpu0 = time.process_time()
    result = JobResult(0.0, 0.0, 0.0)
    load = Load(job, result)
    result.started = time.monotonic()
    await asyncio.wait_for(asyncio.gather(*(load.caller() for _ in range(job.concurrency))), 300)
    result.finished = time.monotonic()
    result.client_cpu = time.process_time() - cpu0
    return result


def job_entry(job: Job) -> JobResult:
    """Worker-process entry point (picklable)."""
    return asyncio.run(run_job(job))


def warm_worker(_: int) -> int:
    import os

    return os.getpid()


# --- one run, verification, cases ----------------------------------------------------------


def split_jobs(args: argparse.Namespace, api_url: str, mode: str, channels: list[str]) -> list[Job]:
    callers = args.batch_callers if mode == "batch" else args.callers
    procs = max(1, min(args.procs, callers))
    count = args.batch_count if mode == "batch" else args.count
    jobs = []
    for p in range(procs):
        share = callers // procs + (1 if p < callers % procs else 0)
        jobs.append(
            Job(api_url, mode, channels, list(range(p, count, procs)), share, args.batch_size)
        )
    return jobs


def ack_percentiles(seconds: Sequence[float]) -> dict[str, float]:
    """Acknowledgement latency of the requests in ms: p50, p90, p99 (nearest rank) and max."""
    if not seconds:
        return {}
    ordered = sorted(seconds)
    n = len(ordered)

    def rank(q: float) -> float:
        return round(ordered[min(n - 1, max(0, math.ceil(q * n) - 1))] * 1000, 3)

    return {"p50": rank(0.5), "p90": rank(0.9), "p99": rank(0.99), "max": rank(1.0)}


def ack_summary(runs: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """The median over runs of each `ack_ms` percentile."""
    keys = ("p50", "p90", "p99", "max")
    values = {k: [r["ack_ms"][k] for r in runs if k in r.get("ack_ms", {})] for k in keys}
    return {k: round(statistics.median(v), 3) for k, v in values.items() if v}


def check_acked_offsets(offsets: Mapping[str, Sequence[int]], expected: Mapping[str, int]) -> str:
    """'' if every channel's acknowledged offsets are exactly 1..n_c, else the first problem."""
    for channel, n in expected.items():
        got = sorted(offsets.get(channel, ()))
        if got != list(range(1, n + 1)):
            head = got[:5]
            return f"{channel}: {len(got)} acked offsets, want 1..{n}; first {head}"
    return ""


def check_history(server: ServerProcess, expected: Mapping[str, int]) -> str:
    """'' if the history API shows, per channel, top offset n_c and offsets
    max(1, n_c-size+1)..n_c in order, else the first problem."""
    for channel, n in expected.items():
        result = server.api_result("history", {"channel": channel, "limit": HISTORY_SIZE})
        offsets = [p.get("offset") for p in result.get("publications", [])]
        want = list(range(max(1, n - HISTORY_SIZE + 1), n + 1))
        if result.get("offset") != n or offsets != want:
            return f"{channel}: history top {result.get('offset')}, {len(offsets)} pubs, want {n}"
    return ""


def one_run(
    args: argparse.Namespace,
    pool: ProcessPoolExecutor,
    server: ServerProcess,
    case: dict[str, Any],
    verify_history: bool,
    profile: Path | None = None,
) -> dict[str, Any]:
    tag = run_id()
    channels = [f"{case['namespace']}:bench-{tag}-{k}" for k in range(args.channels)]
    jobs = split_jobs(args, server.api_url, case["mode"], channels)
    assert server.pid is not None
    with py_spy(server.pid, profile), CpuWindow(server.pid) as window:
        results = list(pool.map(job_entry, jobs))
    count = sum(len(j.indexes) for j in jobs)
    wall = max(r.finished for r in results) - min(r.started for r in results)
    acked = sum(r.acked for r in results)
    record: dict[str, Any] = {
        **case,
        "run": tag,
        "publications": count,
        "acked": acked,
        "errors": sum(r.errors for r in results),
        "first_error": next((r.first_error for r in results if r.first_error), ""),
        "seconds": round(wall, 3),
        "pubs_per_s": round(acked / wall),
        "server_cpu_s": round(window.server_cpu, 2),
        "server_cpu_s_per_1k": round(window.server_cpu / max(acked, 1) * 1000, 3),
        "server_busy": round(window.server_cpu / window.wall, 2),
        "client_cpu_s": round(sum(r.client_cpu for r in results), 2),
        "ack_ms": ack_percentiles([s for r in results for s in r.ack_s]),
        "loadavg": load_average(),
    }
    if case["namespace"] == "hist":
        expected = {c: len(range(k, count, len(channels))) for k, c in enumerate(channels)}
        merged: dict[str, list[int]] = {}
        for r in results:
            for channel, offs in r.offsets.items():
                merged.setdefault(channel, []).extend(offs)
        record["acked_offsets_ok"] = check_acked_offsets(merged, expected) or True
        if verify_history:
            record["history_ok"] = check_history(server, expected) or True
    return record


def profile_path(folder: str, case: Mapping[str, Any]) -> Path | None:
    """Where py-spy writes the collapsed stacks of a case (None: no profiling)."""
    if not folder:
        return None
    return Path(folder) / f"publish-{case['backend']}-{case['mode']}-{case['namespace']}.txt"


def run_backend(args: argparse.Namespace, pool: ProcessPoolExecutor, backend: str) -> None:
    with (
        backend_database(backend, args.pg_url) as url,
        bench_server(server_config(url, args.log_level), backend) as server,
    ):
        # Warm-up: open the log, create tables/statements, let the server JIT its caches.
        warm = argparse.Namespace(**{**vars(args), "count": 2000, "batch_count": 2000})
        for mode in args.modes:
            one_run(warm, pool, server, {"mode": mode, "namespace": "hist"}, False)
        for mode, namespace in itertools.product(args.modes, args.namespaces):
            case = {"backend": backend, "mode": mode, "namespace": namespace}
            case["callers"] = args.batch_callers if mode == "batch" else args.callers
            if mode == "batch":
                case["batch_size"] = args.batch_size
            runs = []
            for repeat in range(args.repeat):
                first = repeat == 0
                profile = profile_path(args.profile, case) if first else None
                record = one_run(args, pool, server, case, first, profile)
                emit(record)
                if profile is not None:
                    emit(profile_summary(profile))
                runs.append(record)
            summary = median_summary(runs, SUMMARY_KEYS, case)
            summary["ack_ms"] = ack_summary(runs)
            target = TARGETS.get((backend, mode)) if namespace == "hist" else None
            if target is not None:
                summary["target_pubs_per_s"] = target
                summary["meets_target"] = summary.get("pubs_per_s", 0) >= target
            summary["all_verified"] = all(
                r.get("acked_offsets_ok", True) is True and r.get("history_ok", True) is True
                for r in runs
            ) and not any(r["errors"] for r in runs)
            emit(summary)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="sqlite,postgres")
    parser.add_argument("--modes", default="batch,single")
    parser.add_argument("--namespaces", default="hist,nohist")
    parser.add_argument("--count", type=int, default=20_000, help="publications per single run")
    parser.add_argument("--batch-count", type=int, default=50_000, help="per batch run")
    parser.add_argument("--channels", type=int, default=100)
    parser.add_argument("--callers", type=int, default=64, help="single-publish callers")
    parser.add_argument("--batch-callers", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--procs", type=int, default=2, help="client processes")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--log-level", default="", help="server log_level ('' = its default)")
    parser.add_argument("--pg-url", default=PG_URL)
    parser.add_argument(
        "--profile", default="", help="folder: py-spy the server in each case's first run"
    )
    args = parser.parse_args()
    args.modes = args.modes.split(",")
    args.namespaces = args.namespaces.split(",")
    run_backends(args, warm_worker, run_backend)


if __name__ == "__main__":
    main()
