"""centrifuge-js 5.8 over sockjs-client 1.6.1 (tests/js/client.mjs passes the SockJS
constructor for the `sockjs` transport) against a real centripy process: each SockJS
sub-transport that works in Node (websocket, xhr-streaming, xhr-polling, eventsource)
connects, subscribes, receives API publications, publishes, and gets server-side
disconnects with their codes through SockJS close frames (docs/spec/protocol.md 4.4, 5.3)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest

from tests.support.server import ServerFactory, ServerProcess

if TYPE_CHECKING:
    from tests.integration.conftest import JsClient, TokenMaker

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

CONFIG: dict[str, Any] = {
    "sockjs": True,
    "namespaces": [
        {
            "name": "chat",
            "history_size": 10,
            "history_ttl": "300s",
            "allow_subscribe_for_client": True,
            "allow_publish_for_subscriber": True,
        }
    ],
}
SUB_TRANSPORTS = ["websocket", "xhr-streaming", "xhr-polling", "eventsource"]


def sockjs_scenario(
    server: ServerProcess, sub_transport: str, steps: list[Any], **extra: Any
) -> dict[str, Any]:
    endpoint = f"{server.http_url}/connection/sockjs"
    return {
        "transports": [{"transport": "sockjs", "endpoint": endpoint}],
        "options": {"sockjsOptions": {"transports": [sub_transport]}},
        "apiUrl": server.api_url,
        "apiKey": server.api_key,
        "timeoutMs": 25000,
        "steps": steps,
        **extra,
    }


def of(events: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [event for event in events if event["event"] == name]


@pytest.mark.parametrize("sub_transport", SUB_TRANSPORTS)
def test_js_sockjs_session(
    sub_transport: str,
    server_factory: ServerFactory,
    make_token: TokenMaker,
    js_client: JsClient,
) -> None:
    server = server_factory(CONFIG)
    user = f"js-{sub_transport}"
    channel = f"chat:{sub_transport}"
    big = "\u200d\ufeff</script>ü" + "x" * 3000  # escaped or HTML-unsafe characters
    steps = [
        {"op": "connect"},
        {"op": "subscribe", "channel": channel},
        {"op": "api", "method": "publish", "payload": {"channel": channel, "data": {"n": 1}}},
        {"op": "api", "method": "publish", "payload": {"channel": channel, "data": {"s": big}}},
        {"op": "publish", "channel": channel, "data": {"n": 3}},
        {"op": "waitPublications", "channel": channel, "count": 3},
        {"op": "api", "method": "disconnect",
         "payload": {"user": user, "disconnect": {"code": 4501, "reason": "go away"}}},
        {"op": "waitState", "state": "disconnected"},
    ]  # fmt: skip
    events = js_client(sockjs_scenario(server, sub_transport, steps, token=make_token(user)))
    (connected,) = of(events, "connected")
    assert connected["ctx"]["transport"] == f"sockjs-{sub_transport}"
    pubs = [(e["data"], e["offset"]) for e in of(events, "publication")]
    assert pubs == [({"n": 1}, 1), ({"s": big}, 2), ({"n": 3}, 3)]
    assert [(e["code"], e["reason"]) for e in of(events, "disconnected")] == [(4501, "go away")]


@pytest.mark.parametrize("sub_transport", ["websocket", "xhr-polling"])
def test_js_sockjs_reconnects_after_a_reconnectable_disconnect(
    sub_transport: str,
    server_factory: ServerFactory,
    make_token: TokenMaker,
    js_client: JsClient,
) -> None:
    server = server_factory(CONFIG)
    user = f"again-{sub_transport}"
    steps = [
        {"op": "connect"},
        {"op": "subscribe", "channel": "chat:again"},
        {"op": "api", "method": "disconnect",
         "payload": {"user": user, "disconnect": {"code": 3011, "reason": "force reconnect"}}},
        {"op": "waitEvent", "match": {"event": "connecting", "code": 3011}},
        {"op": "waitEvent", "match": {"event": "connected"}, "count": 2, "timeoutMs": 10000},
        {"op": "waitEvent", "match": {"event": "subscribed"}, "count": 2},
        {"op": "api", "method": "publish", "payload": {"channel": "chat:again", "data": {"n": 1}}},
        {"op": "waitPublications", "channel": "chat:again", "count": 1},
    ]  # fmt: skip
    events = js_client(sockjs_scenario(server, sub_transport, steps, token=make_token(user)))
    reconnecting = [e for e in of(events, "connecting") if e["code"] == 3011]
    assert [e["reason"] for e in reconnecting] == ["force reconnect"]
    assert of(events, "disconnected") == []


def test_js_sockjs_bad_token_is_terminal_3500(
    server_factory: ServerFactory, make_token: TokenMaker, js_client: JsClient
) -> None:
    server = server_factory(CONFIG)
    steps = [
        {"op": "connect", "wait": False},
        {"op": "waitState", "state": "disconnected", "timeoutMs": 8000},
    ]
    token = make_token("bad", secret="not-the-secret")
    events = js_client(sockjs_scenario(server, "xhr-streaming", steps, token=token))
    assert [e["code"] for e in of(events, "disconnected")] == [3500]
    assert of(events, "connected") == []
