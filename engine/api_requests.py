"""Server-API requests (docs/spec/server_api.md 1): the request types, the method tables,
the errors, and `decode_request`, which reads a JSON request object the way Go's
`encoding/json` fills Centrifugo's request struct - keys match case-insensitively (the last
matching key wins), unknown keys are ignored, `null` means absent, and a value of the wrong
type (`"channel": 1`, a non-string tag value) raises `DecodeError`, which the HTTP front
answers with 400. Pure: no I/O; called on the event loop by the HTTP API, batch and the
consumers (through `Executor`, engine/api.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from centripy.engine.channels import SubscribeOverride
from centripy.engine.protocol import json_codec
from centripy.engine.protocol.codes import Error
from centripy.engine.sessions import ServerSubscribe
from centripy.engine.types import StreamPosition

Result = dict[str, object]  # a server-API result or reply object

API_MESSAGES: Final[dict[int, str]] = {
    100: "internal server error",
    101: "unauthorized",
    102: "unknown channel",
    103: "permission denied",
    104: "not found",
    107: "bad request",
    108: "not available",
    112: "unrecoverable position",
    113: "conflict",
}
# The OSS v5.2.2 `POST /api/<method>` routes.
METHODS: Final = frozenset(
    {"batch", "publish", "broadcast", "subscribe", "unsubscribe", "disconnect", "presence",
     "presence_stats", "history", "history_remove", "info", "rpc", "refresh", "channels"}
)  # fmt: skip
# Keys of a batch command, in the order Centrifugo checks them (the first set one wins).
BATCH_ORDER: Final = (
    "publish", "broadcast", "subscribe", "unsubscribe", "disconnect", "history",
    "history_remove", "presence", "presence_stats", "info", "rpc", "refresh", "channels",
)  # fmt: skip
_BATCH_RANK: Final = {method: rank for rank, method in enumerate(BATCH_ORDER)}
DEFAULT_DISCONNECT: Final = (3503, "force disconnect")

_INT32 = (-(2**31), 2**31 - 1)
_UINT32 = (0, 2**32 - 1)
_INT64 = (-(2**63), 2**63 - 1)
_UINT64 = (0, 2**64 - 1)


# --- errors --------------------------------------------------------------------------------


class DispatchError(Exception):
    """Why `Executor.dispatch` failed. A consumer retries (with backoff) when `retryable`
    is true, and otherwise logs the message and skips it."""

    retryable: bool = False


class DecodeError(DispatchError):
    """The request does not decode into the method's request (HTTP 400; not retryable)."""


class CommandFailed(DispatchError):
    """The command ran and failed with `error`; retryable only for code 100."""

    def __init__(self, error: Error) -> None:
        super().__init__(f"{error.code}: {error.message}")
        self.error = error
        self.retryable = error.code == 100


def api_error(code: int) -> Error:
    """A server-API error with the server API's message (104 is "not found" here)."""
    return Error(code, API_MESSAGES.get(code, "error"))


def error_body(error: Error) -> Result:
    """`{"code":..,"message":..}` as the server API sends it (no `temporary` flag)."""
    return {"code": error.code, "message": API_MESSAGES.get(error.code, error.message)}


# --- decoding ------------------------------------------------------------------------------

_ABSENT: Final = object()


def _path(where: tuple[object, ...]) -> str:
    """The JSON path of a decoding error (kept in parts until an error needs it)."""
    return "".join(map(str, where))


