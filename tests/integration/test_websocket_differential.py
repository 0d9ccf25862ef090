"""The lean WebSocket path against Tornado's, per RFC 6455, on a real server process.

One `centripy serve` process takes plain-TCP upgrades to `/connection/websocket` on the lean
path (`LeanWebSocket`); another has `websocket_compression: true`, which leaves every upgrade
to Tornado's `WebSocketHandler` (a client that offers no extension gets uncompressed
frames, so both speak the same plain RFC 6455). Raw socket clients send the same bytes to
both and read what the server sends back: its close frame (code and reason), or an abrupt
TCP close without one.

Where a frame must _Fail the WebSocket Connection_ (RFC 6455 7.1.7) both paths must fail
it and deliver nothing after the bad frame. Tornado fails most of them without a close
frame (`_abort()`), which 7.1.7 allows ("SHOULD send a Close frame"); the lean path sends
the status code section 7.4.1 names for the failure. So: the lean path's close code is the
RFC's, and Tornado's is the same whenever it sends one.
"""

from __future__ import annotations

import base64
import contextlib
import os
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass

import orjson
import pytest

from tests.support.server import ServerFactory, ServerProcess

LIMIT = 4096  # websocket_message_size_limit of both servers
CONNECT = b'{"id":1,"connect":{}}'
PING_CMD = b'{"id":2,"presence_stats":{"channel":"x"}}'
TIMEOUT = 3.0


@dataclass(frozen=True)
class Outcome:
    """What the server did after the test's bytes: `close` is the close frame's payload
    (None: the TCP connection ended without one), `replies` the data messages before it."""

    close: bytes | None
    replies: tuple[bytes, ...]
    open: bool = False  # still open TIMEOUT seconds later

    @property
    def code(self) -> int | None:
        if self.close is None or len(self.close) < 2:
            return None
        code: int = struct.unpack("!H", self.close[:2])[0]
        return code


def client_frame(
    opcode: int, payload: bytes, fin: bool = True, rsv: int = 0, mask: bool = True
) -> bytes:
    b0 = (0x80 if fin else 0) | rsv | opcode
    bit = 0x80 if mask else 0
    size = len(payload)
    if size < 126:
        head = struct.pack("!BB", b0, bit | size)
    elif size <= 0xFFFF:
        head = struct.pack("!BBH", b0, bit | 126, size)
    else:
        head = struct.pack("!BBQ", b0, bit | 127, size)
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


class RawClient:
    """A blocking RFC 6455 client over a plain socket (every read times out)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        key = base64.b64encode(os.urandom(16))
        self.sock.sendall(
            b"GET /connection/websocket HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: " + key + b"\r\n"
            b"Sec-WebSocket-Version: 13\r\n\r\n"
        )
        self.buf = b""
        head = self._until(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101 "), head
        self.tornado = b"\r\nserver: tornado" in head.lower()

    def _until(self, marker: bytes) -> bytes:
        while marker not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError
            self.buf += chunk
        head, _, self.buf = self.buf.partition(marker)
        return head

    def _exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def recv(self) -> tuple[int, bytes]:
        b0, b1 = self._exactly(2)
        assert not b1 & 0x80, "server frames are unmasked"
        size = b1 & 0x7F
        if size == 126:
            size = struct.unpack("!H", self._exactly(2))[0]
        elif size == 127:
            size = struct.unpack("!Q", self._exactly(8))[0]
        return b0 & 0x0F, self._exactly(size)

    def send(self, data: bytes) -> None:
        # the server may close while we still write (the rest of a too-big frame)
        with contextlib.suppress(OSError):
            self.sock.sendall(data)

    def outcome(self) -> Outcome:
        """Read until the server's close frame and the end of the TCP connection."""
        replies: list[bytes] = []
        close: bytes | None = None
        still_open = False
        try:
            while True:
                opcode, data = self.recv()
                if opcode == 0x8:
                    close = data
                    break
                if opcode in (0x1, 0x2):
                    replies.append(data)
            self.send(client_frame(0x8, close[:2]))  # answer it, as a client must
            while self.sock.recv(65536):
                pass
        except (EOFError, ConnectionResetError):
            pass
        except TimeoutError:
            still_open = True
        finally:
            self.sock.close()
        return Outcome(close, tuple(replies), still_open)

    def connect(self) -> None:
        self.send(client_frame(0x1, CONNECT))
        opcode, data = self.recv()
        assert opcode == 0x1 and orjson.loads(data)["id"] == 1, data


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, ServerProcess]]:
    base = {
        "api_key": "k",
        "client_insecure": True,
        "websocket_message_size_limit": LIMIT,
        "log_level": "error",
    }
    factory = ServerFactory(tmp_path_factory.mktemp("wsdiff"), base)
    try:
        yield {"lean": factory(), "tornado": factory({"websocket_compression": True})}
    finally:
        problems = factory.stop_all()
        assert not problems, problems


def run(server: ServerProcess, path: str, raw: bytes, connect: bool) -> Outcome:
    client = RawClient(server.port)
    assert client.tornado == (path == "tornado"), "the upgrade took the wrong path"
    if connect:
        client.connect()
    client.send(raw)
    client.send(client_frame(0x1, PING_CMD))  # after a failure, nothing may answer this
    return client.outcome()


def masked_close(payload: bytes) -> bytes:
    return client_frame(0x8, payload)


