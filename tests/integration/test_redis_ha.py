"""Redis high availability and TLS with real servers started here (issue 21, item 2):

* a private Sentinel set (one master, one replica, three sentinels) behind three centripy
  nodes, the master SIGKILLed while every node publishes: failover to the replica;
* a private three-master Redis Cluster behind three nodes (sharded PUB/SUB, hash-tagged
  presence keys);
* a TLS-only private Redis with a throwaway CA and client certificates, set through the
  `redis_tls*` keys.

Subscribers on every node, publications through every node (one PostgreSQL event log): every
subscriber ends with every acknowledged publication exactly once, in order, offsets gapless
(across the failover too: what PUB/SUB lost is filled from the log).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_cluster import Client
from tests.integration.test_faults_redis import NAMESPACE, Publisher
from tests.support.private_servers import (
    PrivateRedisCluster,
    PrivateSentinelSet,
    PrivateTLSRedis,
    ThrowawayPKI,
)
from tests.support.server import ServerFactory, ServerProcess
from tests.support.services import postgres_url
from tests.support.wait import eventually

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

WITHIN = 40.0


@pytest.fixture
async def clients() -> AsyncIterator[list[Client]]:
    made: list[Client] = []
    yield made
    for client in made:
        await client.close()


@pytest.fixture
def sentinels(tmp_path: Path) -> Iterator[PrivateSentinelSet]:
    group = PrivateSentinelSet(tmp_path / "sentinel")
    group.start()
    yield group
    group.close()


@pytest.fixture
def redis_cluster(tmp_path: Path) -> Iterator[PrivateRedisCluster]:
    group = PrivateRedisCluster(tmp_path / "cluster")
    group.start()
    yield group
    group.close()


def _config(**redis: Any) -> dict[str, Any]:
    return {
        "engine": "redis",
        "redis_prefix": f"t{uuid.uuid4().hex[:10]}",
        "database_url": postgres_url(),
        "namespaces": [NAMESPACE],
        "client_presence_update_interval": "1s",
        **redis,
    }


async def _subscribers(
    clients: list[Client], nodes: list[ServerProcess], channels: list[str], make_token: Any
) -> list[Client]:
    """Two subscribers per node, each in every channel."""
    subs = []
    for i, node in enumerate(nodes * 2):
        client = await Client.connect(node, make_token(f"u{i}"))
        clients.append(client)
        for channel in channels:
            reply = await client.call("subscribe", {"channel": channel})
            assert "subscribe" in reply, reply
        subs.append(client)
    return subs


async def _check_everyone_has_everything(
    nodes: list[ServerProcess], subs: list[Client], publishers: list[Publisher]
) -> None:
    for publisher in publishers:
        assert not publisher.failed, publisher.failed  # the log never failed: all acked
        channel = publisher.channel
        history = nodes[0].api_result("history", {"channel": channel, "limit": -1})
        stored = {p["offset"]: p["data"]["i"] for p in history["publications"]}
        top = history["offset"]
        assert sorted(stored) == list(range(1, top + 1))
        assert {offset: i for i, offset in publisher.acked.items()} == stored  # acked = stored
        for sub in subs:
            await eventually(
                lambda s=sub, c=channel, t=top: len(s.offsets(c)) >= t, WITHIN, changed=sub.changed
            )
            assert sub.offsets(channel) == list(range(1, top + 1)), channel
            assert sub.closed is None


async def _cross_node_delivery_is_live(
    nodes: list[ServerProcess], subs: list[Client], channel: str
) -> None:
    """One more publication through each node reaches every subscriber at once (not by a
    later gap fill: nothing follows the last one)."""
    top = nodes[0].api_result("history", {"channel": channel, "limit": 0})["offset"]
    for node in nodes:
        node.api_result("publish", {"channel": channel, "data": {"i": -1}})
        top += 1
        for sub in subs:
            await eventually(
                lambda s=sub, t=top: len(s.offsets(channel)) == t, 5, changed=sub.changed
            )


async def test_three_nodes_ride_out_a_sentinel_failover(
    server_factory: ServerFactory,
    sentinels: PrivateSentinelSet,
    clients: list[Client],
    make_token: Any,
) -> None:
    config = _config(
        redis_sentinel_address=sentinels.sentinel_addresses,
        redis_sentinel_master_name=sentinels.name,
    )
    nodes = [server_factory(config) for _ in range(3)]
    channel = f"room:{uuid.uuid4().hex[:8]}"
    subs = await _subscribers(clients, nodes, [channel], make_token)
    publisher = Publisher(nodes, channel)
    task = asyncio.create_task(publisher.run())
    try:
        await eventually(lambda: len(publisher.acked) >= 30, WITHIN, "30 publications before")
        old = sentinels.master_port()
        killed_at = time.monotonic()
        new = await asyncio.to_thread(sentinels.kill_master)
        print(f"failover {old} -> {new} in {time.monotonic() - killed_at:.2f} s")
        assert new != old
        acked_at_failover = len(publisher.acked)

        def presence_back() -> bool:
            return "result" in nodes[1].api("presence", {"channel": channel})

        await eventually(presence_back, WITHIN, "presence answers again", interval=0.1)
        await eventually(
            lambda: len(publisher.acked) >= acked_at_failover + 30, WITHIN, "30 more after"
        )
    finally:
        publisher.stop = True
        await task
    await _check_everyone_has_everything(nodes, subs, [publisher])
    await _cross_node_delivery_is_live(nodes, subs, channel)

    def present() -> list[str]:
        presence = nodes[2].api_result("presence", {"channel": channel})["presence"]
        return sorted(v["user"] for v in presence.values())

    everyone = sorted(f"u{i}" for i in range(6))
    await eventually(lambda: present() == everyone, WITHIN, "presence re-added", interval=0.2)
    assert all(node.running for node in nodes)


async def test_three_nodes_on_a_three_master_cluster(
    server_factory: ServerFactory,
    redis_cluster: PrivateRedisCluster,
    clients: list[Client],
    make_token: Any,
) -> None:
    config = _config(redis_cluster_address=[",".join(redis_cluster.addresses[:2])])  # seeds
    nodes = [server_factory(config) for _ in range(3)]
    channels = [f"room:{uuid.uuid4().hex[:8]}" for _ in range(6)]  # spread over the masters
    subs = await _subscribers(clients, nodes, channels, make_token)
    publishers = [Publisher(nodes[i % 3 :] + nodes[: i % 3], ch) for i, ch in enumerate(channels)]
    tasks = [asyncio.create_task(p.run()) for p in publishers]
    try:
        await eventually(
            lambda: all(len(p.acked) >= 20 for p in publishers), WITHIN, "20 per channel"
        )
    finally:
        for publisher in publishers:
            publisher.stop = True
        await asyncio.gather(*tasks)
    await _check_everyone_has_everything(nodes, subs, publishers)
    await _cross_node_delivery_is_live(nodes, subs, channels[0])
    presence = nodes[1].api_result("presence", {"channel": channels[3]})["presence"]
    assert sorted(v["user"] for v in presence.values()) == sorted(f"u{i}" for i in range(6))
    # a join reaches the other nodes' subscribers (join_leave over sharded PUB/SUB)
    info = nodes[0].api_result("info", {})
    assert len(info["nodes"]) == 3


async def test_two_nodes_through_tls_redis_with_client_certificates(
    server_factory: ServerFactory,
    tmp_path: Path,
    clients: list[Client],
    make_token: Any,
) -> None:
    pki = ThrowawayPKI.create(tmp_path / "pki")
    redis = PrivateTLSRedis(tmp_path / "redis", pki, auth_clients="yes")
    redis.start()
    try:
        config = _config(
            redis_address=[redis.address],
            redis_tls=True,
            redis_tls_cert=str(pki.client_cert),
            redis_tls_key=str(pki.client_key),
            redis_tls_root_ca_pem=pki.ca.read_text(),
            redis_tls_server_name="localhost",
        )
        nodes = [server_factory(config) for _ in range(2)]
        channel = f"room:{uuid.uuid4().hex[:8]}"
        subs = await _subscribers(clients, nodes, [channel], make_token)
        await _cross_node_delivery_is_live(nodes, subs, channel)
        presence = nodes[1].api_result("presence", {"channel": channel})["presence"]
        assert len(presence) == 4
    finally:
        redis.close()
