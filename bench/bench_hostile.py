#!/usr/bin/env python3
"""Hostile-client floods beside a witness subscriber, against a real server (not a test).

One `centripy serve` process (SQLite event log, the default; anonymous connect and client
subscribe allowed; `http_read_header_timeout` 2 s, `http_read_timeout` 5 s, `http_idle_timeout`
5 s) runs through a sequence of phases of --phase-seconds each:

    baseline, idle_sockets, recovery, slowloris, recovery, wrong_key_bodies, recovery,
    non_readers, recovery, command_flood, recovery

During every phase a witness (one WebSocket client, protocol v2 JSON, subscribed to `witness`)
receives the publications that a publisher POSTs to `/api/publish` at a steady --rate, each
carrying `{"n": i, "t": <monotonic ns just before the request>}`. The witness checks that it
gets every acknowledged n once and in increasing order, and measures latency per publication.

The attacks (each in its own client process, `--attack NAME`, so that the attacker's event
loop does not sit in the witness's):

1. `idle_sockets`: --idle TCP connections that send nothing; reopened when the server closes.
2. `slowloris`: --slowloris connections sending one header byte every 0.5 s; reopened.
3. `wrong_key_bodies`: --huge connections each announcing `Content-Length: 40000000` with a
   wrong `X-API-Key` and sending 64 KiB of it; the answer should come before the body.
4. `non_readers`: --non-readers raw WebSocket clients (small SO_RCVBUF) subscribed to `flood`
   that never read, while the publisher also sends ~40 KB messages to `flood` (--flood-rate).
5. `command_flood`: --flooders WebSocket clients writing frames of 500 `presence_stats` /
   `history` commands each, as fast as the server reads them.

(Unknown-kid and poison tokens are covered by the integration tests; not repeated here.)

Per phase: server RSS (end and max), open files (end and max), server CPU seconds, witness
received/expected, lost, duplicated, reordered, p50/p99/max latency, and the attacker's own
figures. A Markdown table at the end, then one JSON line with everything:

    .venv/bin/python bench/bench_hostile.py
    .venv/bin/python bench/bench_hostile.py --phase-seconds 5 --attacks idle_sockets,slowloris

Every wait is bounded; --timeout bounds the whole run, and the server is stopped (SIGTERM,
then SIGKILL) in a `finally`. All coroutines here run on one event loop per process (the main
process: witness, publishers, /proc sampler, phase driver; each attacker: its own).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import contextlib
import os
import resource
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from common import bench_server, emit, load_average, process_cpu_seconds, raise_nofile_limit
from connections import OP_TEXT, check_upgrade, encode_frame, take_frames
from procs import percentile

HOST = "127.0.0.1"
WITNESS = "witness"
FLOOD = "flood"
CMD_CHANNEL = "cmd"
ATTACKS = ("idle_sockets", "slowloris", "wrong_key_bodies", "non_readers", "command_flood")
now_ns = time.monotonic_ns
SCRIPT = str(Path(__file__).resolve())


# --- small helpers (pure) --------------------------------------------------------------------


def server_config(args: argparse.Namespace) -> dict[str, Any]:
    """The server's config: anonymous clients may connect, subscribe, ask presence and history
    (so the command flood reaches the storage), and the HTTP timeouts are short."""
    return {
        "allow_anonymous_connect_without_token": True,
        "allow_subscribe_for_client": True,
        "allow_subscribe_for_anonymous": True,
        "presence": True,
        "allow_presence_for_client": True,
        "allow_presence_for_anonymous": True,
        "history_size": 100,
        "history_ttl": "300s",
        "allow_history_for_client": True,
        "allow_history_for_anonymous": True,
        "http_read_header_timeout": f"{args.header_timeout:g}s",
        "http_read_timeout": "5s",
        "http_idle_timeout": "5s",
        "shutdown_timeout": "5s",
        "log_level": "warn",
    }


def quantiles_ms(values_ns: list[int]) -> dict[str, float | None]:
    """p50/p99/max of nanosecond values, in ms rounded to 0.01."""
    ordered = sorted(values_ns)

    def to_ms(v: int | None) -> float | None:
        return None if v is None else round(v / 1e6, 2)

    return {
        "p50_ms": to_ms(percentile(ordered, 50)),
        "p99_ms": to_ms(percentile(ordered, 99)),
        "max_ms": to_ms(ordered[-1] if ordered else None),
    }


def quantiles_s(values: list[float]) -> dict[str, float | None]:
    """p50/max of float seconds, rounded to 1 ms."""
    ordered = sorted(values)
    p50 = percentile(ordered, 50)  # type: ignore[arg-type]
    return {
        "p50_s": None if p50 is None else round(float(p50), 3),
        "max_s": round(ordered[-1], 3) if ordered else None,
    }


def server_memory_mib(pid: int) -> float:
    """VmRSS of `pid` in MiB, from /proc/<pid>/status (0.0 if gone)."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def server_open_files(pid: int) -> int:
    """How many file descriptors `pid` has open (-1 if it is gone)."""
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


