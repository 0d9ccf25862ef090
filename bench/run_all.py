#!/usr/bin/env python3
"""run_all.py: every fan-out scenario of issue 7 with one command (loopback only).

    python3 bench/run_all.py                     # everything, median of 3 (about 1.5 h)
    python3 bench/run_all.py --quick             # reduced smoke run, 1 repeat (a few minutes)
    python3 bench/run_all.py --scenarios s1,s2 --targets centripy,websockets
    python3 bench/run_all.py --table FILE.jsonl  # the tables of an earlier run

It makes the load generator's venv (bench/.venv, from bench/requirements.txt) when missing or
out of date, records the machine, then for each scenario and repeat starts every target afresh
(centripy from the project's .venv with client_insecure, api_key "bench", log_level warn and an
open-files limit of 20,000; or a peer from bench/peers), waits (bounded) for the machine to be
quiet, runs fanout.py or connections.py against it, and stops it by its PID. Runs never overlap.
Each run prints one JSON line (also appended to --out); at the end come Markdown tables of
median (min-max) per scenario and target. This script needs only the standard library.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import procs

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
API_KEY = "bench"
NOFILE = 20_000
PG_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
REDIS = "127.0.0.1:6379"
PEER_TARGETS = ("websockets", "socketio", "socketio-gc-off")
ALL_TARGETS = ("centripy", *PEER_TARGETS)


# --- scenarios ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    key: str
    title: str
    tool: str  # "fanout.py" or "connections.py"
    full: tuple[str, ...]
    quick: tuple[str, ...]
    targets: tuple[str, ...] = ALL_TARGETS
    nodes: int = 1
    engine: str = "memory"
    proto: str = ""  # fanout.py --proto; "" = the target's own (centrifugo or socketio)
    emulation: bool = False  # centripy also serves http_stream and sse


EMULATION_SHAPE = ("-n", "500", "-m", "1000", "-r", "0")
EMULATION_QUICK = ("-n", "100", "-m", "100", "-r", "0")


AFAP_1K = ("-n", "1000", "-m", "2000", "-r", "0")
SCENARIOS = (
    Scenario(
        "s1",
        "1k subscribers x 2,000 msgs, as fast as acks allow",
        "fanout.py",
        AFAP_1K,
        ("-n", "200", "-m", "200", "-r", "0"),
    ),
    Scenario(
        "s2",
        "10k subscribers x 100 msgs, as fast as possible",
        "fanout.py",
        ("-n", "10000", "-m", "100", "-r", "0"),
        ("-n", "1000", "-m", "20", "-r", "0"),
    ),
    Scenario(
        "s3",
        "1k subscribers x 2,000 msgs at 10 msg/s (10k deliveries/s offered)",
        "fanout.py",
        ("-n", "1000", "-m", "2000", "-r", "10"),
        ("-n", "200", "-m", "30", "-r", "10"),
    ),
    Scenario(
        "s4",
        "19,000 idle connections, then one broadcast",
        "connections.py",
        ("-n", "19000", "--procs", "4"),
        ("-n", "2000", "--procs", "2"),
        targets=("centripy", "websockets"),
    ),
    Scenario(
        "s5-1node",
        "scale-out: 1 node, engine redis, PostgreSQL log",
        "fanout.py",
        AFAP_1K,
        ("-n", "200", "-m", "200", "-r", "0"),
        ("centripy",),
        1,
        "redis",
    ),
    Scenario(
        "s5-2nodes",
        "scale-out: 2 nodes, engine redis, PostgreSQL log",
        "fanout.py",
        AFAP_1K,
        ("-n", "200", "-m", "200", "-r", "0"),
        ("centripy",),
        2,
        "redis",
    ),
    Scenario(
        "s5-pg-1node",
        "scale-out: 1 node, engine postgresql (LISTEN/NOTIFY), PostgreSQL log",
        "fanout.py",
        AFAP_1K,
        ("-n", "200", "-m", "200", "-r", "0"),
        ("centripy",),
        1,
        "postgresql",
    ),
    Scenario(
        "s5-pg-2nodes",
        "scale-out: 2 nodes, engine postgresql (LISTEN/NOTIFY), PostgreSQL log",
        "fanout.py",
        AFAP_1K,
        ("-n", "200", "-m", "200", "-r", "0"),
        ("centripy",),
        2,
        "postgresql",
    ),
    Scenario(
        "s1-ws",
        "500 subscribers x 1,000 msgs over WebSocket (the s1-sse/s1-http_stream reference)",
        "fanout.py",
        EMULATION_SHAPE,
        EMULATION_QUICK,
        ("centripy",),
        proto="centrifugo",
        emulation=True,
    ),
    Scenario(
        "s1-sse",
        "500 subscribers x 1,000 msgs over SSE emulation (/connection/sse + /emulation)",
        "fanout.py",
        EMULATION_SHAPE,
        EMULATION_QUICK,
        ("centripy",),
        proto="centrifugo-sse",
        emulation=True,
    ),
    Scenario(
        "s1-http_stream",
        "500 subscribers x 1,000 msgs over HTTP-streaming emulation "
        "(/connection/http_stream + /emulation)",
        "fanout.py",
        EMULATION_SHAPE,
        EMULATION_QUICK,
        ("centripy",),
        proto="centrifugo-http-stream",
        emulation=True,
    ),
)


# --- the bench venv -------------------------------------------------------------------------


def ensure_venv(venv: Path, requirements: Path, base_python: str) -> Path:
    """The bench venv's interpreter; (re)installs bench/requirements.txt when its hash changed.
    pip is bounded to 15 minutes."""
    python = venv / "bin" / "python"
    digest = hashlib.sha256(requirements.read_bytes()).hexdigest()
    stamp = venv / ".requirements.sha256"
    if python.exists() and stamp.exists() and stamp.read_text().strip() == digest:
        return python
    if not python.exists():
        log(f"creating the bench venv {venv}")
        subprocess.run([base_python, "-m", "venv", str(venv)], check=True, timeout=300)
    log(f"installing {requirements} into {venv}")
    pip = [str(python), "-m", "pip", "install", "-q", "-r", str(requirements)]
    subprocess.run(pip, check=True, timeout=900)
    stamp.write_text(digest + "\n")
    return python


def log(text: str) -> None:
    print(f"# {text}", file=sys.stderr, flush=True)


# --- targets --------------------------------------------------------------------------------


@dataclass
class Running:
    """A started target: its processes and where to reach it."""

    proto: str
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    ws_urls: list[str] = field(default_factory=list)
    api_urls: list[str] = field(default_factory=list)
    ports: list[int] = field(default_factory=list)  # WebSocket port of each node
    api_ports: list[int] = field(default_factory=list)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes]


def _spawn(command: list[str], cwd: Path, log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("ab") as out:
        return subprocess.Popen(
            command,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            preexec_fn=functools.partial(procs.raise_nofile, NOFILE),
        )


def centripy_command(project_python: Path) -> list[str]:
    script = project_python.with_name("centripy")
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [
        str(project_python),
        "-c",
        "import sys; from centripy.cli import main; sys.exit(main())",
    ]


def centripy_config(scenario: Scenario, pg_url: str, tag: str) -> dict[str, Any]:
    config: dict[str, Any] = {"client_insecure": True, "api_key": API_KEY, "log_level": "warn"}
    if scenario.emulation:
        config.update({"http_stream": True, "sse": True})
    if scenario.engine == "redis":
        config.update(
            {
                "engine": "redis",
                "redis_address": REDIS,
                "redis_prefix": f"bench{tag}",
                "database_url": pg_url,
            }
        )
    elif scenario.engine == "postgresql":
        config.update(
            {"engine": "postgresql", "postgresql_prefix": f"bench{tag}", "database_url": pg_url}
        )
    return config


def start_target(
    target: str, scenario: Scenario, args: argparse.Namespace, workdir: Path, run: Running
) -> None:
    """Start `target` (for `scenario`) into `run`, waiting until its ports listen (30 s)."""
    if target == "centripy":
        config_path = workdir / "config.json"
        config_path.write_text(
            json.dumps(centripy_config(scenario, args.pg_url, uuid.uuid4().hex[:8]))
        )
        for node in range(scenario.nodes):
            port = procs.free_port()
            command = [
                *centripy_command(args.project_python),
                "serve",
                "--config",
                str(config_path),
                "--port",
                str(port),
                "--address",
                procs.LOOPBACK,
            ]
            proc = _spawn(command, workdir, workdir / f"centripy{node}.log")
            run.processes.append(proc)
            procs.wait_ports(proc, [port], 30)
            run.ports.append(port)
            run.api_ports.append(port)
        return
    port, api_port = procs.free_port(), procs.free_port()
    if target == "websockets":
        command = [
            str(args.bench_python),
            str(BENCH / "peers" / "peer_websockets.py"),
            "--port",
            str(port),
            "--api-port",
            str(api_port),
        ]
    else:
        api_port = port
        command = [
            str(args.bench_python),
            str(BENCH / "peers" / "peer_socketio.py"),
            "--port",
            str(port),
        ]
        if target == "socketio-gc-off":
            command.append("--gc-off")
    proc = _spawn(command, workdir, workdir / f"{target}.log")
    run.processes.append(proc)
    procs.wait_ports(proc, sorted({port, api_port}), 30)
    run.ports.append(port)
    run.api_ports.append(api_port)


@contextmanager
def started(target: str, scenario: Scenario, args: argparse.Namespace) -> Iterator[Running]:
    """`target` running for the block; every process is stopped by its PID afterwards and the
    temporary folder removed (kept, with its logs, if anything failed)."""
    workdir = Path(tempfile.mkdtemp(prefix=f"centripy-bench-{target}-"))
    run = Running(proto="socketio" if target.startswith("socketio") else "centrifugo")
    ok = False
    try:
        start_target(target, scenario, args, workdir, run)
        run.ws_urls = [f"ws://{procs.LOOPBACK}:{p}" for p in run.ports]
        run.api_urls = [f"http://{procs.LOOPBACK}:{p}/api/publish" for p in run.api_ports]
        yield run
        ok = True
    finally:
        for proc in run.processes:
            procs.stop_process(proc, 40)
        if ok:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            log(f"target folder kept for its logs: {workdir}")


# --- one run --------------------------------------------------------------------------------


def tool_command(scenario: Scenario, run: Running, args: argparse.Namespace) -> list[str]:
    params = list(scenario.quick if args.quick else scenario.full)
    command = [str(args.bench_python), str(BENCH / scenario.tool), *params]
    if scenario.tool == "connections.py":
        ports = ["--port", str(run.ports[0]), "--api-port", str(run.api_ports[0])]
        return [*command, *ports, "--server-pid", str(run.pids[0])]
    command += ["--proto", scenario.proto or run.proto]
    for url in run.ws_urls:
        command += ["--ws-url", url]
    for url in run.api_urls:
        command += ["--api-url", url]
    for pid in run.pids:
        command += ["--server-pid", str(pid)]
    return command


def run_tool(command: list[str], timeout: float) -> tuple[dict[str, Any] | None, str]:
    """Run a tool in its own process group; (its JSON line or None, stderr tail). On timeout
    the group (the tool and its client processes) is killed by its id."""
    proc = subprocess.Popen(
        command, cwd=BENCH, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=30)
        return None, f"timed out after {timeout} s; " + err.decode(errors="replace")[-1500:]
    lines = [ln for ln in out.decode(errors="replace").splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return None, f"exit {proc.returncode}; " + err.decode(errors="replace")[-1500:]
    record: dict[str, Any] = json.loads(lines[-1])
    return record, ""


def requirement_problem(scenario: Scenario) -> str:
    if scenario.engine == "memory":
        return ""
    services: tuple[tuple[str, int], ...] = (("Redis", 6379), ("PostgreSQL", 5432))
    if scenario.engine == "postgresql":
        services = (("PostgreSQL", 5432),)
    missing = [name for name, port in services if not procs.port_accepts(port)]
    return f"{' and '.join(missing)} not reachable on 127.0.0.1" if missing else ""


def one_run(
    scenario: Scenario, target: str, repeat: int, args: argparse.Namespace
) -> dict[str, Any]:
    base = {"scenario": scenario.key, "target": target, "repeat": repeat, "quick": args.quick}
    problem = requirement_problem(scenario)
    if problem:
        return {**base, "skipped": problem}
    busy, waited = procs.wait_quiet(args.quiet, args.quiet_timeout)
    base.update(
        {
            "quiet_busy": busy,
            "quiet_waited_s": waited,
            "loadavg_before": round(os.getloadavg()[0], 2),
        }
    )
    try:
        with started(target, scenario, args) as run:
            command = tool_command(scenario, run, args)
            record, error = run_tool(command, args.run_timeout)
    except (RuntimeError, OSError, ValueError, subprocess.SubprocessError) as exc:
        return {**base, "error": f"{type(exc).__name__}: {exc}"}
    if record is None:
        return {**base, "error": error, "command": command}
    return {**base, **record}


# --- tables ---------------------------------------------------------------------------------


def cell(values: Sequence[float], fmt: str) -> str:
    """'median (min-max)' of the values, or the value alone when all are equal."""
    if not values:
        return ""
    lo, mid, hi = min(values), statistics.median(values), max(values)
    if lo == hi:
        return fmt.format(mid)
    return f"{fmt.format(mid)} ({fmt.format(lo)} to {fmt.format(hi)})"


def _get(record: dict[str, Any], path: str) -> Any:
    value: Any = record
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


Column = tuple[str, Callable[[dict[str, Any]], Any], str]


def _col(header: str, path: str, fmt: str) -> Column:
    return header, functools.partial(_get, path=path), fmt


FANOUT_COLUMNS: tuple[Column, ...] = (
    _col("deliveries/s", "deliveries_per_s", "{:,.0f}"),
    _col("server µs/delivery", "server_cpu_us_per_delivery", "{:.1f}"),
    _col("p50 ms", "latency_ms.p50", "{:.1f}"),
    _col("p99 ms", "latency_ms.p99", "{:.1f}"),
    _col("max ms", "latency_ms.max", "{:.0f}"),
    _col("RSS MiB", "server_hwm_mb", "{:.0f}"),
    _col("lost", "lost", "{:.0f}"),
    _col("dup", "duplicated", "{:.0f}"),
    _col("reord", "reordered", "{:.0f}"),
    _col("server busy", "server_busy", "{:.2f}"),
    _col("client busy", "client_busy_max", "{:.2f}"),
    _col("other busy", "foreign_busy", "{:.2f}"),
)
CONNECTION_COLUMNS: tuple[Column, ...] = (
    _col("connections", "connections", "{:,.0f}"),
    _col("connect/s", "connect_per_s", "{:,.0f}"),
    _col("connect p99 ms", "connect_p99_ms", "{:.0f}"),
    _col("server RSS MiB", "server_rss_mb", "{:.0f}"),
    _col("KiB/conn", "server_kib_per_conn", "{:.1f}"),
    _col("server µs CPU/conn", "server_cpu_us_per_conn", "{:.0f}"),
    _col("broadcast reach s", "reach_s", "{:.3f}"),
    _col("reached", "reached", "{:,.0f}"),
    _col("disconnects", "disconnects", "{:.0f}"),
)


def table(records: Sequence[dict[str, Any]], columns: Sequence[Column]) -> list[str]:
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for record in records:
        if "scenario" in record and "target" in record:
            groups.setdefault((record["scenario"], record["target"]), []).append(record)
    lines = [
        "| scenario | target | runs | " + " | ".join(c[0] for c in columns) + " |",
        "|---|---|---|" + "---|" * len(columns),
    ]
    for (scenario, target), rows in groups.items():
        good = [r for r in rows if "error" not in r and "skipped" not in r]
        cells = []
        for _, get, fmt in columns:
            values = [get(r) for r in good]
            cells.append(cell([v for v in values if isinstance(v, (int, float))], fmt))
        note = f"{len(good)}" + (
            f" (+{len(rows) - len(good)} failed/skipped)" if len(good) < len(rows) else ""
        )
        lines.append(f"| {scenario} | {target} | {note} | " + " | ".join(cells) + " |")
    return lines


def render_tables(records: Sequence[dict[str, Any]]) -> str:
    fanout = [r for r in records if r.get("scenario") in FANOUT_KEYS]
    conns = [r for r in records if r.get("scenario") in CONNECTION_KEYS]
    out: list[str] = []
    if fanout:
        out += ["### Fan-out", "", *table(fanout, FANOUT_COLUMNS), ""]
    if conns:
        out += ["### Idle connections and one broadcast", "", *table(conns, CONNECTION_COLUMNS), ""]
    out.append(
        "Cells: median (min to max) over the runs. Busy: CPU seconds per second of the "
        "delivery window (1.0 = one core); other = everything on the machine but the "
        "server and the load generator. RSS: the server's peak (VmHWM; summed over nodes)."
    )
    for key in sorted({r["scenario"] for r in records if "scenario" in r}):
        title = next((s.title for s in SCENARIOS if s.key == key), key)
        out.append(f"- {key}: {title}")
    for r in records:
        if "error" in r or "skipped" in r:
            out.append(
                f"- {r['scenario']} / {r['target']} #{r['repeat']}: "
                f"{r.get('error') or 'skipped: ' + r['skipped']}"[:400]
            )
    return "\n".join(out)


FANOUT_KEYS = {s.key for s in SCENARIOS if s.tool == "fanout.py"}
CONNECTION_KEYS = {s.key for s in SCENARIOS if s.tool == "connections.py"}


# --- main -----------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="reduced sizes, 1 repeat")
    ap.add_argument(
        "--scenarios",
        default=",".join(s.key for s in SCENARIOS),
        help="comma-separated (default: all)",
    )
    ap.add_argument(
        "--targets", default=",".join(ALL_TARGETS), help="comma-separated (default: all)"
    )
    ap.add_argument("--repeats", type=int, help="default 3, or 1 with --quick")
    ap.add_argument("--out", type=Path, help="JSON lines file (default: a new file in /tmp)")
    ap.add_argument("--table", type=Path, nargs="+", help="only print the tables of these files")
    ap.add_argument("--venv", type=Path, default=BENCH / ".venv", help="the bench venv")
    ap.add_argument(
        "--project-python",
        type=Path,
        default=REPO / ".venv" / "bin" / "python",
        help="the interpreter that runs centripy",
    )
    ap.add_argument("--pg-url", default=PG_URL)
    ap.add_argument(
        "--quiet",
        type=float,
        default=0.3,
        help="before each run wait until the machine uses at most this many cores",
    )
    ap.add_argument("--quiet-timeout", type=float, help="wait at most this long (120 s; quick 30)")
    ap.add_argument("--run-timeout", type=float, default=900.0, help="per run, s")
    args = ap.parse_args(argv)
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.quiet_timeout = (
        args.quiet_timeout if args.quiet_timeout is not None else (30.0 if args.quick else 120.0)
    )
    keys = {s.key for s in SCENARIOS}
    args.scenario_keys = [k for k in args.scenarios.split(",") if k]
    args.target_names = [t for t in args.targets.split(",") if t]
    for k in args.scenario_keys:
        if k not in keys:
            ap.error(f"unknown scenario {k!r}: choose from {sorted(keys)}")
    for t in args.target_names:
        if t not in ALL_TARGETS:
            ap.error(f"unknown target {t!r}: choose from {list(ALL_TARGETS)}")
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")
    return args


def emit(record: dict[str, Any], out: Path) -> None:
    line = json.dumps(record)
    print(line, flush=True)
    with out.open("a") as f:
        f.write(line + "\n")


def machine_record(args: argparse.Namespace) -> dict[str, Any]:
    probe = (
        "import importlib.metadata as m, json, platform; print(json.dumps({'python': "
        "platform.python_version(), **{p: m.version(p) for p in ('aiohttp', 'websockets', "
        "'python-socketio', 'python-engineio', 'uvloop', 'orjson')}}))"
    )
    versions = subprocess.run(
        [str(args.bench_python), "-c", probe], capture_output=True, text=True, timeout=60
    )
    rev = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    project = subprocess.run(
        [str(args.project_python), "-c", "import platform; print(platform.python_version())"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return {
        "machine": procs.machine_info(),
        "centripy_commit": rev.stdout.strip(),
        "centripy_python": project.stdout.strip(),
        "load_generator": json.loads(versions.stdout or "{}"),
        "quick": args.quick,
        "repeats": args.repeats,
        "scenarios": args.scenario_keys,
        "targets": args.target_names,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.table:
        records = [
            json.loads(ln) for p in args.table for ln in p.read_text().splitlines() if ln.strip()
        ]
        print(render_tables(records))
        return 0
    if not args.project_python.exists():
        sys.exit(f"no project interpreter at {args.project_python}: make the project's .venv first")
    args.bench_python = ensure_venv(args.venv, BENCH / "requirements.txt", sys.executable)
    out = (
        args.out
        or Path(tempfile.gettempdir()) / f"centripy-bench-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"
    )
    log(f"results: {out}")
    procs.raise_nofile(NOFILE)
    emit(machine_record(args), out)
    records = []
    for scenario in SCENARIOS:
        if scenario.key not in args.scenario_keys:
            continue
        targets = [t for t in scenario.targets if t in args.target_names]
        for repeat in range(args.repeats):
            for target in targets:
                log(f"{scenario.key} {target} #{repeat + 1}/{args.repeats}: {scenario.title}")
                record = one_run(scenario, target, repeat, args)
                emit(record, out)
                records.append(record)
    print()
    print(render_tables(records))
    log(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
