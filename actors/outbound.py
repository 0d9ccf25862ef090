"""The outbound side of a connection actor: its lifecycle states and its outbound queue.

`ConnectionCore` (`connection_core.py`) is an `Outbound`. Replies and pushes are queued by
`_enqueue` and written by `_flush`, a loop callback rather than a task (this is the fan-out
hot path), up to MAX_MESSAGES_IN_FRAME messages per transport write; messages queued while a
write is pending join the next one, so a busy connection batches. A queue over
`client_queue_max_size` bytes disconnects with 3008 (slow). A write that fails, or that the
peer takes none of within the transport's `write_timeout`, aborts the transport and
releases the connection.

The lifecycle states are here because the queue follows them: a CLOSING connection still
flushes (the flush then closes the transport), a CLOSED one writes nothing more.

All methods run on the event loop.
"""

from __future__ import annotations

import abc
import asyncio
import collections
import enum
import logging
from typing import Any

from centripy.actors.base import LoopActor
from centripy.actors.transport import Transport
from centripy.engine.protocol.codes import DisconnectCode

log = logging.getLogger("centripy.connection")

MAX_MESSAGES_IN_FRAME = 16


class ConnState(enum.IntEnum):
    """Where a connection is in its lifecycle (compared with `is` on the hot paths)."""

    NEW = 0  # waiting for `connect`
    CONNECTED = 1
    UNUSABLE = 2  # `connect` failed: the next command disconnects with 3501
    CLOSING = 3  # close() on a connected connection: no longer CONNECTED, the queue flushes
    CLOSED = 4  # released: out of the hub and every channel, the actor stops


NEW = ConnState.NEW
CONNECTED = ConnState.CONNECTED
UNUSABLE = ConnState.UNUSABLE
CLOSING = ConnState.CLOSING
CLOSED = ConnState.CLOSED


class Outbound(LoopActor):
    """A connection actor's outbound queue and its writes to the transport."""

    state: ConnState
    transport: Transport
    client_id: str
    _closing: tuple[int, str] | None  # (code, reason) once close() has been called

    def __init__(self, max_size: int) -> None:
        super().__init__()
        self._out: collections.deque[bytes] = collections.deque()
        self._out_size = 0
        self._out_max = max_size
        self._writing = False  # a flush is scheduled or waiting for the transport
        self._write_timer: asyncio.TimerHandle | None = None

    # -- implemented by ConnectionCore ----------------------------------------------------

    @abc.abstractmethod
    def close(self, code: int, reason: str = "") -> None:
        """Disconnect: flush what is queued, then close the transport with `code`."""

    @abc.abstractmethod
    def _finish_close(self) -> None:
        """The queue is flushed after close(): close the transport, release everything."""

    @abc.abstractmethod
    def _terminate(self) -> None:
        """The connection is gone: release everything and stop the actor."""

    # -- outbound queue -------------------------------------------------------------------

    def _enqueue(self, data: bytes) -> None:
        if self._closing is not None:
            return
        self._out.append(data)
        self._out_size += len(data)
        if self._out_size > self._out_max:
            self._out.clear()
            self._out_size = 0
            self.close(DisconnectCode.SLOW)
            return
        if not self._writing and not self.draining:
            self._writing = True
            self._loop.call_soon(self._flush)

    def on_drained(self) -> None:
        """After a run of messages (e.g. a burst of publications): one write for them all."""
        if self._out and not self._writing and self.state is not CLOSED:
            self._writing = True
            self._flush()

    def _flush(self) -> None:
        """Write queued messages, up to MAX_MESSAGES_IN_FRAME per transport write; wait for
        the transport between writes (a callback, not a task, on this hot path). Messages
        queued meanwhile join the next write, so a busy connection batches."""
        out = self._out
        while out and self.state is not CLOSED:
            if len(out) == 1:  # the common case of a fan-out: one message
                batch = [out.popleft()]
                self._out_size -= len(batch[0])
            else:
                n = min(len(out), MAX_MESSAGES_IN_FRAME)
                batch = [out.popleft() for _ in range(n)]
                self._out_size -= sum(map(len, batch))
            try:
                pending = self.transport.write(batch)
            except Exception as exc:
                self._write_failed(exc)
                return
            if pending is not None:
                future = asyncio.ensure_future(pending)
                if not future.done():
                    future.add_done_callback(self._write_done)
                    timeout = getattr(self.transport, "write_timeout", 0.0)
                    if timeout > 0:
                        self._write_timer = self._loop.call_later(timeout, self._write_stalled)
                    return
                if future.exception() is not None:
                    self._write_failed(future.exception())
                    return
        self._writing = False
        if self._closing is not None and self.state is not CLOSED:
            self._finish_close()

    def _write_stalled(self) -> None:
        """The peer took none of a pending write within the transport's `write_timeout`
        (it stopped reading): drop the connection now, whatever is still queued."""
        self._write_timer = None
        log.info("connection %s: write timed out; aborting", self.client_id)
        self._write_failed(None)

    def _write_done(self, future: asyncio.Future[Any]) -> None:
        timer, self._write_timer = self._write_timer, None
        if timer is not None:
            timer.cancel()
        if future.cancelled() or future.exception() is not None:
            self._write_failed(None if future.cancelled() else future.exception())
        else:
            self._flush()

    def _write_failed(self, exc: BaseException | None) -> None:
        """A write failed or stalled: drop the transport (nothing more can go through it,
        and what it still buffers must not stay) and release the connection."""
        log.debug("connection %s: write failed: %r", self.client_id, exc)
        self._writing = False
        abort = getattr(self.transport, "abort", None)
        if abort is not None:
            try:
                abort()
            except Exception as abort_exc:
                log.debug("connection %s: abort failed: %r", self.client_id, abort_exc)
        self._terminate()

    def _drop_outbound(self) -> None:
        """On release: forget what is queued and the pending write's timeout."""
        self._out.clear()
        self._out_size = 0
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None


__all__ = [
    "CLOSED",
    "CLOSING",
    "CONNECTED",
    "MAX_MESSAGES_IN_FRAME",
    "NEW",
    "UNUSABLE",
    "ConnState",
    "Outbound",
]
