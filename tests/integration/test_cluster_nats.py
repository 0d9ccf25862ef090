"""Several centripy nodes on `broker: nats` (the machine's NATS, a unique subject prefix per
test), sharing one PostgreSQL event log, presence on Redis or PostgreSQL: the multi-node
tests of test_cluster.py (imported, run here with a NATS `cluster_config`), plus a node
losing its NATS connection while every node publishes.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.integration.test_cluster import (
    Client,
    _client,
    _engine_config,
    clients,
    test_api_disconnect_reaches_a_user_on_another_node,
    test_clients_of_a_killed_node_recover_on_another,
    test_every_subscriber_on_every_node_sees_offsets_in_order,
    test_presence_join_leave_and_info_across_nodes,
    test_publications_without_history_keep_publish_order_across_nodes,
)
from tests.support.server import ServerFactory, ServerProcess
from tests.support.services import nats_url
from tests.support.tcp_proxy import TcpProxy
from tests.support.wait import eventually

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

IMPORTED = (
    clients,
    test_api_disconnect_reaches_a_user_on_another_node,
    test_clients_of_a_killed_node_recover_on_another,
    test_every_subscriber_on_every_node_sees_offsets_in_order,
    test_presence_join_leave_and_info_across_nodes,
    test_publications_without_history_keep_publish_order_across_nodes,
)


def nats_config(presence_engine: str, url: str = "") -> dict[str, Any]:
    """`broker: nats` over `presence_engine` (redis or postgresql), a fresh prefix."""
    return {
        **_engine_config(presence_engine),
        "broker": "nats",
        "nats_url": url or nats_url(),
        "nats_prefix": f"t{uuid.uuid4().hex[:10]}",
    }


@pytest.fixture(params=["redis", "postgresql"])
def cluster_config(request: pytest.FixtureRequest) -> dict[str, Any]:
    return nats_config(request.param)


@pytest.fixture
async def proxies() -> AsyncIterator[list[TcpProxy]]:
    made: list[TcpProxy] = []
    yield made
    for proxy in made:
        await proxy.close()


async def test_a_node_losing_nats_while_every_node_publishes_loses_nothing(
    server_factory: ServerFactory,
    clients: list[Client],
    proxies: list[TcpProxy],
    make_token: Any,
) -> None:
    """Each node reaches NATS through its own proxy; node 0's connection is cut twice while
    all three publish: every subscriber still sees offsets 1..n once, in order (gap fill
    from the log after the reconnect)."""
    nats_url()  # skip (or fail under CI) without NATS
    for _ in range(3):
        proxies.append(await TcpProxy("127.0.0.1", 4222).start())
    base = nats_config("redis")
    nodes: list[ServerProcess] = []
    for proxy in proxies:
        config = {**base, "nats_url": proxy.url}
        nodes.append(await asyncio.to_thread(server_factory, config))
    channel = f"room:{uuid.uuid4().hex[:8]}"
    subs = [
        await _client(clients, node, make_token(f"u{i}"), channel)
        for i, node in enumerate(nodes * 2)
    ]
    total = 240

    async def publish_via(k: int) -> None:
        for i in range(k, total, len(nodes)):
            reply = await nodes[k].api_async("publish", {"channel": channel, "data": {"i": i}})
            assert "error" not in reply, reply
            if i in (60, 150):
                cuts = 1 if i == 60 else 2
                await eventually(lambda n=cuts: proxies[0].accepted >= n, 30, "connected")
                proxies[0].cut()

    await asyncio.gather(*(publish_via(k) for k in range(len(nodes))))
    await eventually(lambda: proxies[0].accepted >= 3, 30, "node 0 reconnected after each cut")
    for sub in subs:
        await eventually(lambda s=sub: len(s.offsets(channel)) >= total, 30, changed=sub.changed)
        assert sub.offsets(channel) == list(range(1, total + 1))


async def test_info_counts_the_nodes_of_one_prefix_only(server_factory: ServerFactory) -> None:
    """Heartbeats travel on `<nats_prefix>.control`: a cluster under another prefix on the
    same NATS is not seen."""
    first = nats_config("redis")
    a, b = server_factory(first), server_factory(first)
    stranger = server_factory(nats_config("redis"))

    def uids() -> list[str]:
        found = [n["uid"] for n in a.api_result("info", {})["nodes"]]
        return found if len(found) >= 2 else []

    await eventually(uids, 15, "both nodes of the prefix", interval=0.2)

    def stranger_beat_twice() -> bool:
        (node,) = stranger.api_result("info", {})["nodes"]
        return bool(node.get("uptime", 0) >= 4)  # heartbeats go out every 3 s from start-up

    await eventually(stranger_beat_twice, 15, "the other cluster's node ran 4 s", interval=0.3)
    assert sorted(n["uid"] for n in a.api_result("info", {})["nodes"]) == sorted(uids())
    assert len(a.api_result("info", {})["nodes"]) == 2
    assert len(b.api_result("info", {})["nodes"]) == 2
