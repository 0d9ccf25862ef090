"""The lean WebSocket path (`LeanWebSocket`, `LeanUniWebSocket`, `accept_upgrade`) against a
real server on a free port, with a raw RFC 6455 client over asyncio streams. Tornado's
handshake answers carry `Server: TornadoServer/..`; the lean path's do not, which tells the
two apart."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
import struct
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import orjson
import pytest
import tornado.web
from tornado.testing import bind_unused_port

from centripy.actors.context import ConnContext
from centripy.actors.hub import Hub, ServerDisconnectMsg
from centripy.engine.auth import TokenVerifier
from centripy.engine.config import Config
from centripy.engine.node import Node
from centripy.engine.options import ChannelOptions
from centripy.server import client_routes
from centripy.storage.memory import MemoryEventLog
from centripy.storage.presence_memory import MemoryPresence
from centripy.storage.writer import GroupCommitWriter
from centripy.transports import uni, websocket
from centripy.transports.api_lean import LeanHTTPServer
from centripy.transports.http11 import parse_request_head
from centripy.transports.ws_protocol import Upgrade, accept_upgrade

CONNECT = b'{"id":1,"connect":{}}'
SUBSCRIBE = b'{"id":2,"subscribe":{"channel":"news"}}'
UNI = "/connection/uni_websocket"
UNI_CONNECT = b'{"subs":{"news":{}}}'  # a uni_websocket ConnectRequest


@dataclass
class Server:
    port: int
    node: Node
    hub: Hub


def make_config(**kw: object) -> Config:
    return Config(
        client_insecure=True,
        channel_options=ChannelOptions(allow_subscribe_for_client=True),
        **kw,  # type: ignore[arg-type]
    )


@pytest.fixture
async def serve() -> AsyncIterator[Callable[..., object]]:
    cleanups = []

    async def start(host_rule: bool = False, **kw: object) -> Server:
        config = make_config(**kw)
        log = MemoryEventLog()
        await log.start()
        writer = GroupCommitWriter(log, max_delay=0.0)
        await writer.start()
        node = Node(config, log, writer.submit_many, MemoryPresence())
        hub = Hub()
        node.attach_fanout(hub)
        ctx = ConnContext(config, node, hub, TokenVerifier(config))
        app = tornado.web.Application(
            client_routes(config, ctx),
            websocket_max_message_size=config.websocket_message_size_limit,
        )
        if host_rule:
            app.add_handlers(r"admin\.example", [(r"/other", tornado.web.RequestHandler)])
        server = LeanHTTPServer(app, lean_api=True)
        sock, number = bind_unused_port()
        server.add_sockets([sock])

        async def stop() -> None:
            server.stop()
            await server.close_all_connections()
            await writer.close()

        cleanups.append(stop)
        return Server(number, node, hub)

    yield start
    for stop in cleanups:
        await stop()


class Client:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.head: dict[str, str] = {}
        self.status = 0
        self.lines: list[bytes] = []

    def send(self, opcode: int, payload: bytes, fin: bool = True, rsv: int = 0) -> None:
        self.writer.write(client_frame(opcode, payload, fin, rsv))

    async def recv(self) -> tuple[int, bytes]:
        b0, b1 = await self.reader.readexactly(2)
        assert not b1 & 0x80, "server frames are unmasked"
        size = b1 & 0x7F
        if size == 126:
            size = struct.unpack("!H", await self.reader.readexactly(2))[0]
        elif size == 127:
            size = struct.unpack("!Q", await self.reader.readexactly(8))[0]
        return b0 & 0x0F, await self.reader.readexactly(size)

    async def reply(self) -> dict[str, object]:
        """The next JSON message (a frame may carry several, one per line)."""
        if not self.lines:
            opcode, data = await self.recv()
            assert opcode == 0x1, (opcode, data)
            self.lines.extend(data.split(b"\n"))
        return orjson.loads(self.lines.pop(0))  # type: ignore[no-any-return]

    async def closed(self) -> bool:
        """True when the server has closed the TCP connection (EOF, or a reset when it
        closed with unread data: the rest of a too-big frame)."""
        try:
            return await asyncio.wait_for(self.reader.read(1), 5) == b""
        except ConnectionResetError:
            return True


def client_frame(opcode: int, payload: bytes, fin: bool = True, rsv: int = 0) -> bytes:
    mask = os.urandom(4)
    size = len(payload)
    b0 = (0x80 if fin else 0) | rsv | opcode
    if size < 126:
        head = struct.pack("!BB", b0, 0x80 | size)
    elif size <= 0xFFFF:
        head = struct.pack("!BBH", b0, 0x80 | 126, size)
    else:
        head = struct.pack("!BBQ", b0, 0x80 | 127, size)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + masked


KEY = base64.b64encode(b"0123456789abcdef").decode()
ACCEPT = base64.b64encode(
    hashlib.sha1(KEY.encode() + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest()
).decode()


def upgrade_request(path: str = "/connection/websocket", extra: str = "") -> bytes:
    return (
        f"GET {path} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
        f"Connection: keep-alive, Upgrade\r\nSec-WebSocket-Key: {KEY}\r\n"
        f"Sec-WebSocket-Version: 13\r\n{extra}\r\n"
    ).encode()


async def open_ws(port: int, extra: str = "", after: bytes = b"", path: str = "") -> Client:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(upgrade_request(path or "/connection/websocket", extra) + after)
    client = Client(reader, writer)
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    client.status = int(head[0].split(" ")[1])
    for line in head[1:]:
        if line:
            name, _, value = line.partition(":")
            client.head[name.strip().lower()] = value.strip()
    return client


async def connected(port: int, extra: str = "") -> Client:
    client = await open_ws(port, extra)
    assert client.status == 101 and "server" not in client.head
    client.send(0x1, CONNECT + b"\n" + SUBSCRIBE)
    assert "connect" in await client.reply()
    assert "subscribe" in await client.reply()
    return client


async def test_handshake_and_messages_on_the_lean_path(serve: Callable[..., object]) -> None:
    server: Server = await serve()  # type: ignore[misc]
    client = await open_ws(server.port)
    assert client.status == 101
    assert "server" not in client.head  # not Tornado's answer
    assert client.head["sec-websocket-accept"] == ACCEPT
    assert client.head["upgrade"] == "websocket"
    client.send(0x1, CONNECT + b"\n" + SUBSCRIBE)
    assert (await client.reply())["id"] == 1
    assert (await client.reply())["id"] == 2
    await server.node.publish("news", b'{"n":1}')
    push = await client.reply()
    assert push["push"] == {"channel": "news", "pub": {"data": {"n": 1}}}


async def test_frames_sent_with_the_request_and_split_anyhow(serve: Callable[..., object]) -> None:
    server: Server = await serve()  # type: ignore[misc]
    # the connect frame arrives in the same segment as the request head
    client = await open_ws(server.port, after=client_frame(0x1, CONNECT))
    assert (await client.reply())["id"] == 1
    # a frame with a 16-bit length, written one byte at a time
    big = b'{"id":2,"subscribe":{"channel":"news","data":"' + b"x" * 300 + b'"}}'
    for byte in client_frame(0x1, big):
        client.writer.write(bytes([byte]))
        await client.writer.drain()
    assert (await client.reply())["id"] == 2


async def test_fragments_pings_and_pongs(serve: Callable[..., object]) -> None:
    server: Server = await serve()  # type: ignore[misc]
    client = await open_ws(server.port)
    client.send(0x1, CONNECT[:5], fin=False)
    client.send(0x9, b"are you there")  # a control frame between fragments
    client.send(0x0, CONNECT[5:12], fin=False)
    client.send(0xA, b"unsolicited pong")  # ignored
    client.send(0x0, CONNECT[12:])
    assert await client.recv() == (0xA, b"are you there")
    assert (await client.reply())["id"] == 1


async def test_protobuf_subprotocol(serve: Callable[..., object]) -> None:
    server: Server = await serve()  # type: ignore[misc]
    extra = "Sec-WebSocket-Protocol: centrifuge-json, centrifuge-protobuf\r\n"
    client = await open_ws(server.port, extra)
    assert client.status == 101 and "server" not in client.head
    assert client.head["sec-websocket-protocol"] == "centrifuge-protobuf"
    # Command{id: 1, connect: {}} as varint-length-delimited protobuf
    client.send(0x2, b"\x04\x08\x01\x22\x00")
    opcode, data = await client.recv()
    assert opcode == 0x2 and data[1:3] == b"\x08\x01"  # Reply{id: 1, ...}


async def test_json_chosen_by_query_or_subprotocol(serve: Callable[..., object]) -> None:
    server: Server = await serve()  # type: ignore[misc]
    client = await open_ws(server.port, path="/connection/websocket?format=protobuf")
    assert client.status == 101 and "sec-websocket-protocol" not in client.head
    client.send(0x2, b"\x04\x08\x01\x22\x00")
    assert (await client.recv())[0] == 0x2
    client = await open_ws(server.port, "Sec-WebSocket-Protocol: centrifuge-json\r\n")
    assert client.head["sec-websocket-protocol"] == "centrifuge-json"
    client.send(0x1, CONNECT)
    assert (await client.reply())["id"] == 1


async def test_client_close_is_echoed_and_the_connection_ends(
    serve: Callable[..., object],
) -> None:
    server: Server = await serve()  # type: ignore[misc]
    client = await connected(server.port)
    assert server.hub.stats().num_clients == 1
    client.send(0x8, struct.pack("!H", 1000) + b"bye")
    assert await client.recv() == (0x8, struct.pack("!H", 1000))
    assert await client.closed()
    for _ in range(100):
        if server.hub.stats().num_clients == 0:
            break
        await asyncio.sleep(0.01)
    assert server.hub.stats().num_subs == 0


async def test_server_close_sends_the_code_and_waits_for_the_client(
    serve: Callable[..., object],
) -> None:
    server: Server = await serve()  # type: ignore[misc]
    client = await connected(server.port)
    client.send(0x1, b"not json")
    opcode, data = await client.recv()
    assert opcode == 0x8 and struct.unpack("!H", data[:2])[0] == 3501
    assert data[2:] == b"bad request"
    client.send(0x1, CONNECT)  # after the close frame: ignored
    client.send(0x8, data[:2])
    assert await client.closed()


async def test_a_client_that_never_answers_the_close_is_cut_off(
    serve: Callable[..., object], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(websocket, "CLOSE_TIMEOUT", 0.1)
    server: Server = await serve()  # type: ignore[misc]
    client = await connected(server.port)
    client.send(0x1, b"not json")
    assert (await client.recv())[0] == 0x8
    assert await client.closed()


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (client_frame(0x1, CONNECT, rsv=0x40), 1002),  # RSV1 without an extension
        (b"\x81\x05hello", 1002),  # unmasked
        (client_frame(0x0, CONNECT), 1002),  # continuation of nothing
        (client_frame(0x1, b"{", fin=False) + client_frame(0x1, b"}"), 1002),
        (client_frame(0x3, b""), 1002),  # reserved opcode
        (client_frame(0x9, b"x" * 126), 1002),  # control frame too long
        (client_frame(0x9, b"x", fin=False), 1002),  # fragmented control frame
        (client_frame(0x1, b"x" * 70_000), 1009),  # over websocket_message_size_limit
        (client_frame(0x1, b"x" * 40_000, fin=False) + client_frame(0x0, b"x" * 40_000), 1009),
    ],
    ids=[
        "rsv1",
        "unmasked",
        "lone-continuation",
        "unfinished-message",
        "reserved-opcode",
        "long-control",
        "fragmented-control",
        "too-big",
        "too-big-fragmented",
    ],  # explicit: the frames carry random masks (pytest-xdist workers must agree on ids)
)
async def test_protocol_errors_close_with_a_code(
    serve: Callable[..., object], raw: bytes, code: int
) -> None:
    server: Server = await serve()  # type: ignore[misc]
    client = await open_ws(server.port)
    client.writer.write(raw)
    opcode, data = await client.recv()
    assert opcode == 0x8 and struct.unpack("!H", data[:2])[0] == code
    assert await client.closed()


async def test_a_slow_reader_is_disconnected_with_3008(serve: Callable[..., object]) -> None:
    """The asyncio transport's buffer fills (the client reads nothing), writes wait, the
    actor's queue passes client_queue_max_size: 3008 after what was already sent."""
    server: Server = await serve(client_queue_max_size=256 * 1024)  # type: ignore[misc]
    client = await connected(server.port)
    payload = b'{"pad":"' + b"x" * 60_000 + b'"}'
    for _ in range(300):  # 18 MB: more than loopback's socket buffers
        await server.node.publish("news", payload)
        await asyncio.sleep(0)
    while True:
        opcode, data = await asyncio.wait_for(client.recv(), 10)
        if opcode == 0x8:
            break
    assert struct.unpack("!H", data[:2])[0] == 3008


