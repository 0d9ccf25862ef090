"""Hostile reads through a real server process (issue 15): reading random channel names
(history, positioned and recovering subscribe) stores nothing in the SQLite event log, bad
channel names get 107 on client commands and on the server API, and a witness subscriber
keeps receiving every publication in order meanwhile. A subscriber positioned on a channel
before its first publication continues with it (the read reported the epoch it gets)."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import uuid
from pathlib import Path
from typing import Any

import pytest
import websockets

from tests.integration.conftest import TokenMaker
from tests.support.server import ServerFactory, ServerProcess
from tests.support.wait import eventually

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

OPEN = {
    "history_size": 1000,
    "history_ttl": "600s",
    "force_recovery": True,
    "presence": True,
    "allow_subscribe_for_client": True,
    "allow_subscribe_for_anonymous": True,
    "allow_publish_for_client": True,
    "allow_publish_for_anonymous": True,
    "allow_history_for_client": True,
    "allow_history_for_anonymous": True,
    "allow_presence_for_client": True,
    "allow_presence_for_anonymous": True,
}
BAD_REQUEST = {"code": 107, "message": "bad request"}
TOO_LONG = "log:" + "a" * 300
NOT_MATCHING = "strict:Upper-Case"
NON_ASCII = "log:привет"


def _config(db: Path) -> dict[str, Any]:
    return {
        "database_url": f"sqlite+aiosqlite:///{db}",
        "namespaces": [
            {"name": "log", **OPEN},
            {"name": "strict", **OPEN, "channel_regex": "^[a-z0-9]+$"},
        ],
        "allow_anonymous_connect_without_token": True,
        "client_presence_update_interval": "1s",
        "client_channel_position_check_delay": "1s",
    }


def _stored_channels(db: Path) -> tuple[set[str], set[str]]:
    """(channels with a streams row, channels with publications) in the SQLite file."""
    conn = sqlite3.connect(db)
    try:
        streams = {row[0] for row in conn.execute("SELECT channel FROM centripy_streams")}
        query = "SELECT DISTINCT channel FROM centripy_publications"
        pubs = {row[0] for row in conn.execute(query)}
    finally:
        conn.close()
    return streams, pubs


class Client:
    """A JSON-protocol WebSocket client: `call` sends commands in one frame and returns
    their replies by id; pushes are kept in `pushes`; pings are answered."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.next_id = 0
        self.replies: dict[int, dict[str, Any]] = {}
        self.pushes: list[dict[str, Any]] = []
        self.changed = asyncio.Event()  # set on every reply or push
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def open(cls, server: ServerProcess, connect: dict[str, Any] | None = None) -> Client:
        client = cls(await websockets.connect(server.ws_url, max_size=None))
        (reply,) = await client.call(("connect", connect or {}))
        assert "error" not in reply, reply
        return client

    async def _read(self) -> None:
        async for message in self.ws:
            for line in message.splitlines():
                if not line.strip() or line.strip() == "{}":
                    await self.ws.send("{}")  # pong
                    continue
                item = json.loads(line)
                if "id" in item:
                    self.replies[item["id"]] = item
                else:
                    self.pushes.append(item["push"])
                self.changed.set()

    async def call(self, *commands: tuple[str, dict[str, Any]]) -> list[dict[str, Any]]:
        ids = []
        frame = []
        for method, params in commands:
            self.next_id += 1
            ids.append(self.next_id)
            frame.append(json.dumps({"id": self.next_id, method: params}))
        await self.ws.send("\n".join(frame))
        await eventually(
            lambda: all(i in self.replies for i in ids), 10, "replies", changed=self.changed
        )
        return [self.replies.pop(i) for i in ids]

    def publications(self, channel: str) -> list[dict[str, Any]]:
        return [p["pub"] for p in self.pushes if p.get("channel") == channel and "pub" in p]

    async def close(self) -> None:
        self._reader.cancel()
        await self.ws.close()


async def _publish_all(server: ServerProcess, channel: str, count: int) -> list[int]:
    offsets = []
    for n in range(count):
        result = (await server.api_async("publish", {"channel": channel, "data": {"n": n}}))[
            "result"
        ]
        offsets.append(result["offset"])
        await asyncio.sleep(0.005)
    return offsets


