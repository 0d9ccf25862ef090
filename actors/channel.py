"""One actor per channel with local subscribers.

It owns the channel's subscriber set and encodes each publication, join and leave once per
wire format (`Encoded`), whatever the number of subscribers, then tells each subscribed
connection actor. Its inbox order is the channel's delivery order: the node fans out in
commit order, so subscribers receive offsets in increasing order.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any, NamedTuple, cast

from pykka import ActorDeadError, ActorRef

from centripy.actors.base import InlineFanOut, LoopActor, tell_if_alive
from centripy.actors.transport import Format, protobuf_codec
from centripy.engine.node import Node
from centripy.engine.protocol import json_codec
from centripy.engine.protocol.codes import Error, ErrorCode
from centripy.engine.sequencer import ChannelSequencer
from centripy.engine.types import ClientInfo, Publication, StreamPosition

log = logging.getLogger("centripy.channel")

RETRY_DELAY = 1.0  # seconds before a failed log read of a sequenced channel is retried


class Push(bytes):
    """One wire format's encoding of a push, shared by every subscriber of a fan-out, with
    a slot for the transport's framing of it: the WebSocket transports frame a `Push` on
    its first write as a frame's only message and keep that frame in `framed`, so a
    fan-out frames once per publication and format, not once per subscriber. (Set and read
    on the event loop only; a `bytes` subclass cannot have `__slots__`, so the slot lives
    in the instance dict, one per publication and format.)"""

    framed: bytes | None = None


NOT_JSON = b""  # the JSON encoding of a publication whose data is not JSON (binary)


class Encoded:
    """A push encoded lazily, once per wire format (`Format` is the index), and shared by
    all subscribers: `get(fmt)` is a `Push`, or `NOT_JSON` itself."""

    __slots__ = ("_cache", "_encoders")

    def __init__(self, encoders: tuple[Callable[[], bytes], ...]) -> None:
        self._encoders = encoders
        self._cache: list[bytes | None] = [None] * len(encoders)

    def get(self, fmt: int) -> bytes:
        data = self._cache[fmt]
        if data is None:
            data = self._encode(fmt)
            if data is not NOT_JSON:
                data = Push(data)
            self._cache[fmt] = data
        return data

    def _encode(self, fmt: int) -> bytes:
        return self._encoders[fmt]()


class EncodedPub(Encoded):
    """`Encoded` for a publication, without a closure per format: one is made for every
    publication fanned out (JSON, unidirectional JSON, Protobuf, as `Format`)."""

    __slots__ = ("_channel", "_pub")

    def __init__(self, channel: str, pub: Publication) -> None:
        self._channel = channel
        self._pub = pub
        self._cache = [None, None, None]

    def _encode(self, fmt: int) -> bytes:
        pub = self._pub
        if fmt == Format.PROTOBUF:
            return cast(bytes, protobuf_codec().encode_pub_push(self._channel, pub))
        if not json_codec.is_valid_json(pub.data):
            return NOT_JSON
        return json_codec.encode_pub_push(self._channel, pub, unidirectional=fmt == Format.JSON_UNI)


def encoded_pub(channel: str, pub: Publication) -> Encoded:
    return EncodedPub(channel, pub)


def encoded_join_leave(channel: str, info: ClientInfo, join: bool) -> Encoded:
    json_enc = json_codec.encode_join_push if join else json_codec.encode_leave_push

    def pb() -> bytes:
        codec = protobuf_codec()
        encode = codec.encode_join_push if join else codec.encode_leave_push
        return cast(bytes, encode(channel, info))

    return Encoded(
        (
            lambda: json_enc(channel, info),
            lambda: json_enc(channel, info, unidirectional=True),
            pb,
        )
    )


# -- messages -----------------------------------------------------------------------------


class AddSubscriber(NamedTuple):
    client_id: str
    conn: ActorRef[Any]
    join_leave: bool


class RemoveSubscriber(NamedTuple):
    client_id: str


class Deliver(NamedTuple):
    """A committed publication (to the channel actor), and one delivery (to a connection)."""

    channel: str
    pub: Publication
    epoch: str
    encoded: Encoded | None = None


class JoinLeave(NamedTuple):
    channel: str
    info: ClientInfo
    join: bool
    encoded: Encoded | None = None


class Init(NamedTuple):
    """Asked once by the hub after the broker subscription: position the sequencer."""


class Resync(NamedTuple):
    """Messages from other nodes may have been lost: re-read the log since the position."""


class Insufficient(NamedTuple):
    """To a connection: this channel's stream cannot be continued (epoch change, or offsets
    lost from the log); positioned subscriptions must resubscribe."""

    channel: str


class _GapCheck(NamedTuple):
    pass


class ChannelActor(LoopActor):
    """Runs on the loop. Subscribers are added and removed by the hub (`actors.hub`).

    Resilient: a message whose handling fails is logged and the actor goes on, so a
    committed publication always finds the channel's actor alive (the hub replaces one
    that stopped anyway, with its subscribers: `replacement`)."""

    resilient = True
    inline = True  # the hub hands Deliver and JoinLeave over with an InlineFanOut

    def __init__(self, channel: str) -> None:
        super().__init__()
        self.channel = channel
        self.subscribers: dict[str, tuple[ActorRef[Any], bool]] = {}
        self._fanout = InlineFanOut()

    def replacement(self) -> ActorRef[Any]:
        """A new actor for the same channel and subscribers (this one has stopped)."""
        new = ChannelActor(self.channel)
        new.subscribers = dict(self.subscribers)
        return ChannelActor.start_instance(new)

    def on_start(self) -> None:
        self._fanout = InlineFanOut()  # made again on the loop thread, whose actors it holds

    def on_drained(self) -> None:
        """After a run of messages: the subscribers write what this run gave them."""
        self._fanout.release()

    def on_stop(self) -> None:
        self.on_drained()

    def on_receive(self, message: Any) -> Any:
        kind = type(message)
        if kind is Deliver:
            self._deliver(message)
        elif kind is AddSubscriber:
            self.subscribers[message.client_id] = (message.conn, message.join_leave)
        elif kind is RemoveSubscriber:
            self.subscribers.pop(message.client_id, None)
        elif kind is JoinLeave:
            self._join_leave(message)
        else:
            log.warning("channel %s: unexpected message %r", self.channel, message)

    def _deliver(self, message: Deliver) -> None:
        channel, pub = self.channel, message.pub
        push = Deliver(channel, pub, message.epoch, EncodedPub(channel, pub))
        dead = []
        tell = self._fanout.tell
        # More may come in this run (queued, or the hub holds this actor until the end of
        # its run): subscribers write once, in on_drained, rather than once per message.
        hold = self._held_by is not None or bool(self._items)
        for client_id, (conn, _) in self.subscribers.items():
            try:
                tell(conn, push, hold)
            except ActorDeadError:
                dead.append(client_id)
        for client_id in dead:
            del self.subscribers[client_id]

    def _join_leave(self, message: JoinLeave) -> None:
        push = message._replace(
            encoded=encoded_join_leave(self.channel, message.info, message.join)
        )
        for conn, join_leave in list(self.subscribers.values()):
            if join_leave:
                try:
                    self._fanout.tell(conn, push)
                except ActorDeadError:
                    continue


class SequencedChannelActor(ChannelActor):
    """On several nodes: publications arrive from this node and from the broker in any
    order; a `ChannelSequencer` releases them strictly increasing and gap-free, reading this
    node's event log for what is late or lost (engine/sequencer.py explains the recipe)."""

    def __init__(self, channel: str, node: Node) -> None:
        super().__init__(channel)
        self.node = node
        self.sequencer = ChannelSequencer(on_insufficient=self._insufficient)
        self._timer: asyncio.TimerHandle | None = None
        self._retry_timer: asyncio.TimerHandle | None = None

    def on_receive(self, message: Any) -> Any:
        kind = type(message)
        if kind is Deliver:
            self._release(self.sequencer.offer(message.pub, message.epoch), message.epoch)
            return None
        if kind is Init:
            return self._init()
        if kind is _GapCheck:
            self._timer = None
            return self._fill_gap()
        if kind is Resync:
            return self._resync()
        return super().on_receive(message)

    def on_stop(self) -> None:
        super().on_stop()
        for timer in (self._timer, self._retry_timer):
            if timer is not None:
                timer.cancel()

    def replacement(self) -> ActorRef[Any]:
        """As ChannelActor's, continuing from the last released position (a Resync reads
        whatever the stopped actor had not released yet)."""
        new = SequencedChannelActor(self.channel, self.node)
        new.subscribers = dict(self.subscribers)
        position = self.sequencer.position
        ref = SequencedChannelActor.start_instance(new)
        if position is not None:
            new.sequencer.reset(position)
            ref.tell(Resync())
        return ref

    def on_message_failed(self, message: Any) -> None:
        """A log read failed (storage down?): publications may be missing; read again
        after a pause rather than wait for the next gap."""
        if type(message) in (Init, _GapCheck, Resync):
            self._retry()

    def _history_enabled(self) -> bool:
        try:
            return self.node.resolve(self.channel).options.history_enabled
        except Error:
            return False

    async def _init(self) -> None:
        if self.sequencer.position is not None or not self._history_enabled():
            return
        top = await self.node.stream_top(self.channel)
        self._release(self.sequencer.reset(top), top.epoch)

    def _release(self, pubs: list[Publication], epoch: str) -> None:
        for pub in pubs:
            self._deliver(Deliver(self.channel, pub, epoch))
        self._arm()

    def _arm(self) -> None:
        deadline = self.sequencer.next_deadline()
        if deadline is None or self._timer is not None:
            return
        delay = max(deadline - time.monotonic(), 0.0)
        self._timer = asyncio.get_running_loop().call_later(
            delay, tell_if_alive, self.actor_ref, _GapCheck()
        )

    async def _fill_gap(self) -> None:
        gap = self.sequencer.missing()
        if gap is None:
            self._arm()
            return
        position = self.sequencer.position
        since = StreamPosition(gap[0], position.epoch) if position else None
        await self._read_and_fill(since)

    async def _resync(self) -> None:
        if not self._history_enabled():
            return
        if self.sequencer.position is None:
            await self._init()  # never positioned: start at the top, do not replay the log
        else:
            await self._read_and_fill(self.sequencer.position)

    async def _read_and_fill(self, since: StreamPosition | None) -> None:
        """Read the log after `since` (the whole stream after a new epoch) and release what
        it fills. A failed read (storage down) changes nothing: it is retried later."""
        try:
            try:
                res = await self.node.history(self.channel, limit=-1, since=since)
            except Error as err:
                if err.code != ErrorCode.UNRECOVERABLE_POSITION:
                    raise
                res = await self.node.history(self.channel, limit=-1)
        except Error as err:
            log.warning("channel %s: log read failed (%s); retrying", self.channel, err)
            self._arm()
            self._retry()
            return
        epoch = res.position.epoch
        self._release(self.sequencer.fill(res.publications, epoch), epoch)

    def _retry(self) -> None:
        """Resync after RETRY_DELAY (nothing else may come to fill what is missing); one
        retry pending at a time, however many reads failed."""
        if self._retry_timer is None:
            self._retry_timer = asyncio.get_running_loop().call_later(RETRY_DELAY, self._retry_now)

    def _retry_now(self) -> None:
        self._retry_timer = None
        tell_if_alive(self.actor_ref, Resync())

    def _insufficient(self, reason: str) -> None:
        log.info("channel %s: insufficient state (%s)", self.channel, reason)
        for conn, _ in list(self.subscribers.values()):
            try:
                conn.tell(Insufficient(self.channel))
            except ActorDeadError:
                continue


__all__ = [
    "NOT_JSON",
    "RETRY_DELAY",
    "AddSubscriber",
    "ChannelActor",
    "Deliver",
    "Encoded",
    "EncodedPub",
    "Init",
    "Insufficient",
    "JoinLeave",
    "Push",
    "RemoveSubscriber",
    "Resync",
    "SequencedChannelActor",
    "encoded_join_leave",
    "encoded_pub",
]