async def test_a_stalled_reader_is_dropped_after_the_write_timeout(
    serve: Callable[..., object],
) -> None:
    """A client that stops reading is dropped once a write has waited
    `websocket_write_timeout` (Centrifugo's per-write deadline), long before its queue would
    reach client_queue_max_size: the TCP connection just ends, without a 3008 close."""
    server: Server = await serve(  # type: ignore[misc]
        client_queue_max_size=512 << 20, websocket_write_timeout=0.3
    )
    client = await connected(server.port)
    payload = b'{"pad":"' + b"x" * 60_000 + b'"}'
    for _ in range(100):  # 6 MB: more than loopback's socket buffers, far under the queue
        await server.node.publish("news", payload)
        await asyncio.sleep(0)
    await asyncio.sleep(1.0)  # read nothing for longer than the write timeout
    received = 0
    with contextlib.suppress(asyncio.IncompleteReadError, ConnectionResetError):
        while True:
            opcode, _ = await asyncio.wait_for(client.recv(), 5)
            assert opcode != 0x8, "dropped without a close frame"
            received += 1
    assert received < 100  # cut off: not everything was delivered


@pytest.mark.parametrize("route", ["websocket", "uni_websocket"])
@pytest.mark.parametrize("refused", ["origin", "compression"])
async def test_what_the_lean_path_leaves_to_tornado(
    serve: Callable[..., object], route: str, refused: str
) -> None:
    """A refused Origin (Tornado answers 403) and permessage-deflate (Tornado's) go to
    Tornado, on both WebSocket routes."""
    uni_route = route == "uni_websocket"
    kw: dict[str, object] = {"uni_websocket": True} if uni_route else {}
    extra = ""
    if refused == "origin":
        extra = "Origin: https://evil.example\r\n"
    else:
        kw[f"{route}_compression"] = True
    server: Server = await serve(**kw)  # type: ignore[misc]
    client = await open_ws(server.port, extra, path=UNI if uni_route else "")
    assert "server" in client.head  # Tornado's answer
    if extra:
        assert client.status == 403
    elif uni_route:
        assert client.status == 101
        client.send(0x1, UNI_CONNECT)
        assert "connect" in await client.reply()
    else:
        assert client.status == 101
        client.send(0x1, CONNECT)
        assert (await client.reply())["id"] == 1


