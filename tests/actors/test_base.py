"""LoopActor: ordering, async handlers, futures that never block the loop, teardown."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pykka
import pytest

from centripy.actors.base import InlineFanOut, LoopActor


class Recorder(LoopActor):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[Any] = []

    def on_receive(self, message: Any) -> Any:
        if isinstance(message, tuple) and message[0] == "slow":
            return self._slow(message[1])
        if message == "boom":
            raise ValueError("boom")
        self.seen.append(message)
        return len(self.seen)

    async def _slow(self, value: Any) -> int:
        await asyncio.sleep(0.01)
        self.seen.append(value)
        return len(self.seen)


async def test_messages_are_handled_in_order_across_async_handlers() -> None:
    ref = Recorder.start()
    ref.tell(1)
    ref.tell(("slow", 2))
    ref.tell(3)
    assert await ref.ask(4, block=False) == 4
    assert ref.proxy().seen.get  # proxy attribute access works through the inbox
    seen = await ref.proxy().seen
    assert seen == [1, 2, 3, 4]


async def test_ask_returns_value_and_exceptions() -> None:
    ref = Recorder.start()
    assert await ref.ask("a", block=False) == 1
    with pytest.raises(ValueError, match="boom"):
        await ref.ask("boom", block=False)
    assert await ref.ask("b", block=False) == 2  # the actor survives an asked failure


async def test_get_on_the_loop_raises_instead_of_blocking() -> None:
    ref = Recorder.start()
    future = ref.ask("x", block=False)
    with pytest.raises(RuntimeError, match="block the event loop"):
        future.get()
    assert await future == 1


async def test_tell_and_ask_from_another_thread() -> None:
    ref = Recorder.start()
    results: list[Any] = []

    def worker() -> None:
        for i in range(100):
            ref.tell(i)
        results.append(ref.ask("last", timeout=5))

    thread = threading.Thread(target=worker)
    thread.start()
    await asyncio.get_running_loop().run_in_executor(None, thread.join)
    assert results == [101]
    assert (await ref.proxy().seen)[:100] == list(range(100))


async def test_unhandled_failure_stops_the_actor_and_fails_pending_asks() -> None:
    ref = Recorder.start()
    ref.tell("boom")
    pending = ref.ask("after", block=False)
    with pytest.raises(pykka.ActorDeadError):
        await asyncio.wait_for(asyncio.ensure_future(_await(pending)), 1)
    assert not ref.is_alive()


async def _await(future: Any) -> Any:
    return await future


async def test_stop_and_no_registry() -> None:
    """pykka's `ActorRegistry` never holds a LoopActor: `start` does not register it."""
    first, second = Recorder.start(), Recorder.start()
    assert first not in pykka.ActorRegistry.get_all()
    assert second not in pykka.ActorRegistry.get_all()
    await first.stop(block=False)
    await second.stop(block=False)
    assert not first.is_alive()
    with pytest.raises(pykka.ActorDeadError):
        second.tell(1)


async def test_ten_thousand_actors_fan_out_quickly() -> None:
    refs = [Recorder.start() for _ in range(10_000)]
    for ref in refs:
        ref.tell("m")
    answers = await asyncio.gather(*(_await(r.ask("n", block=False)) for r in refs))
    assert answers == [2] * 10_000


# -- InlineFanOut --------------------------------------------------------------------------------


class Subscriber(Recorder):
    """Accepts inline messages; notes each on_drained with what it had seen by then."""

    inline = True

    def __init__(self) -> None:
        super().__init__()
        self.drained: list[list[Any]] = []

    def on_drained(self) -> None:
        self.drained.append(list(self.seen))


def actor_of(ref: Any) -> Any:
    return ref.actor_inbox._actor


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_fanout_handles_idle_actors_inline_and_drains_once_at_release() -> None:
    refs = [Subscriber.start() for _ in range(3)]
    await settle()
    fanout = InlineFanOut()
    for message in ("a", "b"):
        for ref in refs:
            fanout.tell(ref, message)
    actors = [actor_of(ref) for ref in refs]
    assert all(actor.seen == ["a", "b"] for actor in actors)  # handled at once, in order
    assert all(actor.drained == [] for actor in actors)  # ... and held until release
    refs[0].tell("c")  # another sender while held: queued behind
    assert actors[0].seen == ["a", "b"]
    fanout.release()
    assert all(actor.drained == [["a", "b"]] for actor in actors)  # one on_drained each
    await settle()
    assert actors[0].seen == ["a", "b", "c"]
    assert await refs[1].ask("d", block=False) == 3  # idle again: an ordinary actor


