"""When CPython's cyclic garbage collector runs in the server process.

Left to itself (thresholds 700, 10, 10) the collector costs a server like this 10-20% of its
CPU. A mass reconnect is its worst case: almost everything a connection allocates lives on,
so every collection finds nothing, and each object is traversed once per generation it passes
through. The middle generation's pass is the one that stalls the loop: with a young threshold
of 50,000 it holds up to a million objects and takes 0.33-0.66 s of CPU (19,000 clients
reconnecting at once).

The policy: the young generation is still collected automatically (short cycles die there),
but the middle and old generations are collected by a periodic check on the event loop,
preferably when the process is idle (little CPU and no young pass over the last second), and
in any case within a bounded amount of allocation, so that cyclic garbage of long-lived
objects (closed connections) is always reclaimed:

- middle generation (with the young one): at the first idle check after `middle_after` young
  passes or `idle_young` net allocations, or at once after `middle_force` young passes
  (about `middle_force * young` net allocations, 10 million) even if the process never idles;
- full collection: at an idle check once `full_after` middle passes have run since the last
  one and `full_every` seconds have passed, or after `full_force` young passes since the last
  one whatever the load (about `full_force * young` net allocations, 100 million, as with
  the thresholds 50,000, 20, 100 this replaces; idle middle passes do not count towards it).

After a burst of long-lived objects (`freeze_after` young passes or more since the last middle
pass: a mass connect or reconnect), the idle middle pass would traverse them all to find next
to no garbage: 0.15-0.3 s for 10,000 fresh connections, in one piece, at the first idle
second, which is often when traffic resumes (4,000 connections, 3 young passes: 77 ms, and a
p99 of 32-57 ms instead of 5-7 at 1,000 publications/s in `run_all.py --quick`'s s6-1k, so
`freeze_after` is 2). Instead everything is frozen (`gc.freeze()`,
constant time). Frozen objects are never traversed, but they are only frozen until the next
full collection, which unfreezes everything, collects, and freezes what survived. So a frozen
object that becomes cyclic garbage (a connection closed later) is reclaimed by the next full
collection, as it would have been in the old generation, where a middle pass would have put
it anyway. Start-up's objects (configuration, modules, routes) are frozen at start.
"""

from __future__ import annotations

import asyncio
import gc
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class GcSettings:
    young: int = 50_000  # net allocations of tracked objects between two young passes
    check_interval: float = 1.0  # seconds between two checks on the loop
    idle_share: float = 0.25  # process CPU / wall time below which the last interval was idle
    middle_after: int = 1  # young passes before a middle pass at an idle check ...
    idle_young: int = 5_000  # ... or net allocations since the last young pass
    middle_force: int = 200  # young passes before a middle pass regardless of load
    freeze_after: int = 2  # young passes since the last middle pass: freeze instead (idle)
    full_after: int = 2  # middle passes before a full collection at an idle check ...
    full_every: float = 300.0  # ... and at least this many seconds after the last one
    full_force: int = 2_000  # young passes before a full collection regardless of load


# What CPython should never do by itself: the checks below collect the middle and old
# generations long before these counts are reached (the young count still applies).
_MANUAL = 1_000_000


class GcPolicy:
    """Owns the collector's thresholds for the life of the process. `start()` and `check()`
    run on the event loop's thread."""

    def __init__(self, settings: GcSettings | None = None) -> None:
        self.settings = settings or GcSettings()
        self.passes = {1: 0, 2: 0}  # collections this policy ran, by generation
        self.freezes = 0  # middle passes replaced by gc.freeze() (after a burst)
        self._handle: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._cpu = 0.0
        self._wall = 0.0
        self._last_full = time.monotonic()
        self._young_since_full = 0  # young passes absorbed by middle passes since the last full
        self._middle_since_full = 0  # middle passes (collections or freezes) since then
        self._young_passes = 0  # gc.get_count()[1] after the last check

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Collect everything once, freeze what start-up built, take over the older
        generations and schedule the first check."""
        gc.collect()
        gc.freeze()
        gc.set_threshold(self.settings.young, _MANUAL, _MANUAL)
        self._loop = loop
        self._cpu, self._wall = time.process_time(), time.monotonic()
        self._handle = loop.call_later(self.settings.check_interval, self._tick)

    def stop(self) -> None:
        """Cancel the checks and give the collector back its automatic older generations."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        gc.set_threshold(self.settings.young, 20, 100)

    def _tick(self) -> None:
        """Idle: little CPU in the last interval and no young pass in it. CPU alone is not
        enough: a server starved by a busy machine in the middle of a mass reconnect uses
        little CPU too, while it keeps allocating."""
        cpu, wall = time.process_time(), time.monotonic()
        busy = (cpu - self._cpu) / max(wall - self._wall, 1e-9)
        quiet = gc.get_count()[1] == self._young_passes
        self.check(idle=quiet and busy < self.settings.idle_share)
        self._cpu, self._wall = time.process_time(), time.monotonic()
        self._young_passes = gc.get_count()[1]
        if self._loop is not None and not self._loop.is_closed():
            self._handle = self._loop.call_later(self.settings.check_interval, self._tick)

    def check(self, idle: bool) -> int | None:
        """Run the collection the counts and the load call for; returns its generation (None:
        nothing ran). `gc.get_count()` is (net allocations, young passes since the last middle
        pass, middle passes since the last full collection); `gc.freeze()` resets it, so the
        middle passes (collections or freezes) are counted here too."""
        s = self.settings
        young, young_passes, _ = gc.get_count()
        generation: int | None = None
        full_due = time.monotonic() - self._last_full >= s.full_every
        forced = self._young_since_full + young_passes >= s.full_force
        if forced or (idle and full_due and self._middle_since_full >= s.full_after):
            generation = 2
            gc.unfreeze()
            gc.collect(2)
            gc.freeze()
            self._last_full = time.monotonic()
            self._young_since_full = self._middle_since_full = 0
        elif young_passes >= s.middle_force or (
            idle and (young_passes >= s.middle_after or young >= s.idle_young)
        ):
            generation = 1
            if idle and young_passes >= s.freeze_after:
                gc.freeze()
                self.freezes += 1
            else:
                gc.collect(1)
            self._young_since_full += young_passes
            self._middle_since_full += 1
        if generation is not None:
            self.passes[generation] += 1
        return generation