async def test_an_allowed_origin_stays_lean(serve: Callable[..., object]) -> None:
    server: Server = await serve(allowed_origins=["https://*.example.com"])  # type: ignore[misc]
    client = await open_ws(server.port, "Origin: https://app.example.com\r\n")
    assert client.status == 101 and "server" not in client.head


@pytest.mark.parametrize(
    ("request_head", "status"),
    [
        (upgrade_request().replace(b"Version: 13", b"Version: 12"), 426),
        (upgrade_request().replace(b"Sec-WebSocket-Key", b"X-Key"), 400),
        (upgrade_request().replace(b"Upgrade: websocket", b"Upgrade: h2c"), 400),
    ],
)
async def test_bad_handshakes_get_tornados_errors(
    serve: Callable[..., object], request_head: bytes, status: int
) -> None:
    server: Server = await serve()  # type: ignore[misc]
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(request_head)
    head = await reader.readuntil(b"\r\n\r\n")
    assert int(head.split(b" ")[1]) == status
    assert b"Server: Tornado" in head
    writer.close()


def parse_upgrade(head: bytes) -> Upgrade | None:
    request = parse_request_head(head)
    return None if request is None else accept_upgrade(request)


def test_accept_upgrade() -> None:
    up = parse_upgrade(
        upgrade_request("/connection/websocket?cf_protocol=protobuf", "Origin: https://a\r\n")
    )
    assert up is not None
    assert (up.path, up.query, up.origin) == (
        "/connection/websocket",
        "cf_protocol=protobuf",
        "https://a",
    )
    assert up.key == KEY.encode() and up.subprotocols == ()
    head = upgrade_request(extra="Sec-WebSocket-Protocol: a\r\nSec-WebSocket-Protocol: b, c\r\n")
    assert parse_upgrade(head).subprotocols == ("a", "b", "c")  # type: ignore[union-attr]
    assert parse_upgrade(upgrade_request().replace(b"GET", b"POST")) is None
    assert parse_upgrade(upgrade_request().replace(b"HTTP/1.1", b"HTTP/1.0")) is None
    assert parse_upgrade(upgrade_request().replace(b"Host: localhost\r\n", b"")) is None
    assert parse_upgrade(upgrade_request().replace(b"keep-alive, Upgrade", b"keep-alive")) is None
    assert parse_upgrade(upgrade_request().replace(b"Host:", b" Host:")) is None


