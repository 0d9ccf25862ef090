"""Cross-node fan-out over NATS core PUB/SUB (`broker: nats`), with the `nats-py` client.
Message bodies are `storage/wire.py`'s, as with the Redis and PostgreSQL brokers; history,
offsets and idempotency stay in the SQL event log and presence in the engine's back end.

Subjects (Centrifugo's layout):

* `<prefix>.client.<channel>`: publications, join and leave of `channel`; a node subscribes
  only while it has local subscribers of `channel`. A channel that is not a plain NATS
  subject (whitespace, an empty token, a `*` or `>` token, anything outside printable
  ASCII) travels as `<prefix>.clientx.<base64url(channel)>` instead of being refused, as
  Centrifugo refuses such channels;
* `<prefix>.control`: control messages to every node;
* `<prefix>.node.<uid>`: control messages to one node.

One connection per node, opened with `no_echo` (a node never gets its own messages back)
and without a reconnect buffer (Centrifugo's `ReconnectBufSize(-1)`): while disconnected,
publishing raises StorageError. nats-py reconnects by itself and re-subscribes; the broker
then calls `handler.on_reconnect()` so that channels gap-fill from the log.

Ordering. `publish` returns once the server has routed the message (PING/PONG after it), so
a publication acknowledged to its caller is already queued to every subscribed node. A
`barrier` is a PING on the receiving connection: the server answers it after every message
it had queued to this node, and once the PONG is read, the channel's subscription has
been handed everything read before it (its `delivered` count); the barrier waits until the
broker's callback has handled that many.

Two nats-py internals are used, on purpose: `Client.flush()` writes its PING straight to
the socket, ahead of commands still queued for the flusher task (measured: 5 PUBs in 2,000
overtaken), and it cancels its PONG future on timeout, after which the PONG, when it comes,
kills the client's read loop (InvalidStateError). So `_ping` first waits for the flusher
(`_flush_pending(force_flush=True)`) and then sends its own PING with a future it never
cancels (`_send_ping`). Pinned by setup.cfg (`nats-py<3`); tests cover both. Concurrent
publishes and barriers share one PING (the next one sent after they asked).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import re
from collections.abc import Callable
from typing import Any

import nats
import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from centripy.engine.contracts import Broker, BrokerHandler, StorageError
from centripy.engine.types import ClientInfo, Publication
from centripy.storage.wire import (
    KIND_CONTROL,
    call_handler,
    decode_message,
    deliver_message,
    encode_control_envelope,
    encode_join_leave,
    encode_publication,
)

log = logging.getLogger("centripy.broker.nats")

NATS_ERRORS = (nats.errors.Error, OSError, asyncio.TimeoutError)
_PLAIN_TOKEN = re.compile(r"^[!-~]+$")  # printable ASCII, no space


def plain_subject_part(name: str) -> bool:
    """True when `name` can be used as is in a subject: tokens of printable ASCII, none
    empty, none a wildcard or containing `>` or `*`."""
    return bool(name) and all(
        _PLAIN_TOKEN.match(token) and "*" not in token and ">" not in token
        for token in name.split(".")
    )


def client_subject(prefix: str, channel: str) -> str:
    """The subject of `channel`'s publications, join and leave messages."""
    if plain_subject_part(channel):
        return f"{prefix}.client.{channel}"
    encoded = base64.urlsafe_b64encode(channel.encode()).decode("ascii").rstrip("=")
    return f"{prefix}.clientx.{encoded or '_'}"


class _ChannelSub:
    """A subscription to one client channel and how many of its messages the callback has
    handled (for barriers). Lives as long as the nats-py Subscription it wraps."""

    def __init__(self, channel: str) -> None:
        self.channel = channel
        self.sub: Subscription | None = None
        self.handled = 0
        self.waiters: list[tuple[int, asyncio.Future[None]]] = []

    def mark_handled(self) -> None:
        self.handled += 1
        if self.waiters:
            ready = [w for w in self.waiters if w[0] <= self.handled]
            self.waiters = [w for w in self.waiters if w[0] > self.handled]
            for _, waiter in ready:
                if not waiter.done():
                    waiter.set_result(None)

    def release(self) -> None:
        for _, waiter in self.waiters:
            if not waiter.done():
                waiter.set_result(None)
        self.waiters = []


