"""`/metrics` of a real server after connects, subscribes, recoveries and API calls: the
names, labels and counts Centrifugo v5 exports, parsed by prometheus_client's parser; and
every metric the Grafana example dashboard queries exists."""

from __future__ import annotations

import asyncio
import json
import re
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest
import websockets
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import make_jwt
from tests.integration.http_proxy_backend import proxy_backend
from tests.support.server import ServerFactory, ServerProcess, free_port
from tests.support.services import postgres_url, redis_url
from tests.support.wait import eventually

pytestmark = pytest.mark.integration

DASHBOARD = Path(__file__).parents[2] / "examples" / "grafana" / "centripy-dashboard.json"

HIST = {
    "name": "hist",
    "history_size": 10,
    "history_ttl": "300s",
    "force_recovery": True,
    "allow_subscribe_for_client": True,
}
CONFIG = {"prometheus": True, "ping_interval": "3s", "pong_timeout": "2500ms", "namespaces": [HIST]}
CONNECT = json.dumps({"id": 1, "connect": {"token": make_jwt("u1")}})

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(server: ServerProcess) -> tuple[str, dict[str, str], Samples]:
    """(text, family name -> type, (sample name, labels) -> value)."""
    with urllib.request.urlopen(f"{server.http_url}/metrics", timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = response.read().decode()
    types: dict[str, str] = {}
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return text, types, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def recv_json(ws: Any, pong: bool = True) -> list[dict[str, Any]]:
    """The messages of the next frame; a server ping (`{}`) is answered with a pong."""
    messages = [json.loads(line) for line in (await ws.recv()).splitlines()]
    for message in messages:
        if message == {} and pong:
            await ws.send("{}")
    return [m for m in messages if m != {}]


async def reply(ws: Any, cmd_id: int) -> dict[str, Any]:
    while True:
        for message in await recv_json(ws):
            if message.get("id") == cmd_id:
                return message


async def test_metrics_after_connects_subscribes_and_api_calls(
    server_factory: ServerFactory,
) -> None:
    server = server_factory(CONFIG)
    first = server.api_result("publish", {"channel": "hist:a", "data": {"n": 1}})
    server.api_result("publish", {"channel": "hist:a", "data": {"n": 2}})
    async with websockets.connect(server.ws_url) as ws:
        await ws.send(CONNECT)
        client = (await reply(ws, 1))["connect"]["client"]
        sub = {"channel": "hist:a", "recover": True, "offset": 1, "epoch": first["epoch"]}
        await ws.send(json.dumps({"id": 2, "subscribe": sub}))
        recovered = (await reply(ws, 2))["subscribe"]
        assert recovered["recovered"] is True and len(recovered["publications"]) == 1
        await ws.send(json.dumps({"id": 3, "subscribe": {"channel": "nope:x"}}))
        assert (await reply(ws, 3))["error"]["code"] == 102
        for n in range(3):
            server.api_result("publish", {"channel": "hist:a", "data": {"n": 3 + n}})
        pushes = 0
        while pushes < 3:
            pushes += sum("pub" in m.get("push", {}) for m in await recv_json(ws))
        assert server.api("publish", {"channel": "nope:x", "data": {}})["error"]["code"] == 102
        server.api_result("history", {"channel": "hist:a", "limit": 10})

        async def ponged() -> bool:  # the server pings every 3 s: we answer
            samples = (await asyncio.to_thread(scrape, server))[2]
            name = "centrifugo_client_ping_pong_duration_seconds_count"
            return value(samples, name, transport="websocket") >= 1

        read = asyncio.ensure_future(_read_forever(ws))
        try:
            await eventually(ponged, timeout=20, what="a ping answered with a pong")
            text, types, samples = await asyncio.to_thread(scrape, server)
            server.api_result("unsubscribe", {"channel": "hist:a", "user": "u1", "client": client})
            await eventually(
                lambda: asyncio.to_thread(_unsubscribed, server), timeout=10, what="unsubscribe"
            )
        finally:
            read.cancel()

    # Go's exact counter names (no _total) and types
    assert "# TYPE centrifugo_transport_connect_count counter\n" in text
    assert 'centrifugo_transport_connect_count{transport="websocket"} 1\n' in text
    assert types["centrifugo_api_command_duration_seconds"] == "summary"
    assert types["centrifugo_api_command_duration_seconds_histogram"] == "histogram"
    assert types["centrifugo_client_command_duration_seconds"] == "summary"
    # node gauges
    assert value(samples, "centrifugo_node_num_clients") == 1
    assert value(samples, "centrifugo_node_num_users") == 1
    assert value(samples, "centrifugo_node_num_subscriptions") == 1
    assert value(samples, "centrifugo_node_num_channels") == 1
    assert value(samples, "centrifugo_node_num_nodes") == 1
    assert any(name == "centrifugo_node_build" for name, _ in samples)
    assert value(samples, "centrifugo_node_messages_sent_count_total", type="publication") == 5
    assert value(samples, "centrifugo_node_action_count_total", action="publish") == 5
    # API: 6 publishes (one refused with 102), 1 history, by protocol and method
    api = "centrifugo_api_command_duration_seconds"
    assert value(samples, api + "_count", protocol="http", method="publish") == 6
    assert value(samples, api + "_count", protocol="http", method="history") == 1
    hist = api + "_histogram"
    assert value(samples, hist + "_count", protocol="http", method="publish") == 6
    assert value(samples, hist + "_bucket", protocol="http", method="publish", le="+Inf") == 6
    assert value(samples, hist + "_bucket", protocol="http", method="publish", le="10") == 6
    # client commands, reply errors, recovery
    cmd = "centrifugo_client_command_duration_seconds_count"
    assert value(samples, cmd, method="connect") == 1
    assert value(samples, cmd, method="subscribe") == 2
    errors = "centrifugo_client_num_reply_errors_total"
    assert value(samples, errors, method="subscribe", code="102") == 1
    assert value(samples, "centrifugo_client_recover_total", recovered="yes") == 1
    # transport messages: 3 live publication pushes (the recovered one is in a reply)
    base = {"transport": "websocket", "channel_namespace": ""}
    sent = "centrifugo_transport_messages_sent_total"
    assert value(samples, sent, frame_type="push_publication", **base) == 3
    assert value(samples, sent, frame_type="reply", **base) >= 4  # 3 replies, pings
    size = "centrifugo_transport_messages_sent_size_total"
    assert value(samples, size, frame_type="push_publication", **base) > 3 * len('{"push":{')
    received = "centrifugo_transport_messages_received_total"
    assert value(samples, received, frame_type="connect", **base) == 1
    assert value(samples, received, frame_type="subscribe", **base) == 2
    assert value(samples, received, frame_type="client_pong", **base) >= 1
    # centripy's own: 5 publications went through the group commit
    assert value(samples, "centripy_log_batch_size_sum") == 5
    assert value(samples, "centripy_log_append_duration_seconds_count") >= 1
    # standard process and Python GC collectors
    assert value(samples, "process_resident_memory_bytes") > 0
    assert ("python_gc_collections_total", frozenset({("generation", "0")})) in samples


async def _read_forever(ws: Any) -> None:
    """Keep reading (and answering pings) while the test waits."""
    while True:
        await recv_json(ws)


def _unsubscribed(server: ServerProcess) -> bool:
    samples = scrape(server)[2]
    name = "centrifugo_client_num_server_unsubscribes_total"
    return value(samples, name, code="2000") == 1 and (
        value(samples, "centrifugo_node_num_subscriptions") == 0
    )


async def test_server_disconnect_by_code_and_dashboard_names(
    server_factory: ServerFactory,
) -> None:
    server = server_factory(CONFIG)
    async with websockets.connect(server.ws_url) as ws:
        await ws.send(CONNECT)
        await reply(ws, 1)
        server.api_result("publish", {"channel": "hist:b", "data": {}})
        await ws.send("not json")  # a bad command: the server disconnects with 3501
        with pytest.raises(websockets.ConnectionClosed) as closed:
            while True:
                await ws.recv()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 3501
    text, _, samples = await asyncio.to_thread(scrape, server)
    name = "centrifugo_client_num_server_disconnects_total"
    assert value(samples, name, code="3501") == 1
    # Every metric the example dashboard queries is exported under that name (the proxy,
    # consumer, error and unsubscribe families appear once such an event happened: their
    # names are checked against engine/metrics.py's own rendering in tests/engine).
    dashboard = DASHBOARD.read_text()
    queried = set(re.findall(r"\b((?:centrifugo|centripy|process|python)_[a-z_]+)", dashboard))
    exported = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line[:1] != "#"}
    conditional = re.compile(r"proxy|consumer|errors|unsubscribes|recover|ping_pong")
    missing = {
        q for q in queried if q not in exported and not conditional.search(q)
    }  # fmt: skip
    assert not missing, f"dashboard queries metrics /metrics does not export: {sorted(missing)}"