async def test_an_application_with_host_rules_upgrades_on_tornado(
    serve: Callable[..., object],
) -> None:
    server: Server = await serve(host_rule=True)  # type: ignore[misc]
    client = await open_ws(server.port)
    assert client.status == 101 and "server" in client.head  # Tornado's answer
    client.send(0x1, CONNECT)
    assert (await client.reply())["id"] == 1


# -- uni_websocket on the lean path (`uni.LeanUniWebSocket`) --------------------------------


async def uni_connected(server: Server) -> tuple[Client, str]:
    """A lean uni_websocket client subscribed to `news` (server-side); and its client id."""
    client = await open_ws(server.port, path=UNI)
    assert client.status == 101 and "server" not in client.head
    assert "sec-websocket-protocol" not in client.head
    client.send(0x1, UNI_CONNECT)
    connect = await client.reply()
    assert "news" in connect["connect"]["subs"]  # type: ignore[index, operator]
    return client, connect["connect"]["client"]  # type: ignore[index, return-value]


async def test_uni_websocket_on_the_lean_path(serve: Callable[..., object]) -> None:
    server: Server = await serve(uni_websocket=True)  # type: ignore[misc]
    client, _ = await uni_connected(server)
    client.send(0x1, b"not a command: read and ignored")
    client.send(0x2, b"\x00\x01")  # binary too
    for n in range(20):  # a burst: writes of several pushes, still a text frame each
        await server.node.publish("news", b'{"n":%d}' % n)
    for n in range(20):
        opcode, data = await client.recv()
        assert opcode == 0x1
        assert orjson.loads(data) == {"channel": "news", "pub": {"data": {"n": n}}}
    assert server.hub.stats().num_clients == 1


