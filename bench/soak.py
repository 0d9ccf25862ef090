#!/usr/bin/env python3
"""Soak: a long churn run against one real server, sampling its RSS, open files and error log.

One `centripy serve` process (SQLite event log, the default; history and presence on) runs for
--minutes while:

* a publisher POSTs `/api/publish` to one of --channels channels at a steady --rate, keeping
  the acknowledged offsets per channel;
* --clients WebSocket clients (JSON protocol v2) churn: connect, subscribe to a random channel
  (recovering from the last position they saw of it, if any), receive for a random 1-8 s,
  then close cleanly or drop the socket, pause, and start again. Every client checks that the
  publications it gets on a channel (recovered ones in the subscribe reply, then pushes) carry
  consecutive offsets from where it left that channel: a gap or a repeat is counted, and so is
  a recovery the server could not make (`recovered: false` while the client missed no more
  than `client_recovery_max_publication_limit`, 300; past it the server is right to refuse,
  and the client starts again from the stream top: counted apart).

Every --sample seconds one line: elapsed, server RSS (MiB) and open files, server CPU
seconds, WARNING/ERROR/Traceback lines in the server's log so far, sessions, publications
acknowledged and delivered, and the fault counters. At the end a JSON line with the samples,
the RSS and open-file drift (mean of the last quarter of samples minus the mean of the
second quarter, i.e. after warm-up), and the verdict inputs.

    .venv/bin/python bench/soak.py --minutes 30
    .venv/bin/python bench/soak.py --minutes 2 --clients 100     # a smoke run

The server is stopped (SIGTERM, then SIGKILL) in a `finally`; every wait is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from bench_hostile import HttpConn, server_memory_mib, server_open_files
from common import API_KEY, bench_server, emit, process_cpu_seconds, raise_nofile_limit

RECOVERY_LIMIT = 300  # client_recovery_max_publication_limit, Centrifugo's default
LOG_FAULT = re.compile(rb"\b(WARNING|ERROR|CRITICAL)\b|Traceback")


@dataclass
class Counters:
    sessions: int = 0
    connect_failures: int = 0
    delivered: int = 0
    recovered_pubs: int = 0
    recoveries: int = 0
    over_limit: int = 0
    not_recovered: int = 0
    gaps: int = 0
    repeats: int = 0
    published: int = 0
    publish_errors: int = 0
    client_errors: list[str] = field(default_factory=list)


def server_config(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "allow_anonymous_connect_without_token": True,
        "allow_subscribe_for_client": True,
        "allow_subscribe_for_anonymous": True,
        "presence": True,
        "join_leave": True,
        "history_size": 10_000,
        "history_ttl": "3600s",
        "force_recovery": True,
        "log_level": "info",
        "shutdown_timeout": "5s",
    }


async def publisher(args: argparse.Namespace, port: int, c: Counters, stop: asyncio.Event) -> None:
    conn = HttpConn(port, API_KEY)
    interval = 1.0 / args.rate
    next_at = time.monotonic()
    n = 0
    while not stop.is_set():
        channel = f"soak{random.randrange(args.channels)}"
        body = orjson.dumps({"channel": channel, "data": {"n": n}})
        n += 1
        try:
            status, payload = await conn.post("/api/publish", body, timeout=5.0)
            reply = orjson.loads(payload) if payload else {}
            if status == 200 and "error" not in reply:
                c.published += 1
            else:
                c.publish_errors += 1
        except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError):
            c.publish_errors += 1
        next_at += interval
        delay = next_at - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        else:
            next_at = time.monotonic()


def check_run(pos: dict[str, Any], pubs: list[dict[str, Any]], c: Counters) -> None:
    """Offsets of `pubs` must continue `pos["offset"]` one by one; advance `pos`."""
    for pub in pubs:
        offset = int(pub.get("offset", 0))
        expected = pos["offset"] + 1
        if pos["offset"] and offset > expected:
            c.gaps += 1
        elif pos["offset"] and offset < expected:
            c.repeats += 1
            continue
        pos["offset"] = offset
        c.delivered += 1


async def one_session(
    session: aiohttp.ClientSession,
    url: str,
    positions: dict[str, dict[str, Any]],
    args: argparse.Namespace,
    c: Counters,
) -> None:
    channel = f"soak{random.randrange(args.channels)}"
    pos = positions.get(channel)
    sub: dict[str, Any] = {"channel": channel, "recoverable": True}
    if pos is not None:
        sub.update(recover=True, epoch=pos["epoch"], offset=pos["offset"])
    async with session.ws_connect(url, autoping=True, max_msg_size=0) as ws:
        await ws.send_str(
            orjson.dumps({"id": 1, "connect": {}}).decode()
            + "\n"
            + orjson.dumps({"id": 2, "subscribe": sub}).decode()
        )
        c.sessions += 1
        until = time.monotonic() + random.uniform(1.0, 8.0)
        subscribed = False
        while True:
            left = until - time.monotonic()
            if left <= 0:
                break
            try:
                msg = await asyncio.wait_for(ws.receive(), left)
            except TimeoutError:
                break
            if msg.type != aiohttp.WSMsgType.TEXT:
                raise ConnectionError(f"socket {msg.type.name} {msg.data!r}")
            for line in msg.data.split("\n"):
                if not line:
                    continue
                frame = orjson.loads(line)
                if not frame:
                    await ws.send_str("{}")
                elif frame.get("id") == 1 and "error" in frame:
                    raise ConnectionError(f"connect: {frame['error']}")
                elif frame.get("id") == 2:
                    if "error" in frame:
                        raise ConnectionError(f"subscribe: {frame['error']}")
                    result = frame["subscribe"]
                    subscribed = True
                    if pos is None or pos["epoch"] != result.get("epoch"):
                        pos = {"epoch": result.get("epoch", ""), "offset": result.get("offset", 0)}
                        positions[channel] = pos
                    elif result.get("recovered"):
                        c.recoveries += 1
                        recovered = result.get("publications", [])
                        c.recovered_pubs += len(recovered)
                        check_run(pos, recovered, c)
                    else:  # expected only past client_recovery_max_publication_limit
                        missed = int(result.get("offset", 0)) - pos["offset"]
                        if missed > RECOVERY_LIMIT:
                            c.over_limit += 1
                        else:
                            c.not_recovered += 1
                        pos = {"epoch": result.get("epoch", ""), "offset": result.get("offset", 0)}
                        positions[channel] = pos
                elif "push" in frame and subscribed and pos is not None:
                    push = frame["push"]
                    if "pub" in push and push.get("channel") == channel:
                        check_run(pos, [push["pub"]], c)
        if random.random() < 0.3:  # drop the socket instead of closing it
            transport = ws._response.connection.transport if ws._response.connection else None
            if transport is not None:
                transport.abort()


async def client(
    url: str, args: argparse.Namespace, c: Counters, stop: asyncio.Event, idx: int
) -> None:
    positions: dict[str, dict[str, Any]] = {}
    await asyncio.sleep(random.uniform(0, 3.0))
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        while not stop.is_set():
            try:
                await one_session(session, url, positions, args, c)
            except (aiohttp.ClientError, ConnectionError, OSError, TimeoutError) as error:
                c.connect_failures += 1
                if len(c.client_errors) < 20:
                    c.client_errors.append(f"{idx}: {type(error).__name__}: {error}")
            await asyncio.sleep(random.uniform(0.05, 1.0))


def log_faults(path: Path) -> tuple[int, list[str]]:
    """How many fault lines the server's log has, and the first few of them."""
    with contextlib.suppress(OSError):
        lines = [ln for ln in path.read_bytes().splitlines() if LOG_FAULT.search(ln)]
        return len(lines), [ln.decode(errors="replace")[:300] for ln in lines[:10]]
    return 0, []