def own_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return round(usage.ru_utime + usage.ru_stime, 2)


def ws_request(port: int) -> tuple[bytes, bytes]:
    """(upgrade request, its Sec-WebSocket-Key) for /connection/websocket."""
    key = base64.b64encode(os.urandom(16))
    head = (
        f"GET /connection/websocket HTTP/1.1\r\nHost: {HOST}:{port}\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: "
    ).encode()
    return head + key + b"\r\n\r\n", key


# --- HTTP publisher (main process) -----------------------------------------------------------


class HttpConn:
    """One keep-alive HTTP/1.1 connection to the server's API, reopened after a failure.
    Used by one task at a time on the main loop."""

    def __init__(self, port: int, api_key: str) -> None:
        self.port = port
        self.api_key = api_key
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    def close(self) -> None:
        if self.writer is not None:
            self.writer.transport.abort()
        self.reader = self.writer = None

    async def post(self, path: str, body: bytes, timeout: float) -> tuple[int, bytes]:
        try:
            async with asyncio.timeout(timeout):
                if self.writer is None:
                    self.reader, self.writer = await asyncio.open_connection(HOST, self.port)
                assert self.reader is not None
                head = (
                    f"POST {path} HTTP/1.1\r\nHost: {HOST}:{self.port}\r\n"
                    f"X-API-Key: {self.api_key}\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(body)}\r\n\r\n"
                ).encode()
                self.writer.write(head + body)
                raw = await self.reader.readuntil(b"\r\n\r\n")
                lines = raw.decode("latin-1").split("\r\n")
                status = int(lines[0].split()[1])
                headers = {}
                for line in lines[1:]:
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
                length = int(headers.get("content-length", "0"))
                payload = await self.reader.readexactly(length) if length else b""
        except BaseException:
            self.close()
            raise
        if headers.get("connection", "").lower() == "close":
            self.close()
        return status, payload


@dataclass
class Publisher:
    """Publishes to `channel` at `rate`/s from one connection, one request in flight (so the
    witness may demand strict order). When more than 1 s behind schedule it skips ticks
    (counted) rather than bursting. Runs on the main loop until `stop` is set."""

    port: int
    api_key: str
    channel: str
    rate: float
    pad: int = 0
    n: int = 0
    sent_ns: dict[int, int] = field(default_factory=dict)
    acked: set[int] = field(default_factory=set)
    ack_ns: dict[int, int] = field(default_factory=dict)
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    skipped: int = 0

    async def run(self, stop: asyncio.Event) -> None:
        conn = HttpConn(self.port, self.api_key)
        period = 1.0 / self.rate
        t0 = time.monotonic()
        tick = 0
        pad = "x" * self.pad
        try:
            while not stop.is_set():
                now = time.monotonic()
                target = t0 + tick * period
                if now - target > 1.0:
                    behind = int((now - t0) / period) - tick
                    self.skipped += behind
                    tick += behind
                elif target > now:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), target - now)
                    continue
                tick += 1
                n = self.n
                self.n += 1
                t = now_ns()
                data: dict[str, Any] = {"n": n, "t": t}
                if pad:
                    data["pad"] = pad
                body = orjson.dumps({"channel": self.channel, "data": data})
                self.sent_ns[n] = t
                try:
                    status, reply = await conn.post("/api/publish", body, 5.0)
                except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError) as exc:
                    self.errors[type(exc).__name__] += 1
                    continue
                if status == 200 and b'"error"' not in reply:
                    self.acked.add(n)
                    self.ack_ns[n] = now_ns() - t
                else:
                    self.errors[f"{status} {reply[:80]!r}"] += 1
        finally:
            conn.close()


# --- witness (main process) ------------------------------------------------------------------