# (bytes sent after the handshake, the status code RFC 6455 7.4.1 names for the failure)
FAILURES = {
    "invalid UTF-8 in a text frame": (client_frame(0x1, b'{"id":3}\xff'), 1007),
    "invalid UTF-8 across text fragments": (
        client_frame(0x1, b"\xe2\x82", fin=False) + client_frame(0x0, b"!"),
        1007,
    ),
    "oversize frame": (client_frame(0x2, b"x" * (LIMIT + 1)), 1009),
    "oversize fragmented message": (
        client_frame(0x2, b"x" * 3000, fin=False) + client_frame(0x0, b"x" * 3000),
        1009,
    ),
    "reserved opcode 0x3": (client_frame(0x3, b"x"), 1002),
    "reserved opcode 0xB": (client_frame(0xB, b"x"), 1002),
    "RSV1 without an extension": (client_frame(0x1, CONNECT, rsv=0x40), 1002),
    "RSV3": (client_frame(0x2, b"x", rsv=0x10), 1002),
    "fragmented ping": (client_frame(0x9, b"x", fin=False) + client_frame(0x0, b"y"), 1002),
    "continuation without a start": (client_frame(0x0, b"x"), 1002),
    "new message inside a fragmented one": (
        client_frame(0x1, b"{", fin=False) + client_frame(0x1, b"}"),
        1002,
    ),
    "ping over 125 bytes": (client_frame(0x9, b"x" * 126), 1002),
    "close over 125 bytes": (masked_close(b"\x03\xe8" + b"x" * 124), 1002),
    "close reason not UTF-8": (masked_close(b"\x03\xe8\xff\xfe"), 1007),
    "close reason with a surrogate": (masked_close(b"\x03\xe8\xed\xa0\x80"), 1007),
}


@pytest.mark.parametrize("connect", [False, True], ids=["fresh", "connected"])
@pytest.mark.parametrize("name", list(FAILURES))
def test_protocol_failures_match(
    servers: dict[str, ServerProcess], name: str, connect: bool
) -> None:
    raw, code = FAILURES[name]
    lean = run(servers["lean"], "lean", raw, connect)
    tornado = run(servers["tornado"], "tornado", raw, connect)
    # Nothing after the bad frame is answered, on either path.
    assert lean.replies == () and tornado.replies == (), (lean, tornado)
    assert not lean.open and not tornado.open, (lean, tornado)
    assert lean.code == code, lean
    if tornado.close is not None:  # Tornado mostly fails without a close frame
        assert tornado.code == code, tornado


def test_unmasked_frames_fail_only_on_the_lean_path(servers: dict[str, ServerProcess]) -> None:
    """RFC 6455 5.1: a server MUST close on an unmasked client frame. Tornado does not check
    the mask bit (it reads the frame as it is), so this is where the two paths differ."""
    raw = client_frame(0x1, PING_CMD, mask=False)
    lean = run(servers["lean"], "lean", raw, connect=True)
    assert lean.code == 1002 and lean.replies == (), lean
    client = RawClient(servers["tornado"].port)
    client.connect()
    client.send(raw)
    assert orjson.loads(client.recv()[1])["id"] == 2  # Tornado answered the unmasked frame
    client.sock.close()


# Close frames from the client: what each path echoes (Tornado echoes any code, even ones
# RFC 6455 7.4.2 reserves, and answers a 1-byte body with an empty close frame).
CLOSES = {
    "normal": struct.pack("!H", 1000) + b"bye",
    "going away, no reason": struct.pack("!H", 1001),
    "application code": struct.pack("!H", 4000) + "app é".encode(),
    "empty": b"",
    "one byte": b"\x03",
    "code 0": struct.pack("!H", 0),
    "code 999": struct.pack("!H", 999),
    "code 1005 (reserved)": struct.pack("!H", 1005),
    "code 1006 (reserved)": struct.pack("!H", 1006),
    "code 1015 (reserved)": struct.pack("!H", 1015),
    "code 5000": struct.pack("!H", 5000) + b"x",
}


@pytest.mark.parametrize("name", list(CLOSES))
def test_client_close_frames_match(servers: dict[str, ServerProcess], name: str) -> None:
    payload = CLOSES[name]
    lean = run(servers["lean"], "lean", masked_close(payload), connect=True)
    tornado = run(servers["tornado"], "tornado", masked_close(payload), connect=True)
    assert lean == tornado
    # the code is echoed (RFC 6455 5.5.1), without the reason
    assert lean.close == (payload[:2] if len(payload) >= 2 else b"")
    assert not lean.open


def test_valid_traffic_is_the_same(servers: dict[str, ServerProcess]) -> None:
    """Fragments with a ping between them, then a normal close: same replies, same echo."""
    outcomes = {}
    for path, server in servers.items():
        client = RawClient(server.port)
        client.send(
            client_frame(0x1, CONNECT[:4], fin=False)
            + client_frame(0x9, b"hi")
            + client_frame(0x0, CONNECT[4:9], fin=False)
            + client_frame(0x0, CONNECT[9:])
        )
        assert client.recv() == (0xA, b"hi")
        reply = orjson.loads(client.recv()[1])
        client.send(client_frame(0x2, PING_CMD))  # binary frame holding JSON
        second = orjson.loads(client.recv()[1])
        client.send(masked_close(struct.pack("!H", 1000)))
        outcomes[path] = (reply["id"], sorted(reply["connect"]), second, client.outcome())
    assert outcomes["lean"] == outcomes["tornado"]
