"""run_all.py: every benchmark scenario of issues 7 and 20 with one command (loopback only).

    python3 bench/run_all.py                     # everything, median of 3 (hours)
    python3 bench/run_all.py --quick             # every issue-20 target, reduced, < 10 minutes
    python3 bench/run_all.py --scenarios s1,s2 --targets centripy,websockets
    python3 bench/run_all.py --table FILE.jsonl  # the tables of an earlier run

It makes the load generator's venv (bench/.venv, from bench/requirements.txt) when missing or
out of date, records the machine, then for each scenario and repeat starts every target afresh
(centripy from the project's .venv with client_insecure, api_key "bench", log_level warn and an
open-files limit of 20,000; or a peer from bench/peers), waits (bounded) for the machine to be
quiet, runs fanout.py or connections.py against it, and stops it by its PID. "Tool" scenarios
(p-*, r-*) instead run another bench script (bench_publish.py, bench_recovery.py) from the
project's .venv; it starts its own server, and each JSON line it prints that is not a summary
becomes a record. Runs never overlap. Each record is printed as one JSON line, appended to --out
and (unless --no-record) to bench/results/results.jsonl, the committed history that plot.py
draws; at the end come Markdown tables of median (min-max) per scenario and target. This script
needs only the standard library.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import procs
from report import _get, is_sustained, render_tables
from scenarios import (
    ALL_TARGETS,
    PG,
    QUICK_TARGETS,
    SCENARIOS,
    SERVICE_PORTS,
    Scenario,
)

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
API_KEY = "bench"
NOFILE = 20_000
PG_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
REDIS = "127.0.0.1:6379"


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
    config.update(dict(scenario.config))
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


def script_command(scenario: Scenario, args: argparse.Namespace) -> list[str]:
    """The command of a tool scenario: its script from the project's interpreter (the server
    benchmarks import tests/support), with --pg-url when it needs PostgreSQL."""
    params = list(scenario.quick if args.quick else scenario.full)
    command = [str(args.project_python), str(BENCH / scenario.tool), *params]
    if PG in scenario.needed_services():
        command += ["--pg-url", args.pg_url]
    return command


def run_tool_lines(
    command: list[str], timeout: float
) -> tuple[list[dict[str, Any]], int | None, str]:
    """Run a tool in its own process group; (the JSON objects it printed, its exit code or
    None on timeout, its stderr tail). On timeout the group (the tool and its client
    processes) is killed by its id and what it printed so far is kept."""
    proc = subprocess.Popen(
        command, cwd=BENCH, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
    )
    code: int | None
    try:
        out, err = proc.communicate(timeout=timeout)
        code = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=30)
        code = None
    records = []
    for line in out.decode(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                value = json.loads(line)
            except ValueError:
                continue
            if isinstance(value, dict):
                records.append(value)
    tail = err.decode(errors="replace")[-1500:]
    if code is None:
        tail = f"timed out after {timeout} s; {tail}"
    return records, code, tail


def run_tool(command: list[str], timeout: float) -> tuple[dict[str, Any] | None, str]:
    """Run a load tool; (its last JSON line or None, the reason: exit code and stderr tail)."""
    records, code, tail = run_tool_lines(command, timeout)
    if code is None:
        return None, tail
    if code != 0 or not records:
        return None, f"exit {code}; {tail}"
    return records[-1], ""


def requirement_problem(scenario: Scenario, args: argparse.Namespace | None = None) -> str:
    """Why `scenario` cannot run here ("" if it can): a service down, a protocol missing from
    bench/protocols.py, or an option its tool does not have yet."""
    missing = [s for s in scenario.needed_services() if not procs.port_accepts(SERVICE_PORTS[s])]
    if missing:
        return f"{' and '.join(missing)} not reachable on 127.0.0.1"
    protocols = getattr(args, "protocols", None)
    if scenario.proto and protocols is not None and scenario.proto not in protocols:
        return f"protocol {scenario.proto!r} is not in bench/protocols.py (yet)"
    if scenario.requires and args is not None:
        usage = tool_help(scenario.tool, str(args.project_python))
        absent = [flag for flag in scenario.requires if flag not in usage]
        if absent:
            return f"{scenario.tool} has no {', '.join(absent)} (yet)"
    return ""


@functools.cache
def tool_help(tool: str, python: str) -> str:
    """A bench script's --help text ("" if it fails), read once per invocation."""
    command = [python, str(BENCH / tool), "--help"]
    done = subprocess.run(command, cwd=BENCH, capture_output=True, text=True, timeout=120)
    return done.stdout


def available_protocols(bench_python: Path) -> list[str] | None:
    """The --proto names fanout.py accepts (None if bench/protocols.py cannot be imported)."""
    probe = "import json, protocols; print(json.dumps(sorted(protocols.PROTOCOLS)))"
    done = subprocess.run(
        [str(bench_python), "-c", probe], cwd=BENCH, capture_output=True, text=True, timeout=60
    )
    try:
        names: list[str] = json.loads(done.stdout)
    except ValueError:
        return None
    return names


