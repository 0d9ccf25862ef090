"""Coarse timers for many connections: a timing wheel on the event loop.

asyncio keeps every `call_later` as a TimerHandle in one heap ordered by a Python `__lt__`,
and a cancelled handle stays there until its time comes. With 10,000 WebSocket connections
the loop held 40,000 handles, half of them cancelled (each connection's stale-close timer and
HTTP header deadline, cancelled once it connects). Connections made in a burst have those
times together, so once a second during a publication load thousands of cancelled handles
reached the heap's top at once, each popped with ~15 Python comparisons: 9-16 ms of the
loop's time in one pass, outside any callback (s6-2k, 2,000 publications/s offered).

Here a timer goes into the slot of `RESOLUTION` seconds it falls in; the loop holds one
handle per occupied slot, a cancel only marks the entry, and a slot runs its live entries in
the order they were set, `FIRE_CHUNK` per loop iteration. A timer fires at most `RESOLUTION`
late (plus the iterations a full slot takes), never early: right for pings, pong waits,
presence ticks, stale closes, expiry and header deadlines, which are seconds long. Precise
or short timers keep `loop.call_later`.

Heartbeats (pings, pong waits, presence ticks: every ~25 s for each connection, for ever) go
on wheels with longer slots, so that those of many connections fire together: in slots of
25 ms, 1,000 idle connections' ~40 pings a second each had a slot of their own, and each woke
the loop, the client's process, and the loop again for the pong. How long a slot can be is
set by how many heartbeats it then holds: their pongs come back at once and are read in one
loop iteration, and at 10,000 connections slots of 0.25 s (~200 pongs each) tripled the p99
of publications (see `heartbeat_wheel_of`).
"""

from __future__ import annotations

import asyncio
import contextvars
import math
import weakref
from collections.abc import Callable
from typing import Any

RESOLUTION = 0.025  # seconds per slot
HEARTBEAT_RESOLUTIONS = (0.05, 0.1, 0.25, 0.5, 1.0)  # seconds per slot of heartbeat wheels
PINGS_PER_SLOT = 10  # what a heartbeat wheel's slot is sized for
FIRE_CHUNK = 32  # timers a slot runs per loop iteration

# Slot handles run in one context (asyncio copies the current one for each handle otherwise).
_CONTEXT = contextvars.Context()


class WheelTimer:
    """One timer of a `TimerWheel`: `cancel()`, `cancelled()` and `when()` as a TimerHandle's."""

    __slots__ = ("_args", "_callback", "_when")

    def __init__(self, when: float, callback: Callable[..., object], args: tuple[Any, ...]):
        self._when = when
        self._callback: Callable[..., object] | None = callback
        self._args = args

    def when(self) -> float:
        """The loop time it was set for (it fires in the slot after, at most RESOLUTION late)."""
        return self._when

    def cancel(self) -> None:
        """Do not run it (a no-op once it ran); drops the callback and its arguments now."""
        self._callback = None
        self._args = ()

    def cancelled(self) -> bool:
        """True once cancelled or run."""
        return self._callback is None


class TimerWheel:
    """The timers of one event loop, in slots of `resolution` seconds of loop time."""

    def __init__(self, loop: asyncio.AbstractEventLoop, resolution: float = RESOLUTION) -> None:
        self._loop = loop
        self._resolution = resolution
        self._slots: dict[int, list[WheelTimer]] = {}

    def call_at(self, when: float, callback: Callable[..., object], *args: Any) -> WheelTimer:
        """Run `callback(*args)` at loop time `when` or up to `resolution` later."""
        timer = WheelTimer(when, callback, args)
        slot = math.ceil(when / self._resolution)
        entries = self._slots.get(slot)
        if entries is None:
            self._slots[slot] = [timer]
            self._loop.call_at(slot * self._resolution, self._fire, slot, context=_CONTEXT)
        else:
            entries.append(timer)
        return timer

    def call_later(self, delay: float, callback: Callable[..., object], *args: Any) -> WheelTimer:
        """`call_at(loop.time() + delay, ...)`."""
        return self.call_at(self._loop.time() + delay, callback, *args)

    def pending(self) -> int:
        """Timers set and neither run nor cancelled (diagnostics and tests)."""
        return sum(not t.cancelled() for entries in self._slots.values() for t in entries)

    def _fire(self, slot: int) -> None:
        self._run(self._slots.pop(slot, []), 0)

    def _run(self, entries: list[WheelTimer], start: int) -> None:
        """Run the live timers of `entries[start:]`, at most `FIRE_CHUNK` per loop iteration:
        the rest go on after the loop has polled its sockets once, so a slot full of
        heartbeats does not hold every connection's I/O back at once."""
        ran = 0
        for i in range(start, len(entries)):
            timer = entries[i]
            callback, args = timer._callback, timer._args
            if callback is None:
                continue
            if ran == FIRE_CHUNK:
                self._loop.call_soon(self._run, entries, i, context=_CONTEXT)
                return
            ran += 1
            timer.cancel()  # ran: a later cancel() is a no-op
            try:
                callback(*args)
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException as exc:
                self._loop.call_exception_handler(
                    {"message": f"timer callback {callback!r} failed", "exception": exc}
                )


_WHEELS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[float, TimerWheel]] = (
    weakref.WeakKeyDictionary()
)


def _wheel(loop: asyncio.AbstractEventLoop, resolution: float) -> TimerWheel:
    wheels = _WHEELS.get(loop)
    if wheels is None:
        wheels = _WHEELS[loop] = {}
    found = wheels.get(resolution)
    if found is None:
        found = wheels[resolution] = TimerWheel(loop, resolution)
    return found


def wheel_of(loop: asyncio.AbstractEventLoop) -> TimerWheel:
    """`loop`'s wheel of `RESOLUTION` (made on first use). Callers pass the loop they hold:
    `asyncio.get_running_loop()` costs a getpid() system call per call on Python 3.11."""
    return _wheel(loop, RESOLUTION)


def heartbeat_wheel_of(loop: asyncio.AbstractEventLoop, delay: float, pings: float) -> TimerWheel:
    """`loop`'s wheel for a heartbeat `delay` seconds away when the loop sends about `pings`
    pings a second: the longest slot that holds at most `PINGS_PER_SLOT` of them and makes
    the heartbeat at most 20% late (else the `RESOLUTION` wheel): 0.25 s for 1,000
    connections, 25 ms for 10,000 (with pings every 25 s). 1,000 idle subscribers cost the
    server 76-82 CPU ticks per 50 s with 25 ms slots and 44-50 with these (the `websockets`
    loop 18-20); fixed 0.25 s slots took s6-2k's p99 (10,000 connections) from 2.7-3.7 ms to
    6.9-8.6 ms."""
    chosen = RESOLUTION
    for resolution in HEARTBEAT_RESOLUTIONS:
        if resolution * 5 > delay or resolution * pings > PINGS_PER_SLOT:
            break
        chosen = resolution
    return _wheel(loop, chosen)