def drift(values: list[float]) -> float | None:
    """Mean of the last quarter minus mean of the second quarter (after warm-up)."""
    q = len(values) // 4
    if q < 1:
        return None
    return round(statistics.fmean(values[-q:]) - statistics.fmean(values[q : 2 * q]), 2)


async def soak(args: argparse.Namespace) -> dict[str, Any]:
    raise_nofile_limit(args.clients * 4 + 1000)
    c = Counters()
    samples: list[dict[str, Any]] = []
    with bench_server(server_config(args), "soak") as server:
        pid = server.pid
        assert pid is not None
        stop = asyncio.Event()
        tasks = [asyncio.create_task(publisher(args, server.port, c, stop))]
        url = server.ws_url
        tasks += [asyncio.create_task(client(url, args, c, stop, i)) for i in range(args.clients)]
        started = time.monotonic()
        end = started + args.minutes * 60
        try:
            while time.monotonic() < end:
                await asyncio.sleep(min(args.sample, max(0.0, end - time.monotonic())))
                faults, _ = log_faults(server.stderr_path)
                sample = {
                    "t_s": round(time.monotonic() - started),
                    "rss_mib": server_memory_mib(pid),
                    "open_files": server_open_files(pid),
                    "cpu_s": round(process_cpu_seconds(pid), 1),
                    "log_faults": faults,
                    "sessions": c.sessions,
                    "published": c.published,
                    "delivered": c.delivered,
                    "publish_errors": c.publish_errors,
                    "connect_failures": c.connect_failures,
                    "gaps": c.gaps,
                    "repeats": c.repeats,
                    "not_recovered": c.not_recovered,
                }
                samples.append(sample)
                print(" ".join(f"{k}={v}" for k, v in sample.items()), flush=True)
        finally:
            stop.set()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        faults, first = log_faults(server.stderr_path)
    return {
        "bench": "soak",
        "minutes": args.minutes,
        "clients": args.clients,
        "channels": args.channels,
        "rate": args.rate,
        "rss_drift_mib": drift([s["rss_mib"] for s in samples]),
        "open_files_drift": drift([float(s["open_files"]) for s in samples]),
        "rss_first_last_mib": [samples[0]["rss_mib"], samples[-1]["rss_mib"]] if samples else [],
        "log_faults": faults,
        "log_fault_lines": first,
        "sessions": c.sessions,
        "published": c.published,
        "delivered": c.delivered,
        "recoveries": c.recoveries,
        "recovered_pubs": c.recovered_pubs,
        "not_recovered_over_limit": c.over_limit,
        "not_recovered": c.not_recovered,
        "gaps": c.gaps,
        "repeats": c.repeats,
        "publish_errors": c.publish_errors,
        "connect_failures": c.connect_failures,
        "client_errors": c.client_errors,
        "samples": samples,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--clients", type=int, default=300)
    p.add_argument("--channels", type=int, default=20)
    p.add_argument("--rate", type=float, default=100.0, help="publications/s")
    p.add_argument("--sample", type=float, default=30.0, help="seconds between samples")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = asyncio.run(soak(args))
    emit(result)
    bad = result["gaps"] + result["repeats"] + result["not_recovered"] + result["log_faults"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
