"""Sans-I/O Protobuf codec for client protocol v2 (docs/spec/protocol.md 1.7 and 1.8).

Same public API as `json_codec`, so the connection actor picks a codec module per
connection. Messages are `Command` / `Reply` / `Push` of `client.proto` (Centrifugo's
schema, field for field); `bytes` fields are raw bytes, never base64 or embedded JSON.

Framing: in a frame, each message is prefixed with its unsigned varint length, even when it
is alone. The `encode_*` functions return one message WITHOUT its prefix and `join_frame`
adds the prefixes, so the actor queues messages the same way for both codecs. Hence `PING`,
the empty Reply, is `b""` here: `join_frame([PING])` is the single byte `0x00`.

Decoding: one frame of varint-delimited Commands -> typed `Command`s. Any malformed input
raises `ProtocolError` (the caller closes with 3501); nothing else escapes for any bytes.

Encoding: the result builders (`*_result_obj`) return instances of the generated classes;
`encode_reply` and the push encoders serialise them and add the Reply/Push envelope by hand
(the envelope is one tag and one length, which saves copying the result into a Reply).
Publications, joins and leaves are encoded entirely by hand: `encode_pub_push` runs once per
publication per channel, and the generated classes cost several microseconds per message.
Empty fields are omitted (proto3), but a result message is always present, even when empty.

Everything here is pure and thread-safe: called from the connection/channel actors on the
asyncio loop, from the HTTP API handlers and from consumers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

from google.protobuf.message import DecodeError
from google.protobuf.message import Message as _PbMessage

from centripy.engine.protocol import client_pb2 as pb
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

PING = b""
# The whole frame of a client that only answers a ping (one empty, length-prefixed command).
PONG_FRAME = b"\x00"

_MAX_UINT64 = 2**64 - 1
_MAX_VARINT_BYTES = 10

# Malformed protobuf: DecodeError from the upb runtime; the pure-Python runtime also lets
# UnicodeDecodeError escape for a string that is not UTF-8.
_DECODE_ERRORS = (DecodeError, UnicodeDecodeError)


# --------------------------------------------------------------------------- varints


def _encode_varint(value: int) -> bytes:
    """Unsigned LEB128, as protobuf writes lengths and unsigned integers."""
    if 0 <= value < 0x80:
        return _SMALL_VARINTS[value]
    if 0 < value < 0x4000:
        return bytes((value & 0x7F | 0x80, value >> 7))
    if not 0 <= value <= _MAX_UINT64:
        raise ValueError(f"varint out of range: {value}")
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


_SMALL_VARINTS = tuple(bytes((i,)) for i in range(0x80))


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    """(value, position after it). Raises ProtocolError when truncated or over 64 bits."""
    value = 0
    shift = 0
    end = min(len(data), pos + _MAX_VARINT_BYTES)
    while pos < end:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            if value > _MAX_UINT64:
                break
            return value, pos
        shift += 7
    raise ProtocolError("malformed varint length prefix")


def _tag(field: int, wire_type: int) -> bytes:
    return _encode_varint(field << 3 | wire_type)


# --------------------------------------------------------------------------- decoding


def decode_commands(frame: bytes) -> list[Command]:
    """Decode one incoming frame of varint-length-prefixed Commands, in order.

    A zero length is an empty Command: a pong (`Command(0, "", None)`). An empty frame, a
    truncated prefix or message, or a malformed message raises `ProtocolError`."""
    if not frame:
        raise ProtocolError("empty frame")
    commands: list[Command] = []
    pos, end = 0, len(frame)
    while pos < end:
        size, pos = _read_varint(frame, pos)
        stop = pos + size
        if stop > end:
            raise ProtocolError("command length exceeds the frame")
        commands.append(_decode_command(frame[pos:stop]))
        pos = stop
    return commands


def decode_connect_request(body: bytes) -> ConnectRequest:
    """Decode a bare ConnectRequest message (no length prefix), the first message of a
    unidirectional Protobuf connection; an empty body is an empty request."""
    msg = pb.ConnectRequest()
    _parse(msg, body)
    return _connect(msg)


class EmulationRequest(NamedTuple):
    node: str
    session: str
    data: bytes  # varint-delimited Commands, for `decode_commands`


def decode_emulation_request(body: bytes) -> EmulationRequest:
    """Decode the body of `POST /emulation` sent as `application/octet-stream`."""
    msg = pb.EmulationRequest()
    _parse(msg, body)
    return EmulationRequest(msg.node, msg.session, msg.data)


def _parse(msg: _PbMessage, data: bytes) -> None:
    try:
        msg.ParseFromString(data)
    except _DECODE_ERRORS as exc:
        raise ProtocolError(f"malformed {msg.DESCRIPTOR.name}: {exc}") from None


def _decode_command(data: bytes) -> Command:
    msg = pb.Command()
    _parse(msg, data)
    for method in METHODS:
        if msg.HasField(method):
            return Command(msg.id, method, _PARSERS[method](getattr(msg, method)))
    return Command(msg.id, "", None)


def _subscribe(msg: pb.SubscribeRequest, channel: str | None = None) -> SubscribeRequest:
    return SubscribeRequest(
        channel=msg.channel if channel is None else channel,
        token=msg.token,
        recover=msg.recover,
        epoch=msg.epoch,
        offset=msg.offset,
        data=msg.data,
        positioned=msg.positioned,
        recoverable=msg.recoverable,
        join_leave=msg.join_leave,
        delta=msg.delta,
    )


def _connect(msg: pb.ConnectRequest) -> ConnectRequest:
    return ConnectRequest(
        token=msg.token,
        data=msg.data,
        # The map key names the channel, whatever the body says (as in centrifuge).
        subs={channel: _subscribe(sub, channel) for channel, sub in msg.subs.items()},
        name=msg.name,
        version=msg.version,
    )


def _history(msg: pb.HistoryRequest) -> HistoryRequest:
    since = None
    if msg.HasField("since"):
        since = HistorySince(offset=msg.since.offset, epoch=msg.since.epoch)
    return HistoryRequest(channel=msg.channel, limit=msg.limit, since=since, reverse=msg.reverse)


_PARSERS: dict[str, Callable[[Any], Request]] = {
    "connect": _connect,
    "subscribe": _subscribe,
    "unsubscribe": lambda m: UnsubscribeRequest(channel=m.channel),
    "publish": lambda m: PublishRequest(channel=m.channel, data=m.data),
    "presence": lambda m: PresenceRequest(channel=m.channel),
    "presence_stats": lambda m: PresenceStatsRequest(channel=m.channel),
    "history": _history,
    "rpc": lambda m: RPCRequest(method=m.method, data=m.data),
    "send": lambda m: SendRequest(data=m.data),
    "refresh": lambda m: RefreshRequest(token=m.token),
    "sub_refresh": lambda m: SubRefreshRequest(channel=m.channel, token=m.token),
}
assert set(_PARSERS) == set(METHODS)


# --------------------------------------------------------------------------- hand encoding

# Tags of length-delimited fields, by message.
_REPLY_PUSH = _tag(4, 2)
_PUSH_CHANNEL = _tag(2, 2)
_PUSH_FIELDS = {
    name: _tag(number, 2)
    for name, number in (
        ("pub", 4),
        ("join", 5),
        ("leave", 6),
        ("unsubscribe", 7),
        ("message", 8),
        ("subscribe", 9),
        ("connect", 10),
        ("disconnect", 11),
        ("refresh", 12),
    )
}
_PUSH_PUB = _PUSH_FIELDS["pub"]
_PUB_DATA, _PUB_INFO, _PUB_TAGS = _tag(4, 2), _tag(5, 2), _tag(7, 2)
_PUB_OFFSET = _tag(6, 0)
_INFO_USER, _INFO_CLIENT, _INFO_CONN, _INFO_CHAN = (_tag(n, 2) for n in (1, 2, 3, 4))
_JOIN_LEAVE_INFO = _tag(1, 2)
_ENTRY_KEY, _ENTRY_VALUE = _tag(1, 2), _tag(2, 2)
_REPLY_ID = _tag(1, 0)
_REPLY_ERROR = _tag(2, 2)


def _len_field(tag: bytes, payload: bytes) -> bytes:
    """A length-delimited field: tag, varint length, payload (inlined small-length path:
    this runs several times per publication)."""
    size = len(payload)
    return tag + (_SMALL_VARINTS[size] if size < 0x80 else _encode_varint(size)) + payload


def _client_info_bytes(info: ClientInfo) -> bytes:
    out = b""
    if info.user:
        out = _len_field(_INFO_USER, info.user.encode())
    if info.client:
        out += _len_field(_INFO_CLIENT, info.client.encode())
    if info.conn_info:
        out += _len_field(_INFO_CONN, info.conn_info)
    if info.chan_info:
        out += _len_field(_INFO_CHAN, info.chan_info)
    return out


def _publication_tail(pub: Publication) -> bytes:
    """Publication fields after `data`: info, offset, tags."""
    out = b"" if pub.info is None else _len_field(_PUB_INFO, _client_info_bytes(pub.info))
    if pub.offset:
        out += _PUB_OFFSET + _encode_varint(pub.offset)
    if pub.tags:
        for key, value in pub.tags.items():
            entry = _len_field(_ENTRY_KEY, key.encode()) + _len_field(_ENTRY_VALUE, value.encode())
            out += _len_field(_PUB_TAGS, entry)
    return out


def _push(channel: str, field: str, payload: bytes, unidirectional: bool) -> bytes:
    """Push{channel, <field>: payload}, inside Reply{push} unless unidirectional."""
    push = _len_field(_PUSH_FIELDS[field], payload)
    if channel:
        push = _len_field(_PUSH_CHANNEL, channel.encode()) + push
    if unidirectional:
        return push
    return _len_field(_REPLY_PUSH, push)


# --------------------------------------------------------------------------- replies

# Reply field of each method's result and the generated class it holds.
_RESULTS: dict[str, tuple[bytes, type[_PbMessage]]] = {
    "connect": (_tag(5, 2), pb.ConnectResult),
    "subscribe": (_tag(6, 2), pb.SubscribeResult),
    "unsubscribe": (_tag(7, 2), pb.UnsubscribeResult),
    "publish": (_tag(8, 2), pb.PublishResult),
    "presence": (_tag(9, 2), pb.PresenceResult),
    "presence_stats": (_tag(10, 2), pb.PresenceStatsResult),
    "history": (_tag(11, 2), pb.HistoryResult),
    "rpc": (_tag(13, 2), pb.RPCResult),
    "refresh": (_tag(14, 2), pb.RefreshResult),
    "sub_refresh": (_tag(15, 2), pb.SubRefreshResult),
}


def _serialize(msg: _PbMessage) -> bytes:
    data: bytes = msg.SerializeToString()
    return data


def _result_bytes(key: str, cls: type[_PbMessage], result: object) -> bytes:
    if isinstance(result, cls):
        return _serialize(result)
    if key == "sub_refresh" and isinstance(result, pb.RefreshResult):
        return _serialize(pb.SubRefreshResult(expires=result.expires, ttl=result.ttl))
    if isinstance(result, Mapping) and not result:  # `{}` of handlers with empty results
        return b""
    raise TypeError(
        f"{key} result must be a {cls.__name__} built by protobuf_codec, "
        f"not {type(result).__name__}"
    )


def encode_reply(id: int, key: str, result: _PbMessage | Mapping[str, Any]) -> bytes:
    """Reply{id, <key>: result}; the result field is always present, even when empty.

    `result` comes from the matching `*_result_obj` builder (an empty mapping stands for an
    empty result, as unsubscribe and publish return `{}`)."""
    try:
        tag, cls = _RESULTS[key]
    except KeyError:
        raise ValueError(f"method {key!r} has no reply result") from None
    payload = _result_bytes(key, cls, result)
    head = _REPLY_ID + _encode_varint(id) if id else b""
    return head + tag + _encode_varint(len(payload)) + payload


def encode_error(id: int, err: Error) -> bytes:
    """Reply{id, error{code, message, temporary}}."""
    error = pb.Error(code=err.code, message=err.message, temporary=err.temporary)
    head = _REPLY_ID + _encode_varint(id) if id else b""
    return head + _len_field(_REPLY_ERROR, _serialize(error))


# --------------------------------------------------------------------------- pushes


def encode_pub_push(channel: str, pub: Publication, *, unidirectional: bool = False) -> bytes:
    """Reply{push{channel, pub}} (bare Push when unidirectional), 1-2.5 µs.

    The envelope lengths are computed, not measured on copies, so `data` is copied once."""
    data, tail = pub.data, _publication_tail(pub)
    data_head = _PUB_DATA + _encode_varint(len(data)) if data else b""
    size = len(data_head) + len(data) + len(tail)
    head = _len_field(_PUSH_CHANNEL, channel.encode()) if channel else b""
    head += _PUSH_PUB + _encode_varint(size)
    if not unidirectional:
        head = _REPLY_PUSH + _encode_varint(len(head) + size) + head
    return b"".join((head, data_head, data, tail))


def encode_join_push(channel: str, info: ClientInfo, *, unidirectional: bool = False) -> bytes:
    payload = _len_field(_JOIN_LEAVE_INFO, _client_info_bytes(info))
    return _push(channel, "join", payload, unidirectional)


def encode_leave_push(channel: str, info: ClientInfo, *, unidirectional: bool = False) -> bytes:
    payload = _len_field(_JOIN_LEAVE_INFO, _client_info_bytes(info))
    return _push(channel, "leave", payload, unidirectional)


def encode_unsubscribe_push(
    channel: str, code: int, reason: str, *, unidirectional: bool = False
) -> bytes:
    payload = _serialize(pb.Unsubscribe(code=code, reason=reason))
    return _push(channel, "unsubscribe", payload, unidirectional)


def encode_subscribe_push(
    channel: str, result: pb.SubscribeResult, *, unidirectional: bool = False
) -> bytes:
    """`result` is built with `subscribe_result_obj`; the push carries its recoverable,
    epoch, offset, positioned and data (the Subscribe message has no expires/ttl)."""
    push = pb.Subscribe(
        recoverable=result.recoverable,
        epoch=result.epoch,
        offset=result.offset,
        positioned=result.positioned,
        data=result.data,
    )
    return _push(channel, "subscribe", _serialize(push), unidirectional)


def encode_message_push(data: bytes, *, unidirectional: bool = False) -> bytes:
    return _push("", "message", _serialize(pb.Message(data=data)), unidirectional)


def encode_disconnect_push(code: int, reason: str, *, unidirectional: bool = False) -> bytes:
    payload = _serialize(pb.Disconnect(code=code, reason=reason))
    return _push("", "disconnect", payload, unidirectional)


def encode_refresh_push(expires: bool, ttl: int, *, unidirectional: bool = False) -> bytes:
    payload = _serialize(pb.Refresh(expires=expires, ttl=ttl))
    return _push("", "refresh", payload, unidirectional)


def encode_connect_push(result: pb.ConnectResult, *, unidirectional: bool = False) -> bytes:
    """`result` is built with `connect_result_obj` (the Connect push message has the same
    fields as ConnectResult under other numbers)."""
    push = pb.Connect(
        client=result.client,
        version=result.version,
        data=result.data,
        expires=result.expires,
        ttl=result.ttl,
        ping=result.ping,
        pong=result.pong,
        session=result.session,
        node=result.node,
        time=result.time,
    )
    for channel, sub in result.subs.items():
        push.subs[channel].CopyFrom(sub)
    return _push("", "connect", _serialize(push), unidirectional)


def join_frame(lines: Sequence[bytes]) -> bytes:
    """One outgoing frame: every message prefixed with its varint length (a lone message
    too; `PING` becomes `0x00`). The parameter keeps json_codec's name."""
    if len(lines) == 1:
        message = lines[0]
        return _encode_varint(len(message)) + message
    parts: list[bytes] = []
    for message in lines:  # no `prefix + message` copy per message: one join at the end
        parts.append(_encode_varint(len(message)))
        parts.append(message)
    return b"".join(parts)


