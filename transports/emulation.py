"""Bidirectional emulation: `/connection/http_stream`, `/connection/sse` and `/emulation`.

The client opens a long-lived response carrying its first commands (normally just
`connect`); the connection actor answers down that stream, and its connect result carries
`session` and `node`. Later commands (subscribes, pongs, ...) arrive as separate
`POST /emulation` requests naming the session; they are told to the session's actor as
frames, and their replies go down the original stream. Disconnects are a disconnect push,
then the response ends (docs/spec/protocol.md 4.4, 5.2).

- http_stream: `POST`, JSON (each message + `\\n`) unless `Content-Type:
  application/octet-stream` (protobuf: each message varint-length-prefixed).
- sse: `GET ?cf_connect=<commands>` or `POST` with the commands as body; JSON only; the
  stream starts with `\\r\\n`, then `data: <json>\\n\\n` per message.

Handlers run on the loop (Tornado); they hold no protocol state.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import orjson

from centripy.actors.cluster import emulate
from centripy.actors.connection_core import Frame
from centripy.actors.context import ConnContext
from centripy.actors.transport import Format, protobuf_codec
from centripy.engine.config import Config
from centripy.engine.protocol import json_codec
from centripy.engine.protocol.commands import ProtocolError
from centripy.transports.http_common import (
    JSON_STREAM_CONTENT_TYPE,
    PROTOBUF_CONTENT_TYPE,
    SSE_CONTENT_TYPE,
    SSE_PREAMBLE,
    Framing,
    LimitedBodyHandler,
    StreamingHandler,
    StreamTransport,
    frame_lines,
    frame_sse,
    prefix_route,
)

OCTET_STREAM = "application/octet-stream"
CONNECT_PARAM = "cf_connect"


# -- pure helpers -----------------------------------------------------------------------------


class EmulationRequest(NamedTuple):
    node: str
    session: str
    data: bytes  # the commands, in the session's wire format


class BadEmulationRequest(ValueError):
    """The body of a `/emulation` request cannot be decoded (answer 400)."""


def decode_emulation_request(body: bytes, *, protobuf: bool) -> EmulationRequest:
    """Decode `{"node","session","data"}` (JSON, `data` a JSON string holding the
    newline-joined commands) or protobuf `EmulationRequest{node=1, session=2, data=3}`."""
    if protobuf:
        try:
            pb_req = protobuf_codec().decode_emulation_request(body)
        except ProtocolError:
            raise BadEmulationRequest("malformed protobuf EmulationRequest") from None
        return EmulationRequest(str(pb_req.node), str(pb_req.session), bytes(pb_req.data))
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise BadEmulationRequest("invalid JSON") from None
    if type(obj) is not dict:
        raise BadEmulationRequest("emulation request must be a JSON object")
    node, session, data = obj.get("node", ""), obj.get("session", ""), obj.get("data")
    if type(node) is not str or type(session) is not str:
        raise BadEmulationRequest("node and session must be strings")
    if type(data) is not str:
        raise BadEmulationRequest("data must be a JSON string holding the commands")
    return EmulationRequest(node, session, data.encode())


def _json_disconnect(code: int, reason: str) -> bytes:
    return json_codec.encode_disconnect_push(code, reason)


def _protobuf_disconnect(code: int, reason: str) -> bytes:
    return bytes(protobuf_codec().encode_disconnect_push(code, reason))


def _protobuf_frame(messages: Sequence[bytes]) -> bytes:
    return bytes(protobuf_codec().join_frame(messages))


# -- handlers ---------------------------------------------------------------------------------


class HttpStreamHandler(StreamingHandler):
    """`POST /connection/http_stream`: body = the first commands; OPTIONS 200, others 405."""

    async def post(self) -> None:
        body = self.body()
        if body is None:
            return
        if self.request.headers.get("Content-Type") == OCTET_STREAM:
            fmt, disconnect = Format.PROTOBUF, _protobuf_disconnect
            framing = self.framing("protobuf", _protobuf_frame)
            content_type = PROTOBUF_CONTENT_TYPE
        else:
            fmt, disconnect = Format.JSON, _json_disconnect
            framing = self.framing("lines", frame_lines)
            content_type = JSON_STREAM_CONTENT_TYPE
        transport = StreamTransport(
            self,
            name="http_stream",
            fmt=fmt,
            emulation=True,
            framing=framing,
            disconnect=disconnect,
        )
        self.start_response(content_type)
        await self.stream(transport, Frame(body))


class SseHandler(StreamingHandler):
    """`GET /connection/sse?cf_connect=...` (400 without it) or `POST` with the commands;
    JSON only; any other method (OPTIONS included) is 405."""

    SUPPORTED_METHODS = ("GET", "POST")

    async def get(self) -> None:
        commands = self.get_query_argument(CONNECT_PARAM, "")
        if not commands:
            self.send_error(400)
            return
        await self._serve(commands.encode())

    async def post(self) -> None:
        body = self.body()
        if body is not None:
            await self._serve(body)

    async def _serve(self, commands: bytes) -> None:
        transport = StreamTransport(
            self,
            name="sse",
            fmt=Format.JSON,
            emulation=True,
            framing=self.framing("sse", frame_sse),
            disconnect=_json_disconnect,
        )
        self.start_response(SSE_CONTENT_TYPE, SSE_PREAMBLE)
        await self.stream(transport, Frame(commands))


class EmulationHandler(LimitedBodyHandler):
    """`POST /emulation`: hand the commands to the session's connection actor, on this
    node or, when the request names another node, on that one through the broker
    (Centrifugo forwards them the same way, so no sticky sessions are needed). 204 when
    handed over (or when the session is unknown: silently dropped), 400 for a bad body, 404
    for a node that is not there (or any other node without a broker), 413 for a body
    over the limit, 500 when the session's node does not answer, 503 while the connection
    has `client_max_pending_frames` frames not handled yet (the client retries); OPTIONS
    200."""

    def initialize(self, ctx: ConnContext, body_limit: int) -> None:
        self.ctx = ctx
        self.body_limit = body_limit

    async def post(self) -> None:
        body = self.body()
        if body is None:
            return
        protobuf = self.request.headers.get("Content-Type") == OCTET_STREAM
        try:
            req = decode_emulation_request(body, protobuf=protobuf)
        except BadEmulationRequest:
            self.send_error(400)
            return
        ctx = self.ctx
        if not req.node or req.node == ctx.node.uid:
            status = emulate(ctx.hub, req.session, req.data, ctx.config.client_max_pending_frames)
        elif ctx.forward_emulation is None:
            status = 404
        else:
            status = await ctx.forward_emulation(req.node, req.session, req.data)
        if status != 204:
            self.send_error(status)
            return
        self.set_status(204)
        self.finish()


def routes(config: Config, ctx: ConnContext) -> list[Any]:
    """The routes of the enabled emulation transports (none when both are off)."""
    out: list[Any] = []
    if config.http_stream:
        limit = config.http_stream_max_request_body_size
        framings = {"lines": Framing(frame_lines), "protobuf": Framing(_protobuf_frame)}
        kwargs = {"ctx": ctx, "body_limit": limit, "framings": framings}
        out.append((prefix_route(config.http_stream_handler_prefix), HttpStreamHandler, kwargs))
    if config.sse:
        limit = config.sse_max_request_body_size
        kwargs = {"ctx": ctx, "body_limit": limit, "framings": {"sse": Framing(frame_sse)}}
        out.append((prefix_route(config.sse_handler_prefix), SseHandler, kwargs))
    if config.http_stream or config.sse:
        kwargs = {"ctx": ctx, "body_limit": config.emulation_max_request_body_size}
        out.append((prefix_route(config.emulation_handler_prefix), EmulationHandler, kwargs))
    return out
