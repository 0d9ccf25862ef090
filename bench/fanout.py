#!/usr/bin/env python3
"""fanout.py: the project's PUB/SUB fan-out load generator (loopback only).

N subscribers, spread over --procs client processes, subscribe to C channels (subscriber j is
on channel j % C and connects to --ws-url number j % len(--ws-url)). --proto picks the
transport: WebSocket (centrifugo, centrifugo-protobuf, centrifugo-uni-ws, socketio) or
Centrifugo's HTTP emulation (centrifugo-http-stream, centrifugo-sse; ws:// in --ws-url then
means http://). When all
are subscribed, M publications go through `POST /api/publish` (X-API-Key, {"channel", "data"};
several --api-url are used in turn) at --rate per second, or with --rate 0 as fast as the
acknowledgements allow, --inflight requests outstanding. Publication i goes to channel i % C;
its payload is {"seq": i, "ts": CLOCK_MONOTONIC ns taken just before the request, "pad": ..}.
CLOCK_MONOTONIC is system-wide on Linux, so latencies compare across processes.

Every subscriber checks every delivery: latency, duplicate, reorder (a seq lower than one it
already has), misroute (a seq not of its channel). The parent then counts losses per
acknowledged publication. With --server-pid (repeatable: the nodes of a cluster) it reads the
server's CPU and RSS from /proc. One JSON line goes to stdout (and is appended to --out).

    python fanout.py --proto centrifugo --ws-url ws://127.0.0.1:8000 \
        --api-url http://127.0.0.1:8000/api/publish --server-pid PID -n 1000 -m 2000 -r 0

Every wait is bounded (handshake, publish, drain, --max-seconds); client processes that overrun
are killed by PID.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import contextlib
import resource
import sys
import time
from collections.abc import Sequence
from multiprocessing.connection import Connection
from typing import Any

import aiohttp
import orjson
import procs
from protocols import PROTOCOLS, Adapter, Link, make_adapter

now_ns = time.monotonic_ns


# --- per-subscriber accounting (client processes) -------------------------------------------


class Subscriber:
    """What one subscriber has received of its channel's publications."""

    __slots__ = ("chan", "expect", "got", "last", "seen")

    def __init__(self, chan: int, messages: int, channels: int) -> None:
        self.chan = chan
        self.expect = len(range(chan, messages, channels))
        self.seen = bytearray(self.expect)
        self.got = 0
        self.last = -1


class Tally:
    """The accounting of one client process; mutated only on its event loop."""

    def __init__(self, messages: int, channels: int) -> None:
        self.messages = messages
        self.channels = channels
        self.lat = array.array("q")  # ns, one per first delivery
        self.seqs = array.array("q")  # the seq of each `lat` entry (with --dump-latencies)
        self.keep_seqs = False
        self.uniq = array.array("i", bytes(4 * messages))  # seq -> distinct receivers
        self.dup = self.reordered = self.misrouted = 0
        self.complete = self.nsubs = self.disconnects = 0
        self.first_recv = self.last_recv = 0
        self.errors: dict[str, int] = {}
        self.stopping = False
        self.all_done = asyncio.Event()

    def error(self, exc: BaseException) -> None:
        key = f"{type(exc).__name__}: {exc}"[:160]
        self.errors[key] = self.errors.get(key, 0) + 1

    def record(self, sub: Subscriber, seq: Any, latency_ns: int) -> None:
        """Account one delivered publication `seq` to `sub`."""
        if (
            not isinstance(seq, int)
            or seq % self.channels != sub.chan
            or not 0 <= seq < self.messages
        ):
            self.misrouted += 1
            return
        k = seq // self.channels
        if sub.seen[k]:
            self.dup += 1
            return
        sub.seen[k] = 1
        self.uniq[seq] += 1
        self.lat.append(latency_ns)
        if self.keep_seqs:
            self.seqs.append(seq)
        if seq < sub.last:
            self.reordered += 1
        else:
            sub.last = seq
        sub.got += 1
        if sub.got == sub.expect:
            self.complete += 1
            if self.complete >= self.nsubs:
                self.all_done.set()