@dataclass
class Witness:
    """One WebSocket subscriber of `witness`; reconnects (counted) if it is disconnected.
    Runs on the main loop until it is cancelled (or `stop` is set and the socket ends)."""

    url: str
    latency_ns: dict[int, int] = field(default_factory=dict)  # n -> first arrival latency
    count: collections.Counter[int] = field(default_factory=collections.Counter)
    reordered: collections.Counter[int] = field(default_factory=collections.Counter)
    max_n: int = -1
    disconnects: int = 0
    pongs: int = 0
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    subscribed: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self, stop: asyncio.Event) -> None:
        from websockets.asyncio.client import connect
        from websockets.exceptions import WebSocketException

        while not stop.is_set():
            try:
                async with connect(
                    self.url, ping_interval=None, max_size=None, open_timeout=5, close_timeout=1
                ) as ws:
                    await ws.send('{"id":1,"connect":{}}')
                    await ws.send(
                        orjson.dumps({"id": 2, "subscribe": {"channel": WITNESS}}).decode()
                    )
                    async for message in ws:
                        if self.handle(message, now_ns()):
                            await ws.send("{}")
                            self.pongs += 1
            except (OSError, TimeoutError, WebSocketException, ValueError) as exc:
                self.errors[f"{type(exc).__name__}: {str(exc)[:80]}"] += 1
            if stop.is_set():
                return
            self.disconnects += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.2)

    def handle(self, message: str | bytes, t: int) -> bool:
        """Account for one frame; True if it holds a ping that needs a `{}` answer."""
        text = message.decode() if isinstance(message, bytes) else message
        ping = False
        for line in text.split("\n"):
            if not line.strip() or line.strip() == "{}":
                ping = True
                continue
            msg = orjson.loads(line)
            push = msg.get("push")
            if push is not None:
                pub = push.get("pub")
                if push.get("channel") == WITNESS and pub is not None:
                    self.publication(pub.get("data") or {}, t)
                elif "disconnect" in push:
                    self.errors[f"disconnect push {push['disconnect']}"] += 1
            elif "error" in msg:
                raise ValueError(f"error reply {msg['error']}")
            elif msg.get("id") == 2:
                self.subscribed.set()
        return ping

    def publication(self, data: dict[str, Any], t: int) -> None:
        n = int(data["n"])
        self.count[n] += 1
        if self.count[n] == 1:
            self.latency_ns[n] = t - int(data["t"])
        if n < self.max_n:
            self.reordered[n] += 1
        else:
            self.max_n = n


# --- phases (main process) -------------------------------------------------------------------


@dataclass
class Phase:
    name: str
    attack: str  # "" for baseline/recovery
    seconds: float = 0.0
    n_first: int = 0
    n_end: int = 0
    cpu_s: float = 0.0
    rss_start: float = 0.0
    rss_end: float = 0.0
    rss_max: float = 0.0
    fds_start: int = 0
    fds_end: int = 0
    fds_max: int = 0
    attack_stats: dict[str, Any] = field(default_factory=dict)
    flood_published: int = 0
    flood_errors: dict[str, int] = field(default_factory=dict)
    series: list[list[float]] = field(default_factory=list)  # [s, open files, RSS MiB]


async def sample(pid: int, phase: Phase, stop: asyncio.Event) -> None:
    """Every 0.25 s: the server's RSS and open files, keeping the phase's maxima; every
    0.5 s also a point of the phase's time series."""
    t0 = time.monotonic()
    tick = 0
    while not stop.is_set():
        rss, fds = server_memory_mib(pid), server_open_files(pid)
        phase.rss_max = max(phase.rss_max, rss)
        phase.fds_max = max(phase.fds_max, fds)
        if tick % 2 == 0:
            phase.series.append([round(time.monotonic() - t0, 1), fds, rss])
        tick += 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.25)


async def run_attacker(args: argparse.Namespace, port: int, attack: str) -> dict[str, Any]:
    """Run `attack` in a child process (this script with --attack) for --phase-seconds; its
    one JSON line is the result. A child that overruns by 20 s is killed by its PID."""
    command = [sys.executable, SCRIPT, "--attack", attack]
    command += ["--port", str(port), "--phase-seconds", str(args.phase_seconds)]
    keys = ("idle", "slowloris", "huge", "pause", "non_readers", "flooders", "commands", "rcvbuf")
    for key in (*keys, "header_timeout", "server_pid"):
        command += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    proc = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), args.phase_seconds + 20)
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), 5)
    lines = out.decode(errors="replace").strip().splitlines()
    if proc.returncode != 0 or not lines:
        return {"failed": f"exit {proc.returncode}: {err.decode(errors='replace')[-400:]}"}
    result: dict[str, Any] = orjson.loads(lines[-1])
    return result


async def run_phase(
    args: argparse.Namespace, pid: int, port: int, phase: Phase, publisher: Publisher
) -> None:
    phase.n_first = publisher.n
    phase.rss_start = phase.rss_max = server_memory_mib(pid)
    phase.fds_start = phase.fds_max = server_open_files(pid)
    cpu0 = process_cpu_seconds(pid)
    t0 = time.monotonic()
    stop = asyncio.Event()
    sampler = asyncio.create_task(sample(pid, phase, stop))
    flood: Publisher | None = None
    flood_task: asyncio.Task[None] | None = None
    try:
        if phase.attack == "non_readers":
            flood = Publisher(port, args.api_key, FLOOD, args.flood_rate, pad=args.flood_size)
            flood_task = asyncio.create_task(flood.run(stop))
        if phase.attack:
            phase.attack_stats = await run_attacker(args, port, phase.attack)
        else:
            await asyncio.sleep(args.phase_seconds)
    finally:
        stop.set()
        for task in (sampler, flood_task):
            if task is not None:
                with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                    await asyncio.wait_for(task, 6)
    phase.seconds = round(time.monotonic() - t0, 2)
    phase.cpu_s = round(process_cpu_seconds(pid) - cpu0, 2)
    phase.rss_end = server_memory_mib(pid)
    phase.fds_end = server_open_files(pid)
    phase.rss_max = max(phase.rss_max, phase.rss_end)
    phase.fds_max = max(phase.fds_max, phase.fds_end)
    phase.n_end = publisher.n
    if flood is not None:
        phase.flood_published = len(flood.acked)
        phase.flood_errors = dict(flood.errors)


