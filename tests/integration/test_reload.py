"""SIGHUP reload through a real server process (issue 18 item 3): a namespace added to the
file is usable after SIGHUP by a client connected before it, without any connection being
dropped; a new HMAC secret applies to new connections; a broken file keeps the old config;
keys that cannot change at runtime are logged as ignored."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from typing import Any

import pytest
import websockets

from tests.integration.conftest import TokenMaker
from tests.support.server import ServerFactory, ServerProcess
from tests.support.wait import eventually

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

OPEN = {"allow_subscribe_for_client": True, "allow_publish_for_client": True}
UNKNOWN_CHANNEL = 102
RELOADED = "configuration successfully reloaded"
REFUSED = "error reloading configuration, keeping the running one"


class Client:
    """A JSON-protocol WebSocket client: `call` returns the reply of one command; pushes are
    kept in `pushes`; pings are answered; `closed` is set when the server closes."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.next_id = 0
        self.replies: dict[int, dict[str, Any]] = {}
        self.pushes: list[dict[str, Any]] = []
        self.changed = asyncio.Event()
        self.close_code: int | None = None
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def open(cls, server: ServerProcess, token: str) -> tuple[Client, dict[str, Any]]:
        client = cls(await websockets.connect(server.ws_url))
        return client, await client.call("connect", {"token": token}, allow_close=True)

    async def _read(self) -> None:
        try:
            async for message in self.ws:
                for line in message.splitlines():
                    if line.strip() in ("", "{}"):
                        await self.ws.send("{}")  # pong
                        continue
                    item = json.loads(line)
                    if "id" in item:
                        self.replies[item["id"]] = item
                    else:
                        self.pushes.append(item["push"])
                    self.changed.set()
        except websockets.exceptions.ConnectionClosed:
            pass
        self.close_code = self.ws.close_code
        self.changed.set()

    async def call(
        self, method: str, params: dict[str, Any], *, allow_close: bool = False
    ) -> dict[str, Any]:
        self.next_id += 1
        ident = self.next_id
        await self.ws.send(json.dumps({"id": ident, method: params}))
        done = await eventually(
            lambda: ident in self.replies or (allow_close and self.close_code is not None),
            10,
            f"reply to {method}",
            changed=self.changed,
        )
        assert done
        return self.replies.pop(ident, {"closed": self.close_code})

    def publications(self, channel: str) -> list[Any]:
        return [p["pub"]["data"] for p in self.pushes if p.get("channel") == channel and "pub" in p]

    async def close(self) -> None:
        await self.ws.close()
        self._reader.cancel()


def _rewrite(server: ServerProcess, config: dict[str, Any] | str) -> None:
    """Replace the server's config file (atomically, as an editor or deploy tool would)."""
    text = config if isinstance(config, str) else json.dumps(config, indent=2)
    tmp = server.config_path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, server.config_path)


async def _sighup(server: ServerProcess, expect: str, count: int) -> str:
    """Send SIGHUP and wait for the `count`-th log line containing `expect`; the log text."""
    assert server.pid is not None
    os.kill(server.pid, signal.SIGHUP)

    def log_text() -> str:
        text = server.stderr_path.read_text(errors="replace")
        return text if text.count(expect) >= count else ""

    return await eventually(log_text, 10, f"log line {expect!r} #{count}", interval=0.05)


