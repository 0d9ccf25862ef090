"""The connection actor's protocol state machine, in process, with a real node and log."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from centripy.actors.base import actor_of
from centripy.actors.connection import (
    CONNECT_TOKEN,
    REFRESH_TOKEN,
    SUBSCRIPTION_TOKEN,
    TokenReplies,
    token_failure,
)
from centripy.actors.connection_core import Frame, Timer
from centripy.actors.wheel import heartbeat_wheel_of, wheel_of
from centripy.engine import auth
from centripy.engine.auth import make_token
from centripy.engine.protocol.codes import Disconnect, Error
from tests.actors.harness import SECRET, Client, CountingPresence, Harness, make_config
from tests.support.wait import eventually


async def test_connect_anonymous_result_shape() -> None:
    async with Harness(make_config()) as h:
        client = Client(h.ctx)
        reply = await client.call("connect", {"name": "test"})
        result = reply["connect"]
        assert len(result["client"]) == 36 and result["version"]
        assert result["ping"] == 25 and result["pong"] is True
        assert "expires" not in result and "session" not in result


async def test_command_before_connect_is_bad_request() -> None:
    async with Harness(make_config()) as h:
        client = Client(h.ctx)
        client.send({"subscribe": {"channel": "news"}})
        assert await client.closed() == (3501, "bad request")


async def test_no_credentials_disconnects_3501() -> None:
    async with Harness(make_config(allow_anonymous_connect_without_token=False)) as h:
        client = Client(h.ctx)
        client.send({"connect": {}})
        assert (await client.closed())[0] == 3501


async def test_invalid_token_3500_and_expired_token_109_then_unusable() -> None:
    async with Harness(make_config()) as h:
        bad = Client(h.ctx)
        bad.send({"connect": {"token": "not-a-jwt"}})
        assert (await bad.closed())[0] == 3500
        expired = Client(h.ctx)
        token = make_token(SECRET, "42", 10, now=time.time() - 100)
        reply = await expired.call("connect", {"token": token})
        assert reply["error"]["code"] == 109
        expired.send({"subscribe": {"channel": "news"}})
        assert (await expired.closed())[0] == 3501


async def test_token_connection_gets_expiry_and_info() -> None:
    async with Harness(make_config()) as h:
        client = Client(h.ctx)
        token = make_token(SECRET, "42", 60, extra={"info": {"name": "Alex"}})
        result = (await client.call("connect", {"token": token}))["connect"]
        assert result["expires"] is True and 55 <= result["ttl"] <= 60
        await client.call("subscribe", {"channel": "h:room"})
        await client.call("publish", {"channel": "h:room", "data": {"x": 1}})
        pub = await client.wait(lambda m: "push" in m)
        assert pub["push"]["pub"]["info"] == {
            "user": "42",
            "client": result["client"],
            "conn_info": {"name": "Alex"},
        }


async def test_subscribe_errors() -> None:
    async with Harness(make_config()) as h:
        client = await h.client()
        assert (await client.call("subscribe", {"channel": "nope:x"}))["error"]["code"] == 102
        assert (await client.call("subscribe", {"channel": "$private"}))["error"]["code"] == 103
        assert (await client.call("subscribe", {"channel": "a" * 300}))["error"]["code"] == 107
        assert (await client.call("subscribe", {"channel": "news"}))["subscribe"] == {}
        assert (await client.call("subscribe", {"channel": "news"}))["error"]["code"] == 105


async def test_positioned_subscribe_returns_stream_top() -> None:
    async with Harness(make_config()) as h:
        for i in range(3):
            await h.node.publish("h:top", b'{"i":%d}' % i)
        client = await h.client()
        result = (await client.call("subscribe", {"channel": "h:top", "recoverable": True}))[
            "subscribe"
        ]
        assert result["recoverable"] and result["positioned"]
        assert result["offset"] == 3 and result["epoch"]


async def test_recovery_returns_missed_publications_then_live_ones() -> None:
    async with Harness(make_config()) as h:
        client = await h.client()
        sub = (await client.call("subscribe", {"channel": "h:r", "recoverable": True}))["subscribe"]
        epoch = sub["epoch"]
        await client.call("unsubscribe", {"channel": "h:r"})
        for i in range(5):
            await h.node.publish("h:r", b'{"i":%d}' % i)
        result = (
            await client.call(
                "subscribe",
                {
                    "channel": "h:r",
                    "recoverable": True,
                    "recover": True,
                    "offset": 0,
                    "epoch": epoch,
                },
            )
        )["subscribe"]
        assert result["recovered"] and result["was_recovering"]
        assert [p["offset"] for p in result["publications"]] == [1, 2, 3, 4, 5]
        await h.node.publish("h:r", b'{"i":5}')
        live = await client.wait(lambda m: "push" in m)
        assert live["push"]["pub"]["offset"] == 6


async def test_recovery_with_wrong_epoch_is_not_recovered_but_succeeds() -> None:
    async with Harness(make_config()) as h:
        await h.node.publish("h:e", b"{}")
        client = await h.client()
        result = (
            await client.call(
                "subscribe",
                {"channel": "h:e", "recoverable": True, "recover": True, "offset": 1, "epoch": "x"},
            )
        )["subscribe"]
        assert "recovered" not in result and result["offset"] == 1
        assert "publications" not in result


async def test_publications_during_recovery_are_neither_lost_nor_duplicated() -> None:
    async with Harness(make_config()) as h:
        for i in range(50):
            await h.node.publish("h:race", b'{"i":%d}' % i)
        client = await h.client()
        publisher = asyncio.create_task(_publish_many(h, "h:race", 50, 100))
        result = (
            await client.call(
                "subscribe",
                {"channel": "h:race", "recoverable": True, "recover": True, "offset": 10},
            )
        )["subscribe"]
        await publisher
        assert result["recovered"]
        recovered = [p["offset"] for p in result["publications"]]
        await client.wait(lambda m: "push" in m and m["push"]["pub"]["offset"] == 100)
        live = [p["offset"] for p in client.pubs("h:race")]
        assert recovered + live == list(range(11, 101))


async def test_publications_committed_between_join_and_read_are_delivered_once() -> None:
    """Deterministic version of the race: the history read is held until publications
    made after the channel join were committed (so they are both read and pushed)."""
    async with Harness(make_config()) as h:
        await _publish_many(h, "h:gate", 0, 5)
        client = await h.client()
        reading, release = asyncio.Event(), asyncio.Event()
        read = h.log.history

        async def gated_history(query: Any) -> Any:
            reading.set()
            await release.wait()
            return await read(query)

        h.log.history = gated_history  # type: ignore[method-assign]
        (cmd_id,) = client.send(
            {"subscribe": {"channel": "h:gate", "recoverable": True, "recover": True, "offset": 2}}
        )
        await asyncio.wait_for(reading.wait(), 3)
        await _publish_many(h, "h:gate", 5, 8)
        release.set()
        reply = await client.wait(lambda m: m.get("id") == cmd_id)
        recovered = [p["offset"] for p in reply["subscribe"]["publications"]]
        await _publish_many(h, "h:gate", 8, 9)
        await client.wait(lambda m: "push" in m and m["push"]["pub"]["offset"] == 9)
        live = [p["offset"] for p in client.pubs("h:gate")]
        assert recovered == [3, 4, 5, 6, 7, 8] and live == [9]


async def _publish_many(h: Harness, channel: str, start: int, stop: int) -> None:
    for i in range(start, stop):
        await h.node.publish(channel, b'{"i":%d}' % i)


async def test_history_command_and_permissions() -> None:
    async with Harness(make_config()) as h:
        for i in range(4):
            await h.node.publish("h:hist", b'{"i":%d}' % i)
        client = await h.client()
        reply = await client.call("history", {"channel": "h:hist", "limit": 2})
        hist = reply["history"]
        assert [p["offset"] for p in hist["publications"]] == [1, 2] and hist["offset"] == 4
        reply = await client.call("history", {"channel": "news", "limit": 2})
        assert reply["error"]["code"] == 108
        reply = await client.call(
            "history", {"channel": "h:hist", "since": {"offset": 1, "epoch": "zzz"}}
        )
        assert reply["error"]["code"] == 112


async def test_presence_and_join_leave_pushes() -> None:
    async with Harness(make_config()) as h:
        alice = await h.client({"token": make_token(SECRET, "alice", 60)})
        await alice.call("subscribe", {"channel": "h:room", "join_leave": True})
        bob = await h.client({"token": make_token(SECRET, "bob", 60)})
        await bob.call("subscribe", {"channel": "h:room"})
        join = await alice.wait(lambda m: "join" in m.get("push", {}) and _user(m) == "bob")
        assert join["push"]["channel"] == "h:room"
        stats = await alice.call("presence_stats", {"channel": "h:room"})
        assert stats["presence_stats"] == {"num_clients": 2, "num_users": 2}
        await bob.call("unsubscribe", {"channel": "h:room"})
        await alice.wait(lambda m: "leave" in m.get("push", {}))
        presence = (await alice.call("presence", {"channel": "h:room"}))["presence"]["presence"]
        assert [v["user"] for v in presence.values()] == ["alice"]


def _user(message: dict[str, object]) -> object:
    push = message["push"]
    assert isinstance(push, dict)
    return push["join"]["info"]["user"]


async def test_client_publish_permission_denied() -> None:
    async with Harness(make_config()) as h:
        client = await h.client()
        reply = await client.call("publish", {"channel": "news", "data": {"x": 1}})
        assert reply["error"] == {"code": 103, "message": "permission denied"}


async def test_ping_and_pong_timeout() -> None:
    async with Harness(make_config(ping_interval=0.2, pong_timeout=0.1)) as h:
        client = await h.client()
        await client.wait(lambda m: m == {}, timeout=2)
        client.send({})  # pong
        assert (await client.closed(timeout=3))[0] == 3012  # the next ping is not answered


async def test_heartbeats_go_on_the_heartbeat_wheel_and_short_ones_stay_precise() -> None:
    """Pings and presence ticks seconds away go on the loop's heartbeat wheel, so many
    connections' heartbeats fire together; short ones (tests, tight configs) do not."""
    loop = asyncio.get_running_loop()
    beats, fine = heartbeat_wheel_of(loop, 25.0, 1.0), wheel_of(loop)  # slots of 1 s
    async with Harness(make_config()) as h:
        for _ in range(20):
            await h.client()
        assert beats.pending() == 20  # a PING each (nothing to TICK for)
        assert fine.pending() == 0  # STALE cancelled on connect; no expiry
    async with Harness(make_config(ping_interval=0.2, pong_timeout=0.1)) as h:
        before = beats.pending()
        client = await h.client()
        await client.call("subscribe", {"channel": "h:pos", "positioned": True})
        assert beats.pending() == before + 1  # its TICK (27 s); the PING is 0.2 s away
        assert fine.pending() >= 1  # the PING (and a PONG wait once it was sent)


