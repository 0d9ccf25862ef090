"""Numbered meanings of the client protocol (docs/spec/protocol.md section 4).

Reply errors 100-112 (apps: 400-1999); disconnects 3000-3499 reconnect, 3500-3999 are
terminal, 4000-4999 are the application's; unsubscribe codes < 2500 are terminal for the
subscription, >= 2500 make the SDK resubscribe.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum


class ErrorCode(IntEnum):
    INTERNAL = 100
    UNAUTHORIZED = 101
    UNKNOWN_CHANNEL = 102
    PERMISSION_DENIED = 103
    METHOD_NOT_FOUND = 104
    ALREADY_SUBSCRIBED = 105
    LIMIT_EXCEEDED = 106
    BAD_REQUEST = 107
    NOT_AVAILABLE = 108
    TOKEN_EXPIRED = 109
    EXPIRED = 110
    TOO_MANY_REQUESTS = 111
    UNRECOVERABLE_POSITION = 112


ERROR_MESSAGES: dict[int, str] = {
    100: "internal server error",
    101: "unauthorized",
    102: "unknown channel",
    103: "permission denied",
    104: "method not found",
    105: "already subscribed",
    106: "limit exceeded",
    107: "bad request",
    108: "not available",
    109: "token expired",
    110: "expired",
    111: "too many requests",
    112: "unrecoverable position",
}

TEMPORARY_ERRORS = frozenset({100, 111})


@dataclass(frozen=True, slots=True)
class Error(Exception):
    """A reply error. Raised by engine helpers, turned into `{"error":{...}}` by callers."""

    code: int
    message: str = ""
    temporary: bool = False

    @classmethod
    def of(cls, code: int, message: str = "") -> Error:
        return cls(code, message or ERROR_MESSAGES.get(code, "error"), code in TEMPORARY_ERRORS)

    def to_dict(self) -> dict[str, object]:
        out: dict[str, object] = {"code": self.code, "message": self.message}
        if self.temporary:
            out["temporary"] = True
        return out


class DisconnectCode(IntEnum):
    CONNECTION_CLOSED = 3000
    SHUTDOWN = 3001
    INTERNAL = 3004
    EXPIRED = 3005
    SUBSCRIPTION_EXPIRED = 3006
    SLOW = 3008
    WRITE_ERROR = 3009
    INSUFFICIENT_STATE = 3010
    FORCE_RECONNECT = 3011
    NO_PONG = 3012
    TOO_MANY_REQUESTS = 3013
    INVALID_TOKEN = 3500
    BAD_REQUEST = 3501
    STALE = 3502
    FORCE_DISCONNECT = 3503
    CONNECTION_LIMIT = 3504
    CHANNEL_LIMIT = 3505
    INAPPROPRIATE_PROTOCOL = 3506
    PERMISSION_DENIED = 3507
    NOT_AVAILABLE = 3508
    TOO_MANY_ERRORS = 3509


DISCONNECT_REASONS: dict[int, str] = {
    3000: "connection closed",
    3001: "shutdown",
    3004: "internal server error",
    3005: "connection expired",
    3006: "subscription expired",
    3008: "slow",
    3009: "write error",
    3010: "insufficient state",
    3011: "force reconnect",
    3012: "no pong",
    3013: "too many requests",
    3500: "invalid token",
    3501: "bad request",
    3502: "stale",
    3503: "force disconnect",
    3504: "connection limit",
    3505: "channel limit",
    3506: "inappropriate protocol",
    3507: "permission denied",
    3508: "not available",
    3509: "too many errors",
}


@dataclass(frozen=True, slots=True)
class Disconnect(Exception):
    """Close the connection with `code`/`reason` (close frame on WebSocket, push elsewhere)."""

    code: int
    reason: str = ""

    @classmethod
    def of(cls, code: int, reason: str = "") -> Disconnect:
        return cls(code, reason or DISCONNECT_REASONS.get(code, "disconnect"))


class UnsubscribeCode(IntEnum):
    CLIENT = 0
    DISCONNECT = 1
    SERVER = 2000
    INSUFFICIENT_STATE = 2500
    EXPIRED = 2501


UNSUBSCRIBE_REASONS: dict[int, str] = {
    2000: "server unsubscribe",
    2500: "insufficient state",
    2501: "subscription expired",
}
