"""The timer wheel: timers fire in order, never early and at most one slot late; a cancel
leaves nothing on the loop's heap; a failing callback is reported and spares the others."""

from __future__ import annotations

import asyncio
import math
from collections import Counter
from typing import Any

from centripy.actors.wheel import (
    FIRE_CHUNK,
    HEARTBEAT_RESOLUTIONS,
    RESOLUTION,
    TimerWheel,
    heartbeat_wheel_of,
    wheel_of,
)


async def test_timers_fire_in_order_never_early_and_at_most_one_slot_late() -> None:
    loop = asyncio.get_running_loop()
    w = TimerWheel(loop)
    fired: list[tuple[str, float]] = []
    start = loop.time()
    done = asyncio.Event()
    for name, delay in (("c", 0.09), ("a", 0.01), ("b", 0.05), ("a2", 0.011)):
        w.call_later(delay, lambda n, d: fired.append((n, loop.time() - start - d)), name, delay)
    w.call_later(0.1, done.set)
    await asyncio.wait_for(done.wait(), 2)
    assert [n for n, _ in fired] == ["a", "a2", "b", "c"]
    for _, late in fired:
        assert late >= 0
        assert late < RESOLUTION + 0.05  # a slot, plus the loop's own scheduling slack


async def test_many_timers_share_a_loop_handle_per_slot_and_cancels_leave_none() -> None:
    loop = asyncio.get_running_loop()
    before = len(loop._scheduled)  # type: ignore[attr-defined]
    w = TimerWheel(loop, resolution=0.5)
    fired: list[int] = []
    when = loop.time() + 0.2
    timers = [w.call_at(when + i / 10_000, fired.append, i) for i in range(5_000)]
    slots = len(loop._scheduled) - before  # type: ignore[attr-defined]
    assert 1 <= slots <= 2  # 5,000 timers within 0.5 s: one or two slots of 0.5 s
    for t in timers[::2]:
        t.cancel()
        assert t.cancelled()
    assert w.pending() == 2_500
    await asyncio.sleep(1.3)
    assert fired == list(range(1, 5_000, 2))
    assert w.pending() == 0
    assert all(t.cancelled() for t in timers)  # ran ones count as done
    assert len(loop._scheduled) == before  # type: ignore[attr-defined]


async def test_a_cancelled_timer_drops_its_callback_and_arguments_at_once() -> None:
    w = TimerWheel(asyncio.get_running_loop())
    payload = {"big": "x" * 100}
    t = w.call_later(60, print, payload)
    t.cancel()
    assert t._callback is None and t._args == ()
    t.cancel()  # twice is fine


async def test_a_failing_callback_is_reported_and_the_rest_of_its_slot_runs() -> None:
    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: reported.append(context))
    try:
        w = TimerWheel(loop, resolution=0.05)
        fired: list[str] = []
        when = loop.time() + 0.01

        def boom() -> None:
            raise ValueError("boom")

        w.call_at(when, boom)
        w.call_at(when, fired.append, "after")
        await asyncio.sleep(0.15)
        assert fired == ["after"]
        assert len(reported) == 1 and isinstance(reported[0]["exception"], ValueError)
    finally:
        loop.set_exception_handler(None)


async def test_a_timer_set_from_a_firing_slot_for_now_runs_on_the_next_pass() -> None:
    loop = asyncio.get_running_loop()
    w = TimerWheel(loop)
    fired: list[str] = []
    w.call_later(0.0, lambda: w.call_later(0.0, fired.append, "second") and None)
    await asyncio.sleep(0.1)
    assert fired == ["second"]


async def test_a_full_slot_runs_fire_chunk_timers_per_loop_iteration() -> None:
    loop = asyncio.get_running_loop()
    w = TimerWheel(loop, resolution=0.05)
    iteration = 0
    ran: list[tuple[int, int]] = []  # (timer, loop iteration)

    def tick() -> None:
        nonlocal iteration
        iteration += 1
        if len(ran) < 100:
            loop.call_soon(tick)

    when = loop.time() + 0.05
    timers = [w.call_at(when, lambda i: ran.append((i, iteration)), i) for i in range(101)]
    timers[50].cancel()  # skipped, and not counted in its chunk
    loop.call_soon(tick)  # counts loop iterations until every timer ran
    await asyncio.wait_for(_until(lambda: len(ran) == 100), 2)
    assert [i for i, _ in ran] == [i for i in range(101) if i != 50]
    per_iteration = Counter(it for _, it in ran)
    assert max(per_iteration.values()) == FIRE_CHUNK
    assert len(per_iteration) == math.ceil(100 / FIRE_CHUNK)


async def test_heartbeat_slots_hold_a_few_pings_and_make_them_at_most_a_fifth_late() -> None:
    loop = asyncio.get_running_loop()

    def slot(delay: float, pings: float) -> float:
        return heartbeat_wheel_of(loop, delay, pings)._resolution

    assert slot(25.0, 40.0) == 0.25  # 1,000 connections pinged every 25 s: 10 a slot
    assert slot(25.0, 400.0) == RESOLUTION  # 10,000: as fine as the other timers
    assert heartbeat_wheel_of(loop, 25.0, 400.0) is wheel_of(loop)
    assert slot(25.0, 0.0) == max(HEARTBEAT_RESOLUTIONS)
    assert slot(2.0, 0.0) == 0.25  # at most 20% late
    assert slot(0.2, 0.0) == RESOLUTION
    beats, step = heartbeat_wheel_of(loop, 25.0, 4.0), 1.0
    when = (math.floor(loop.time() / step) + 2) * step  # a slot's start
    fired: list[int] = []
    for i in range(3):  # within one slot: they run together, in order, at its end
        beats.call_at(when + (0.1 + i * 0.3) * step, fired.append, i)
    await asyncio.sleep(when + 0.8 * step - loop.time())
    assert fired == []
    await asyncio.sleep(when + step + 0.05 - loop.time())
    assert fired == [0, 1, 2]


async def _until(predicate: Any) -> None:
    while not predicate():
        await asyncio.sleep(0.005)


async def test_each_loop_has_one_wheel_of_each_resolution() -> None:
    loop = asyncio.get_running_loop()
    assert wheel_of(loop) is wheel_of(loop)
    assert heartbeat_wheel_of(loop, 25.0, 40.0) is heartbeat_wheel_of(loop, 20.0, 30.0)
    other: list[TimerWheel] = []

    async def grab() -> None:
        other.append(wheel_of(asyncio.get_running_loop()))

    await asyncio.to_thread(asyncio.run, grab())
    assert other[0] is not wheel_of(loop)
