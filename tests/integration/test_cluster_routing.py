"""Cluster-wide routing between real centripy nodes (issue 21, item 3): an HTTP-streaming or
SSE session opened on node A driven by `/emulation` requests POSTed to node B (no sticky
sessions), `user_personal_single_connection` across nodes, and every server API user
action reaching a connection on another node.
"""

from __future__ import annotations

import json
import time
import urllib.parse
import uuid
from typing import Any

import pytest

from tests.integration.test_cluster import WITHIN, Client, _client, _engine_config, clients
from tests.integration.test_cluster_nats import nats_config
from tests.integration.test_emulation import CHAT, RawStream, connect_cmd, emulate, post
from tests.support.server import ServerFactory
from tests.support.wait import eventually

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

IMPORTED = (clients,)
EMULATION = {"http_stream": True, "sse": True, "namespaces": [CHAT]}


@pytest.fixture(params=["redis", "nats"])
def routed_config(request: pytest.FixtureRequest) -> dict[str, Any]:
    """Two ways nodes talk: the Redis engine, or broker nats (presence on Redis)."""
    base = _engine_config("redis") if request.param == "redis" else nats_config("redis")
    return {**base, **EMULATION, "ping_interval": "3s", "pong_timeout": "2s"}


async def _skip_pings(stream: RawStream, read: Any) -> Any:
    return await stream.until(read, lambda m: m != {}, WITHIN)


async def test_http_stream_session_on_a_driven_through_b(
    server_factory: ServerFactory, routed_config: dict[str, Any], make_token: Any
) -> None:
    a, b = server_factory(routed_config), server_factory(routed_config)
    stream = await post(a.port, "/connection/http_stream", connect_cmd(make_token("u1")))
    try:
        result = (await stream.line())["connect"]
        session, node = result["session"], result["node"]
        channel = f"chat:{uuid.uuid4().hex[:10]}"
        subscribe = json.dumps({"subscribe": {"channel": channel}, "id": 2})
        assert (await emulate(b, session, node, subscribe)).status == 204
        reply = await _skip_pings(stream, stream.line)
        assert reply["id"] == 2 and reply["subscribe"]["recoverable"] is True

        await b.api_async("publish", {"channel": channel, "data": {"n": 1}})
        push = await _skip_pings(stream, stream.line)
        assert push["push"]["pub"]["data"] == {"n": 1} and push["push"]["pub"]["offset"] == 1

        # pongs go through B too: the session outlives several ping rounds (3 s each)
        pings = 0
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline:
            message = await stream.line(within=WITHIN)
            assert message == {}, message
            pings += 1
            assert (await emulate(b, session, node, "{}")).status == 204
            if pings == 2:
                break
        presence = json.dumps({"presence": {"channel": channel}, "id": 3})
        assert (await emulate(b, session, node, presence)).status == 204
        reply = await _skip_pings(stream, stream.line)
        assert reply["id"] == 3 and list(reply["presence"]["presence"]) == [result["client"]]
        assert not stream.ended
    finally:
        stream.close()


async def test_sse_session_on_a_driven_through_b(
    server_factory: ServerFactory, routed_config: dict[str, Any], make_token: Any
) -> None:
    a, b = server_factory(routed_config), server_factory(routed_config)
    query = urllib.parse.quote(connect_cmd(make_token("u2")).decode())
    stream = await RawStream.open(a.port, "GET", f"/connection/sse?cf_connect={query}")
    try:
        await stream.read_until(b"\r\n")
        result = (await stream.event())["connect"]
        channel = f"chat:{uuid.uuid4().hex[:10]}"
        subscribe = json.dumps({"subscribe": {"channel": channel}, "id": 2})
        assert (await emulate(b, result["session"], result["node"], subscribe)).status == 204
        reply = await _skip_pings(stream, stream.event)
        assert reply["id"] == 2 and "subscribe" in reply
        await a.api_async("publish", {"channel": channel, "data": {"n": 2}})
        push = await _skip_pings(stream, stream.event)
        assert push["push"]["pub"]["data"] == {"n": 2}
    finally:
        stream.close()


async def test_emulation_for_a_node_that_is_gone_is_404(
    server_factory: ServerFactory, routed_config: dict[str, Any]
) -> None:
    b = server_factory(routed_config)
    command = json.dumps({"subscribe": {"channel": "chat:x"}, "id": 2})
    answer = await emulate(b, str(uuid.uuid4()), str(uuid.uuid4()), command)
    assert answer.status == 404


# -- user actions -----------------------------------------------------------------------------


def _single_connection_config() -> dict[str, Any]:
    return {
        **_engine_config("redis"),
        "user_subscribe_to_personal": True,
        "user_personal_single_connection": True,
        "presence": True,
    }


async def test_a_users_new_connection_closes_the_old_one_on_another_node(
    server_factory: ServerFactory, clients: list[Client], make_token: Any
) -> None:
    config = _single_connection_config()
    a, b = server_factory(config), server_factory(config)
    first = await _client(clients, a, make_token("alice"))
    bystander = await _client(clients, a, make_token("bob"))
    second = await _client(clients, b, make_token("alice"))
    await eventually(lambda: first.closed is not None, WITHIN, changed=first.changed)
    assert first.closed == (3504, "connection limit")
    third = await _client(clients, a, make_token("alice"))  # and back the other way
    await eventually(lambda: second.closed is not None, WITHIN, changed=second.changed)
    assert second.closed == (3504, "connection limit")
    for alive in (bystander, third):  # a round trip each: neither was closed
        await alive.call("presence_stats", {"channel": "#alice"})
        assert alive.closed is None


async def test_every_api_user_action_reaches_a_connection_on_another_node(
    server_factory: ServerFactory, clients: list[Client], make_token: Any
) -> None:
    config = {**_engine_config("redis"), "allow_subscribe_for_client": True}
    a, b = server_factory(config), server_factory(config)
    user = await _client(clients, b, make_token("carol"))

    def pushes(kind: str) -> list[dict[str, Any]]:
        return [p for p in user.pushes if kind in p]

    channel = f"room:{uuid.uuid4().hex[:10]}"
    a.api_result("subscribe", {"user": "carol", "channel": channel})
    await eventually(lambda: pushes("subscribe"), WITHIN, changed=user.changed)
    assert pushes("subscribe")[0]["channel"] == channel
    await a.api_async("publish", {"channel": channel, "data": {"k": 1}})
    await eventually(lambda: user.offsets(channel) == [1], WITHIN, changed=user.changed)

    a.api_result("unsubscribe", {"user": "carol", "channel": channel})
    await eventually(lambda: pushes("unsubscribe"), WITHIN, changed=user.changed)
    assert pushes("unsubscribe")[0]["channel"] == channel

    expire_at = int(time.time()) + 600
    a.api_result("refresh", {"user": "carol", "expire_at": expire_at})
    await eventually(lambda: pushes("refresh"), WITHIN, changed=user.changed)
    assert pushes("refresh")[0]["refresh"]["expires"] is True

    a.api_result("disconnect", {"user": "carol", "disconnect": {"code": 4321, "reason": "x"}})
    await eventually(lambda: user.closed is not None, WITHIN, changed=user.changed)
    assert user.closed == (4321, "x")