async def test_a_pong_frame_is_handled_in_the_actor_without_a_task() -> None:
    """A frame that only answers the ping (`{}`) is handled synchronously: every idle
    connection sends one per ping interval, and a coroutine run as a task for each cost
    more than the pong itself. Its effects are those of the command path: the PONG wait is
    cancelled and the frame is counted as a client_pong."""
    async with Harness(make_config(ping_interval=0.2, pong_timeout=5.0)) as h:
        client = await h.client()
        await client.wait(lambda m: m == {}, timeout=2)
        actor: Any = actor_of(client.ref)
        assert actor._pong_pending and Timer.PONG in actor._timers
        assert actor.on_receive(Frame(b"{}")) is None  # no coroutine: nothing to await
        assert not actor._pong_pending and Timer.PONG not in actor._timers
        assert h.node.metrics.transport("websocket").received["client_pong"] == 1
        # a pong nobody asked for still takes the command path and is refused
        late = actor.on_receive(Frame(b"{}"))
        assert asyncio.iscoroutine(late)
        await late
        assert (await client.closed())[0] == 3501


async def test_unexpected_pong_is_bad_request() -> None:
    async with Harness(make_config()) as h:
        client = await h.client()
        client.send({})
        assert (await client.closed())[0] == 3501


async def test_slow_client_is_disconnected() -> None:
    async with Harness(make_config(client_queue_max_size=2000)) as h:
        client = await h.client()
        await client.call("subscribe", {"channel": "news"})
        client.transport.write = lambda messages: asyncio.sleep(10)  # type: ignore[method-assign]
        for _ in range(100):
            await h.node.publish("news", b'{"payload":"' + b"x" * 100 + b'"}')
        assert (await client.closed())[0] == 3008


