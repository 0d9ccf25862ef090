"""Value types shared by every layer: publications, client info, stream positions.

All are slotted and cross actor boundaries, so none is mutated after creation: `ClientInfo`
and `StreamPosition` are frozen; `Publication` is not (see the note above it) and is
immutable by convention only. Payloads (`data`, `conn_info`, `chan_info`) are raw JSON
bytes, exactly as the client protocol embeds them (see docs/spec/protocol.md 1.5); an empty
payload is `b""`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class ClientInfo:
    """Who published or who is present: `user` and `client` are always sent."""

    user: str
    client: str
    conn_info: bytes = b""
    chan_info: bytes = b""


@dataclass(frozen=True, slots=True)
class StreamPosition:
    """A position in a channel stream. `epoch` identifies one incarnation of the stream,
    so a lost and re-created stream is told apart from one that merely moved on."""

    offset: int
    epoch: str


EMPTY_TAGS: Mapping[str, str] = {}


# Not frozen: a frozen dataclass's __init__ costs ~5x (object.__setattr__ per field) and
# this is built for every publication. Treat it as immutable.
@dataclass(slots=True)
class Publication:
    """One publication. `offset` is 0 for channels without history."""

    data: bytes
    offset: int = 0
    info: ClientInfo | None = None
    tags: Mapping[str, str] = field(default_factory=lambda: EMPTY_TAGS)
    time: int = 0  # unix milliseconds, set by the log (informational; never sent by v5)
