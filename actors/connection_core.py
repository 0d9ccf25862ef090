"""The lifecycle half of a connection actor (the command handlers are in `connection.py`).

Lifecycle: the transport starts the actor, tells it `Frame`s (bidirectional) or one
`UniConnect` (unidirectional), and `TransportClosed` when the peer goes away. The actor
handles the commands of a frame in order, one at a time (an `async` handler holds the
inbox, so live pushes for a channel being subscribed wait behind the subscribe reply and
are checked against the recovered position). Replies and pushes go to a bounded outbound
queue, written by `_flush` (a loop callback, not a task; several messages per transport
write); overflow disconnects with 3008 (slow). The queue and the lifecycle states are in
`outbound.py` (`Outbound`, the base class of `ConnectionCore`).

All methods run on the event loop.
"""

from __future__ import annotations

import abc
import asyncio
import enum
import logging
import random
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from centripy.actors import connection_proxy
from centripy.actors.base import actor_of, tell_if_alive
from centripy.actors.channel import NOT_JSON, Deliver, Insufficient, JoinLeave
from centripy.actors.context import ConnContext
from centripy.actors.hub import (
    ServerDisconnectMsg,
    ServerRefreshMsg,
    ServerSubscribeMsg,
    ServerUnsubscribeMsg,
    Shutdown,
)
from centripy.actors.outbound import (
    CLOSED,
    CLOSING,
    CONNECTED,
    NEW,
    UNUSABLE,
    ConnState,
    Outbound,
)
from centripy.actors.transport import Format, Transport
from centripy.actors.wheel import WheelTimer, heartbeat_wheel_of, wheel_of
from centripy.engine import recovery
from centripy.engine.channels import ChannelName
from centripy.engine.config import Config
from centripy.engine.protocol.codec import Codec
from centripy.engine.protocol.codes import (
    UNSUBSCRIBE_REASONS,
    Disconnect,
    DisconnectCode,
    Error,
    ErrorCode,
    UnsubscribeCode,
)
from centripy.engine.protocol.commands import Command, ConnectRequest, ProtocolError
from centripy.engine.sessions import ServerSubscribe
from centripy.engine.types import ClientInfo, StreamPosition

log = logging.getLogger("centripy.connection")

# -- messages -----------------------------------------------------------------------------


class Frame(NamedTuple):
    data: bytes


class UniConnect(NamedTuple):
    request: ConnectRequest


class TransportClosed(NamedTuple):
    pass


def tell_frame(ref: Any, data: bytes) -> int:
    """Tell a connection actor a client frame; returns how many of its frames wait to be
    handled now (this one included). A transport stops reading the client, or refuses
    the frame, at `client_max_pending_frames`; the actor resumes it when they are down to
    half (`resume_reading`)."""
    actor = actor_of(ref)
    ref.tell(Frame(data))
    if not isinstance(actor, ConnectionCore):
        return 0
    actor.frames_pending += 1
    return actor.frames_pending


def frames_waiting(ref: Any) -> int:
    """How many frames told to a connection actor wait to be handled."""
    actor = actor_of(ref)
    return actor.frames_pending if isinstance(actor, ConnectionCore) else 0


class Timer(enum.IntEnum):
    """A connection's timers; the member itself is the message the timer tells the actor
    (one object per kind, whatever the number of connections)."""

    STALE = 0  # not connected within client_stale_close_delay: close with 3502
    PING = 1  # time to send a ping
    PONG = 2  # no pong within pong_timeout: close with 3012
    EXPIRE = 3  # connection expiry (plus client_expired_close_delay): close with 3005
    TICK = 4  # presence update, subscription expiry and position check


# Timers on the heartbeat wheels (actors/wheel.py); STALE and EXPIRE use the fine one.
_HEARTBEATS = frozenset({Timer.PING, Timer.PONG, Timer.TICK})


def _ticks(sub: Subscription) -> bool:
    """Whether `sub` needs its connection's TICK: presence refresh, position checks, expiry."""
    return sub.presence or sub.positioned or bool(sub.expire_at)


