"""Graceful shutdown under load (issue 16, item 5): a real `centripy serve` process with
1,000 WebSocket clients connected and API publishers in flight gets SIGTERM. It must stop
accepting, close every client with 3001 "shutdown" (so they reconnect elsewhere), finish the
API calls and log writes in flight and exit 0 within `shutdown_timeout`; after a restart on
the same SQLite file, every publication that was acknowledged with a result is in history.

The clients are raw WebSocket connections (python-websockets) speaking the JSON protocol;
the test process raises its own open-files soft limit for them, and the server raises its
own at start-up (as Go, and so Centrifugo, does)."""

from __future__ import annotations

import asyncio
import json
import os
import resource
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from tests.integration.conftest import TEST_API_KEY, make_jwt
from tests.support.server import ServerFactory, ServerProcess, port_accepts
from tests.support.wait import eventually

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

CLIENTS = 1000
CHANNELS = 100  # ten subscribers per channel
CONNECTING_AT_ONCE = 100
PUBLISHERS = 8
SHUTDOWN_TIMEOUT = 10.0
NAMESPACE = {
    "name": "load",
    "history_size": 100_000,
    "history_ttl": "600s",
    "allow_subscribe_for_client": True,
}
CONFIG: dict[str, Any] = {
    "namespaces": [NAMESPACE],
    "shutdown_timeout": f"{SHUTDOWN_TIMEOUT:g}s",
}
FDS_NEEDED = CLIENTS + 1000  # the clients, the publishers' sockets, the rest


