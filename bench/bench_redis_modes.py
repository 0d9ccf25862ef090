"""Redis broker throughput per connection mode (not a test): two RedisBrokers in one process
on PRIVATE servers (tests/support/private_servers.py), node b subscribed to `--channels`
channels, node a publishing. Prints one JSON line per mode:

    .venv/bin/python bench/bench_redis_modes.py --messages 5000 --concurrency 50
    .venv/bin/python bench/bench_redis_modes.py --modes plain,cluster

sequential: publishes/s one after another (each awaits Redis' reply);
concurrent: publishes/s with `concurrency` publishes in flight; delivered: until b received
them all. Modes: plain (one redis-server), tls (TLS-only redis-server, client certificate),
sentinel (master + replica + 3 sentinels), cluster (3 masters, sharded PUB/SUB).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from centripy.engine.types import ClientInfo, Publication
from centripy.storage.broker_redis import RedisBroker
from centripy.storage.redis_conn import RedisTLS, SentinelOptions
from tests.support.private_servers import (
    PrivateRedis,
    PrivateRedisCluster,
    PrivateSentinelSet,
    PrivateTLSRedis,
    ThrowawayPKI,
)

INFO = ClientInfo("u", "c", b"{}", b"{}")


class Counter:
    def __init__(self) -> None:
        self.n = 0
        self.changed = asyncio.Event()

    def on_publication(self, channel: str, pub: Publication, epoch: str) -> None:
        self.n += 1
        self.changed.set()

    def on_join(self, channel: str, info: ClientInfo) -> None: ...
    def on_leave(self, channel: str, info: ClientInfo) -> None: ...
    def on_control(self, data: bytes) -> None: ...
    def on_reconnect(self) -> None: ...

    async def wait_for(self, n: int, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while self.n < n:
            self.changed.clear()
            await asyncio.wait_for(self.changed.wait(), max(0.01, deadline - time.monotonic()))


async def run_mode(mode: str, root: Path, args: argparse.Namespace) -> dict[str, Any]:
    servers: list[Any] = []
    kw: dict[str, Any] = {"prefix": f"b{uuid.uuid4().hex[:8]}"}
    if mode == "plain":
        server: Any = PrivateRedis(root / "plain")
        kw["addresses"] = [server.address]
    elif mode == "tls":
        pki = ThrowawayPKI.create(root / "pki")
        server = PrivateTLSRedis(root / "tls", pki)
        kw["addresses"] = [server.address]
        kw["tls"] = RedisTLS(
            cert=str(pki.client_cert), key=str(pki.client_key), root_ca=str(pki.ca)
        )
    elif mode == "sentinel":
        server = PrivateSentinelSet(root / "sentinel")
        kw["addresses"] = server.sentinel_addresses
        kw["sentinel"] = SentinelOptions(master_name=server.name)
    else:
        server = PrivateRedisCluster(root / "cluster")
        kw["addresses"] = server.addresses
        kw["cluster"] = True
    servers.append(server)
    await asyncio.to_thread(server.start)
    a, b, counter = RedisBroker(**kw), RedisBroker(**kw), Counter()
    try:
        await a.start("a", Counter())
        await b.start("b", counter)
        channels = [f"room:{i}" for i in range(args.channels)]
        for channel in channels:
            await b.subscribe(channel)
        pub = Publication(b'{"x":1}', 1, INFO, {}, 0)
        n = args.messages
        started = time.perf_counter()
        for i in range(n):
            await a.publish(channels[i % len(channels)], pub, "E")
        sequential = n / (time.perf_counter() - started)
        await counter.wait_for(n)
        started = time.perf_counter()
        sem = asyncio.Semaphore(args.concurrency)

        async def one(i: int) -> None:
            async with sem:
                await a.publish(channels[i % len(channels)], pub, "E")

        await asyncio.gather(*(one(i) for i in range(n)))
        concurrent = n / (time.perf_counter() - started)
        await counter.wait_for(2 * n)
        delivered = n / (time.perf_counter() - started)
        return {
            "mode": mode,
            "messages": n,
            "sequential_per_s": round(sequential),
            "concurrent_per_s": round(concurrent),
            "concurrent_delivered_per_s": round(delivered),
        }
    finally:
        await a.close()
        await b.close()
        for s in servers:
            await asyncio.to_thread(s.close)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--channels", type=int, default=16)
    parser.add_argument("--modes", default="plain,tls,sentinel,cluster")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="centripy-bench-redis-") as tmp:
        for mode in args.modes.split(","):
            print(json.dumps(await run_mode(mode, Path(tmp) / mode, args)), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
