"""The Protobuf variant over WebSocket with centrifuge-python's `use_protobuf=True`."""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING

import pytest

from tests.integration.test_websocket_sdks import (
    CONFIG,
    PyConnect,
    js_of,
    js_results,
    js_scenario,
    py_connect,  # noqa: F401  (fixture)
)
from tests.support.server import ServerFactory

if TYPE_CHECKING:
    from tests.integration.conftest import JsClient, TokenMaker

pytestmark = [pytest.mark.integration, pytest.mark.timeout(30)]


async def test_protobuf_publish_presence_history_and_recovery(
    server_factory: ServerFactory,
    make_token: TokenMaker,
    py_connect: PyConnect,  # noqa: F811
) -> None:
    server = server_factory(CONFIG)
    conn = await py_connect(server, make_token("42"), use_protobuf=True)
    sub, events = await conn.subscribe("chat:pb", recoverable=True)
    for n in (1, 2):
        await server.api_async("publish", {"channel": "chat:pb", "data": {"n": n}})
    await events.wait_count("publication", 2)
    await sub.publish(b'{"n":3}')  # protobuf clients send bytes
    await events.wait_count("publication", 3)
    assert events.offsets() == [1, 2, 3]
    presence = await sub.presence()
    assert [info.user for info in presence.clients.values()] == ["42"]
    history = await sub.history(limit=10)
    assert [p.offset for p in history.publications] == [1, 2, 3]

    await conn.client.disconnect()
    for n in range(4, 7):
        await server.api_async("publish", {"channel": "chat:pb", "data": {"n": n}})
    await conn.client.connect()
    resubscribed = await events.wait_for("subscribed", lambda ctx: ctx.was_recovering)
    assert resubscribed.recovered is True
    await events.wait_count("publication", 6)
    assert events.offsets() == [1, 2, 3, 4, 5, 6]
    assert [json.loads(ctx.pub.data)["n"] for ctx in events.of("publication")] == [1, 2, 3, 4, 5, 6]


async def test_protobuf_client_answers_pings_and_stays_connected(
    server_factory: ServerFactory,
    make_token: TokenMaker,
    py_connect: PyConnect,  # noqa: F811
) -> None:
    """The SDK answers each ping with a pong (the frame `0x00`, which the connection actor
    handles without decoding): through three pings and their 0.5 s pong waits it stays
    connected and subscribed."""
    server = server_factory({**CONFIG, "ping_interval": "1s", "pong_timeout": "500ms"})
    conn = await py_connect(server, make_token("42"), use_protobuf=True)
    _, events = await conn.subscribe("chat:pings")
    await asyncio.sleep(3.6)
    assert conn.events.of("disconnected") == [] and len(conn.events.of("connecting")) == 1
    await server.api_async("publish", {"channel": "chat:pings", "data": {"n": 1}})
    await events.wait_count("publication", 1)


async def test_protobuf_bad_token_is_terminal(
    server_factory: ServerFactory,
    py_connect: PyConnect,  # noqa: F811
) -> None:
    server = server_factory(CONFIG)
    conn = await py_connect(server, "bad-token", wait=False, use_protobuf=True)
    disconnected = await conn.events.wait_for("disconnected")
    assert disconnected.code == 3500


def test_js_protobuf_build_publishes_and_receives(
    server_factory: ServerFactory, make_token: TokenMaker, js_client: JsClient
) -> None:
    server = server_factory(CONFIG)
    steps = [
        {"op": "connect"},
        {"op": "subscribe", "channel": "chat:jspb"},
        {"op": "api", "method": "publish", "payload": {"channel": "chat:jspb", "data": {"n": 1}}},
        {"op": "publish", "channel": "chat:jspb", "data": {"n": 2}},
        {"op": "waitPublications", "channel": "chat:jspb", "count": 2},
        {"op": "presenceStats", "channel": "chat:jspb"},
    ]
    scenario = js_scenario(server, steps, token=make_token("jspb"), protobuf=True)
    events = js_client(scenario)
    pubs = js_of(events, "publication", channel="chat:jspb")
    assert [(p["data"], p["offset"]) for p in pubs] == [({"n": 1}, 1), ({"n": 2}, 2)]
    (stats,) = js_results(events, "presenceStats")
    assert stats["numClients"] == 1