class NatsBroker(Broker):
    """NATS PUB/SUB broker. All methods run on the node's event loop, and so do the handler
    calls (from nats-py's subscription tasks)."""

    def __init__(
        self,
        url: str = "nats://127.0.0.1:4222",
        prefix: str = "centrifugo",
        dial_timeout: float = 1.0,
        write_timeout: float = 1.0,
        *,
        ping_interval: float = 5.0,
        reconnect_wait: float = 0.5,
    ) -> None:
        servers = [u.strip() for u in url.split(",") if u.strip()]
        if not servers or not all("://" in s for s in servers):
            raise ValueError(f"invalid nats_url {url!r}: use nats://host:port[,...]")
        if not plain_subject_part(prefix):
            raise ValueError(f"invalid nats_prefix {prefix!r}: not a plain NATS subject")
        if dial_timeout <= 0 or write_timeout <= 0:
            raise ValueError("nats dial and write timeouts must be positive")
        self._servers = servers
        self._prefix = prefix
        self._dial_timeout = dial_timeout
        self._write_timeout = write_timeout
        self._ping_interval = ping_interval
        self._reconnect_wait = reconnect_wait
        self._uid = ""
        self._handler: BrokerHandler | None = None
        self._nc: Client | None = None
        self._channels: dict[str, _ChannelSub] = {}
        self._connector: asyncio.Task[None] | None = None
        self._connecting: Client | None = None  # the client until its first connection
        self._first_attempt = asyncio.Event()  # the first connection is up or failed
        self._failed_before = False  # a connection attempt failed before the first success
        self._lost: asyncio.Future[None] | None = None  # resolved when the session drops
        self._trip_waiters: list[asyncio.Future[bool]] = []  # for the next PING's PONG
        self._trips: asyncio.Task[None] | None = None  # sends those PINGs
        self._closing = False

    # -- names ----------------------------------------------------------------------------

    def _control_subject(self) -> str:
        return f"{self._prefix}.control"

    def _node_subject(self, uid: str) -> str:
        return f"{self._prefix}.node.{uid}"

    # -- Broker ---------------------------------------------------------------------------

    async def start(self, node_uid: str, handler: BrokerHandler) -> None:
        """Connect in a task and wait until the first attempt succeeded or failed. Never
        raises for an unreachable server: nats-py keeps retrying every `reconnect_wait`
        (publish raises StorageError meanwhile, `subscribe` only remembers); once connected
        after a failure, the broker calls `on_reconnect`."""
        if not node_uid:
            raise ValueError("node_uid must not be empty")
        if not plain_subject_part(node_uid):
            raise ValueError(f"node_uid {node_uid!r} is not a plain NATS subject token")
        self._uid, self._handler, self._closing = node_uid, handler, False
        self._first_attempt.clear()
        self._failed_before = False
        self._connector = asyncio.create_task(self._connect())
        await self._first_attempt.wait()

    async def close(self) -> None:
        self._closing = True
        if self._connector is not None:
            self._connector.cancel()
            await asyncio.gather(self._connector, return_exceptions=True)
            self._connector = None
        if self._trips is not None:
            self._trips.cancel()
            await asyncio.gather(self._trips, return_exceptions=True)
            self._trips = None
        nc, self._nc = self._nc or self._connecting, None
        self._connecting = None
        for state in self._channels.values():
            state.release()
            state.sub = None
        self._end_session()
        if nc is not None and not nc.is_closed:
            try:
                await nc.close()
            except Exception as exc:  # a half-open client: nothing left to release
                log.debug("nats broker: close failed: %r", exc)
        self._handler = None

    async def subscribe(self, channel: str) -> None:
        """Subscribe `<prefix>.client.<channel>` and wait (up to write_timeout) until the
        server has it. While disconnected the subscription is only recorded: nats-py sends
        it on reconnect, and the broker then calls `handler.on_reconnect()`."""
        if channel in self._channels:
            return
        state = _ChannelSub(channel)
        self._channels[channel] = state
        nc = self._nc
        if nc is None or nc.is_closed:
            return  # _connect subscribes every recorded channel
        await self._subscribe_on(nc, state)
        if nc.is_connected:
            try:
                await self._round_trip(nc)
            except StorageError as exc:
                log.debug("nats broker: subscription to %s unconfirmed: %s", channel, exc)

    async def unsubscribe(self, channel: str) -> None:
        """Stop delivering `channel` at once (later messages are dropped) and UNSUB."""
        state = self._channels.pop(channel, None)
        if state is None:
            return
        state.release()
        sub, state.sub = state.sub, None
        if sub is not None:
            try:
                await sub.unsubscribe()
            except NATS_ERRORS as exc:
                log.debug("nats broker: unsubscribe %s failed: %r", channel, exc)

    async def publish(self, channel: str, pub: Publication, epoch: str) -> None:
        body = encode_publication(self._uid, channel, pub, epoch)
        await self._publish(client_subject(self._prefix, channel), body)

    async def publish_join_leave(self, channel: str, info: ClientInfo, join: bool) -> None:
        body = encode_join_leave(self._uid, channel, info, join)
        await self._publish(client_subject(self._prefix, channel), body)

    async def publish_control(self, data: bytes, node_uid: str = "") -> None:
        """To every other node (""), or to `node_uid` only. A node never receives its own
        control messages, even when addressed to itself."""
        if node_uid and not plain_subject_part(node_uid):
            raise StorageError(f"nats broker: node uid {node_uid!r} is not a subject token")
        subject = self._node_subject(node_uid) if node_uid else self._control_subject()
        await self._publish(subject, encode_control_envelope(self._uid, data, node_uid))

    async def barrier(self, channel: str) -> None:
        """PING on the receiving connection; once the PONG is read, wait until the
        channel's callback has handled every message read before it."""
        nc, state = self._nc, self._channels.get(channel)
        if nc is None or not nc.is_connected or state is None or state.sub is None:
            return  # nothing is received now; the reconnect resyncs
        sub = state.sub
        try:
            await self._round_trip(nc)
        except StorageError as exc:
            log.debug("nats broker: barrier on %s failed: %s", channel, exc)
            return
        target = sub.delivered
        if state.sub is not sub or state.handled >= target:
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        state.waiters.append((target, waiter))
        await asyncio.wait({waiter}, timeout=self._write_timeout)
        if not waiter.done():
            log.debug("nats broker: barrier on %s timed out", channel)
            waiter.cancel()

    # -- connection -----------------------------------------------------------------------

    async def _connect(self) -> None:
        """Connect (nats-py retries until it succeeds), subscribe the control subjects and
        every recorded channel; `on_reconnect` when an attempt failed before."""
        nc = Client()
        self._connecting = nc
        try:
            await nc.connect(
                self._servers,
                name=f"centripy-{self._uid}",
                no_echo=True,
                allow_reconnect=True,
                max_reconnect_attempts=-1,
                # nats-py annotates these seconds as int; it only sleeps or waits on them
                reconnect_time_wait=self._reconnect_wait,  # type: ignore[arg-type]
                connect_timeout=self._dial_timeout,  # type: ignore[arg-type]
                ping_interval=self._ping_interval,  # type: ignore[arg-type]
                max_outstanding_pings=2,
                pending_size=0,  # no reconnect buffer: publishing while disconnected fails
                flush_timeout=self._write_timeout,
                error_cb=self._on_error,
                disconnected_cb=self._on_disconnected,
                reconnected_cb=self._on_reconnected,
            )
            await nc.subscribe(self._control_subject(), cb=self._on_control)
            await nc.subscribe(self._node_subject(self._uid), cb=self._on_control)
        except NATS_ERRORS as exc:
            log.error("nats broker: cannot use %s: %r", self._servers, exc)
            self._first_attempt.set()
            return
        self._nc, self._connecting = nc, None
        self._lost = asyncio.get_running_loop().create_future()
        for state in list(self._channels.values()):
            if state.sub is None:
                await self._subscribe_on(nc, state)
        try:
            await self._round_trip(nc)
        except StorageError as exc:
            log.debug("nats broker: subscriptions unconfirmed: %s", exc)
        self._first_attempt.set()
        if self._failed_before:
            log.warning("nats broker: connected to %s", nc.connected_url)
            self._call(lambda h: h.on_reconnect())

    async def _subscribe_on(self, nc: Client, state: _ChannelSub) -> None:
        async def on_message(msg: Msg) -> None:
            try:
                if self._channels.get(state.channel) is state:
                    self._dispatch(state.channel, msg.data)
            finally:
                state.mark_handled()

        subject = client_subject(self._prefix, state.channel)
        try:
            state.sub = await nc.subscribe(subject, cb=on_message)
        except NATS_ERRORS as exc:
            log.warning("nats broker: subscribe %s failed: %r", state.channel, exc)

    async def _round_trip(self, nc: Client) -> None:
        """Return once the server has processed everything written on `nc` so far (and
        every message it routed to `nc` before has been read); StorageError otherwise.
        Callers waiting at the same time share one PING: the next one sent."""
        lost = self._lost
        if not nc.is_connected or lost is None or lost.done():
            raise StorageError("nats broker is not connected")
        waiter: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._trip_waiters.append(waiter)
        if self._trips is None or self._trips.done():
            self._trips = asyncio.create_task(self._run_round_trips(nc))
        await asyncio.wait({waiter}, timeout=self._write_timeout)
        if not waiter.done():
            raise StorageError("nats broker: no PONG within nats_write_timeout")
        if not waiter.result():
            raise StorageError("nats broker: the connection was lost")

    async def _run_round_trips(self, nc: Client) -> None:
        """PING after everything queued, one batch of waiters at a time, until none wait."""
        while self._trip_waiters:
            batch, self._trip_waiters = self._trip_waiters, []
            ok = await self._ping(nc)
            for waiter in batch:
                if not waiter.done():
                    waiter.set_result(ok)

    async def _ping(self, nc: Client) -> bool:
        lost = self._lost
        if lost is None or lost.done():
            return False
        pong: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        try:
            await nc._flush_pending(force_flush=True)  # see the module docstring
            if not nc.is_connected:
                return False
            await nc._send_ping(pong)
        except NATS_ERRORS as exc:
            log.debug("nats broker: ping failed: %r", exc)
            return False
        # never cancelled: nats-py resolves it (or forgets it on reconnect)
        await asyncio.wait({pong, lost}, timeout=self._write_timeout, return_when="FIRST_COMPLETED")
        return pong.done()

    async def _publish(self, subject: str, body: bytes) -> None:
        nc = self._nc
        if nc is None or self._handler is None or self._closing:
            raise StorageError("nats broker is not running")
        if not nc.is_connected:
            raise StorageError("nats broker is not connected")
        try:
            await nc.publish(subject, body)
        except NATS_ERRORS as exc:
            raise StorageError(f"nats publish to {subject!r} failed: {exc!r}") from exc
        await self._round_trip(nc)

    def _end_session(self) -> None:
        lost = self._lost
        if lost is not None and not lost.done():
            lost.set_result(None)

    # -- nats-py callbacks ----------------------------------------------------------------

    async def _on_error(self, exc: Exception) -> None:
        if self._nc is None and not self._closing:  # still connecting for the first time
            if not self._failed_before:
                log.warning("nats broker: cannot reach %s (%r), retrying", self._servers, exc)
            self._failed_before = True
            self._first_attempt.set()
            return
        if isinstance(exc, nats.errors.SlowConsumerError):
            log.warning("nats broker: slow consumer, a message on %s was dropped", exc.subject)
            for state in self._channels.values():
                if state.sub is exc.sub:
                    state.mark_handled()  # counted as delivered by nats-py, never handled
        else:
            log.debug("nats broker: %r", exc)

    async def _on_disconnected(self) -> None:
        if not self._closing:
            log.warning("nats broker: connection lost, reconnecting")
        self._end_session()
        for state in self._channels.values():
            state.release()

    async def _on_reconnected(self) -> None:
        """nats-py re-sent every SUB and flushed: messages may have been missed."""
        self._lost = asyncio.get_running_loop().create_future()
        nc = self._nc
        log.warning("nats broker: reconnected to %s", None if nc is None else nc.connected_url)
        self._call(lambda h: h.on_reconnect())

    async def _on_control(self, msg: Msg) -> None:
        try:
            decoded = decode_message(msg.data)
        except ValueError as exc:
            log.warning("nats broker: dropped a malformed message on %s: %s", msg.subject, exc)
            return
        if decoded.origin == self._uid or decoded.kind != KIND_CONTROL:
            return
        if decoded.target not in ("", self._uid):
            return
        data = decoded.data
        self._call(lambda h: h.on_control(data))

    def _dispatch(self, channel: str, body: bytes) -> None:
        try:
            msg = decode_message(body)
        except ValueError as exc:
            log.warning("nats broker: dropped a malformed message on %r: %s", channel, exc)
            return
        if msg.origin == self._uid or msg.kind == KIND_CONTROL or msg.channel != channel:
            return
        deliver_message(self._call, msg)

    def _call(self, fn: Callable[[BrokerHandler], None]) -> None:
        call_handler(self._handler, fn, "nats")