def phase_plan(args: argparse.Namespace) -> list[Phase]:
    phases = [Phase("baseline", "")]
    for attack in args.attacks.split(","):
        if attack not in ATTACKS:
            raise SystemExit(f"unknown attack {attack!r}: choose from {', '.join(ATTACKS)}")
        phases += [Phase(attack, attack), Phase(f"recovery ({attack})", "")]
    return phases


def witness_figures(phase: Phase, publisher: Publisher, witness: Witness) -> dict[str, Any]:
    ns = range(phase.n_first, phase.n_end)
    acked = [n for n in ns if n in publisher.acked]
    received = [n for n in acked if witness.count[n] > 0]
    return {
        "published": len(ns),
        "expected": len(acked),
        "received": len(received),
        "lost": len(acked) - len(received),
        "duplicated": sum(1 for n in ns if witness.count[n] > 1),
        "reordered": sum(witness.reordered[n] for n in ns),
        "delivered_unacked": sum(1 for n in ns if n not in publisher.acked and witness.count[n]),
        **quantiles_ms([witness.latency_ns[n] for n in received]),
        "ack_p99_ms": quantiles_ms([publisher.ack_ns[n] for n in acked])["p99_ms"],
    }


def attack_summary(stats: dict[str, Any]) -> str:
    """A short human summary of an attacker's result for the table."""
    if not stats:
        return ""
    if "failed" in stats:
        return f"attacker failed: {stats['failed'][:60]}"
    kind = stats.get("attack")
    if kind in ("idle_sockets", "slowloris"):
        closed = stats["closed_by_server"]
        after = stats["close_after"]
        return (
            f"{stats['opened']} opened, {closed} closed by server (p50 {after['p50_s']} s, "
            f"max {after['max_s']} s), {stats['open_at_end_overdue']} open past timeout"
        )
    if kind == "wrong_key_bodies":
        return (
            f"{stats['requests']} requests, status {stats['statuses']}, answer p50 "
            f"{1000 * (stats['answer']['p50_s'] or 0):.0f} ms max "
            f"{1000 * (stats['answer']['max_s'] or 0):.0f} ms, "
            f"{stats['closed_after_answer']} closed after it, "
            f"{stats['kept_open']} kept open, {stats['no_answer']} unanswered"
        )
    if kind == "non_readers":
        return (
            f"{stats['subscribed']}/{stats['clients']} subscribed; server fds "
            f"{stats['server_fds_subscribed']} -> {stats['server_fds_end']} at end; "
            f"client TCP states {stats['tcp_states']}"
        )
    if kind == "command_flood":
        return (
            f"{stats['frames_sent']} frames ({stats['commands_sent']} cmds), "
            f"~{stats['replies']} replies, {stats['error_replies']} errors, "
            f"{stats['disconnects']} disconnects"
        )
    return ""


def markdown_table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| phase | s | RSS MiB end (max) | open files end (max) | server CPU s | acked pub/s | "
        "witness recv/expected | lost | dup | reord | p50 ms | p99 ms | max ms | attacker |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in rows:
        w = r["witness"]
        lines.append(
            f"| {r['phase']} | {r['seconds']} | {r['rss_end']} ({r['rss_max']}) | "
            f"{r['fds_end']} ({r['fds_max']}) | {r['cpu_s']} | "
            f"{round(w['expected'] / r['seconds']) if r['seconds'] else ''} | "
            f"{w['received']}/{w['expected']} | {w['lost']} | {w['duplicated']} | "
            f"{w['reordered']} | {w['p50_ms']} | {w['p99_ms']} | {w['max_ms']} | "
            f"{attack_summary(r['attack_stats'])} |"
        )
    return head + "\n".join(lines)


