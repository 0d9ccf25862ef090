"""Sans-I/O JSON codec for client protocol v2 (docs/spec/protocol.md sections 1, 2 and 8).

Decoding: one frame (WebSocket message, emulation body, HTTP-stream body) of JSON lines ->
typed `Command`s. Any malformed input raises `ProtocolError` (the caller closes with 3501);
nothing else ever escapes for any input bytes.

Encoding: replies and pushes are plain dicts serialised with orjson. Raw JSON payloads
(`data`, `conn_info`, `chan_info`) are embedded verbatim through `raw()`. Key order and
omit-empty rules follow Centrifugo's encoder: ClientInfo `user`/`client`, history's three
keys, presence's map and presence_stats' two counts are always present, everything else is
omitted when empty/zero.

Everything here is pure and thread-safe: called from the connection/channel actors on the
asyncio loop, from the HTTP API handlers and from consumers. A publication is encoded once
per channel (`encode_pub_push`), never once per subscriber.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import orjson

from centripy.engine.protocol.codes import Error
from centripy.engine.protocol.commands import (
    METHODS,
    Command,
    ConnectRequest,
    HistoryRequest,
    HistorySince,
    PresenceRequest,
    PresenceStatsRequest,
    ProtocolError,
    PublishRequest,
    RefreshRequest,
    Request,
    RPCRequest,
    SendRequest,
    SubRefreshRequest,
    SubscribeRequest,
    UnsubscribeRequest,
)
from centripy.engine.types import ClientInfo, Publication

JsonObj = dict[str, Any]

PING = b"{}"
# The whole frame of a client that only answers a ping (an empty command).
PONG_FRAME = b"{}"

_MAX_UINT32 = 2**32 - 1
_MAX_UINT64 = 2**64 - 1
_MIN_INT32 = -(2**31)
_MAX_INT32 = 2**31 - 1


# --------------------------------------------------------------------------- decoding


def decode_commands(frame: bytes) -> list[Command]:
    """Decode one incoming frame of newline-separated JSON commands, in order.

    A single trailing newline is accepted; an empty frame or an empty line raises
    `ProtocolError`. A command without a known method is `Command(id, "", None)` (a pong
    when id is 0, a protocol violation otherwise: the caller decides)."""
    if not frame:
        raise ProtocolError("empty frame")
    if frame.endswith(b"\n"):
        frame = frame[:-1]
    return [_decode_line(line) for line in frame.split(b"\n")]


def decode_connect_request(body: bytes) -> ConnectRequest:
    """Decode the bare ConnectRequest object unidirectional transports receive first."""
    obj = _loads(body)
    if obj is None:
        return ConnectRequest()
    if type(obj) is not dict:
        raise ProtocolError("connect request must be a JSON object")
    return _connect(obj)


def is_valid_json(data: bytes) -> bool:
    """True when `data` is one valid JSON value (JSON clients get 3506 otherwise)."""
    if not data:
        return False
    try:
        orjson.loads(data)
    except orjson.JSONDecodeError:
        return False
    return True


# A run of 20 digits may be an integer beyond 64 bits, which orjson reads as a float. It is
# found by mapping every digit to "0" and searching for 20 of them: a tenth of the cost of
# the regular expression [0-9]{20} (which tries every position) on a batch of commands.
_DIGITS_TO_ZERO = bytes.maketrans(b"123456789", b"0" * 9)
_LONG_NUMBER = b"0" * 20


def loads_exact(data: bytes) -> Any:
    """`orjson.loads`, except that integers beyond 64 bits stay exact: a document holding
    one is parsed again by `json`, so `dumps_exact` writes back the sender's digits rather
    than a float (Centrifugo passes payload bytes through). Raises ValueError (orjson's
    JSONDecodeError included) for what is not JSON or cannot be held."""
    value = orjson.loads(data)
    if _LONG_NUMBER not in data.translate(_DIGITS_TO_ZERO):
        return value
    try:
        return json.loads(data)  # valid JSON (orjson said so): only the numbers differ
    except RecursionError:  # deeper than Python recurses
        raise ValueError("JSON nested too deeply") from None


def _loads(data: bytes) -> Any:
    try:
        return loads_exact(data)
    except ValueError as exc:  # 4,300+ digits too
        raise ProtocolError(f"invalid JSON: {exc}") from None


def _decode_line(line: bytes) -> Command:
    obj = _loads(line)
    if obj is None:  # Go's decoder leaves the Command empty for `null`: a pong.
        return Command(0, "", None)
    if type(obj) is not dict:
        raise ProtocolError("command must be a JSON object")
    cmd_id = _command_id(obj.get("id"))
    for method in METHODS:
        body = obj.get(method)
        if body is None:
            continue
        if type(body) is not dict:
            raise ProtocolError(f"{method} must be an object")
        return Command(cmd_id, method, _PARSERS[method](body))
    return Command(cmd_id, "", None)


def _command_id(value: object) -> int:
    if value is None:
        return 0
    if type(value) is not int or not 0 <= value <= _MAX_UINT32:
        raise ProtocolError("id must be an unsigned 32-bit integer")
    return value


# Field readers: JSON null is the same as an absent key (easyjson skips nulls).


def _str(body: JsonObj, key: str) -> str:
    value = body.get(key)
    if value is None:
        return ""
    if type(value) is not str:
        raise ProtocolError(f"{key} must be a string")
    return value


def _bool(body: JsonObj, key: str) -> bool:
    value = body.get(key)
    if value is None:
        return False
    if type(value) is not bool:
        raise ProtocolError(f"{key} must be a boolean")
    return value


def _int(body: JsonObj, key: str, low: int, high: int) -> int:
    value = body.get(key)
    if value is None:
        return 0
    if type(value) is not int or not low <= value <= high:
        raise ProtocolError(f"{key} must be an integer in [{low}, {high}]")
    return value


def _raw(body: JsonObj, key: str) -> bytes:
    value = body.get(key)
    if value is None:
        return b""
    return _dump(value)


def dumps_exact(value: object) -> bytes:
    """Compact JSON bytes of a value `loads_exact` returned (no raw newline survives).
    Raises ValueError when it cannot be written."""
    try:
        return orjson.dumps(value)
    except TypeError:  # over 254 levels of nesting (the parser allows 1024), or > 64 bits
        pass
    try:
        text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    return text.encode()


def _dump(value: object) -> bytes:
    try:
        return dumps_exact(value)
    except ValueError:
        raise ProtocolError("payload nested too deeply") from None


def _subscribe(body: JsonObj) -> SubscribeRequest:
    return SubscribeRequest(
        channel=_str(body, "channel"),
        token=_str(body, "token"),
        recover=_bool(body, "recover"),
        epoch=_str(body, "epoch"),
        offset=_int(body, "offset", 0, _MAX_UINT64),
        data=_raw(body, "data"),
        positioned=_bool(body, "positioned"),
        recoverable=_bool(body, "recoverable"),
        join_leave=_bool(body, "join_leave"),
        delta=_str(body, "delta"),
    )


def _connect(body: JsonObj) -> ConnectRequest:
    subs_value = body.get("subs")
    subs: dict[str, SubscribeRequest] = {}
    if subs_value is not None:
        if type(subs_value) is not dict:
            raise ProtocolError("subs must be an object")
        for channel, sub in subs_value.items():
            if sub is None:
                sub = {}
            elif type(sub) is not dict:
                raise ProtocolError("subs values must be objects")
            # The map key names the channel, whatever the body says (as in centrifuge).
            subs[channel] = _subscribe({**sub, "channel": channel})
    return ConnectRequest(
        token=_str(body, "token"),
        data=_raw(body, "data"),
        subs=subs,
        name=_str(body, "name"),
        version=_str(body, "version"),
    )


def _history(body: JsonObj) -> HistoryRequest:
    since_value = body.get("since")
    since: HistorySince | None = None
    if since_value is not None:
        if type(since_value) is not dict:
            raise ProtocolError("since must be an object")
        since = HistorySince(
            offset=_int(since_value, "offset", 0, _MAX_UINT64),
            epoch=_str(since_value, "epoch"),
        )
    return HistoryRequest(
        channel=_str(body, "channel"),
        limit=_int(body, "limit", _MIN_INT32, _MAX_INT32),
        since=since,
        reverse=_bool(body, "reverse"),
    )


_PARSERS: dict[str, Callable[[JsonObj], Request]] = {
    "connect": _connect,
    "subscribe": _subscribe,
    "unsubscribe": lambda b: UnsubscribeRequest(channel=_str(b, "channel")),
    "publish": lambda b: PublishRequest(channel=_str(b, "channel"), data=_raw(b, "data")),
    "presence": lambda b: PresenceRequest(channel=_str(b, "channel")),
    "presence_stats": lambda b: PresenceStatsRequest(channel=_str(b, "channel")),
    "history": _history,
    "rpc": lambda b: RPCRequest(method=_str(b, "method"), data=_raw(b, "data")),
    "send": lambda b: SendRequest(data=_raw(b, "data")),
    "refresh": lambda b: RefreshRequest(token=_str(b, "token")),
    "sub_refresh": lambda b: SubRefreshRequest(channel=_str(b, "channel"), token=_str(b, "token")),
}
assert set(_PARSERS) == set(METHODS)


# --------------------------------------------------------------------------- encoding


def raw(payload: bytes) -> orjson.Fragment:
    """Embed a raw JSON payload verbatim. `payload` must be valid JSON (check payloads of
    non-JSON origin with `is_valid_json`): raw newline bytes in valid JSON can only be
    whitespace, so they are stripped, as Centrifugo's `Raw.MarshalJSON` does, to keep the
    JSON-lines framing intact."""
    if not payload:
        raise ValueError("cannot embed an empty payload; omit the key instead")
    if b"\n" in payload or b"\r" in payload:
        payload = payload.replace(b"\n", b"").replace(b"\r", b"")
    return orjson.Fragment(payload)


def client_info_obj(info: ClientInfo) -> JsonObj:
    """ClientInfo: `user` and `client` always, `conn_info`/`chan_info` when non-empty."""
    out: JsonObj = {"user": info.user, "client": info.client}
    if info.conn_info:
        out["conn_info"] = raw(info.conn_info)
    if info.chan_info:
        out["chan_info"] = raw(info.chan_info)
    return out


def publication_obj(pub: Publication) -> JsonObj:
    """Publication in Centrifugo key order: data, info, offset, tags (each omitted if empty)."""
    out: JsonObj = {}
    if pub.data:
        out["data"] = raw(pub.data)
    if pub.info is not None:
        out["info"] = client_info_obj(pub.info)
    if pub.offset:
        out["offset"] = pub.offset
    if pub.tags:
        out["tags"] = dict(pub.tags)
    return out


def encode_reply(id: int, key: str, result: JsonObj) -> bytes:
    """`{"id":N,"<key>":{...}}`; the result object is always present, even when empty."""
    if id:
        return orjson.dumps({"id": id, key: result})
    return orjson.dumps({key: result})


def encode_error(id: int, err: Error) -> bytes:
    """`{"id":N,"error":{"code":..,"message":..[,"temporary":true]}}`."""
    if id:
        return orjson.dumps({"id": id, "error": err.to_dict()})
    return orjson.dumps({"error": err.to_dict()})


def _push(channel: str, key: str, payload: JsonObj, unidirectional: bool) -> bytes:
    push: JsonObj = {"channel": channel, key: payload} if channel else {key: payload}
    if unidirectional:
        return orjson.dumps(push)
    return orjson.dumps({"push": push})


def encode_pub_push(channel: str, pub: Publication, *, unidirectional: bool = False) -> bytes:
    return _push(channel, "pub", publication_obj(pub), unidirectional)


def encode_join_push(channel: str, info: ClientInfo, *, unidirectional: bool = False) -> bytes:
    return _push(channel, "join", {"info": client_info_obj(info)}, unidirectional)


def encode_leave_push(channel: str, info: ClientInfo, *, unidirectional: bool = False) -> bytes:
    return _push(channel, "leave", {"info": client_info_obj(info)}, unidirectional)


def encode_unsubscribe_push(
    channel: str, code: int, reason: str, *, unidirectional: bool = False
) -> bytes:
    """Both keys always sent: the Python SDK reads `code` and `reason` unconditionally."""
    return _push(channel, "unsubscribe", {"code": code, "reason": reason}, unidirectional)


def encode_subscribe_push(channel: str, result: JsonObj, *, unidirectional: bool = False) -> bytes:
    """`result` is built with `subscribe_result_obj` (no `expires`/`ttl` in pushes)."""
    return _push(channel, "subscribe", result, unidirectional)


def encode_message_push(data: bytes, *, unidirectional: bool = False) -> bytes:
    return _push("", "message", {"data": raw(data)} if data else {}, unidirectional)


def encode_disconnect_push(code: int, reason: str, *, unidirectional: bool = False) -> bytes:
    return _push("", "disconnect", {"code": code, "reason": reason}, unidirectional)


def encode_refresh_push(expires: bool, ttl: int, *, unidirectional: bool = False) -> bytes:
    return _push("", "refresh", refresh_result_obj(expires, ttl), unidirectional)


def encode_connect_push(result: JsonObj, *, unidirectional: bool = False) -> bytes:
    """`result` is built with `connect_result_obj`."""
    return _push("", "connect", result, unidirectional)


def join_frame(lines: Sequence[bytes]) -> bytes:
    """One outgoing frame: replies joined by `\\n`, no trailing newline."""
    return b"\n".join(lines)


# --------------------------------------------------------------------------- result objects


def connect_result_obj(
    *,
    client: str,
    version: str,
    expires: bool = False,
    ttl: int = 0,
    data: bytes = b"",
    subs: Mapping[str, JsonObj] | None = None,
    ping: int = 0,
    pong: bool = False,
    session: str = "",
    node: str = "",
    time: int = 0,
) -> JsonObj:
    """ConnectResult in Centrifugo key order; `subs` values come from `subscribe_result_obj`."""
    out: JsonObj = {"client": client, "version": version}
    if expires:
        out["expires"] = True
    if ttl:
        out["ttl"] = ttl
    if data:
        out["data"] = raw(data)
    if subs:
        out["subs"] = dict(subs)
    if ping:
        out["ping"] = ping
    if pong:
        out["pong"] = True
    if session:
        out["session"] = session
    if node:
        out["node"] = node
    if time:
        out["time"] = time
    return out


def subscribe_result_obj(
    *,
    expires: bool = False,
    ttl: int = 0,
    recoverable: bool = False,
    epoch: str = "",
    publications: Sequence[Publication] = (),
    recovered: bool = False,
    offset: int = 0,
    positioned: bool = False,
    data: bytes = b"",
    was_recovering: bool = False,
) -> JsonObj:
    """SubscribeResult in Centrifugo key order, every key omitted when empty."""
    out: JsonObj = {}
    if expires:
        out["expires"] = True
    if ttl:
        out["ttl"] = ttl
    if recoverable:
        out["recoverable"] = True
    if epoch:
        out["epoch"] = epoch
    if publications:
        out["publications"] = [publication_obj(p) for p in publications]
    if recovered:
        out["recovered"] = True
    if offset:
        out["offset"] = offset
    if positioned:
        out["positioned"] = True
    if data:
        out["data"] = raw(data)
    if was_recovering:
        out["was_recovering"] = True
    return out


def history_result_obj(publications: Sequence[Publication], epoch: str, offset: int) -> JsonObj:
    """`publications`, `epoch` and `offset` are always present."""
    return {
        "publications": [publication_obj(p) for p in publications],
        "epoch": epoch,
        "offset": offset,
    }


def presence_result_obj(presence: Mapping[str, ClientInfo]) -> JsonObj:
    """`{"presence": {clientId: ClientInfo}}`; the map is always present."""
    return {"presence": {cid: client_info_obj(info) for cid, info in presence.items()}}


def presence_stats_result_obj(num_clients: int, num_users: int) -> JsonObj:
    return {"num_clients": num_clients, "num_users": num_users}


def refresh_result_obj(expires: bool, ttl: int) -> JsonObj:
    """Result of `refresh` and `sub_refresh` (and the refresh push payload)."""
    out: JsonObj = {}
    if expires:
        out["expires"] = True
    if ttl:
        out["ttl"] = ttl
    return out


def rpc_result_obj(data: bytes) -> JsonObj:
    return {"data": raw(data)} if data else {}