async def test_uni_websocket_disconnect_is_a_push_then_tcp_closes(
    serve: Callable[..., object],
) -> None:
    server: Server = await serve(uni_websocket=True)  # type: ignore[misc]
    client, client_id = await uni_connected(server)
    server.hub.tell(list(server.hub.matching("", client_id, "")), ServerDisconnectMsg(4500, "bye"))
    opcode, data = await client.recv()
    assert opcode == 0x1
    assert orjson.loads(data) == {"disconnect": {"code": 4500, "reason": "bye"}}
    assert await client.closed()  # no close frame: TCP just ends


@pytest.mark.parametrize("first", [b"{not json", b"[]", b""])
async def test_uni_websocket_malformed_connect_drops_tcp(
    serve: Callable[..., object], first: bytes
) -> None:
    server: Server = await serve(uni_websocket=True)  # type: ignore[misc]
    client = await open_ws(server.port, path=UNI)
    client.send(0x1, first)
    assert await client.closed()
    assert server.hub.stats().num_clients == 0


async def test_uni_websocket_connect_over_the_size_limit_closes_1009(
    serve: Callable[..., object],
) -> None:
    server: Server = await serve(  # type: ignore[misc]
        uni_websocket=True, uni_websocket_message_size_limit=100
    )
    client = await open_ws(server.port, path=UNI)
    client.send(0x1, b'{"data":"' + b"x" * 100 + b'"}')
    opcode, data = await client.recv()
    assert opcode == 0x8 and struct.unpack("!H", data[:2])[0] == 1009
    assert await client.closed()


