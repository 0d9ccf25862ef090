"""Connection admission per node: `client_connection_limit` and `client_connection_rate_limit`.

Centrifugo answers a new connection over either limit with HTTP 503 before the transport
starts (its connection-limit middleware). `Admission.admit()` is asked once per new
connection (a WebSocket upgrade, an HTTP-streaming/SSE/uni request, a new SockJS session), on
the event loop; pure apart from the clock and the count it is given.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class Admission:
    """`limit`: connections a node holds at most (0: no limit), counted by `count()`;
    `rate`: new connections a second at most (0: no limit), a token bucket that holds one
    second's worth."""

    def __init__(
        self,
        limit: int,
        rate: int,
        count: Callable[[], int],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._limit = limit
        self._rate = rate
        self._count = count
        self._clock = clock
        self._tokens = float(rate)
        self._last = clock()
        self.refused = 0  # connections refused so far (a metric)

    def admit(self) -> bool:
        """True when one more connection may start now (it takes one token of the rate)."""
        if self._limit and self._count() >= self._limit:
            self.refused += 1
            return False
        if self._rate:
            now = self._clock()
            self._tokens = min(float(self._rate), self._tokens + (now - self._last) * self._rate)
            self._last = now
            if self._tokens < 1.0:
                self.refused += 1
                return False
            self._tokens -= 1.0
        return True
