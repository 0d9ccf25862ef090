"""The event log through a real server process: durability across SIGKILL, idempotency
across restarts, and both back ends (SQLite file, PostgreSQL)."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable
from typing import Any

import pytest
import websockets

from tests.support.server import ServerFactory, ServerProcess
from tests.support.services import postgres_url
from tests.support.wait import eventually

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

NAMESPACE = {
    "name": "log",
    "history_size": 100000,
    "history_ttl": "600s",
    "force_recovery": True,
    "allow_subscribe_for_client": True,
    "allow_subscribe_for_anonymous": True,
}
NO_HISTORY = {
    "name": "live",
    "allow_subscribe_for_client": True,
    "allow_subscribe_for_anonymous": True,
}


def _backends() -> list[Any]:
    return [
        pytest.param(lambda: {}, id="sqlite"),
        pytest.param(lambda: {"database_url": postgres_url()}, id="postgres"),
    ]


def _config(extra: dict[str, Any]) -> dict[str, Any]:
    return {
        "namespaces": [NAMESPACE, NO_HISTORY],
        "allow_anonymous_connect_without_token": True,
        **extra,
    }


async def _publish(server: ServerProcess, channel: str, i: int) -> tuple[int, str] | None:
    try:
        reply = await server.api_async("publish", {"channel": channel, "data": {"i": i}})
    except Exception:
        return None  # the server died mid-request: not acknowledged
    result = reply.get("result")
    return (result["offset"], result["epoch"]) if result else None


@pytest.mark.parametrize("backend", _backends())
async def test_every_acknowledged_publication_survives_sigkill(
    server_factory: ServerFactory, backend: Callable[[], dict[str, Any]]
) -> None:
    server = server_factory(_config(backend()))
    channel = f"log:kill-{uuid.uuid4().hex[:8]}"
    tasks = [asyncio.create_task(_publish(server, channel, i)) for i in range(400)]
    # Kill once some are acknowledged while the rest are in flight (a wait on acknowledgements,
    # not a fixed sleep: on a loaded machine 0.15 s could pass before the first reply).
    await eventually(
        lambda: sum(t.done() and t.result() is not None for t in tasks) >= 5,
        30.0,
        "5 acknowledged publications",
    )
    server.kill()
    acked = {i: r for i, r in enumerate(await asyncio.gather(*tasks)) if r is not None}
    assert acked, "nothing was acknowledged before the kill"
    server.start()
    history = server.api_result("history", {"channel": channel, "limit": -1})
    by_offset = {p["offset"]: p["data"]["i"] for p in history["publications"]}
    assert sorted(by_offset) == list(range(1, len(by_offset) + 1))
    for i, (offset, epoch) in acked.items():
        assert epoch == history["epoch"]
        assert by_offset[offset] == i


@pytest.mark.parametrize("backend", _backends())
async def test_idempotency_key_survives_restart(
    server_factory: ServerFactory, backend: Callable[[], dict[str, Any]]
) -> None:
    server = server_factory(_config(backend()))
    channel = f"log:idem-{uuid.uuid4().hex[:8]}"
    live = f"live:idem-{uuid.uuid4().hex[:8]}"
    body = {"channel": channel, "data": {"x": 1}, "idempotency_key": "k1"}
    first = server.api_result("publish", body)
    assert server.api_result("publish", body) == first
    live_body = {"channel": live, "data": {"x": 1}, "idempotency_key": "k1"}
    assert server.api_result("publish", live_body) == {}
    server.kill()
    server.start()
    assert server.api_result("publish", body) == first
    history = server.api_result("history", {"channel": channel, "limit": -1})
    assert [p["offset"] for p in history["publications"]] == [first["offset"]]
    broadcast = server.api_result(
        "broadcast", {"channels": [channel, f"{channel}-b"], "data": {}, "idempotency_key": "k1"}
    )
    assert broadcast["responses"][0] == {"result": first}
    assert broadcast["responses"][1]["result"]["offset"] == 1


async def test_duplicate_within_window_is_not_delivered(server_factory: ServerFactory) -> None:
    server = server_factory(_config({}))
    channel = f"live:dup-{uuid.uuid4().hex[:8]}"
    async with websockets.connect(server.ws_url) as ws:
        await ws.send(json.dumps({"id": 1, "connect": {}}))
        await ws.recv()
        await ws.send(json.dumps({"id": 2, "subscribe": {"channel": channel}}))
        assert json.loads(await ws.recv()) == {"id": 2, "subscribe": {}}
        for _ in range(3):
            await server.api_async(
                "publish", {"channel": channel, "data": {"n": 1}, "idempotency_key": "same"}
            )
        await server.api_async("publish", {"channel": channel, "data": {"n": 2}})
        received = []
        while len(received) < 2:
            for line in (await asyncio.wait_for(ws.recv(), 5)).split("\n"):
                message = json.loads(line)
                if "push" in message:
                    received.append(message["push"]["pub"]["data"]["n"])
        assert received == [1, 2]


async def test_reconnect_after_restart_recovers_with_same_epoch(
    server_factory: ServerFactory,
) -> None:
    server = server_factory(_config({}))
    channel = f"log:rec-{uuid.uuid4().hex[:8]}"
    async with websockets.connect(server.ws_url) as ws:
        await ws.send(json.dumps({"id": 1, "connect": {}}))
        await ws.recv()
        await ws.send(json.dumps({"id": 2, "subscribe": {"channel": channel}}))
        sub = json.loads(await ws.recv())["subscribe"]
    for i in range(5):
        server.api_result("publish", {"channel": channel, "data": {"i": i}})
    server.kill()
    server.start()
    async with websockets.connect(server.ws_url) as ws:
        await ws.send(json.dumps({"id": 1, "connect": {}}))
        await ws.recv()
        recover = {"channel": channel, "recover": True, "epoch": sub["epoch"], "offset": 0}
        await ws.send(json.dumps({"id": 2, "subscribe": recover}))
        result = json.loads(await ws.recv())["subscribe"]
    assert result["recovered"] is True and result["epoch"] == sub["epoch"]
    assert [p["data"]["i"] for p in result["publications"]] == [0, 1, 2, 3, 4]
