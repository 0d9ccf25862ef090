"""Loop-driven pykka actors: many actors, one asyncio loop, no thread per actor.

docs/design/ARCHITECTURE.md decision 1: a `pykka.ThreadingActor` per connection costs a thread
each and ~1.3k tells/s; draining inboxes on the asyncio loop gives ~200k tells/s.

What is pykka's, used as it is: `ActorRef` (`tell`, `ask`, `stop`, `is_alive`, `proxy`), its
messages (`_ActorStop`, the proxy calls, handled by `pykka.Actor._handle_receive`),
`ActorDeadError` and `Timeout`, the `on_start`/`on_stop`/`on_failure`/`on_receive` hooks,
and `Future`'s `get`/`filter`/`map`/`join`. Callers only ever see those.

What is ours, and why: `LoopActor` is a pykka actor type built on pykka's extension points
for new actor types (`_create_actor_inbox`, `_create_future`, `_start_actor_loop`; underscore
names, so pykka is pinned to a minor range), plus a few overrides of pykka internals
(`__init__`, `_stop`, `_handle_failure`) that the loop-driven type needs:

* `tell`/`ask` may be called from the loop thread or any other thread. When an inbox goes
  from empty to non-empty it schedules one drain on the loop (`call_soon`, or
  `call_soon_threadsafe` from another thread). pykka's own actor types run a thread per
  actor instead.
* Messages are handled one at a time, in order. A handler may return an awaitable (be
  `async`); the next message then waits until it completes.
* `LoopFuture` is awaitable on the loop without blocking it (pykka's `Future.__await__`
  calls the blocking `get()`). `get()` on the loop thread raises `RuntimeError` (it would
  deadlock); from another thread it blocks as usual.
* Supervision as pykka's (a told message whose handler raises stops the actor, then
  `on_failure`), unless the actor is `resilient` (it logs and goes on).
* `InlineFanOut` hands a channel's messages to idle subscribers without an inbox round trip;
  `_StopFlag` and a counter URN make an actor cheaper to start than pykka's
  `threading.Event` and uuid4 (connection actors start by the thousand).
* `start` (and `start_instance`, for an actor object made by the caller) never puts the
  actor in pykka's `ActorRegistry`, a global list with O(n) removal for looking actors up
  by class or URN: nothing in the server looks actors up, and connection actors start and
  stop by the thousand. `ActorRegistry.get_all()` and `stop_all()` do not see LoopActors.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import inspect
import itertools
import logging
import sys
import threading
from collections.abc import Awaitable, Generator
from typing import Any, NamedTuple, Self, TypeVar

import pykka
from pykka import ActorRef, Future, messages

log = logging.getLogger("centripy.actors")

T = TypeVar("T")


class LoopFuture(Future[T]):
    """A pykka future backed by a `concurrent.futures.Future`, awaitable on any loop."""

    __slots__ = ("_cf",)

    def __init__(self) -> None:
        super().__init__()
        self._cf: concurrent.futures.Future[Any] = concurrent.futures.Future()

    def get(self, *, timeout: float | None = None) -> Any:
        try:
            return super().get(timeout=timeout)
        except NotImplementedError:
            pass
        if not self._cf.done() and timeout != 0 and _on_running_loop():
            raise RuntimeError("LoopFuture.get() would block the event loop; await it instead")
        try:
            return self._cf.result(timeout=timeout)
        except concurrent.futures.TimeoutError as exc:
            raise pykka.Timeout(f"{timeout} seconds") from exc

    def set(self, value: Any | None = None) -> None:
        self._cf.set_result(value)

    def set_exception(self, exc_info: Any = None) -> None:
        if exc_info is None:
            exc_info = sys.exc_info()
        exc = exc_info[1] if exc_info[1] is not None else exc_info[0]()
        self._cf.set_exception(exc)

    def __await__(self) -> Generator[Any, None, T]:
        if self._get_hook is None:
            return asyncio.wrap_future(self._cf).__await__()
        return self._await_hook().__await__()

    async def _await_hook(self) -> T:
        """Futures made by pykka's `filter`/`map`/`join`/`stop` compute their value with a
        get hook that would block; poll it with a zero timeout instead."""
        delay = 0.0005
        while True:
            try:
                return self.get(timeout=0)  # type: ignore[no-any-return]
            except pykka.Timeout:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.05)


def _on_running_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


class _LoopInbox:
    """A deque inbox that schedules its owner's drain when it becomes non-empty.

    On the loop thread no lock is needed: the drain runs on the same thread. From another
    thread, `put` appends (atomic for a deque) and asks the loop to re-check, so a drain
    that was just finishing cannot miss the message."""

    __slots__ = ("_actor", "_items")

    def __init__(self, actor: LoopActor) -> None:
        self._actor = actor
        self._items: collections.deque[Any] = collections.deque()

    def put(self, envelope: Any, /) -> None:
        actor = self._actor
        if threading.get_ident() == actor._loop_thread:
            if self.append_on_loop(envelope):
                actor._loop.call_soon(actor._drain)
        else:
            self._items.append(envelope)
            actor._loop.call_soon_threadsafe(actor._schedule_drain)

    def append_on_loop(self, envelope: Any) -> bool:
        """On the loop thread: queue `envelope`; True when the owner was idle (it is now
        marked busy) and the caller must start its drain."""
        self._items.append(envelope)
        actor = self._actor
        if actor._busy:
            return False
        actor._busy = True
        return True

    def get(self) -> Any:
        return self._items.popleft()

    def empty(self) -> bool:
        return not self._items


class InlineFanOut:
    """`tell` for a channel's fan-out, on the loop thread, without an inbox round trip.

    A subscriber that is idle (not busy, nothing queued) and accepts inline messages
    (`LoopActor.inline`) handles the message at once, in `on_receive`, and stays *held*
    (busy, `draining`) until `release`: later messages of this fan-out to it are handled
    inline too, in order, while tells from anywhere else queue in its inbox as for any busy
    actor. `release` ends the hold: each held actor runs `on_drained` (a connection writes
    everything just queued in one frame) and then drains what queued meanwhile.

    Equivalent to telling each actor (an idle actor with an empty inbox would handle the
    message first, alone, in its own drain), minus one envelope, two deque operations and
    a drain call per delivery. Anything else (another thread's actor, a busy one, a
    non-LoopActor) gets a plain `tell`."""

    __slots__ = ("_held", "_thread")

    def __init__(self) -> None:
        self._held: list[LoopActor] = []
        self._thread = threading.get_ident()

    def tell(self, ref: ActorRef[Any], message: Any, hold: bool = True) -> None:
        """As `ActorRef.tell` (ActorDeadError for a stopped actor). `hold=False` for the
        last message of a run: an actor this fan-out does not hold yet finishes at once
        (its write goes out now rather than after a second pass over the subscribers)."""
        inbox = ref.actor_inbox
        if type(inbox) is not _LoopInbox:
            ref.tell(message)
            return
        actor = inbox._actor
        if actor._stopped:
            raise pykka.ActorDeadError(f"{ref} not found")
        if actor._held_by is not self:
            idle = not actor._busy and not inbox._items
            if not idle or not actor.inline or actor._loop_thread != self._thread:
                ref.tell(message)
                return
            actor._busy = True
            actor.draining = True
            actor._held_by = self
            if hold:
                self._held.append(actor)
        elif inbox._items:  # held, but something was queued since: keep the order
            ref.tell(message)
            return
        else:
            hold = True  # held from an earlier message: release() finishes it
        try:
            result = actor.on_receive(message)
        except Exception:
            actor._reply_failure(_Told(message))
        else:
            if result is not None and inspect.isawaitable(result):  # not inline after all
                actor._held_by = None
                actor.draining = False
                actor._loop.create_task(actor._finish_async(_Told(message), result))
                return
        if not hold:
            self._finish(actor)

    @property
    def holding(self) -> bool:
        """True while some actor waits for `release`."""
        return bool(self._held)

    def release(self) -> None:
        """End the holds: `on_drained`, then a drain of what queued meanwhile."""
        held, self._held = self._held, []
        for actor in held:
            if actor._held_by is self:
                self._finish(actor)

    @staticmethod
    def _finish(actor: LoopActor) -> None:
        actor._held_by = None
        actor.draining = False
        try:
            actor.on_drained()
        except Exception:
            log.exception("on_drained of %s failed", actor)
        if actor._stopped:
            actor._fail_pending()
        elif actor._items:
            actor._loop.call_soon(actor._drain)
        else:
            actor._busy = False


class _Told(NamedTuple):
    """A told message in a LoopActor's inbox (what pykka's Envelope holds for a tell)."""

    message: Any
    reply_to: Any = None


_PYKKA_MESSAGES = frozenset(
    {messages._ActorStop, messages.ProxyCall, messages.ProxyGetAttr, messages.ProxySetAttr}
)


class _StopFlag:
    """What pykka uses of the `threading.Event` in `actor_stopped` (`is_set`, `set`, and
    `wait` for a caller that blocks), without the Condition, Lock and deque every
    threading.Event holds: connection actors start by the thousand, and each of those
    objects is one more for the cyclic GC to scan. The Event is made on the first wait."""

    __slots__ = ("_event", "_set")

    def __init__(self) -> None:
        self._set = False
        self._event: threading.Event | None = None

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        self._set = True
        event = self._event
        if event is not None:
            event.set()

    def wait(self, timeout: float | None = None) -> bool:
        if self._set:
            return True
        with _STOP_FLAG_LOCK:
            if self._event is None:
                self._event = threading.Event()
        if self._set:  # set() may have run before the Event existed
            self._event.set()
        return self._event.wait(timeout)


_STOP_FLAG_LOCK = threading.Lock()
_URNS = itertools.count(1)


class LoopActor(pykka.Actor):
    """Base class for actors whose inbox is drained on an asyncio loop.

    The loop is the one running when the actor is started (or `loop=` given to `start`).
    Subclasses implement `on_receive` (may be `async`) and may use `on_start`/`on_stop`,
    which run on the loop.
    """

    _loop: asyncio.AbstractEventLoop
    _loop_thread: int
    _busy: bool
    draining = False  # True while messages are being handled synchronously by _drain
    _stopped = False  # actor_stopped.is_set(), as a plain attribute for the hot paths
    inline = False  # may handle InlineFanOut messages inline (on_receive is synchronous for them)
    # Supervision: a told message whose handler raises stops the actor (pykka's rule; then
    # `on_failure` runs) unless the actor is `resilient`: it then logs the failure, calls
    # `on_message_failed` and goes on with the next message.
    resilient = False
    _held_by: InlineFanOut | None = None
    _items: collections.deque[Any]

    def __init__(self, *_args: Any, **_kwargs: Any) -> None:
        """What `pykka.Actor.__init__` sets up, lighter: a `_StopFlag` for
        `actor_stopped` and a counter URN (pykka's is a uuid4, ~3 us each)."""
        self.actor_urn = f"urn:centripy:actor:{next(_URNS)}"
        self.actor_inbox = self._create_actor_inbox()
        self.actor_stopped = _StopFlag()  # type: ignore[assignment]
        self._actor_ref = ActorRef(self)

    @classmethod
    def start(
        cls,
        *args: Any,
        loop: asyncio.AbstractEventLoop | None = None,
        **kwargs: Any,
    ) -> ActorRef[Self]:
        return cls.start_instance(cls(*args, **kwargs), loop=loop)

    @classmethod
    def start_instance(
        cls,
        obj: LoopActor,
        *,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> ActorRef[Any]:
        """Start an actor object made by the caller (`start` makes it from arguments)."""
        obj._loop = loop or asyncio.get_running_loop()
        # The loop's thread; re-read in _run_start, which always runs on the loop.
        obj._loop_thread = threading.get_ident() if loop is None else -1
        obj._busy = True  # until on_start has run
        obj._start_actor_loop()
        return obj.actor_ref

    def _create_actor_inbox(self) -> Any:  # type: ignore[override]
        inbox = _LoopInbox(self)
        self._items = inbox._items  # the inbox's deque, for the hot paths
        return inbox

    @staticmethod
    def _create_future() -> Future[Any]:
        return LoopFuture()

    def _start_actor_loop(self) -> None:
        if self._on_loop_thread():
            self._run_start()
        else:
            self._loop.call_soon_threadsafe(self._run_start)

    def _on_loop_thread(self) -> bool:
        return threading.get_ident() == self._loop_thread

    def _run_start(self) -> None:
        self._loop_thread = threading.get_ident()
        try:
            self.on_start()
        except Exception:
            self._handle_failure(*sys.exc_info())
            self._fail_pending()
            return
        self._busy = False
        if not self.actor_inbox.empty():
            self._loop.call_soon(self._drain)

    def _schedule_drain(self) -> None:
        """On the loop: start a drain unless one is running (or on_start has not run)."""
        if not self._busy and not self.actor_inbox.empty():
            self._busy = True
            self._loop.call_soon(self._drain)

    def _drain(self) -> None:
        """Handle queued messages in order; hand over to a task at the first awaitable.
        `on_drained` runs once the messages handled synchronously here are done."""
        self._busy = True
        self.draining = True
        try:
            if self._drain_messages():
                self._busy = False
        finally:
            self.draining = False
            self.on_drained()
        if self._stopped:
            self._fail_pending()

    def _drain_messages(self) -> bool:
        """True when the inbox was emptied; False when an async handler took over.
        pykka's own messages (stop, proxy calls) go to pykka; ours straight to
        `on_receive`, skipping pykka's chain of isinstance checks on the hot path."""
        items = self._items
        while items:
            if self._stopped:
                return True
            envelope = items.popleft()
            message = envelope.message
            try:
                if type(message) in _PYKKA_MESSAGES:
                    result = super()._handle_receive(message)
                else:
                    result = self.on_receive(message)
            except Exception:
                self._reply_failure(envelope)
                continue
            if result is not None and inspect.isawaitable(result):
                self._loop.create_task(self._finish_async(envelope, result))
                return False
            if envelope.reply_to is not None:
                envelope.reply_to.set(result)
        return True

    def on_message_failed(self, message: Any) -> None:
        """Hook of a `resilient` actor: the handler of `message` raised (already logged)."""

    def on_drained(self) -> None:
        """Hook: called on the loop after each run of synchronously handled messages (so a
        subclass can batch work, e.g. one write for all the pushes just queued)."""

    async def _finish_async(self, envelope: Any, awaitable: Awaitable[Any]) -> None:
        try:
            result = await awaitable
        except Exception:
            self._reply_failure(envelope)
        else:
            if envelope.reply_to is not None:
                envelope.reply_to.set(result)
        self._drain()

    def _reply_failure(self, envelope: Any) -> None:
        if envelope.reply_to is not None:
            envelope.reply_to.set_exception()
            return
        exc_info = sys.exc_info()
        if self.resilient and not self._stopped:
            log.error("%s failed on %r; it goes on", self, envelope.message, exc_info=exc_info)
            try:
                self.on_message_failed(envelope.message)
            except Exception:
                log.exception("on_message_failed of %s failed", self)
            return
        self._handle_failure(*exc_info)
        with contextlib.suppress(Exception):
            self.on_failure(*exc_info)

    def _handle_failure(self, *exc_info: Any) -> None:
        log.error("unhandled exception in %s", self, exc_info=exc_info)
        self._stopped = True
        self.actor_stopped.set()

    def _stop(self) -> None:
        self._stopped = True
        self.actor_stopped.set()
        try:
            self.on_stop()
        except Exception:
            self._handle_failure(*sys.exc_info())

    def _fail_pending(self) -> None:
        inbox = self.actor_inbox
        while not inbox.empty():
            envelope = inbox.get()
            if envelope.reply_to is None:
                continue
            if isinstance(envelope.message, messages._ActorStop):
                envelope.reply_to.set(None)
            else:
                envelope.reply_to.set_exception(
                    (pykka.ActorDeadError, pykka.ActorDeadError(f"{self} stopped"), None)
                )


def actor_of(ref: ActorRef[Any]) -> LoopActor | None:
    """The actor object behind `ref` when it is a LoopActor (same loop, same process)."""
    inbox = ref.actor_inbox
    return inbox._actor if type(inbox) is _LoopInbox else None


def tell_if_alive(ref: ActorRef[Any], message: Any) -> None:
    """Tell `message` unless the actor has stopped (for timer callbacks)."""
    if ref.is_alive():
        ref.tell(message)