@pytest.fixture
def enough_open_files() -> Iterator[None]:
    """Raise this process's soft RLIMIT_NOFILE (restored afterwards) for the clients."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    ceiling = FDS_NEEDED * 2 if hard == resource.RLIM_INFINITY else hard
    if ceiling < FDS_NEEDED:
        pytest.skip(f"open-files hard limit {hard} < {FDS_NEEDED}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(ceiling, FDS_NEEDED * 2)), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def channel(i: int) -> str:
    return f"load:c{i % CHANNELS}"


@dataclass
class Client:
    """One connected, subscribed WebSocket client; `closed` is set with its close code."""

    ws: ClientConnection
    close_code: int | None = None
    close_reason: str = ""
    closed: asyncio.Event = field(default_factory=asyncio.Event)

    async def read_until_closed(self) -> None:
        try:
            async for message in self.ws:
                if message in ("{}", b"{}"):  # a protocol ping: answer it
                    await self.ws.send("{}")
        except ConnectionClosed:
            pass
        self.close_code = self.ws.close_code
        self.close_reason = self.ws.close_reason or ""
        self.closed.set()


async def reply(ws: ClientConnection, command_id: int) -> dict[str, Any]:
    """The reply to command `command_id` (pushes and pings before it are passed over)."""
    while True:
        raw = await ws.recv()
        for line in str(raw).splitlines():
            decoded = json.loads(line)
            if decoded.get("id") == command_id:
                return dict(decoded)


async def open_client(server: ServerProcess, i: int, gate: asyncio.Semaphore) -> Client:
    async with gate:
        ws = await connect(server.ws_url, open_timeout=30, ping_interval=None, max_queue=None)
        await ws.send(json.dumps({"id": 1, "connect": {"token": make_jwt(f"user{i}")}}))
        assert "connect" in await asyncio.wait_for(reply(ws, 1), 30)
        await ws.send(json.dumps({"id": 2, "subscribe": {"channel": channel(i)}}))
        answer = await asyncio.wait_for(reply(ws, 2), 30)
        assert "subscribe" in answer, answer
        return Client(ws)


@dataclass
class Publisher:
    """Publishes `{"p": n, "i": k}` to the channels in turn until the server is gone;
    `acked` holds (channel, data) of every publish answered with a result."""

    server: ServerProcess
    number: int
    acked: list[tuple[str, dict[str, int]]] = field(default_factory=list)
    failed: int = 0

    async def run(self, session: aiohttp.ClientSession) -> None:
        url = f"{self.server.api_url}/publish"
        headers = {"X-API-Key": TEST_API_KEY}
        k = 0
        while True:
            target = channel(self.number * 7 + k)
            data = {"p": self.number, "i": k}
            k += 1
            try:
                async with session.post(
                    url, json={"channel": target, "data": data}, headers=headers
                ) as response:
                    body = await response.json(content_type=None) if response.status == 200 else {}
            except (aiohttp.ClientError, TimeoutError, json.JSONDecodeError):
                body = {}
            if "result" in body:
                self.acked.append((target, data))
                continue
            self.failed += 1
            if not self.server.running:
                return
            await asyncio.sleep(0.01)


async def history(server: ServerProcess, name: str) -> list[Any]:
    reply_ = await server.api_async("history", {"channel": name, "limit": -1})
    return [pub["data"] for pub in reply_["result"].get("publications", [])]


@pytest.mark.usefixtures("enough_open_files")
async def test_sigterm_with_1000_clients_and_publishes_in_flight(
    server_factory: ServerFactory,
) -> None:
    server = server_factory(CONFIG)
    gate = asyncio.Semaphore(CONNECTING_AT_ONCE)
    started = time.monotonic()
    clients = await asyncio.gather(*(open_client(server, i, gate) for i in range(CLIENTS)))
    connected_in = time.monotonic() - started
    readers = [asyncio.create_task(c.read_until_closed()) for c in clients]
    publishers = [Publisher(server, n) for n in range(PUBLISHERS)]
    connector = aiohttp.TCPConnector(limit=PUBLISHERS)
    timeout = aiohttp.ClientTimeout(total=SHUTDOWN_TIMEOUT + 5)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        runs = [asyncio.create_task(p.run(session)) for p in publishers]
        await eventually(
            lambda: sum(len(p.acked) for p in publishers) >= 200, 20, "publishes flowing"
        )
        # SIGHUP (a config reload) under load must not end or disturb anything.
        server_pid = server.pid
        assert server_pid is not None
        os.kill(server_pid, signal.SIGHUP)
        acked_at_hup = sum(len(p.acked) for p in publishers)
        await eventually(
            lambda: sum(len(p.acked) for p in publishers) >= acked_at_hup + 100,
            20,
            "publishes flowing after SIGHUP",
        )
        assert server.running and not any(c.closed.is_set() for c in clients)
        acked_before = sum(len(p.acked) for p in publishers)
        signalled = time.monotonic()
        code = await asyncio.to_thread(server.stop, signal.SIGTERM, SHUTDOWN_TIMEOUT + 5)
        exited_in = time.monotonic() - signalled
        await asyncio.wait_for(asyncio.gather(*runs), SHUTDOWN_TIMEOUT)
    await asyncio.wait_for(asyncio.gather(*readers), 10)

    print(
        f"{CLIENTS} clients connected in {connected_in:.2f} s; exit {code} "
        f"{exited_in:.2f} s after SIGTERM; {acked_before} publishes acknowledged before "
        f"SIGTERM, {sum(len(p.acked) for p in publishers)} in all"
    )
    assert code == 0, server.diagnostics()
    assert exited_in < SHUTDOWN_TIMEOUT
    codes = [(c.close_code, c.close_reason) for c in clients]
    assert codes == [(3001, "shutdown")] * CLIENTS, {x: codes.count(x) for x in set(codes)}
    assert not port_accepts(server.host, server.port)

    server.start()
    acked: dict[str, list[dict[str, int]]] = {}
    for publisher in publishers:
        for name, data in publisher.acked:
            acked.setdefault(name, []).append(data)
    stored = {name: await history(server, name) for name in acked}
    for name, datas in acked.items():
        missing = [d for d in datas if d not in stored[name]]
        assert not missing, f"{name}: {len(missing)} acknowledged publications lost: {missing}"
        assert len(stored[name]) == len({json.dumps(d) for d in stored[name]})  # no duplicate


def open_files_limit(pid: int) -> tuple[int, int]:
    """(soft, hard) RLIMIT_NOFILE of a running process, from /proc."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError(f"no open-files line in /proc/{pid}/limits")


def test_server_raises_its_open_files_limit_and_removes_its_pid_file(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard <= 256:
        pytest.skip(f"needs a finite hard open-files limit above 256, got {hard}")
    pid_file = tmp_path / "centripy.pid"
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))  # the server inherits 256
    try:
        server = server_factory({**CONFIG, "pid_file": str(pid_file)})
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert server.pid is not None
    assert open_files_limit(server.pid) == (hard, hard)
    assert pid_file.read_text() == str(server.pid)
    assert server.stop() == 0
    assert not pid_file.exists()