async def test_server_side_subscription_from_token_channels() -> None:
    async with Harness(make_config()) as h:
        client = Client(h.ctx)
        token = make_token(SECRET, "7", 60, extra={"channels": ["h:srv"]})
        result = (await client.call("connect", {"token": token}))["connect"]
        assert "h:srv" in result["subs"]
        await h.node.publish("h:srv", b'{"a":1}')
        pub = await client.wait(lambda m: "push" in m)
        assert pub["push"] == {"channel": "h:srv", "pub": {"data": {"a": 1}, "offset": 1}}


async def test_connection_expires_without_refresh() -> None:
    config = make_config(client_expired_close_delay=0.0)
    async with Harness(config) as h:
        client = Client(h.ctx)
        token = make_token(SECRET, "1", 1)
        await client.call("connect", {"token": token})
        assert (await client.closed(timeout=4))[0] == 3005


async def test_refresh_extends_connection() -> None:
    async with Harness(make_config()) as h:
        client = Client(h.ctx)
        await client.call("connect", {"token": make_token(SECRET, "1", 30)})
        reply = await client.call("refresh", {"token": make_token(SECRET, "1", 600)})
        assert reply["refresh"]["expires"] and reply["refresh"]["ttl"] > 500
        client.send({"refresh": {"token": make_token(SECRET, "other", 600)}})
        assert (await client.closed())[0] == 3500


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    plan=st.lists(
        st.tuples(st.sampled_from(["h:a", "h:b", "news"]), st.integers(0, 3)),
        min_size=1,
        max_size=60,
    ),
    subscribers=st.integers(1, 4),
)
def test_every_subscriber_sees_each_channel_in_order_without_gaps(
    plan: list[tuple[str, int]], subscribers: int
) -> None:
    """Concurrent publishers (grouped into waves) on several channels: each subscriber
    receives, per channel, exactly the publications in publish-commit order."""
    asyncio.run(_ordering_scenario(plan, subscribers))


