"""Several centripy nodes on Redis (engine: redis) or on PostgreSQL alone (engine:
postgresql), sharing one PostgreSQL event log: fan-out, ordering, presence, server API
actions across nodes, node death, broker outage."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import websockets

from tests.support.server import ServerFactory, ServerProcess, free_port
from tests.support.services import postgres_url, redis_url, unavailable
from tests.support.wait import eventually

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

WITHIN = 20.0  # seconds a client waits for a reply or a push

NAMESPACE = {
    "name": "room",
    "history_size": 10000,
    "history_ttl": "600s",
    "force_recovery": True,
    "presence": True,
    "join_leave": True,
    "force_push_join_leave": True,
    "allow_subscribe_for_client": True,
    "allow_presence_for_subscriber": True,
}


def _engine_config(engine: str, redis_address: str | None = None) -> dict[str, Any]:
    tag = uuid.uuid4().hex[:10]
    config: dict[str, Any] = {
        "engine": engine,
        "database_url": postgres_url(),
        "namespaces": [NAMESPACE],
        "allow_subscribe_for_client": True,
    }
    if engine == "redis":
        config["redis_address"] = redis_address or redis_url().removeprefix("redis://")
        config["redis_prefix"] = f"t{tag}"
    else:
        config["postgresql_prefix"] = f"t{tag}"
    return config


@pytest.fixture(params=["redis", "postgresql"])
def cluster_config(request: pytest.FixtureRequest) -> dict[str, Any]:
    return _engine_config(request.param)


def _start_nodes(factory: ServerFactory, config: dict[str, Any], n: int) -> list[ServerProcess]:
    return [factory(config) for _ in range(n)]


class Client:
    """A raw protocol-v2 client (the SDK tests cover the SDKs; here we want every byte)."""

    def __init__(self, ws: Any, client_id: str) -> None:
        self.ws = ws
        self.client_id = client_id
        self.pushes: list[dict[str, Any]] = []
        self.replies: dict[int, dict[str, Any]] = {}
        self.closed: tuple[int, str] | None = None
        self.changed = asyncio.Event()  # set on every frame read and on close
        self._next = 2
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def connect(cls, server: ServerProcess, token: str) -> Client:
        ws = await websockets.connect(server.ws_url)
        await ws.send(json.dumps({"id": 1, "connect": {"token": token}}))
        reply = json.loads(await asyncio.wait_for(ws.recv(), 5))
        assert "connect" in reply, reply
        return cls(ws, reply["connect"]["client"])

    async def _read(self) -> None:
        try:
            async for frame in self.ws:
                for line in frame.split("\n"):
                    msg = json.loads(line)
                    if msg.get("id"):
                        self.replies[msg["id"]] = msg
                    elif "push" in msg:
                        self.pushes.append(msg["push"])
                    else:
                        await self.ws.send("{}")  # pong
                self.changed.set()
        except websockets.exceptions.ConnectionClosed as exc:
            if exc.rcvd is not None:
                self.closed = (exc.rcvd.code, exc.rcvd.reason)
            self.changed.set()

    async def call(self, method: str, body: dict[str, Any]) -> dict[str, Any]:
        cmd_id, self._next = self._next, self._next + 1
        await self.ws.send(json.dumps({"id": cmd_id, method: body}))
        await eventually(
            lambda: cmd_id in self.replies, WITHIN, f"reply {cmd_id}", changed=self.changed
        )
        return self.replies[cmd_id]

    def offsets(self, channel: str) -> list[int]:
        return [
            p["pub"]["offset"] for p in self.pushes if p.get("channel") == channel and "pub" in p
        ]

    async def close(self) -> None:
        await self.ws.close()
        self._reader.cancel()


@pytest.fixture
async def clients() -> AsyncIterator[list[Client]]:
    made: list[Client] = []
    yield made
    for client in made:
        await client.close()


async def _client(
    made: list[Client], server: ServerProcess, token: str, channel: str | None = None
) -> Client:
    client = await Client.connect(server, token)
    made.append(client)
    if channel:
        reply = await client.call("subscribe", {"channel": channel})
        assert "subscribe" in reply, reply
    return client


async def test_every_subscriber_on_every_node_sees_offsets_in_order(
    server_factory: ServerFactory,
    cluster_config: dict[str, Any],
    clients: list[Client],
    make_token: Any,
) -> None:
    nodes = _start_nodes(server_factory, cluster_config, 3)
    channel = f"room:{uuid.uuid4().hex[:8]}"
    subs = [
        await _client(clients, node, make_token(f"u{i}"), channel)
        for i, node in enumerate(nodes * 2)
    ]
    total = 300

    async def publish_via(node: ServerProcess, start: int) -> None:
        for i in range(start, total, len(nodes)):
            await node.api_async("publish", {"channel": channel, "data": {"i": i}})

    await asyncio.gather(*(publish_via(node, k) for k, node in enumerate(nodes)))
    for sub in subs:
        await eventually(
            lambda s=sub: len(s.offsets(channel)) >= total, WITHIN, changed=sub.changed
        )
        assert sub.offsets(channel) == list(range(1, total + 1))


async def test_presence_join_leave_and_info_across_nodes(
    server_factory: ServerFactory,
    cluster_config: dict[str, Any],
    clients: list[Client],
    make_token: Any,
) -> None:
    a, b = _start_nodes(server_factory, cluster_config, 2)
    channel = f"room:{uuid.uuid4().hex[:8]}"
    alice = await _client(clients, a, make_token("alice"), channel)
    bob = await _client(clients, b, make_token("bob"), channel)
    await eventually(
        lambda: any(p.get("join", {}).get("info", {}).get("user") == "bob" for p in alice.pushes),
        WITHIN,
        changed=alice.changed,
    )
    stats = (await alice.call("presence_stats", {"channel": channel}))["presence_stats"]
    assert stats == {"num_clients": 2, "num_users": 2}
    presence = a.api_result("presence", {"channel": channel})["presence"]
    assert sorted(v["user"] for v in presence.values()) == ["alice", "bob"]
    await bob.close()
    await eventually(lambda: any("leave" in p for p in alice.pushes), WITHIN, changed=alice.changed)

    def info_lists_both() -> list[str]:
        uids = [n["uid"] for n in a.api_result("info", {})["nodes"]]
        return uids if len(uids) == 2 else []

    uids = await eventually(info_lists_both, 10, "info lists both nodes", interval=0.2)
    assert len(set(uids)) == 2
    channels = b.api_result("channels", {"pattern": channel})["channels"]
    assert channels == {channel: {"num_clients": 1}} or channels == {}


async def test_api_disconnect_reaches_a_user_on_another_node(
    server_factory: ServerFactory,
    cluster_config: dict[str, Any],
    clients: list[Client],
    make_token: Any,
) -> None:
    a, b = _start_nodes(server_factory, cluster_config, 2)
    victim = await _client(clients, b, make_token("victim"))
    a.api_result("disconnect", {"user": "victim", "disconnect": {"code": 4001, "reason": "bye"}})
    await eventually(lambda: victim.closed is not None, WITHIN, changed=victim.changed)
    assert victim.closed == (4001, "bye")


async def test_clients_of_a_killed_node_recover_on_another(
    server_factory: ServerFactory,
    cluster_config: dict[str, Any],
    clients: list[Client],
    make_token: Any,
) -> None:
    a, b = _start_nodes(server_factory, cluster_config, 2)
    channel = f"room:{uuid.uuid4().hex[:8]}"
    sub = await _client(clients, a, make_token("u"), channel)
    for i in range(5):
        b.api_result("publish", {"channel": channel, "data": {"i": i}})
    await eventually(lambda: len(sub.offsets(channel)) == 5, WITHIN, changed=sub.changed)
    position = sub.pushes[-1]
    assert position["pub"]["offset"] == 5
    top = b.api_result("history", {"channel": channel})
    a.kill()
    for i in range(5, 12):
        b.api_result("publish", {"channel": channel, "data": {"i": i}})
    again = await _client(clients, b, make_token("u"))
    result = (
        await again.call(
            "subscribe",
            {"channel": channel, "recover": True, "offset": 5, "epoch": top["epoch"]},
        )
    )["subscribe"]
    assert result["recovered"] is True
    assert [p["offset"] for p in result["publications"]] == list(range(6, 13))


async def test_publications_without_history_keep_publish_order_across_nodes(
    server_factory: ServerFactory,
    cluster_config: dict[str, Any],
    clients: list[Client],
    make_token: Any,
) -> None:
    """No history, so no offsets to sequence by: a publish acknowledged before the next one
    is sent (to another node) must reach every subscriber first (issue 21, item 0)."""
    nodes = _start_nodes(server_factory, cluster_config, 2)
    channel = f"plain{uuid.uuid4().hex[:8]}"
    subs = [
        await _client(clients, node, make_token(f"u{i}"), channel)
        for i, node in enumerate(nodes * 3)
    ]
    total = 400
    for i in range(total):
        await nodes[i % 2].api_async("publish", {"channel": channel, "data": {"i": i}})

    def seen(sub: Client) -> list[int]:
        return [p["pub"]["data"]["i"] for p in sub.pushes if p.get("channel") == channel]

    for sub in subs:
        await eventually(lambda s=sub: len(seen(s)) >= total, WITHIN, changed=sub.changed)
        assert seen(sub) == list(range(total))


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[dict[str, Any]]:
    binary = shutil.which("redis-server")
    if binary is None:
        unavailable("redis-server binary not found")
    port = free_port()
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    state: dict[str, Any] = {"port": port, "args": args, "dir": tmp_path}

    def start() -> None:
        state["proc"] = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.DEVNULL)
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), 0.1).close()
                return
            except OSError:
                subprocess.run(["sleep", "0.05"], check=False)
        raise RuntimeError("private redis did not start")

    def stop() -> None:
        state["proc"].terminate()
        state["proc"].wait(10)

    state["start"], state["stop"] = start, stop
    start()
    yield state
    if state["proc"].poll() is None:
        stop()


async def test_redis_restart_during_publishing_loses_nothing(
    server_factory: ServerFactory,
    private_redis: dict[str, Any],
    clients: list[Client],
    make_token: Any,
) -> None:
    config = _engine_config("redis", f"127.0.0.1:{private_redis['port']}")
    a, b = _start_nodes(server_factory, config, 2)
    channel = f"room:{uuid.uuid4().hex[:8]}"
    sub = await _client(clients, b, make_token("u"), channel)
    total = 120
    for i in range(total // 2):
        a.api_result("publish", {"channel": channel, "data": {"i": i}})
    private_redis["stop"]()
    for i in range(total // 2, total):
        a.api_result("publish", {"channel": channel, "data": {"i": i}})
    private_redis["start"]()
    await eventually(lambda: len(sub.offsets(channel)) >= total, 30, changed=sub.changed)
    assert sub.offsets(channel) == list(range(1, total + 1))


async def test_postgresql_listener_loss_during_publishing_loses_nothing(
    server_factory: ServerFactory, clients: list[Client], make_token: Any
) -> None:
    import asyncpg

    config = _engine_config("postgresql")
    a, b = _start_nodes(server_factory, config, 2)
    channel = f"room:{uuid.uuid4().hex[:8]}"
    sub = await _client(clients, b, make_token("u"), channel)
    total = 120
    conn = await asyncpg.connect(postgres_url().replace("+asyncpg", ""))
    try:
        for i in range(total):
            await a.api_async("publish", {"channel": channel, "data": {"i": i}})
            if i == total // 2:
                killed = await conn.fetchval(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                    " WHERE application_name LIKE 'centripy-listen-%'"
                    " AND pid <> pg_backend_pid()"
                )
                assert killed >= 1
    finally:
        await conn.close()
    await eventually(lambda: len(sub.offsets(channel)) >= total, 30, changed=sub.changed)
    assert sub.offsets(channel) == list(range(1, total + 1))


async def test_several_processes_share_one_port_with_reuse_port(
    server_factory: ServerFactory, clients: list[Client], make_token: Any
) -> None:
    config = {**_engine_config("redis"), "reuse_port": True}
    first = server_factory(config)
    second = server_factory(config, start=False)
    second.port = first.port
    second.start()  # returns at once: the port already accepts (the first process)

    await eventually(
        lambda: len(first.api_result("info", {})["nodes"]) >= 2,
        15,
        "both processes listening",
        interval=0.2,
    )
    channel = f"room:{uuid.uuid4().hex[:8]}"
    subs = [await _client(clients, first, make_token(f"u{i}"), channel) for i in range(12)]

    def spread() -> list[int]:
        nodes = first.api_result("info", {})["nodes"]
        counts = [n["num_clients"] for n in nodes]
        return counts if len(nodes) == 2 and sum(counts) == len(subs) else []

    counts = await eventually(spread, 15, "every client counted", interval=0.3)
    assert min(counts) > 0  # the kernel spread the connections over both processes
    first.api_result("publish", {"channel": channel, "data": {}})
    for sub in subs:
        await eventually(lambda s=sub: s.offsets(channel) == [1], WITHIN, changed=sub.changed)
