"""The SockJS session state machine alone, with a recording receiver, and the pure helpers of
`transports/sockjs.py` and `transports/sockjs_session.py` (the endpoint on a real server:
tests/integration/test_sockjs.py)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

import pytest

from centripy.transports.sockjs import callback_error, htmlfile_prelude, iframe_page, info_body
from centripy.transports.sockjs_session import (
    BadPayload,
    Session,
    SessionState,
    array_frame,
    close_frame,
    parse_messages,
    quote,
)
from tests.actors.harness import BlockingPresence, Harness, make_config
from tests.support.wait import eventually

pytestmark = pytest.mark.timeout(30)


def test_framing_helpers() -> None:
    assert close_frame(3503, "force disconnect") == b'c[3503,"force disconnect"]'
    assert array_frame([b'{"id":1}', b"x\ny"]) == b'a["{\\"id\\":1}","x\\ny"]'
    assert quote("\u2028\u00e9\ufeff") == b'"\\u2028\xc3\xa9\\ufeff"'
    assert quote("</script>&", html=True) == b'"\\u003c/script\\u003e\\u0026"'
    assert json.loads(quote("\u2028<\ud7ff\U0001f600".encode())) == "\u2028<\ud7ff\U0001f600"


def test_parse_messages() -> None:
    assert parse_messages(b'["a","b"]') == ["a", "b"]
    assert parse_messages(b'"one"') == ["one"]
    with pytest.raises(BadPayload, match=r"^Payload expected\.$"):
        parse_messages(b"  ")
    for payload in (b"[", b"[1]", b"{}", b'["a", null]'):
        with pytest.raises(BadPayload, match=r"^Broken JSON encoding\.$"):
            parse_messages(payload)


def test_page_helpers() -> None:
    body, etag = iframe_page('https://x.example/s.js?a=1&b="2"')
    assert b'src="https://x.example/s.js?a=1&amp;b=&quot;2&quot;"' in body
    assert etag.startswith('"') and len(etag) == 34
    prelude = htmlfile_prelude("cb.x")
    assert len(prelude) >= 1024 + 4 and prelude.endswith(b"\r\n\r\n")
    assert b"var c = parent.cb.x;" in prelude
    assert callback_error("") == (500, '"callback" parameter required')
    assert callback_error("a(b)") == (400, 'invalid character in "callback" parameter')
    assert callback_error("_jp.a1") is None
    doc = json.loads(info_body())
    assert doc["websocket"] is True and 0 <= doc["entropy"] < 2**31


class FakeReceiver:
    def __init__(self, limit: int = 1 << 30, final: bool = False) -> None:
        self.on_end: Callable[[bool], None] | None = None
        self.frames: list[bytes] = []
        self.limit = limit
        self.final = final
        self.ended = False

    def send_frame(self, frame: bytes) -> None:
        if not self.ended:
            self.frames.append(frame)
            if len(self.frames) >= self.limit:
                self.close()

    def can_send(self) -> bool:
        return not self.ended

    def close(self) -> None:
        if not self.ended:
            self.ended = True
            on_end, self.on_end = self.on_end, None
            if on_end is not None:
                on_end(self.final)


async def test_session_buffers_until_a_receiver_comes() -> None:
    closed: list[Session] = []
    session = Session("s", heartbeat=0, disconnect_delay=0.05, on_closed=closed.append)
    first = FakeReceiver(limit=1)
    assert session.attach(first)
    assert first.frames == [b"o"] and first.ended
    pending = session.send(b"m1")
    assert isinstance(pending, asyncio.Future) and not pending.done()
    stream = FakeReceiver()
    assert session.attach(stream)
    assert not session.attach(FakeReceiver())  # a second receiver is refused
    assert stream.frames == [b'a["m1"]'] and pending.done()
    assert session.send(b"m2") is None
    assert stream.frames[-1] == b'a["m2"]'
    session.close_with(3001, "shutdown")
    assert stream.frames[-1] == b'c[3001,"shutdown"]' and stream.ended
    late = FakeReceiver()
    assert session.attach(late) and late.frames == [b'c[3001,"shutdown"]']
    with pytest.raises(ConnectionError):
        session.send(b"m3")
    await eventually(lambda: closed, 1.0, "the session closed")
    assert session.state == SessionState.CLOSED and closed == [session]


async def test_session_heartbeat_and_final_receiver() -> None:
    closed: list[Session] = []
    session = Session("s", heartbeat=0.02, disconnect_delay=10, on_closed=closed.append)
    recv = FakeReceiver(final=True)
    assert session.attach(recv)
    await eventually(lambda: recv.frames.count(b"h") >= 2, 1.0, "two heartbeats")
    recv.close()  # e.g. the client dropped the request: the session ends at once
    assert closed == [session] and session.state == SessionState.CLOSED


class DeadActor:
    def is_alive(self) -> bool:
        return False


async def test_session_whose_actor_died_tells_the_client_to_reconnect() -> None:
    session = Session("s", heartbeat=0, disconnect_delay=10)
    session.actor = DeadActor()
    assert not session.accept(["{}"])
    late = FakeReceiver()
    assert session.attach(late)
    assert late.frames == [b'c[3004,"internal server error"]'] and late.ended


async def test_session_saturates_at_the_pending_frame_bound_and_resumes() -> None:
    """A session whose actor has `client_max_pending_frames` frames waiting takes no more
    (xhr_send answers 503, the session WebSocket stops being read) until it resumes."""
    h = Harness(make_config(client_max_pending_frames=4))
    presence = BlockingPresence()
    h.node.presence_manager = presence
    async with h:
        session = Session("s", heartbeat=0, disconnect_delay=10)
        session.start(h.ctx)
        recv = FakeReceiver()
        assert session.attach(recv)
        assert session.accept(['{"id":1,"connect":{}}'])
        await eventually(lambda: len(recv.frames) >= 2, 2.0, "the open frame and the reply")
        stats = '{"id":2,"presence_stats":{"channel":"h:x"}}'
        assert session.accept([stats] * 5)  # the first blocks in the store, 4 wait
        await eventually(lambda: session.saturated(4), 2.0, "the session saturated")
        resumed = session.resumed()
        presence.release.set()
        await asyncio.wait_for(resumed, 2)  # down to half the bound
        assert not session.saturated(4)
        session.close()
