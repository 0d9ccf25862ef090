"""Capacity ceilings, each measured on its own (not a test); the figures of docs/capacity.md.

    .venv/bin/python bench/bench_capacity.py --quick          # under 5 minutes
    .venv/bin/python bench/bench_capacity.py                  # full sizes (about 10 minutes)
    .venv/bin/python bench/bench_capacity.py --only log,broker-redis

Ceilings (one JSON line each, then a Markdown table):

- `log`: event-log appends/s through the GroupCommitWriter (bench_log.py's `bench`), SQLite
  (temporary file) and PostgreSQL (unique table prefix, dropped): `single` = one request per
  submit, `--log-callers` in flight; `batch` = `submit_many` of 100 from 8 callers; the
  writer with the server's defaults (at most 500 rows or 2 ms per commit).
- `broker-redis`, `broker-nats`, `broker-pg`: publications/s through the `Broker` contract
  between a publishing node (this process) and `--receivers` (1, then 2) receiving nodes (child
  processes: this script with `--role receiver`, each subscribed to all 8 channels) over one
  Redis shard (127.0.0.1:6379), one NATS server (127.0.0.1:4222) or ONE PostgreSQL NOTIFY
  channel (`PostgresBroker`, shards=1, database `test`), unique prefix (and table, dropped),
  100 B and 4 KB payloads, `--broker-callers` (64) publishes in flight. Rate = publications /
  (last receipt at any receiver - first publish). CPU of the publisher per publication, of
  the receivers per message received, and of the back end's own processes per publication
  (read from /proc: the Redis server on :6379, the NATS server on :4222, every PostgreSQL
  process; anything else using them at the same time is counted too), with the rate one core
  of it would carry. bench_pg_broker.py's `run_case` is not reused: it closes both nodes
  before returning, so their PostgreSQL backends' CPU could not be read.
- `deliveries`: deliveries/s of one `centripy serve` node (memory engine, no history): 1 channel
  x 1,000 subscribers, one publish in flight (as fast as acks allow), then `--inflight` (16) in
  flight (saturation; reorders are then possible and not an error), through run_all.py's
  `one_run` and fanout.py (bench/.venv).
- `connections`: memory and CPU per idle WebSocket connection of one node, through run_all.py's
  `one_run` and connections.py.

Every record carries the 1-minute load average before and after, and the machine's busy cores
(from /proc/stat) measured just before it, since the machine may be shared.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import orjson

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))  # run_all.py imports `procs` as a top-level module

import bench_log  # noqa: E402
import procs  # noqa: E402
import run_all  # noqa: E402

from centripy.engine.contracts import Broker  # noqa: E402
from centripy.engine.types import ClientInfo, Publication  # noqa: E402
from centripy.storage.broker_postgres import PostgresBroker, asyncpg_dsn  # noqa: E402

PG_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
REDIS = "127.0.0.1:6379"
NATS = "nats://127.0.0.1:4222"
ALL = ("log", "broker-redis", "broker-nats", "broker-pg", "deliveries", "connections")


# --- the back-end servers' own CPU -------------------------------------------------------


SERVICE_MARKS = {
    "redis": ("redis-server", "127.0.0.1:6379"),
    "nats": ("nats-server", "4222"),
    "pg": ("postgres", ""),
}


def service_pids(kind: str) -> list[int]:
    """The machine's shared server for `kind` (Redis on :6379, NATS on :4222, every process
    of the PostgreSQL cluster), found by command line."""
    name, mark = SERVICE_MARKS[kind]
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            comm = (entry / "comm").read_text().strip()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if comm == name and mark in cmdline:
            pids.append(int(entry.name))
    return pids


def cpu_snapshot(kind: str) -> dict[int, int]:
    """utime + stime (ticks) of each process of the back end. Taken again at the end: a
    process started meanwhile (a PostgreSQL backend per connection) counts from zero."""
    ticks = {}
    for pid in service_pids(kind):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks[pid] = int(fields[11]) + int(fields[12])
    return ticks


def cpu_between(before: dict[int, int], after: dict[int, int]) -> float:
    """CPU seconds the back end used between two snapshots (processes that exited meanwhile
    are missed, so snapshots are taken while both nodes are connected)."""
    ticks = sum(t - before.get(pid, 0) for pid, t in after.items())
    return ticks / os.sysconf("SC_CLK_TCK")


class CpuSampler:
    """The back end's CPU over a block whose connections come and go (a PostgreSQL backend
    per connection exits when the log closes): polls the processes every 0.1 s, so a backend
    that exits loses at most its last 0.1 s."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.base = cpu_snapshot(kind)
        self.latest = dict(self.base)
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()

    def _poll(self) -> None:
        while not self.done.wait(0.1):
            self.latest.update(cpu_snapshot(self.kind))

    def stop(self) -> tuple[float, int]:
        """(CPU seconds, processes seen)."""
        self.done.set()
        self.thread.join()
        self.latest.update(cpu_snapshot(self.kind))
        return cpu_between(self.base, self.latest), len(self.latest)


