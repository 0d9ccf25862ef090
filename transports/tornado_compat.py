"""The only module allowed to touch Tornado's private names.

The lean path (`api_lean.py`, `api_protocol.py`) shares a port with Tornado: a connection it
does not answer goes to Tornado's HTTP/1 parser with the bytes already read put in front of
a new `IOStream`'s read buffer (`unread`). Tornado has no public API for that, so it uses
`IOStream`'s private read buffer (a `bytearray` and its size, Tornado 6). The WebSocket
unmasking function is Tornado's C speedup (`tornado.util._websocket_mask`, with a
pure-Python fallback inside Tornado).

At import this module checks that these private names exist in the installed Tornado, and
raises ImportError naming the version otherwise, so that a Tornado upgrade that moves them
fails at start-up, not on the first request. Nothing else in centripy imports a private
Tornado name (grep for `_read_buffer` and `_websocket_mask`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final, cast

import tornado
import tornado.iostream
import tornado.util

_BUFFER_FIELDS: Final = ("_read_buffer", "_read_buffer_size")


def _check() -> Callable[[bytes, bytes], bytes]:
    """Tornado's mask function, after checking every private name this module uses."""
    assigned = tornado.iostream.BaseIOStream.__init__.__code__.co_names
    missing = [name for name in _BUFFER_FIELDS if name not in assigned]
    mask = getattr(tornado.util, "_websocket_mask", None)
    if mask is None:
        missing.append("tornado.util._websocket_mask")
    if missing:
        raise ImportError(
            f"centripy's lean HTTP/WebSocket path needs Tornado internals that Tornado "
            f"{tornado.version} does not have ({', '.join(missing)}); install a Tornado "
            f"version within the range setup.cfg pins"
        )
    return cast(Callable[[bytes, bytes], bytes], mask)


websocket_mask: Final[Callable[[bytes, bytes], bytes]] = _check()
"""`websocket_mask(key, data)`: `data` XOR the 4-byte `key` repeated (RFC 6455 5.3)."""


def _buffer(stream: tornado.iostream.IOStream) -> bytearray:
    buf = stream._read_buffer
    if not isinstance(buf, bytearray):  # pragma: no cover (a Tornado that changed it)
        raise RuntimeError(f"Tornado {tornado.version}: IOStream._read_buffer is not a bytearray")
    return buf


def unread(stream: tornado.iostream.IOStream, data: bytes) -> None:
    """Put `data` back in front of the stream's read buffer, so that Tornado's HTTP/1
    parser reads the request head the lean path looked at. Called on the loop, between
    two reads of `stream` (none pending)."""
    _buffer(stream)[:0] = data
    stream._read_buffer_size += len(data)
