"""The one way tests wait for something to become true: `eventually` (on the loop) and
`eventually_sync` (in a plain thread).

Both re-check a predicate until it returns a truthy value, which they return, and fail with
an AssertionError naming `what` once `timeout` seconds have passed. `eventually` accepts a
predicate that returns an awaitable (an async probe, e.g. an API call), and an
`asyncio.Event` that the producer sets on every change, to re-check as soon as something
happened rather than on the next tick.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

T = TypeVar("T")

TIMEOUT = 10.0  # seconds, unless the caller says otherwise


async def _value(predicate: Callable[[], Any]) -> Any:
    value = predicate()
    if inspect.isawaitable(value):
        value = await value
    return value


async def eventually(
    predicate: Callable[[], T | Awaitable[T]],
    timeout: float = TIMEOUT,
    what: str = "",
    *,
    interval: float = 0.01,
    changed: asyncio.Event | None = None,
) -> T:
    """Wait (on the running loop) until `predicate()` (or `await predicate()`) is truthy
    and return that value. Re-checks every `interval` seconds, or, given `changed`, each
    time that event is set (and at least every second)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        if changed is not None:
            changed.clear()
        value = await _value(predicate)
        if value:
            return value  # type: ignore[no-any-return]
        left = deadline - loop.time()
        if left <= 0:
            raise AssertionError(f"not within {timeout} s: {what or predicate}")
        if changed is None:
            await asyncio.sleep(min(interval, left))
        else:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), min(1.0, left))


def eventually_sync(
    predicate: Callable[[], T],
    timeout: float = TIMEOUT,
    what: str = "",
    *,
    interval: float = 0.05,
) -> T:
    """`eventually` for code that runs outside an event loop (blocking sleeps)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"not within {timeout} s: {what or predicate}")
        time.sleep(min(interval, left))
