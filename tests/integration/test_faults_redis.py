"""Redis outage (issue 16, item 2), on a PRIVATE `redis-server` killed with SIGKILL and
started again on the same port (never the machine's shared Redis, which other tests use).

Two nodes on engine `redis` sharing one PostgreSQL event log. While Redis is down, publishes
still commit to the log and are acknowledged; cross-node delivery stops and presence answers
error 100 (a reply, not a crash). When Redis is back, the brokers reconnect with backoff and
resubscribe, and every subscriber ends with every acknowledged publication exactly once and
in order (the sequencer fills gaps from the shared log); `info` lists both nodes again with
exactly our clients; both processes are alive.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from centrifuge import Client as SdkClient

from tests.integration.outage_support import Publisher, subscribed
from tests.integration.test_cluster import Client
from tests.integration.test_websocket_sdks import ClientEvents, SubEvents
from tests.support.private_servers import PrivateRedis
from tests.support.server import ServerFactory
from tests.support.services import postgres_url
from tests.support.wait import eventually

pytestmark = [pytest.mark.integration, pytest.mark.timeout(150)]

OUTAGE = 2.0  # seconds Redis stays down
WITHIN = 30.0

NAMESPACE = {
    "name": "room",
    "history_size": 10000,
    "history_ttl": "600s",
    "force_recovery": True,
    "presence": True,
    "allow_subscribe_for_client": True,
    "allow_publish_for_subscriber": True,
    "allow_presence_for_subscriber": True,
}
FEED = {
    "name": "feed",
    "history_size": 1000,
    "history_ttl": "600s",
    "force_recovery": True,
    "allow_subscribe_for_client": True,
}


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.close()


@pytest.fixture
def redis(redis_server: PrivateRedis) -> Iterator[PrivateRedis]:
    """The shared private Redis, up again after the test whatever happened."""
    yield redis_server
    redis_server.start()


@pytest.fixture
async def clients() -> AsyncIterator[list[Client]]:
    made: list[Client] = []
    yield made
    for client in made:
        await client.close()


@pytest.fixture
async def sdk_clients() -> AsyncIterator[list[SdkClient]]:
    made: list[SdkClient] = []
    yield made
    for client in made:
        await client.disconnect()


async def test_two_nodes_ride_out_a_redis_kill(
    server_factory: ServerFactory,
    redis: PrivateRedis,
    clients: list[Client],
    sdk_clients: list[SdkClient],
    make_token: Any,
) -> None:
    config = {
        "engine": "redis",
        "redis_address": redis.address,
        "redis_prefix": f"t{uuid.uuid4().hex[:10]}",
        "database_url": postgres_url(),  # the shared log (not broken by this test)
        "namespaces": [NAMESPACE, FEED],
        "allow_subscribe_for_client": True,
        # Killed Redis lost every presence entry: clients re-add theirs on this tick.
        "client_presence_update_interval": "1s",
    }
    a, b = server_factory(config), server_factory(config)
    channel = f"room:{uuid.uuid4().hex[:8]}"
    live = [
        await subscribed(clients, node, make_token(f"u{i}"), channel)
        for i, node in enumerate((a, b, a, b))
    ]
    # centrifuge-python, recovering: reconnected during the outage, its resubscribes fail
    # (presence is in Redis: temporary 100) until Redis is back, then it recovers.
    sdk_sub = SubEvents()
    sdk = SdkClient(b.ws_url, events=ClientEvents(), token=make_token("sdk"), proxy=None)
    sdk_clients.append(sdk)
    subscription = sdk.new_subscription(channel, events=sdk_sub, max_resubscribe_delay=1.0)
    await sdk.connect()
    await sdk.ready(timeout=WITHIN)
    await subscription.subscribe()
    await sdk_sub.wait_for("subscribed", within=WITHIN)
    publisher = Publisher([a, b], channel)
    task = asyncio.create_task(publisher.run())
    await eventually(lambda: len(publisher.acked) >= 20, WITHIN, "20 publications before")

    await asyncio.to_thread(redis.kill)
    killed_at = time.monotonic()
    acked_before = len(publisher.acked)
    # The log is up: publishing goes on (acknowledged), only cross-node delivery stops.
    await eventually(lambda: len(publisher.acked) >= acked_before + 10, WITHIN, "publishing on")
    # Presence lives in Redis: error replies, and the connections stay.
    reply = await live[0].call("presence", {"channel": channel})
    assert reply["error"]["code"] == 100, reply
    reply = await live[1].call("presence_stats", {"channel": channel})
    assert reply["error"]["code"] == 100, reply
    assert a.api("presence", {"channel": channel})["error"]["code"] == 100
    # A subscribe needing presence fails cleanly (100), and can be made again later.
    newcomer = await Client.connect(b, make_token("newcomer"))
    clients.append(newcomer)
    fresh = f"room:{uuid.uuid4().hex[:8]}"
    reply = await newcomer.call("subscribe", {"channel": fresh})
    assert reply["error"]["code"] == 100, reply
    # Without presence it succeeds (the log is up); the broker subscribes it on reconnect.
    feed = f"feed:{uuid.uuid4().hex[:8]}"
    reply = await newcomer.call("subscribe", {"channel": feed})
    assert "subscribe" in reply, reply
    b.api_result("disconnect", {"user": "sdk", "disconnect": {"code": 4000, "reason": "go"}})
    await sdk_sub.wait_for("error", within=WITHIN)  # its resubscribe met the outage
    await asyncio.sleep(max(0.0, OUTAGE - (time.monotonic() - killed_at)))

    await asyncio.to_thread(redis.start)
    up_at = time.monotonic()
    print(f"redis killed at {time.time() - (up_at - killed_at):.3f}, back at {time.time():.3f}")
    acked_at_restart = len(publisher.acked)

    def presence_back() -> bool:
        reply = a.api("presence", {"channel": channel})
        return "result" in reply

    await eventually(presence_back, WITHIN, "presence answers again", interval=0.1)
    print(f"presence back {time.monotonic() - up_at:.2f} s after the restart")
    await eventually(lambda: len(publisher.acked) >= acked_at_restart + 30, WITHIN, "30 more")
    publisher.stop = True
    await task

    assert not publisher.failed, publisher.failed  # the log never failed: all acknowledged
    history = a.api_result("history", {"channel": channel, "limit": -1})
    stored = {p["offset"]: p["data"]["i"] for p in history["publications"]}
    top = history["offset"]
    assert sorted(stored) == list(range(1, top + 1))
    assert {offset: i for i, offset in publisher.acked.items()} == stored  # acked = stored

    started = time.monotonic()
    for sub in live:
        await eventually(lambda s=sub: len(s.offsets(channel)) >= top, WITHIN, changed=sub.changed)
        assert sub.offsets(channel) == list(range(1, top + 1))
        assert sub.closed is None
    print(f"subscribers complete {time.monotonic() - started:.2f} s after the last publish")
    await eventually(lambda: len(sdk_sub.offsets()) >= top, WITHIN, "the SDK has everything")
    assert sdk_sub.offsets() == list(range(1, top + 1))
    last = sdk_sub.of("subscribed")[-1]
    assert len(sdk_sub.of("subscribed")) == 2 and last.was_recovering and last.recovered

    # Cross-node delivery resumed: a publication on a reaches b's subscribers at once
    # (not by a later gap fill: nothing follows it).
    a.api_result("publish", {"channel": channel, "data": {"i": -1}})
    for sub in live:
        await eventually(lambda s=sub: len(s.offsets(channel)) == top + 1, 5, changed=sub.changed)

    # Presence and `info` again list everyone, and only them.
    def present() -> list[str]:
        presence = b.api_result("presence", {"channel": channel})["presence"]
        return sorted(v["user"] for v in presence.values())

    everyone = ["sdk", "u0", "u1", "u2", "u3"]
    await eventually(lambda: present() == everyone, WITHIN, "presence re-added", interval=0.2)

    def info_counts() -> list[int]:
        nodes = a.api_result("info", {})["nodes"]
        return sorted(n["num_clients"] for n in nodes) if len(nodes) == 2 else []

    # The newcomer's channel, subscribed after the restart, gets a's publications via Redis.
    reply = await newcomer.call("subscribe", {"channel": fresh})
    assert "subscribe" in reply, reply
    a.api_result("publish", {"channel": fresh, "data": {"i": 0}})
    await eventually(lambda: newcomer.offsets(fresh) == [1], 5, changed=newcomer.changed)
    a.api_result("publish", {"channel": feed, "data": {"i": 0}})
    await eventually(lambda: newcomer.offsets(feed) == [1], 5, changed=newcomer.changed)

    # a: two live; b: two live, the newcomer and the SDK
    await eventually(lambda: info_counts() == [2, 4], WITHIN, "info lists both", interval=0.3)
    assert a.running and b.running
