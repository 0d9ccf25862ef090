"""The HTTP server API on a real Tornado server (free port on 127.0.0.1), called with raw
HTTP requests and with the real `cent` 5.x clients. The executor runs against a real Node
on the memory event log; the live-connection side is the recording fake of the engine
tests."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import cent
import orjson
import pytest
import requests
from tornado.httpclient import AsyncHTTPClient, HTTPResponse
from tornado.httpserver import HTTPServer
from tornado.testing import bind_unused_port
from tornado.web import Application

from centripy.engine.api import Executor
from centripy.engine.config import Config
from centripy.engine.node import Node
from centripy.engine.options import ChannelOptions, Namespace
from centripy.engine.sessions import ServerSubscribe
from centripy.storage.memory import MemoryEventLog
from centripy.storage.presence_memory import MemoryPresence
from centripy.storage.writer import GroupCommitWriter
from centripy.transports.api_http import InFlight, api_key_valid, api_routes
from centripy.transports.api_lean import LeanHTTPServer
from tests.engine.test_api import RecordingSessions

KEY = "secret"
NAMESPACES = (
    Namespace("chat", ChannelOptions(history_size=10, history_ttl=300, presence=True)),
    Namespace("plain", ChannelOptions()),
)


@dataclass
class Server:
    base: str  # http://127.0.0.1:<port>
    prefix: str
    node: Node
    sessions: RecordingSessions
    inflight: InFlight

    @property
    def api(self) -> str:
        return self.base + self.prefix

    async def post(
        self, path: str, body: bytes | dict[str, Any] = b"{}", headers: dict[str, str] | None = None
    ) -> HTTPResponse:
        raw = body if isinstance(body, bytes) else orjson.dumps(body)
        all_headers = {"X-API-Key": KEY, **(headers or {})}
        return await request(self.api + path, "POST", raw, all_headers)


async def request(
    url: str, method: str = "POST", body: bytes | None = b"", headers: dict[str, str] | None = None
) -> HTTPResponse:
    return await AsyncHTTPClient().fetch(
        url,
        method=method,
        body=body,
        headers=headers or {},
        raise_error=False,
        allow_nonstandard_methods=True,
        request_timeout=10,
    )


Start = Callable[..., Awaitable[Server]]


@pytest.fixture(params=["tornado", "lean"])
async def start(request: pytest.FixtureRequest) -> AsyncIterator[Start]:
    """Servers of Tornado's own HTTPServer, or of LeanHTTPServer (API requests answered
    on its lean path): every test runs on both."""
    lean = request.param == "lean"
    cleanups: list[Callable[[], Awaitable[None]]] = []

    async def _start(sessions: RecordingSessions | None = None, **overrides: Any) -> Server:
        config = Config(**{"api_key": KEY, "namespaces": NAMESPACES, **overrides})
        log = MemoryEventLog()
        await log.start()
        writer = GroupCommitWriter(log, max_delay=0.0)
        await writer.start()
        node = Node(config, log, writer.submit_many, MemoryPresence())
        sessions = sessions or RecordingSessions()
        sessions.node = node
        inflight = InFlight()
        app = Application(api_routes(Executor(node, sessions), config, inflight))
        sock, port = bind_unused_port()
        http = LeanHTTPServer(app, lean_api=True) if lean else HTTPServer(app)
        http.add_sockets([sock])

        async def stop() -> None:
            http.stop()
            await http.close_all_connections()
            await writer.close()

        cleanups.append(stop)
        prefix = config.api_handler_prefix.rstrip("/")
        return Server(f"http://127.0.0.1:{port}", prefix, node, sessions, inflight)

    yield _start
    for cleanup in cleanups:
        await cleanup()


@pytest.fixture
async def server(start: Start) -> Server:
    return await start()


def body_of(response: HTTPResponse) -> Any:
    return orjson.loads(response.body)


# --- auth, methods, routing ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "query", "ok"),
    [
        ({"X-API-Key": KEY}, "", True),
        ({"X-API-Key": "wrong"}, "", False),
        ({"X-API-Key": "wrong"}, "?api_key=secret", True),
        ({"Authorization": "apikey secret"}, "", True),
        ({"Authorization": "APIKey   secret"}, "", True),
        ({"Authorization": "Bearer secret"}, "", False),
        ({"Authorization": "apikey secret extra"}, "", False),
        ({"X-API-Key": "wrong", "Authorization": "apikey secret"}, "", False),
        ({}, "?api_key=secret", True),
        ({}, "?api_key=nope&x=1", False),
        ({}, "", False),
    ],
)
async def test_api_key_variants(
    server: Server, headers: dict[str, str], query: str, ok: bool
) -> None:
    response = await request(server.api + "/info" + query, "POST", b"{}", headers)
    if ok:
        assert response.code == 200
        assert list(body_of(response)["result"]) == ["nodes"]
    else:
        assert (response.code, response.body) == (401, b"")


async def test_empty_api_key_refuses_everything(start: Start) -> None:
    server = await start(api_key="")
    response = await request(server.api + "/info", "POST", b"{}", {"X-API-Key": ""})
    assert (response.code, response.body) == (401, b"")
    assert (await request(server.api + "/info?api_key=", "POST", b"{}")).code == 401


async def test_api_insecure_skips_the_key(start: Start) -> None:
    server = await start(api_key="", api_insecure=True)
    response = await request(server.api + "/publish", "POST", b'{"channel":"a","data":1}')
    assert (response.code, body_of(response)) == (200, {"result": {}})


def test_api_key_valid_pure() -> None:
    assert api_key_valid("k", "k", "", "")
    assert not api_key_valid("", "", "", "api_key=")
    assert not api_key_valid("k", "", "apikey", "")
    assert api_key_valid("k", "", "", "a=1&api_key=k&api_key=z")
    assert not api_key_valid("k", "", "", "api_key=z&api_key=k")  # the first value counts


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "PATCH", "OPTIONS"])
async def test_only_post_is_allowed(server: Server, method: str) -> None:
    body = None if method in ("GET", "DELETE", "OPTIONS") else b"{}"
    for path in ("/publish", "", "/unknown"):
        response = await request(server.api + path, method, body)  # no key: 405 comes first
        assert (response.code, response.body) == (405, b"")


async def test_unknown_method_is_404_after_auth(server: Server) -> None:
    for path in ("/connections", "/block_user", "/publish/x", "/"):
        response = await server.post(path)
        assert response.code == 404, path
    assert (await request(server.api + "/connections", "POST", b"{}")).code == 401


async def test_custom_prefix(start: Start) -> None:
    server = await start(api_handler_prefix="/custom/api/")
    assert server.prefix == "/custom/api"
    assert (await server.post("/info")).code == 200
    legacy = await server.post("", b'{"method":"info"}')
    assert legacy.code == 200 and "nodes" in body_of(legacy)["result"]
    assert (await request(server.base + "/api/info", "POST", b"{}", {"X-API-Key": KEY})).code == 404


# --- new-format envelope and errors ----------------------------------------------------------


async def test_publish_envelope(server: Server) -> None:
    response = await server.post("/publish", {"channel": "chat:a", "data": {"t": 1}})
    assert response.code == 200
    assert response.headers["Content-Type"] == "application/json"
    result = body_of(response)["result"]
    assert result["offset"] == 1 and result["epoch"]
    plain = await server.post("/publish", {"channel": "news", "data": {"t": 1}})
    assert body_of(plain) == {"result": {}}


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"   ",
        b"{",
        b"[]",
        b"1",
        b'{"channel": 1, "data": 1}',
        b'{"channel":"a","data":1,"tags":{"k":2}}',
        b"{} {}",
    ],
)
async def test_undecodable_bodies_are_400(server: Server, body: bytes) -> None:
    response = await server.post("/publish", body)
    assert (response.code, response.body) == (400, b"Bad Request\n")
    assert response.headers["Content-Type"].startswith("text/plain")


async def test_info_needs_a_json_body(server: Server) -> None:
    assert (await server.post("/info", b"")).code == 400
    assert (await server.post("/info", b"null")).code == 200


async def test_errors_in_the_default_mode_are_200(server: Server) -> None:
    response = await server.post("/publish", {"channel": "", "data": 1})
    assert (response.code, body_of(response)) == (
        200,
        {"error": {"code": 107, "message": "bad request"}},
    )


@pytest.mark.parametrize(
    ("path", "body", "status", "code"),
    [
        ("/publish", {"data": 1}, 400, 107),
        ("/publish", {"channel": "x:y", "data": 1}, 404, 102),
        ("/presence", {"channel": "plain:a"}, 400, 108),
        ("/rpc", {"method": "m"}, 404, 104),
        ("/history", {"channel": "chat:a", "since": {"offset": 1, "epoch": "no"}}, 416, 112),
    ],
)
async def test_transport_error_mode_by_header(
    server: Server, path: str, body: dict[str, Any], status: int, code: int
) -> None:
    response = await server.post(path, body, {"X-Centrifugo-Error-Mode": "transport"})
    assert response.code == status
    assert body_of(response)["code"] == code and "error" not in body_of(response)


async def test_transport_error_mode_by_config(start: Start) -> None:
    server = await start(api_error_mode="transport")
    response = await server.post("/publish", {"channel": "x:y", "data": 1})
    assert (response.code, body_of(response)) == (404, {"code": 102, "message": "unknown channel"})
    broadcast = await server.post("/broadcast", {"channels": ["x:y"], "data": 1})
    assert broadcast.code == 200  # per-channel errors stay inside responses
    assert body_of(broadcast)["result"]["responses"][0]["error"]["code"] == 102
    batch = await server.post("/batch", {"commands": [{"publish": {"data": 1}}]})
    assert (batch.code, body_of(batch)) == (
        200,
        {"replies": [{"error": {"code": 107, "message": "bad request"}}]},
    )


async def test_batch_is_not_wrapped_in_result(server: Server) -> None:
    response = await server.post("/batch", {"commands": []})
    assert body_of(response) == {}
    bad = await server.post("/batch", {"commands": [{"publish": {"channel": 5}}]})
    assert bad.code == 400


# --- legacy format ---------------------------------------------------------------------------


async def test_legacy_commands_are_answered_in_order(server: Server) -> None:
    body = b"\n".join(
        [
            b'{"id":1,"method":"publish","params":{"channel":"chat:a","data":{"x":1}}}',
            b'{"id":2,"method":6,"params":{"channel":"chat:a","limit":-1}}',
            b'{"method":"PRESENCE_STATS","params":{"channel":"chat:a"}}',
            b'{"id":4,"params":{"channel":"news","data":"no method means publish"}}',
            b'  {"id":5,"method":"info"}  ',
            b'{"id":6,"method":13,"params":{}}',
            b'{"id":7,"method":"connections","params":{}}',
            b'{"id":8,"method":"publish"}',
            b'{"id":9,"method":"publish","params":{"channel":1}}',
            b'{"id":10,"method":"publish","params":null}',
            b"",
        ]
    )
    response = await server.post("", body)
    assert response.code == 200
    assert response.headers["Content-Type"] == "application/json"
    lines = response.body.split(b"\n")
    replies = [orjson.loads(line) for line in lines]
    assert len(replies) == 10
    assert replies[0]["id"] == 1 and replies[0]["result"]["offset"] == 1
    assert [p["data"] for p in replies[1]["result"]["publications"]] == [{"x": 1}]
    assert replies[2] == {"result": {"num_clients": 0, "num_users": 0}}
    assert replies[3] == {"id": 4, "result": {}}
    assert replies[4]["id"] == 5 and "nodes" in replies[4]["result"]
    not_found = {"code": 104, "message": "not found"}
    bad_request = {"code": 107, "message": "bad request"}
    assert replies[5:] == [
        {"id": 6, "error": not_found},
        {"id": 7, "error": not_found},
        {"id": 8, "error": bad_request},
        {"id": 9, "error": bad_request},
        {"id": 10, "error": bad_request},
    ]


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b'{"method":"batch","params":{}}',
        b'{"method":"nonsense","params":{}}',
        b'{"method":null,"params":{}}',
        b'{"id":-1,"method":"info"}',
        b'{"id":"1","method":"info"}',
        b'{"method":"info"} [1]',
        b'{"method":"info"} {',
    ],
)
async def test_legacy_bad_bodies_are_400(server: Server, body: bytes) -> None:
    response = await server.post("", body)
    assert (response.code, response.body) == (400, b"Bad Request\n")


async def test_legacy_answers_503_while_shutting_down(server: Server) -> None:
    server.node.shutting_down = True
    assert (await server.post("", b'{"method":"info"}')).code == 503
    assert (await server.post("/info")).code == 200  # new-format routes keep working


async def test_legacy_ignores_error_mode(server: Server) -> None:
    response = await server.post(
        "", b'{"method":"publish","params":{}}', {"X-Centrifugo-Error-Mode": "transport"}
    )
    assert (response.code, body_of(response)) == (
        200,
        {"error": {"code": 107, "message": "bad request"}},
    )


# --- in-flight tracking ----------------------------------------------------------------------


class BlockingSessions(RecordingSessions):
    def __init__(self) -> None:
        super().__init__()
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    async def subscribe(self, cmd: ServerSubscribe) -> None:
        self.entered.set()
        await asyncio.wait_for(self.release.wait(), 10)


async def test_inflight_waits_for_calls_in_progress(start: Start) -> None:
    sessions = BlockingSessions()
    server = await start(sessions=sessions)
    assert await server.inflight.wait_idle(0)
    call = asyncio.ensure_future(server.post("/subscribe", {"user": "1", "channel": "news"}))
    await asyncio.wait_for(sessions.entered.wait(), 10)
    assert server.inflight.count == 1
    assert not await server.inflight.wait_idle(0.01)
    sessions.release.set()
    assert await server.inflight.wait_idle(10)
    assert body_of(await call) == {"result": {}}


# --- the real cent clients -------------------------------------------------------------------


async def test_cent_async_client_methods(server: Server) -> None:
    async with cent.AsyncClient(server.api, KEY) as client:
        published = await client.publish(
            cent.PublishRequest(channel="chat:a", data={"t": 1}, tags={"k": "v"})
        )
        assert published.offset == 1 and published.epoch
        broadcast = await client.broadcast(
            cent.BroadcastRequest(channels=["chat:a", "x:y"], data={"t": 2})
        )
        assert broadcast.responses[0].result is not None
        assert broadcast.responses[0].result.offset == 2
        assert broadcast.responses[1].error is not None and broadcast.responses[1].error.code == 102
        history = await client.history(cent.HistoryRequest(channel="chat:a", limit=-1))
        assert [p.data for p in history.publications] == [{"t": 1}, {"t": 2}]
        assert history.publications[0].tags == {"k": "v"}
        assert history.offset == 2 and history.epoch == published.epoch
        reverse = await client.history(
            cent.HistoryRequest(
                channel="chat:a",
                limit=1,
                reverse=True,
                since=cent.StreamPosition(offset=2, epoch=published.epoch),
            )
        )
        assert [p.offset for p in reverse.publications] == [1]
        presence = await client.presence(cent.PresenceRequest(channel="chat:a"))
        assert presence.presence == {}
        stats = await client.presence_stats(cent.PresenceStatsRequest(channel="chat:a"))
        assert (stats.num_clients, stats.num_users) == (0, 0)
        await client.history_remove(cent.HistoryRemoveRequest(channel="chat:a"))
        await client.subscribe(
            cent.SubscribeRequest(
                user="42",
                channel="chat:a",
                override=cent.ChannelOptionsOverride(presence=cent.BoolValue(value=True)),
            )
        )
        await client.unsubscribe(cent.UnsubscribeRequest(user="42", channel="chat:a"))
        await client.disconnect(
            cent.DisconnectRequest(user="42", disconnect=cent.Disconnect(code=4000, reason="x"))
        )
        await client.refresh(cent.RefreshRequest(user="42", expired=True))
        server.sessions.counts = {"chat:a": 2}
        channels = await client.channels(cent.ChannelsRequest(pattern="chat:*"))
        assert channels.channels["chat:a"].num_clients == 2
        info = await client.info(cent.InfoRequest())
        assert info.nodes[0].uid == server.node.uid and info.nodes[0].version == "5.2.2"
    assert [name for name, _ in server.sessions.calls] == [
        "subscribe",
        "unsubscribe",
        "disconnect",
        "refresh",
    ]
    subscribe = server.sessions.calls[0][1]
    assert isinstance(subscribe, ServerSubscribe) and subscribe.override is not None
    assert subscribe.override.presence is True


async def test_cent_async_client_errors(server: Server) -> None:
    async with cent.AsyncClient(server.api, KEY) as client:
        with pytest.raises(cent.CentApiResponseError) as error:
            await client.publish(cent.PublishRequest(channel="x:y", data={}))
        assert (error.value.code, error.value.message) == (102, "unknown channel")
        with pytest.raises(cent.CentApiResponseError) as unavailable:
            await client.history(cent.HistoryRequest(channel="plain:a"))
        assert unavailable.value.code == 108
    async with cent.AsyncClient(server.api, "wrong") as client:
        with pytest.raises(cent.CentUnauthorizedError):
            await client.info(cent.InfoRequest())


@pytest.mark.parametrize("parallel", [False, True])
async def test_cent_batch(server: Server, parallel: bool) -> None:
    async with cent.AsyncClient(server.api, KEY) as client:
        result = await client.batch(
            cent.BatchRequest(
                requests=[
                    cent.PublishRequest(channel="chat:a", data={"n": 1}),
                    cent.BroadcastRequest(channels=["chat:b", "news"], data={"n": 2}),
                    cent.PresenceStatsRequest(channel="chat:a"),
                    cent.InfoRequest(),
                ],
                parallel=parallel,
            )
        )
    publish, broadcast, stats, info = result.replies
    assert isinstance(publish, cent.PublishResult) and publish.offset == 1
    assert isinstance(broadcast, cent.BroadcastResult) and len(broadcast.responses) == 2
    assert isinstance(stats, cent.PresenceStatsResult) and stats.num_clients == 0
    assert isinstance(info, cent.InfoResult) and len(info.nodes) == 1


async def test_cent_sync_client_from_a_thread(server: Server) -> None:
    session = requests.Session()
    session.trust_env = False  # never route 127.0.0.1 through an environment proxy
    client = cent.Client(server.api, KEY, session=session)
    try:
        result = await asyncio.to_thread(
            client.publish, cent.PublishRequest(channel="chat:a", data={"sync": True})
        )
        assert result.offset == 1
        with pytest.raises(cent.CentApiResponseError):
            await asyncio.to_thread(client.publish, cent.PublishRequest(channel="", data={}))
    finally:
        client.close()
