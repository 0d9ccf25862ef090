"""Protocol adapters of fanout.py. An adapter opens one subscriber's link (`open`: connect +
subscribe to one channel, over the aiohttp session the harness owns) and turns every incoming
text message into the publication payloads it carries plus an optional reply (a ping's pong),
which the harness sends back over the link.

- `centrifugo`: Centrifugo client protocol v2, JSON. `connect` (anonymous, or with a token) and
  `subscribe` go in one frame, as centrifuge-js sends them; replies and pushes may come several
  to a message, newline-joined. A server ping `{}` is answered with `{}`.
- `socketio`: Socket.IO 5 over Engine.IO 4, WebSocket transport only, default namespace. The
  client emits "subscribe" <channel> with an ack; each publication arrives as event
  "publication" whose single argument is the published data.
- `centrifugo-http-stream`, `centrifugo-sse`: Centrifugo's bidirectional emulation (spec 5.2),
  JSON. `open` POSTs the connect command (http_stream) or GETs `?cf_connect=` (sse) and
  keeps the streamed response; subscribe and pongs go by `POST /emulation` with the session
  and node of the connect result, whose replies come down the stream. `parse` is `centrifugo`'s.
- `centrifugo-protobuf`: the same as `centrifugo` in protocol v2's Protobuf format
  (`?format=protobuf`): binary frames of varint-length-delimited `Command`s and `Reply`s,
  encoded and decoded here by hand (only the fields the harness needs: command id, connect,
  subscribe channel; reply id, error, push channel/pub.data/disconnect). A ping (an empty
  Reply) is answered with an empty Command.
- `centrifugo-uni-ws`: Centrifugo's unidirectional WebSocket (`/connection/uni_websocket`,
  `uni_websocket: true` on the server): the first text frame is a bare `ConnectRequest`
  whose `subs` names the channel (a server-side subscription, which an insecure server
  grants to any public channel); pushes come one per text frame without the
  `{"push": ..}` envelope; nothing is ever sent back (the server pings natively).

Add a protocol by writing one class with `name`, `open` and `parse` and listing it in
PROTOCOLS (`open_ws` does a WebSocket one's connection).
Everything here runs on a client process's event loop.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import aiohttp
import orjson

TEXT = aiohttp.WSMsgType.TEXT
BINARY = aiohttp.WSMsgType.BINARY


class Disconnected(Exception):
    """The server refused the handshake, closed the session or answered with an error."""


Data = str | bytes  # a text message, or a binary one (Protobuf)


class Link(Protocol):
    """One subscriber's open, subscribed connection."""

    async def receive(self) -> Data | None:
        """The next message, or None once the server closed the link."""
        ...

    async def send(self, text: Data) -> None:
        """Send `text` (a reply that `parse` returned) to the server."""
        ...

    async def close(self) -> None:
        """Close the link (idempotent)."""
        ...


class Adapter(Protocol):
    """What fanout.py needs from a protocol."""

    name: str

    async def open(self, session: aiohttp.ClientSession, base_url: str, channel: str) -> Link:
        """Connect to the server at `base_url` (ws://host:port or http://host:port) and
        subscribe to `channel`; raises Disconnected if the server refuses."""
        ...

    def parse(self, text: Any) -> tuple[list[Any], Data | None]:
        """(publication payloads in the message, a reply to send or None)."""
        ...


