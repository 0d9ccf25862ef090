"""`bench_recovery.py --storm`: a reconnect storm after a server restart (issue 20, target 4).

    .venv/bin/python bench/bench_recovery.py --storm --backends sqlite --variants one
    .venv/bin/python bench/bench_recovery.py --storm --clients 2000       # quick

Per back end and variant (`one`: every client on one channel; `each`: every client on its own
channel), with a fresh server (namespace `rec`: `force_recovery`, `history_size` 1000,
`history_ttl` 3600 s):

1. N clients (--clients, 19,000) in --procs client processes (4) connect and subscribe
   (`connect` + `subscribe {recoverable}` in one frame, --connect-concurrency in flight per
   process) and stay connected; each records its epoch and offset. Client process p binds its
   sockets to 127.0.0.(2+p) (all of 127/8 is routed to lo), so that each source address has
   its ~28k ephemeral ports to itself.
2. The server is stopped gracefully (SIGTERM; it sends every client a `shutdown` disconnect)
   and started again on the same port with the same database.
3. M publications (--missed, 10) per channel are made through the new server's HTTP API
   before the clients are released: that is what a single-node deployment sees (clients
   reconnect after a backoff of at least a few hundred ms, while publishers retry at once;
   a publication cannot reach a node that is down). `one`: one batch of M publishes; `each`:
   M broadcasts to all N channels.
4. Release: every client reconnects at once (--storm-concurrency handshakes in flight per
   process; 0, the default, means all at once) with `connect` + `subscribe {recover: true,
   offset, epoch}` in one frame. A client is done when it has offsets offset+1..offset+M,
   from the reply's publications or later pushes. After the last one (or --timeout), each
   client's offsets are checked: `lost` (missing), `duplicated` (seen twice), `reordered` (an
   offset below one seen before), `not_recovered` (reply without `recovered: true` or with
   another epoch).

One JSON line per run (`"storm": true`); `seconds` runs from the release to the last client
done. The server's CPU is read from /proc over the same window; with --profile DIR, py-spy
samples the restarted server during it. Every wait is bounded; client processes are ended
by PID.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import base64
import contextlib
import os
import socket
import statistics
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, cast

import orjson
import procs
from common import (
    API_KEY,
    CpuWindow,
    ServerProcess,
    backend_database,
    bench_server,
    emit,
    load_average,
    pg_reachable,
    profile_summary,
    py_spy,
    raise_nofile_limit,
    run_id,
)
from connections import IP_BIND_ADDRESS_NO_PORT, OP_TEXT, RawWebSocket

NAMESPACE = "rec"
TARGET_SECONDS = 10.0  # issue 20 target 4: 19,000 clients recovered in < 10 s
now_ns = time.monotonic_ns


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--storm", action="store_true", help="reconnect storm after a restart")
    parser.add_argument(
        "--connect-concurrency", type=int, default=32, help="--storm: phase 1, per process"
    )
    parser.add_argument(
        "--storm-concurrency",
        type=int,
        default=0,
        help="--storm: reconnects in flight per process after the release (0: all at once)",
    )
    parser.add_argument("--shutdown-timeout", type=float, default=60.0)
    parser.add_argument(
        "--timeline",
        default="",
        help="--storm: folder for a py-spy speedscope profile of the reconnect with idle "
        "samples (sample i is at i/200 s: what the server does over time)",
    )


def storm_config(database_url: str, log_level: str) -> dict[str, Any]:
    return {
        "database_url": database_url,
        "client_insecure": True,
        "log_level": log_level or "warn",
        "namespaces": [
            {
                "name": NAMESPACE,
                "history_size": 1000,
                "history_ttl": "3600s",
                "force_recovery": True,
            }
        ],
    }


def channel_of(tag: str, variant: str, index: int) -> str:
    return f"{NAMESPACE}:one-{tag}" if variant == "one" else f"{NAMESPACE}:each-{tag}-{index}"


# --- one client (in a client process) -------------------------------------------------------


class Client:
    """One logical client: its channel, its position before the restart, what it got after."""

    __slots__ = (
        "channel",
        "done_ns",
        "epoch",
        "got",
        "missed",
        "offset",
        "problem",
        "subscribed",
        "tcp_ns",
        "upgraded_ns",
    )

    def __init__(self, channel: str) -> None:
        self.channel = channel
        self.epoch = ""
        self.offset = 0
        self.missed = 0
        self.got: list[int] = []
        self.done_ns = 0
        self.tcp_ns = 0  # after the release: TCP connected, WebSocket upgraded
        self.upgraded_ns = 0
        self.problem = ""  # not recovered, an error reply, a failed connection
        self.subscribed: asyncio.Future[None] | None = None

    def subscribe_command(self, recover: bool) -> dict[str, Any]:
        sub: dict[str, Any] = {"channel": self.channel, "recoverable": True}
        if recover:
            sub.update(recover=True, offset=self.offset, epoch=self.epoch)
        return sub

    def on_reply(self, result: dict[str, Any], recovering: bool) -> None:
        if not recovering:
            self.epoch, self.offset = result.get("epoch", ""), result.get("offset", 0)
            return
        if result.get("recovered") is not True or result.get("epoch") != self.epoch:
            self.problem = f"recovered={result.get('recovered')} epoch {result.get('epoch')}"
            return
        for pub in result.get("publications", ()):
            self.on_offset(pub.get("offset", 0))

    def on_offset(self, offset: int) -> None:
        self.got.append(offset)
        if not self.done_ns and len(self.got) >= self.missed:
            wanted = range(self.offset + 1, self.offset + self.missed + 1)
            if set(wanted) <= set(self.got):
                self.done_ns = now_ns()

    def counts(self) -> tuple[int, int, int]:
        """(lost, duplicated, reordered) of the offsets received after the release."""
        wanted = set(range(self.offset + 1, self.offset + self.missed + 1))
        seen = set(self.got)
        reordered, top = 0, 0
        for offset in self.got:
            if offset < top:
                reordered += 1
            top = max(top, offset)
        return len(wanted - seen), len(self.got) - len(seen), reordered


class Conn(RawWebSocket):
    """One WebSocket connection of a Client: upgrade, send the hello frame, read replies and
    pushes, answer pings."""

    def __init__(self, client: Client, request: bytes, key: bytes, hello: bytes, rec: bool):
        super().__init__(request, key, hello)
        self.client = client
        self.recovering = rec
        self.replied = self.ready
        self.closed: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    def on_upgraded(self) -> None:
        self.client.upgraded_ns = now_ns()

    def closed_by_server(self, code: int, reason: bytes) -> None:
        if not self.closed.done():
            self.closed.set_result(code)

    def message(self, message: bytes) -> None:
        client = self.client
        for line in message.split(b"\n"):
            if not line:
                continue
            msg = orjson.loads(line)
            if not msg:
                self.send(OP_TEXT, b"{}")  # ping -> pong
            elif "push" in msg:
                push = msg["push"]
                if "pub" in push and push.get("channel") == client.channel and self.recovering:
                    client.on_offset(push["pub"].get("offset", 0))
            elif "error" in msg:
                client.problem = f"error reply {msg['error']}"
                self.fail(client.problem)
            elif msg.get("id") == 2 and not self.replied.done():
                client.on_reply(msg["subscribe"], self.recovering)
                self.replied.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(1006)
        self.fail(f"connection lost: {exc}")


class Shared:
    def __init__(self, args: argparse.Namespace, source: str) -> None:
        self.args = args
        self.source = source
        self.errors: dict[str, int] = {}
        self.conns: list[Conn] = []

    def error(self, what: str) -> None:
        key = what[:160]
        self.errors[key] = self.errors.get(key, 0) + 1


async def open_conn(shared: Shared, client: Client, recover: bool) -> Conn:
    """Connect from the process's source address and send the hello; returns once the
    subscribe reply came (raises on a failure; the caller bounds the wait)."""
    args = shared.args
    loop = asyncio.get_running_loop()
    key = base64.b64encode(os.urandom(16))
    request = (
        (
            f"GET /connection/websocket HTTP/1.1\r\nHost: 127.0.0.1:{args.port}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
        ).encode()
        + b"Sec-WebSocket-Key: "
        + key
        + b"\r\n\r\n"
    )
    hello = b'{"id":1,"connect":{}}\n' + orjson.dumps(
        {"id": 2, "subscribe": client.subscribe_command(recover)}
    )
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        sock.bind((shared.source, 0))
        await loop.sock_connect(sock, ("127.0.0.1", args.port))
        client.tcp_ns = now_ns()
        _, conn = await loop.create_connection(
            lambda: Conn(client, request, key, hello, recover), sock=sock
        )
    except BaseException:
        sock.close()
        raise
    shared.conns.append(conn)
    await conn.replied
    return conn


async def run_all(
    shared: Shared, clients: list[Client], recover: bool, concurrency: int, timeout: float
) -> None:
    """Open one connection per client, `concurrency` at a time (0: all at once)."""
    pending = iter(clients)

    async def one(client: Client) -> None:
        try:
            async with asyncio.timeout(timeout):
                await open_conn(shared, client, recover)
        except Exception as exc:
            client.problem = client.problem or f"{type(exc).__name__}: {exc}"
            shared.error(client.problem)

    async def worker() -> None:
        for client in pending:
            await one(client)

    if concurrency <= 0:
        await asyncio.gather(*(one(c) for c in clients))
    else:
        await asyncio.gather(*(worker() for _ in range(min(concurrency, len(clients)))))


def child(idx: int, args: argparse.Namespace, conn: Connection) -> None:
    """Entry point of client process `idx` (forked by the parent before any loop exists)."""
    procs.raise_nofile(1 << 20)
    procs.run_loop(child_main(idx, args, conn), True)


async def child_main(idx: int, args: argparse.Namespace, pipe: Connection) -> None:
    deadline = time.monotonic() + args.max_seconds
    shared = Shared(args, f"127.0.0.{2 + idx}")
    clients = [
        Client(channel_of(args.tag, args.variant, i)) for i in range(idx, args.clients, args.procs)
    ]
    pipe.send(("ready", {"count": len(clients)}))

    async def wait(what: str) -> dict[str, Any]:
        message = await procs.wait_message(pipe, deadline - time.monotonic())
        if message is None or message[0] != what:
            raise SystemExit(f"client {idx}: wanted {what!r}, got {message!r:.200}")
        return cast(dict[str, Any], message[1])

    await wait("connect")
    await run_all(shared, clients, False, args.connect_concurrency, args.timeout)
    ok = [c for c in clients if not c.problem]
    pipe.send(("connected", {"ok": len(ok), "errors": shared.errors}))
    shared.errors = {}

    await wait("down")  # the server has exited: every connection must be closed by now
    codes: dict[str, int] = {}
    for conn in shared.conns:
        try:
            code = await asyncio.wait_for(asyncio.shield(conn.closed), 5.0)
        except TimeoutError:
            code = -1
            if conn.transport is not None:
                conn.transport.abort()
        codes[str(code)] = codes.get(str(code), 0) + 1
    shared.conns = []
    pipe.send(("closed", {"codes": codes}))

    message = await wait("release")
    cpu0 = time.process_time()
    for c in ok:
        c.missed = message["missed"]
    await run_all(shared, ok, True, args.storm_concurrency, args.timeout)
    left = deadline - time.monotonic()
    end = time.monotonic() + min(args.timeout, left)
    while time.monotonic() < end and not all(c.done_ns or c.problem for c in ok):
        await asyncio.sleep(0.05)  # bounded by `end`: pushes may complete a client
    await asyncio.sleep(0.5)  # late duplicates would arrive now
    lost = duplicated = reordered = 0
    for c in ok:
        a, b, r = c.counts()
        lost, duplicated, reordered = lost + a, duplicated + b, reordered + r
    problems = [f"{c.channel}: {c.problem}" for c in ok if c.problem]
    done = array.array("q", (c.done_ns for c in ok if c.done_ns and not c.problem))
    pipe.send(
        (
            "recovered",
            {
                "done_ns": done.tobytes(),
                "tcp_ns": array.array("q", (c.tcp_ns for c in ok if c.tcp_ns)).tobytes(),
                "upgraded_ns": array.array(
                    "q", (c.upgraded_ns for c in ok if c.upgraded_ns)
                ).tobytes(),
                "lost": lost + message["missed"] * (len(clients) - len(ok)),
                "duplicated": duplicated,
                "reordered": reordered,
                "not_recovered": len(problems),
                "problems": problems[:3],
                "errors": shared.errors,
                "cpu_s": time.process_time() - cpu0,
            },
        )
    )
    await procs.wait_message(pipe, deadline - time.monotonic())  # "close"
    for conn in shared.conns:
        if conn.transport is not None:
            conn.transport.abort()


# --- parent ----------------------------------------------------------------------------------


def publish_missed(server: ServerProcess, channels: list[str], missed: int) -> float:
    """M publications per channel through the HTTP API; returns the seconds it took."""
    import http.client

    t0 = time.monotonic()
    api = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    headers = {"X-API-Key": API_KEY, "Content-Type": "application/json"}
    try:
        if len(channels) == 1:
            cmds = [{"publish": {"channel": channels[0], "data": {"i": i}}} for i in range(missed)]
            bodies = [("batch", orjson.dumps({"commands": cmds}))]
        else:
            bodies = [
                ("broadcast", orjson.dumps({"channels": channels, "data": {"i": i}}))
                for i in range(missed)
            ]
        for method, body in bodies:
            api.request("POST", f"/api/{method}", body=body, headers=headers)
            response = api.getresponse()
            text = response.read()
            if response.status != 200 or b'"error"' in text:
                raise RuntimeError(f"/api/{method}: HTTP {response.status} {text[:300]!r}")
    finally:
        api.close()
    return time.monotonic() - t0


def timeline_spy(pid: int, out: Path | None) -> contextlib.AbstractContextManager[None]:
    """py-spy (speedscope, idle samples kept, 200 Hz) on `pid` while the block runs."""
    # C frames too (e.g. gc_collect_main); py-spy then pauses the process for each sample
    native = ["--native"] if os.environ.get("STORM_SPY_NATIVE") else ["--nonblocking"]
    return py_spy(pid, out, options=["--idle", "--format", "speedscope", *native])


def gather(pipes: list[Connection], children: list[Any], what: str, deadline: float) -> list[Any]:
    """The `what` message of every client process, in order."""
    return [
        procs.receive_from(p, c, what, deadline)[1] for p, c in zip(pipes, children, strict=True)
    ]


def orchestrate(
    args: argparse.Namespace, pipes: list[Connection], children: list[Any], deadline: float
) -> dict[str, Any]:
    server: ServerProcess = args.server
    for pipe, proc in zip(pipes, children, strict=True):
        procs.receive_from(pipe, proc, "ready", deadline)
    t0 = time.monotonic()
    for pipe in pipes:
        pipe.send(("connect", {}))
    connected = [
        procs.receive_from(p, c, "connected", deadline)[1]
        for p, c in zip(pipes, children, strict=True)
    ]
    connect_s = time.monotonic() - t0
    ok = sum(d["ok"] for d in connected)

    t0 = time.monotonic()
    server.stop(timeout=args.shutdown_timeout)
    shutdown_s = time.monotonic() - t0
    for pipe in pipes:
        pipe.send(("down", {}))
    closed = [
        procs.receive_from(p, c, "closed", deadline)[1]
        for p, c in zip(pipes, children, strict=True)
    ]

    t0 = time.monotonic()
    server.start()
    startup_s = time.monotonic() - t0
    channels = sorted({channel_of(args.tag, args.variant, i) for i in range(args.clients)})
    publish_s = publish_missed(server, channels, args.missed)

    assert server.pid is not None
    profile = args.profile_path
    timeline = (
        Path(args.timeline) / f"storm-{args.backend}-{args.variant}.json" if args.timeline else None
    )
    with (
        py_spy(server.pid, profile),
        timeline_spy(server.pid, timeline),
        CpuWindow(server.pid) as window,
    ):
        t_release = now_ns()
        for pipe in pipes:
            pipe.send(("release", {"missed": args.missed}))
        results = gather(pipes, children, "recovered", deadline)
    done = array.array("q")
    for r in results:
        done.frombytes(r["done_ns"])
    times = sorted((t - t_release) / 1e9 for t in done)

    def spread(field: str) -> list[float]:
        values = array.array("q")
        for r in results:
            values.frombytes(r[field])
        ordered = sorted((t - t_release) / 1e9 for t in values)
        if not ordered:
            return []
        return [round(ordered[int(q * (len(ordered) - 1))], 2) for q in (0.0, 0.5, 0.99, 1.0)]

    record: dict[str, Any] = {
        "storm": True,
        "backend": args.backend,
        "variant": args.variant,
        "clients": args.clients,
        "missed": args.missed,
        "procs": args.procs,
        "connected": ok,
        "recovered": len(times),
        "seconds": round(times[-1], 3) if times else None,
        "client_p50_s": round(statistics.median(times), 3) if times else None,
        "client_p99_s": round(times[int(0.99 * (len(times) - 1))], 3) if times else None,
        "lost": sum(r["lost"] for r in results),
        "duplicated": sum(r["duplicated"] for r in results),
        "reordered": sum(r["reordered"] for r in results),
        "not_recovered": sum(r["not_recovered"] for r in results),
        "problems": [p for r in results for p in r["problems"]][:3],
        "errors": procs.merge_counts([r["errors"] for r in results]),
        "done_per_s": [sum(1 for t in times if k <= t < k + 1) for k in range(int(times[-1]) + 1)]
        if times
        else [],
        "tcp_s_min_p50_p99_max": spread("tcp_ns"),
        "upgraded_s_min_p50_p99_max": spread("upgraded_ns"),
        "server_cpu_s": round(window.server_cpu, 2),
        "server_cpu_us_per_client": round(1e6 * window.server_cpu / max(1, len(times))),
        "client_cpu_s": round(sum(r["cpu_s"] for r in results), 2),
        "loadavg": load_average(),
        "connect_s": round(connect_s, 2),
        "connect_errors": procs.merge_counts([d["errors"] for d in connected]),
        "shutdown_s": round(shutdown_s, 2),
        "close_codes": procs.merge_counts([d["codes"] for d in closed]),
        "startup_s": round(startup_s, 2),
        "publish_s": round(publish_s, 2),
        "storm_concurrency": args.storm_concurrency * args.procs or "all",
    }
    record["meets_target"] = bool(
        times
        and len(times) == args.clients
        and times[-1] < TARGET_SECONDS
        and not (record["lost"] or record["duplicated"] or record["reordered"])
    )
    return record


def run_case(args: argparse.Namespace, backend: str, variant: str, missed: int) -> None:
    with (
        backend_database(backend, args.pg_url) as url,
        bench_server(storm_config(url, args.log_level), f"storm-{backend}") as server,
    ):
        name = f"storm-{backend}-{variant}.txt"
        case = argparse.Namespace(
            **{
                **vars(args),
                "server": server,
                "port": server.port,
                "backend": backend,
                "variant": variant,
                "missed": missed,
                "tag": run_id(),
                "max_seconds": args.timeout * 3 + args.shutdown_timeout + 120,
                "profile_path": Path(args.profile) / name if args.profile else None,
            }
        )
        deadline = time.monotonic() + case.max_seconds + 30
        record = procs.run_children(
            args.procs,
            child,
            case,
            orchestrate,
            deadline,
            close_message=("close", {}),
            end_timeout=30,
        )
        emit(record)
        if case.profile_path is not None:
            emit(profile_summary(case.profile_path))


def main(args: argparse.Namespace) -> None:
    raise_nofile_limit(1 << 20)
    for backend in args.backends.split(","):
        if backend == "postgres":
            reason = pg_reachable(args.pg_url)
            if reason:
                emit({"storm": True, "backend": backend, "skipped": f"unreachable: {reason}"})
                continue
        for variant in args.variants:
            for missed in args.missed:
                run_case(args, backend, variant, missed)
