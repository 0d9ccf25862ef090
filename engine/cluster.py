"""The control protocol between centripy nodes (pure: no I/O, an injectable clock).

Control messages travel as opaque bytes through `Broker.publish_control` and arrive at
`BrokerHandler.on_control(data)`; this module turns them into typed values and back (the
values are defined in `engine/sessions.py`, the `Sessions` contract they belong to):

* `NodeInfo`: the heartbeat every node broadcasts every `HEARTBEAT_INTERVAL` (3 s) with its
  counters and its channels (channel -> local subscriber count, for the `channels` API);
* `ServerSubscribe`, `UnsubscribeCommand`, `DisconnectCommand`, `RefreshCommand`: server
  API actions applied on the local node AND broadcast, so that they reach the user's
  connections on every node (`apply_command` hands one to `Sessions`);
* `EmulationForward` and its `EmulationReply`: an `/emulation` request that reached a node
  other than the one owning the session (the request's `node`), sent to that node only;
  the owner answers with the HTTP status the first node gives (Centrifugo's emulation
  survey).

Wire format: one orjson object with `"v": 1` and a type tag `"t"`; byte payloads (`info`,
`data`) are base64 so that binary ones survive. Unknown keys are ignored (newer nodes may
add fields); anything malformed raises `ControlError`.

`NodeRegistry` is the node's view of the cluster, fed by heartbeats (called from the broker
handler on the loop) and read by the `info`/`channels` API and the `num_nodes` gauge.
"""

from __future__ import annotations

import base64
import binascii
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from centripy.engine.channels import SubscribeOverride
from centripy.engine.sessions import (
    DisconnectCommand,
    NodeInfo,
    RefreshCommand,
    ServerSubscribe,
    Sessions,
    UnsubscribeCommand,
    UserCommand,
)
from centripy.engine.types import StreamPosition

HEARTBEAT_INTERVAL = 3.0  # seconds between two NodeInfo broadcasts of a node
NODE_EXPIRE_AFTER = 7.0  # seconds of silence after which a node is forgotten
_VERSION = 1


class ControlError(ValueError):
    """A control message that cannot be decoded."""


@dataclass(frozen=True, slots=True)
class EmulationForward:
    """Commands for `session` (in its wire format) from an `/emulation` request that node
    `origin` received; `request_id` names the reply `origin` waits for."""

    request_id: str
    origin: str
    session: str
    data: bytes


@dataclass(frozen=True, slots=True)
class EmulationReply:
    """What the session's node did with an `EmulationForward`: the HTTP status (204 handed
    over or no such session, 503 too many frames waiting)."""

    request_id: str
    status: int


ControlMessage = NodeInfo | UserCommand | EmulationForward | EmulationReply

# -- encoding -------------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _override(o: SubscribeOverride | None) -> dict[str, bool | None] | None:
    if o is None:
        return None
    return {
        "presence": o.presence,
        "join_leave": o.join_leave,
        "force_push_join_leave": o.force_push_join_leave,
        "force_positioning": o.force_positioning,
        "force_recovery": o.force_recovery,
    }


def _fields(msg: ControlMessage) -> dict[str, Any]:
    if isinstance(msg, NodeInfo):
        return {
            "t": "node",
            "uid": msg.uid,
            "name": msg.name,
            "version": msg.version,
            "num_clients": msg.num_clients,
            "num_users": msg.num_users,
            "num_channels": msg.num_channels,
            "num_subs": msg.num_subs,
            "uptime": msg.uptime,
            "channels": dict(msg.channels),
        }
    if isinstance(msg, ServerSubscribe):
        since = msg.recover_since
        return {
            "t": "subscribe",
            "user": msg.user,
            "channel": msg.channel,
            "info": _b64(msg.info),
            "data": _b64(msg.data),
            "client": msg.client,
            "session": msg.session,
            "expire_at": msg.expire_at,
            "recover_since": None if since is None else [since.offset, since.epoch],
            "override": _override(msg.override),
        }
    if isinstance(msg, UnsubscribeCommand):
        return {
            "t": "unsubscribe",
            "user": msg.user,
            "channel": msg.channel,
            "client": msg.client,
            "session": msg.session,
        }
    if isinstance(msg, EmulationForward):
        return {
            "t": "emulation",
            "id": msg.request_id,
            "origin": msg.origin,
            "session": msg.session,
            "data": _b64(msg.data),
        }
    if isinstance(msg, EmulationReply):
        return {"t": "emulation_reply", "id": msg.request_id, "status": msg.status}
    if isinstance(msg, DisconnectCommand):
        return {
            "t": "disconnect",
            "user": msg.user,
            "code": msg.code,
            "reason": msg.reason,
            "client": msg.client,
            "session": msg.session,
            "whitelist": list(msg.whitelist),
        }
    return {
        "t": "refresh",
        "user": msg.user,
        "client": msg.client,
        "session": msg.session,
        "expired": msg.expired,
        "expire_at": msg.expire_at,
        "info": None if msg.info is None else _b64(msg.info),
    }


