"""Shared helpers of the server-level benchmarks (`bench_publish.py`, `bench_recovery.py`).

A benchmark starts a real `centripy serve` process (tests/support/server.py's ServerProcess) with
a config in a temporary folder (so the default SQLite file `centripy.db` lives there), measures
the server's CPU time from /proc/<pid>/stat around each run, and prints one JSON line per run
plus one summary line (median of the repeats) per case. Everything here runs in the benchmark's
main thread (or, for `process_cpu_seconds`, in whichever process asks).
"""

from __future__ import annotations

import asyncio
import collections
import multiprocessing
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson
import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from centripy.storage.broker_postgres import asyncpg_dsn
from tests.support.server import ServerError, ServerProcess

PG_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
SQLITE_URL = "sqlite+aiosqlite:///centripy.db"  # the server default, relative to its workdir
API_KEY = "bench"
CLK_TCK = os.sysconf("SC_CLK_TCK")

__all__ = [
    "API_KEY",
    "PG_URL",
    "SQLITE_URL",
    "CpuWindow",
    "ServerError",
    "ServerProcess",
    "backend_database",
    "backend_url",
    "bench_server",
    "emit",
    "load_average",
    "median_summary",
    "pg_reachable",
    "process_cpu_seconds",
    "profile_summary",
    "py_spy",
    "raise_nofile_limit",
    "run_id",
]


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process `pid` (all its threads) from /proc/<pid>/stat."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    # Field 2 (comm) may contain spaces and parentheses: split after its closing ')'.
    fields = raw[raw.rindex(")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
    return (utime + stime) / CLK_TCK


def raise_nofile_limit(wanted: int = 20_000) -> int:
    """Raise this process's soft RLIMIT_NOFILE towards `wanted` (children inherit it);
    returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = min(max(soft, wanted), hard) if hard != resource.RLIM_INFINITY else max(soft, wanted)
    if target != soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return target


def load_average() -> float:
    """The 1-minute load average: the machine is shared, so every record carries it."""
    return round(os.getloadavg()[0], 2)


def run_id() -> str:
    """A short unique tag for channel names, so runs never see each other's streams."""
    return uuid.uuid4().hex[:10]


def emit(record: Mapping[str, Any]) -> None:
    """Print one JSON line (flushed at once, so a long run shows progress)."""
    print(orjson.dumps(dict(record)).decode(), flush=True)


def backend_url(backend: str, pg_url: str) -> str:
    """The `database_url` of a back end name ("sqlite" or "postgres")."""
    urls = {"sqlite": SQLITE_URL, "postgres": pg_url}
    if backend not in urls:
        raise ValueError(f"unknown back end {backend!r}: choose from {sorted(urls)}")
    return urls[backend]


async def _pg_admin(url: str, statement: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


@contextmanager
def backend_database(backend: str, pg_url: str) -> Iterator[str]:
    """The `database_url` of a back end for one server's life. PostgreSQL: a database of its
    own, created on `pg_url`'s server and dropped afterwards, so no run inherits the tables
    (and dead rows) of the runs before it; SQLite's file is already fresh (in the server's
    new workdir)."""
    url = backend_url(backend, pg_url)
    if backend != "postgres":
        yield url
        return
    name = f"centripy_bench_{run_id()}"
    asyncio.run(_pg_admin(url, f"CREATE DATABASE {name}"))
    try:
        yield sa.make_url(url).set(database=name).render_as_string(hide_password=False)
    finally:
        asyncio.run(_pg_admin(url, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


async def _pg_probe(url: str, timeout: float) -> str:
    import asyncpg

    try:
        conn = await asyncio.wait_for(asyncpg.connect(asyncpg_dsn(url)), timeout)
    except (OSError, TimeoutError, asyncpg.PostgresError) as error:
        return f"{type(error).__name__}: {error}"
    await conn.close()
    return ""


def pg_reachable(url: str, timeout: float = 3.0) -> str:
    """'' if PostgreSQL at `url` accepts a connection within `timeout`, else the reason."""
    return asyncio.run(_pg_probe(url, timeout))


@contextmanager
def bench_server(
    config: Mapping[str, Any], label: str, keep: bool = False
) -> Iterator[ServerProcess]:
    """A started server with `config` (api_key defaults to API_KEY) in a fresh temporary
    folder; stopped (SIGTERM, then SIGKILL) and its folder removed on exit unless `keep`.
    On a failure the server's log tails go to stderr."""
    tmp = tempfile.mkdtemp(prefix=f"centripy-bench-{label}-")
    server = ServerProcess({"api_key": API_KEY, **config}, Path(tmp), startup_timeout=30.0)
    server.start()
    failed = False
    try:
        yield server
    except BaseException:
        failed = True
        raise
    finally:
        try:
            server.stop(timeout=30.0)
        except ServerError as error:
            failed = True
            print(f"server stop: {error}", file=sys.stderr)
        if failed:
            print(server.diagnostics(), file=sys.stderr)
        if not keep and not failed:
            _remove_tree(Path(tmp))
        elif failed:
            print(f"server folder kept: {tmp}", file=sys.stderr)


def _remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def py_spy_command() -> str:
    """The py-spy executable: next to this interpreter, else on PATH ('' if neither)."""
    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.is_file() else (shutil.which("py-spy") or "")


@contextmanager
def py_spy(
    pid: int,
    out: Path | None,
    rate: int = 200,
    options: Sequence[str] = ("--gil", "--nonblocking", "--format", "raw"),
) -> Iterator[None]:
    """Sample process `pid` with `py-spy record` into `out` while the block runs (by
    default collapsed stacks of the GIL holder); nothing when `out` is None. py-spy is
    stopped with SIGINT (it then writes the file) and waited for at most 30 s."""
    if out is None:
        yield
        return
    exe = py_spy_command()
    if not exe:
        raise RuntimeError("--profile needs py-spy: .venv/bin/pip install py-spy")
    out.parent.mkdir(parents=True, exist_ok=True)
    command = [exe, "record", "--pid", str(pid), "--rate", str(rate), *options]
    command += ["--output", str(out)]
    log = out.with_suffix(".log").open("wb")
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    time.sleep(1.0)  # let it attach before the measured work starts
    try:
        yield
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


def median_summary(
    runs: Sequence[Mapping[str, Any]], keys: Sequence[str], base: Mapping[str, Any]
) -> dict[str, Any]:
    """`base` plus, for each numeric `key`, the median over `runs` and the [min, max] range."""
    out: dict[str, Any] = {**base, "summary": True, "repeats": len(runs)}
    for key in keys:
        values = [float(r[key]) for r in runs if isinstance(r.get(key), (int, float))]
        if not values:
            continue
        out[key] = round(statistics.median(values), 3)
        out[f"{key}_range"] = [round(min(values), 3), round(max(values), 3)]
    return out


class CpuWindow:
    """Wall time and server CPU between `__enter__` and `__exit__` (read from /proc)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.wall = 0.0
        self.server_cpu = 0.0
        self._t0 = 0.0
        self._c0 = 0.0

    def __enter__(self) -> CpuWindow:
        self._c0 = process_cpu_seconds(self.pid)
        self._t0 = time.monotonic()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.monotonic() - self._t0
        self.server_cpu = process_cpu_seconds(self.pid) - self._c0


def profile_summary(path: Path, top: int = 25) -> dict[str, Any]:
    """The `top` frames of a py-spy raw (collapsed) profile by self and by inclusive share
    of the samples, as [percent, frame] pairs; the samples' total under `samples`."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        total += n
        own[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n

    def share(counter: collections.Counter[str]) -> list[list[Any]]:
        return [[round(100 * n / total, 1), f] for f, n in counter.most_common(top)]

    return {
        "profile": str(path),
        "samples": total,
        "top_self": share(own) if total else [],
        "top_inclusive": share(inclusive) if total else [],
    }


def run_backends(args: Any, warm_worker: Any, run_backend: Any) -> None:
    """The shared main loop of the server benchmarks: a pool of `args.procs` spawned client
    processes (warmed up), then `run_backend(args, pool, backend)` for each of
    `args.backends` (comma-separated); PostgreSQL is skipped with a line when unreachable."""
    raise_nofile_limit()
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=args.procs, mp_context=context) as pool:
        list(pool.map(warm_worker, range(args.procs)))
        for backend in args.backends.split(","):
            if backend == "postgres":
                reason = pg_reachable(args.pg_url)
                if reason:
                    emit({"backend": backend, "skipped": f"PostgreSQL unreachable: {reason}"})
                    continue
            run_backend(args, pool, backend)