async def test_fanout_queues_behind_a_busy_actor() -> None:
    ref = Subscriber.start()
    await settle()
    ref.tell(("slow", "first"))  # busy for 10 ms
    await settle()
    fanout = InlineFanOut()
    fanout.tell(ref, "second")
    fanout.release()
    actor = actor_of(ref)
    assert actor.seen == []
    assert await ref.ask("third", block=False) == 3
    assert actor.seen == ["first", "second", "third"]


async def test_fanout_keeps_order_when_the_held_actor_queued_something() -> None:
    ref = Subscriber.start()
    await settle()
    fanout = InlineFanOut()
    fanout.tell(ref, "a")
    ref.tell("b")  # queued in the inbox of the held actor
    fanout.tell(ref, "c")  # must not overtake "b"
    fanout.release()
    await settle()
    assert actor_of(ref).seen == ["a", "b", "c"]


async def test_fanout_plain_tell_for_actors_that_are_not_inline() -> None:
    ref = Recorder.start()
    await settle()
    fanout = InlineFanOut()
    fanout.tell(ref, "a")
    assert actor_of(ref).seen == []
    fanout.release()
    await settle()
    assert actor_of(ref).seen == ["a"]


async def test_fanout_failure_stops_the_actor_and_dead_actors_raise() -> None:
    ref = Subscriber.start()
    await settle()
    fanout = InlineFanOut()
    fanout.tell(ref, "boom")
    fanout.release()
    assert not ref.is_alive()
    with pytest.raises(pykka.ActorDeadError):
        fanout.tell(ref, "after")


async def test_fanout_async_result_becomes_a_task_in_order() -> None:
    ref = Subscriber.start()
    await settle()
    fanout = InlineFanOut()
    fanout.tell(ref, ("slow", "x"))
    fanout.tell(ref, "y")  # no longer held: queued behind the running handler
    fanout.release()
    assert await ref.ask("z", block=False) == 3
    assert actor_of(ref).seen == ["x", "y", "z"]


async def test_fanout_without_hold_finishes_idle_actors_at_once() -> None:
    first, second = (Subscriber.start() for _ in range(2))
    await settle()
    fanout = InlineFanOut()
    fanout.tell(first, "a")  # held
    fanout.tell(first, "b", hold=False)  # held already: still waits for release
    fanout.tell(second, "b", hold=False)  # idle: handled and finished now
    assert actor_of(second).drained == [["b"]]
    assert actor_of(first).drained == []
    assert await second.ask("c", block=False) == 2  # idle again
    fanout.release()
    assert actor_of(first).drained == [["a", "b"]]


async def test_actor_stopped_flag_wakes_a_waiting_thread() -> None:
    ref = Recorder.start()
    assert ref.is_alive() and not ref.actor_stopped.wait(0.01)
    woke: list[bool] = []
    waiter = threading.Thread(target=lambda: woke.append(ref.actor_stopped.wait(5)))
    waiter.start()
    await asyncio.sleep(0.05)  # the thread is waiting
    await ref.stop(block=False)
    await asyncio.get_running_loop().run_in_executor(None, waiter.join, 5)
    assert woke == [True] and not ref.is_alive()
    assert ref.actor_stopped.wait(0)  # already set: no wait
    assert Recorder.start().actor_urn != ref.actor_urn


# -- pykka's public contract, as callers rely on it ----------------------------------------


class Hooked(Recorder):
    def __init__(self, events: list[str]) -> None:
        super().__init__()
        self.events = events

    def on_stop(self) -> None:
        self.events.append("stop")

    def on_failure(self, *exc_info: Any) -> None:
        self.events.append(f"failure:{exc_info[0].__name__}")


async def test_ask_and_tell_on_a_stopped_actor() -> None:
    events: list[str] = []
    ref = Hooked.start(events)
    assert ref.is_alive()
    assert await ref.stop(block=False) is True  # ActorRef.stop: True when it stopped it
    assert not ref.is_alive() and events == ["stop"]
    with pytest.raises(pykka.ActorDeadError):
        await ref.ask("late", block=False)  # the future carries ActorDeadError
    with pytest.raises(pykka.ActorDeadError):
        ref.tell("late")
    assert await ref.stop(block=False) is False  # stopping a dead actor: False, no error
    assert events == ["stop"]


async def test_a_told_failure_calls_on_failure_not_on_stop() -> None:
    events: list[str] = []
    ref = Hooked.start(events)
    ref.tell("boom")
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert not ref.is_alive()
    assert events == ["failure:ValueError"]