async def drive(args: argparse.Namespace, pid: int, port: int, out: dict[str, Any]) -> None:
    """The whole run on the main loop: witness up, publisher on, phases in turn, drain."""
    stop = asyncio.Event()
    witness = Witness(f"ws://{HOST}:{port}/connection/websocket")
    publisher = Publisher(port, args.api_key, WITNESS, args.rate)
    out["witness"] = witness
    out["publisher"] = publisher
    witness_task = asyncio.create_task(witness.run(stop))
    pub_stop = asyncio.Event()
    pub_task: asyncio.Task[None] | None = None
    try:
        await asyncio.wait_for(witness.subscribed.wait(), 10)
        pub_task = asyncio.create_task(publisher.run(pub_stop))
        for phase in phase_plan(args):
            print(f"phase {phase.name} ...", file=sys.stderr, flush=True)
            await run_phase(args, pid, port, phase, publisher)
            out["phases"].append(phase)
        pub_stop.set()
        await asyncio.wait_for(pub_task, 10)
        deadline = time.monotonic() + 3.0  # the last publications' way to the witness
        while time.monotonic() < deadline and any(witness.count[n] == 0 for n in publisher.acked):
            await asyncio.sleep(0.05)
    finally:
        pub_stop.set()
        stop.set()
        for task in (pub_task, witness_task):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task


def report(args: argparse.Namespace, pid: int, out: dict[str, Any], timed_out: bool) -> None:
    witness: Witness | None = out.get("witness")
    publisher: Publisher | None = out.get("publisher")
    rows = []
    for phase in out["phases"]:
        row = {k: v for k, v in phase.__dict__.items() if k not in ("n_first", "n_end")}
        row["phase"] = row.pop("name")
        if witness is not None and publisher is not None:
            row["witness"] = witness_figures(phase, publisher, witness)
        rows.append(row)
    if rows:
        print(markdown_table(rows), flush=True)
    record: dict[str, Any] = {
        "bench": "hostile",
        "loadavg": load_average(),
        "timed_out": timed_out,
        "server_pid": pid,
        "config": server_config(args),
        "args": {k: v for k, v in vars(args).items() if k not in ("api_key", "attack")},
        "phases": rows,
        "server_log_problems": out.get("server_log_problems", {}),
        "main_process_cpu_s": own_cpu_s(),
    }
    if witness is not None and publisher is not None:
        record["witness_disconnects"] = witness.disconnects
        record["witness_pongs"] = witness.pongs
        record["witness_errors"] = dict(witness.errors)
        record["publisher_errors"] = dict(publisher.errors)
        record["publisher_skipped_ticks"] = publisher.skipped
    emit(record)


def server_log_problems(stderr_path: Path, stdout_path: Path) -> dict[str, Any]:
    """Counts of error-looking lines in the server's logs, and up to 2 samples of each kind."""
    counts: collections.Counter[str] = collections.Counter()
    samples: list[str] = []
    for path in (stderr_path, stdout_path):
        with contextlib.suppress(OSError):
            for line in path.read_text(errors="replace").splitlines():
                low = line.lower()
                for word in ("traceback", "error", "exception", "warn"):
                    if word in low:
                        counts[word] += 1
                        if counts[word] <= 2:
                            samples.append(line[:200])
                        break
    return {"counts": dict(counts), "samples": samples}


def main_parent(args: argparse.Namespace) -> None:
    raise_nofile_limit(20_000)  # the server inherits it
    out: dict[str, Any] = {"phases": []}
    config = {**server_config(args), "api_key": args.api_key}
    timed_out = False
    pid = 0
    with bench_server(config, "hostile", keep=args.keep) as server:
        pid = args.server_pid = server.pid or 0
        print(f"server pid {pid} on port {server.port}, folder {server.workdir}", file=sys.stderr)
        try:
            asyncio.run(asyncio.wait_for(drive(args, pid, server.port, out), args.timeout))
        except TimeoutError:
            timed_out = True
            print(f"--timeout {args.timeout} s reached: partial results", file=sys.stderr)
        finally:
            out["server_log_problems"] = server_log_problems(server.stderr_path, server.stdout_path)
    report(args, pid, out, timed_out)


# --- attackers (child processes) ------------------------------------------------------------


class Deadline:
    """The end of an attack, on the attacker's loop clock."""

    def __init__(self, seconds: float) -> None:
        self.at = asyncio.get_running_loop().time() + seconds

    def left(self) -> float:
        return self.at - asyncio.get_running_loop().time()


