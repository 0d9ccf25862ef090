"""SequencedChannelActor under any interleaving of local deliveries (commit order), broker
deliveries (any order, duplicated, lost), log reads that are slow or stale, failed reads,
stream re-creation (a new epoch), Init, Resync and gap checks.

The real actor runs on an asyncio loop with a fake node whose `history()` reads a real
`MemoryEventLog`; each read can be held back (and then answered from the snapshot taken
when it started, or from the log as it is when released) or failed. Subscribers are
loop-driven actors that accept inline fan-out, as connection actors do. The invariant:
between two "insufficient state" notices, every subscriber sees one epoch's offsets
strictly increasing by one (no gap, no duplicate); once everything has settled, it has
everything up to the log's top.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import centripy.actors.channel as channel_module
from centripy.actors.base import LoopActor
from centripy.actors.channel import (
    AddSubscriber,
    Deliver,
    Init,
    Insufficient,
    Resync,
    SequencedChannelActor,
    _GapCheck,
)
from centripy.engine.contracts import (
    AppendRequest,
    HistoryQuery,
    HistoryResult,
    UnrecoverablePosition,
)
from centripy.engine.protocol.codes import Error, ErrorCode
from centripy.engine.sequencer import ChannelSequencer
from centripy.engine.types import Publication, StreamPosition
from centripy.storage.memory import MemoryEventLog

CHANNEL = "room:seq"
META_TTL = 10.0  # a stream idle for longer is forgotten: the next append makes a new epoch


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class PendingRead:
    """A history read the test has not answered yet."""

    def __init__(self, query: HistoryQuery, snapshot: HistoryResult | Exception) -> None:
        self.query = query
        self.snapshot = snapshot
        self.future: asyncio.Future[HistoryResult] = asyncio.get_running_loop().create_future()


class FakeNode:
    """What SequencedChannelActor uses of `engine.node.Node`, over a MemoryEventLog; every
    read waits until the test answers it."""

    def __init__(self, log: MemoryEventLog) -> None:
        self.log = log
        self.pending: list[PendingRead] = []

    def resolve(self, channel: str) -> Any:
        return SimpleNamespace(options=SimpleNamespace(history_enabled=True))

    async def stream_top(self, channel: str) -> StreamPosition:
        return (await self.history(channel)).position

    async def history(
        self, channel: str, *, limit: int = 0, since: StreamPosition | None = None
    ) -> HistoryResult:
        query = HistoryQuery(channel, limit, since, False, META_TTL)
        try:
            snapshot: HistoryResult | Exception = await self.log.history(query)
        except UnrecoverablePosition as exc:
            snapshot = exc
        read = PendingRead(query, snapshot)
        self.pending.append(read)
        try:
            return await read.future
        except UnrecoverablePosition as exc:
            raise Error.of(ErrorCode.UNRECOVERABLE_POSITION) from exc


BATCH_END = "batch end"  # told by the test after each release of the actor
Event = tuple[str, int] | str | None  # (epoch, offset); None: insufficient; BATCH_END


class Subscriber(LoopActor):
    inline = True  # takes fan-out inline, as ConnectionActor does

    def __init__(self) -> None:
        super().__init__()
        self.events: list[Event] = []

    def on_receive(self, message: Any) -> Any:
        if type(message) is Deliver:
            self.events.append((message.epoch, message.pub.offset))
        elif type(message) is Insufficient:
            self.events.append(None)
        elif message == BATCH_END:
            self.events.append(BATCH_END)


def check_events(events: list[Event]) -> None:
    """Within an epoch offsets strictly increase; they go up by exactly one, and the epoch
    never changes, unless the subscriber was told "insufficient state" before (the actor
    reports, then releases what follows: the notice covers the release that delivers the
    next publication); an epoch left is never seen again."""
    prev: tuple[str, int] | None = None
    told = covering = False
    left: set[str] = set()
    for event in events:
        if event is None:
            told, covering = True, False
        elif event == BATCH_END:
            if covering:
                told = covering = False
        else:
            covering = told
            assert isinstance(event, tuple)
            assert event[0] not in left, f"{event} after its epoch was left: {events}"
            if prev is not None:
                if event[0] == prev[0]:
                    assert event[1] > prev[1], f"{prev} then {event}: {events}"
                    assert event[1] == prev[1] + 1 or told, f"{prev} then {event}: {events}"
                else:
                    assert told, f"epoch changed without notice: {events}"
                    left.add(prev[0])
            prev = event


def last_pub(events: list[Event]) -> tuple[str, int] | None:
    for event in reversed(events):
        if isinstance(event, tuple):
            return event
    return None


class SequencedChannelMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.saved_retry = channel_module.RETRY_DELAY
        channel_module.RETRY_DELAY = 1e6  # the retry timer never fires: rules tell Resync
        self.loop = asyncio.new_event_loop()
        self.log_clock = Clock(1_000.0)
        self.log = MemoryEventLog(now=self.log_clock, gc_interval=None)
        self.node = FakeNode(self.log)
        self.clock = Clock(1e9)  # far ahead of time.monotonic(): _arm's timer never fires
        self.local: list[tuple[Publication, str]] = []  # committed here, not yet delivered
        self.remote: list[tuple[Publication, str]] = []  # committed elsewhere
        self.subs: list[Subscriber] = []
        self.history_size = 1000

        async def start() -> Any:
            ref = SequencedChannelActor.start(CHANNEL, self.node)
            return ref

        self.ref = self.loop.run_until_complete(start())
        actor = self.ref.actor_inbox._actor
        actor.sequencer = ChannelSequencer(now=self.clock, on_insufficient=actor._insufficient)
        self.actor = actor
        release = actor._release

        def release_and_mark(pubs: list[Publication], epoch: str) -> None:
            release(pubs, epoch)
            for conn, _ in actor.subscribers.values():
                conn.tell(BATCH_END)

        actor._release = release_and_mark

    def teardown(self) -> None:
        channel_module.RETRY_DELAY = self.saved_retry
        for read in self.node.pending:
            if not read.future.done():
                read.future.cancel()
        self.run()
        self.loop.close()

    # -- driving --------------------------------------------------------------------------

    def run(self) -> None:
        async def idle() -> None:
            for _ in range(20):
                await asyncio.sleep(0)

        self.loop.run_until_complete(idle())

    def tell(self, message: Any) -> None:
        self.ref.tell(message)
        self.run()

    # -- rules ----------------------------------------------------------------------------

    @rule(count=st.integers(1, 4), here=st.booleans())
    def commit(self, count: int, here: bool) -> None:
        req = AppendRequest(
            CHANNEL,
            b"{}",
            history_size=self.history_size,
            history_ttl=1e9,
            meta_ttl=META_TTL,
        )
        results = self.loop.run_until_complete(self.log.append_many([req] * count))
        for res in results:
            (self.local if here else self.remote).append((res.publication, res.epoch))

    @precondition(lambda self: self.local)
    @rule()
    def deliver_local(self) -> None:
        pub, epoch = self.local.pop(0)
        self.tell(Deliver(CHANNEL, pub, epoch))

    @precondition(lambda self: self.remote)
    @rule(data=st.data(), keep=st.booleans())
    def deliver_remote(self, data: st.DataObject, keep: bool) -> None:
        i = data.draw(st.integers(0, len(self.remote) - 1))
        pub, epoch = self.remote[i] if keep else self.remote.pop(i)  # keep: may come again
        self.tell(Deliver(CHANNEL, pub, epoch))

    @precondition(lambda self: self.remote)
    @rule(data=st.data())
    def lose_remote(self, data: st.DataObject) -> None:
        self.remote.pop(data.draw(st.integers(0, len(self.remote) - 1)))

    @rule()
    def subscribe(self) -> None:
        """As Hub.subscribe: Init (after the broker subscription), then AddSubscriber."""
        sub = Subscriber()
        self.loop.run_until_complete(self._start(sub))
        self.subs.append(sub)
        self.ref.tell(Init())
        self.tell(AddSubscriber(f"c{len(self.subs)}", sub.actor_ref, False))

    @staticmethod
    async def _start(sub: Subscriber) -> None:
        Subscriber.start_instance(sub)

    @rule(seconds=st.sampled_from([0.05, 0.3, 2.0]))
    def time_passes(self, seconds: float) -> None:
        self.clock.t += seconds

    @rule()
    def gap_check(self) -> None:
        self.tell(_GapCheck())

    @rule()
    def resync(self) -> None:
        self.tell(Resync())

    @precondition(lambda self: self.node.pending)
    @rule(fresh=st.booleans())
    def answer_read(self, fresh: bool) -> None:
        """Answer the oldest read: from the snapshot taken when it started (stale: the log
        may have moved on since) or from the log as it is now."""
        read = self.node.pending.pop(0)
        result: HistoryResult | Exception = read.snapshot
        if fresh:
            try:
                result = self.loop.run_until_complete(self.log.history(read.query))
            except UnrecoverablePosition as exc:
                result = exc
        if isinstance(result, Exception):
            read.future.set_exception(result)
        else:
            read.future.set_result(result)
        self.run()

    @precondition(lambda self: self.node.pending)
    @rule()
    def fail_read(self) -> None:
        self.node.pending.pop(0).future.set_exception(Error.of(ErrorCode.INTERNAL))
        self.run()

    @rule()
    def recreate_stream(self) -> None:
        """The stream is forgotten (meta ttl): the next append starts a new epoch at 1.
        Whatever of the old epoch is still in flight stays in flight."""
        self.log_clock.t += 10 * META_TTL

    @rule()
    def trim_history(self) -> None:
        """From now on the log keeps only the last 2 publications: offsets can be lost."""
        self.history_size = 2

    # -- invariants -----------------------------------------------------------------------

    @invariant()
    def subscribers_see_contiguous_offsets(self) -> None:
        for sub in self.subs:
            check_events(sub.events)

    def settle(self) -> None:
        """Everything in flight arrives, every read is answered, then a Resync."""
        while self.local:
            self.deliver_local()
        self.time_passes(2.0)
        for message in (Resync(), _GapCheck()):
            self.tell(message)
            while self.node.pending:
                self.answer_read(True)

    @rule()
    def settle_and_check(self) -> None:
        """Once all is answered, the actor has released up to the log's top, and so has
        every subscriber that has anything of the current epoch."""
        self.settle()
        top = self.loop.run_until_complete(
            self.log.history(HistoryQuery(CHANNEL, 0, None, False, META_TTL))
        ).position
        assert self.actor.sequencer.position == top
        for sub in self.subs:
            last = last_pub(sub.events)
            if last is not None and last[0] == top.epoch:
                assert last[1] == top.offset, sub.events


class TestSequencedChannel(SequencedChannelMachine.TestCase):  # type: ignore[name-defined]
    pass


TestSequencedChannel.settings = settings(max_examples=300, stateful_step_count=40, deadline=None)