class _Obj:
    """A JSON object read like Go's encoding/json fills a struct (see the module doc)."""

    __slots__ = ("_fields", "_where")

    def __init__(self, value: object, where: tuple[object, ...]) -> None:
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise DecodeError(f"{_path(where)}: expected a JSON object")
        self._fields = {str(k).lower(): v for k, v in value.items()}
        self._where = where

    def _get(self, key: str) -> object:
        return self._fields.get(key)

    def _bad(self, key: str, expected: str) -> DecodeError:
        return DecodeError(f"{_path(self._where)}.{key}: expected {expected}")

    def text(self, key: str) -> str:
        value = self._get(key)
        if value is None:
            return ""
        if not isinstance(value, str):
            raise self._bad(key, "a string")
        return value

    def flag(self, key: str) -> bool:
        value = self._get(key)
        if value is None:
            return False
        if not isinstance(value, bool):
            raise self._bad(key, "a boolean")
        return value

    def integer(self, key: str, bounds: tuple[int, int]) -> int:
        value = self._get(key)
        if value is None:
            return 0
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._bad(key, "an integer")
        if not bounds[0] <= value <= bounds[1]:
            raise self._bad(key, f"an integer in [{bounds[0]}, {bounds[1]}]")
        return value

    def raw(self, key: str) -> bytes | None:
        """Raw JSON re-serialised (`null` stays `null`, as Go's Raw keeps it); None if absent."""
        value = self._fields.get(key, _ABSENT)
        if value is _ABSENT:
            return None
        try:
            return json_codec.dumps_exact(value)
        except ValueError as exc:  # nested deeper than the encoders go
            raise self._bad(key, "encodable JSON") from exc

    def obj(self, key: str) -> _Obj | None:
        value = self._get(key)
        return None if value is None else _Obj(value, (*self._where, ".", key))

    def texts(self, key: str) -> tuple[str, ...]:
        value = self._get(key)
        if value is None:
            return ()
        if not isinstance(value, list) or not all(v is None or isinstance(v, str) for v in value):
            raise self._bad(key, "an array of strings")
        return tuple(v or "" for v in value)

    def tags(self, key: str) -> dict[str, str]:
        value = self._get(key)
        if value is None:
            return {}
        if not isinstance(value, dict) or not all(
            v is None or isinstance(v, str) for v in value.values()
        ):
            raise self._bad(key, "an object of strings")
        return {str(k): v or "" for k, v in value.items()}

    def position(self, key: str) -> StreamPosition | None:
        o = self.obj(key)
        return None if o is None else StreamPosition(o.integer("offset", _UINT64), o.text("epoch"))


# Not frozen: a frozen dataclass's __init__ costs ~5x (object.__setattr__ per field) and
# this is built for every publication. Treat it as immutable.
@dataclass(slots=True)
class PublishBody:
    data: bytes | None  # raw JSON; None when absent
    b64data: str
    skip_history: bool
    tags: dict[str, str]
    idempotency_key: str


# Not frozen: a frozen dataclass's __init__ costs ~5x (object.__setattr__ per field) and
# this is built for every publication. Treat it as immutable.
@dataclass(slots=True)
class PublishRequest:
    channel: str
    body: PublishBody


@dataclass(frozen=True, slots=True)
class BroadcastRequest:
    channels: tuple[str, ...]
    body: PublishBody


@dataclass(frozen=True, slots=True)
class UnsubscribeRequest:
    user: str
    channel: str
    client: str
    session: str


@dataclass(frozen=True, slots=True)
class DisconnectRequest:
    user: str
    client: str
    session: str
    whitelist: tuple[str, ...]
    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class RefreshRequest:
    user: str
    client: str
    session: str
    expired: bool
    expire_at: int
    info: bytes | None


@dataclass(frozen=True, slots=True)
class PresenceRequest:
    channel: str


@dataclass(frozen=True, slots=True)
class PresenceStatsRequest:
    channel: str


@dataclass(frozen=True, slots=True)
class HistoryRemoveRequest:
    channel: str


@dataclass(frozen=True, slots=True)
class HistoryRequest:
    channel: str
    limit: int
    since: StreamPosition | None
    reverse: bool


@dataclass(frozen=True, slots=True)
class InfoRequest:
    pass


@dataclass(frozen=True, slots=True)
class ApiRpcRequest:
    """The server API `rpc` method (the client protocol's is protocol.commands.RPCRequest)."""

    method: str
    params: bytes | None


@dataclass(frozen=True, slots=True)
class ChannelsRequest:
    pattern: str


@dataclass(frozen=True, slots=True)
class BatchRequest:
    commands: tuple[tuple[str, Request] | None, ...]  # None: no known key (reply 104)
    parallel: bool


Request = (
    PublishRequest | BroadcastRequest | ServerSubscribe | UnsubscribeRequest | DisconnectRequest
    | RefreshRequest | PresenceRequest | PresenceStatsRequest | HistoryRequest
    | HistoryRemoveRequest | InfoRequest | ApiRpcRequest | ChannelsRequest | BatchRequest
)  # fmt: skip


def _publish_body(o: _Obj) -> PublishBody:
    return PublishBody(
        o.raw("data"), o.text("b64data"), o.flag("skip_history"), o.tags("tags"),
        o.text("idempotency_key"),
    )  # fmt: skip


def _override(o: _Obj | None) -> SubscribeOverride | None:
    if o is None:
        return None

    def pick(key: str) -> bool | None:
        value = o.obj(key)
        return None if value is None else value.flag("value")

    return SubscribeOverride(
        presence=pick("presence"), join_leave=pick("join_leave"),
        force_push_join_leave=pick("force_push_join_leave"),
        force_positioning=pick("force_positioning"), force_recovery=pick("force_recovery"),
    )  # fmt: skip