async def test_proxy_duration_and_errors_by_protocol_and_type(
    server_factory: ServerFactory,
) -> None:
    async with proxy_backend() as backend:
        backend.answers["connect"] = {"result": {"user": "p1"}}
        down = f"http://127.0.0.1:{free_port()}/rpc"
        config = {
            "prometheus": True,
            "proxy_connect_endpoint": backend.url("connect"),
            "proxy_rpc_endpoint": down,
        }
        server = server_factory(config)
        async with websockets.connect(server.ws_url) as ws:
            await ws.send(json.dumps({"id": 1, "connect": {}}))
            assert (await reply(ws, 1))["connect"]["client"]
            await ws.send(json.dumps({"id": 2, "rpc": {"method": "m", "data": {}}}))
            assert (await reply(ws, 2))["error"]["code"] == 100
        text, types, samples = await asyncio.to_thread(scrape, server)
    assert types["centrifugo_proxy_duration_seconds"] == "summary"
    duration = "centrifugo_proxy_duration_seconds_count"
    assert value(samples, duration, protocol="http", type="connect") == 1
    assert value(samples, duration, protocol="http", type="rpc") == 1
    hist = "centrifugo_proxy_duration_seconds_histogram_bucket"
    assert value(samples, hist, protocol="http", type="connect", le="+Inf") == 1
    errors = "centrifugo_proxy_errors_total"
    assert value(samples, errors, protocol="http", type="rpc") == 1
    assert value(samples, errors, protocol="http", type="connect") == 0
    assert "# TYPE centrifugo_proxy_errors counter\n" in text


