"""The server API executor against a real Node (MemoryEventLog + GroupCommitWriter +
MemoryPresence). The live-connection side (`Sessions`, the actor hub) is a recording fake:
the hub has its own suites; here we check what the executor hands it."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from unittest.mock import ANY

import orjson
import pytest

from centripy.engine.api import Executor
from centripy.engine.api_requests import CommandFailed, DecodeError, DispatchError, decode_request
from centripy.engine.channels import SubscribeOverride
from centripy.engine.config import Config
from centripy.engine.contracts import AppendRequest, AppendResult, StorageError
from centripy.engine.node import VERSION, Node
from centripy.engine.options import ChannelOptions, Namespace
from centripy.engine.protocol.codes import Error
from centripy.engine.sessions import (
    DisconnectCommand,
    NodeInfo,
    NodeStats,
    RefreshCommand,
    ServerSubscribe,
    UnsubscribeCommand,
)
from centripy.engine.types import ClientInfo, Publication, StreamPosition
from centripy.storage.memory import MemoryEventLog
from centripy.storage.presence_memory import MemoryPresence
from centripy.storage.writer import GroupCommitWriter

HISTORY = ChannelOptions(history_size=100, history_ttl=300, presence=True)
CONFIG = Config(
    namespaces=(Namespace("chat", HISTORY), Namespace("plain", ChannelOptions())),
)


class RecordingFanout:
    def __init__(self) -> None:
        self.delivered: list[tuple[str, Publication, str]] = []

    def deliver(self, channel: str, pub: Publication, epoch: str) -> None:
        self.delivered.append((channel, pub, epoch))

    def join(self, channel: str, info: ClientInfo) -> None:
        pass

    def leave(self, channel: str, info: ClientInfo) -> None:
        pass


@dataclass
class RecordingSessions:
    """A `Sessions` double: records calls; `subscribe` yields `delay` loop turns per call
    (by user name length) and tracks how many subscribes run at once."""

    calls: list[tuple[str, object]] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    node_stats: NodeStats = field(default_factory=lambda: NodeStats(0, 0, 0, 0))
    active: int = 0
    max_active: int = 0
    finished: list[str] = field(default_factory=list)
    node: Node | None = None

    async def subscribe(self, cmd: ServerSubscribe) -> None:
        self.calls.append(("subscribe", cmd))
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        for _ in range(len(cmd.user)):
            await asyncio.sleep(0)
        self.active -= 1
        self.finished.append(cmd.user)

    async def unsubscribe(self, cmd: UnsubscribeCommand) -> None:
        self.calls.append(("unsubscribe", (cmd.user, cmd.channel, cmd.client, cmd.session)))

    async def disconnect(self, cmd: DisconnectCommand) -> None:
        fields = (cmd.user, cmd.code, cmd.reason, cmd.client, cmd.session, cmd.whitelist)
        self.calls.append(("disconnect", fields))

    async def refresh(self, cmd: RefreshCommand) -> None:
        fields = (cmd.user, cmd.client, cmd.session, cmd.expired, cmd.expire_at, cmd.info)
        self.calls.append(("refresh", fields))

    def channels(self) -> dict[str, int]:
        return dict(self.counts)

    def stats(self) -> NodeStats:
        return self.node_stats

    def nodes(self) -> list[NodeInfo]:
        assert self.node is not None
        uptime = time.time() - self.node.started_at
        return [NodeInfo.of(self.node.uid, self.node.name, VERSION, self.node_stats, uptime, {})]


@dataclass
class Env:
    api: Executor
    node: Node
    sessions: RecordingSessions
    fanout: RecordingFanout
    presence: MemoryPresence


@contextlib.asynccontextmanager
async def make_env(config: Config = CONFIG) -> AsyncIterator[Env]:
    log = MemoryEventLog()
    await log.start()
    writer = GroupCommitWriter(log, max_delay=0.0)
    await writer.start()
    presence = MemoryPresence()
    node = Node(config, log, writer.submit_many, presence)
    fanout = RecordingFanout()
    node.attach_fanout(fanout)
    sessions = RecordingSessions(node=node)
    try:
        yield Env(Executor(node, sessions), node, sessions, fanout, presence)
    finally:
        await writer.close()
        await log.close()


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    async with make_env() as made:
        yield made


def failing_executor(sessions: RecordingSessions | None = None) -> Executor:
    """An executor whose event log write always fails (StorageError)."""

    async def submit_many(
        requests: Sequence[AppendRequest], *, on_commit: object = None
    ) -> list[AppendResult]:
        raise StorageError("database is down")

    node = Node(CONFIG, MemoryEventLog(), submit_many, MemoryPresence())
    return Executor(node, sessions or RecordingSessions())


def plain(result: object) -> object:
    """The result as a client sees it (Fragments expanded)."""
    return orjson.loads(orjson.dumps(result))


async def api_error(call: object) -> tuple[int, str]:
    with pytest.raises(Error) as info:
        await call  # type: ignore[misc]
    return info.value.code, info.value.message


# --- publish -----------------------------------------------------------------------------


async def test_publish_with_history_returns_position(env: Env) -> None:
    first = await env.api.publish({"channel": "chat:a", "data": {"text": "hi"}})
    second = await env.api.publish({"channel": "chat:a", "data": {"text": "again"}})
    assert first["offset"] == 1 and second["offset"] == 2
    assert isinstance(first["epoch"], str) and first["epoch"] == second["epoch"] != ""
    channel, pub, epoch = env.fanout.delivered[0]
    assert (channel, pub.data, pub.offset, epoch) == ("chat:a", b'{"text":"hi"}', 1, first["epoch"])


async def test_publish_without_history_is_empty_and_delivered(env: Env) -> None:
    assert await env.api.publish({"channel": "news", "data": [1, 2]}) == {}
    assert [(c, p.data, p.offset) for c, p, _ in env.fanout.delivered] == [("news", b"[1,2]", 0)]


async def test_publish_skip_history_and_tags(env: Env) -> None:
    result = await env.api.publish(
        {"channel": "chat:a", "data": "x", "skip_history": True, "tags": {"k": "v"}}
    )
    assert result == {}
    assert dict(env.fanout.delivered[0][1].tags) == {"k": "v"}
    history = plain(await env.api.history({"channel": "chat:a", "limit": -1}))
    assert history == {"publications": [], "epoch": history["epoch"], "offset": 0}  # type: ignore[index]


@pytest.mark.parametrize(
    "request_",
    [
        {"data": {"a": 1}},
        {"channel": "", "data": {"a": 1}},
        {"channel": "chat:a"},
        {"channel": "chat:a", "b64data": "not base64!"},
        {"channel": "chat:a", "b64data": "YQ"},  # padding is required (StdEncoding)
    ],
)
async def test_publish_bad_requests_are_107(env: Env, request_: dict[str, object]) -> None:
    assert await api_error(env.api.publish(request_)) == (107, "bad request")
    assert env.fanout.delivered == []


async def test_publish_unknown_namespace_is_102(env: Env) -> None:
    assert await api_error(env.api.publish({"channel": "nope:x", "data": 1})) == (
        102,
        "unknown channel",
    )


async def test_b64data_wins_over_data(env: Env) -> None:
    b64 = base64.b64encode(b"\x00\x01binary").decode()
    await env.api.publish({"channel": "news", "data": {"a": 1}, "b64data": b64})
    assert env.fanout.delivered[0][1].data == b"\x00\x01binary"


async def test_empty_b64data_falls_back_to_data(env: Env) -> None:
    await env.api.publish({"channel": "news", "data": {"a": 1}, "b64data": ""})
    assert env.fanout.delivered[0][1].data == b'{"a":1}'


async def test_null_data_is_published_as_null_like_go_raw(env: Env) -> None:
    await env.api.publish({"channel": "news", "data": None})
    assert env.fanout.delivered[0][1].data == b"null"


@pytest.mark.parametrize(
    "request_",
    [
        {"channel": 1, "data": 1},
        {"channel": "news", "data": 1, "tags": {"k": 1}},
        {"channel": "news", "data": 1, "tags": ["k"]},
        {"channel": "news", "data": 1, "skip_history": "yes"},
        {"channel": "news", "data": 1, "idempotency_key": 5},
        {"channel": "news", "data": 1, "b64data": 5},
    ],
)
async def test_wrong_field_types_are_decode_errors(env: Env, request_: dict[str, object]) -> None:
    with pytest.raises(DecodeError):
        await env.api.publish(request_)
    assert env.fanout.delivered == []


async def test_keys_match_case_insensitively_and_unknown_keys_are_ignored(env: Env) -> None:
    result = await env.api.publish({"CHANNEL": "chat:a", "Data": {"a": 1}, "delta": True})
    assert result["offset"] == 1


async def test_idempotency_key_returns_first_result_without_redelivery(env: Env) -> None:
    request = {"channel": "chat:a", "data": {"n": 1}, "idempotency_key": "k1"}
    first = await env.api.publish(request)
    again = await env.api.publish({**request, "data": {"n": 2}})
    assert again == first
    assert len(env.fanout.delivered) == 1
    other = await env.api.publish({"channel": "chat:b", "data": {"n": 1}, "idempotency_key": "k1"})
    assert other["offset"] == 1 and len(env.fanout.delivered) == 2  # scope is per channel


async def test_storage_failure_is_100() -> None:
    api = failing_executor()
    assert await api_error(api.publish({"channel": "chat:a", "data": 1})) == (
        100,
        "internal server error",
    )


# --- broadcast ---------------------------------------------------------------------------


async def test_broadcast_results_in_channel_order(env: Env) -> None:
    result = plain(
        await env.api.broadcast(
            {"channels": ["chat:a", "news", "", "bad:x", "chat:a"], "data": {"t": 1}}
        )
    )
    responses = result["responses"]  # type: ignore[index]
    assert responses[0]["result"]["offset"] in (1, 2)
    assert responses[1] == {"result": {}}
    assert responses[2] == {"error": {"code": 107, "message": "bad request"}}
    assert responses[3] == {"error": {"code": 102, "message": "unknown channel"}}
    assert {responses[0]["result"]["offset"], responses[4]["result"]["offset"]} == {1, 2}
    assert sorted(c for c, _, _ in env.fanout.delivered) == ["chat:a", "chat:a", "news"]


@pytest.mark.parametrize(
    "request_",
    [
        {"channels": [], "data": 1},
        {"data": 1},
        {"channels": ["news"]},
        {"channels": ["news"], "b64data": "%%"},
    ],
)
async def test_broadcast_top_level_107(env: Env, request_: dict[str, object]) -> None:
    assert (await api_error(env.api.broadcast(request_)))[0] == 107


async def test_broadcast_idempotency_key_applies_per_channel(env: Env) -> None:
    request = {"channels": ["chat:a", "chat:b"], "data": 1, "idempotency_key": "same"}
    first = plain(await env.api.broadcast(request))
    again = plain(await env.api.broadcast(request))
    assert first == again
    assert len(env.fanout.delivered) == 2


async def test_broadcast_storage_failure_is_per_channel_100() -> None:
    api = failing_executor()
    result = plain(await api.broadcast({"channels": ["chat:a", "news"], "data": 1}))
    assert result == {
        "responses": [
            {"error": {"code": 100, "message": "internal server error"}},
            {"result": {}},
        ]
    }


async def test_broadcast_channels_must_be_strings(env: Env) -> None:
    with pytest.raises(DecodeError):
        await env.api.broadcast({"channels": ["a", 1], "data": 1})


# --- subscribe, unsubscribe, disconnect, refresh ------------------------------------------


async def test_subscribe_hands_the_full_command_to_sessions(env: Env) -> None:
    result = await env.api.subscribe(
        {
            "user": "42",
            "channel": "chat:a",
            "info": {"role": "x"},
            "b64info": "aWdub3JlZA==",
            "data": {"welcome": True},
            "client": "c1",
            "session": "s1",
            "expire_at": 1735689600,
            "recover_since": {"offset": 10, "epoch": "xZyQ"},
            "override": {"presence": {"value": False}, "force_recovery": {"value": True}},
        }
    )
    assert result == {}
    assert env.sessions.calls == [
        (
            "subscribe",
            ServerSubscribe(
                user="42",
                channel="chat:a",
                info=b'{"role":"x"}',
                data=b'{"welcome":true}',
                client="c1",
                session="s1",
                expire_at=1735689600,
                recover_since=StreamPosition(10, "xZyQ"),
                override=SubscribeOverride(presence=False, force_recovery=True),
            ),
        )
    ]


async def test_subscribe_errors(env: Env) -> None:
    assert (await api_error(env.api.subscribe({"user": "1"})))[0] == 107
    assert (await api_error(env.api.subscribe({"user": "1", "channel": "x:y"})))[0] == 102
    with pytest.raises(DecodeError):
        await env.api.subscribe({"user": "1", "channel": "a", "override": {"presence": True}})
    with pytest.raises(DecodeError):
        await env.api.subscribe({"user": "1", "channel": "a", "recover_since": {"offset": -1}})
    assert env.sessions.calls == []


async def test_unsubscribe(env: Env) -> None:
    assert await env.api.unsubscribe({"user": "42", "channel": "chat:a", "client": "c"}) == {}
    assert await env.api.unsubscribe({"user": "42"}) == {}  # empty channel is not checked
    assert (await api_error(env.api.unsubscribe({"user": "42", "channel": "x:y"})))[0] == 102
    assert env.sessions.calls == [
        ("unsubscribe", ("42", "chat:a", "c", "")),
        ("unsubscribe", ("42", "", "", "")),
    ]


async def test_disconnect_defaults_to_force_disconnect(env: Env) -> None:
    await env.api.disconnect({"user": "42"})
    await env.api.disconnect(
        {"user": "42", "whitelist": ["keep"], "disconnect": {"code": 4000, "reason": "banned"}}
    )
    assert env.sessions.calls == [
        ("disconnect", ("42", 3503, "force disconnect", "", "", ())),
        ("disconnect", ("42", 4000, "banned", "", "", ("keep",))),
    ]
    with pytest.raises(DecodeError):
        await env.api.disconnect({"user": "42", "disconnect": {"code": -1}})


async def test_refresh(env: Env) -> None:
    await env.api.refresh({"user": "42", "expire_at": 1735689600, "info": {"n": 1}})
    await env.api.refresh({"user": "42", "client": "c", "expired": True})
    assert env.sessions.calls == [
        ("refresh", ("42", "", "", False, 1735689600, b'{"n":1}')),
        ("refresh", ("42", "c", "", True, 0, None)),
    ]


async def test_sessions_failure_is_100() -> None:
    class Broken(RecordingSessions):
        async def unsubscribe(self, cmd: UnsubscribeCommand) -> None:
            raise RuntimeError("hub is gone")

    api = failing_executor(Broken())
    assert (await api_error(api.unsubscribe({"user": "1"})))[0] == 100


# --- presence and history ----------------------------------------------------------------


async def test_presence_and_stats(env: Env) -> None:
    await env.presence.add("chat:a", ClientInfo("42", "c1", b'{"name":"Alex"}', b""), 60)
    await env.presence.add("chat:a", ClientInfo("42", "c2"), 60)
    assert plain(await env.api.presence({"channel": "chat:a"})) == {
        "presence": {
            "c1": {"user": "42", "client": "c1", "conn_info": {"name": "Alex"}},
            "c2": {"user": "42", "client": "c2"},
        }
    }
    assert await env.api.presence_stats({"channel": "chat:a"}) == {"num_clients": 2, "num_users": 1}
    assert await env.api.presence_stats({"channel": "chat:b"}) == {"num_clients": 0, "num_users": 0}
    assert await env.api.presence({"channel": "chat:b"}) == {"presence": {}}


@pytest.mark.parametrize("method", ["presence", "presence_stats"])
async def test_presence_errors(env: Env, method: str) -> None:
    call = getattr(env.api, method)
    assert await api_error(call({})) == (107, "bad request")
    assert await api_error(call({"channel": "x:y"})) == (102, "unknown channel")
    assert await api_error(call({"channel": "plain:y"})) == (108, "not available")


async def publish_n(env: Env, channel: str, n: int) -> str:
    epoch = ""
    for i in range(1, n + 1):
        result = await env.api.publish({"channel": channel, "data": {"i": i}})
        epoch = str(result["epoch"])
    return epoch


def offsets(result: object) -> list[int]:
    return [p["offset"] for p in plain(result)["publications"]]  # type: ignore[index]


async def test_history_limits(env: Env) -> None:
    epoch = await publish_n(env, "chat:a", 5)
    assert plain(await env.api.history({"channel": "chat:a"})) == {
        "publications": [],
        "epoch": epoch,
        "offset": 5,
    }
    assert offsets(await env.api.history({"channel": "chat:a", "limit": -1})) == [1, 2, 3, 4, 5]
    assert offsets(await env.api.history({"channel": "chat:a", "limit": -7})) == [1, 2, 3, 4, 5]
    assert offsets(await env.api.history({"channel": "chat:a", "limit": 2})) == [1, 2]
    assert offsets(await env.api.history({"channel": "chat:a", "limit": 2, "reverse": True})) == [
        5,
        4,
    ]


async def test_history_since_is_exclusive(env: Env) -> None:
    epoch = await publish_n(env, "chat:a", 5)
    since = {"offset": 3, "epoch": epoch}
    assert offsets(await env.api.history({"channel": "chat:a", "limit": -1, "since": since})) == [
        4,
        5,
    ]
    reverse = {"channel": "chat:a", "limit": -1, "since": since, "reverse": True}
    assert offsets(await env.api.history(reverse)) == [2, 1]
    no_epoch = {"channel": "chat:a", "limit": -1, "since": {"offset": 4}}
    assert offsets(await env.api.history(no_epoch)) == [5]


async def test_history_errors(env: Env) -> None:
    await publish_n(env, "chat:a", 2)
    assert (await api_error(env.api.history({})))[0] == 107
    assert (await api_error(env.api.history({"channel": "x:y"})))[0] == 102
    assert (await api_error(env.api.history({"channel": "plain:a"})))[0] == 108
    wrong_epoch = {"channel": "chat:a", "limit": -1, "since": {"offset": 1, "epoch": "other"}}
    assert await api_error(env.api.history(wrong_epoch)) == (112, "unrecoverable position")
    quirk = {"channel": "chat:a", "reverse": True, "since": {"offset": 0, "epoch": ""}}
    assert (await api_error(env.api.history(quirk)))[0] == 100
    with pytest.raises(DecodeError):
        await env.api.history({"channel": "chat:a", "limit": 1.5})


async def test_history_publication_shape(env: Env) -> None:
    await env.api.publish({"channel": "chat:a", "data": {"a": 1}, "tags": {"k": "v"}})
    info = ClientInfo("42", "c1", b'{"n":1}', b"")
    await env.node.publish("chat:a", b'"raw"', info=info)
    pubs = plain(await env.api.history({"channel": "chat:a", "limit": -1}))["publications"]  # type: ignore[index]
    assert pubs == [
        {"data": {"a": 1}, "offset": 1, "tags": {"k": "v"}},
        {"data": "raw", "offset": 2, "info": {"user": "42", "client": "c1", "conn_info": {"n": 1}}},
    ]


async def test_history_remove_keeps_position(env: Env) -> None:
    epoch = await publish_n(env, "chat:a", 3)
    assert await env.api.history_remove({"channel": "chat:a"}) == {}
    assert plain(await env.api.history({"channel": "chat:a", "limit": -1})) == {
        "publications": [],
        "epoch": epoch,
        "offset": 3,
    }
    assert (await api_error(env.api.history_remove({})))[0] == 107
    assert (await api_error(env.api.history_remove({"channel": "plain:x"})))[0] == 108


# --- channels, info, rpc -----------------------------------------------------------------


async def test_channels_filters_by_pattern_and_subscribers(env: Env) -> None:
    env.sessions.counts = {"chat:a": 3, "chat:b": 0, "news": 1, "chat:ab": 2}
    assert await env.api.channels({}) == {
        "channels": {
            "chat:a": {"num_clients": 3},
            "news": {"num_clients": 1},
            "chat:ab": {"num_clients": 2},
        }
    }
    assert await env.api.channels({"pattern": "chat:?"}) == {
        "channels": {"chat:a": {"num_clients": 3}}
    }
    assert await env.api.channels({"pattern": "nomatch"}) == {"channels": {}}
    assert (await api_error(env.api.channels({"pattern": "chat:[a"})))[0] == 107


async def test_info(env: Env) -> None:
    env.sessions.node_stats = NodeStats(num_clients=3, num_users=2, num_channels=4, num_subs=5)
    env.node.started_at -= 12.5
    assert await env.api.info({}) == {
        "nodes": [
            {
                "uid": env.node.uid,
                "name": env.node.name,
                "version": VERSION,
                "num_clients": 3,
                "num_users": 2,
                "num_channels": 4,
                "num_subs": 5,
                "uptime": 12,
            }
        ]
    }


async def test_rpc_has_no_extensions(env: Env) -> None:
    assert await api_error(env.api.rpc({"params": {}})) == (107, "bad request")
    assert await api_error(env.api.rpc({"method": "x", "params": {"a": 1}})) == (104, "not found")


# --- batch -------------------------------------------------------------------------------


async def test_batch_sequential_replies_in_order(env: Env) -> None:
    result = plain(
        await env.api.batch(
            {
                "commands": [
                    {"publish": {"channel": "chat:a", "data": 1}},
                    {"publish": {"channel": "nope:a", "data": 1}},
                    {"method": "publish", "params": {"channel": "chat:a", "data": 1}},
                    {
                        "presence_stats": {"channel": "chat:a"},
                        "publish": {"channel": "news", "data": 2},
                    },
                    None,
                    {"broadcast": {"channels": ["news"], "data": 1}},
                    {"rpc": None, "info": {}},
                ]
            }
        )
    )
    replies = result["replies"]  # type: ignore[index]
    assert replies[0]["publish"]["offset"] == 1
    assert replies[1] == {"error": {"code": 102, "message": "unknown channel"}}
    assert replies[2] == {"error": {"code": 104, "message": "not found"}}
    assert replies[3] == {"publish": {}}  # publish comes first in Centrifugo's key order
    assert replies[4] == {"error": {"code": 104, "message": "not found"}}
    assert replies[5] == {"broadcast": {"responses": [{"result": {}}]}}
    assert list(replies[6]) == ["info"]
    assert len(replies) == 7


async def test_empty_batch_is_empty_object(env: Env) -> None:
    assert await env.api.batch({"commands": []}) == {}
    assert await env.api.batch({}) == {}


async def test_batch_decode_error_fails_whole_batch(env: Env) -> None:
    commands = [
        {"publish": {"channel": "news", "data": 1}},
        {"info": {}, "broadcast": {"channels": "news"}},
    ]
    with pytest.raises(DecodeError):
        await env.api.batch({"commands": commands})
    assert env.fanout.delivered == []
    with pytest.raises(DecodeError):
        await env.api.batch({"commands": [{"publish": 1}]})
    with pytest.raises(DecodeError):
        await env.api.batch({"commands": {"publish": {}}})


def subscribes(users: list[str]) -> list[dict[str, object]]:
    return [{"subscribe": {"user": u, "channel": "news"}} for u in users]


async def test_batch_sequential_runs_one_at_a_time(env: Env) -> None:
    await env.api.batch({"commands": subscribes(["aaa", "a", "aa"])})
    assert env.sessions.max_active == 1
    assert env.sessions.finished == ["aaa", "a", "aa"]


async def test_batch_parallel_runs_concurrently_and_keeps_reply_order(env: Env) -> None:
    commands = [*subscribes(["aaaa", "a"]), {"presence_stats": {"channel": "plain:x"}}]
    result = plain(await env.api.batch({"commands": commands, "parallel": True}))
    assert env.sessions.max_active == 2
    assert env.sessions.finished == ["a", "aaaa"]  # the slow one finished last ...
    assert result == {  # ... yet replies follow the commands
        "replies": [
            {"subscribe": {}},
            {"subscribe": {}},
            {"error": {"code": 108, "message": "not available"}},
        ]
    }


async def test_batch_parallel_publishes_commit_together(env: Env) -> None:
    appended: list[int] = []
    append_many = env.node.event_log.append_many

    async def spy(requests: Sequence[AppendRequest]) -> list[AppendResult]:
        appended.append(len(requests))
        return await append_many(requests)

    env.node.event_log.append_many = spy  # type: ignore[method-assign]
    commands = [
        {"publish": {"channel": "chat:a", "data": 1}},
        {"publish": {"channel": "", "data": 1}},
        {"publish": {"channel": "plain:x", "data": 2}},
        {"presence_stats": {"channel": "plain:x"}},
        {"publish": {"channel": "nope:a", "data": 1}},
        {"publish": {"channel": "chat:a", "data": 3, "idempotency_key": "k"}},
        {"publish": {"channel": "chat:b", "b64data": "!"}},
        {"publish": {"channel": "chat:a", "data": 4, "idempotency_key": "k"}},
    ]
    result = plain(await env.api.batch({"commands": commands, "parallel": True}))
    assert result == {
        "replies": [
            {"publish": {"offset": 1, "epoch": ANY}},
            {"error": {"code": 107, "message": "bad request"}},
            {"publish": {}},
            {"error": {"code": 108, "message": "not available"}},
            {"error": {"code": 102, "message": "unknown channel"}},
            {"publish": {"offset": 2, "epoch": ANY}},
            {"error": {"code": 107, "message": "bad request"}},
            {"publish": {"offset": 2, "epoch": ANY}},  # the same key: the first call's position
        ]
    }
    assert appended == [3]  # the three publications for the log in one transaction
    assert [(c, p.offset) for c, p, _ in env.fanout.delivered] == [
        ("plain:x", 0),
        ("chat:a", 1),
        ("chat:a", 2),
    ]
    metrics = env.node.metrics
    assert metrics.value("centripy_api_commands_total", method="PublishRequest") == 7
    assert metrics.value("centripy_api_command_errors_total", code="107") == 2


async def test_decode_request_unknown_method_is_104() -> None:
    with pytest.raises(Error) as info:
        decode_request("connections", {})
    assert info.value.code == 104


# --- dispatch (async consumers) ----------------------------------------------------------


async def test_dispatch_runs_supported_methods(env: Env) -> None:
    await env.api.dispatch("publish", b'{"channel":"chat:a","data":{"x":1}}')
    await env.api.dispatch("broadcast", b'{"channels":["news","bad:x"],"data":1}')
    await env.api.dispatch("disconnect", b'{"user":"42"}')
    assert [c for c, _, _ in env.fanout.delivered] == ["chat:a", "news"]
    assert env.sessions.calls == [("disconnect", ("42", 3503, "force disconnect", "", "", ()))]


async def test_dispatch_unwraps_a_json_string_payload(env: Env) -> None:
    payload = orjson.dumps(orjson.dumps({"channel": "news", "data": {"x": 1}}).decode())
    await env.api.dispatch("publish", payload)
    assert env.fanout.delivered[0][1].data == b'{"x":1}'


async def test_dispatch_ignores_unknown_and_read_only_methods(env: Env) -> None:
    await env.api.dispatch("presence", b"not json at all")
    await env.api.dispatch("whatever", b"{}")
    await env.api.dispatch("Publish", b"{}")


@pytest.mark.parametrize("payload", [b"{", b"[1]", b'"x"', b'{"channel": 5, "data": 1}'])
async def test_dispatch_decode_errors_are_not_retryable(env: Env, payload: bytes) -> None:
    with pytest.raises(DecodeError) as info:
        await env.api.dispatch("publish", payload)
    assert info.value.retryable is False


async def test_dispatch_api_errors_are_not_retryable_except_100(env: Env) -> None:
    with pytest.raises(CommandFailed) as info:
        await env.api.dispatch("publish", b'{"channel":"bad:x","data":1}')
    assert (info.value.error.code, info.value.retryable) == (102, False)
    api = failing_executor()
    with pytest.raises(DispatchError) as failed:
        await api.dispatch("publish", b'{"channel":"chat:a","data":1}')
    assert failed.value.retryable is True


async def test_dispatch_broadcast_retryable_only_when_a_channel_got_100() -> None:
    api = failing_executor()
    await api.dispatch("broadcast", b'{"channels":["news","bad:x"],"data":1}')  # 102 is skipped
    with pytest.raises(CommandFailed) as info:
        await api.dispatch("broadcast", b'{"channels":["news","chat:a"],"data":1}')
    assert (info.value.error.code, info.value.retryable) == (100, True)
    with pytest.raises(CommandFailed) as top:
        await api.dispatch("broadcast", b'{"channels":[],"data":1}')
    assert (top.value.error.code, top.value.retryable) == (107, False)


# -- channel names and reads of unknown channels (issue 15) --------------------------------

STRICT = ChannelOptions(history_size=10, history_ttl=60, presence=True, channel_regex="^[a-z]+$")
STRICT_CONFIG = Config(
    namespaces=(Namespace("chat", HISTORY), Namespace("strict", STRICT)),
    channel_max_length=64,
)


@pytest.fixture
async def strict_env() -> AsyncIterator[Env]:
    async with make_env(STRICT_CONFIG) as made:
        yield made


BAD_NAMES = ["chat:" + "a" * 60, "strict:abc1", "strict:" + "é" * 30, "x" * 65]
ONE_CHANNEL_METHODS = [
    ("publish", {"data": 1}),
    ("subscribe", {"user": "42"}),
    ("unsubscribe", {"user": "42"}),
    ("presence", {}),
    ("presence_stats", {}),
    ("history", {"limit": -1}),
    ("history_remove", {}),
]


@pytest.mark.parametrize("channel", BAD_NAMES)
@pytest.mark.parametrize(("method", "params"), ONE_CHANNEL_METHODS)
async def test_bad_channel_names_are_107_on_every_method(
    strict_env: Env, method: str, params: dict[str, object], channel: str
) -> None:
    request = {"channel": channel, **params}
    assert await api_error(strict_env.api.call(method, request)) == (107, "bad request")
    assert strict_env.sessions.calls == [] and strict_env.fanout.delivered == []
    log = strict_env.node.event_log
    assert isinstance(log, MemoryEventLog) and log._streams == {}


async def test_unknown_namespace_is_102_before_the_name_check(strict_env: Env) -> None:
    too_long = "nope:" + "a" * 100
    assert await api_error(strict_env.api.publish({"channel": too_long, "data": 1})) == (
        102,
        "unknown channel",
    )


async def test_valid_names_pass_the_name_checks(strict_env: Env) -> None:
    assert (await strict_env.api.publish({"channel": "strict:abc", "data": 1}))["offset"] == 1
    exact = "chat:" + "a" * 59  # 64 bytes
    assert (await strict_env.api.publish({"channel": exact, "data": 1}))["offset"] == 1
    # without channel_regex, non-ASCII names stay allowed on the server API (as in Centrifugo)
    assert (await strict_env.api.publish({"channel": "chat:привет", "data": 1}))["offset"] == 1


async def test_broadcast_and_batch_refuse_bad_names_per_channel(strict_env: Env) -> None:
    result = plain(
        await strict_env.api.broadcast(
            {"channels": ["strict:ok", "strict:no1", "chat:" + "b" * 70], "data": 1}
        )
    )
    responses = result["responses"]  # type: ignore[index]
    assert responses[0]["result"]["offset"] == 1
    assert responses[1:] == [{"error": {"code": 107, "message": "bad request"}}] * 2
    assert [c for c, _, _ in strict_env.fanout.delivered] == ["strict:ok"]
    for parallel in (False, True):
        batch = plain(
            await strict_env.api.batch(
                {
                    "commands": [
                        {"publish": {"channel": "strict:NO", "data": 1}},
                        {"history": {"channel": "strict:no2"}},
                        {"publish": {"channel": "strict:ok", "data": 2}},
                    ],
                    "parallel": parallel,
                }
            )
        )
        replies = batch["replies"]  # type: ignore[index]
        assert replies[0] == replies[1] == {"error": {"code": 107, "message": "bad request"}}
        assert "publish" in replies[2]
    with pytest.raises(CommandFailed) as info:
        await strict_env.api.dispatch("publish", b'{"channel":"strict:NO","data":1}')
    assert (info.value.error.code, info.value.retryable) == (107, False)


async def test_history_of_unknown_channels_stores_nothing(strict_env: Env) -> None:
    log = strict_env.node.event_log
    assert isinstance(log, MemoryEventLog)
    first = plain(await strict_env.api.history({"channel": "chat:never", "limit": -1}))
    assert first == {"publications": [], "epoch": ANY, "offset": 0}
    for i in range(50):
        await strict_env.api.history({"channel": f"chat:random{i}", "limit": 10})
        await strict_env.node.stream_top(f"chat:other{i}")
        await strict_env.api.history_remove({"channel": f"chat:gone{i}"})
    assert log._streams == {}
    published = await strict_env.api.publish({"channel": "chat:never", "data": 1})
    assert published == {"offset": 1, "epoch": first["epoch"]}  # type: ignore[index]


async def test_publication_data_over_api_max_publication_size_is_107() -> None:
    async with make_env(dataclasses.replace(CONFIG, api_max_publication_size=1000)) as e:
        big = {"channel": "chat:a", "data": {"text": "x" * 1000}}
        assert await api_error(e.api.publish(big)) == (107, "bad request")
        b64 = {"channel": "chat:a", "b64data": base64.b64encode(b"x" * 1001).decode()}
        assert await api_error(e.api.publish(b64)) == (107, "bad request")
        broadcast = {"channels": ["chat:a", "chat:b"], "data": {"text": "x" * 1000}}
        assert await api_error(e.api.broadcast(broadcast)) == (107, "bad request")
        assert e.fanout.delivered == []
        await e.api.publish({"channel": "chat:a", "data": {"text": "x" * 900}})  # within it
        assert len(e.fanout.delivered) == 1