async def open_tcp(
    port: int, sem: asyncio.Semaphore, errors: collections.Counter[str]
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
    async with sem:
        try:
            return await asyncio.wait_for(asyncio.open_connection(HOST, port), 3)
        except (OSError, TimeoutError) as exc:
            errors[type(exc).__name__] += 1
    await asyncio.sleep(0.2)
    return None


def abort(writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(Exception):
        writer.transport.abort()


async def hold_until_closed(
    a: argparse.Namespace, count: int, first: bytes, drip: bytes
) -> dict[str, Any]:
    """`count` connections that write `first` once, then `drip` every 0.5 s (nothing at all
    when `drip` is empty), read whatever the server sends, and are reopened when the server
    closes them. `idle_sockets`: nothing, nothing; `slowloris`: request line + Host, one
    header byte per 0.5 s."""
    deadline = Deadline(a.phase_seconds)
    sem = asyncio.Semaphore(64)
    errors: collections.Counter[str] = collections.Counter()
    responses: collections.Counter[str] = collections.Counter()
    close_after: list[float] = []
    open_ages: list[float] = []
    opened = 0

    async def read_until_closed(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        answered = False
        if first:
            writer.write(first)
        while True:
            if drip:
                try:
                    data = await asyncio.wait_for(reader.read(4096), 0.5)
                except TimeoutError:
                    writer.write(drip)
                    continue
            else:
                data = await reader.read(4096)
            if not data:
                return
            if not answered:
                answered = True
                responses[data.split(b"\r\n", 1)[0][:40].decode("latin-1")] += 1

    async def one(index: int) -> None:
        nonlocal opened
        await asyncio.sleep(index % 100 * 0.005)
        while deadline.left() > 0.2:
            conn = await open_tcp(a.port, sem, errors)
            if conn is None:
                continue
            reader, writer = conn
            opened += 1
            t_open = time.monotonic()
            try:
                async with asyncio.timeout_at(deadline.at):
                    await read_until_closed(reader, writer)
                close_after.append(time.monotonic() - t_open)
            except TimeoutError:
                open_ages.append(time.monotonic() - t_open)
                abort(writer)
                return
            except OSError as exc:  # a reset is a close too
                errors[f"after open: {type(exc).__name__}"] += 1
                close_after.append(time.monotonic() - t_open)
            abort(writer)

    await asyncio.gather(*(one(i) for i in range(count)))
    overdue = [age for age in open_ages if age > a.header_timeout + 1.0]
    return {
        "opened": opened,
        "closed_by_server": len(close_after),
        "close_after": quantiles_s(close_after),
        "open_at_end": len(open_ages),
        "open_at_end_overdue": len(overdue),
        "open_at_end_max_age_s": round(max(open_ages), 2) if open_ages else None,
        "responses": dict(responses),
        "errors": dict(errors),
    }


async def attack_idle(a: argparse.Namespace) -> dict[str, Any]:
    return await hold_until_closed(a, a.idle, b"", b"")


async def attack_slowloris(a: argparse.Namespace) -> dict[str, Any]:
    head = f"GET /connection/websocket HTTP/1.1\r\nHost: {HOST}:{a.port}\r\nX-Slow: ".encode()
    return await hold_until_closed(a, a.slowloris, head, b"a")


async def attack_wrong_key(a: argparse.Namespace) -> dict[str, Any]:
    """--huge connections, each: head announcing 40 MB with a wrong key plus 64 KiB of body,
    wait for the answer (at most 5 s), then for the server to close (at most 3 s); again
    after --pause."""
    deadline = Deadline(a.phase_seconds)
    sem = asyncio.Semaphore(64)
    errors: collections.Counter[str] = collections.Counter()
    statuses: collections.Counter[str] = collections.Counter()
    answer_s: list[float] = []
    tally = {"requests": 0, "no_answer": 0, "closed_after_answer": 0, "reset_after_answer": 0}
    tally["kept_open"] = 0
    head = (
        f"POST /api/publish HTTP/1.1\r\nHost: {HOST}:{a.port}\r\nX-API-Key: wrong-key\r\n"
        "Content-Type: application/json\r\nContent-Length: 40000000\r\n\r\n"
    ).encode()
    chunk = b'{"channel":"witness","data":"' + b"x" * (65536 - 30)

    async def one(index: int) -> None:
        await asyncio.sleep(index % 100 * 0.005)
        while deadline.left() > 0.5:
            conn = await open_tcp(a.port, sem, errors)
            if conn is None:
                continue
            reader, writer = conn
            tally["requests"] += 1
            t0 = time.monotonic()
            try:
                writer.write(head + chunk)
                try:
                    async with asyncio.timeout(min(5.0, max(0.1, deadline.left()))):
                        raw = await reader.readuntil(b"\r\n\r\n")
                except TimeoutError:
                    tally["no_answer"] += 1
                    raise
                answer_s.append(time.monotonic() - t0)
                statuses[raw.split(b" ", 2)[1].decode("latin-1")] += 1
                try:  # does the server close the connection rather than read 40 MB?
                    async with asyncio.timeout(min(3.0, max(0.1, deadline.left()))):
                        while await reader.read(65536):
                            pass
                    tally["closed_after_answer"] += 1
                except ConnectionResetError:  # closed with our body unread: RST
                    tally["closed_after_answer"] += 1
                    tally["reset_after_answer"] += 1
                except TimeoutError:
                    tally["kept_open"] += 1
            except TimeoutError:
                pass
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
                errors[type(exc).__name__] += 1
            abort(writer)
            await asyncio.sleep(a.pause)

    await asyncio.gather(*(one(i) for i in range(a.huge)))
    return {
        **tally,
        "statuses": dict(statuses),
        "answer": quantiles_s(answer_s),
        "errors": dict(errors),
    }


async def ws_open(
    port: int, *, rcvbuf: int = 0, sndbuf: int = 0, timeout: float = 5.0
) -> tuple[socket.socket, bytearray]:
    """A raw non-blocking socket upgraded to WebSocket (the bytes read past the 101 head are
    returned); SO_RCVBUF / SO_SNDBUF set before connecting when given."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    if sndbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    try:
        async with asyncio.timeout(timeout):
            await loop.sock_connect(sock, (HOST, port))
            request, key = ws_request(port)
            await loop.sock_sendall(sock, request)
            buf = bytearray()
            while b"\r\n\r\n" not in buf:
                data = await loop.sock_recv(sock, 65536)
                if not data:
                    raise ConnectionError("closed during the upgrade")
                buf += data
            end = buf.index(b"\r\n\r\n")
            problem = check_upgrade(bytes(buf[:end]), key)
            if problem:
                raise ConnectionError(problem)
            del buf[: end + 4]
    except BaseException:
        sock.close()
        raise
    return sock, buf


TCP_STATES = {1: "established", 7: "closed (reset)", 8: "close_wait (fin)"}


def tcp_state(sock: socket.socket) -> str:
    """The kernel's TCP state of `sock` (from TCP_INFO), without reading from it."""
    try:
        state = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]
    except OSError as exc:
        return type(exc).__name__
    return TCP_STATES.get(state, f"state {state}")


async def attack_non_readers(a: argparse.Namespace) -> dict[str, Any]:
    """--non-readers clients subscribe to `flood` (SO_RCVBUF --rcvbuf), then never read. At
    the end: the server's open files (if --server-pid) and each socket's TCP state, found
    without reading (a server close with data still queued shows only as fewer server fds:
    its FIN waits behind the unread bytes)."""
    loop = asyncio.get_running_loop()
    deadline = Deadline(a.phase_seconds)
    errors: collections.Counter[str] = collections.Counter()
    hello = b'{"id":1,"connect":{}}\n' + orjson.dumps({"id": 2, "subscribe": {"channel": FLOOD}})
    mask = os.urandom(4)
    socks: list[socket.socket] = []

    async def subscribe(index: int) -> None:
        await asyncio.sleep(index * 0.005)
        try:
            sock, buf = await ws_open(a.port, rcvbuf=a.rcvbuf)
        except (OSError, TimeoutError) as exc:
            errors[f"open: {type(exc).__name__} {exc}"[:80]] += 1
            return
        try:
            await loop.sock_sendall(sock, encode_frame(OP_TEXT, hello, mask))
            async with asyncio.timeout(5):
                while True:
                    for _fin, opcode, payload in take_frames(buf):
                        if opcode == OP_TEXT and b'"id":2' in payload:
                            if b'"error"' in payload:
                                raise ConnectionError(f"subscribe: {payload[:80]!r}")
                            socks.append(sock)
                            return
                    data = await loop.sock_recv(sock, 65536)
                    if not data:
                        raise ConnectionError("closed before the subscribe reply")
                    buf += data
        except (OSError, TimeoutError) as exc:
            errors[f"{type(exc).__name__} {exc}"[:80]] += 1
            sock.close()

    try:
        await asyncio.gather(*(subscribe(i) for i in range(a.non_readers)))
        fds_subscribed = server_open_files(a.server_pid) if a.server_pid else None
        await asyncio.sleep(max(0.0, deadline.left() - 0.3))  # never reading
        fds_end = server_open_files(a.server_pid) if a.server_pid else None
        states = collections.Counter(tcp_state(sock) for sock in socks)
    finally:
        for sock in socks:
            sock.close()
    return {
        "clients": a.non_readers,
        "subscribed": len(socks),
        "server_fds_subscribed": fds_subscribed,
        "server_fds_end": fds_end,
        "server_dropped": None if fds_end is None else fds_subscribed - fds_end,  # type: ignore[operator]
        "tcp_states": dict(states),
        "errors": dict(errors),
    }


async def attack_command_flood(a: argparse.Namespace) -> dict[str, Any]:
    deadline = Deadline(a.phase_seconds)
    errors: collections.Counter[str] = collections.Counter()
    tally = {"frames_sent": 0, "replies": 0, "error_replies": 0, "disconnects": 0, "bytes": 0}
    commands = []
    for k in range(a.commands):
        if k % 2:
            commands.append({"id": 10 + k, "presence_stats": {"channel": CMD_CHANNEL}})
        else:
            commands.append({"id": 10 + k, "history": {"channel": CMD_CHANNEL, "limit": 1}})
    body = b"\n".join(orjson.dumps(c) for c in commands)
    mask = os.urandom(4)
    frame = encode_frame(OP_TEXT, body, mask)
    hello = encode_frame(OP_TEXT, b'{"id":1,"connect":{}}', mask)

    async def reader_loop(reader: asyncio.StreamReader) -> None:
        tailbuf = b""
        while True:
            data = await reader.read(1 << 16)
            if not data:
                return
            tally["bytes"] += len(data)
            joined = tailbuf + data  # markers split between two reads still count once
            tally["replies"] += joined.count(b'"id":') - tailbuf.count(b'"id":')
            tally["error_replies"] += joined.count(b'"error"') - tailbuf.count(b'"error"')
            tailbuf = data[-8:]

    async def one(index: int) -> None:
        await asyncio.sleep(index * 0.02)
        while deadline.left() > 0.5:
            try:
                # a small send buffer: "accepted" means read by the server (or in its
                # receive buffer), not parked in this process's kernel buffers
                sock, _ = await ws_open(a.port, sndbuf=65536)
            except (OSError, TimeoutError) as exc:
                errors[f"open: {type(exc).__name__}"] += 1
                await asyncio.sleep(0.2)
                continue
            reader, writer = await asyncio.open_connection(sock=sock)
            writer.write(hello)
            reading = asyncio.create_task(reader_loop(reader))
            try:
                async with asyncio.timeout_at(deadline.at):
                    while not reading.done():
                        writer.write(frame)
                        tally["frames_sent"] += 1
                        await writer.drain()
                    tally["disconnects"] += 1
            except TimeoutError:
                pass
            except OSError as exc:
                errors[type(exc).__name__] += 1
                tally["disconnects"] += 1
            reading.cancel()
            with contextlib.suppress(BaseException):
                await reading
            abort(writer)

    await asyncio.gather(*(one(i) for i in range(a.flooders)))
    return {
        **tally,
        "commands_sent": tally["frames_sent"] * a.commands,
        "errors": dict(errors),
    }


ATTACK_FUNCTIONS: dict[str, Callable[[argparse.Namespace], Awaitable[dict[str, Any]]]] = {
    "idle_sockets": attack_idle,
    "slowloris": attack_slowloris,
    "wrong_key_bodies": attack_wrong_key,
    "non_readers": attack_non_readers,
    "command_flood": attack_command_flood,
}


def main_attacker(a: argparse.Namespace) -> None:
    """Child process: run one attack for --phase-seconds, print one JSON line."""
    raise_nofile_limit(20_000)
    t0 = time.monotonic()
    result = asyncio.run(ATTACK_FUNCTIONS[a.attack](a))
    result = {"attack": a.attack, **result}
    result["wall_s"] = round(time.monotonic() - t0, 2)
    result["attacker_cpu_s"] = own_cpu_s()
    print(orjson.dumps(result).decode(), flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--phase-seconds", type=float, default=7.0)
    p.add_argument("--attacks", default=",".join(ATTACKS), help="comma-separated, in order")
    p.add_argument("--timeout", type=float, default=300.0, help="bound of the whole run (s)")
    p.add_argument("--rate", type=float, default=200.0, help="witness publications/s")
    p.add_argument("--header-timeout", type=float, default=2.0, help="server's, seconds")
    p.add_argument("--idle", type=int, default=2000, help="idle TCP connections")
    p.add_argument("--slowloris", type=int, default=500, help="slowloris connections")
    p.add_argument("--huge", type=int, default=200, help="wrong-key huge-body connections")
    p.add_argument("--pause", type=float, default=0.2, help="huge-body pause between tries")
    p.add_argument("--non-readers", type=int, default=100)
    p.add_argument("--rcvbuf", type=int, default=4096, help="SO_RCVBUF of the non-readers")
    p.add_argument("--flood-rate", type=float, default=25.0, help="40 KB publications/s")
    p.add_argument("--flood-size", type=int, default=40_000, help="bytes of padding")
    p.add_argument("--flooders", type=int, default=50, help="command-flood clients")
    p.add_argument("--commands", type=int, default=500, help="commands per flood frame")
    p.add_argument("--api-key", default="bench-hostile")
    p.add_argument("--keep", action="store_true", help="keep the server's folder and logs")
    p.add_argument("--attack", choices=ATTACKS, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--server-pid", type=int, default=0, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main() -> None:
    args = parse_args()
    if args.attack:
        main_attacker(args)
    else:
        main_parent(args)


if __name__ == "__main__":
    main()