# --------------------------------------------------------------------------- result objects


def client_info_obj(info: ClientInfo) -> pb.ClientInfo:
    return pb.ClientInfo(
        user=info.user, client=info.client, conn_info=info.conn_info, chan_info=info.chan_info
    )


def publication_obj(pub: Publication) -> pb.Publication:
    out = pb.Publication(data=pub.data, offset=pub.offset, tags=pub.tags)
    if pub.info is not None:
        out.info.CopyFrom(client_info_obj(pub.info))
    return out


def connect_result_obj(
    *,
    client: str,
    version: str,
    expires: bool = False,
    ttl: int = 0,
    data: bytes = b"",
    subs: Mapping[str, pb.SubscribeResult] | None = None,
    ping: int = 0,
    pong: bool = False,
    session: str = "",
    node: str = "",
    time: int = 0,
) -> pb.ConnectResult:
    """ConnectResult; `subs` values come from `subscribe_result_obj`."""
    return pb.ConnectResult(
        client=client,
        version=version,
        expires=expires,
        ttl=ttl,
        data=data,
        subs=subs,
        ping=ping,
        pong=pong,
        session=session,
        node=node,
        time=time,
    )


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
) -> pb.SubscribeResult:
    return pb.SubscribeResult(
        expires=expires,
        ttl=ttl,
        recoverable=recoverable,
        epoch=epoch,
        publications=[publication_obj(p) for p in publications],
        recovered=recovered,
        offset=offset,
        positioned=positioned,
        data=data,
        was_recovering=was_recovering,
    )


def history_result_obj(
    publications: Sequence[Publication], epoch: str, offset: int
) -> pb.HistoryResult:
    return pb.HistoryResult(
        publications=[publication_obj(p) for p in publications], epoch=epoch, offset=offset
    )


def presence_result_obj(presence: Mapping[str, ClientInfo]) -> pb.PresenceResult:
    """PresenceResult: map of client ID -> ClientInfo."""
    return pb.PresenceResult(
        presence={cid: client_info_obj(info) for cid, info in presence.items()}
    )


def presence_stats_result_obj(num_clients: int, num_users: int) -> pb.PresenceStatsResult:
    return pb.PresenceStatsResult(num_clients=num_clients, num_users=num_users)


def refresh_result_obj(expires: bool, ttl: int) -> pb.RefreshResult:
    """Result of `refresh` and, converted by `encode_reply`, of `sub_refresh`."""
    return pb.RefreshResult(expires=expires, ttl=ttl)


def rpc_result_obj(data: bytes) -> pb.RPCResult:
    return pb.RPCResult(data=data)