class WsLink:
    """A Link over an aiohttp WebSocket: text and binary messages (control frames are
    aiohttp's)."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws

    async def receive(self) -> Data | None:
        while True:
            msg = await self.ws.receive()
            if msg.type == TEXT or msg.type == BINARY:
                data: Data = msg.data
                return data
            if msg.type in _CLOSED:
                return None

    async def send(self, text: Data) -> None:
        if isinstance(text, bytes):
            await self.ws.send_bytes(text)
        else:
            await self.ws.send_str(text)

    async def close(self) -> None:
        await self.ws.close()


_CLOSED = (
    aiohttp.WSMsgType.CLOSE,
    aiohttp.WSMsgType.CLOSING,
    aiohttp.WSMsgType.CLOSED,
    aiohttp.WSMsgType.ERROR,
)


async def open_ws(
    session: aiohttp.ClientSession,
    url: str,
    handshake: Callable[[aiohttp.ClientWebSocketResponse, str], Awaitable[None]],
    channel: str,
) -> Link:
    """ws_connect to `url`, then `handshake(ws, channel)`; the socket is closed if that fails."""
    ws = await session.ws_connect(url, autoping=True, compress=0, max_msg_size=0)
    try:
        await handshake(ws, channel)
    except BaseException:
        await ws.close()
        raise
    return WsLink(ws)


async def _receive_text(ws: aiohttp.ClientWebSocketResponse) -> str:
    msg = await ws.receive()
    if msg.type != TEXT:
        raise Disconnected(f"handshake got {msg.type.name} {msg.data!r}")
    text: str = msg.data
    return text


class Centrifugo:
    """Centrifugo client protocol v2, JSON (see the module docstring)."""

    name = "centrifugo"
    path = "/connection/websocket"

    def __init__(self, token: str = "") -> None:
        self.connect_command = orjson.dumps({"id": 1, "connect": {"token": token} if token else {}})

    async def open(self, session: aiohttp.ClientSession, base_url: str, channel: str) -> Link:
        return await open_ws(session, base_url.rstrip("/") + self.path, self.handshake, channel)

    async def handshake(self, ws: aiohttp.ClientWebSocketResponse, channel: str) -> None:
        subscribe = orjson.dumps({"id": 2, "subscribe": {"channel": channel}})
        await ws.send_str((self.connect_command + b"\n" + subscribe).decode())
        replies: dict[int, dict[str, Any]] = {}
        while 2 not in replies:
            for line in (await _receive_text(ws)).split("\n"):
                if not line:
                    continue
                msg = orjson.loads(line)
                if not msg:
                    await ws.send_str("{}")  # a ping before the replies
                elif "id" in msg:
                    replies[msg["id"]] = msg
        if "connect" not in replies.get(1, {}):
            raise Disconnected(f"connect: {replies.get(1)}")
        if "subscribe" not in replies[2]:
            raise Disconnected(f"subscribe: {replies[2]}")

    def parse(self, text: str) -> tuple[list[Any], str | None]:
        pubs: list[Any] = []
        reply = None
        for line in text.split("\n"):
            if not line:
                continue
            msg = orjson.loads(line)
            push = msg.get("push")
            if push is not None:
                pub = push.get("pub")
                if pub is not None:
                    pubs.append(pub["data"])
                elif "disconnect" in push:
                    raise Disconnected(f"server disconnect: {push['disconnect']}")
            elif not msg:
                reply = "{}"
            elif "error" in msg:
                raise Disconnected(f"server error: {msg['error']}")
        return pubs, reply


class SocketIO:
    """Socket.IO 5 over Engine.IO 4 (see the module docstring)."""

    name = "socketio"
    path = "/socket.io/?EIO=4&transport=websocket"
    join_event = "subscribe"
    pub_event = "publication"

    def __init__(self, token: str = "") -> None:
        del token  # no authentication in the socket.io peer

    async def _receive(self, ws: aiohttp.ClientWebSocketResponse) -> str:
        while True:
            text = await _receive_text(ws)
            if text != "2":
                return text
            await ws.send_str("3")  # engine.io ping -> pong

    async def open(self, session: aiohttp.ClientSession, base_url: str, channel: str) -> Link:
        return await open_ws(session, base_url.rstrip("/") + self.path, self.handshake, channel)

    async def handshake(self, ws: aiohttp.ClientWebSocketResponse, channel: str) -> None:
        if not (await self._receive(ws)).startswith("0"):
            raise Disconnected("no engine.io open packet")
        await ws.send_str("40")  # socket.io connect, default namespace
        text = await self._receive(ws)
        if not text.startswith("40"):
            raise Disconnected(f"socket.io connect refused: {text}")
        await ws.send_str("421" + orjson.dumps([self.join_event, channel]).decode())
        text = await self._receive(ws)
        if not text.startswith("431"):
            raise Disconnected(f"subscribe not acknowledged: {text}")

    def parse(self, text: str) -> tuple[list[Any], str | None]:
        if text.startswith("42"):
            event = orjson.loads(text[2:])
            return (event[1:2] if event[0] == self.pub_event else []), None
        if text == "2":
            return [], "3"
        if text.startswith(("41", "44")) or text == "1":
            raise Disconnected(f"server closed the session: {text}")
        return [], None


def make_adapter(name: str, token: str = "") -> Adapter:
    """The adapter called `name`; ValueError names the known ones otherwise."""
    if name not in PROTOCOLS:
        raise ValueError(f"unknown protocol {name!r}: choose from {sorted(PROTOCOLS)}")
    return PROTOCOLS[name](token)


# --- bidirectional emulation (spec 5.2) -----------------------------------------------------


def take_lines(buf: bytearray) -> str | None:
    """Cut the complete `\\n`-terminated lines off the front of `buf` (an http_stream body)
    and return them newline-joined; None while no line is complete."""
    end = buf.rfind(b"\n")
    if end < 0:
        return None
    text = buf[:end].decode()
    del buf[: end + 1]
    return text


def take_sse(buf: bytearray) -> str | None:
    """Cut the complete events (ended by a blank line) off the front of `buf` (an SSE body)
    and return their `data:` payloads newline-joined; None while no event is complete.
    Other lines (the leading `\\r\\n`, comments, `event:`/`id:` fields) are dropped."""
    end = buf.rfind(b"\n\n")
    if end < 0:
        return None
    block = buf[:end].decode()
    del buf[: end + 2]
    datas = [ln[5:].removeprefix(" ") for ln in block.split("\n") if ln.startswith("data:")]
    return "\n".join(datas)


def http_base(url: str) -> str:
    """http(s)://host:port for a ws(s):// or http(s):// URL (no trailing slash)."""
    url = url.rstrip("/")
    if url.startswith("ws://"):
        return "http://" + url[5:]
    if url.startswith("wss://"):
        return "https://" + url[6:]
    return url


