"""The SockJS endpoint (docs/spec/protocol.md 5.3, SockJS protocol 0.3) on a real centripy
process, driven with raw HTTP (asyncio streams, so streaming bodies can be read frame by
frame and dropped mid-way) and raw WebSockets. The session state machine alone, with a
recording receiver, is tested in tests/transports/test_sockjs.py."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import tornado.escape
import tornado.httpclient
import tornado.websocket

from tests.integration.conftest import make_jwt
from tests.support.server import ServerFactory, ServerProcess
from tests.support.wait import eventually

pytestmark = [pytest.mark.integration, pytest.mark.timeout(30)]

PREFIX = "/connection/sockjs"
CONFIG: dict[str, Any] = {
    "api_key": "sockjs-key",
    "token_hmac_secret_key": "sockjs-secret",
    "sockjs": True,
    "sockjs_url": "https://cdn.example.com/sockjs-1.6.1.min.js",
    "namespaces": [{"name": "chat", "allow_subscribe_for_client": True}],
    "log_level": "info",
}
WAIT = 5.0


# --- a raw HTTP/1.1 client ---------------------------------------------------------------


class Raw:
    """One HTTP response read incrementally (chunked, Content-Length or until EOF)."""

    def __init__(
        self, status: int, headers: dict[str, str], reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter, bodyless: bool,
    ) -> None:  # fmt: skip
        self.status = status
        self.headers = headers
        self.body = b""
        self.ended = bodyless
        self._reader = reader
        self._writer = writer

    async def read_more(self) -> bool:
        """Read the next piece of the body; False once the body has ended."""
        if self.ended:
            return False
        reader = self._reader
        if self.headers.get("transfer-encoding") == "chunked":
            size = int((await reader.readline()).split(b";")[0], 16)
            if size == 0:
                await reader.readline()
                self.ended = True
                return False
            self.body += (await reader.readexactly(size + 2))[:-2]
        elif "content-length" in self.headers:
            self.body += await reader.readexactly(int(self.headers["content-length"]))
            self.ended = True
        else:
            data = await reader.read(65536)
            self.body += data
            self.ended = not data
        return True

    async def read_until(self, predicate: Callable[[bytes], bool], within: float = WAIT) -> bytes:
        async with asyncio.timeout(within):
            while not predicate(self.body):
                if not await self.read_more():
                    raise AssertionError(f"response ended before the condition: {self.body!r}")
        return self.body

    async def read_all(self, within: float = WAIT) -> bytes:
        async with asyncio.timeout(within):
            while await self.read_more():
                pass
        return self.body

    def close(self) -> None:
        self._writer.close()


async def open_request(
    port: int, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
) -> Raw:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    lines = [
        f"{method} {path} HTTP/1.1",
        f"Host: 127.0.0.1:{port}",
        f"Content-Length: {len(body)}",
        "Connection: close",
        *(f"{key}: {value}" for key, value in (headers or {}).items()),
    ]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
    async with asyncio.timeout(WAIT):
        status = int((await reader.readline()).split()[1])
        parsed: dict[str, str] = {}
        while (line := await reader.readline()) not in (b"\r\n", b""):
            key, _, value = line.decode().partition(":")
            parsed[key.strip().lower()] = value.strip()
    return Raw(status, parsed, reader, writer, status in (204, 304))


async def fetch(
    port: int, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
) -> Raw:
    response = await open_request(port, method, path, body, headers)
    try:
        await response.read_all()
    finally:
        response.close()
    return response


# --- protocol helpers --------------------------------------------------------------------


def command(cmd_id: int, method: str, body: dict[str, Any]) -> str:
    return json.dumps({"id": cmd_id, method: body})


def replies(frame: bytes) -> list[dict[str, Any]]:
    """The Centrifuge replies of one `a[...]` frame (each message holds newline-joined ones)."""
    assert frame.startswith(b"a["), frame
    return [json.loads(line) for message in json.loads(frame[1:]) for line in message.split("\n")]


def frames_of(body: bytes, prelude: bytes = b"") -> list[bytes]:
    assert body.startswith(prelude)
    return [frame for frame in body[len(prelude) :].split(b"\n") if frame]


class XhrSession:
    """A SockJS session driven through `xhr` polling and `xhr_send`."""

    def __init__(self, port: int, session_id: str | None = None) -> None:
        self.port = port
        self.path = f"{PREFIX}/000/{session_id or uuid.uuid4().hex}"

    async def poll(self) -> bytes:
        response = await fetch(self.port, "POST", self.path + "/xhr")
        assert response.status == 200, response.body
        assert response.headers["content-type"] == "application/javascript; charset=UTF-8"
        assert response.body.endswith(b"\n")
        return response.body[:-1]

    async def send(self, *messages: str) -> Raw:
        return await fetch(
            self.port, "POST", self.path + "/xhr_send", json.dumps(messages).encode()
        )

    async def poll_replies(self, count: int) -> list[dict[str, Any]]:
        """Poll until `count` replies arrived (replies may be split over several polls)."""
        got: list[dict[str, Any]] = []
        async with asyncio.timeout(WAIT):
            while len(got) < count:
                frame = await self.poll()
                if frame != b"h":
                    got.extend(replies(frame))
        return got

    async def connect(self, user: str) -> dict[str, Any]:
        assert await self.poll() == b"o"
        token = make_jwt(user, secret=CONFIG["token_hmac_secret_key"])
        assert (await self.send(command(1, "connect", {"token": token}))).status == 204
        (reply,) = await self.poll_replies(1)
        return reply


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    factory = ServerFactory(tmp_path_factory.mktemp("sockjs"), CONFIG)
    yield factory()
    problems = factory.stop_all()
    assert not problems, problems


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Callable[[dict[str, Any]], ServerProcess]]:
    factory = ServerFactory(tmp_path, CONFIG)
    yield lambda extra: factory(extra)
    for srv in factory.servers:
        print(srv.diagnostics())
    assert not factory.stop_all()


async def publish(server: ServerProcess, channel: str, data: Any) -> None:
    result = await server.api_async("publish", {"channel": channel, "data": data})
    assert "error" not in result, result


async def disconnect(server: ServerProcess, user: str) -> None:
    assert "error" not in await server.api_async("disconnect", {"user": user})


# --- static endpoints --------------------------------------------------------------------


async def test_greeting(server: ServerProcess) -> None:
    for path in (PREFIX, PREFIX + "/"):
        response = await fetch(server.port, "GET", path)
        assert response.status == 200
        assert response.body == b"Welcome to SockJS!\n"
        assert response.headers["content-type"].startswith("text/plain")


async def test_info(server: ServerProcess) -> None:
    response = await fetch(server.port, "GET", PREFIX + "/info")
    assert response.status == 200
    assert response.headers["content-type"] == "application/json; charset=UTF-8"
    assert response.headers["cache-control"] == "no-store, no-cache, must-revalidate, max-age=0"
    assert response.headers["access-control-allow-origin"] == "*"
    doc = json.loads(response.body)
    assert {k: v for k, v in doc.items() if k != "entropy"} == {
        "websocket": True, "cookie_needed": False, "origins": ["*:*"],
    }  # fmt: skip
    assert isinstance(doc["entropy"], int) and 0 <= doc["entropy"] < 2**31
    preflight = await fetch(server.port, "OPTIONS", PREFIX + "/info")
    assert preflight.status == 204
    assert preflight.headers["access-control-allow-methods"] == "OPTIONS, GET"
    assert preflight.headers["cache-control"] == "public, max-age=31536000"
    assert preflight.headers["access-control-max-age"] == "31536000"


async def test_iframe_page(server: ServerProcess) -> None:
    for name in ("iframe.html", "iframe-1.6.1.html", "iframe-abc_1.html"):
        response = await fetch(server.port, "GET", f"{PREFIX}/{name}")
        assert response.status == 200, name
        assert response.headers["content-type"] == "text/html; charset=UTF-8"
        assert (
            b'<script src="https://cdn.example.com/sockjs-1.6.1.min.js"></script>' in response.body
        )
        etag = response.headers["etag"]
    cached = await fetch(
        server.port, "GET", PREFIX + "/iframe.html", headers={"If-None-Match": etag}
    )
    assert cached.status == 304 and cached.body == b""
    assert (await fetch(server.port, "GET", PREFIX + "/iframe.htm")).status == 404


async def test_raw_websocket_endpoint_is_disabled(server: ServerProcess) -> None:
    assert (await fetch(server.port, "GET", PREFIX + "/websocket")).status == 404
    with pytest.raises(tornado.httpclient.HTTPClientError) as info:
        await tornado.websocket.websocket_connect(
            f"ws://127.0.0.1:{server.port}{PREFIX}/websocket", connect_timeout=WAIT
        )
    assert info.value.code == 404


# --- xhr polling and xhr_send ------------------------------------------------------------


async def test_xhr_polling_round_trip(server: ServerProcess) -> None:
    session = XhrSession(server.port)
    reply = await session.connect("xhr-user")
    assert reply["id"] == 1 and reply["connect"]["client"]
    assert "session" not in reply["connect"]  # SockJS is not an emulation transport
    assert (await session.send(command(2, "subscribe", {"channel": "chat:xhr"}))).status == 204
    assert await session.poll_replies(1) == [{"id": 2, "subscribe": {}}]
    await publish(server, "chat:xhr", {"text": "hi \u2028 <b>"})
    (push,) = await session.poll_replies(1)
    assert push == {"push": {"channel": "chat:xhr", "pub": {"data": {"text": "hi \u2028 <b>"}}}}
    # Two commands in one message, two messages in one xhr_send: replies in order.
    two = command(3, "presence_stats", {"channel": "nope:x"}) + "\n" + command(4, "rpc", {})
    assert (await session.send(two, command(5, "rpc", {}))).status == 204
    assert [r["id"] for r in await session.poll_replies(3)] == [3, 4, 5]


async def test_xhr_send_errors(server: ServerProcess) -> None:
    path = f"{PREFIX}/000/{uuid.uuid4().hex}"
    unknown = await fetch(server.port, "POST", path + "/xhr_send", b'["x"]')
    assert unknown.status == 404
    session = XhrSession(server.port)
    assert await session.poll() == b"o"
    empty = await fetch(server.port, "POST", session.path + "/xhr_send")
    assert (empty.status, empty.body) == (500, b"Payload expected.")
    broken = await fetch(server.port, "POST", session.path + "/xhr_send", b'["x')
    assert (broken.status, broken.body) == (500, b"Broken JSON encoding.")
    preflight = await fetch(server.port, "OPTIONS", session.path + "/xhr_send")
    assert preflight.status == 204
    assert preflight.headers["access-control-allow-methods"] == "OPTIONS, POST"
    wrong_method = await fetch(server.port, "GET", session.path + "/xhr")
    assert wrong_method.status == 405 and "POST" in wrong_method.headers["allow"]
    assert (await fetch(server.port, "GET", f"{PREFIX}/000/a.b/xhr")).status == 404


async def test_close_frame_carries_the_centrifugo_code_and_lingers(server: ServerProcess) -> None:
    session = XhrSession(server.port)
    assert await session.poll() == b"o"
    await session.send(command(1, "connect", {"token": "not-a-jwt"}))
    assert await session.poll() == b'c[3500,"invalid token"]'
    assert await session.poll() == b'c[3500,"invalid token"]'  # until the session times out
    assert (await session.send("{}")).status == 500

    bad = XhrSession(server.port)
    assert await bad.poll() == b"o"
    await bad.send("this is not a command")
    assert await bad.poll() == b'c[3501,"bad request"]'

    forced = XhrSession(server.port)
    await forced.connect("forced-user")
    waiting = asyncio.ensure_future(forced.poll())
    await disconnect(server, "forced-user")
    assert await asyncio.wait_for(waiting, WAIT) == b'c[3503,"force disconnect"]'


async def test_second_receiver_gets_2010(server: ServerProcess) -> None:
    session = XhrSession(server.port)
    stream = await open_request(server.port, "POST", session.path + "/xhr_streaming")
    try:
        await stream.read_until(lambda body: body.endswith(b"o\n"))
        assert await session.poll() == b'c[2010,"Another connection still open"]'
        await session.send(
            command(1, "connect", {"token": make_jwt("two", secret="sockjs-secret")})
        )
        body = await stream.read_until(lambda body: b"\na[" in body)
        assert b"c[2010" not in body  # the first receiver is untouched
    finally:
        stream.close()


# --- streaming transports ----------------------------------------------------------------


async def test_xhr_streaming_prelude_frames_and_response_limit(server: ServerProcess) -> None:
    session = XhrSession(server.port)
    prelude = b"h" * 2048 + b"\n"
    stream = await open_request(server.port, "POST", session.path + "/xhr_streaming")
    assert stream.headers["content-type"] == "application/javascript; charset=UTF-8"
    await stream.read_until(lambda body: body == prelude + b"o\n")
    token = make_jwt("streamer", secret="sockjs-secret")
    await session.send(
        command(1, "connect", {"token": token})
        + "\n"
        + command(2, "subscribe", {"channel": "chat:big"})
    )
    await stream.read_until(lambda body: b'\\"subscribe\\"' in body)
    big = "x" * 50_000

    def pushed(body: bytes) -> list[int]:
        frames = frames_of(body, prelude)[1:]
        if not body.endswith(b"\n"):
            frames = frames[:-1]  # still arriving
        return [r["push"]["pub"]["data"]["n"] for f in frames for r in replies(f) if "push" in r]

    # Each publication once the previous one is in (publications sent back to back would
    # rightly share a frame): 0 and 1 fit the 128 KiB response limit, 2 goes past it.
    for n in range(3):
        await publish(server, "chat:big", {"n": n, "big": big})
        if n < 2:
            await stream.read_until(lambda body, n=n: n in pushed(body))
    body = await stream.read_all()  # the server ended the response past the limit
    stream.close()
    got = pushed(body)
    assert len(body) - len(prelude) >= 128 * 1024 and got == [0, 1, 2]
    await publish(server, "chat:big", {"n": 3, "big": big})  # for the next request
    again = await open_request(server.port, "POST", session.path + "/xhr_streaming")
    try:
        await again.read_until(lambda body: body.count(b"\n") >= 1 + 4 - len(got))
        rest = [replies(f)[0]["push"]["pub"]["data"]["n"] for f in frames_of(again.body, prelude)]
        assert rest == list(range(len(got), 4))  # no second `o`, nothing lost
    finally:
        again.close()


async def test_eventsource_framing(server: ServerProcess) -> None:
    session = XhrSession(server.port)
    stream = await open_request(server.port, "GET", session.path + "/eventsource")
    try:
        assert stream.headers["content-type"] == "text/event-stream; charset=UTF-8"
        await stream.read_until(lambda body: body == b"\r\ndata: o\r\n\r\n")
        await session.send(command(1, "connect", {"token": make_jwt("es", secret="sockjs-secret")}))
        body = await stream.read_until(lambda body: body.count(b"\r\n\r\n") >= 2)
        event = body.split(b"\r\n\r\n")[1]
        assert event.startswith(b"data: a[")
        assert replies(event[len(b"data: ") :])[0]["connect"]["client"]
    finally:
        stream.close()


async def test_htmlfile_framing(server: ServerProcess) -> None:
    path = f"{PREFIX}/000/{uuid.uuid4().hex}/htmlfile"
    missing = await fetch(server.port, "GET", path)
    assert (missing.status, missing.body) == (500, b'"callback" parameter required')
    invalid = await fetch(server.port, "GET", path + "?c=alert(1)")
    assert invalid.status == 400
    stream = await open_request(server.port, "GET", path + "?c=_jp.cb1")
    try:
        assert stream.headers["content-type"] == "text/html; charset=UTF-8"
        body = await stream.read_until(
            lambda body: body.endswith(b"</script>\r\n") and b'p("o")' in body
        )
        head, frame = body.split(b"\r\n\r\n", 1)
        assert b"var c = parent._jp.cb1;" in head and len(head) >= 1024
        assert frame == b'<script>\np("o");\n</script>\r\n'
    finally:
        stream.close()


async def test_jsonp_polling_and_jsonp_send(server: ServerProcess) -> None:
    path = f"{PREFIX}/000/{uuid.uuid4().hex}"
    opened = await fetch(server.port, "GET", path + "/jsonp?c=cb")
    assert opened.status == 200 and opened.body == b'cb("o");\r\n'
    token = make_jwt("jsonp", secret="sockjs-secret")
    form = "d=" + tornado.escape.url_escape(json.dumps([command(1, "connect", {"token": token})]))
    sent = await fetch(
        server.port, "POST", path + "/jsonp_send", form.encode(),
        {"Content-Type": "application/x-www-form-urlencoded"},
    )  # fmt: skip
    assert (sent.status, sent.body) == (200, b"ok")
    polled = await fetch(server.port, "GET", path + "/jsonp?c=cb")
    assert polled.body.startswith(b"cb(") and polled.body.endswith(b");\r\n")
    frame = json.loads(polled.body[3:-4])
    assert replies(frame.encode())[0]["connect"]["client"]
    raw_body = await fetch(server.port, "POST", path + "/jsonp_send", b"[")
    assert (raw_body.status, raw_body.body) == (400, b"Broken JSON encoding.")


async def test_heartbeats_on_streaming_and_polling(
    start_server: Callable[[dict[str, Any]], ServerProcess],
) -> None:
    srv = start_server({"sockjs_heartbeat_delay": "200ms"})
    session = XhrSession(srv.port)
    stream = await open_request(srv.port, "POST", session.path + "/xhr_streaming")
    try:
        await stream.read_until(lambda body: body.endswith(b"o\nh\nh\n"))
    finally:
        stream.close()
    polling = XhrSession(srv.port)
    assert await polling.poll() == b"o"
    started = time.monotonic()
    assert await polling.poll() == b"h"  # an idle poll ends with a heartbeat
    assert time.monotonic() - started < 2


# --- the websocket session transport -----------------------------------------------------


async def test_websocket_session_transport(server: ServerProcess) -> None:
    url = f"ws://127.0.0.1:{server.port}{PREFIX}/000/{uuid.uuid4().hex}/websocket"
    ws = await tornado.websocket.websocket_connect(url, connect_timeout=WAIT)
    try:
        assert await asyncio.wait_for(ws.read_message(), WAIT) == "o"
        token = make_jwt("ws-user", secret="sockjs-secret")
        await ws.write_message(json.dumps([command(1, "connect", {"token": token})]))
        frame = await asyncio.wait_for(ws.read_message(), WAIT)
        assert isinstance(frame, str)
        assert replies(frame.encode())[0]["connect"]["client"]
        await ws.write_message("")  # empty frames are ignored
        await ws.write_message(json.dumps(command(2, "subscribe", {"channel": "chat:ws"})))
        frame = await asyncio.wait_for(ws.read_message(), WAIT)
        assert isinstance(frame, str) and replies(frame.encode()) == [{"id": 2, "subscribe": {}}]
        await disconnect(server, "ws-user")
        assert await asyncio.wait_for(ws.read_message(), WAIT) == 'c[3503,"force disconnect"]'
        assert await asyncio.wait_for(ws.read_message(), WAIT) is None  # then the socket closes
    finally:
        ws.close()
    plain = await fetch(server.port, "GET", f"{PREFIX}/000/abc/websocket")
    assert plain.status == 400  # not an upgrade


async def test_broken_websocket_frame_closes_the_socket(server: ServerProcess) -> None:
    url = f"ws://127.0.0.1:{server.port}{PREFIX}/000/{uuid.uuid4().hex}/websocket"
    ws = await tornado.websocket.websocket_connect(url, connect_timeout=WAIT)
    assert await asyncio.wait_for(ws.read_message(), WAIT) == "o"
    await ws.write_message('["unterminated')
    assert await asyncio.wait_for(ws.read_message(), WAIT) is None


# --- session lifetime --------------------------------------------------------------------


async def wait_gone(session: XhrSession, within: float) -> float:
    """Seconds until xhr_send to `session` answers 404 (at most `within`); each probe is an
    `rpc` command, which a connected session answers without changing state."""
    started = time.monotonic()
    ids = iter(range(100, 1000))

    async def gone() -> bool:
        status = (await session.send(command(next(ids), "rpc", {"method": "x"}))).status
        assert status in (204, 404), status
        return status == 404

    await eventually(gone, within, "the session is gone", interval=0.1)
    return time.monotonic() - started


async def test_dropped_streaming_request_ends_the_session(server: ServerProcess) -> None:
    session = XhrSession(server.port)
    await session.connect("dropper")
    stream = await open_request(server.port, "POST", session.path + "/xhr_streaming")
    await stream.read_until(lambda body: body.endswith(b"\n"))
    stream.close()
    assert await wait_gone(session, 3.0) < 3.0


async def test_session_times_out_without_a_receiver(server: ServerProcess) -> None:
    session = XhrSession(server.port)
    await session.connect("idler")
    assert await wait_gone(session, 9.0) >= 4.5  # the 5 s disconnect delay


# --- origins -----------------------------------------------------------------------------


async def test_cors_and_websocket_origin_checks(
    start_server: Callable[[dict[str, Any]], ServerProcess],
) -> None:
    srv = start_server({"allowed_origins": ["http://good.example"]})
    good = await fetch(srv.port, "GET", PREFIX + "/info", headers={"Origin": "http://good.example"})
    assert good.headers["access-control-allow-origin"] == "http://good.example"
    assert good.headers["access-control-allow-credentials"] == "true"
    bad = await fetch(srv.port, "GET", PREFIX + "/info", headers={"Origin": "http://evil.example"})
    assert bad.status == 200 and "access-control-allow-origin" not in bad.headers
    preflight = await fetch(
        srv.port, "OPTIONS", f"{PREFIX}/000/s/xhr",
        headers={"Origin": "http://good.example", "Access-Control-Request-Headers": "x-a"},
    )  # fmt: skip
    assert preflight.headers["access-control-allow-headers"] == "x-a"
    url = f"ws://127.0.0.1:{srv.port}{PREFIX}/000/{uuid.uuid4().hex}/websocket"
    with pytest.raises(tornado.httpclient.HTTPClientError) as info:
        request = tornado.httpclient.HTTPRequest(
            url, headers={"Origin": "http://evil.example"}, connect_timeout=WAIT
        )
        await tornado.websocket.websocket_connect(request)
    assert info.value.code == 403
    request = tornado.httpclient.HTTPRequest(
        url, headers={"Origin": "http://good.example"}, connect_timeout=WAIT
    )
    ws = await tornado.websocket.websocket_connect(request)
    assert await asyncio.wait_for(ws.read_message(), WAIT) == "o"
    ws.close()
