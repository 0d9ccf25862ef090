"""Crash containment (issue 15, item 3): a failure costs one command or one connection,
never a zombie connection or a dead channel actor behind a committed publication."""

from __future__ import annotations

import asyncio
import base64
from typing import Any

from centripy.actors.channel import ChannelActor, RemoveSubscriber
from centripy.actors.connection_core import Timer, frames_waiting, tell_frame
from centripy.actors.hub import ServerSubscribeMsg
from centripy.engine.auth import make_token
from centripy.engine.sessions import ServerSubscribe
from tests.actors.harness import (
    SECRET,
    BlockingPresence,
    Client,
    FailingPresence,
    Harness,
    make_config,
)
from tests.support.wait import eventually


def _outage_harness(**config: Any) -> tuple[Harness, FailingPresence]:
    h = Harness(make_config(**config))
    presence = FailingPresence()
    h.node.presence_manager = presence
    return h, presence


async def test_storage_errors_are_error_100_replies_and_the_connection_goes_on() -> None:
    h, presence = _outage_harness()
    async with h:
        client = await h.client()
        presence.down = True
        for method in ("presence", "presence_stats"):
            reply = await client.call(method, {"channel": "h:room"})
            assert reply["error"]["code"] == 100
        reply = await client.call("subscribe", {"channel": "h:room"})  # presence on: add fails
        assert reply["error"]["code"] == 100
        presence.down = False
        reply = await client.call("subscribe", {"channel": "h:room"})  # no half state left
        assert "subscribe" in reply
        assert client.transport.closed is None


async def test_presence_refresh_failure_keeps_the_connection() -> None:
    h, presence = _outage_harness(client_presence_update_interval=0.05)
    async with h:
        client = await h.client()
        await client.call("subscribe", {"channel": "h:room"})
        presence.down = True
        await eventually(lambda: presence.failures >= 3, 3, "three failed presence updates")
        assert client.transport.closed is None
        presence.down = False
        await h.node.publish("h:room", b'{"n":1}')
        await client.wait(lambda m: "pub" in m.get("push", {}))


async def test_an_escaping_exception_closes_only_that_connection_and_releases_it() -> None:
    async with Harness(make_config()) as h:
        victim = await h.client()
        witness = await h.client()
        await victim.call("subscribe", {"channel": "news"})
        await witness.call("subscribe", {"channel": "news"})
        client_id = victim.transport.messages[0]["connect"]["client"]
        assert h.hub.stats().num_clients == 2

        actor = victim.ref.actor_inbox._actor  # type: ignore[attr-defined]

        def boom() -> None:
            raise RecursionError("a bug deep in a handler")

        actor._on_timer = lambda kind: boom()  # the next timer message fails
        actor._set_timer(Timer.TICK, 0)
        code, reason = await victim.closed()
        assert (code, reason) == (3004, "internal server error")
        assert not victim.ref.is_alive()
        assert h.hub.stats().num_clients == 1
        assert client_id not in [c.client_id for c in h.hub.matching("", client_id, "")]
        assert h.hub.stats().num_subs == 1  # only the witness is subscribed now
        await h.node.publish("news", b'{"n":1}')
        await witness.wait(lambda m: "pub" in m.get("push", {}))


async def test_channel_actor_survives_a_failing_message() -> None:
    async with Harness(make_config()) as h:
        client = await h.client()
        await client.call("subscribe", {"channel": "news"})
        ref = h.hub._channels["news"]
        ref.tell(RemoveSubscriber(["unhashable"]))  # type: ignore[arg-type]  # poison
        await h.node.publish("news", b'{"n":1}')
        await client.wait(lambda m: "pub" in m.get("push", {}))
        # the publication was handled after the poison, by the same actor (not a replacement)
        assert ref.is_alive() and h.hub._channels["news"] is ref


async def test_a_stopped_channel_actor_is_replaced_with_its_subscribers() -> None:
    async with Harness(make_config()) as h:
        client = await h.client()
        await client.call("subscribe", {"channel": "h:news"})
        old = h.hub._channels["h:news"]
        old.actor_inbox._actor._handle_failure(None, None, None)  # type: ignore[attr-defined]
        assert not old.is_alive()
        result = await h.node.publish("h:news", b'{"n":1}')  # committed and delivered, no 100
        assert result.offset == 1
        pub = await client.wait(lambda m: "pub" in m.get("push", {}))
        assert pub["push"]["pub"]["data"] == {"n": 1}
        new = h.hub._channels["h:news"]
        assert new.is_alive() and new is not old
        assert isinstance(new.actor_inbox._actor, ChannelActor)  # type: ignore[attr-defined]


async def test_frames_waiting_are_counted_and_reading_resumes_at_half() -> None:
    h = Harness(make_config(client_max_pending_frames=8))
    presence = BlockingPresence()
    h.node.presence_manager = presence
    async with h:
        client = await h.client()
        resumed: list[int] = []
        client.transport.resume_reading = lambda: resumed.append(  # type: ignore[attr-defined]
            frames_waiting(client.ref)
        )
        frame = b'{"id":7,"presence_stats":{"channel":"h:room"}}'
        counts = [tell_frame(client.ref, frame) for _ in range(12)]
        assert counts == list(range(1, 13))  # the transport pauses when this reaches 8
        await asyncio.sleep(0.05)
        assert frames_waiting(client.ref) == 11  # the first is being handled (blocked)
        presence.release.set()
        await client.wait(
            lambda m: sum(1 for x in client.transport.messages if x.get("id") == 7) == 12
        )
        assert frames_waiting(client.ref) == 0
        assert resumed == [4]  # once, when the waiting frames came down to half the bound


async def test_server_api_subscribe_respects_client_channel_limit() -> None:
    async with Harness(make_config(client_channel_limit=2)) as h:
        client = await h.client()
        await client.call("subscribe", {"channel": "a"})
        client.ref.tell(ServerSubscribeMsg(ServerSubscribe(user="", channel="b")))
        await client.wait(lambda m: m.get("push", {}).get("channel") == "b")
        client.ref.tell(ServerSubscribeMsg(ServerSubscribe(user="", channel="c")))
        await client.call("presence_stats", {"channel": "x"})  # a round trip after it
        pushes = [m for m in client.transport.messages if "push" in m]
        assert [m["push"]["channel"] for m in pushes] == ["b"]
        assert h.hub.stats().num_subs == 2


async def test_poison_tokens_in_connect_and_refresh_close_with_3500() -> None:
    """A token whose header is deeply nested JSON (RecursionError in a naive parser)."""
    header = base64.urlsafe_b64encode(b"[" * 100_000).rstrip(b"=").decode()
    poison = f"{header}.e30.c2ln"
    async with Harness(make_config(allow_anonymous_connect_without_token=False)) as h:
        victim = Client(h.ctx)
        victim.send({"connect": {"token": poison}})
        assert (await victim.closed())[0] == 3500
        user = await h.client({"token": make_token(SECRET, "u1", 60)})
        user.send({"refresh": {"token": poison}})
        assert (await user.closed())[0] == 3500
        assert h.hub.stats().num_clients == 0