class EmulationLink:
    """A Link over one streamed HTTP response plus `POST /emulation` for what goes up."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        response: aiohttp.ClientResponse,
        emulation_url: str,
        take: Callable[[bytearray], str | None],
    ) -> None:
        self.session = session
        self.response = response
        self.emulation_url = emulation_url
        self.take = take
        self.buf = bytearray()
        self.ids: dict[str, str] = {}  # session, node: set from the connect result

    async def receive(self) -> str | None:
        while True:
            text = self.take(self.buf)
            if text:
                return text
            if text is None:
                chunk = await self.response.content.readany()
                if not chunk:
                    return None
                self.buf += chunk

    async def send(self, text: Data) -> None:
        data = text.decode() if isinstance(text, bytes) else text
        body = orjson.dumps({**self.ids, "data": data})
        async with self.session.post(
            self.emulation_url,
            data=body,
            headers={"Content-Type": "application/json"},
            timeout=EMULATION_TIMEOUT,
        ) as response:
            await response.read()
            if response.status != 204:
                raise Disconnected(f"/emulation answered HTTP {response.status}")

    async def close(self) -> None:
        self.response.close()


EMULATION_TIMEOUT = aiohttp.ClientTimeout(total=10)


async def open_emulation(
    session: aiohttp.ClientSession,
    response: aiohttp.ClientResponse,
    base: str,
    take: Callable[[bytearray], str | None],
    channel: str,
) -> Link:
    """Finish an emulation handshake on a started stream `response`: its connect reply gives
    the session and node; subscribe by `POST /emulation`; its reply comes down the stream.
    The stream is closed if anything fails."""
    link = EmulationLink(session, response, base + "/emulation", take)
    try:
        if response.status != 200:
            raise Disconnected(f"{response.url.path}: HTTP {response.status}")
        connect = await _stream_reply(link, 1)
        result = connect.get("connect")
        if not result or "session" not in result or "node" not in result:
            raise Disconnected(f"connect: {connect}")
        link.ids = {"session": result["session"], "node": result["node"]}
        await link.send(orjson.dumps({"id": 2, "subscribe": {"channel": channel}}).decode())
        reply = await _stream_reply(link, 2)
        if "subscribe" not in reply:
            raise Disconnected(f"subscribe: {reply}")
    except BaseException:
        await link.close()
        raise
    return link


async def _stream_reply(link: EmulationLink, reply_id: int) -> dict[str, Any]:
    """Read the stream until the reply `reply_id`, answering pings (pong by /emulation)."""
    while True:
        text = await link.receive()
        if text is None:
            raise Disconnected(f"stream closed before reply {reply_id}")
        for line in text.split("\n"):
            msg = orjson.loads(line) if line else None
            if msg == {} and link.ids:
                await link.send("{}")
            elif isinstance(msg, dict) and msg.get("id") == reply_id:
                return msg


class CentrifugoHttpStream(Centrifugo):
    """`POST /connection/http_stream`, body = the connect command; JSON lines come back."""

    name = "centrifugo-http-stream"

    async def open(self, session: aiohttp.ClientSession, base_url: str, channel: str) -> Link:
        base = http_base(base_url)
        response = await session.post(
            base + "/connection/http_stream",
            data=self.connect_command,
            headers={"Content-Type": "application/json"},
        )
        return await open_emulation(session, response, base, take_lines, channel)


class CentrifugoSse(Centrifugo):
    """`GET /connection/sse?cf_connect=<connect command>`; `data: <json>` events come back."""

    name = "centrifugo-sse"

    async def open(self, session: aiohttp.ClientSession, base_url: str, channel: str) -> Link:
        base = http_base(base_url)
        query = urllib.parse.quote(self.connect_command.decode(), safe="")
        response = await session.get(
            f"{base}/connection/sse?cf_connect={query}", headers={"Accept": "text/event-stream"}
        )
        ctype = response.headers.get("Content-Type", "")
        if response.status == 200 and not ctype.startswith("text/event-stream"):
            response.close()
            raise Disconnected(f"sse: Content-Type {ctype!r}")
        return await open_emulation(session, response, base, take_sse, channel)


# --- Protobuf (protocol v2, binary) ----------------------------------------------------------


def varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def read_varint(buf: bytes | memoryview, pos: int) -> tuple[int, int]:
    """(value, position after it); ValueError when `buf` ends inside it."""
    value = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ValueError("truncated or overlong varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def pb_field(number: int, value: bytes) -> bytes:
    """A length-delimited field (wire type 2)."""
    return varint(number << 3 | 2) + varint(len(value)) + value


def pb_fields(message: bytes | memoryview) -> dict[int, Any]:
    """The last value of each field of `message`: an int (varint) or bytes (length-delimited);
    fixed-width fields are skipped. ValueError when malformed."""
    out: dict[int, Any] = {}
    pos, end = 0, len(message)
    while pos < end:
        key, pos = read_varint(message, pos)
        wire = key & 7
        if wire == 0:
            out[key >> 3], pos = read_varint(message, pos)
        elif wire == 2:
            size, pos = read_varint(message, pos)
            if pos + size > end:
                raise ValueError("truncated field")
            out[key >> 3] = bytes(message[pos : pos + size])
            pos += size
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
        else:
            raise ValueError(f"wire type {wire}")
    return out


def pb_messages(frame: bytes) -> list[bytes]:
    """The varint-length-delimited messages of one frame."""
    view, pos, out = memoryview(frame), 0, []
    while pos < len(view):
        size, pos = read_varint(view, pos)
        if pos + size > len(view):
            raise ValueError("truncated message")
        out.append(bytes(view[pos : pos + size]))
        pos += size
    return out


def pb_command(cmd_id: int, field: int, body: bytes) -> bytes:
    """One delimited Command {id = 1, <field> = body}."""
    command = varint(1 << 3) + varint(cmd_id) + pb_field(field, body)
    return varint(len(command)) + command


PB_PING_REPLY = b"\x00"  # a delimited empty Command: the pong


class CentrifugoProtobuf:
    """Centrifugo client protocol v2, Protobuf (see the module docstring)."""

    name = "centrifugo-protobuf"
    path = "/connection/websocket?format=protobuf"

    def __init__(self, token: str = "") -> None:
        self.connect_command = pb_command(1, 4, pb_field(1, token.encode()) if token else b"")

    async def open(self, session: aiohttp.ClientSession, base_url: str, channel: str) -> Link:
        return await open_ws(session, base_url.rstrip("/") + self.path, self.handshake, channel)

    async def handshake(self, ws: aiohttp.ClientWebSocketResponse, channel: str) -> None:
        subscribe = pb_command(2, 5, pb_field(1, channel.encode()))
        await ws.send_bytes(self.connect_command + subscribe)
        replies: dict[int, dict[int, Any]] = {}
        while 2 not in replies:
            msg = await ws.receive()
            if msg.type != BINARY:
                raise Disconnected(f"handshake got {msg.type.name} {msg.data!r}")
            for raw in pb_messages(msg.data):
                reply = pb_fields(raw)
                if not reply:
                    await ws.send_bytes(PB_PING_REPLY)
                elif reply.get(1):
                    replies[reply[1]] = reply
        if 5 not in replies.get(1, {}):
            raise Disconnected(f"connect: {replies.get(1)}")
        if 6 not in replies[2]:
            raise Disconnected(f"subscribe: {replies[2]}")

    def parse(self, frame: bytes) -> tuple[list[Any], Data | None]:
        pubs: list[Any] = []
        reply: Data | None = None
        for raw in pb_messages(frame):
            fields = pb_fields(raw)
            push = fields.get(4)
            if push is not None:
                push_fields = pb_fields(push)
                pub = push_fields.get(4)
                if pub is not None:
                    pubs.append(orjson.loads(pb_fields(pub).get(4, b"null")))
                elif 11 in push_fields:
                    raise Disconnected(f"server disconnect: {pb_fields(push_fields[11])}")
            elif not fields:
                reply = PB_PING_REPLY
            elif 2 in fields:
                raise Disconnected(f"server error: {pb_fields(fields[2])}")
        return pubs, reply


# --- unidirectional WebSocket -----------------------------------------------------------------


class CentrifugoUniWs:
    """Centrifugo's uni_websocket (see the module docstring)."""

    name = "centrifugo-uni-ws"
    path = "/connection/uni_websocket"

    def __init__(self, token: str = "") -> None:
        self.token = token

    async def open(self, session: aiohttp.ClientSession, base_url: str, channel: str) -> Link:
        return await open_ws(session, base_url.rstrip("/") + self.path, self.handshake, channel)

    async def handshake(self, ws: aiohttp.ClientWebSocketResponse, channel: str) -> None:
        request: dict[str, Any] = {"subs": {channel: {}}}
        if self.token:
            request["token"] = self.token
        await ws.send_str(orjson.dumps(request).decode())
        while True:
            msg = orjson.loads(await _receive_text(ws))
            if "connect" in msg:
                break
            if "disconnect" in msg:
                raise Disconnected(f"connect: {msg}")
        if channel not in msg["connect"].get("subs", {}):
            raise Disconnected(f"not subscribed to {channel}: {msg}")

    def parse(self, text: str) -> tuple[list[Any], Data | None]:
        msg = orjson.loads(text)
        pub = msg.get("pub")
        if pub is not None:
            return [pub["data"]], None
        if "disconnect" in msg:
            raise Disconnected(f"server disconnect: {msg['disconnect']}")
        return [], None


PROTOCOLS: dict[str, Callable[[str], Adapter]] = {
    "centrifugo": Centrifugo,
    "socketio": SocketIO,
    "centrifugo-http-stream": CentrifugoHttpStream,
    "centrifugo-sse": CentrifugoSse,
    "centrifugo-protobuf": CentrifugoProtobuf,
    "centrifugo-uni-ws": CentrifugoUniWs,
}