def derive(scenario: Scenario, record: dict[str, Any]) -> dict[str, Any]:
    """Fields computed from a fan-out record: the publications acknowledged per second of the
    publish window, the server CPU per publication (per delivery x deliveries / publications),
    the publisher's CPU share and, with an offered rate, whether it was sustained (achieved
    >= 95% of the offered rate with p99 < 100 ms)."""
    acked, window = record.get("publish_acked"), record.get("publish_s")
    if isinstance(acked, int) and isinstance(window, (int, float)) and window > 0:
        record["achieved_pubs_per_s"] = round(acked / window, 1)
        pub_cpu = record.get("client_cpu_publisher_s")
        if isinstance(pub_cpu, (int, float)):
            record["publisher_busy"] = round(pub_cpu / window, 2)
    per_delivery = record.get("server_cpu_us_per_delivery")
    received = record.get("deliveries_received")
    if (
        "server_cpu_us_per_publication" not in record
        and isinstance(per_delivery, (int, float))
        and isinstance(received, int)
        and isinstance(acked, int)
        and acked > 0
    ):
        record["server_cpu_us_per_publication"] = round(per_delivery * received / acked, 1)
    if scenario.offered:
        record["offered_pubs_per_s"] = scenario.offered
        p99 = _get(record, "latency_ms.p99")
        achieved = record.get("achieved_pubs_per_s")
        record["sustained"] = is_sustained(scenario.offered, achieved, p99)
    return record


def one_run(
    scenario: Scenario, target: str, repeat: int, args: argparse.Namespace
) -> dict[str, Any]:
    """One run of a fan-out or connections scenario against a freshly started `target`."""
    base: dict[str, Any] = {
        "scenario": scenario.key,
        "target": target,
        "repeat": repeat,
        "quick": args.quick,
    }
    problem = requirement_problem(scenario, args)
    if problem:
        return {**base, "skipped": problem}
    wait_quiet(base, args)
    started_at = time.monotonic()
    try:
        with started(target, scenario, args) as run:
            command = tool_command(scenario, run, args)
            record, error = run_tool(command, args.run_timeout)
    except (RuntimeError, OSError, ValueError, subprocess.SubprocessError) as exc:
        return {**base, "error": f"{type(exc).__name__}: {exc}"}
    base["run_wall_s"] = round(time.monotonic() - started_at, 1)
    if record is None:
        return {**base, "error": error, "command": command}
    return derive(scenario, {**base, **record})


def tool_runs(scenario: Scenario, repeat: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    """One run of a tool scenario: every JSON line its script printed that is not a summary
    (or a py-spy profile line), as records; an error record if it failed."""
    base: dict[str, Any] = {
        "scenario": scenario.key,
        "target": "centripy",
        "repeat": repeat,
        "quick": args.quick,
    }
    problem = requirement_problem(scenario, args)
    if problem:
        return [{**base, "skipped": problem}]
    wait_quiet(base, args)
    started_at = time.monotonic()
    command = script_command(scenario, args)
    lines, code, tail = run_tool_lines(command, args.run_timeout)
    base["run_wall_s"] = round(time.monotonic() - started_at, 1)
    records = [
        {**base, **line} for line in lines if not line.get("summary") and "profile" not in line
    ]
    if code != 0 or not records:
        reason = tail if code is None else f"exit {code}; {tail}"
        records.append({**base, "error": reason, "command": command})
    return records


def wait_quiet(base: dict[str, Any], args: argparse.Namespace) -> None:
    busy, waited = procs.wait_quiet(args.quiet, args.quiet_timeout)
    base.update(
        {
            "quiet_busy": busy,
            "quiet_waited_s": waited,
            "loadavg_before": round(os.getloadavg()[0], 2),
        }
    )


# --- main -----------------------------------------------------------------------------------

RESULTS = BENCH / "results" / "results.jsonl"
SERVER_SOURCES = ("centripy", "engine", "actors", "transports", "storage")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--quick", action="store_true", help="reduced sizes, 1 repeat, centripy and websockets"
    )
    ap.add_argument(
        "--scenarios",
        help="comma-separated (default: all; with --quick all but the s5-* scale-out ones)",
    )
    ap.add_argument(
        "--targets",
        help="comma-separated (default: all; with --quick " + ",".join(QUICK_TARGETS) + ")",
    )
    ap.add_argument("--repeats", type=int, help="default 3, or 1 with --quick")
    ap.add_argument("--out", type=Path, help="JSON lines file (default: a new file in /tmp)")
    ap.add_argument(
        "--results",
        type=Path,
        default=RESULTS,
        help="the committed history every run is also appended to (default %(default)s)",
    )
    ap.add_argument(
        "--no-record", action="store_true", help="do not append to --results (only to --out)"
    )
    ap.add_argument("--table", type=Path, nargs="+", help="only print the tables of these files")
    ap.add_argument(
        "--commit", help="with --table: only the records of this commit (or invocation id)"
    )
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
    ap.add_argument("--quiet-timeout", type=float, help="wait at most this long (120 s; quick 4)")
    ap.add_argument("--run-timeout", type=float, default=900.0, help="per run, s")
    args = ap.parse_args(argv)
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.quiet_timeout = (
        args.quiet_timeout if args.quiet_timeout is not None else (4.0 if args.quick else 120.0)
    )
    default_keys = [s.key for s in SCENARIOS if s.in_quick or not args.quick]
    keys = {s.key for s in SCENARIOS}
    args.scenario_keys = (
        [k for k in args.scenarios.split(",") if k] if args.scenarios else default_keys
    )
    default_targets = QUICK_TARGETS if args.quick else ALL_TARGETS
    args.target_names = (
        [t for t in args.targets.split(",") if t] if args.targets else list(default_targets)
    )
    for k in args.scenario_keys:
        if k not in keys:
            ap.error(f"unknown scenario {k!r}: choose from {sorted(keys)}")
    for t in args.target_names:
        if t not in ALL_TARGETS:
            ap.error(f"unknown target {t!r}: choose from {list(ALL_TARGETS)}")
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")
    return args


