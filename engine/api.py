"""The server API executor: one async method per Centrifugo v5.2 server-API method.

The HTTP API (`transports/api_http.py`), `batch`, and the async consumers (PostgreSQL
outbox, Kafka) all go through `Executor`. A call is two steps:

1. **decode** (`decode_request`, engine/api_requests.py, with the request types and the
   errors): the JSON request object is read the way Go's `encoding/json` fills
   Centrifugo's request struct; a value of the wrong type raises `DecodeError`, which the
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
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Final

import orjson

from centripy.engine.api_requests import (
    ApiRpcRequest,
    BatchRequest,
    BroadcastRequest,
    ChannelsRequest,
    CommandFailed,
    DecodeError,
    DisconnectRequest,
    HistoryRemoveRequest,
    HistoryRequest,
    InfoRequest,
    PresenceRequest,
    PresenceStatsRequest,
    PublishBody,
    PublishRequest,
    RefreshRequest,
    Request,
    Result,
    UnsubscribeRequest,
    api_error,
    decode_request,
    error_body,
)
from centripy.engine.glob import compile_glob
from centripy.engine.metrics import Cell
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
from centripy.engine.types import Publication

log = logging.getLogger("centripy.api")

# Methods the async consumers may call; others are ignored.
DISPATCH_METHODS: Final = frozenset(
    {"publish", "broadcast", "subscribe", "unsubscribe", "disconnect", "history_remove", "refresh"}
)
MAX_CONCURRENCY: Final = 1024  # parallel batch commands / broadcast channels in flight

# Request type -> method name (the `method` label of centrifugo_api_command_duration_seconds).
_METHOD_NAMES: Final[dict[type, str]] = {
    PublishRequest: "publish", BroadcastRequest: "broadcast", ServerSubscribe: "subscribe",
    UnsubscribeRequest: "unsubscribe", DisconnectRequest: "disconnect",
    RefreshRequest: "refresh", PresenceRequest: "presence",
    PresenceStatsRequest: "presence_stats", HistoryRequest: "history",
    HistoryRemoveRequest: "history_remove", InfoRequest: "info", ApiRpcRequest: "rpc",
    ChannelsRequest: "channels", BatchRequest: "batch",
}  # fmt: skip


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

    def __init__(self, node: Node, sessions: Sessions, protocol: str = "http") -> None:
        self._node = node
        self._sessions = sessions
        self._protocol = protocol  # the `protocol` label of the API duration metrics
        self._commands: dict[type, Cell] = {}  # centripy_api_commands_total per request type

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
        started = time.perf_counter()
        try:
            return await self._run(req)
        except Error as err:
            self._count_error(err)
            raise
        except Exception:
            log.exception("server API %s failed", type(req).__name__)
            raise api_error(100) from None
        finally:
            method = _METHOD_NAMES.get(type(req), "unknown")
            self.node.metrics.api_command(self._protocol, method, time.perf_counter() - started)

    def _count(self, req: Request, amount: int = 1) -> None:
        cell = self._commands.get(type(req))
        if cell is None:
            cell = self._commands[type(req)] = self.node.metrics.cell(
                "centripy_api_commands_total", "Server API commands run.",
                method=type(req).__name__,
            )  # fmt: skip
        cell.value += amount

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
            case ApiRpcRequest():
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
        started = time.perf_counter()
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
        if publishes:  # each publish took the time of the group (one commit)
            seconds = time.perf_counter() - started
            self.node.metrics.api_command(self._protocol, "publish", seconds, len(publishes))

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