async def test_reads_of_random_channels_store_nothing_and_bad_names_are_refused(
    server_factory: ServerFactory, tmp_path: Path, make_token: TokenMaker
) -> None:
    db = tmp_path / "reads.db"
    server = server_factory(_config(db))
    witness_channel = "log:witness"
    witness = await Client.open(server)
    (sub,) = await witness.call(("subscribe", {"channel": witness_channel}))
    assert "error" not in sub, sub
    publisher = asyncio.create_task(_publish_all(server, witness_channel, 120))

    attacker = await Client.open(server)
    channels = [f"log:rnd-{uuid.uuid4().hex}" for _ in range(200)]
    epochs: dict[str, str] = {}
    for i, channel in enumerate(channels):
        recover: dict[str, Any] = {"channel": channel, "recover": True}
        if i % 2:
            recover |= {"offset": 1000 + i, "epoch": "AbCdEfGh"}
        history, stale, subscribed, _ = await attacker.call(
            ("history", {"channel": channel, "limit": -1}),
            ("history", {"channel": channel, "limit": 5, "since": {"offset": 3, "epoch": "zz"}}),
            ("subscribe", recover),
            ("unsubscribe", {"channel": channel}),
        )
        assert history["history"].get("offset", 0) == 0 and not history["history"].get(
            "publications"
        )
        assert stale["error"]["code"] == 112  # unrecoverable position
        result = subscribed["subscribe"]
        assert result.get("offset", 0) == 0 and result["epoch"] == history["history"]["epoch"]
        assert bool(result.get("recovered")) is (i % 2 == 0)
        epochs[channel] = result["epoch"]
    for channel in channels[:50]:
        read = await server.api_async("history", {"channel": channel, "limit": 10})
        assert read["result"]["epoch"] == epochs[channel]
        stats = await server.api_async("presence_stats", {"channel": channel})
        assert stats["result"] == {"num_clients": 0, "num_users": 0}

    # bad names: client commands
    for bad in (TOO_LONG, NOT_MATCHING, NON_ASCII):
        replies = await attacker.call(
            ("subscribe", {"channel": bad}),
            ("publish", {"channel": bad, "data": {"x": 1}}),
            ("history", {"channel": bad, "limit": -1}),
            ("presence", {"channel": bad}),
            ("presence_stats", {"channel": bad}),
        )
        assert [r.get("error") for r in replies] == [BAD_REQUEST] * 5, (bad, replies)
    await attacker.close()
    for connect in (
        {"subs": {TOO_LONG: {"recover": True}}},
        {"token": make_token("u1", channels=[TOO_LONG])},
        {"token": make_token("u1", subs={NOT_MATCHING: {}})},
    ):
        conn = Client(await websockets.connect(server.ws_url))
        (reply,) = await conn.call(("connect", connect))
        assert reply.get("error") == BAD_REQUEST, (connect, reply)
        await conn.close()

    # bad names: the server API
    for bad in (TOO_LONG, NOT_MATCHING):
        for method, params in (
            ("publish", {"data": {"x": 1}}),
            ("subscribe", {"user": "u1"}),
            ("unsubscribe", {"user": "u1"}),
            ("presence", {}),
            ("presence_stats", {}),
            ("history", {"limit": -1}),
            ("history_remove", {}),
        ):
            reply = await server.api_async(method, {"channel": bad, **params})
            assert reply == {"error": BAD_REQUEST}, (method, bad, reply)
    broadcast = await server.api_async(
        "broadcast", {"channels": [TOO_LONG, NOT_MATCHING], "data": {"x": 1}}
    )
    assert broadcast["result"]["responses"] == [{"error": BAD_REQUEST}] * 2
    # without channel_regex, the server API keeps Centrifugo's acceptance of non-ASCII names
    assert "error" not in await server.api_async("history", {"channel": NON_ASCII})

    offsets = await publisher
    assert offsets == list(range(1, 121))
    await eventually(
        lambda: len(witness.publications(witness_channel)) == 120, 10, changed=witness.changed
    )
    received = witness.publications(witness_channel)
    assert [p["data"]["n"] for p in received] == list(range(120))
    assert [p["offset"] for p in received] == offsets
    assert not [p for p in witness.pushes if "unsubscribe" in p]
    await witness.close()

    streams, pubs = _stored_channels(db)
    assert streams == {witness_channel} and pubs == {witness_channel}

    # the epoch those reads reported is the one the first publication gets
    first = await server.api_async("publish", {"channel": channels[0], "data": {"n": 0}})
    assert first["result"] == {"offset": 1, "epoch": epochs[channels[0]]}


async def test_subscriber_positioned_before_the_first_publication_continues(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    db = tmp_path / "fresh.db"
    server = server_factory(_config(db))
    channel = f"log:fresh-{uuid.uuid4().hex[:8]}"
    client = await Client.open(server)
    (sub,) = await client.call(("subscribe", {"channel": channel}))
    result = sub["subscribe"]
    assert result["recoverable"] is True and result.get("offset", 0) == 0
    assert _stored_channels(db)[0] == set()
    published = [
        (await server.api_async("publish", {"channel": channel, "data": {"n": n}}))["result"]
        for n in range(3)
    ]
    assert {p["epoch"] for p in published} == {result["epoch"]}
    await eventually(lambda: len(client.publications(channel)) == 3, 10, changed=client.changed)
    await asyncio.sleep(2.5)  # two position checks (client_channel_position_check_delay 1s)
    assert [p["offset"] for p in client.publications(channel)] == [1, 2, 3]
    assert not [p for p in client.pushes if "unsubscribe" in p]
    (state,) = await client.call(("history", {"channel": channel, "limit": 0}))
    assert state["history"]["offset"] == 3 and state["history"]["epoch"] == result["epoch"]
    await client.close()
    recovering = await Client.open(server)
    (again,) = await recovering.call(
        ("subscribe", {"channel": channel, "recover": True, "offset": 0, "epoch": result["epoch"]})
    )
    assert again["subscribe"]["recovered"] is True
    assert [p["offset"] for p in again["subscribe"]["publications"]] == [1, 2, 3]
    await recovering.close()
