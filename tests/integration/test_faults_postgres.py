"""PostgreSQL outage (issue 16, item 1), on a PRIVATE cluster stopped with `pg_ctl stop -m
immediate` and started again on the same port and data directory (never the machine's shared
PostgreSQL, which other tests use).

- The event log's pool: after the restart no append fails on a connection the restart killed.
- Two nodes on engine `postgresql` (event log, LISTEN/NOTIFY broker and presence all in the
  private cluster), and on engine `redis` with the log alone in it: while it is down,
  publishes (API and client) get error 100, reads and subscribes answer errors and clients
  stay connected; once it is back publishing succeeds within seconds, every acknowledged
  publication is stored, and every subscriber (live ones, a raw one that recovers after
  reconnecting, and centrifuge-python reconnected during the outage) sees every stored
  offset exactly once, in order; `info` shows both nodes with exactly our clients; both
  processes are alive.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from centrifuge import Client as SdkClient

from centripy.engine.contracts import AppendRequest, HistoryQuery, StorageError
from centripy.storage.postgres import PostgresEventLog
from tests.integration.outage_support import Publisher, subscribed
from tests.integration.test_cluster import Client
from tests.integration.test_websocket_sdks import ClientEvents, SubEvents
from tests.support.private_servers import PrivatePostgres
from tests.support.server import ServerFactory, port_accepts
from tests.support.services import redis_url
from tests.support.wait import eventually

pytestmark = [pytest.mark.integration, pytest.mark.timeout(150)]

OUTAGE = 2.0  # seconds the database stays down
BACK_WITHIN = 10.0  # seconds after the restart by which publishing must succeed again
WITHIN = 30.0

NAMESPACE = {
    "name": "room",
    "history_size": 10000,
    "history_ttl": "600s",
    "force_recovery": True,
    "presence": True,
    "allow_subscribe_for_client": True,
    "allow_publish_for_subscriber": True,
    "allow_history_for_subscriber": True,
    "allow_presence_for_subscriber": True,
}


@pytest.fixture(scope="module")
def pg() -> Iterator[PrivatePostgres]:
    server = PrivatePostgres()
    server.start()
    yield server
    print(server.log_tail())
    server.close()


@pytest.fixture
def restart_pg(pg: PrivatePostgres) -> Iterator[PrivatePostgres]:
    """The shared cluster, up again after the test whatever happened."""
    yield pg
    if not port_accepts("127.0.0.1", pg.port):
        pg.start()


def _request(i: int) -> AppendRequest:
    return AppendRequest(
        "pool", b'{"i":%d}' % i, history_size=1000, history_ttl=600.0, meta_ttl=3600.0
    )


async def test_the_event_log_pool_replaces_connections_a_restart_killed(
    restart_pg: PrivatePostgres,
) -> None:
    pg = restart_pg
    log = PostgresEventLog(pg.url, table_prefix=f"t{uuid.uuid4().hex[:8]}_", gc_interval=None)
    await log.start()
    try:
        # Several pooled connections, all of which the restart kills.
        await asyncio.gather(*(log.append_many([_request(i)]) for i in range(8)))
        assert log.engine.pool.checkedin() >= 4  # type: ignore[attr-defined]
        await asyncio.to_thread(pg.stop)
        with pytest.raises(StorageError):
            await log.append_many([_request(100)])
        await asyncio.to_thread(pg.start)
        # Not one failure per stale connection: none at all (they are dropped at checkout).
        for i in range(10):
            await asyncio.gather(*(log.append_many([_request(200 + i)]) for _ in range(4)))
        res = await log.history(HistoryQuery("pool", -1, None, False, 3600.0))
        assert [p.offset for p in res.publications] == list(range(1, 49))
        # A restart while idle: the first use after it does not fail either.
        await asyncio.to_thread(pg.stop)
        await asyncio.to_thread(pg.start)
        await asyncio.gather(*(log.append_many([_request(300)]) for _ in range(4)))
    finally:
        await log.close()


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


@pytest.mark.parametrize("engine", ["postgresql", "redis"])
async def test_two_nodes_ride_out_a_postgresql_restart(
    server_factory: ServerFactory,
    restart_pg: PrivatePostgres,
    clients: list[Client],
    sdk_clients: list[SdkClient],
    make_token: Any,
    engine: str,
) -> None:
    """engine postgresql: the log, broker and presence go down together; engine redis
    (the machine's Redis, not broken): only the log does."""
    pg = restart_pg
    tag = f"t{uuid.uuid4().hex[:10]}"
    config: dict[str, Any] = {
        "engine": engine,
        "database_url": pg.url,
        "namespaces": [NAMESPACE],
        "allow_subscribe_for_client": True,
    }
    if engine == "redis":
        config.update(redis_address=redis_url().removeprefix("redis://"), redis_prefix=tag)
    else:
        config["postgresql_prefix"] = tag
    a, b = server_factory(config), server_factory(config)
    channel = f"room:{uuid.uuid4().hex[:8]}"
    live = [
        await subscribed(clients, node, make_token(f"u{i}"), channel)
        for i, node in enumerate((a, b, a, b))
    ]
    leaver = await subscribed(clients, b, make_token("leaver"), channel)
    # centrifuge-python, recovering: reconnected during the outage, it resubscribes (the
    # temporary 100 makes it retry) and recovers what it missed once the database is back.
    sdk_events, sdk_sub = ClientEvents(), SubEvents()
    sdk = SdkClient(b.ws_url, events=sdk_events, token=make_token("sdk"), proxy=None)
    sdk_clients.append(sdk)
    subscription = sdk.new_subscription(channel, events=sdk_sub, max_resubscribe_delay=1.0)
    await sdk.connect()
    await sdk.ready(timeout=WITHIN)
    await subscription.subscribe()
    await sdk_sub.wait_for("subscribed", within=WITHIN)
    publisher = Publisher([a, b], channel)
    task = asyncio.create_task(publisher.run())
    await eventually(lambda: len(publisher.acked) >= 20, WITHIN, "20 publications before")
    await eventually(lambda: len(leaver.offsets(channel)) >= 10, WITHIN, changed=leaver.changed)
    position = leaver.pushes[-1]["pub"]["offset"]
    epoch = a.api_result("history", {"channel": channel})["epoch"]
    await leaver.close()
    clients.remove(leaver)

    await asyncio.to_thread(pg.stop)
    down_at = time.monotonic()
    before = len(publisher.failed)
    await eventually(lambda: len(publisher.failed) > before, WITHIN, "a publish refused")
    assert set(publisher.failed.values()) == {100}, publisher.failed
    # A client's publish, history read, presence read and new subscribe: error replies.
    reply = await live[0].call("publish", {"channel": channel, "data": {"client": 1}})
    assert reply["error"] == {"code": 100, "message": "internal server error", "temporary": True}
    reply = await live[1].call("history", {"channel": channel})
    assert reply["error"]["code"] == 100, reply
    assert a.api("history", {"channel": channel})["error"]["code"] == 100
    presence = await live[1].call("presence", {"channel": channel})
    if engine == "postgresql":
        assert presence["error"]["code"] == 100, presence
        assert b.api("presence", {"channel": channel})["error"]["code"] == 100
    else:  # presence lives in Redis, which is up
        assert len(presence["presence"]["presence"]) == 5, presence  # 4 live + the SDK
    newcomer = await Client.connect(a, make_token("newcomer"))
    clients.append(newcomer)
    reply = await newcomer.call("subscribe", {"channel": channel})
    assert reply["error"]["code"] == 100, reply
    fresh = f"room:{uuid.uuid4().hex[:8]}"  # no subscriber on the node yet: its actor's Init fails
    reply = await newcomer.call("subscribe", {"channel": fresh})
    assert reply["error"]["code"] == 100, reply
    b.api_result("disconnect", {"user": "sdk", "disconnect": {"code": 4000, "reason": "go"}})
    await sdk_sub.wait_for("error", within=WITHIN)  # its resubscribe met the outage
    await asyncio.sleep(max(0.0, OUTAGE - (time.monotonic() - down_at)))

    await asyncio.to_thread(pg.start)
    up_at = time.monotonic()
    acked_before = len(publisher.acked)
    await eventually(
        lambda: len(publisher.acked) >= acked_before + 1, BACK_WITHIN, "publishing again"
    )
    first_ok = min(t for t in publisher.acked_at.values() if t >= up_at) - up_at
    print(f"first acknowledged publish {first_ok:.2f} s after the restart")
    await eventually(lambda: len(publisher.acked) >= acked_before + 30, WITHIN, "30 more")
    publisher.stop = True
    await task
    # Once one publish succeeded again, none failed (no stale connection left to fail).
    first_back = min(i for i, at in publisher.acked_at.items() if at >= up_at)
    failed_after = [i for i in publisher.failed if i > first_back]
    assert not failed_after, failed_after

    # The newcomer's failed subscribe left nothing behind: it subscribes now (not 105).
    for name in (channel, fresh):
        reply = await newcomer.call("subscribe", {"channel": name})
        assert "subscribe" in reply, reply

    # Acknowledged = stored (with the same data at the same offset), stored is 1..top.
    history = a.api_result("history", {"channel": channel, "limit": -1})
    stored = {p["offset"]: p["data"]["i"] for p in history["publications"]}
    top = history["offset"]
    assert sorted(stored) == list(range(1, top + 1))
    for i, offset in publisher.acked.items():
        assert stored[offset] == i, (i, offset)
    unacked = sorted(set(stored.values()) - set(publisher.acked))
    # A commit whose reply the immediate stop cut off may be stored though reported failed.
    assert set(unacked) <= set(publisher.failed), unacked
    print(
        f"acked {len(publisher.acked)}, failed {len(publisher.failed)}, stored {top}, "
        f"stored but reported failed {unacked}"
    )

    # Every live subscriber got every stored offset exactly once, in order, and is connected.
    for sub in live:
        await eventually(lambda s=sub: len(s.offsets(channel)) >= top, WITHIN, changed=sub.changed)
        assert sub.offsets(channel) == list(range(1, top + 1))
        assert sub.closed is None
    # The one that left before the outage recovers exactly the rest.
    back = await Client.connect(b, make_token("leaver"))
    clients.append(back)
    reply = await back.call(
        "subscribe", {"channel": channel, "recover": True, "offset": position, "epoch": epoch}
    )
    result = reply["subscribe"]
    assert result.get("recovered") is True, result
    assert [p["offset"] for p in result["publications"]] == list(range(position + 1, top + 1))

    # The SDK recovered: each offset once, in order, the last subscribe a recovery.
    await eventually(lambda: len(sdk_sub.offsets()) >= top, WITHIN, "the SDK has everything")
    assert sdk_sub.offsets() == list(range(1, top + 1))
    last = sdk_sub.of("subscribed")[-1]
    assert len(sdk_sub.of("subscribed")) == 2 and last.was_recovering and last.recovered

    # `info`: both nodes, exactly our connections (no zombie); both processes alive.
    def info_counts() -> list[int]:
        nodes = a.api_result("info", {})["nodes"]
        return sorted(n["num_clients"] for n in nodes) if len(nodes) == 2 else []

    expected = [3, 4]  # a: two live + the newcomer; b: two live + the one back + the SDK
    await eventually(lambda: info_counts() == expected, WITHIN, "info counts", interval=0.3)
    assert a.running and b.running
