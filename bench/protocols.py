"""Protocol adapters of fanout.py: the harness owns each WebSocket (aiohttp); an adapter does
the handshake (connect + subscribe to one channel) and turns every incoming text message into
the publication payloads it carries plus an optional reply (a ping's pong).

- `centrifugo`: Centrifugo client protocol v2, JSON. `connect` (anonymous, or with a token) and
  `subscribe` go in one frame, as centrifuge-js sends them; replies and pushes may come several
  to a message, newline-joined. A server ping `{}` is answered with `{}`.
- `socketio`: Socket.IO 5 over Engine.IO 4, WebSocket transport only, default namespace. The
  client emits "subscribe" <channel> with an ack; each publication arrives as event
  "publication" whose single argument is the published data.

Add a protocol by writing one class with `path`, `handshake` and `parse` and listing it in
PROTOCOLS. Everything here runs on a client process's event loop.
"""

from __future__ import annotations

from typing import Any, Protocol

import aiohttp
import orjson

TEXT = aiohttp.WSMsgType.TEXT


class Disconnected(Exception):
    """The server refused the handshake, closed the session or answered with an error."""


class Adapter(Protocol):
    """What fanout.py needs from a protocol."""

    name: str
    path: str  # the WebSocket path, appended to ws://host:port

    async def handshake(self, ws: aiohttp.ClientWebSocketResponse, channel: str) -> None:
        """Connect and subscribe to `channel`; raises Disconnected if the server refuses."""
        ...

    def parse(self, text: str) -> tuple[list[Any], str | None]:
        """(publication payloads in the message, a reply to send or None)."""
        ...


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
        self._connect = orjson.dumps({"id": 1, "connect": {"token": token} if token else {}})

    async def handshake(self, ws: aiohttp.ClientWebSocketResponse, channel: str) -> None:
        subscribe = orjson.dumps({"id": 2, "subscribe": {"channel": channel}})
        await ws.send_str((self._connect + b"\n" + subscribe).decode())
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


PROTOCOLS: dict[str, type[Centrifugo] | type[SocketIO]] = {
    "centrifugo": Centrifugo,
    "socketio": SocketIO,
}


def make_adapter(name: str, token: str = "") -> Adapter:
    """The adapter called `name`; ValueError names the known ones otherwise."""
    if name not in PROTOCOLS:
        raise ValueError(f"unknown protocol {name!r}: choose from {sorted(PROTOCOLS)}")
    return PROTOCOLS[name](token)