async def read_loop(link: Link, sub: Subscriber, tally: Tally, adapter: Adapter) -> None:
    """One subscriber's reader task: every delivery is accounted until the link closes."""
    try:
        while (text := await link.receive()) is not None:
            t = now_ns()
            pubs, reply = adapter.parse(text)
            if reply is not None:
                await link.send(reply)
            for data in pubs:
                tally.record(sub, data.get("seq"), t - data.get("ts", t))
            if pubs:
                tally.last_recv = t
                tally.first_recv = tally.first_recv or t
    except Exception as exc:  # counted and reported
        tally.error(exc)
    if not tally.stopping:
        tally.disconnects += 1


# --- client process -------------------------------------------------------------------------


def chan_name(prefix: str, channels: int, c: int) -> str:
    """Channel c's name: the prefix alone when there is one channel."""
    return prefix if channels == 1 else f"{prefix}{c}"


def cpu_self_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def child(idx: int, args: argparse.Namespace, conn: Connection) -> None:
    """Entry point of client process `idx` (forked by the parent)."""
    procs.raise_nofile(1 << 20)
    procs.run_loop(child_main(idx, args, conn), args.uvloop)


async def child_main(idx: int, args: argparse.Namespace, conn: Connection) -> None:
    """Connect this process's subscribers, report, account deliveries until the parent's
    "done" and the drain, report the results, close."""
    deadline = time.monotonic() + args.max_seconds
    adapter = make_adapter(args.proto, args.token)
    tally = Tally(args.messages, args.channels)
    tally.keep_seqs = bool(args.dump_latencies)
    source = args.source[idx % len(args.source)] if args.source else None
    connector = aiohttp.TCPConnector(limit=0, local_addr=(source, 0) if source else None)
    session = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None))
    sem = asyncio.Semaphore(args.connect_concurrency)
    links: list[Link] = []
    readers: list[asyncio.Task[None]] = []
    per_chan = [0] * args.channels

    async def connect(j: int) -> None:
        chan = j % args.channels
        url = args.ws_url[j % len(args.ws_url)]
        name = chan_name(args.channel_prefix, args.channels, chan)
        async with sem:
            try:
                async with asyncio.timeout(args.handshake_timeout):
                    link = await adapter.open(session, url, name)
            except Exception as exc:
                tally.error(exc)
                return
        links.append(link)
        tally.nsubs += 1
        per_chan[chan] += 1
        sub = Subscriber(chan, args.messages, args.channels)
        readers.append(asyncio.create_task(read_loop(link, sub, tally, adapter)))

    mine = range(idx, args.subscribers, args.procs)
    t0 = now_ns()
    await asyncio.gather(*(connect(j) for j in mine))
    ready = {
        "ok": tally.nsubs,
        "failed": len(mine) - tally.nsubs,
        "connect_s": (now_ns() - t0) / 1e9,
        "per_chan": per_chan,
        "errors": dict(tally.errors),
    }
    cpu0 = cpu_self_s()
    conn.send(("ready", ready))
    if tally.nsubs == 0:
        tally.all_done.set()
    message = await procs.wait_message(conn, deadline - time.monotonic())
    if message is not None and message[0] == "done":
        await drain(tally, message[1]["t_end"], args.drain, deadline)
    cpu1 = cpu_self_s()
    tally.stopping = True
    result = {
        "timed_out": message is None or message[0] != "done" or time.monotonic() >= deadline,
        "dup": tally.dup,
        "reordered": tally.reordered,
        "misrouted": tally.misrouted,
        "complete": tally.complete,
        "nsubs": tally.nsubs,
        "disconnects": tally.disconnects,
        "first_recv": tally.first_recv,
        "last_recv": tally.last_recv,
        "cpu_run_s": cpu1 - cpu0,
        "errors": tally.errors,
    }
    blobs = (tally.lat.tobytes(), tally.uniq.tobytes(), tally.seqs.tobytes())
    conn.send(("result", result, *blobs))
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(10):
            await asyncio.gather(*(link.close() for link in links), return_exceptions=True)
    for task in readers:
        task.cancel()
    await session.close()


