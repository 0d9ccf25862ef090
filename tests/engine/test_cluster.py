"""Control protocol between nodes: encode/decode round trips, bad input, the node registry
with a fake clock, and apply_command's dispatch to Sessions."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from centripy.engine.channels import SubscribeOverride
from centripy.engine.cluster import (
    HEARTBEAT_INTERVAL,
    NODE_EXPIRE_AFTER,
    ControlError,
    ControlMessage,
    EmulationForward,
    EmulationReply,
    NodeRegistry,
    apply_command,
    decode_control,
    encode_control,
)
from centripy.engine.sessions import (
    DisconnectCommand,
    NodeInfo,
    NodeStats,
    RefreshCommand,
    ServerSubscribe,
    UnsubscribeCommand,
)
from centripy.engine.types import StreamPosition

MESSAGES: list[ControlMessage] = [
    NodeInfo("u1", "host_8000", "5.2.2", 3, 2, 4, 5, 12, {"chat:a": 2, "news": 1}),
    NodeInfo("u2", "n", "5.2.2"),
    ServerSubscribe("42", "news"),
    ServerSubscribe(
        user="42",
        channel="chat:x",
        info=b'{"role":"x"}',
        data=b"\x00\xffbinary",
        client="c1",
        session="s1",
        expire_at=1735689600,
        recover_since=StreamPosition(10, "xZyQ"),
        override=SubscribeOverride(presence=True, join_leave=False, force_recovery=None),
    ),
    UnsubscribeCommand("42", "news", "c1", "s1"),
    UnsubscribeCommand("", ""),
    DisconnectCommand("42", 4000, "banned", whitelist=("keep-1", "keep-2")),
    RefreshCommand("42", expired=True),
    RefreshCommand("42", "c", "s", False, 1735689600, b'{"name":"A"}'),
    RefreshCommand("42", info=b""),
    EmulationForward("n1:7", "n1", "sess-1", b'{"subscribe":{"channel":"c"},"id":2}'),
    EmulationForward("n1:8", "n1", "sess-1", b"\x0a\x00\xff"),  # protobuf commands
    EmulationReply("n1:7", 204),
    EmulationReply("n1:8", 503),
]


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_round_trip(msg: ControlMessage) -> None:
    assert decode_control(encode_control(msg)) == msg


def test_refresh_keeps_none_and_empty_info_apart() -> None:
    none = decode_control(encode_control(RefreshCommand("u")))
    empty = decode_control(encode_control(RefreshCommand("u", info=b"")))
    assert isinstance(none, RefreshCommand) and none.info is None
    assert isinstance(empty, RefreshCommand) and empty.info == b""


def test_unknown_keys_are_ignored() -> None:
    data = orjson.dumps({"v": 1, "t": "unsubscribe", "user": "u", "channel": "c", "new": 1})
    assert decode_control(data) == UnsubscribeCommand("u", "c")


def _raw(**fields: Any) -> bytes:
    return orjson.dumps({"v": 1, **fields})


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"not json",
        b"[1,2]",
        orjson.dumps({"t": "node", "uid": "x"}),  # no version
        _raw(t="nope"),
        _raw(t="node"),  # uid required
        _raw(t="node", uid="u", num_clients="3"),
        _raw(t="node", uid="u", num_clients=True),
        _raw(t="node", uid="u", channels={"a": "1"}),
        _raw(t="subscribe", user="u"),  # channel required
        _raw(t="subscribe", channel="c", info="***"),
        _raw(t="subscribe", channel="c", recover_since=[1]),
        _raw(t="subscribe", channel="c", override={"presence": 1}),
        _raw(t="disconnect", user="u", code=4000, whitelist=[1]),
        _raw(t="refresh", user=None),
        _raw(t="emulation", origin="o", session="s", data=""),  # id required
        _raw(t="emulation", id="1", session="s"),  # origin required
        _raw(t="emulation", id="1", origin="o", session="s", data="***"),
        _raw(t="emulation_reply", id="1", status=42),
        _raw(t="emulation_reply", id="1", status="204"),
        _raw(t="emulation_reply", status=204),
    ],
)
def test_malformed_messages_raise_control_error(data: bytes) -> None:
    with pytest.raises(ControlError):
        decode_control(data)


JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner),
    max_leaves=6,
)
FIELDS = ["uid", "name", "num_clients", "uptime", "channels", "user", "channel", "info",
          "data", "client", "session", "expire_at", "recover_since", "override", "code",
          "reason", "whitelist", "expired", "id", "origin", "status"]  # fmt: skip
MESSAGE_LIKE = st.builds(
    lambda t, fields: orjson.dumps({"v": 1, "t": t, **fields}),
    st.sampled_from(
        [
            "node",
            "subscribe",
            "unsubscribe",
            "disconnect",
            "refresh",
            "emulation",
            "emulation_reply",
        ]
    )
    | JSON,
    st.dictionaries(st.sampled_from(FIELDS), JSON),
)


@given(st.binary(max_size=200) | MESSAGE_LIKE)
def test_decoder_returns_a_message_or_raises_control_error(data: bytes) -> None:
    try:
        msg = decode_control(data)
    except ControlError:
        return
    assert isinstance(
        msg,
        NodeInfo
        | ServerSubscribe
        | UnsubscribeCommand
        | DisconnectCommand
        | RefreshCommand
        | EmulationForward
        | EmulationReply,
    )


def test_node_info_of_stats() -> None:
    info = NodeInfo.of("u", "n", "5.2.2", NodeStats(1, 2, 3, 4), 9.7, {"a": 1})
    assert info == NodeInfo("u", "n", "5.2.2", 1, 2, 3, 4, 9, {"a": 1})


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_registry_expires_silent_nodes_but_not_itself() -> None:
    clock = Clock()
    reg = NodeRegistry("me", now=clock)
    assert reg.update(NodeInfo("me", "a", "5.2.2")) is True
    assert reg.update(NodeInfo("other", "b", "5.2.2")) is True
    assert reg.update(NodeInfo("other", "b", "5.2.2", num_clients=1)) is False
    assert [n.uid for n in reg.nodes()] == ["me", "other"]
    assert reg.nodes()[1].num_clients == 1
    clock.t += NODE_EXPIRE_AFTER
    assert len(reg) == 2  # exactly 7 s: still alive
    clock.t += 0.5
    assert reg.prune() == ["other"]
    assert [n.uid for n in reg.nodes()] == ["me"]
    assert reg.update(NodeInfo("other", "b", "5.2.2")) is True  # came back


def test_registry_heartbeats_keep_a_node_alive() -> None:
    clock = Clock()
    reg = NodeRegistry("me", now=clock)
    for _ in range(10):
        reg.update(NodeInfo("other", "b", "5.2.2"))
        clock.t += HEARTBEAT_INTERVAL
        assert len(reg) == 1


def test_registry_aggregates_channels_of_live_nodes() -> None:
    clock = Clock()
    reg = NodeRegistry("me", now=clock)
    reg.update(NodeInfo("me", "a", "v", channels={"x": 1, "y": 2}))
    reg.update(NodeInfo("n2", "b", "v", channels={"x": 3}))
    clock.t += 5
    reg.update(NodeInfo("n3", "c", "v", channels={"z": 4}))
    assert reg.channels() == {"x": 4, "y": 2, "z": 4}
    clock.t += 3  # n2 silent for 8 s
    assert reg.channels() == {"x": 1, "y": 2, "z": 4}
    reg.remove("n3")
    assert reg.channels() == {"x": 1, "y": 2}


class RecordingSessions:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    async def subscribe(self, cmd: ServerSubscribe) -> None:
        self.calls.append(("subscribe", cmd))

    async def unsubscribe(self, cmd: UnsubscribeCommand) -> None:
        self.calls.append(("unsubscribe", cmd))

    async def disconnect(self, cmd: DisconnectCommand) -> None:
        self.calls.append(("disconnect", cmd))

    async def refresh(self, cmd: RefreshCommand) -> None:
        self.calls.append(("refresh", cmd))

    def channels(self) -> dict[str, int]:
        return {}

    def stats(self) -> NodeStats:
        return NodeStats(0, 0, 0, 0)


async def test_apply_command_dispatches_to_sessions() -> None:
    sessions = RecordingSessions()
    sub = ServerSubscribe("u", "ch", info=b"{}")
    unsub = UnsubscribeCommand("u", "ch", "c", "s")
    disconnect = DisconnectCommand("u", 3503, "force", whitelist=("k",))
    refresh = RefreshCommand("u", expire_at=5, info=b"{}")
    for cmd in (sub, unsub, disconnect, refresh):
        await apply_command(sessions, cmd)
    assert sessions.calls == [
        ("subscribe", sub),
        ("unsubscribe", unsub),
        ("disconnect", disconnect),
        ("refresh", refresh),
    ]
