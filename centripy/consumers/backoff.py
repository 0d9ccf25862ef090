"""Retry backoff shared by the consumers (docs/spec/server_api.md 4.1).

Centrifugo waits `min(5 s, (10 ms + jitter[0, 10 ms)) * 2**retries)` before retrying a
command that failed with a retryable error (or after a lost connection), and starts over
after a success. Pure: the random source is passed in; no clocks, no sleeping.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Final

BASE: Final = 0.010  # seconds
JITTER: Final = 0.010  # seconds, uniform in [0, JITTER)
CAP: Final = 5.0  # seconds
_MAX_EXPONENT: Final = 16  # 2**16 * 10 ms is far above the cap; avoids huge floats


def backoff_delay(retries: int, rand: Callable[[], float] = random.random) -> float:
    """Seconds to wait before retry number `retries` (0 for the first retry)."""
    if retries < 0:
        raise ValueError(f"retries must be >= 0, got {retries}")
    jitter = JITTER * rand()
    return min(CAP, (BASE + jitter) * (1 << min(retries, _MAX_EXPONENT)))


class Backoff:
    """Consecutive-failure counter. Not thread-safe: each worker (a partition task on the
    loop, or the Kafka actor thread) owns its own."""

    __slots__ = ("_rand", "retries")

    def __init__(self, rand: Callable[[], float] = random.random) -> None:
        self.retries = 0
        self._rand = rand

    def next_delay(self) -> float:
        """The delay before the next attempt; counts one more failure."""
        delay = backoff_delay(self.retries, self._rand)
        self.retries += 1
        return delay

    def reset(self) -> None:
        """A success: the next failure waits the shortest delay again."""
        self.retries = 0