async def test_sighup_adds_a_namespace_without_dropping_connections(
    server_factory: ServerFactory, make_token: TokenMaker
) -> None:
    config = {"namespaces": [{"name": "chat", **OPEN}]}
    server = server_factory(config)
    alice, reply = await Client.open(server, make_token("alice"))
    assert "connect" in reply, reply
    bob, reply = await Client.open(server, make_token("bob"))
    assert "connect" in reply, reply
    for client in (alice, bob):
        assert "subscribe" in await client.call("subscribe", {"channel": "chat:room"})
    refused = await alice.call("subscribe", {"channel": "news:today"})
    assert refused["error"]["code"] == UNKNOWN_CHANNEL, refused

    # add a namespace, and change keys that need a restart
    new = {
        **server.config,
        "namespaces": [{"name": "chat", **OPEN}, {"name": "news", **OPEN}],
        "database_url": "sqlite+aiosqlite:///elsewhere.db",
        "allowed_origins": ["https://example.com"],
    }
    _rewrite(server, new)
    log = await _sighup(server, RELOADED, 1)
    assert "ignored until restart: database_url, allowed_origins" in log, log

    # alice, connected before the reload, subscribes to the new namespace
    assert "subscribe" in await alice.call("subscribe", {"channel": "news:today"})
    await server.api_async("publish", {"channel": "news:today", "data": {"n": 1}})
    await server.api_async("publish", {"channel": "chat:room", "data": {"n": 2}})
    await eventually(lambda: alice.publications("news:today") == [{"n": 1}], 10, "news push")
    for client in (alice, bob):
        await eventually(
            lambda c=client: c.publications("chat:room") == [{"n": 2}], 10, "chat push"
        )
    carol, reply = await Client.open(server, make_token("carol"))
    assert "connect" in reply, reply
    assert "subscribe" in await carol.call("subscribe", {"channel": "news:tomorrow"})

    # a file that does not parse, then one that parses but is invalid: both refused
    _rewrite(server, '{"namespaces": [')
    log = await _sighup(server, REFUSED, 1)
    assert "invalid JSON" in log.split(REFUSED, 1)[1], log
    broken = {
        **server.config,
        "namespaces": [
            {"name": "chat", **OPEN},
            {"name": "sports", **OPEN},
            {"name": "bad", "history_size": 10},  # history_size without history_ttl
        ],
    }
    _rewrite(server, broken)
    log = await _sighup(server, REFUSED, 2)
    assert '"namespaces[2].history_size"' in log.split(REFUSED)[2], log
    assert server.running
    # the config of the last good reload is still in effect
    assert "subscribe" in await bob.call("subscribe", {"channel": "news:today"})
    refused = await bob.call("subscribe", {"channel": "sports:final"})
    assert refused["error"]["code"] == UNKNOWN_CHANNEL, refused

    # nobody was disconnected by any of it
    await server.api_async("publish", {"channel": "chat:room", "data": {"n": 3}})
    for client in (alice, bob):
        await eventually(
            lambda c=client: c.publications("chat:room") == [{"n": 2}, {"n": 3}], 10, "push"
        )
        assert client.close_code is None
    assert not [p for c in (alice, bob, carol) for p in c.pushes if "disconnect" in p]
    for client in (alice, bob, carol):
        await client.close()


async def test_sighup_applies_a_new_hmac_secret_to_new_connections(
    server_factory: ServerFactory, make_token: TokenMaker
) -> None:
    server = server_factory({"token_hmac_secret_key": "old-secret", **OPEN})
    early, reply = await Client.open(server, make_token("early", secret="old-secret"))
    assert "connect" in reply, reply

    _rewrite(server, {**server.config, "token_hmac_secret_key": "new-secret"})
    log = await _sighup(server, RELOADED, 1)
    assert "token_hmac_secret_key" in log and "new-secret" not in log

    stale, reply = await Client.open(server, make_token("late", secret="old-secret"))
    assert reply == {"closed": 3500}, reply  # disconnect: invalid token
    fresh, reply = await Client.open(server, make_token("late", secret="new-secret"))
    assert "connect" in reply, reply
    # the connection made with the old secret stays and keeps working
    assert "subscribe" in await early.call("subscribe", {"channel": "room"})
    await server.api_async("publish", {"channel": "room", "data": {"n": 1}})
    await eventually(lambda: early.publications("room") == [{"n": 1}], 10, "push")
    assert early.close_code is None
    for client in (early, stale, fresh):
        await client.close()


async def test_sighup_with_the_file_gone_keeps_running(server_factory: ServerFactory) -> None:
    server = server_factory({"namespaces": [{"name": "chat", **OPEN}]})
    server.config_path.unlink()
    log = await _sighup(server, REFUSED, 1)
    assert "config file not found" in log.split(REFUSED, 1)[1], log
    assert server.running
    assert "error" not in await server.api_async("publish", {"channel": "chat:x", "data": {}})