async def test_uni_websocket_native_pings_and_the_pong_deadline(
    serve: Callable[..., object], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ping every interval; a client answering stays, one that stops answering is
    dropped within 10/9 of the interval after the unanswered ping."""
    monkeypatch.setattr(uni.LeanUniWebSocket, "ping_interval", 0.3)
    server: Server = await serve(uni_websocket=True)  # type: ignore[misc]
    client, _ = await uni_connected(server)
    loop = asyncio.get_running_loop()
    for _ in range(3):
        assert await asyncio.wait_for(client.recv(), 2) == (0x9, b"")
        client.send(0xA, b"")
    assert server.hub.stats().num_clients == 1
    assert await asyncio.wait_for(client.recv(), 2) == (0x9, b"")
    pinged = loop.time()
    assert await client.closed()  # no pong this time: dropped before the next ping
    assert loop.time() - pinged < 2
    for _ in range(100):
        if server.hub.stats().num_clients == 0:
            break
        await asyncio.sleep(0.01)
    assert server.hub.stats().num_clients == 0


async def test_uni_websocket_without_a_connect_request_is_dropped(
    serve: Callable[..., object], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Answering pings is not enough: no ConnectRequest by the first deadline drops it."""
    monkeypatch.setattr(uni.LeanUniWebSocket, "ping_interval", 0.3)
    server: Server = await serve(uni_websocket=True)  # type: ignore[misc]
    client = await open_ws(server.port, path=UNI)
    assert await asyncio.wait_for(client.recv(), 2) == (0x9, b"")
    client.send(0xA, b"")
    assert await client.closed()


async def test_uni_websocket_on_tornado_has_the_same_pong_deadline(
    serve: Callable[..., object], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With compression, Tornado serves uni_websocket: its pings carry the same deadline
    (the pong within 1/9 of the interval), so one that stops answering is closed."""
    monkeypatch.setattr(uni, "UNI_WS_PING_INTERVAL", 0.3)
    server: Server = await serve(  # type: ignore[misc]
        uni_websocket=True, uni_websocket_compression=True
    )
    client = await open_ws(server.port, path=UNI)
    assert "server" in client.head  # Tornado's answer
    client.send(0x1, UNI_CONNECT)
    assert "connect" in await client.reply()
    for _ in range(3):
        assert await asyncio.wait_for(client.recv(), 2) == (0x9, b"")
        client.send(0xA, b"")
    assert server.hub.stats().num_clients == 1
    assert await asyncio.wait_for(client.recv(), 2) == (0x9, b"")
    opcode, _ = await asyncio.wait_for(client.recv(), 2)  # no pong: Tornado closes
    assert opcode == 0x8