def with_server_cpu(record: dict[str, Any], cpu_s: float, pids: int, pubs: int) -> None:
    """Add the back end's CPU per publication and the rate one core of it would carry."""
    if not pids:
        record["server_cpu_us_per_pub"] = None
        return
    per_msg = cpu_s / max(pubs, 1) * 1e6
    record["server_pids"] = pids
    record["server_cpu_us_per_pub"] = round(per_msg, 1)
    record["server_per_core_per_s"] = round(1e6 / per_msg) if per_msg > 0 else None


# --- broker: the receiving node -------------------------------------------------------------


class Receiver:
    """The receiving node's BrokerHandler: counts publications and remembers when the first
    and the last arrived (CLOCK_MONOTONIC, which is system-wide, so comparable with the
    publisher's clock), and the process CPU at the last one."""

    def __init__(self, expect: int) -> None:
        self.expect = expect
        self.count = 0
        self.bytes = 0
        self.first = 0.0
        self.last = 0.0
        self.cpu_last = 0.0
        self.reconnects = 0
        self.progress = asyncio.Event()

    def on_publication(self, channel: str, pub: Publication, epoch: str) -> None:
        now = time.monotonic()
        if not self.count:
            self.first = now
        self.count += 1
        self.bytes += len(pub.data)
        self.last = now
        if self.count >= self.expect:
            self.cpu_last = time.process_time()
        self.progress.set()

    def on_join(self, channel: str, info: ClientInfo) -> None:
        pass

    def on_leave(self, channel: str, info: ClientInfo) -> None:
        pass

    def on_control(self, data: bytes) -> None:
        pass

    def on_reconnect(self) -> None:
        self.reconnects += 1


def make_broker(kind: str, prefix: str, pg_url: str) -> Broker:
    if kind == "redis":
        from centripy.storage.broker_redis import RedisBroker

        return RedisBroker([REDIS], prefix=prefix)
    if kind == "pg":  # ONE NOTIFY channel: shards=1; otherwise as the server builds it
        return PostgresBroker(pg_url, channel_prefix=prefix, table=f"{prefix}_msgs", shards=1)
    from centripy.storage.broker_nats import NatsBroker

    return NatsBroker(NATS, prefix=prefix)


async def receiver_role(args: argparse.Namespace) -> None:
    """Child process: subscribe, print `ready`, count until `--expect` arrived or nothing came
    for `--idle` seconds, print one JSON line."""
    handler = Receiver(args.expect)
    broker = make_broker(args.kind, args.prefix, args.pg_url)
    await broker.start(f"recv-{uuid.uuid4().hex[:8]}", handler)
    for channel in args.subscribe.split(","):
        await broker.subscribe(channel)
    print("ready", flush=True)
    cpu0 = time.process_time()
    while handler.count < args.expect:
        handler.progress.clear()
        try:
            await asyncio.wait_for(handler.progress.wait(), args.idle)
        except TimeoutError:
            break
    cpu = (handler.cpu_last or time.process_time()) - cpu0
    record = {
        "received": handler.count,
        "bytes": handler.bytes,
        "first": handler.first,
        "last": handler.last,
        "cpu_s": cpu,
        "reconnects": handler.reconnects,
    }
    print(orjson.dumps(record).decode(), flush=True)  # before closing: see cpu_snapshot
    await broker.close()


# --- broker: the publishing node ------------------------------------------------------------


