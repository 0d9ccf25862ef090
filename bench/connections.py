#!/usr/bin/env python3
"""connections.py: scenario 4, many idle WebSocket connections (loopback only).

N clients, spread over --procs client processes, each bound to its own loopback source address
(process p uses 127.0.0.(2+p), so that every address has its ~28k ephemeral ports to itself),
open a WebSocket to the server, send protocol v2 `connect` + `subscribe` (one channel for all)
in one frame and then stay idle, answering the server's pings. Measured:

- `connect_per_s`: subscribed clients / seconds from "go" until the last subscribe reply
  (`connect_p50_ms` / `connect_p99_ms`: one client's TCP connect to subscribe reply);
- `server_rss_mb` once all are connected and --settle seconds passed, and `server_kib_per_conn`
  over the server's RSS before the first connection; `server_cpu_us_per_conn`;
- `server_idle_us_per_conn_s`: the server's CPU over the --hold seconds (pings and pongs
  only), in µs per connection per second;
- after --hold seconds idle: one publication through `POST /api/publish`; `reach_s` is from
  just before the request until the last client received it (`reach_p50_s`, `reached`).

The client is a minimal WebSocket implementation on asyncio.Protocol (a full client library
costs more CPU per handshake than the server under test can spend). One JSON line goes to
stdout (and to --out). Every wait is bounded; client processes that overrun are killed by PID.
"""

from __future__ import annotations

import abc
import argparse
import array
import asyncio
import base64
import contextlib
import hashlib
import http.client
import os
import socket
import sys
import time
from collections.abc import Sequence
from multiprocessing.connection import Connection
from typing import Any, cast

import orjson
import procs

now_ns = time.monotonic_ns
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0, 1, 2, 8, 9, 10


# --- WebSocket framing (pure) ---------------------------------------------------------------