def encode_control(msg: ControlMessage) -> bytes:
    """Bytes for `Broker.publish_control`."""
    return orjson.dumps({"v": _VERSION, **_fields(msg)})


# -- decoding -------------------------------------------------------------------------------


class _Reader:
    """Typed access to a decoded JSON object; wrong types raise ControlError."""

    def __init__(self, obj: Mapping[str, Any]) -> None:
        self.obj = obj

    def get(self, key: str, kind: type, default: Any) -> Any:
        value = self.obj.get(key, default)
        if value is default:
            return value
        if kind is int and type(value) is not int:
            raise ControlError(f"{key!r} must be an integer")
        if not isinstance(value, kind):
            raise ControlError(f"{key!r} must be {kind.__name__}")
        return value

    def text(self, key: str, default: str = "") -> str:
        return str(self.get(key, str, default))

    def integer(self, key: str) -> int:
        return int(self.get(key, int, 0))

    def flag(self, key: str) -> bool:
        return bool(self.get(key, bool, False))

    def blob(self, key: str) -> bytes | None:
        value = self.get(key, str, None)
        if value is None:
            return None
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ControlError(f"{key!r} is not base64") from exc

    def required(self, key: str) -> str:
        if key not in self.obj:
            raise ControlError(f"{key!r} is required")
        return self.text(key)


def _decode_node(r: _Reader) -> NodeInfo:
    channels = r.get("channels", dict, {})
    if not all(isinstance(k, str) and type(v) is int for k, v in channels.items()):
        raise ControlError("'channels' must map channel names to integers")
    return NodeInfo(
        uid=r.required("uid"),
        name=r.text("name"),
        version=r.text("version"),
        num_clients=r.integer("num_clients"),
        num_users=r.integer("num_users"),
        num_channels=r.integer("num_channels"),
        num_subs=r.integer("num_subs"),
        uptime=r.integer("uptime"),
        channels=channels,
    )


def _decode_override(value: Any) -> SubscribeOverride | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ControlError("'override' must be an object")
    names = (
        "presence",
        "join_leave",
        "force_push_join_leave",
        "force_positioning",
        "force_recovery",
    )
    flags = {n: value.get(n) for n in names}
    if not all(v is None or isinstance(v, bool) for v in flags.values()):
        raise ControlError("'override' values must be booleans or null")
    return SubscribeOverride(**flags)


def _decode_since(value: Any) -> StreamPosition | None:
    if value is None:
        return None
    ok = isinstance(value, list) and len(value) == 2
    if not ok or type(value[0]) is not int or not isinstance(value[1], str):
        raise ControlError("'recover_since' must be [offset, epoch]")
    return StreamPosition(value[0], value[1])


def _decode_subscribe(r: _Reader) -> ServerSubscribe:
    return ServerSubscribe(
        user=r.text("user"),
        channel=r.required("channel"),
        info=r.blob("info") or b"",
        data=r.blob("data") or b"",
        client=r.text("client"),
        session=r.text("session"),
        expire_at=r.integer("expire_at"),
        recover_since=_decode_since(r.obj.get("recover_since")),
        override=_decode_override(r.obj.get("override")),
    )


def _decode_disconnect(r: _Reader) -> DisconnectCommand:
    whitelist = r.get("whitelist", list, [])
    if not all(isinstance(w, str) for w in whitelist):
        raise ControlError("'whitelist' must be a list of strings")
    return DisconnectCommand(
        r.text("user"),
        r.integer("code"),
        r.text("reason"),
        r.text("client"),
        r.text("session"),
        tuple(whitelist),
    )