@dataclass(slots=True)
class Subscription:
    """State of one subscription of this connection."""

    name: ChannelName
    info: ClientInfo
    positioned: bool = False
    recoverable: bool = False
    epoch: str = ""
    offset: int = 0  # last delivered offset (positioned subscriptions)
    join_leave_push: bool = False
    presence: bool = False
    emit_join_leave: bool = False
    server_side: bool = False
    expire_at: int = 0  # unix seconds; 0 = never
    seen_top: int = 0  # stream top seen at the previous position check
    refresh_by_proxy: bool = False  # the sub_refresh proxy refreshes it when it expires


class ConnectionCore(Outbound):
    inline = True  # Deliver and JoinLeave are handled synchronously (InlineFanOut)

    def __init__(
        self, ctx: ConnContext, transport: Transport, proxy_headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(ctx.config.client_queue_max_size)
        self.ctx = ctx
        self.node = ctx.node
        self.transport = transport
        self.fmt = int(transport.format)
        self.codec: Codec = ctx.codec(self.fmt)  # json_codec or protobuf_codec
        self.client_id = str(uuid.uuid4())
        self.session = str(uuid.uuid4())
        self.user = ""
        self.conn_info = b""
        self.meta = b""
        self.expire_at = 0  # unix seconds; 0 = never
        self.state = NEW  # NEW -> CONNECTED -> CLOSING -> CLOSED; UNUSABLE after a connect error
        self.subs: dict[str, Subscription] = {}
        self._loop = asyncio.get_running_loop()
        self._closing: tuple[int, str] | None = None
        self._timers: dict[Timer, WheelTimer] = {}
        self._pong_pending = False
        self._ping_at = 0.0  # monotonic time of the ping awaiting its pong (metrics)
        self._last_position_check = time.monotonic()
        self.frames_pending = 0  # told by the transport (tell_frame), not handled yet
        self.proxy_headers = proxy_headers or {}  # client request headers the proxies forward
        self._slots: asyncio.Semaphore | None = None  # client_concurrency > 1: command slots
        self._channel_locks: dict[str, list[Any]] = {}  # channel -> [Lock, commands using it]

    @property
    def config(self) -> Config:
        """The node's current config, read per use: a SIGHUP reload (centripy/reload.py)
        replaces `ctx.config`, and the next command of every connection sees it."""
        return self.ctx.config

    # -- implemented by ConnectionActor (actors/connection.py) ----------------------------

    @abc.abstractmethod
    async def handle_command(self, cmd: Command) -> None:
        """Handle one decoded client command (replies go to the outbound queue)."""

    @abc.abstractmethod
    async def uni_connect(self, req: ConnectRequest) -> None:
        """Unidirectional transports: connect with a bare request, answer with a push."""

    @abc.abstractmethod
    async def server_subscribe(self, cmd: ServerSubscribe) -> None:
        """Server API subscribe of this connection."""

    @abc.abstractmethod
    def server_refresh(self, expired: bool, expire_at: int, info: bytes | None) -> None:
        """Server API refresh of this connection."""

    # -- actor plumbing -------------------------------------------------------------------

    def on_start(self) -> None:
        self.node.metrics.inc(
            "centrifugo_transport_connect_count",
            "Connections accepted.",
            transport=self.transport.name,
        )
        if not self.transport.unidirectional:
            self._set_timer(Timer.STALE, self.config.client_stale_close_delay)

    def on_receive(self, message: Any) -> Any:
        kind = type(message)
        if kind is Deliver:
            self._on_publication(message)
            return None
        if kind is TransportClosed:
            self._terminate()
            return None
        if kind is Frame and self.frames_pending > 0:  # (frames told directly: uncounted)
            self.frames_pending -= 1
            if self.frames_pending == self.config.client_max_pending_frames // 2:
                resume = getattr(self.transport, "resume_reading", None)
                if resume is not None:
                    resume()
        if self.state is CLOSED or self._closing is not None:
            return None
        if kind is Frame:
            data = message.data
            if data == self.codec.PONG_FRAME and self._pong_pending and self.state is CONNECTED:
                self._on_pong_frame(len(data))
                return None
            return self._on_frame(data)
        if kind is JoinLeave:
            if message.channel in self.subs and self.state is CONNECTED:
                self._enqueue(message.encoded.get(self.fmt))
            return None
        if kind is Timer:
            return self._on_timer(message)
        if kind is Insufficient:
            sub = self.subs.get(message.channel)
            if sub is not None and sub.positioned and self.state is CONNECTED:
                self._insufficient_state(message.channel, sub)
            return None
        if kind is UniConnect:
            return self.uni_connect(message.request)
        return self._on_server_message(message)

    def _on_server_message(self, message: Any) -> Any:
        kind = type(message)
        if kind is ServerDisconnectMsg:
            self.close(message.code, message.reason)
        elif kind is Shutdown:
            self.close(DisconnectCode.SHUTDOWN)
        elif self.state is not CONNECTED:
            return None
        elif kind is ServerUnsubscribeMsg:
            if message.channel in self.subs:
                self._unsubscribe(message.channel, UnsubscribeCode.SERVER, push=True)
        elif kind is ServerSubscribeMsg:
            return self.server_subscribe(message.cmd)
        elif kind is ServerRefreshMsg:
            self.server_refresh(message.expired, message.expire_at, message.info)
        else:
            log.warning("connection %s: unexpected message %r", self.client_id, message)
        return None

    # -- incoming frames ------------------------------------------------------------------

    def _on_pong_frame(self, size: int) -> None:
        """A frame that only answers the awaited ping, handled without a coroutine (every
        idle connection sends one per ping interval): `_on_frame` would decode it to one
        empty command and end in `on_pong` just the same."""
        self.node.metrics.received(self.transport.name, ("",), size)
        self.on_pong()

    async def _on_frame(self, data: bytes) -> None:
        try:
            commands = self.ctx.decode(self.fmt, data)
        except ProtocolError:
            self.close(DisconnectCode.BAD_REQUEST)
            return
        self.node.metrics.received(self.transport.name, [c.method for c in commands], len(data))
        cap = self.config.client_max_commands_per_frame
        if len(commands) > cap:  # the rest are refused, not handled
            busy = Error.of(ErrorCode.TOO_MANY_REQUESTS)
            for cmd in commands[cap:]:
                if cmd.id:
                    self._enqueue(self.codec.encode_error(cmd.id, busy))
            commands = commands[:cap]
        for cmd in commands:
            if self._closing is not None or self.state is CLOSED:
                return
            if self.state is UNUSABLE:
                self.close(DisconnectCode.BAD_REQUEST)
                return
            if self.config.client_concurrency > 1 and self.state is CONNECTED and cmd.id:
                await self._start_concurrent(cmd)
            elif not await self._run_command(cmd):
                return

    async def _run_command(self, cmd: Command) -> bool:
        """Handle `cmd`; False when it closed the connection."""
        started = time.perf_counter()
        try:
            await self.handle_command(cmd)
        except Disconnect as exc:
            self.close(exc.code, exc.reason)
            return False
        finally:
            self.node.metrics.client_command(cmd.method, time.perf_counter() - started)
        return True

    # -- client_concurrency ---------------------------------------------------------------
    # With client_concurrency N > 1 (Centrifugo's key), the commands of a connected client
    # run as tasks, at most N at a time: a frame waits for a free slot (so a client cannot
    # start more, and the read backpressure of tell_frame still applies), replies go out as
    # each finishes and are matched by id. Commands naming the same channel keep their order
    # (a subscribe never overtakes the unsubscribe sent before it).

    async def _start_concurrent(self, cmd: Command) -> None:
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.config.client_concurrency)
        slots = self._slots
        await slots.acquire()
        channel = getattr(cmd.request, "channel", "") or ""
        lock = None
        if channel:
            entry = self._channel_locks.setdefault(channel, [asyncio.Lock(), 0])
            entry[1] += 1
            lock = entry[0]
        self._spawn(self._concurrent(cmd, slots, channel, lock))

    async def _concurrent(
        self, cmd: Command, slots: asyncio.Semaphore, channel: str, lock: asyncio.Lock | None
    ) -> None:
        try:
            if lock is None:
                await self._guarded(cmd)
            else:
                async with lock:
                    await self._guarded(cmd)
        finally:
            slots.release()
            if lock is not None:
                entry = self._channel_locks[channel]
                entry[1] -= 1
                if not entry[1]:
                    del self._channel_locks[channel]

    async def _guarded(self, cmd: Command) -> None:
        if self._closing is not None or self.state is not CONNECTED:
            return
        try:
            await self._run_command(cmd)
        except Exception:  # outside the actor, supervision is ours: close this connection
            log.exception("connection %s: %s failed", self.client_id, cmd.method)
            self.close(DisconnectCode.INTERNAL)

    # -- publications ---------------------------------------------------------------------

    def _on_publication(self, message: Deliver) -> None:
        sub = self.subs.get(message.channel)
        if sub is None or self.state is not CONNECTED:
            return
        pub = message.pub
        if sub.positioned and pub.offset:
            verdict = recovery.check_position(sub.offset, sub.epoch, pub.offset, message.epoch)
            if verdict == "drop":
                return
            if verdict == "insufficient":
                self._insufficient_state(message.channel, sub)
                return
            sub.offset = pub.offset
        assert message.encoded is not None
        data = message.encoded.get(self.fmt)
        if data is NOT_JSON and self.fmt != Format.PROTOBUF:
            self.close(DisconnectCode.INAPPROPRIATE_PROTOCOL)  # binary data, JSON client
            return
        self._enqueue(data)

    def _insufficient_state(self, channel: str, sub: Subscription) -> None:
        if sub.server_side:
            self.close(DisconnectCode.INSUFFICIENT_STATE)
        else:
            self._unsubscribe(channel, UnsubscribeCode.INSUFFICIENT_STATE, push=True)

    def _unsubscribe(self, channel: str, code: int, *, push: bool) -> None:
        """Drop a subscription (client or server initiated); push tells the client."""
        sub = self.subs.pop(channel, None)
        if sub is None:
            return
        self._leave_channel(channel, sub)
        if push:
            self.node.metrics.server_unsubscribe(code)
            reason = UNSUBSCRIBE_REASONS.get(code, "unsubscribed")
            self._enqueue(
                self.codec.encode_unsubscribe_push(channel, code, reason, **self._uni_kw())
            )

    def _leave_channel(self, channel: str, sub: Subscription) -> None:
        self.ctx.hub.unsubscribe(channel, self.client_id)
        if sub.presence:
            self._spawn(self._remove_presence(channel))
        if sub.emit_join_leave:
            self.node.leave(channel, sub.info)

    async def _remove_presence(self, channel: str) -> None:
        try:
            await self.node.presence_manager.remove(channel, self.client_id)
        except Exception as exc:  # storage down: the entry expires with its TTL
            log.warning("connection %s: presence remove failed: %r", self.client_id, exc)

    def _uni_kw(self) -> dict[str, bool]:
        return {"unidirectional": True} if self.transport.unidirectional else {}

    # -- timers ---------------------------------------------------------------------------

    def _set_timer(self, kind: Timer, delay: float) -> None:
        old = self._timers.pop(kind, None)
        if old is not None:
            old.cancel()
        ref = self.actor_ref
        if kind in _HEARTBEATS:
            pings = self.ctx.hub.connection_count() / max(self.config.ping_interval, 1.0)
            timers = heartbeat_wheel_of(self._loop, delay, pings)
        else:
            timers = wheel_of(self._loop)
        self._timers[kind] = timers.call_later(max(delay, 0.0), tell_if_alive, ref, kind)

    def _start_timers(self) -> None:
        stale = self._timers.pop(Timer.STALE, None)
        if stale is not None:
            stale.cancel()  # connected: nothing for it to check
        interval = self.config.ping_interval
        if interval > 0:
            self._set_timer(Timer.PING, random.uniform(interval / 2, interval))
        self._want_tick()
        self._schedule_expiry()

    def _want_tick(self) -> None:
        """Set the TICK if a subscription has periodic work and none is set. Most have none
        (no presence, positioning or expiry): their connections tick not at all."""
        if Timer.TICK not in self._timers and any(map(_ticks, self.subs.values())):
            self._set_timer(Timer.TICK, self.config.client_presence_update_interval)

    def _schedule_expiry(self) -> None:
        old = self._timers.pop(Timer.EXPIRE, None)
        if old is not None:
            old.cancel()
        if self.expire_at:
            delay = self.expire_at - time.time()
            if connection_proxy.refresh_target(self) is None:  # else the server refreshes
                delay += self.config.client_expired_close_delay
            self._set_timer(Timer.EXPIRE, delay)

    def _on_timer(self, kind: Timer) -> Any:
        self._timers.pop(kind, None)
        if kind is Timer.STALE:
            if self.state is not CONNECTED:
                self.close(DisconnectCode.STALE)
        elif kind is Timer.PING:
            self._send_ping()
        elif kind is Timer.PONG:
            if self._pong_pending:
                self.close(DisconnectCode.NO_PONG)
        elif kind is Timer.EXPIRE:
            if self.expire_at and self.expire_at <= time.time():
                target = connection_proxy.refresh_target(self)
                if target is not None and self.state is CONNECTED:
                    return connection_proxy.refresh(self, target)
                self.close(DisconnectCode.EXPIRED)
            elif self.expire_at:  # fired a moment early (loop clock vs wall clock)
                self._schedule_expiry()
        elif kind is Timer.TICK:
            return self._periodic()
        return None

    def _send_ping(self) -> None:
        if self.state is not CONNECTED:
            return
        self._enqueue(self.codec.PING)
        if self.transport.pong and self.config.pong_timeout > 0 and not self._pong_pending:
            self._pong_pending = True
            self._ping_at = time.monotonic()
            self._set_timer(Timer.PONG, self.config.pong_timeout)
        self._set_timer(Timer.PING, self.config.ping_interval)

    def on_pong(self) -> None:
        if not self._pong_pending:
            raise Disconnect.of(DisconnectCode.BAD_REQUEST)
        self._pong_pending = False
        self.node.metrics.ping_pong(self.transport.name, time.monotonic() - self._ping_at)
        old = self._timers.pop(Timer.PONG, None)
        if old is not None:
            old.cancel()

    def _periodic(self) -> Any:
        """Every client_presence_update_interval: refresh presence, expire subscriptions,
        check positions when due. A coroutine (a task) only when a subscription has such
        work this tick: ten thousand connections tick together after a burst of connects."""
        self._want_tick()
        now = time.time()
        due = self._position_check_due()
        for sub in self.subs.values():
            if sub.presence or (due and sub.positioned) or self._sub_expired(sub, now):
                break
        else:
            if due:
                self._last_position_check = time.monotonic()
            return None
        return self._periodic_work(now)

    def _sub_expired(self, sub: Subscription, now: float) -> bool:
        return bool(sub.expire_at) and (
            sub.expire_at + self.config.client_expired_sub_close_delay <= now
        )

    def _position_check_due(self) -> bool:
        elapsed = time.monotonic() - self._last_position_check
        return elapsed >= self.config.client_channel_position_check_delay

    async def _periodic_work(self, now: float) -> None:
        for channel, sub in list(self.subs.items()):
            if self._sub_expired(sub, now):
                refreshed = await self._refresh_sub(channel, sub)
                if self.state is not CONNECTED:
                    return
                if not refreshed:
                    if sub.server_side or self.transport.unidirectional:
                        self.close(DisconnectCode.SUBSCRIPTION_EXPIRED)
                        return
                    self._unsubscribe(channel, UnsubscribeCode.EXPIRED, push=True)
                    continue
            if sub.presence:
                try:
                    await self.node.presence_manager.add(
                        channel, sub.info, self.config.global_presence_ttl
                    )
                except Exception as exc:  # storage down: keep the connection, try next tick
                    log.warning("connection %s: presence update failed: %r", self.client_id, exc)
        if self._position_check_due():
            self._last_position_check = time.monotonic()
            await self._check_positions()

    async def _refresh_sub(self, channel: str, sub: Subscription) -> bool:
        """An expired subscription the sub_refresh proxy refreshes: True if it did."""
        target = connection_proxy.sub_refresh_target(self, sub.name)
        if not sub.refresh_by_proxy or target is None:
            return False
        return await connection_proxy.sub_refresh(self, target, channel, sub)

    async def _check_positions(self) -> None:
        """A positioned subscription must have reached, by now, the stream top seen at the
        previous check (publications in flight then have arrived since); otherwise, or on
        an epoch change, its state is insufficient (docs/spec/protocol.md 3.3)."""
        for channel, sub in list(self.subs.items()):
            if not sub.positioned:
                continue
            try:
                top = await self.stream_top(channel, sub.name)
            except Exception:
                continue  # storage trouble: check again next time, as Centrifugo does
            if self.subs.get(channel) is not sub:
                continue
            if top.epoch != sub.epoch or sub.offset < sub.seen_top:
                self._insufficient_state(channel, sub)
                if self.state is not CONNECTED:
                    return
                continue
            sub.seen_top = top.offset

    async def stream_top(self, channel: str, name: ChannelName) -> StreamPosition:
        """The stream top from a log read that starts after this call, shared with the
        other connections reading the same channel meanwhile (`ctx.reads`)."""
        result = await self.ctx.reads.history(channel, limit=0, since=None, name=name)
        return result.position

    # -- closing --------------------------------------------------------------------------

    def close(self, code: int, reason: str = "") -> None:
        """Disconnect: flush what is queued, then close the transport with `code`."""
        if self._closing is not None or self.state is CLOSED:
            return
        self._closing = (code, reason or Disconnect.of(code).reason)
        self.node.metrics.inc(
            "centrifugo_client_num_server_disconnects",
            "Connections closed by the server.",
            code=str(code),
        )
        self._cleanup()
        if not self._writing:  # flush what is queued (the flush then closes the transport)
            self._writing = True
            self._flush()

    def _finish_close(self) -> None:
        assert self._closing is not None
        code, reason = self._closing
        try:
            self.transport.close(code, reason)
        except Exception as exc:
            log.debug("connection %s: close failed: %r", self.client_id, exc)
        self._terminate()

    def _terminate(self) -> None:
        """The connection is gone: release everything and stop the actor."""
        if self._release():
            self.actor_ref.stop(block=False)

    def _release(self) -> bool:
        """Leave every channel, the hub and the timers; False if that was done already."""
        if self.state is CLOSED:
            return False
        self._cleanup()
        self.state = CLOSED
        self._drop_outbound()
        self.ctx.hub.remove_connection(self.client_id)
        return True

    def on_failure(self, *exc_info: Any) -> None:
        """Supervision: an exception escaped a handler (logged; the actor has stopped).
        Only this connection pays: it is closed with 3004 and everything it held (hub
        entry, subscriptions, presence, user connection count) is released."""
        if not self._release():
            return
        code = DisconnectCode.INTERNAL
        self.node.metrics.inc(
            "centrifugo_client_num_server_disconnects",
            "Connections closed by the server.",
            code=str(code),
        )
        try:
            self.transport.close(code, Disconnect.of(code).reason)
        except Exception as exc:
            log.debug("connection %s: close failed: %r", self.client_id, exc)

    def _cleanup(self) -> None:
        for handle in self._timers.values():
            handle.cancel()
        self._timers.clear()
        for channel, sub in list(self.subs.items()):
            self._leave_channel(channel, sub)
        self.subs.clear()
        if self.state is CONNECTED:
            self.state = CLOSING

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.ctx.background.add(task)
        task.add_done_callback(self.ctx.background.discard)

    def encode_reply(self, cmd_id: int, key: str, result: dict[str, Any]) -> bytes:
        return self.codec.encode_reply(cmd_id, key, result)


__all__ = [
    "CLOSED",
    "CLOSING",
    "CONNECTED",
    "NEW",
    "UNUSABLE",
    "ConnState",
    "ConnectionCore",
    "Frame",
    "Subscription",
    "Timer",
    "TransportClosed",
    "UniConnect",
    "frames_waiting",
    "tell_frame",
]