async def drain(tally: Tally, t_end: int, idle_limit: float, deadline: float) -> None:
    """Wait until every subscriber has everything, or nothing arrived for `idle_limit` s after
    the last publication, or the run's deadline."""
    while not tally.all_done.is_set() and time.monotonic() < deadline:
        if (now_ns() - max(tally.last_recv, t_end)) / 1e9 > idle_limit:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(tally.all_done.wait(), 0.2)


# --- publisher (parent) ---------------------------------------------------------------------


class PublishResult:
    """What publish_all returns: the window, which publications were acknowledged, errors."""

    def __init__(self, messages: int) -> None:
        self.t0 = self.t1 = 0
        self.acked = bytearray(messages)
        self.errors: dict[str, int] = {}
        self.max_behind = 0.0


async def publish_all(args: argparse.Namespace) -> PublishResult:
    """Send the M publications (see the module docstring); runs on the parent's loop."""
    messages, channels, rate = args.messages, args.channels, args.rate
    headers = {"X-API-Key": args.api_key, "Content-Type": "application/json"}
    names = [
        orjson.dumps(chan_name(args.channel_prefix, channels, c)).decode() for c in range(channels)
    ]
    pad = "x" * args.pad
    out = PublishResult(messages)
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=max(1, args.inflight)),
        timeout=aiohttp.ClientTimeout(total=args.publish_timeout),
    )
    sem = asyncio.Semaphore(args.inflight)
    pending: set[asyncio.Task[None]] = set()

    async def one(i: int) -> None:
        url = args.api_url[i % len(args.api_url)]
        channel = names[i % channels]
        body = f'{{"channel":{channel},"data":{{"seq":{i},"ts":{now_ns()},"pad":"{pad}"}}}}'
        try:
            async with session.post(url, data=body, headers=headers) as response:
                raw = await response.read()
            if response.status != 200:
                raise RuntimeError(f"HTTP {response.status} {raw[:100]!r}")
            reply = orjson.loads(raw)
            if "error" in reply:
                raise RuntimeError(f"API error {reply['error']}")
            out.acked[i] = 1
        except Exception as exc:
            key = f"{type(exc).__name__}: {exc}"[:160]
            out.errors[key] = out.errors.get(key, 0) + 1
        finally:
            sem.release()

    out.t0 = now_ns()
    for i in range(messages):
        if rate:
            behind = (now_ns() - (out.t0 + i * 1e9 / rate)) / 1e9
            if behind < 0:
                await asyncio.sleep(-behind)
            else:
                out.max_behind = max(out.max_behind, behind)
        await sem.acquire()
        task = asyncio.create_task(one(i))
        pending.add(task)
        task.add_done_callback(pending.discard)
    while pending:
        await asyncio.gather(*list(pending))
    out.t1 = now_ns()
    await session.close()
    return out


# --- parent: accounting and the summary -----------------------------------------------------


def delivery_counts(
    acked: bytes | bytearray, uniq: Sequence[int], per_chan: Sequence[int], channels: int
) -> dict[str, int]:
    """Losses per acknowledged publication: every subscriber of an acknowledged publication's
    channel must have it once. Deliveries of unacknowledged ones are counted apart."""
    expected = sum(per_chan[i % channels] for i, ok in enumerate(acked) if ok)
    received = sum(uniq)
    received_acked = sum(u for u, ok in zip(uniq, acked, strict=True) if ok)
    return {
        "deliveries_expected": expected,
        "deliveries_received": received,
        "lost": expected - received_acked,
        "delivered_unacked": received - received_acked,
    }


def merge_uniq(blobs: Sequence[bytes], messages: int) -> list[int]:
    """Per-seq distinct receivers, summed over the client processes."""
    total = [0] * messages
    for blob in blobs:
        part = array.array("i")
        part.frombytes(blob)
        for i, v in enumerate(part):
            total[i] += v
    return total


def dump_latencies(path: str, results: Sequence[Any]) -> None:
    """--dump-latencies: 'seq latency_ms' per first delivery of every client process, by seq."""
    rows: list[tuple[int, int]] = []
    for result in results:
        lat, seqs = array.array("q"), array.array("q")
        lat.frombytes(result[2])
        seqs.frombytes(result[4])
        rows.extend(zip(seqs, lat, strict=True))
    rows.sort()
    with open(path, "w") as out:
        out.writelines(f"{seq} {ns / 1e6:.3f}\n" for seq, ns in rows)