def _decode_emulation(r: _Reader) -> EmulationForward:
    return EmulationForward(
        r.required("id"), r.required("origin"), r.required("session"), r.blob("data") or b""
    )


def _decode_emulation_reply(r: _Reader) -> EmulationReply:
    status = r.integer("status")
    if not 100 <= status <= 599:
        raise ControlError("'status' must be an HTTP status")
    return EmulationReply(r.required("id"), status)


_DECODERS: dict[str, Callable[[_Reader], ControlMessage]] = {
    "node": _decode_node,
    "subscribe": _decode_subscribe,
    "unsubscribe": lambda r: UnsubscribeCommand(
        r.text("user"), r.text("channel"), r.text("client"), r.text("session")
    ),
    "disconnect": _decode_disconnect,
    "emulation": _decode_emulation,
    "emulation_reply": _decode_emulation_reply,
    "refresh": lambda r: RefreshCommand(
        r.text("user"),
        r.text("client"),
        r.text("session"),
        r.flag("expired"),
        r.integer("expire_at"),
        r.blob("info"),
    ),
}


def decode_control(data: bytes) -> ControlMessage:
    """The message in `data` (from `BrokerHandler.on_control`); ControlError if malformed."""
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise ControlError(f"control message is not JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise ControlError("control message must be a JSON object")
    if obj.get("v") != _VERSION:
        raise ControlError(f"unsupported control message version {obj.get('v')!r}")
    kind = obj.get("t")
    decoder = _DECODERS.get(kind) if isinstance(kind, str) else None
    if decoder is None:
        raise ControlError(f"unknown control message type {obj.get('t')!r}")
    return decoder(_Reader(obj))


async def apply_command(sessions: Sessions, cmd: UserCommand) -> None:
    """Apply a user command received from another node to this node's connections (the
    node-local `Sessions`, i.e. the hub — never the forwarding one, or it would loop)."""
    if isinstance(cmd, ServerSubscribe):
        await sessions.subscribe(cmd)
    elif isinstance(cmd, UnsubscribeCommand):
        await sessions.unsubscribe(cmd)
    elif isinstance(cmd, DisconnectCommand):
        await sessions.disconnect(cmd)
    else:
        await sessions.refresh(cmd)


# -- registry -------------------------------------------------------------------------------


class NodeRegistry:
    """Live nodes by uid. Every method runs on the loop. The local node (`local_uid`) never
    expires; the caller refreshes its entry with `update` at each heartbeat tick."""

    def __init__(
        self,
        local_uid: str,
        *,
        expire_after: float = NODE_EXPIRE_AFTER,
        now: Callable[[], float] = time.monotonic,
    ) -> None:
        self.local_uid = local_uid
        self._expire_after = expire_after
        self._now = now
        self._nodes: dict[str, tuple[NodeInfo, float]] = {}

    def update(self, info: NodeInfo) -> bool:
        """Record a heartbeat; True when the node was not known (joined or came back)."""
        known = info.uid in self._nodes
        self._nodes[info.uid] = (info, self._now())
        return not known

    def remove(self, uid: str) -> None:
        self._nodes.pop(uid, None)

    def prune(self) -> list[str]:
        """Forget nodes silent for more than `expire_after`; returns their uids."""
        cutoff = self._now() - self._expire_after
        gone = [
            uid for uid, (_, seen) in self._nodes.items() if seen < cutoff and uid != self.local_uid
        ]
        for uid in gone:
            del self._nodes[uid]
        return gone

    def nodes(self) -> list[NodeInfo]:
        """Live nodes (pruned first), sorted by name then uid."""
        self.prune()
        return sorted((info for info, _ in self._nodes.values()), key=lambda n: (n.name, n.uid))

    def __len__(self) -> int:
        self.prune()
        return len(self._nodes)

    def channels(self) -> dict[str, int]:
        """Channel -> subscribers summed over live nodes (the `channels` API result before
        pattern filtering)."""
        total: dict[str, int] = {}
        for node in self.nodes():
            for channel, count in node.channels.items():
                total[channel] = total.get(channel, 0) + count
        return total


__all__ = [
    "HEARTBEAT_INTERVAL",
    "NODE_EXPIRE_AFTER",
    "ControlError",
    "ControlMessage",
    "EmulationForward",
    "EmulationReply",
    "NodeRegistry",
    "apply_command",
    "decode_control",
    "encode_control",
]
