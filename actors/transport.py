"""What a connection actor needs from its transport (WebSocket, HTTP-stream, SSE, ...).

Transports are thin: they decode nothing and hold no protocol state. The connection actor
hands them encoded messages and tells them when to close; they tell the actor about
incoming frames and about the peer going away (`actors.connection` messages).
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Awaitable, Sequence
from enum import IntEnum
from typing import Any, Protocol


class Format(IntEnum):
    """Wire format of a connection: selects the cached encoding of a push."""

    JSON = 0
    JSON_UNI = 1  # unidirectional JSON: pushes without the {"push": ...} envelope
    PROTOBUF = 2


class Transport(Protocol):
    name: str  # "websocket", "http_stream", "sse", "sockjs", "uni_websocket", ...
    format: Format
    emulation: bool  # connect result must carry `session` and `node`
    unidirectional: bool
    pong: bool  # whether the client answers pings (bidirectional transports)

    def write(self, messages: Sequence[bytes]) -> Awaitable[None] | None:
        """Send encoded messages (one frame, or one line/event each, as the transport
        frames them). Called on the loop by the connection actor's writer, one call at a
        time; the returned awaitable completes when the transport accepted the data.
        Raises or fails the awaitable when the peer is gone."""
        ...

    def close(self, code: int, reason: str) -> None:
        """Send the disconnect the transport's way (close frame, or a disconnect push)
        and close. Called once, on the loop, after every queued message was written."""
        ...


@functools.cache
def protobuf_codec() -> Any:
    """The protobuf codec module, imported on first use (only protobuf clients need it);
    remembered, since the protobuf transports call this on every write."""
    return importlib.import_module("centripy.engine.protocol.protobuf_codec")