async def test_two_nodes_count_messages_received_from_the_broker(
    server_factory: ServerFactory,
) -> None:
    tag = uuid.uuid4().hex[:10]
    config = {
        **CONFIG,
        "engine": "redis",
        "redis_address": redis_url().removeprefix("redis://"),
        "redis_prefix": f"m{tag}",
        "database_url": postgres_url(),
    }
    a, b = server_factory(config), server_factory(config)

    async def nodes_seen() -> bool:
        samples = (await asyncio.to_thread(scrape, a))[2]
        return value(samples, "centrifugo_node_num_nodes") == 2

    await eventually(nodes_seen, timeout=20, what="both nodes in node A's registry")
    async with websockets.connect(a.ws_url) as ws:
        await ws.send(CONNECT)
        await reply(ws, 1)
        await ws.send(json.dumps({"id": 2, "subscribe": {"channel": f"hist:{tag}"}}))
        await reply(ws, 2)
        for n in range(3):
            b.api_result("publish", {"channel": f"hist:{tag}", "data": {"n": n}})
        pushes = 0
        while pushes < 3:
            pushes += sum("pub" in m.get("push", {}) for m in await recv_json(ws))
    _, types, samples = await asyncio.to_thread(scrape, a)
    received = "centrifugo_node_messages_received_count_total"
    assert value(samples, received, type="publication") == 3
    assert value(samples, received, type="control") >= 1  # node B's heartbeats
    assert types["centrifugo_node_pub_sub_lag_seconds"] == "histogram"
    assert value(samples, "centrifugo_node_pub_sub_lag_seconds_count") == 3
    # on node B: sent, not received
    samples_b = (await asyncio.to_thread(scrape, b))[2]
    sent = "centrifugo_node_messages_sent_count_total"
    assert value(samples_b, sent, type="publication") == 3
    assert value(samples_b, received, type="publication") == 0
