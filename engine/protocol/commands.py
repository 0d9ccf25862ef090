"""Typed client commands (protocol v2). Produced by the sans-I/O decoders in this package.

Raw JSON payloads (`data`) stay bytes: they are never parsed by the server, only embedded.
Unknown keys sent by newer SDKs (`flag`, `tf`, `type`, `headers`) are dropped by the decoder.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class SubscribeRequest:
    channel: str = ""
    token: str = ""
    recover: bool = False
    epoch: str = ""
    offset: int = 0
    data: bytes = b""
    positioned: bool = False
    recoverable: bool = False
    join_leave: bool = False
    delta: str = ""


@dataclass(frozen=True, slots=True)
class ConnectRequest:
    token: str = ""
    data: bytes = b""
    subs: dict[str, SubscribeRequest] = field(default_factory=dict)
    name: str = ""
    version: str = ""


@dataclass(frozen=True, slots=True)
class UnsubscribeRequest:
    channel: str = ""


@dataclass(frozen=True, slots=True)
class PublishRequest:
    channel: str = ""
    data: bytes = b""


@dataclass(frozen=True, slots=True)
class PresenceRequest:
    channel: str = ""


@dataclass(frozen=True, slots=True)
class PresenceStatsRequest:
    channel: str = ""


@dataclass(frozen=True, slots=True)
class HistorySince:
    offset: int = 0
    epoch: str = ""


@dataclass(frozen=True, slots=True)
class HistoryRequest:
    channel: str = ""
    limit: int = 0
    since: HistorySince | None = None
    reverse: bool = False


@dataclass(frozen=True, slots=True)
class RPCRequest:
    method: str = ""
    data: bytes = b""


@dataclass(frozen=True, slots=True)
class SendRequest:
    data: bytes = b""


@dataclass(frozen=True, slots=True)
class RefreshRequest:
    token: str = ""


@dataclass(frozen=True, slots=True)
class SubRefreshRequest:
    channel: str = ""
    token: str = ""


Request = (
    ConnectRequest
    | SubscribeRequest
    | UnsubscribeRequest
    | PublishRequest
    | PresenceRequest
    | PresenceStatsRequest
    | HistoryRequest
    | RPCRequest
    | SendRequest
    | RefreshRequest
    | SubRefreshRequest
)

# Method names in the order of precedence the server uses when several are present.
METHODS: tuple[str, ...] = (
    "connect",
    "subscribe",
    "unsubscribe",
    "publish",
    "presence",
    "presence_stats",
    "history",
    "rpc",
    "send",
    "refresh",
    "sub_refresh",
)


@dataclass(frozen=True, slots=True)
class Command:
    """One decoded command. `method` is "" for an empty command, which is a pong (when `id`
    is 0) or a protocol error (when `id` > 0); `request` is then None."""

    id: int
    method: str
    request: Request | None


class ProtocolError(Exception):
    """The frame is malformed: the connection must be closed with 3501 bad request."""