def _subscribe(o: _Obj) -> ServerSubscribe:
    for ignored in ("b64info", "b64data"):  # type-checked, then ignored as in v5.2.2
        o.text(ignored)
    return ServerSubscribe(
        user=o.text("user"), channel=o.text("channel"), info=o.raw("info") or b"",
        data=o.raw("data") or b"", client=o.text("client"), session=o.text("session"),
        expire_at=o.integer("expire_at", _INT64), recover_since=o.position("recover_since"),
        override=_override(o.obj("override")),
    )  # fmt: skip


def _disconnect(o: _Obj) -> DisconnectRequest:
    custom = o.obj("disconnect")
    code, reason = DEFAULT_DISCONNECT
    if custom is not None:
        code, reason = custom.integer("code", _UINT32), custom.text("reason")
    return DisconnectRequest(
        o.text("user"), o.text("client"), o.text("session"), o.texts("whitelist"), code, reason
    )


def _refresh(o: _Obj) -> RefreshRequest:
    return RefreshRequest(
        o.text("user"), o.text("client"), o.text("session"), o.flag("expired"),
        o.integer("expire_at", _INT64), o.raw("info"),
    )  # fmt: skip


def _history(o: _Obj) -> HistoryRequest:
    return HistoryRequest(
        o.text("channel"), o.integer("limit", _INT32), o.position("since"), o.flag("reverse")
    )


def _batch(o: _Obj) -> BatchRequest:
    value = o._get("commands")
    if value is not None and not isinstance(value, list):
        raise DecodeError("batch.commands: expected an array")
    commands = tuple(_batch_command(c, i) for i, c in enumerate(value or ()))
    return BatchRequest(commands, o.flag("parallel"))


def _batch_command(value: object, index: int) -> tuple[str, Request] | None:
    """Decode every known key (a type error anywhere fails the whole batch, as in Go);
    the first set key in BATCH_ORDER is the command."""
    if type(value) is dict and len(value) == 1:
        plain = _plain_publish(value.get("publish"))
        if plain is not None:
            return "publish", plain
    cmd = _Obj(value, ("commands[", index, "]"))
    chosen: tuple[str, Request] | None = None
    best = len(BATCH_ORDER)
    for method, inner in cmd._fields.items():
        rank = _BATCH_RANK.get(method)
        if rank is not None and inner is not None:
            decoded = _DECODERS[method](_Obj(inner, (*cmd._where, ".", method)))
            if rank < best:
                chosen, best = (method, decoded), rank
    return chosen


_DECODERS: Final[dict[str, Callable[[_Obj], Request]]] = {
    "publish": lambda o: PublishRequest(o.text("channel"), _publish_body(o)),
    "broadcast": lambda o: BroadcastRequest(o.texts("channels"), _publish_body(o)),
    "subscribe": _subscribe,
    "unsubscribe": lambda o: UnsubscribeRequest(
        o.text("user"), o.text("channel"), o.text("client"), o.text("session")
    ),
    "disconnect": _disconnect,
    "refresh": _refresh,
    "presence": lambda o: PresenceRequest(o.text("channel")),
    "presence_stats": lambda o: PresenceStatsRequest(o.text("channel")),
    "history": _history,
    "history_remove": lambda o: HistoryRemoveRequest(o.text("channel")),
    "info": lambda o: InfoRequest(),
    "rpc": lambda o: ApiRpcRequest(o.text("method"), o.raw("params")),
    "channels": lambda o: ChannelsRequest(o.text("pattern")),
    "batch": _batch,
}


_PLAIN_PUBLISH_KEYS: Final = frozenset(("channel", "data"))


def _plain_publish(value: object) -> PublishRequest | None:
    """The common publish, `{"channel": "...", "data": ...}` and nothing else, decoded as
    the generic reader would (it lower-cases every key, then reads field by field: a third
    of a batch's decoding); None for any other shape, which that reader then decodes."""
    if type(value) is not dict or not value.keys() <= _PLAIN_PUBLISH_KEYS:
        return None
    channel = value.get("channel")
    if type(channel) is not str:
        return None
    data = value.get("data", _ABSENT)
    if data is _ABSENT:
        raw = None
    else:
        try:
            raw = json_codec.dumps_exact(data)
        except ValueError:
            return None
    return PublishRequest(channel, PublishBody(raw, "", False, {}, ""))


def decode_request(method: str, value: object) -> Request:
    """Decode the JSON request of `method` (`None` = `{}`). DecodeError on a wrong type,
    Error 104 for a method that is not in METHODS."""
    if method == "publish":
        plain = _plain_publish(value)
        if plain is not None:
            return plain
    decoder = _DECODERS.get(method)
    if decoder is None:
        raise api_error(104)
    return decoder(_Obj(value, (method,)))