async def _ordering_scenario(plan: list[tuple[str, int]], subscribers: int) -> None:
    async with Harness(make_config()) as h:
        channels = ["h:a", "h:b", "news"]
        clients = [await h.client() for _ in range(subscribers)]
        for client in clients:
            for ch in channels:
                await client.call("subscribe", {"channel": ch, "positioned": ch != "news"})
        sent: dict[str, list[int]] = {ch: [] for ch in channels}
        waves: dict[int, list[tuple[str, int]]] = {}
        for seq, (ch, wave) in enumerate(plan):
            waves.setdefault(wave, []).append((ch, seq))
        for wave in sorted(waves):
            await asyncio.gather(
                *(h.node.publish(ch, b'{"seq":%d}' % seq) for ch, seq in waves[wave])
            )
        for ch, _ in plan:
            sent[ch].append(0)
        for client in clients:
            for ch in channels:
                want = len(sent[ch])
                if want:
                    await client.wait(lambda m, c=client, ch=ch, n=want: len(c.pubs(ch)) >= n)
                pubs = client.pubs(ch)
                assert len(pubs) == want
                if ch != "news":
                    assert [p["offset"] for p in pubs] == list(range(1, want + 1))


@pytest.mark.parametrize("channel", ["h:x", "news"])
async def test_unsubscribe_stops_delivery(channel: str) -> None:
    async with Harness(make_config()) as h:
        client = await h.client()
        await client.call("subscribe", {"channel": channel})
        await client.call("unsubscribe", {"channel": channel})
        await h.node.publish(channel, b"{}")
        marker = await client.call("presence_stats", {"channel": "h:x"})
        assert "presence_stats" in marker
        assert client.pubs(channel) == []


