"""centripy/gcpolicy.py: the older generations are collected by the policy's checks, under
load and when idle, so that cyclic garbage of long-lived objects never piles up; a burst is
frozen at an idle check instead of traversed, and thawed by the next full collection."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Callable, Iterator

import pytest

from centripy.gcpolicy import _MANUAL, GcPolicy, GcSettings
from tests.support.wait import eventually


@pytest.fixture(autouse=True)
def collector() -> Iterator[None]:
    """Nothing automatic during a test, and the process's collector as it was afterwards."""
    thresholds = gc.get_threshold()
    gc.collect()
    gc.set_threshold(_MANUAL, _MANUAL, _MANUAL)
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)
        gc.collect()


def test_middle_pass_waits_for_idle_until_forced() -> None:
    settings = GcSettings(middle_after=3, idle_young=_MANUAL, middle_force=6, full_after=99)
    policy = GcPolicy(settings)
    for _ in range(3):
        gc.collect(0)  # a young pass, as CPython makes them: counts toward the middle one
    assert policy.check(idle=False) is None
    assert policy.check(idle=True) == 1
    assert gc.get_count()[1] == 0
    for _ in range(6):
        gc.collect(0)
    assert policy.check(idle=False) == 1
    assert policy.passes == {1: 2, 2: 0}
    young = [[] for _ in range(10)]  # net allocations with no young pass since
    assert policy.check(idle=True) is None
    policy = GcPolicy(GcSettings(idle_young=5, full_after=99))
    assert policy.check(idle=False) is None
    assert policy.check(idle=True) == 1
    del young


def test_full_collection_when_idle_and_due_or_forced() -> None:
    policy = GcPolicy(GcSettings(middle_force=99, full_after=2, full_every=3600.0, full_force=8))
    for _ in range(2):
        gc.collect(0)
        assert policy.check(idle=True) == 1
    assert policy.check(idle=True) is None  # not yet due: the last one is less than an hour old
    policy = GcPolicy(GcSettings(middle_force=3, full_after=2, full_every=0.0, full_force=8))
    assert policy.check(idle=False) is None
    for _ in range(2):
        gc.collect(0)
        assert policy.check(idle=True) == 1
    assert policy.check(idle=True) == 2
    assert gc.get_count()[2] == 0
    for _ in range(5):  # middle passes run by someone else never force a full one
        gc.collect(1)
    assert policy.check(idle=False) is None
    for _ in range(3):
        gc.collect(0)
    assert policy.check(idle=False) == 1  # forced middle: 3 young passes absorbed
    for _ in range(5):
        gc.collect(0)
    assert policy.check(idle=False) == 2  # 3 + 5 young passes since the last full one
    assert policy.passes == {1: 3, 2: 2}


def collections_during(action: Callable[[], object]) -> list[int]:
    """The generations CPython collected while `action` ran."""
    seen: list[int] = []

    def record(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            seen.append(info["generation"])

    gc.callbacks.append(record)
    try:
        action()
    finally:
        gc.callbacks.remove(record)
    return seen


def test_a_burst_is_frozen_at_an_idle_check_and_thawed_by_the_next_full_one() -> None:
    settings = GcSettings(freeze_after=4, middle_force=99, full_after=2, full_every=0.0)
    policy = GcPolicy(settings)
    Conn.live = 0
    burst = [Conn() for _ in range(50)]  # long-lived: they survive the young passes
    for _ in range(4):
        gc.collect(0)
    frozen = gc.get_freeze_count()
    assert collections_during(lambda: policy.check(idle=True)) == []  # no pass at all
    assert policy.freezes == 1 and policy.passes == {1: 1, 2: 0}
    assert gc.get_freeze_count() >= frozen + 50 * 8  # each Conn: itself, its dict, 7 lists
    assert gc.get_count()[1:] == (0, 0)
    del burst  # closed later: cyclic garbage that sits frozen ...
    gc.collect(1)
    assert Conn.live == 50
    gc.collect(0)
    assert collections_during(lambda: policy.check(idle=True)) == [1]  # 1 young pass: traversed
    assert policy.freezes == 1
    assert collections_during(lambda: policy.check(idle=True)) == [2]  # ... until the full one
    assert Conn.live == 0
    assert gc.get_freeze_count() > 0  # what survived it stays out of the middle passes


def test_by_default_two_young_passes_at_an_idle_check_are_frozen_one_is_traversed() -> None:
    policy = GcPolicy(GcSettings(middle_force=99, full_after=99))
    gc.collect(0)
    assert collections_during(lambda: policy.check(idle=True)) == [1]
    for _ in range(2):
        gc.collect(0)
    assert collections_during(lambda: policy.check(idle=True)) == []
    assert policy.freezes == 1 and policy.passes == {1: 2, 2: 0}


def test_under_load_a_forced_middle_pass_is_never_a_freeze() -> None:
    policy = GcPolicy(GcSettings(freeze_after=4, middle_force=5, full_after=99))
    for _ in range(5):
        gc.collect(0)
    assert collections_during(lambda: policy.check(idle=False)) == [1]
    assert policy.freezes == 0


class Conn:
    """A connection-like object that is its own cyclic garbage once dropped."""

    live = 0

    def __init__(self) -> None:
        Conn.live += 1
        self.me = self
        self.parts = [[i] for i in range(6)]  # tracked objects: survivors fill the young gen
        self.payload = bytearray(2048)

    def __del__(self) -> None:
        Conn.live -= 1


WINDOW = 300  # connections alive at once
CHURN = 6000  # connections opened and closed in all


async def churn(yield_every: int = 50) -> int:
    """Open CHURN connections, WINDOW alive at a time, the loop kept busy; returns the most
    connection objects alive (dropped but not yet collected included) seen on the way."""
    window: list[Conn] = []
    most = 0
    for i in range(CHURN):
        window.append(Conn())
        if len(window) > WINDOW:
            window.pop(0)  # closed: long enough alive to be in an older generation
        most = max(most, Conn.live)
        if i % yield_every == 0:
            await asyncio.sleep(0)  # the policy's timer runs between two bursts
    window.clear()
    return most


SETTINGS = GcSettings(
    young=2000,
    check_interval=0.002,
    idle_share=0.25,
    middle_after=1,
    idle_young=1,
    middle_force=4,
    full_after=1,
    full_every=0.0,
    full_force=12,
)


async def test_closed_connections_are_reclaimed_under_load_and_when_idle() -> None:
    Conn.live = 0
    policy = GcPolicy(SETTINGS)
    policy.start(asyncio.get_running_loop())
    try:
        assert gc.get_freeze_count() > 0  # start-up's objects
        most = await churn()
        # Bounded while busy: at most a few forced middle passes' worth of dropped cycles.
        assert most < CHURN / 2, (most, policy.passes)
        assert policy.passes[1] + policy.passes[2] > 0
        # Idle: the rest goes too (frozen or not), with no explicit gc.collect() by anyone.
        await eventually(lambda: Conn.live == 0, 10, "every closed connection collected")
    finally:
        policy.stop()


async def test_without_the_checks_closed_connections_pile_up() -> None:
    """The control: the same churn with the older generations manual and nobody collecting
    them keeps (nearly) every closed connection, so the test above can fail."""
    Conn.live = 0
    gc.set_threshold(SETTINGS.young, _MANUAL, _MANUAL)
    most = await churn()
    assert most > CHURN * 0.8
    gc.collect()
    assert Conn.live == 0