async def broker_case(
    kind: str, size: int, receivers: int, args: argparse.Namespace
) -> dict[str, Any]:
    """Publications/s through one Redis shard, one NATS server or one NOTIFY channel: the
    publishing node here, `--receivers` receiving nodes as child processes, each subscribed to
    every channel; the back end's CPU is read from /proc."""
    prefix = f"cap{uuid.uuid4().hex[:10]}"
    channels = [f"chat:{i}" for i in range(8)]
    n = args.broker_messages // args.broker_callers * args.broker_callers
    command = [
        sys.executable,
        __file__,
        "--role=receiver",
        f"--kind={kind}",
        f"--prefix={prefix}",
        f"--expect={n}",
        f"--subscribe={','.join(channels)}",
        f"--pg-url={args.pg_url}",
    ]
    children = [
        await asyncio.create_subprocess_exec(*command, stdout=asyncio.subprocess.PIPE)
        for _ in range(receivers)
    ]
    publisher = make_broker(kind, prefix, args.pg_url)
    try:
        await publisher.start(f"pub-{uuid.uuid4().hex[:8]}", Receiver(0))
        for child in children:
            assert child.stdout is not None
            line = await asyncio.wait_for(child.stdout.readline(), 30)
            if line.strip() != b"ready":
                raise RuntimeError(f"receiver did not start: {line!r}")
        data = os.urandom(size // 2 + 1).hex().encode()[:size]
        per_caller = n // args.broker_callers

        async def caller(c: int) -> None:
            for i in range(per_caller):
                seq = c * per_caller + i
                await publisher.publish(
                    channels[seq % len(channels)], Publication(data, seq + 1), "E"
                )

        server0 = cpu_snapshot(kind)
        t0, cpu0 = time.monotonic(), time.process_time()
        await asyncio.gather(*(caller(c) for c in range(args.broker_callers)))
        published = time.monotonic() - t0
        publisher_cpu = time.process_time() - cpu0
        got = []
        for child in children:
            assert child.stdout is not None
            got.append(orjson.loads(await asyncio.wait_for(child.stdout.readline(), args.timeout)))
        server1 = cpu_snapshot(kind)
        for child in children:
            await child.wait()
    finally:
        for child in children:
            if child.returncode is None:
                child.kill()
                await child.wait()
        with contextlib.suppress(Exception):  # also when it never started
            await publisher.close()
        if kind == "pg":
            conn = await asyncpg.connect(asyncpg_dsn(args.pg_url))
            try:
                await conn.execute(f"DROP TABLE IF EXISTS {prefix}_msgs")
            finally:
                await conn.close()
    received = sum(g["received"] for g in got)
    span = max(max(g["last"] for g in got) - t0, 1e-9)
    record = {
        "ceiling": f"broker-{kind}",
        "case": f"{size} B, {receivers} receiving node(s)",
        "size": size,
        "receivers": receivers,
        "messages": n,
        "in_flight": args.broker_callers,
        "received": received,
        "lost": n * receivers - received,
        "per_s": round(n / span),  # publications/s, each delivered to every receiving node
        "publish_per_s": round(n / published),
        "publisher_cpu_us_per_msg": round(publisher_cpu / n * 1e6, 1),
        "receiver_cpu_us_per_msg": round(sum(g["cpu_s"] for g in got) / max(received, 1) * 1e6, 1),
        "receiver_reconnects": sum(g["reconnects"] for g in got),
    }
    with_server_cpu(record, cpu_between(server0, server1), len(server1), n)
    return record


# --- event log ------------------------------------------------------------------------------


async def log_case(backend: str, mode: str, args: argparse.Namespace) -> dict[str, Any]:
    batch = mode == "batch"
    ns = argparse.Namespace(
        rows=args.log_rows,
        callers=8 if batch else args.log_callers,
        channels=100,
        history_size=100,
        max_batch=500,  # the server's GroupCommitWriter defaults
        max_delay=0.002,
        key=False,
        batch=100 if batch else 1,
        pg_url=args.pg_url,
    )
    sampler = CpuSampler("pg") if backend == "postgres" else None
    cpu0 = time.process_time()
    r = await bench_log.bench(backend, ns)
    node_cpu = time.process_time() - cpu0  # SQLite: aiosqlite's thread included
    record = {
        "ceiling": f"log-{backend}",
        "case": f"batch of 100 x {ns.callers} callers"
        if batch
        else f"single, {ns.callers} in flight",
        "rows": r["rows"],
        "per_s": r["rows_per_s"],
        "mean_commit_rows": r["mean_batch"],
        "seconds": r["seconds"],
        "node_cpu_us_per_append": round(node_cpu / r["rows"] * 1e6, 1),
    }
    if sampler is not None:  # includes the bench table's create and drop
        cpu, pids = sampler.stop()
        record["server_pids"] = pids
        record["server_cpu_us_per_append"] = round(cpu / r["rows"] * 1e6, 1)
    return record


# --- one node: deliveries and connections ---------------------------------------------------


def node_args(args: argparse.Namespace) -> argparse.Namespace:
    bench_python = run_all.ensure_venv(BENCH / ".venv", BENCH / "requirements.txt", sys.executable)
    return argparse.Namespace(
        quick=args.quick,
        pg_url=args.pg_url,
        project_python=BENCH.parent / ".venv" / "bin" / "python",
        bench_python=bench_python,
        quiet=args.quiet,
        quiet_timeout=args.quiet_timeout,
        run_timeout=900.0,
    )


def deliveries_case(args: argparse.Namespace, inflight: int) -> dict[str, Any]:
    m = "300" if args.quick else "2000"
    shape = ("-n", "1000", "-c", "1", "-m", m, "-r", "0", "--inflight", str(inflight))
    scenario = run_all.Scenario(
        "capacity-deliveries", "1 channel x 1,000 subscribers", "fanout.py", shape, shape
    )
    r = run_all.one_run(scenario, "centripy", 0, node_args(args))
    if "error" in r or "skipped" in r:
        return {"ceiling": "deliveries-node", "error": r.get("error") or r.get("skipped")}
    lat = r.get("latency_ms", {})
    return {
        "ceiling": "deliveries-node",
        "case": f"1 channel x 1,000 subscribers, {m} msgs, {inflight} in flight",
        "per_s": round(r["deliveries_per_s"]),
        "server_cpu_us_per_delivery": r.get("server_cpu_us_per_delivery"),
        "server_busy": r.get("server_busy"),
        "client_busy_max": r.get("client_busy_max"),
        "foreign_busy": r.get("foreign_busy"),
        "latency_p50_ms": lat.get("p50"),
        "latency_p99_ms": lat.get("p99"),
        "lost": r.get("lost"),
        "reordered": r.get("reordered"),
        "quiet_busy": r.get("quiet_busy"),
    }


def connections_case(args: argparse.Namespace) -> dict[str, Any]:
    n = "2000" if args.quick else "10000"
    shape = ("-n", n, "--procs", "2")
    scenario = run_all.Scenario(
        "capacity-connections", "idle connections", "connections.py", shape, shape
    )
    r = run_all.one_run(scenario, "centripy", 0, node_args(args))
    if "error" in r or "skipped" in r:
        return {"ceiling": "connections-node", "error": r.get("error") or r.get("skipped")}
    return {
        "ceiling": "connections-node",
        "case": f"{n} idle WebSocket connections, 1 channel",
        "connections": int(n),
        "per_s": round(r["connect_per_s"]),
        "server_kib_per_conn": r.get("server_kib_per_conn"),
        "server_cpu_us_per_conn": r.get("server_cpu_us_per_conn"),
        "server_rss_mb": r.get("server_rss_mb"),
        "reach_s": r.get("reach_s"),
        "quiet_busy": r.get("quiet_busy"),
    }


# --- driver ---------------------------------------------------------------------------------


UNITS = {
    "log-sqlite": "appends/s",
    "log-postgres": "appends/s",
    "broker-redis": "publications/s",
    "broker-nats": "publications/s",
    "broker-pg": "publications/s",
    "deliveries-node": "deliveries/s",
    "connections-node": "connects/s",
}


def detail(r: dict[str, Any]) -> str:
    if "error" in r:
        return f"error: {str(r['error'])[:120]}"
    if r["ceiling"].startswith("broker"):
        return (
            f"receiver {r['receiver_cpu_us_per_msg']} µs/msg, publisher "
            f"{r['publisher_cpu_us_per_msg']} µs/msg, server {r['server_cpu_us_per_pub']} µs/pub, "
            f"lost {r['lost']}"
        )
    if r["ceiling"].startswith("log"):
        server = r.get("server_cpu_us_per_append")
        return (
            f"{r['mean_commit_rows']} rows per commit, node {r['node_cpu_us_per_append']} µs/append"
            + ("" if server is None else f", PostgreSQL {server} µs/append")
        )
    if r["ceiling"] == "deliveries-node":
        return (
            f"server {r['server_cpu_us_per_delivery']} µs/delivery, busy {r['server_busy']}, "
            f"p99 {r['latency_p99_ms']} ms, lost {r['lost']}"
        )
    return (
        f"{r['server_kib_per_conn']} KiB/conn, {r['server_cpu_us_per_conn']} µs CPU/conn, "
        f"broadcast reach {r['reach_s']} s"
    )


def table(records: list[dict[str, Any]]) -> str:
    rows = [
        "| ceiling | case | figure | details | loadavg |",
        "|---|---|---|---|---|",
    ]
    for r in records:
        figure = "" if "error" in r else f"{r['per_s']:,} {UNITS[r['ceiling']]}"
        rows.append(
            f"| {r['ceiling']} | {r.get('case', '')} | {figure} | {detail(r)} | "
            f"{r['loadavg_before']} → {r['loadavg_after']} |"
        )
    return "\n".join(rows)


def measure(name: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Run one ceiling's cases; each record gets the load around it."""
    jobs: list[tuple[str, str, Any]] = []  # (ceiling, case, run) of each case
    if name == "log":
        for backend in ("sqlite", "postgres"):
            for mode in ("single", "batch"):
                run = lambda b=backend, m=mode: asyncio.run(log_case(b, m, args))  # noqa: E731
                jobs.append((f"log-{backend}", mode, run))
    elif name.startswith("broker-"):
        for receivers in (int(r) for r in args.receivers.split(",")):
            for size in (100, 4096):
                run = lambda k=name[7:], s=size, r=receivers: asyncio.run(  # noqa: E731
                    broker_case(k, s, r, args)
                )
                jobs.append((name, f"{size} B, {receivers} receiving node(s)", run))
    elif name == "deliveries":
        for inflight in (1, args.inflight):
            run = lambda i=inflight: deliveries_case(args, i)  # noqa: E731
            jobs.append(("deliveries-node", f"{inflight} in flight", run))
    else:
        jobs.append(("connections-node", "", lambda: connections_case(args)))
    records = []
    for ceiling, case, job in jobs:
        busy = round(procs.machine_busy(1.0), 2)
        before = round(os.getloadavg()[0], 2)
        started = time.monotonic()
        try:
            record = job()
        except Exception as exc:  # a missing service or a failed run: report, go on
            record = {"ceiling": ceiling, "case": case, "error": f"{type(exc).__name__}: {exc}"}
        record.update(
            {
                "busy_cores_before": busy,
                "loadavg_before": before,
                "loadavg_after": round(os.getloadavg()[0], 2),
                "wall_s": round(time.monotonic() - started, 1),
                "quick": args.quick,
            }
        )
        print(orjson.dumps(record).decode(), flush=True)
        records.append(record)
    return records


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="reduced sizes, under 5 minutes")
    p.add_argument("--only", default=",".join(ALL), help=f"comma-separated of {','.join(ALL)}")
    p.add_argument("--pg-url", default=PG_URL)
    p.add_argument("--log-rows", type=int, help="default 50,000 (quick 20,000)")
    p.add_argument("--log-callers", type=int, default=200, help="single appends in flight")
    p.add_argument("--broker-messages", type=int, help="default 50,000 (quick 10,000)")
    p.add_argument("--receivers", help="receiving nodes per broker case (1,2; quick 1)")
    p.add_argument("--broker-callers", type=int, default=64, help="Redis/NATS publishes in flight")
    p.add_argument(
        "--quiet", type=float, default=0.5, help="node runs wait for <= this many busy cores"
    )
    p.add_argument("--inflight", type=int, default=16, help="publishes in flight, 2nd case")
    p.add_argument("--quiet-timeout", type=float, help="at most this long (60 s; quick 20 s)")
    p.add_argument("--timeout", type=float, default=300.0)
    # the receiving child's own arguments
    p.add_argument("--role", default="main", choices=["main", "receiver"])
    p.add_argument("--kind", default="redis", choices=["redis", "nats", "pg"])
    p.add_argument("--prefix", default="")
    p.add_argument("--expect", type=int, default=0)
    p.add_argument("--subscribe", default="")
    p.add_argument("--idle", type=float, default=10.0, help="receiver: give up after this quiet")
    args = p.parse_args()
    args.log_rows = args.log_rows or (20_000 if args.quick else 50_000)
    args.broker_messages = args.broker_messages or (10_000 if args.quick else 50_000)
    args.receivers = args.receivers or ("1" if args.quick else "1,2")
    if args.quiet_timeout is None:
        args.quiet_timeout = 20.0 if args.quick else 60.0
    unknown = set(args.only.split(",")) - set(ALL)
    if unknown:
        p.error(f"unknown ceilings {sorted(unknown)}: choose from {list(ALL)}")
    return args


def main() -> None:
    args = parse()
    if args.role == "receiver":
        asyncio.run(receiver_role(args))
        return
    procs.raise_nofile(run_all.NOFILE)
    header = {
        "bench": "capacity",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": procs.machine_info(),
        "loadavg": os.getloadavg(),
        "quick": args.quick,
    }
    print(orjson.dumps(header).decode(), flush=True)
    records: list[dict[str, Any]] = []
    for name in ALL:
        if name in args.only.split(","):
            records += measure(name, args)
    print()
    print(table(records))
    print(f"\nload average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
