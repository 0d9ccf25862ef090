"""Lingering close of a connection whose request body we refused to read.

A 401, 413 or 503 is answered before the request body is read (a refused caller never makes
us buffer its body). Closing the socket right after that, with the client's body still
arriving, makes the kernel answer with RST: the client, still sending, gets EPIPE or
ECONNRESET instead of our status, and may even lose the status from its receive buffer.

So, as Go's net/http (`closeWrite`, then a pause before closing) and nginx's
`lingering_close` do: once the answer is flushed, send FIN (shut the socket down for
writing), then read and throw away what the client still sends until it closes, up to
`LINGER_BYTES` or `LINGER_SECONDS`, and only then close. The socket is a duplicate of the
stream's descriptor, so Tornado may close its stream as usual; the connection lives on
until the linger closes the duplicate. Nothing read is kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket

import tornado.iostream

LINGER_BYTES = 256 * 1024
LINGER_SECONDS = 2.0


def duplicate(stream: tornado.iostream.IOStream) -> socket.socket | None:
    """A plain socket on the same connection as `stream` (a duplicated descriptor, also
    under TLS, where the bytes discarded are records we never decrypt); None when the
    stream has no socket any more."""
    sock = stream.socket
    if sock is None:
        return None
    try:
        return socket.socket(fileno=os.dup(sock.fileno()))
    except OSError:
        return None


def linger(sock: socket.socket | None) -> None:
    """Send FIN on `sock` (everything written before is delivered first), then discard
    what the peer still sends until it closes, `LINGER_BYTES` are read or `LINGER_SECONDS`
    pass; then close `sock`. Call it on the event loop, after the answer is flushed."""
    if sock is None:
        return
    loop = asyncio.get_running_loop()
    fd = sock.fileno()
    left = LINGER_BYTES

    def close() -> None:
        timer.cancel()
        with contextlib.suppress(ValueError, OSError):
            loop.remove_reader(fd)
        sock.close()

    def discard() -> None:
        nonlocal left
        try:
            data = sock.recv(min(left, 65536))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            close()
            return
        left -= len(data)
        if not data or left <= 0:
            close()

    timer = loop.call_later(LINGER_SECONDS, close)
    try:
        sock.setblocking(False)
        sock.shutdown(socket.SHUT_WR)
        loop.add_reader(fd, discard)
    except OSError:
        close()
