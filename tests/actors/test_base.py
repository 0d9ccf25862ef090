"""LoopActor: ordering, async handlers, futures that never block the loop, teardown."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pykka
import pytest

from actors.base import LoopActor


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
    ref = Recorder.start(register=False)
    ref.tell(1)
    ref.tell(("slow", 2))
    ref.tell(3)
    assert await ref.ask(4, block=False) == 4
    assert ref.proxy().seen.get  # proxy attribute access works through the inbox
    seen = await ref.proxy().seen
    assert seen == [1, 2, 3, 4]


async def test_ask_returns_value_and_exceptions() -> None:
    ref = Recorder.start(register=False)
    assert await ref.ask("a", block=False) == 1
    with pytest.raises(ValueError, match="boom"):
        await ref.ask("boom", block=False)
    assert await ref.ask("b", block=False) == 2  # the actor survives an asked failure


async def test_get_on_the_loop_raises_instead_of_blocking() -> None:
    ref = Recorder.start(register=False)
    future = ref.ask("x", block=False)
    with pytest.raises(RuntimeError, match="block the event loop"):
        future.get()
    assert await future == 1


async def test_tell_and_ask_from_another_thread() -> None:
    ref = Recorder.start(register=False)
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
    ref = Recorder.start(register=False)
    ref.tell("boom")
    pending = ref.ask("after", block=False)
    with pytest.raises(pykka.ActorDeadError):
        await asyncio.wait_for(asyncio.ensure_future(_await(pending)), 1)
    assert not ref.is_alive()


async def _await(future: Any) -> Any:
    return await future


async def test_stop_and_registry() -> None:
    registered = Recorder.start()
    hidden = Recorder.start(register=False)
    assert registered in pykka.ActorRegistry.get_all()
    assert hidden not in pykka.ActorRegistry.get_all()
    await registered.stop(block=False)
    await hidden.stop(block=False)
    assert not registered.is_alive()
    assert registered not in pykka.ActorRegistry.get_all()
    with pytest.raises(pykka.ActorDeadError):
        hidden.tell(1)


async def test_ten_thousand_actors_fan_out_quickly() -> None:
    refs = [Recorder.start(register=False) for _ in range(10_000)]
    for ref in refs:
        ref.tell("m")
    answers = await asyncio.gather(*(_await(r.ask("n", block=False)) for r in refs))
    assert answers == [2] * 10_000