async def test_personal_single_connection_disconnects_the_older_one() -> None:
    async with Harness(make_config(user_personal_single_connection=True)) as h:
        first = await h.client({"token": make_token(SECRET, "u1", 60)})
        second = await h.client({"token": make_token(SECRET, "u1", 60)})
        assert (await first.closed())[0] == 3504
        assert second.transport.closed is None


async def test_user_connection_limit() -> None:
    async with Harness(make_config(client_user_connection_limit=1)) as h:
        await h.client({"token": make_token(SECRET, "u2", 60)})
        extra = Client(h.ctx)
        extra.send({"connect": {"token": make_token(SECRET, "u2", 60)}})
        assert (await extra.closed())[0] == 3504


async def test_position_check_detects_a_lost_publication() -> None:
    config = make_config(
        client_presence_update_interval=0.05, client_channel_position_check_delay=0.0
    )
    async with Harness(config) as h:
        client = await h.client()
        await client.call("subscribe", {"channel": "h:pos", "positioned": True})
        h.hub.deliver = lambda *args: None  # type: ignore[method-assign]  # fan-out drops
        await h.node.publish("h:pos", b"{}")
        push = await client.wait(lambda m: "unsubscribe" in m.get("push", {}), timeout=3)
        assert push["push"] == {
            "channel": "h:pos",
            "unsubscribe": {"code": 2500, "reason": "insufficient state"},
        }


async def test_position_check_passes_when_delivery_keeps_up() -> None:
    config = make_config(
        client_presence_update_interval=0.05, client_channel_position_check_delay=0.0
    )
    h = Harness(config)
    presence = h.node.presence_manager = CountingPresence()
    async with h:
        client = await h.client()
        await client.call("subscribe", {"channel": "h:ok", "positioned": True})
        for n in range(1, 6):
            await h.node.publish("h:ok", b"{}")
            await client.wait(lambda m, n=n: m.get("push", {}).get("pub", {}).get("offset") == n)
            # two more ticks: the position check of a whole tick ran after this publication
            ticks = presence.adds
            await eventually(lambda t=ticks: presence.adds >= t + 2, 3, "two ticks")
        assert not any("unsubscribe" in m.get("push", {}) for m in client.transport.messages)


async def test_only_subscriptions_with_periodic_work_make_their_connection_tick() -> None:
    config = make_config(
        client_presence_update_interval=0.02, client_channel_position_check_delay=0.0
    )
    async with Harness(config) as h:
        client = await h.client()
        await client.call("subscribe", {"channel": "news"})  # no presence, not positioned
        actor = client.ref.actor_inbox._actor  # type: ignore[attr-defined]
        assert Timer.TICK not in actor._timers
        work: list[float] = []
        original = actor._periodic_work
        actor._periodic_work = lambda now: work.append(now) or original(now)
        await client.call("subscribe", {"channel": "h:pos", "positioned": True})
        assert Timer.TICK in actor._timers
        await eventually(lambda: len(work) >= 2, 3, "ticks with a positioned subscription")
        await client.call("unsubscribe", {"channel": "h:pos"})
        await eventually(lambda: Timer.TICK not in actor._timers, 3, "the ticks to stop")
        ticked = len(work)
        await asyncio.sleep(0.1)  # five intervals
        assert len(work) == ticked
        assert client.transport.closed is None


async def test_binary_publication_disconnects_json_client_with_3506() -> None:
    async with Harness(make_config()) as h:
        client = await h.client()
        await client.call("subscribe", {"channel": "news"})
        await h.node.publish("news", b"\x00\xffbinary")
        assert (await client.closed())[0] == 3506