class Sink:
    """Where records go: stdout, the --out file and (unless --no-record) the results history.
    Each record is stamped with the invocation's id, commit, quick flag and its own date."""

    def __init__(self, out: Path, results: Path | None, stamp: dict[str, Any]) -> None:
        self.paths = [out] + ([results] if results is not None else [])
        self.stamp = stamp
        for path in self.paths:
            path.parent.mkdir(parents=True, exist_ok=True)

    def emit(self, record: dict[str, Any]) -> dict[str, Any]:
        record = {**self.stamp, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **record}
        line = json.dumps(record)
        print(line, flush=True)
        for path in self.paths:
            with path.open("a") as f:
                f.write(line + "\n")
        return record


def git(*command: str) -> str:
    done = subprocess.run(
        ["git", "-C", str(REPO), *command], capture_output=True, text=True, timeout=30
    )
    return done.stdout.strip()


def commit_stamp(quick: bool) -> dict[str, Any]:
    """What every record carries: the invocation, the commit (its date orders plot.py's x
    axis) and how many server source files differ from it (other work in the tree)."""
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", *SERVER_SOURCES)
    return {
        "invocation": uuid.uuid4().hex[:12],
        "centripy_commit": git("rev-parse", "--short", "HEAD"),
        "centripy_commit_date": git("show", "-s", "--format=%cI", "HEAD"),
        "centripy_dirty_files": len(dirty.splitlines()),
        "quick": quick,
    }


def machine_record(args: argparse.Namespace) -> dict[str, Any]:
    probe = (
        "import importlib.metadata as m, json, platform; print(json.dumps({'python': "
        "platform.python_version(), **{p: m.version(p) for p in ('aiohttp', 'websockets', "
        "'python-socketio', 'python-engineio', 'uvloop', 'orjson')}}))"
    )
    versions = subprocess.run(
        [str(args.bench_python), "-c", probe], capture_output=True, text=True, timeout=60
    )
    project = subprocess.run(
        [str(args.project_python), "-c", "import platform; print(platform.python_version())"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return {
        "machine": procs.machine_info(),
        "centripy_python": project.stdout.strip(),
        "load_generator": json.loads(versions.stdout or "{}"),
        "protocols": args.protocols,
        "repeats": args.repeats,
        "scenarios": args.scenario_keys,
        "targets": args.target_names,
    }


def read_records(paths: Sequence[Path]) -> list[dict[str, Any]]:
    return [json.loads(ln) for p in paths for ln in p.read_text().splitlines() if ln.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.table:
        records = read_records(args.table)
        if args.commit:
            wanted = args.commit
            records = [
                r
                for r in records
                if wanted in (r.get("invocation"), r.get("centripy_commit"))
                or str(r.get("centripy_commit", "")).startswith(wanted)
            ]
        print(render_tables(records))
        return 0
    if not args.project_python.exists():
        sys.exit(f"no project interpreter at {args.project_python}: make the project's .venv first")
    args.bench_python = ensure_venv(args.venv, BENCH / "requirements.txt", sys.executable)
    args.protocols = available_protocols(args.bench_python)
    out = (
        args.out
        or Path(tempfile.gettempdir()) / f"centripy-bench-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"
    )
    log(f"results: {out}" + ("" if args.no_record else f" and {args.results}"))
    procs.raise_nofile(NOFILE)
    sink = Sink(out, None if args.no_record else args.results, commit_stamp(args.quick))
    sink.emit(machine_record(args))
    started_at = time.monotonic()
    records = []
    for scenario in SCENARIOS:
        if scenario.key not in args.scenario_keys:
            continue
        targets = [t for t in scenario.targets if t in args.target_names]
        for repeat in range(args.repeats):
            for target in targets:
                log(f"{scenario.key} {target} #{repeat + 1}/{args.repeats}: {scenario.title}")
                if scenario.kind == "tool":
                    runs = tool_runs(scenario, repeat, args)
                else:
                    runs = [one_run(scenario, target, repeat, args)]
                records += [sink.emit(record) for record in runs]
    print()
    print(render_tables(records))
    log(f"wall time {time.monotonic() - started_at:.0f} s; results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