def apply_mask(payload: bytes, mask: bytes) -> bytes:
    """XOR `payload` with the 4-byte `mask` repeated (masking and unmasking are the same)."""
    n = len(payload)
    if not n:
        return payload
    key = int.from_bytes((mask * (n // 4 + 1))[:n], "little")
    return (int.from_bytes(payload, "little") ^ key).to_bytes(n, "little")


def encode_frame(opcode: int, payload: bytes, mask: bytes) -> bytes:
    """One final client frame (clients must mask: RFC 6455 §5.3)."""
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 1 << 16:
        head = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
    return head + mask + apply_mask(payload, mask)


def take_frames(buf: bytearray) -> list[tuple[bool, int, bytes]]:
    """Remove every complete frame from the front of `buf`: [(fin, opcode, payload)]."""
    frames: list[tuple[bool, int, bytes]] = []
    pos, size = 0, len(buf)
    while size - pos >= 2:
        b0, b1 = buf[pos], buf[pos + 1]
        length, head = b1 & 0x7F, 2
        if length == 126:
            if size - pos < 4:
                break
            length, head = int.from_bytes(buf[pos + 2 : pos + 4], "big"), 4
        elif length == 127:
            if size - pos < 10:
                break
            length, head = int.from_bytes(buf[pos + 2 : pos + 10], "big"), 10
        mask = b""
        if b1 & 0x80:
            if size - pos < head + 4:
                break
            mask, head = bytes(buf[pos + head : pos + head + 4]), head + 4
        if size - pos < head + length:
            break
        payload = bytes(buf[pos + head : pos + head + length])
        frames.append((bool(b0 & 0x80), b0 & 0x0F, apply_mask(payload, mask) if mask else payload))
        pos += head + length
    del buf[:pos]
    return frames


def accept_key(key: bytes) -> bytes:
    """The Sec-WebSocket-Accept the server must answer to `key`."""
    return base64.b64encode(hashlib.sha1(key + GUID).digest())


def check_upgrade(head: bytes, key: bytes) -> str:
    """'' if the HTTP response head is a valid 101 upgrade for `key`, else the reason."""
    lines = head.split(b"\r\n")
    if not lines[0].startswith(b"HTTP/1.1 101"):
        return f"no upgrade: {lines[0][:80]!r}"
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    if headers.get(b"sec-websocket-accept") != accept_key(key):
        return "bad Sec-WebSocket-Accept"
    return ""


# --- one idle client ------------------------------------------------------------------------


class Shared:
    """The state of one client process, mutated only on its event loop."""

    def __init__(self) -> None:
        self.handshake_ns = array.array("q")
        self.recv_ns = array.array("q")
        self.errors: dict[str, int] = {}
        self.clients: list[IdleClient] = []
        self.disconnects = 0
        self.stopping = False
        self.all_received = asyncio.Event()

    def error(self, what: str) -> None:
        key = what[:160]
        self.errors[key] = self.errors.get(key, 0) + 1

    def received(self, t: int) -> None:
        self.recv_ns.append(t)
        if len(self.recv_ns) >= len(self.clients):
            self.all_received.set()


class RawWebSocket(asyncio.Protocol, metaclass=abc.ABCMeta):
    """A client WebSocket on a raw asyncio transport (cheaper than aiohttp's client at tens
    of thousands of connections): sends the upgrade `request`, checks the answer against
    `key`, sends `hello` as the first text frame, then reassembles messages (`message`),
    answers pings and reports a close frame (`closed_by_server`). `ready` fails on `fail()`
    unless a subclass has completed it."""

    def __init__(self, request: bytes, key: bytes, hello: bytes) -> None:
        self.request = request
        self.key = key
        self.hello = hello
        self.mask = os.urandom(4)
        self.buf = bytearray()
        self.fragments: list[bytes] = []
        self.upgraded = False
        self.transport: asyncio.Transport | None = None
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.transport.write(self.request)

    def fail(self, reason: str) -> None:
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(reason))
        if self.transport is not None:
            self.transport.close()

    def send(self, opcode: int, payload: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(encode_frame(opcode, payload, self.mask))

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.upgraded:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            problem = check_upgrade(bytes(self.buf[:end]), self.key)
            if problem:
                self.fail(problem)
                return
            del self.buf[: end + 4]
            self.upgraded = True
            self.on_upgraded()
            self.send(OP_TEXT, self.hello)
        for fin, opcode, payload in take_frames(self.buf):
            if opcode in (OP_TEXT, OP_BINARY, OP_CONT):
                self.fragments.append(payload)
                if fin:
                    message, self.fragments = b"".join(self.fragments), []
                    self.message(message)
            elif opcode == OP_PING:
                self.send(OP_PONG, payload)
            elif opcode == OP_CLOSE:
                code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                self.closed_by_server(code, payload[2:])
                self.fail(f"closed by the server: {code}")

    def on_upgraded(self) -> None:
        """The server accepted the upgrade (before `hello` is sent)."""

    def closed_by_server(self, code: int, reason: bytes) -> None:
        """A close frame came (the connection is then closed)."""

    @abc.abstractmethod
    def message(self, message: bytes) -> None:
        """One whole message (text or binary) from the server."""


class IdleClient(RawWebSocket):
    """Upgrade, send connect + subscribe, then answer pings and note the first publication."""

    def __init__(self, shared: Shared, request: bytes, key: bytes, hello: bytes) -> None:
        super().__init__(request, key, hello)
        self.shared = shared
        self.got_pub = False
        self.subscribed = self.ready

    def closed_by_server(self, code: int, reason: bytes) -> None:
        if not self.shared.stopping:
            self.shared.error(f"close {code} {reason[:58]!r}")

    def message(self, message: bytes) -> None:
        t = now_ns()
        for line in message.split(b"\n"):
            if not line:
                continue
            msg = orjson.loads(line)
            if not msg:
                self.send(OP_TEXT, b"{}")  # ping -> pong
            elif "push" in msg:
                if "pub" in msg["push"] and not self.got_pub:
                    self.got_pub = True
                    self.shared.received(t)
            elif "error" in msg:
                self.fail(f"error reply {msg['error']}")
            elif msg.get("id") == 2 and not self.subscribed.done():
                self.subscribed.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        sub = self.subscribed
        was_up = sub.done() and not sub.cancelled() and sub.exception() is None
        self.fail(f"connection lost: {exc}")
        if was_up and not self.shared.stopping:
            self.shared.disconnects += 1


# --- client process -------------------------------------------------------------------------


async def open_client(args: argparse.Namespace, shared: Shared, source: str) -> None:
    """One connection from `source`, until its subscribe reply (bounded by the caller)."""
    loop = asyncio.get_running_loop()
    key = base64.b64encode(os.urandom(16))
    request = (
        (
            f"GET {args.path} HTTP/1.1\r\nHost: {args.host}:{args.port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
        ).encode()
        + b"Sec-WebSocket-Key: "
        + key
        + b"\r\n\r\n"
    )
    hello = b'{"id":1,"connect":{}}\n' + orjson.dumps(
        {"id": 2, "subscribe": {"channel": args.channel}}
    )
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        sock.bind((source, 0))
        await loop.sock_connect(sock, (args.host, args.port))
        _, client = await loop.create_connection(
            lambda: IdleClient(shared, request, key, hello), sock=sock
        )
    except BaseException:
        sock.close()
        raise
    try:
        await client.subscribed
    except BaseException:
        if client.transport is not None:
            client.transport.abort()
        raise
    shared.clients.append(client)


async def connect_all(args: argparse.Namespace, shared: Shared, count: int, source: str) -> None:
    """Open `count` clients with --connect-concurrency at a time."""
    left = count

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            t0 = now_ns()
            try:
                async with asyncio.timeout(args.handshake_timeout):
                    await open_client(args, shared, source)
            except Exception as exc:
                shared.error(f"{type(exc).__name__}: {exc}")
                continue
            shared.handshake_ns.append(now_ns() - t0)

    await asyncio.gather(*(worker() for _ in range(min(count, args.connect_concurrency))))


def child(idx: int, args: argparse.Namespace, conn: Connection) -> None:
    """Entry point of client process `idx` (forked by the parent)."""
    procs.raise_nofile(1 << 20)
    procs.run_loop(child_main(idx, args, conn), args.uvloop)


async def child_main(idx: int, args: argparse.Namespace, conn: Connection) -> None:
    deadline = time.monotonic() + args.max_seconds
    shared = Shared()
    count = len(range(idx, args.connections, args.procs))
    source = args.sources[idx % len(args.sources)]
    conn.send(("ready", {"count": count, "source": source}))
    message = await procs.wait_message(conn, deadline - time.monotonic())
    if message is None or message[0] != "go":
        return
    t_start = now_ns()
    await connect_all(args, shared, count, source)
    t_end = now_ns()
    lat = sorted(shared.handshake_ns)
    conn.send(
        (
            "connected",
            {
                "ok": len(shared.clients),
                "failed": count - len(shared.clients),
                "t_start": t_start,
                "t_end": t_end,
                "handshake_ns": array.array("q", lat).tobytes(),
                "errors": dict(shared.errors),
            },
        )
    )
    shared.errors = {}  # from here on: errors of established clients
    message = await procs.wait_message(conn, deadline - time.monotonic())
    if message is not None and message[0] == "collect":
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(shared.all_received.wait(), message[1]["timeout"])
        alive = sum(1 for c in shared.clients if c.transport and not c.transport.is_closing())
        report = {
            "open": alive,
            "recv_ns": shared.recv_ns.tobytes(),
            "disconnects": shared.disconnects,
            "errors": dict(shared.errors),
        }
        conn.send(("reached", report))
        await procs.wait_message(conn, deadline - time.monotonic())  # "close"
    shared.stopping = True
    for client in shared.clients:
        if client.transport is not None:
            client.transport.abort()


# --- parent ---------------------------------------------------------------------------------


def publish_once(args: argparse.Namespace) -> tuple[int, float, str]:
    """One publication to the channel; (send time in ns, ack seconds, error or '')."""
    body = orjson.dumps({"channel": args.channel, "data": {"hello": "all"}})
    headers = {"X-API-Key": args.api_key, "Content-Type": "application/json"}
    api = http.client.HTTPConnection(args.host, args.api_port or args.port, timeout=30)
    t0 = now_ns()
    try:
        api.request("POST", "/api/publish", body=body, headers=headers)
        response = api.getresponse()
        raw = response.read()
    except OSError as exc:
        return t0, (now_ns() - t0) / 1e9, f"{type(exc).__name__}: {exc}"
    finally:
        api.close()
    ack = (now_ns() - t0) / 1e9
    if response.status != 200 or b'"error"' in raw:
        return t0, ack, f"HTTP {response.status} {raw[:200]!r}"
    return t0, ack, ""


def spread(blobs: Sequence[bytes], origin: int) -> dict[str, float | None]:
    """p50/p99/max seconds of the ns timestamps in `blobs`, relative to `origin` (or, with
    origin 0, the values themselves as durations)."""
    values = array.array("q")
    for blob in blobs:
        values.frombytes(blob)
    ordered = sorted(v - origin for v in values)

    def sec(v: int | None) -> float | None:
        return None if v is None else round(v / 1e9, 4)

    return {
        "p50": sec(procs.percentile(ordered, 50)),
        "p99": sec(procs.percentile(ordered, 99)),
        "max": sec(ordered[-1] if ordered else None),
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--path", default="/connection/websocket")
    ap.add_argument("--api-port", type=int, help="publish API port (default: --port)")
    ap.add_argument("--api-key", default="bench")
    ap.add_argument("--channel", default="idle")
    ap.add_argument("-n", "--connections", type=int, default=19_000)
    ap.add_argument("--procs", type=int, default=4)
    ap.add_argument(
        "--sources", nargs="+", help="source addresses (default 127.0.0.2.. per process)"
    )
    ap.add_argument("--connect-concurrency", type=int, default=32, help="per process")
    ap.add_argument("--handshake-timeout", type=float, default=10.0)
    ap.add_argument("--settle", type=float, default=2.0, help="seconds before reading the RSS")
    ap.add_argument("--hold", type=float, default=5.0, help="seconds idle before the broadcast")
    ap.add_argument("--reach-timeout", type=float, default=15.0)
    ap.add_argument("--max-seconds", type=float, default=300.0)
    ap.add_argument("--server-pid", type=int, help="the server under test (CPU and RSS)")
    ap.add_argument("--label", default="")
    ap.add_argument("--out")
    ap.add_argument("--no-uvloop", dest="uvloop", action="store_false")
    args = ap.parse_args(argv)
    if args.connections < 1 or args.procs < 1 or args.connect_concurrency < 1:
        ap.error("--connections, --procs and --connect-concurrency must be at least 1")
    args.sources = args.sources or [f"127.0.0.{2 + p}" for p in range(args.procs)]
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    need = args.connections // args.procs + 100
    if procs.raise_nofile(1 << 20) < need:
        sys.exit(f"RLIMIT_NOFILE below the {need} a client process needs: use more --procs")
    started = time.monotonic()
    deadline = started + args.max_seconds + 30
    record = procs.run_children(
        args.procs, child, args, orchestrate, deadline, close_message=("close", {}), end_timeout=30
    )
    record["wall_s"] = round(time.monotonic() - started, 1)
    line = orjson.dumps(record).decode()
    print(line, flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write(line + "\n")
    return record


def orchestrate(
    args: argparse.Namespace, pipes: list[Connection], children: list[Any], deadline: float
) -> dict[str, Any]:
    """Go, connect, measure, hold, broadcast, collect (the parent's main work)."""
    pid = args.server_pid
    for conn, proc in zip(pipes, children, strict=True):
        procs.receive_from(conn, proc, "ready", deadline)
    base_mem = procs.proc_mem_mb(pid) if pid else None
    cpu0 = procs.proc_cpu_s(pid) if pid else 0.0
    t_go = now_ns()
    for conn in pipes:
        conn.send(("go", {}))
    done = [
        procs.receive_from(c, p, "connected", deadline)[1]
        for c, p in zip(pipes, children, strict=True)
    ]
    ok = sum(d["ok"] for d in done)
    connect_s = (max(d["t_end"] for d in done) - t_go) / 1e9
    cpu1 = procs.proc_cpu_s(pid) if pid else 0.0
    time.sleep(args.settle)
    handshake = spread([d["handshake_ns"] for d in done], 0)
    record: dict[str, Any] = {
        "label": args.label,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "connections_wanted": args.connections,
        "procs": args.procs,
        "sources": args.sources[: args.procs],
        "connect_concurrency": args.connect_concurrency * args.procs,
        "connections": ok,
        "connect_failed": sum(d["failed"] for d in done),
        "connect_errors": procs.merge_counts([d["errors"] for d in done]),
        "connect_s": round(connect_s, 3),
        "connect_per_s": round(ok / connect_s) if connect_s > 0 else None,
        "connect_p50_ms": None if handshake["p50"] is None else round(1000 * handshake["p50"], 1),
        "connect_p99_ms": None if handshake["p99"] is None else round(1000 * handshake["p99"], 1),
    }
    if pid and base_mem is not None:
        mem = procs.proc_mem_mb(pid)
        record.update(
            {
                "server_rss_before_mb": base_mem["rss"],
                "server_rss_mb": mem["rss"],
                "server_hwm_mb": mem["hwm"],
                "server_kib_per_conn": round(1024 * (mem["rss"] - base_mem["rss"]) / ok, 1)
                if ok
                else None,
                "server_cpu_us_per_conn": round(1e6 * (cpu1 - cpu0) / ok, 1) if ok else None,
            }
        )
    idle0 = procs.proc_cpu_s(pid) if pid else 0.0
    time.sleep(args.hold)
    if pid and ok and args.hold > 0:
        idle_cpu = procs.proc_cpu_s(pid) - idle0
        record["server_idle_us_per_conn_s"] = round(1e6 * idle_cpu / ok / args.hold, 2)
    t_pub, ack_s, pub_error = publish_once(args)
    for conn in pipes:
        conn.send(("collect", {"timeout": args.reach_timeout}))
    reached = [
        procs.receive_from(c, p, "reached", deadline)[1]
        for c, p in zip(pipes, children, strict=True)
    ]
    reach = spread([r["recv_ns"] for r in reached], t_pub)
    record.update(
        {
            "open_after_hold": sum(r["open"] for r in reached),
            "disconnects": sum(r["disconnects"] for r in reached),
            "publish_ack_s": round(ack_s, 4),
            "publish_error": pub_error,
            "reached": sum(len(r["recv_ns"]) // 8 for r in reached),
            "reach_p50_s": reach["p50"],
            "reach_p99_s": reach["p99"],
            "reach_s": reach["max"],
            "errors_after_connect": procs.merge_counts([r["errors"] for r in reached]),
        }
    )
    if pid:
        record["server_rss_end_mb"] = procs.proc_mem_mb(pid)["rss"]
    return record


if __name__ == "__main__":
    main()