def test_ttl_of_a_far_expiry_fits_the_protocols_uint32() -> None:
    from centripy.actors.connection import _ttl

    now = time.time()
    assert _ttl(0, now) == 0
    assert _ttl(now - 5, now) == 1
    assert _ttl(now + 30.5, now) == 30
    assert _ttl(now + 10**12, now) == 2**32 - 1  # a token expiring in ~30,000 years


@pytest.mark.parametrize(
    ("replies", "exc", "expected"),
    [
        (CONNECT_TOKEN, auth.JWKSFetchError(), Error.of(100)),
        (CONNECT_TOKEN, auth.TokenExpired(), Error.of(109)),
        (CONNECT_TOKEN, auth.InvalidToken(), Disconnect.of(3500)),
        (SUBSCRIPTION_TOKEN, auth.JWKSFetchError(), Error.of(100)),
        (SUBSCRIPTION_TOKEN, auth.TokenExpired(), Error.of(109)),
        (SUBSCRIPTION_TOKEN, auth.InvalidToken(), Error.of(103)),
        (REFRESH_TOKEN, auth.JWKSFetchError(), Error.of(100)),
        (REFRESH_TOKEN, auth.TokenExpired(), Disconnect.of(3005)),
        (REFRESH_TOKEN, auth.InvalidToken(), Disconnect.of(3500)),
    ],
)
def test_token_failure_maps_each_use(
    replies: TokenReplies, exc: Exception, expected: Error | Disconnect
) -> None:
    assert token_failure(exc, replies) == expected  # same class, code and message


async def test_recovering_subscribers_share_a_read_started_after_they_joined() -> None:
    """A reconnect storm: subscribes that come while a recovery read of the channel is in
    flight share the next read (one log read for them all), and still see every offset
    once, in order: the read in flight, taken before their join, is never theirs."""
    async with Harness(make_config()) as h:
        await _publish_many(h, "h:storm", 0, 5)
        clients = [await h.client() for _ in range(3)]
        read = h.log.history_many
        reads: list[Any] = []
        taken, release = asyncio.Event(), asyncio.Event()

        async def gated_history_many(queries: Any) -> Any:
            result = await read(queries)  # the snapshot is taken now
            reads.append(queries)
            if len(reads) == 1:
                taken.set()
                await release.wait()
            return result

        h.log.history_many = gated_history_many  # type: ignore[method-assign]
        recover = {"channel": "h:storm", "recoverable": True, "recover": True, "offset": 2}
        ids = [c.send({"subscribe": recover})[0] for c in clients[:1]]
        await asyncio.wait_for(taken.wait(), 3)
        ids += [c.send({"subscribe": recover})[0] for c in clients[1:]]
        await eventually(lambda: _waiting(h) == 2, 3, "two queued")
        await _publish_many(h, "h:storm", 5, 8)  # after every join, after the first snapshot
        release.set()
        for client, cmd_id in zip(clients, ids, strict=True):
            reply = await client.wait(lambda m, i=cmd_id: m.get("id") == i)
            assert reply["subscribe"]["recovered"]
        await _publish_many(h, "h:storm", 8, 9)
        seen = []
        for client, cmd_id in zip(clients, ids, strict=True):
            await client.wait(lambda m: "push" in m and m["push"]["pub"]["offset"] == 9)
            reply = next(m for m in client.transport.messages if m.get("id") == cmd_id)
            recovered = [p["offset"] for p in reply["subscribe"]["publications"]]
            seen.append((recovered, [p["offset"] for p in client.pubs("h:storm")]))
        assert seen[0] == ([3, 4, 5], [6, 7, 8, 9])
        assert seen[1] == seen[2] == ([3, 4, 5, 6, 7, 8], [9])
        assert len(reads) == 2  # three recovering subscribes, two log reads


def _waiting(h: Harness) -> int:
    return sum(len(waiters.futures) for waiters in h.ctx.reads._waiting.values())
