"""centrifuge-js 5.x (tests/js/client.mjs) over the HTTP-streaming and SSE transports with
bidirectional emulation (`/emulation`), against a real `centripy serve` process: connect,
subscribe, publications from the server API, presence, fallback from an unavailable
WebSocket, server-side disconnects reaching the client with their code, and recovery after a
reconnect. Expected behaviour: docs/spec/protocol.md 4.4, 5.2 and 7.1."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest

from tests.support.server import ServerFactory, ServerProcess

if TYPE_CHECKING:
    from tests.integration.conftest import JsClient, TokenMaker

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

CHAT = {
    "name": "chat",
    "presence": True,
    "history_size": 100,
    "history_ttl": "300s",
    "force_recovery": True,
    "allow_recovery": True,
    "allow_positioning": True,
    "allow_subscribe_for_client": True,
    "allow_presence_for_subscriber": True,
    "allow_history_for_subscriber": True,
}
CONFIG: dict[str, Any] = {"http_stream": True, "sse": True, "namespaces": [CHAT]}
EMULATION_TRANSPORTS = ("http_stream", "sse")


def endpoint(server: ServerProcess, transport: str) -> dict[str, str]:
    if transport == "websocket":
        return {"transport": "websocket", "endpoint": server.ws_url}
    return {"transport": transport, "endpoint": f"{server.http_url}/connection/{transport}"}


def scenario(
    server: ServerProcess, transports: list[str], steps: list[Any], **extra: Any
) -> dict[str, Any]:
    return {
        "transports": [endpoint(server, name) for name in transports],
        "emulationEndpoint": f"{server.http_url}/emulation",
        "apiUrl": server.api_url,
        "apiKey": server.api_key,
        "timeoutMs": 40000,
        "steps": steps,
        **extra,
    }


def of(events: list[dict[str, Any]], name: str, **match: Any) -> list[dict[str, Any]]:
    return [
        e for e in events if e["event"] == name and all(e.get(k) == v for k, v in match.items())
    ]


def results(events: list[dict[str, Any]], op: str) -> list[Any]:
    return [e.get("value", e.get("error")) for e in of(events, "result", op=op)]


def publish(channel: str, n: int) -> dict[str, Any]:
    return {"op": "api", "method": "publish", "payload": {"channel": channel, "data": {"n": n}}}


@pytest.mark.parametrize("transport", EMULATION_TRANSPORTS)
def test_js_session_over_emulation(
    transport: str, server_factory: ServerFactory, make_token: TokenMaker, js_client: JsClient
) -> None:
    server = server_factory(CONFIG)
    channel = f"chat:{transport}"
    steps = [
        {"op": "connect"},
        {"op": "subscribe", "channel": channel},
        publish(channel, 1),
        publish(channel, 2),
        {"op": "waitPublications", "channel": channel, "count": 2},
        {"op": "presence", "channel": channel},
        {"op": "presenceStats", "channel": channel},
        {"op": "history", "channel": channel, "options": {"limit": 10}},
    ]
    events = js_client(scenario(server, [transport], steps, token=make_token("js")))
    (connected,) = of(events, "connected")
    assert connected["ctx"]["transport"] == transport
    pubs = of(events, "publication", channel=channel)
    assert [(p["data"]["n"], p["offset"]) for p in pubs] == [(1, 1), (2, 2)]
    (presence,) = results(events, "presence")
    assert [info["user"] for info in presence["clients"].values()] == ["js"]
    assert results(events, "presenceStats") == [{"numClients": 1, "numUsers": 1}]
    (history,) = results(events, "history")
    assert [p["offset"] for p in history["publications"]] == [1, 2]


def test_js_falls_back_when_websocket_is_unavailable(
    server_factory: ServerFactory, make_token: TokenMaker, js_client: JsClient
) -> None:
    order = ["websocket", "http_stream", "sse"]
    steps = [{"op": "connect", "timeoutMs": 15000}, {"op": "subscribe", "channel": "chat:fb"}]
    no_ws = server_factory({**CONFIG, "websocket_disable": True})
    events = js_client(scenario(no_ws, order, steps, token=make_token("js")))
    assert [e["ctx"]["transport"] for e in of(events, "connected")] == ["http_stream"]
    assert of(events, "subscribed", channel="chat:fb")

    sse_only = server_factory({**CONFIG, "websocket_disable": True, "http_stream": False})
    events = js_client(scenario(sse_only, order, steps, token=make_token("js")))
    assert [e["ctx"]["transport"] for e in of(events, "connected")] == ["sse"]

    all_on = server_factory(CONFIG)
    events = js_client(scenario(all_on, order, steps, token=make_token("js")))
    assert [e["ctx"]["transport"] for e in of(events, "connected")] == ["websocket"]


@pytest.mark.parametrize("transport", EMULATION_TRANSPORTS)
def test_js_server_disconnect_reaches_the_client(
    transport: str, server_factory: ServerFactory, make_token: TokenMaker, js_client: JsClient
) -> None:
    server = server_factory(CONFIG)

    def disconnect(code: int, reason: str) -> dict[str, Any]:
        payload = {"user": "js", "disconnect": {"code": code, "reason": reason}}
        return {"op": "api", "method": "disconnect", "payload": payload}

    steps = [
        {"op": "connect"},
        # 4000-4499: the client reconnects (over the same transport) ...
        disconnect(4000, "come back"),
        {"op": "waitEvent", "match": {"event": "connected"}, "count": 2, "timeoutMs": 10000},
        # ... 4500-4999: terminal.
        disconnect(4500, "bye"),
        {"op": "waitState", "state": "disconnected"},
    ]
    events = js_client(scenario(server, [transport], steps, token=make_token("js")))
    connecting = [(e["code"], e["reason"]) for e in of(events, "connecting")]
    assert (4000, "come back") in connecting
    assert [(e["code"], e["reason"]) for e in of(events, "disconnected")] == [(4500, "bye")]
    assert [e["ctx"]["transport"] for e in of(events, "connected")] == [transport, transport]


def test_js_recovery_after_reconnect_over_sse(
    server_factory: ServerFactory, make_token: TokenMaker, js_client: JsClient
) -> None:
    server = server_factory(CONFIG)
    channel = "chat:sserec"
    steps = [
        {"op": "connect"},
        {"op": "subscribe", "channel": channel, "options": {"recoverable": True}},
        publish(channel, 1),
        publish(channel, 2),
        {"op": "waitPublications", "channel": channel, "count": 2},
        {"op": "disconnect"},
        *[publish(channel, n) for n in range(3, 8)],
        {"op": "connect"},
        {"op": "waitPublications", "channel": channel, "count": 7},
        publish(channel, 8),
        {"op": "waitPublications", "channel": channel, "count": 8},
    ]
    events = js_client(scenario(server, ["sse"], steps, token=make_token("js")))
    subscribed = of(events, "subscribed", channel=channel)
    assert len(subscribed) == 2
    assert subscribed[1]["wasRecovering"] is True and subscribed[1]["recovered"] is True
    pubs = of(events, "publication", channel=channel)
    assert [p["offset"] for p in pubs] == list(range(1, 9))
    assert [p["data"]["n"] for p in pubs] == list(range(1, 9))
