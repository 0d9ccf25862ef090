"""The WebSocket transport and the server API driven by the real SDKs against a real process:
centrifuge-python 0.7 and centrifuge-js 5.x (tests/js/client.mjs) as clients, cent 5.2 (and
raw HTTP) as the server API client. Expected behaviour: docs/spec/protocol.md and
docs/spec/server_api.md (Centrifugo v5)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import cent
import pytest
from centrifuge import (
    Client,
    ClientEventHandler,
    ClientState,
    ReplyError,
    StreamPosition,
    Subscription,
    SubscriptionEventHandler,
    SubscriptionState,
)

from tests.support.server import ServerFactory, ServerProcess
from tests.support.wait import eventually

if TYPE_CHECKING:
    from tests.integration.conftest import JsClient, TokenMaker

pytestmark = [pytest.mark.integration, pytest.mark.timeout(30)]

CHAT = {
    "name": "chat",
    "presence": True,
    "join_leave": True,
    "force_push_join_leave": True,
    "history_size": 100,
    "history_ttl": "300s",
    "force_recovery": True,
    "allow_recovery": True,
    "allow_positioning": True,
    "allow_subscribe_for_client": True,
    "allow_publish_for_subscriber": True,
    "allow_presence_for_subscriber": True,
    "allow_history_for_subscriber": True,
}
# Clients may subscribe but not publish.
NEWS = {"name": "news", "allow_subscribe_for_client": True}
CONFIG: dict[str, Any] = {"namespaces": [CHAT, NEWS]}
WAIT = 10.0


# --- recording SDK events ----------------------------------------------------------------


class Recorder:
    """Events of one SDK object in arrival order, awaitable (on the test's loop)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []
        self._changed = asyncio.Event()

    def add(self, name: str, ctx: Any) -> None:
        self.events.append((name, ctx))
        self._changed.set()

    def of(self, name: str) -> list[Any]:
        return [ctx for event, ctx in self.events if event == name]

    def first(self, name: str, where: Callable[[Any], bool] = lambda ctx: True) -> Any:
        """`(ctx,)` for the first `name` event matching `where` so far, else None."""
        return next(((ctx,) for event, ctx in self.events if event == name and where(ctx)), None)

    async def wait_for(
        self, name: str, where: Callable[[Any], bool] = lambda ctx: True, within: float = WAIT
    ) -> Any:
        """The first `name` event (past or future) matching `where`, waiting at most `within`
        seconds (AssertionError)."""
        (ctx,) = await eventually(
            lambda: self.first(name, where), within, f"a {name} event", changed=self._changed
        )
        return ctx

    async def wait_count(self, name: str, count: int, within: float = WAIT) -> list[Any]:
        await eventually(
            lambda: len(self.of(name)) >= count,
            within,
            f"{count} {name} events",
            changed=self._changed,
        )
        return self.of(name)


class ClientEvents(Recorder, ClientEventHandler):  # type: ignore[misc]
    async def on_connecting(self, ctx: Any) -> None:
        self.add("connecting", ctx)

    async def on_connected(self, ctx: Any) -> None:
        self.add("connected", ctx)

    async def on_disconnected(self, ctx: Any) -> None:
        self.add("disconnected", ctx)

    async def on_error(self, ctx: Any) -> None:
        self.add("error", ctx)

    async def on_publication(self, ctx: Any) -> None:
        self.add("publication", ctx)


class SubEvents(Recorder, SubscriptionEventHandler):  # type: ignore[misc]
    async def on_subscribing(self, ctx: Any) -> None:
        self.add("subscribing", ctx)

    async def on_subscribed(self, ctx: Any) -> None:
        self.add("subscribed", ctx)

    async def on_unsubscribed(self, ctx: Any) -> None:
        self.add("unsubscribed", ctx)

    async def on_publication(self, ctx: Any) -> None:
        self.add("publication", ctx)

    async def on_join(self, ctx: Any) -> None:
        self.add("join", ctx)

    async def on_leave(self, ctx: Any) -> None:
        self.add("leave", ctx)

    async def on_error(self, ctx: Any) -> None:
        self.add("error", ctx)

    def offsets(self) -> list[int]:
        return [ctx.pub.offset for ctx in self.of("publication")]


@dataclass
class PyConn:
    client: Client
    events: ClientEvents
    subs: dict[str, SubEvents] = field(default_factory=dict)

    async def subscribe(self, channel: str, **options: Any) -> tuple[Subscription, SubEvents]:
        """Subscribe and wait until subscribed."""
        events = SubEvents()
        sub = self.client.new_subscription(channel, events=events, **options)
        self.subs[channel] = events
        await sub.subscribe()
        await sub.ready(timeout=WAIT)
        return sub, events


class PyConnect(Protocol):
    async def __call__(
        self, server: ServerProcess, token: str = "", *, wait: bool = True, **options: Any
    ) -> PyConn: ...


@pytest.fixture
async def py_connect() -> AsyncIterator[PyConnect]:
    """`await py_connect(server, token="", wait=True, **client_options) -> PyConn`; every
    client is disconnected at teardown."""
    conns: list[PyConn] = []

    async def connect(
        server: ServerProcess, token: str = "", *, wait: bool = True, **options: Any
    ) -> PyConn:
        events = ClientEvents()
        client = Client(server.ws_url, events=events, token=token, proxy=None, **options)
        conn = PyConn(client, events)
        conns.append(conn)
        await client.connect()
        if wait:
            await client.ready(timeout=WAIT)
        return conn

    yield connect
    for conn in conns:
        await conn.client.disconnect()


@pytest.fixture
async def api_factory() -> AsyncIterator[Callable[[ServerProcess], cent.AsyncClient]]:
    clients: list[cent.AsyncClient] = []

    def make(server: ServerProcess) -> cent.AsyncClient:
        client = cent.AsyncClient(server.api_url, server.api_key)
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()


def js_scenario(server: ServerProcess, steps: list[Any], **extra: Any) -> dict[str, Any]:
    return {
        "endpoint": server.ws_url,
        "apiUrl": server.api_url,
        "apiKey": server.api_key,
        "timeoutMs": 25000,
        "steps": steps,
        **extra,
    }


def js_of(events: list[dict[str, Any]], name: str, **match: Any) -> list[dict[str, Any]]:
    return [
        e for e in events if e["event"] == name and all(e.get(k) == v for k, v in match.items())
    ]


def js_results(events: list[dict[str, Any]], op: str) -> list[Any]:
    return [e.get("value", e.get("error")) for e in js_of(events, "result", op=op)]


# --- connect -----------------------------------------------------------------------------


async def test_python_connects_with_jwt(
    server_factory: ServerFactory, make_token: TokenMaker, py_connect: PyConnect
) -> None:
    server = server_factory(CONFIG)
    conn = await py_connect(server, make_token("42", exp_in=3600))
    connected = await conn.events.wait_for("connected")
    assert uuid.UUID(connected.client).version == 4
    assert connected.version
    assert conn.client.state == ClientState.CONNECTED


async def test_python_connects_anonymously_when_allowed(
    server_factory: ServerFactory, py_connect: PyConnect
) -> None:
    server = server_factory({**CONFIG, "allow_anonymous_connect_without_token": True})
    conn = await py_connect(server)
    assert conn.client.state == ClientState.CONNECTED


async def test_python_without_token_is_refused_by_default(
    server_factory: ServerFactory, py_connect: PyConnect
) -> None:
    server = server_factory(CONFIG)
    conn = await py_connect(server, wait=False)
    ctx = await conn.events.wait_for("disconnected")
    assert ctx.code == 3501
    assert conn.client.state == ClientState.DISCONNECTED


async def test_python_bad_token_is_terminal_3500(
    server_factory: ServerFactory, make_token: TokenMaker, py_connect: PyConnect
) -> None:
    server = server_factory(CONFIG)
    conn = await py_connect(server, make_token("42", secret="wrong-secret"), wait=False)
    ctx = await conn.events.wait_for("disconnected")
    assert (ctx.code, conn.client.state) == (3500, ClientState.DISCONNECTED)
    assert conn.events.of("connected") == []


def test_js_connects_with_jwt_and_anonymously(
    server_factory: ServerFactory, make_token: TokenMaker, js_client: JsClient
) -> None:
    server = server_factory({**CONFIG, "allow_anonymous_connect_without_token": True})
    steps = [{"op": "connect"}, {"op": "assertState", "state": "connected"}, {"op": "disconnect"}]
    with_token = js_client(js_scenario(server, steps, token=make_token("js", exp_in=3600)))
    anonymous = js_client(js_scenario(server, steps))
    for events in (with_token, anonymous):
        (connected,) = js_of(events, "connected")
        assert uuid.UUID(connected["ctx"]["client"]).version == 4
        assert connected["ctx"]["transport"] == "websocket"


def test_js_bad_token_is_terminal_3500(
    server_factory: ServerFactory, make_token: TokenMaker, js_client: JsClient
) -> None:
    server = server_factory(CONFIG)
    steps = [
        {"op": "connect", "wait": False},
        {"op": "waitState", "state": "disconnected", "timeoutMs": 8000},
        {"op": "sleep", "ms": 1000},
        {"op": "assertState", "state": "disconnected"},
    ]
    events = js_client(js_scenario(server, steps, token=make_token("js", secret="wrong")))
    assert [e["code"] for e in js_of(events, "disconnected")] == [3500]
    assert js_of(events, "connected") == []


# --- publications ------------------------------------------------------------------------


async def test_api_publications_arrive_in_order_with_offsets(
    server_factory: ServerFactory,
    make_token: TokenMaker,
    py_connect: PyConnect,
    api_factory: Callable[[ServerProcess], cent.AsyncClient],
) -> None:
    server = server_factory(CONFIG)
    api = api_factory(server)
    conn = await py_connect(server, make_token("42"))
    _, sub = await conn.subscribe("chat:order")
    results = [
        await api.publish(cent.PublishRequest(channel="chat:order", data={"n": n}))
        for n in range(1, 6)
    ]
    assert [r.offset for r in results] == [1, 2, 3, 4, 5]
    assert len({r.epoch for r in results}) == 1 and results[0].epoch
    pubs = await sub.wait_count("publication", 5)
    assert [p.pub.data for p in pubs] == [{"n": n} for n in range(1, 6)]
    assert sub.offsets() == [1, 2, 3, 4, 5]
    assert all(p.pub.info is None for p in pubs)


def test_js_receives_api_publications_in_order(
    server_factory: ServerFactory, make_token: TokenMaker, js_client: JsClient
) -> None:
    server = server_factory(CONFIG)
    publish = [
        {"op": "api", "method": "publish", "payload": {"channel": "chat:js", "data": {"n": n}}}
        for n in (1, 2, 3)
    ]
    steps = [
        {"op": "connect"},
        {"op": "subscribe", "channel": "chat:js"},
        *publish,
        {"op": "waitPublications", "channel": "chat:js", "count": 3},
    ]
    events = js_client(js_scenario(server, steps, token=make_token("js")))
    pubs = js_of(events, "publication", channel="chat:js")
    assert [(p["data"], p["offset"]) for p in pubs] == [({"n": n}, n) for n in (1, 2, 3)]
    assert [r["offset"] for r in js_results(events, "api")] == [1, 2, 3]
    (subscribed,) = js_of(events, "subscribed", channel="chat:js")
    assert subscribed["recoverable"] is True and subscribed["positioned"] is True


async def test_client_publish_allowed_and_denied(
    server_factory: ServerFactory, make_token: TokenMaker, py_connect: PyConnect
) -> None:
    server = server_factory(CONFIG)
    conn = await py_connect(server, make_token("42"))
    chat, chat_events = await conn.subscribe("chat:pub")
    await chat.publish({"text": "hi"})
    ctx = await chat_events.wait_for("publication")
    assert ctx.pub.data == {"text": "hi"} and ctx.pub.offset == 1
    assert ctx.pub.info is not None
    assert (ctx.pub.info.user, ctx.pub.info.client) == ("42", conn.client.client_id)

    news, _ = await conn.subscribe("news:pub")
    with pytest.raises(ReplyError) as denied:
        await news.publish({"text": "nope"})
    assert denied.value.code == 103
    with pytest.raises(ReplyError) as unknown:
        await conn.client.publish("nowhere:1", {"text": "nope"})
    assert unknown.value.code == 102
    assert conn.client.state == ClientState.CONNECTED


def test_js_client_publish_allowed_and_denied(
    server_factory: ServerFactory, make_token: TokenMaker, js_client: JsClient
) -> None:
    server = server_factory(CONFIG)
    steps = [
        {"op": "connect"},
        {"op": "subscribe", "channel": "chat:jspub"},
        {"op": "publish", "channel": "chat:jspub", "data": {"text": "hi"}},
        {"op": "waitPublications", "channel": "chat:jspub", "count": 1},
        {"op": "subscribe", "channel": "news:jspub"},
        {"op": "publish", "channel": "news:jspub", "data": {"x": 1}, "expectError": 103},
    ]
    events = js_client(js_scenario(server, steps, token=make_token("js")))
    (pub,) = js_of(events, "publication", channel="chat:jspub")
    assert pub["data"] == {"text": "hi"} and pub["info"]["user"] == "js"
    assert js_results(events, "publish")[1]["code"] == 103


# --- presence and join/leave -------------------------------------------------------------


async def test_presence_via_sdk_and_api(
    server_factory: ServerFactory,
    make_token: TokenMaker,
    py_connect: PyConnect,
    api_factory: Callable[[ServerProcess], cent.AsyncClient],
) -> None:
    server = server_factory(CONFIG)
    api = api_factory(server)
    first = await py_connect(server, make_token("42"))
    second = await py_connect(server, make_token("43"))
    sub, events = await first.subscribe("chat:presence")
    await second.subscribe("chat:presence")
    ids = {first.client.client_id, second.client.client_id}

    presence = await sub.presence()
    assert set(presence.clients) == ids
    assert {info.user for info in presence.clients.values()} == {"42", "43"}
    stats = await sub.presence_stats()
    assert (stats.num_clients, stats.num_users) == (2, 2)

    api_presence = await api.presence(cent.PresenceRequest(channel="chat:presence"))
    assert set(api_presence.presence) == ids
    assert api_presence.presence[first.client.client_id].user == "42"
    api_stats = await api.presence_stats(cent.PresenceStatsRequest(channel="chat:presence"))
    assert (api_stats.num_clients, api_stats.num_users) == (2, 2)

    await second.client.disconnect()
    await events.wait_for("leave", lambda ctx: ctx.info.user == "43")
    api_stats = await api.presence_stats(cent.PresenceStatsRequest(channel="chat:presence"))
    assert (api_stats.num_clients, api_stats.num_users) == (1, 1)

    with pytest.raises(ReplyError) as off:
        await first.client.presence("news:x")
    assert off.value.code == 108


def test_js_presence(
    server_factory: ServerFactory, make_token: TokenMaker, js_client: JsClient
) -> None:
    server = server_factory(CONFIG)
    steps = [
        {"op": "connect"},
        {"op": "subscribe", "channel": "chat:jspres"},
        {"op": "presence", "channel": "chat:jspres"},
        {"op": "presenceStats", "channel": "chat:jspres"},
        {"op": "api", "method": "presence", "payload": {"channel": "chat:jspres"}},
    ]
    events = js_client(js_scenario(server, steps, token=make_token("js")))
    (connected,) = js_of(events, "connected")
    client_id = connected["ctx"]["client"]
    (presence,) = js_results(events, "presence")
    assert list(presence["clients"]) == [client_id]
    assert presence["clients"][client_id]["user"] == "js"
    assert js_results(events, "presenceStats") == [{"numClients": 1, "numUsers": 1}]
    (api_presence,) = js_results(events, "api")
    assert api_presence["presence"][client_id] == {"user": "js", "client": client_id}


async def test_join_and_leave_pushes(
    server_factory: ServerFactory, make_token: TokenMaker, py_connect: PyConnect
) -> None:
    server = server_factory(CONFIG)
    watcher = await py_connect(server, make_token("42"))
    _, events = await watcher.subscribe("chat:jl")
    other = await py_connect(server, make_token("43"))
    other_sub, _ = await other.subscribe("chat:jl")

    join = await events.wait_for("join", lambda ctx: ctx.info.user == "43")
    assert join.info.client == other.client.client_id
    await other_sub.unsubscribe()
    leave = await events.wait_for("leave", lambda ctx: ctx.info.user == "43")
    assert leave.info.client == other.client.client_id
    assert [ctx.info.user for ctx in events.of("leave")] == ["43"]


async def test_js_join_and_leave(
    server_factory: ServerFactory,
    make_token: TokenMaker,
    py_connect: PyConnect,
    js_client: JsClient,
) -> None:
    server = server_factory(CONFIG)
    steps = [
        {"op": "connect"},
        {"op": "subscribe", "channel": "chat:jsjl", "options": {"joinLeave": True}},
        {"op": "waitEvent", "match": {"event": "join", "info": {"user": "43"}}, "timeoutMs": 10000},
        {
            "op": "waitEvent",
            "match": {"event": "leave", "info": {"user": "43"}},
            "timeoutMs": 10000,
        },
    ]
    run = await js_client.start(js_scenario(server, steps, token=make_token("js")))
    await run.wait_for(lambda e: e["event"] == "subscribed")
    other = await py_connect(server, make_token("43"))
    sub, _ = await other.subscribe("chat:jsjl")
    await run.wait_for(lambda e: e["event"] == "join" and e["info"]["user"] == "43")
    await sub.unsubscribe()
    events = await run.finish()
    (join,) = [e for e in js_of(events, "join") if e["info"]["user"] == "43"]
    assert join["info"]["client"] == other.client.client_id


# --- server API: batch, broadcast, disconnect, unsubscribe --------------------------------


async def test_batch_sequential_and_parallel(
    server_factory: ServerFactory, make_token: TokenMaker, py_connect: PyConnect
) -> None:
    server = server_factory(CONFIG)
    conn = await py_connect(server, make_token("42"))
    _, events = await conn.subscribe("chat:batch")
    api = cent.Client(server.api_url, server.api_key)  # the synchronous client, off the loop

    def batch(parallel: bool, *requests: Any) -> list[Any]:
        reply = api.batch(cent.BatchRequest(requests=list(requests), parallel=parallel))
        return list(reply.replies)

    sequential = await asyncio.to_thread(
        batch,
        False,
        cent.PublishRequest(channel="chat:batch", data={"n": 1}),
        cent.PublishRequest(channel="chat:batch", data={"n": 2}),
        cent.PresenceStatsRequest(channel="chat:batch"),
        cent.HistoryRequest(channel="chat:batch", limit=10),
    )
    assert [sequential[0].offset, sequential[1].offset] == [1, 2]
    assert sequential[2].num_clients == 1
    assert [p.offset for p in sequential[3].publications] == [1, 2]

    parallel = await asyncio.to_thread(
        batch,
        True,
        cent.PublishRequest(channel="chat:batch", data={"n": 3}),
        cent.PublishRequest(channel="chat:batch", data={"n": 4}),
        cent.InfoRequest(),
    )
    assert {parallel[0].offset, parallel[1].offset} == {3, 4}
    assert parallel[2].nodes[0].num_clients == 1
    api.close()

    await events.wait_count("publication", 4)
    assert events.offsets() == [1, 2, 3, 4]


async def test_broadcast(
    server_factory: ServerFactory,
    make_token: TokenMaker,
    py_connect: PyConnect,
    api_factory: Callable[[ServerProcess], cent.AsyncClient],
) -> None:
    server = server_factory(CONFIG)
    conn = await py_connect(server, make_token("42"))
    _, one = await conn.subscribe("chat:b1")
    _, two = await conn.subscribe("chat:b2")
    result = await api_factory(server).broadcast(
        cent.BroadcastRequest(channels=["chat:b1", "chat:b2", "nowhere:b3"], data={"all": True})
    )
    first, second, missing = result.responses
    assert first.result is not None and first.result.offset == 1
    assert second.result is not None and second.result.offset == 1
    assert missing.error is not None and missing.error.code == 102
    for events in (one, two):
        ctx = await events.wait_for("publication")
        assert (ctx.pub.data, ctx.pub.offset) == ({"all": True}, 1)


async def test_api_disconnect_with_custom_reconnect_code(
    server_factory: ServerFactory,
    make_token: TokenMaker,
    py_connect: PyConnect,
    api_factory: Callable[[ServerProcess], cent.AsyncClient],
) -> None:
    server = server_factory(CONFIG)
    conn = await py_connect(server, make_token("42"))
    first_id = conn.client.client_id
    await api_factory(server).disconnect(
        cent.DisconnectRequest(user="42", disconnect=cent.Disconnect(code=4000, reason="go away"))
    )
    # 4000-4499 reconnect: the SDK goes to connecting with the code, then connects again.
    ctx = await conn.events.wait_for("connecting", lambda ctx: ctx.code == 4000)
    assert ctx.reason == "go away"
    await conn.events.wait_count("connected", 2)
    assert conn.client.client_id != first_id
    assert conn.events.of("disconnected") == []


def test_js_api_disconnect_with_terminal_code(
    server_factory: ServerFactory, make_token: TokenMaker, js_client: JsClient
) -> None:
    server = server_factory(CONFIG)
    steps = [
        {"op": "connect"},
        {
            "op": "api",
            "method": "disconnect",
            "payload": {"user": "js", "disconnect": {"code": 4500, "reason": "bye"}},
        },
        {"op": "waitState", "state": "disconnected"},
    ]
    events = js_client(js_scenario(server, steps, token=make_token("js")))
    assert [(e["code"], e["reason"]) for e in js_of(events, "disconnected")] == [(4500, "bye")]


async def test_api_unsubscribe(
    server_factory: ServerFactory,
    make_token: TokenMaker,
    py_connect: PyConnect,
    api_factory: Callable[[ServerProcess], cent.AsyncClient],
) -> None:
    server = server_factory(CONFIG)
    conn = await py_connect(server, make_token("42"))
    sub, events = await conn.subscribe("chat:unsub")
    await api_factory(server).unsubscribe(cent.UnsubscribeRequest(user="42", channel="chat:unsub"))
    ctx = await events.wait_for("unsubscribed")
    assert (ctx.code, ctx.reason) == (2000, "server unsubscribe")
    assert sub.state == SubscriptionState.UNSUBSCRIBED
    assert conn.client.state == ClientState.CONNECTED


def test_js_api_unsubscribe(
    server_factory: ServerFactory, make_token: TokenMaker, js_client: JsClient
) -> None:
    server = server_factory(CONFIG)
    steps = [
        {"op": "connect"},
        {"op": "subscribe", "channel": "chat:jsunsub"},
        {
            "op": "api",
            "method": "unsubscribe",
            "payload": {"user": "js", "channel": "chat:jsunsub"},
        },
        {"op": "waitSubState", "channel": "chat:jsunsub", "state": "unsubscribed"},
        {"op": "assertState", "state": "connected"},
    ]
    events = js_client(js_scenario(server, steps, token=make_token("js")))
    (unsubscribed,) = js_of(events, "unsubscribed", channel="chat:jsunsub")
    assert unsubscribed["code"] == 2000


# --- token expiry and refresh --------------------------------------------------------------

EXPIRY = {**CONFIG, "client_expired_close_delay": "1s"}


async def test_expiring_token_is_refreshed_and_connection_stays(
    server_factory: ServerFactory, make_token: TokenMaker, py_connect: PyConnect
) -> None:
    server = server_factory(EXPIRY)
    refreshed = asyncio.Event()

    async def get_token() -> str:
        refreshed.set()
        return make_token("42", exp_in=3600)

    conn = await py_connect(server, make_token("42", exp_in=3), get_token=get_token)
    _, sub = await conn.subscribe("chat:refresh")
    await asyncio.wait_for(refreshed.wait(), timeout=8)
    # Past exp + client_expired_close_delay with a margin: nothing may have happened.
    await asyncio.sleep(3)
    assert conn.events.first("connecting", lambda ctx: ctx.code != 0) is None  # 0: connect()
    assert conn.client.state == ClientState.CONNECTED
    assert len(conn.events.of("connected")) == 1
    await server.api_async("publish", {"channel": "chat:refresh", "data": {"still": "here"}})
    ctx = await sub.wait_for("publication")
    assert ctx.pub.data == {"still": "here"}


async def test_expired_token_without_refresh_closes_3005(
    server_factory: ServerFactory, make_token: TokenMaker, py_connect: PyConnect
) -> None:
    server = server_factory(EXPIRY)
    conn = await py_connect(server, make_token("42", exp_in=2))
    ctx = await conn.events.wait_for("connecting", lambda ctx: ctx.code != 0, within=8)
    assert (ctx.code, ctx.reason) == (3005, "connection expired")


def test_js_refreshes_token_with_get_token(
    server_factory: ServerFactory, make_token: TokenMaker, js_client: JsClient
) -> None:
    server = server_factory(EXPIRY)
    steps = [
        {"op": "connect"},
        {"op": "subscribe", "channel": "chat:jsrefresh"},
        {"op": "waitEvent", "match": {"event": "getToken", "index": 0}, "timeoutMs": 8000},
        {"op": "sleep", "ms": 3000},
        {"op": "assertState", "state": "connected"},
        {
            "op": "api",
            "method": "publish",
            "payload": {"channel": "chat:jsrefresh", "data": {"still": "here"}},
        },
        {"op": "waitPublications", "channel": "chat:jsrefresh", "count": 1},
    ]
    scenario = js_scenario(
        server, steps, token=make_token("js", exp_in=3), tokens=[make_token("js", exp_in=3600)]
    )
    events = js_client(scenario)
    assert len(js_of(events, "connected")) == 1
    assert [e["code"] for e in js_of(events, "connecting")] == [0]  # only "connect called"
    assert js_of(events, "disconnected") == []


# --- history and recovery ----------------------------------------------------------------


async def test_history_via_sdk(
    server_factory: ServerFactory, make_token: TokenMaker, py_connect: PyConnect
) -> None:
    server = server_factory(CONFIG)
    epochs = {
        server.api_result("publish", {"channel": "chat:h", "data": {"n": n}})["epoch"]
        for n in range(1, 6)
    }
    conn = await py_connect(server, make_token("42"))
    sub, _ = await conn.subscribe("chat:h")

    first = await sub.history(limit=2)
    assert [p.offset for p in first.publications] == [1, 2]
    assert [p.data for p in first.publications] == [{"n": 1}, {"n": 2}]
    assert (first.offset, {first.epoch}) == (5, epochs)
    latest = await sub.history(limit=2, reverse=True)
    assert [p.offset for p in latest.publications] == [5, 4]
    position_only = await sub.history()
    assert (position_only.publications, position_only.offset) == ([], 5)
    since = await sub.history(limit=10, since=StreamPosition(offset=3, epoch=first.epoch))
    assert [p.offset for p in since.publications] == [4, 5]
    with pytest.raises(ReplyError) as wrong_epoch:
        await sub.history(limit=10, since=StreamPosition(offset=3, epoch="not-the-epoch"))
    assert wrong_epoch.value.code == 112


def test_js_history(
    server_factory: ServerFactory, make_token: TokenMaker, js_client: JsClient
) -> None:
    server = server_factory(CONFIG)
    for n in range(1, 6):
        server.api_result("publish", {"channel": "chat:jsh", "data": {"n": n}})
    steps = [
        {"op": "connect"},
        {"op": "subscribe", "channel": "chat:jsh"},
        {"op": "history", "channel": "chat:jsh", "options": {"limit": 3}},
    ]
    events = js_client(js_scenario(server, steps, token=make_token("js")))
    (history,) = js_results(events, "history")
    assert [p["offset"] for p in history["publications"]] == [1, 2, 3]
    assert [p["data"] for p in history["publications"]] == [{"n": 1}, {"n": 2}, {"n": 3}]
    assert history["offset"] == 5 and history["epoch"]


async def test_recovery_after_reconnect(
    server_factory: ServerFactory, make_token: TokenMaker, py_connect: PyConnect
) -> None:
    server = server_factory(CONFIG)
    conn = await py_connect(server, make_token("42"))
    _, events = await conn.subscribe("chat:rec", recoverable=True)
    for n in (1, 2):
        await server.api_async("publish", {"channel": "chat:rec", "data": {"n": n}})
    await events.wait_count("publication", 2)

    await conn.client.disconnect()
    for n in range(3, 8):
        await server.api_async("publish", {"channel": "chat:rec", "data": {"n": n}})
    await conn.client.connect()
    resubscribed = await events.wait_for("subscribed", lambda ctx: ctx.was_recovering)
    assert resubscribed.recovered is True
    await events.wait_count("publication", 7)
    for n in (8, 9):
        await server.api_async("publish", {"channel": "chat:rec", "data": {"n": n}})
    await events.wait_count("publication", 9)
    assert events.offsets() == list(range(1, 10))
    assert [ctx.pub.data["n"] for ctx in events.of("publication")] == list(range(1, 10))


def test_js_recovery_after_reconnect(
    server_factory: ServerFactory, make_token: TokenMaker, js_client: JsClient
) -> None:
    server = server_factory(CONFIG)

    def publish(n: int) -> dict[str, Any]:
        payload = {"channel": "chat:jsrec", "data": {"n": n}}
        return {"op": "api", "method": "publish", "payload": payload}

    steps = [
        {"op": "connect"},
        {"op": "subscribe", "channel": "chat:jsrec", "options": {"recoverable": True}},
        publish(1),
        publish(2),
        {"op": "waitPublications", "channel": "chat:jsrec", "count": 2},
        {"op": "disconnect"},
        *[publish(n) for n in range(3, 8)],
        {"op": "connect"},
        {"op": "waitPublications", "channel": "chat:jsrec", "count": 7},
        publish(8),
        {"op": "waitPublications", "channel": "chat:jsrec", "count": 8},
    ]
    events = js_client(js_scenario(server, steps, token=make_token("js")))
    subscribed = js_of(events, "subscribed", channel="chat:jsrec")
    assert len(subscribed) == 2
    assert subscribed[1]["wasRecovering"] is True and subscribed[1]["recovered"] is True
    pubs = js_of(events, "publication", channel="chat:jsrec")
    assert [p["offset"] for p in pubs] == list(range(1, 9))
    assert [p["data"]["n"] for p in pubs] == list(range(1, 9))


async def test_history_and_recovery_survive_restart(
    server_factory: ServerFactory, make_token: TokenMaker, py_connect: PyConnect
) -> None:
    server = server_factory(CONFIG)
    conn = await py_connect(server, make_token("42"))
    _, events = await conn.subscribe("chat:restart", recoverable=True)
    epochs = set()
    for n in (1, 2):
        result = await server.api_async("publish", {"channel": "chat:restart", "data": {"n": n}})
        epochs.add(result["result"]["epoch"])
    await events.wait_count("publication", 2)

    await asyncio.to_thread(server.restart)  # SIGTERM: clients are told 3001 "shutdown"
    shutdown = await conn.events.wait_for("connecting", lambda ctx: ctx.code != 0)
    assert shutdown.code == 3001
    for n in (3, 4):
        result = await server.api_async("publish", {"channel": "chat:restart", "data": {"n": n}})
        epochs.add(result["result"]["epoch"])
    await events.wait_count("publication", 4, within=15)
    assert events.offsets() == [1, 2, 3, 4]
    assert len(epochs) == 1  # the stream survived in the SQL log

    # SIGKILL: every acknowledged publication was committed before the answer.
    await asyncio.to_thread(server.kill)
    await asyncio.to_thread(server.start)
    history = server.api_result("history", {"channel": "chat:restart", "limit": -1})
    assert [p["offset"] for p in history["publications"]] == [1, 2, 3, 4]
    assert {history["epoch"]} == epochs