def latency_summary(blobs: Sequence[bytes]) -> dict[str, float | None]:
    """p50/p90/p99/p99.9/max of all first deliveries, in ms."""
    lat = array.array("q")
    for blob in blobs:
        lat.frombytes(blob)
    ordered = sorted(lat)
    return {
        "p50": procs.ms(procs.percentile(ordered, 50)),
        "p90": procs.ms(procs.percentile(ordered, 90)),
        "p99": procs.ms(procs.percentile(ordered, 99)),
        "p999": procs.ms(procs.percentile(ordered, 99.9)),
        "max": procs.ms(ordered[-1] if ordered else None),
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--proto", choices=sorted(PROTOCOLS), default="centrifugo")
    ap.add_argument(
        "--ws-url",
        action="append",
        help="ws://host:port (repeatable); the "
        "protocol's path is appended (default ws://127.0.0.1:8000); the HTTP emulation "
        "protocols use http:// in its place",
    )
    ap.add_argument(
        "--api-url",
        action="append",
        help="publish URL (repeatable, used in turn; default http://127.0.0.1:8000/api/publish)",
    )
    ap.add_argument("--api-key", default="bench")
    ap.add_argument("--token", default="", help="centrifugo: connection token (JWT)")
    ap.add_argument("-n", "--subscribers", type=int, default=1000)
    ap.add_argument("-c", "--channels", type=int, default=1)
    ap.add_argument("--channel-prefix", default="chat")
    ap.add_argument("-m", "--messages", type=int, default=2000)
    ap.add_argument(
        "-r",
        "--rate",
        type=float,
        default=0.0,
        help="publications/s; 0 = as fast as acknowledgements allow",
    )
    ap.add_argument(
        "--inflight",
        type=int,
        default=1,
        help="publish requests outstanding (reorder counts are strict only with 1)",
    )
    ap.add_argument("--pad", type=int, default=64, help="padding characters in each payload")
    ap.add_argument("--procs", type=int, default=2, help="subscriber client processes")
    ap.add_argument(
        "--source",
        action="append",
        help="loopback source address of client process p (repeatable, used in turn)",
    )
    ap.add_argument("--connect-concurrency", type=int, default=100, help="per process")
    ap.add_argument("--handshake-timeout", type=float, default=30.0)
    ap.add_argument("--publish-timeout", type=float, default=30.0)
    ap.add_argument(
        "--settle",
        type=float,
        default=1.0,
        help="pause between 'all subscribed' and the first publication, s",
    )
    ap.add_argument(
        "--drain", type=float, default=5.0, help="stop waiting this long after the last delivery, s"
    )
    ap.add_argument("--max-seconds", type=float, default=600.0, help="hard cap of the run, s")
    ap.add_argument(
        "--server-pid",
        type=int,
        action="append",
        default=[],
        help="report this process's CPU and RSS (repeatable: summed)",
    )
    ap.add_argument("--label", default="")
    ap.add_argument("--out", help="also append the JSON line to this file")
    ap.add_argument(
        "--dump-latencies",
        metavar="FILE",
        help="write 'seq latency_ms' per first delivery to FILE, by seq (where in a run the "
        "slow deliveries were: seq / rate is the publish time)",
    )
    ap.add_argument("--no-uvloop", dest="uvloop", action="store_false")
    args = ap.parse_args(argv)
    args.ws_url = args.ws_url or ["ws://127.0.0.1:8000"]
    args.api_url = args.api_url or ["http://127.0.0.1:8000/api/publish"]
    for name in ("subscribers", "channels", "messages", "procs", "inflight"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be at least 1")
    if args.rate < 0:
        ap.error("--rate must be 0 (as fast as possible) or positive")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    need = args.subscribers // args.procs + 200
    if procs.raise_nofile(1 << 20) < need:
        sys.exit(f"RLIMIT_NOFILE below the {need} a client process needs: use more --procs")
    started = time.monotonic()
    deadline = started + args.max_seconds + 30
    record = procs.run_children(args.procs, child, args, orchestrate, deadline)
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
    """Wait for the subscribers, publish, collect and summarise (the parent's main work)."""
    readies = [
        procs.receive_from(c, p, "ready", deadline)[1] for c, p in zip(pipes, children, strict=True)
    ]
    per_chan = [sum(r["per_chan"][c] for r in readies) for c in range(args.channels)]
    record: dict[str, Any] = {
        "label": args.label,
        "proto": args.proto,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "subscribers": args.subscribers,
        "channels": args.channels,
        "messages": args.messages,
        "procs": args.procs,
        "nodes": len(args.ws_url),
        "rate": args.rate or "afap",
        "inflight": args.inflight,
        "pad": args.pad,
        "connections": sum(r["ok"] for r in readies),
        "connect_failed": sum(r["failed"] for r in readies),
        "connect_s": round(max(r["connect_s"] for r in readies), 3),
        "connect_errors": procs.merge_counts([r["errors"] for r in readies]),
    }
    time.sleep(args.settle)
    pids = args.server_pid
    srv0 = procs.pids_cpu_s(pids)
    mach0 = procs.machine_cpu_s()
    cpu0 = cpu_self_s()
    pub = procs.run_loop(publish_all(args), args.uvloop)
    pub_cpu = cpu_self_s() - cpu0
    for conn in pipes:
        with contextlib.suppress(OSError):  # that child gave up already; its result waits
            conn.send(("done", {"t_end": pub.t1}))
    results = [
        procs.receive_from(c, p, "result", deadline) for c, p in zip(pipes, children, strict=True)
    ]
    srv1 = procs.pids_cpu_s(pids)
    mach1 = procs.machine_cpu_s()
    stats = [r[1] for r in results]
    if args.dump_latencies:
        dump_latencies(args.dump_latencies, results)
    uniq = merge_uniq([r[3] for r in results], args.messages)
    counts = delivery_counts(pub.acked, uniq, per_chan, args.channels)
    last_recv = max(s["last_recv"] for s in stats)
    window = (last_recv - pub.t0) / 1e9 if last_recv else 0.0
    client_cpu = sum(s["cpu_run_s"] for s in stats) + pub_cpu
    server_cpu = srv1 - srv0
    received = counts["deliveries_received"]
    record.update(
        {
            "publish_acked": sum(pub.acked),
            "publish_errors": pub.errors,
            "publish_s": round((pub.t1 - pub.t0) / 1e9, 3),
            "publish_rate": round(args.messages / max(1e-9, (pub.t1 - pub.t0) / 1e9), 1),
            "publish_max_behind_s": round(pub.max_behind, 3) if args.rate else None,
            **counts,
            "delivery_window_s": round(window, 3),
            "deliveries_per_s": round(received / window) if window else 0,
            "latency_ms": latency_summary([r[2] for r in results]),
            "duplicated": sum(s["dup"] for s in stats),
            "reordered": sum(s["reordered"] for s in stats),
            "misrouted": sum(s["misrouted"] for s in stats),
            "disconnects": sum(s["disconnects"] for s in stats),
            "client_errors": procs.merge_counts([s["errors"] for s in stats]),
            "client_cpu_s": round(client_cpu, 2),
            "client_cpu_publisher_s": round(pub_cpu, 2),
            "client_busy_max": round(max(s["cpu_run_s"] for s in stats) / window, 2)
            if window
            else None,
            "timed_out": any(s["timed_out"] for s in stats),
        }
    )
    if pids:
        mem = procs.pids_mem_mb(pids)
        record.update(
            {
                "server_pids": pids,
                "server_cpu_s": round(server_cpu, 2),
                "server_busy": round(server_cpu / window, 2) if window else None,
                "server_cpu_us_per_delivery": round(1e6 * server_cpu / received, 2)
                if received
                else None,
                "server_rss_mb": mem["rss"],
                "server_hwm_mb": mem["hwm"],
            }
        )
    foreign = (mach1[0] - mach0[0]) - client_cpu - server_cpu
    record["foreign_cpu_s"] = round(foreign, 1)
    record["foreign_busy"] = round(foreign / window, 2) if window else None
    record["steal_s"] = round(mach1[1] - mach0[1], 1)
    return record


if __name__ == "__main__":
    main()
