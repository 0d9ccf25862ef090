"""The Origin check every client transport applies (`allowed_origins`,
docs/spec/server_api.md 3.3): WebSocket, the HTTP-streaming and SSE transports, `/emulation`,
SockJS and the unidirectional ones. Pure.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

__all__ = ["origin_allowed"]


def origin_allowed(allowed: Sequence[str], origin: str) -> bool:
    """Centrifugo's rule: no patterns -> only Origin-less requests pass (handled by the
    caller); `*` and `https://*.example.com` style wildcards match case-insensitively."""
    origin = origin.lower()
    return any(fnmatch.fnmatchcase(origin, pattern.lower()) for pattern in allowed)
