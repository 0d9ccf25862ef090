"""`client_concurrency`: the commands of one connection are handled concurrently, up to N at a
time, replies matched by id; commands naming the same channel keep their order. Observed
through a real rpc proxy back end that counts the calls it holds at once."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from tests.integration.http_proxy_backend import ProxyBackend, proxy_backend
from tests.support.server import ServerFactory, ServerProcess

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

WAIT = 10.0
CALLS = 6


class Gauge:
    """How many rpc calls the back end holds at once (and the most it ever held)."""

    def __init__(self) -> None:
        self.now = 0
        self.most = 0

    async def rpc(self, body: dict[str, Any]) -> dict[str, Any]:
        self.now += 1
        self.most = max(self.most, self.now)
        try:
            await asyncio.sleep(0.8)  # long enough to overlap on a loaded machine
        finally:
            self.now -= 1
        return {"result": {"data": {"echo": body["data"]}}}


@pytest.fixture
async def backend() -> AsyncIterator[ProxyBackend]:
    async with proxy_backend() as b:
        yield b


async def open_ws(server: ServerProcess) -> tuple[aiohttp.ClientSession, Any]:
    session = aiohttp.ClientSession()
    ws = await session.ws_connect(server.ws_url)
    await ws.send_str(json.dumps({"id": 1, "connect": {}}))
    msg = await asyncio.wait_for(ws.receive(), WAIT)
    assert "connect" in json.loads(msg.data.splitlines()[0]), msg.data
    return session, ws


async def replies(ws: Any, ids: set[int]) -> dict[int, dict[str, Any]]:
    """Read frames until a reply for each of `ids` arrived; they may come in any order."""
    got: dict[int, dict[str, Any]] = {}
    while set(got) != ids:
        msg = await asyncio.wait_for(ws.receive(), WAIT)
        assert msg.type == aiohttp.WSMsgType.TEXT, (msg.type, msg.extra)
        for line in msg.data.splitlines():
            reply = json.loads(line)
            if reply.get("id") in ids:
                got[reply["id"]] = reply
    return got


def server_with(server_factory: ServerFactory, backend: ProxyBackend, n: int) -> ServerProcess:
    return server_factory(
        {
            "client_concurrency": n,
            "allow_anonymous_connect_without_token": True,
            "allow_subscribe_for_client": True,
            "allow_subscribe_for_anonymous": True,
            "proxy_rpc_endpoint": backend.url("rpc"),
            "proxy_rpc_timeout": "5s",
        }
    )


def rpc(i: int) -> str:
    return json.dumps({"id": i, "rpc": {"method": "m", "data": {"i": i}}})


@pytest.mark.parametrize("n, expected_most", [(0, 1), (1, 1), (4, 4)])
async def test_rpc_calls_of_one_frame_run_up_to_client_concurrency_at_once(
    server_factory: ServerFactory, backend: ProxyBackend, n: int, expected_most: int
) -> None:
    gauge = Gauge()
    backend.answers["rpc"] = gauge.rpc
    server = server_with(server_factory, backend, n)
    session, ws = await open_ws(server)
    try:
        ids = set(range(2, 2 + CALLS))
        await ws.send_str("\n".join(rpc(i) for i in sorted(ids)))
        got = await replies(ws, ids)
    finally:
        await session.close()
    assert {i: r["rpc"]["data"]["echo"]["i"] for i, r in got.items()} == {i: i for i in ids}
    assert gauge.most == expected_most


async def test_commands_of_separate_frames_also_overlap(
    server_factory: ServerFactory, backend: ProxyBackend
) -> None:
    gauge = Gauge()
    backend.answers["rpc"] = gauge.rpc
    server = server_with(server_factory, backend, 3)
    session, ws = await open_ws(server)
    try:
        ids = set(range(2, 2 + CALLS))
        for i in sorted(ids):
            await ws.send_str(rpc(i))
        got = await replies(ws, ids)
    finally:
        await session.close()
    assert set(got) == ids and all("rpc" in r for r in got.values())
    assert gauge.most == 3


async def test_commands_on_one_channel_keep_their_order(
    server_factory: ServerFactory, backend: ProxyBackend
) -> None:
    server = server_with(server_factory, backend, 8)
    session, ws = await open_ws(server)
    try:
        frame = [
            {"id": 2, "subscribe": {"channel": "room"}},
            {"id": 3, "unsubscribe": {"channel": "room"}},
            {"id": 4, "subscribe": {"channel": "room"}},
            {"id": 5, "subscribe": {"channel": "other"}},
        ]
        await ws.send_str("\n".join(json.dumps(c) for c in frame))
        got = await replies(ws, {2, 3, 4, 5})
        channels = (await server.api_async("channels", {}))["result"]["channels"]
    finally:
        await session.close()
    # In order per channel: subscribed, unsubscribed, subscribed again (never 105 "already
    # subscribed", which a subscribe overtaking the unsubscribe would get), so it ends
    # subscribed to both channels.
    assert all("error" not in r for r in got.values()), got
    assert channels["room"]["num_clients"] == 1 and channels["other"]["num_clients"] == 1
