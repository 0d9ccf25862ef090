"""The server API executor: one async method per Centrifugo v5.2 server-API method.

The HTTP API (`transports/api_http.py`), `batch`, and the async consumers (PostgreSQL
outbox, Kafka) all go through `Executor`. A call is two steps:

1. **decode** (`decode_request`): the JSON request object is read the way Go's
   `encoding/json` fills Centrifugo's request struct - keys match case-insensitively (the
   last matching key wins), unknown keys are ignored, `null` means absent, and a value of
   the wrong type (`"channel": 1`, a non-string tag value) raises `DecodeError`, which the
   HTTP front answers with 400;
2. **execute**: semantic checks raise `Error` (107 missing channel/data or bad base64,
   102 unknown namespace, 108 feature off, 112 epoch mismatch, 104 unknown RPC, 100 for a
   back-end failure) and a success returns the result object with Go's `omitempty` applied.

Results may hold `orjson.Fragment`s (raw JSON payloads); serialise them with `orjson`.
All methods run on the server's event loop.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

import orjson

from centripy.engine.channels import SubscribeOverride
from centripy.engine.node import Node, PublishItem
from centripy.engine.protocol import json_codec
from centripy.engine.protocol.codes import Error
from centripy.engine.sessions import (
    DisconnectCommand,
    RefreshCommand,
    ServerSubscribe,
    Sessions,
    UnsubscribeCommand,
)
from centripy.engine.types import Publication, StreamPosition

log = logging.getLogger("centripy.api")

Result = dict[str, object]

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
# Methods the async consumers may call; others are ignored.
DISPATCH_METHODS: Final = frozenset(
    {"publish", "broadcast", "subscribe", "unsubscribe", "disconnect", "history_remove", "refresh"}
)
MAX_CONCURRENCY: Final = 1024  # parallel batch commands / broadcast channels in flight
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
class RpcRequest:
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
    | HistoryRemoveRequest | InfoRequest | RpcRequest | ChannelsRequest | BatchRequest
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
    "rpc": lambda o: RpcRequest(o.text("method"), o.raw("params")),
    "channels": lambda o: ChannelsRequest(o.text("pattern")),
    "batch": _batch,
}


def decode_request(method: str, value: object) -> Request:
    """Decode the JSON request of `method` (`None` = `{}`). DecodeError on a wrong type,
    Error 104 for a method that is not in METHODS."""
    decoder = _DECODERS.get(method)
    if decoder is None:
        raise api_error(104)
    return decoder(_Obj(value, (method,)))


# --- channel patterns (gobwas/glob without separators) -------------------------------------


@functools.lru_cache(maxsize=256)
def compile_glob(pattern: str) -> re.Pattern[str]:
    """`*` any run, `?` one char, `[abc]`/`[a-z]`/`[!..]` a class, `{a,b}` alternatives,
    `\\x` a literal; matched against the whole name. ValueError on a malformed pattern."""
    out: list[str] = []
    depth, i = 0, 0
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            if i + 1 == len(pattern):
                raise ValueError("pattern ends with an escape")
            out.append(re.escape(pattern[i + 1]))
            i += 2
            continue
        if c == "[":
            cls, i = _glob_class(pattern, i + 1)
            out.append(cls)
            continue
        if c == "{":
            depth += 1
            out.append("(?:")
        elif c == "}" and depth:
            depth -= 1
            out.append(")")
        elif c == "," and depth:
            out.append("|")
        else:
            out.append({"*": ".*", "?": "."}.get(c) or re.escape(c))
        i += 1
    if depth:
        raise ValueError("unclosed '{' in pattern")
    try:
        return re.compile("".join(out), re.DOTALL)
    except re.error as exc:
        raise ValueError(f"bad pattern: {exc}") from exc


def _glob_class(pattern: str, i: int) -> tuple[str, int]:
    """Translate the class starting after `[`; returns (regex, index after `]`)."""
    negate = i < len(pattern) and pattern[i] == "!"
    i += negate
    parts: list[str] = []
    while i < len(pattern) and pattern[i] != "]":
        lo = pattern[i]
        if i + 2 < len(pattern) and pattern[i + 1] == "-" and pattern[i + 2] != "]":
            if pattern[i + 2] < lo:
                raise ValueError("reversed range in pattern")
            parts.append(f"{re.escape(lo)}-{re.escape(pattern[i + 2])}")
            i += 3
        else:
            parts.append(re.escape(lo))
            i += 1
    if i >= len(pattern) or not parts:
        raise ValueError("unclosed or empty '[' in pattern")
    return ("[^" if negate else "[") + "".join(parts) + "]", i + 1


# --- result encoding -----------------------------------------------------------------------


def publication_dict(pub: Publication) -> Result:
    """The client protocol's publication object, except that the server API always has
    `data` (Go's encoder writes a nil raw payload as `null`)."""
    out = json_codec.publication_obj(pub)
    if "data" not in out:
        return {"data": orjson.Fragment(b"null"), **out}
    return out


def _position_dict(offset: int, epoch: str) -> Result:
    out: Result = {}
    if offset:
        out["offset"] = offset
    if epoch:
        out["epoch"] = epoch
    return out


def _payload(body: PublishBody, limit: int = 0) -> bytes:
    """The publication data: b64data wins when set; 107 on bad base64, no data, or data
    over `limit` bytes (`api_max_publication_size`; 0: no limit)."""
    data = body.data or b""
    if body.b64data:
        try:
            data = base64.b64decode(body.b64data, validate=True)
        except (binascii.Error, ValueError):
            raise api_error(107) from None
    if not data:
        raise api_error(107)
    if limit and len(data) > limit:
        raise api_error(107)
    return data


# --- the executor --------------------------------------------------------------------------


class Executor:
    """Runs server-API requests against a `Node` (publications, history, presence) and the
    live connections (`Sessions`). Called on the event loop by the HTTP handlers, batch and
    the consumers; every method returns the result object or raises `Error` (`DecodeError`
    for a request that does not decode)."""

    def __init__(self, node: Node, sessions: Sessions) -> None:
        self._node = node
        self._sessions = sessions

    @property
    def node(self) -> Node:
        return self._node

    def _payload(self, body: PublishBody) -> bytes:
        return _payload(body, self._node.config.api_max_publication_size)

    # -- entry points -----------------------------------------------------------------------

    async def call(self, method: str, request: object) -> Result:
        """Decode then execute `request` (a decoded JSON object) for `method`."""
        return await self.execute(decode_request(method, request))

    async def execute(self, req: Request) -> Result:
        """Run a decoded request; an unexpected exception becomes Error 100 (and is logged)."""
        self._count(req)
        try:
            return await self._run(req)
        except Error as err:
            self._count_error(err)
            raise
        except Exception:
            log.exception("server API %s failed", type(req).__name__)
            raise api_error(100) from None

    def _count(self, req: Request, amount: int = 1) -> None:
        self.node.metrics.inc(
            "centripy_api_commands_total", "Server API commands run.", amount,
            method=type(req).__name__,
        )  # fmt: skip

    def _count_error(self, err: Error) -> None:
        self.node.metrics.inc(
            "centripy_api_command_errors_total", "Server API errors.", code=str(err.code)
        )

    async def publish(self, request: Mapping[str, object]) -> Result:
        return await self.call("publish", request)

    async def broadcast(self, request: Mapping[str, object]) -> Result:
        return await self.call("broadcast", request)

    async def subscribe(self, request: Mapping[str, object]) -> Result:
        return await self.call("subscribe", request)

    async def unsubscribe(self, request: Mapping[str, object]) -> Result:
        return await self.call("unsubscribe", request)

    async def disconnect(self, request: Mapping[str, object]) -> Result:
        return await self.call("disconnect", request)

    async def refresh(self, request: Mapping[str, object]) -> Result:
        return await self.call("refresh", request)

    async def presence(self, request: Mapping[str, object]) -> Result:
        return await self.call("presence", request)

    async def presence_stats(self, request: Mapping[str, object]) -> Result:
        return await self.call("presence_stats", request)

    async def history(self, request: Mapping[str, object]) -> Result:
        return await self.call("history", request)

    async def history_remove(self, request: Mapping[str, object]) -> Result:
        return await self.call("history_remove", request)

    async def channels(self, request: Mapping[str, object]) -> Result:
        return await self.call("channels", request)

    async def info(self, request: Mapping[str, object]) -> Result:
        return await self.call("info", request)

    async def rpc(self, request: Mapping[str, object]) -> Result:
        return await self.call("rpc", request)

    async def batch(self, request: Mapping[str, object]) -> Result:
        """`{"replies":[...]}` (not wrapped in `result`), `{}` for no commands."""
        return await self.call("batch", request)

    async def dispatch(self, method: str, payload: bytes) -> None:
        """Run one consumed command (`{"method","payload"}` of the outbox/Kafka consumers).

        Unknown methods (and the read-only ones) are ignored. Raises `DecodeError` when
        `payload` is not a JSON object of the method's request (a JSON string holding one
        is unwrapped first), `CommandFailed` when the command fails: retryable only for
        code 100; a broadcast fails (retryably) only when some channel got 100.
        """
        if method not in DISPATCH_METHODS:
            return
        try:
            value = json_codec.loads_exact(payload)
            if isinstance(value, str):
                value = json_codec.loads_exact(value.encode())
        except ValueError as exc:  # UnicodeEncodeError (a lone surrogate) too
            raise DecodeError(f"{method} payload is not JSON: {exc}") from None
        if not isinstance(value, dict):
            raise DecodeError(f"{method} payload is not a JSON object")
        req = decode_request(method, value)
        try:
            if isinstance(req, BroadcastRequest):
                failed = [e for e in await self._broadcast_results(req) if isinstance(e, Error)]
                internal = [e for e in failed if e.code == 100]
                if internal:
                    raise internal[0]
                return
            await self.execute(req)
        except Error as exc:
            raise CommandFailed(exc) from None

    # -- methods ----------------------------------------------------------------------------

    async def _run(self, req: Request) -> Result:
        match req:
            case PublishRequest():
                return await self._publish(req)
            case BroadcastRequest():
                return _broadcast_dict(await self._broadcast_results(req))
            case ServerSubscribe():
                return await self._subscribe(req)
            case UnsubscribeRequest():
                if req.channel:
                    self._node.resolve(req.channel)
                await self._sessions.unsubscribe(
                    UnsubscribeCommand(req.user, req.channel, req.client, req.session)
                )
                return {}
            case DisconnectRequest():
                await self._sessions.disconnect(
                    DisconnectCommand(
                        req.user, req.code, req.reason, req.client, req.session, req.whitelist
                    )
                )
                return {}
            case RefreshRequest():
                await self._sessions.refresh(
                    RefreshCommand(
                        req.user, req.client, req.session, req.expired, req.expire_at, req.info
                    )
                )
                return {}
            case PresenceRequest():
                presence = await self._node.presence(_channel(req.channel))
                return {
                    "presence": {cid: json_codec.client_info_obj(i) for cid, i in presence.items()}
                }
            case PresenceStatsRequest():
                stats = await self._node.presence_stats(_channel(req.channel))
                return {"num_clients": stats.num_clients, "num_users": stats.num_users}
            case HistoryRequest():
                return await self._history(req)
            case HistoryRemoveRequest():
                await self._node.history_remove(_channel(req.channel))
                return {}
            case InfoRequest():
                return self._info()
            case RpcRequest():
                raise api_error(107 if not req.method else 104)  # OSS: no RPC extensions
            case ChannelsRequest():
                return self._channels(req.pattern)
            case BatchRequest():
                return await self._batch(req)

    async def _publish(self, req: PublishRequest) -> Result:
        (result,) = await self._publish_many([(req.channel, self._payload(req.body), req.body)])
        if isinstance(result, Error):
            raise result
        return result

    async def _broadcast_results(self, req: BroadcastRequest) -> list[Result | Error]:
        """Per-channel results or errors, in `channels` order; the channels that go to the
        log are committed in one transaction."""
        if not req.channels:
            raise api_error(107)
        data = self._payload(req.body)
        return await self._publish_many([(channel, data, req.body) for channel in req.channels])

    async def _publish_many(
        self, publications: Sequence[tuple[str, bytes, PublishBody]]
    ) -> list[Result | Error]:
        """Publish (channel, data, body) triples with `Node.publish_many`: a position dict
        or the Error per triple, in order."""
        out: list[Result | Error] = [{}] * len(publications)
        items: list[PublishItem] = []
        where: list[int] = []
        for i, (channel, data, body) in enumerate(publications):
            try:
                name = self._node.resolve(_channel(channel))
            except Error as exc:
                out[i] = exc
                continue
            items.append(
                PublishItem(
                    name,
                    data,
                    tags=body.tags or None,
                    skip_history=body.skip_history,
                    idempotency_key=body.idempotency_key,
                )
            )
            where.append(i)
        try:
            results = await self._node.publish_many(items)
        except Exception:
            log.exception("publishing %d publications failed", len(items))
            results = [api_error(100) for _ in items]
        for i, result in zip(where, results, strict=True):
            out[i] = (
                result if isinstance(result, Error) else _position_dict(result.offset, result.epoch)
            )
        return out

    async def _subscribe(self, req: ServerSubscribe) -> Result:
        self._node.resolve(_channel(req.channel))
        await self._sessions.subscribe(req)
        return {}

    async def _history(self, req: HistoryRequest) -> Result:
        name = self._node.resolve(_channel(req.channel))
        if not name.options.history_enabled:
            raise api_error(108)
        if req.reverse and req.since is not None and req.since.offset == 0:
            raise api_error(100)  # the core's bad request, mapped to 100 by Centrifugo
        limit = -1 if req.limit < 0 else req.limit
        result = await self._node.history(
            req.channel, limit=limit, since=req.since, reverse=req.reverse, name=name
        )
        return {
            "publications": [publication_dict(p) for p in result.publications],
            "epoch": result.position.epoch,
            "offset": result.position.offset,
        }

    def _info(self) -> Result:
        nodes: list[Result] = []
        for info in self._sessions.nodes():
            node: Result = {
                "uid": info.uid,
                "name": info.name,
                "version": info.version,
                "num_clients": info.num_clients,
                "num_users": info.num_users,
                "num_channels": info.num_channels,
                "num_subs": info.num_subs,
            }
            if info.uptime > 0:
                node["uptime"] = info.uptime
            nodes.append(node)
        return {"nodes": nodes}

    def _channels(self, pattern: str) -> Result:
        try:
            matcher = compile_glob(pattern) if pattern else None
        except ValueError:
            raise api_error(107) from None
        return {
            "channels": {
                channel: {"num_clients": count}
                for channel, count in self._sessions.channels().items()
                if count > 0 and (matcher is None or matcher.fullmatch(channel))
            }
        }

    async def _batch(self, req: BatchRequest) -> Result:
        """Sequential, or with `parallel` concurrently (<= MAX_CONCURRENCY in flight); in a
        parallel batch the publish commands are published together (`_publish_many`: the
        ones with history in one transaction)."""
        if not req.commands:
            return {}
        if not req.parallel:
            return {"replies": [await self._batch_reply(c) for c in req.commands]}
        replies: list[Result] = [{}] * len(req.commands)
        publishes: list[tuple[int, PublishRequest]] = []
        others: list[int] = []
        for i, cmd in enumerate(req.commands):
            if cmd is not None and isinstance(cmd[1], PublishRequest):
                publishes.append((i, cmd[1]))
            else:
                others.append(i)
        gate = asyncio.Semaphore(MAX_CONCURRENCY)

        async def one(i: int) -> None:
            async with gate:
                replies[i] = await self._batch_reply(req.commands[i])

        await asyncio.gather(self._batch_publishes(publishes, replies), *(one(i) for i in others))
        return {"replies": replies}

    async def _batch_publishes(
        self, publishes: Sequence[tuple[int, PublishRequest]], replies: list[Result]
    ) -> None:
        """The publish commands of a parallel batch: replies[i] for each (i, request)."""
        ready: list[tuple[str, bytes, PublishBody]] = []
        where: list[int] = []
        if publishes:
            self._count(publishes[0][1], len(publishes))
        for i, req in publishes:
            try:
                ready.append((req.channel, self._payload(req.body), req.body))
                where.append(i)
            except Error as exc:
                self._count_error(exc)
                replies[i] = {"error": error_body(exc)}
        for i, result in zip(where, await self._publish_many(ready), strict=True):
            if isinstance(result, Error):
                self._count_error(result)
                replies[i] = {"error": error_body(result)}
            else:
                replies[i] = {"publish": result}

    async def _batch_reply(self, cmd: tuple[str, Request] | None) -> Result:
        if cmd is None:
            return {"error": error_body(api_error(104))}
        method, req = cmd
        try:
            return {method: await self.execute(req)}
        except Error as exc:
            return {"error": error_body(exc)}


def _channel(channel: str) -> str:
    """The channel, or Error 107 when it is empty."""
    if not channel:
        raise api_error(107)
    return channel


def _broadcast_dict(results: list[Result | Error]) -> Result:
    return {
        "responses": [
            {"error": error_body(r)} if isinstance(r, Error) else {"result": r} for r in results
        ]
    }
