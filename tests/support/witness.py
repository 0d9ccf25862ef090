"""A witness client for the hostile-client tests: a plain JSON WebSocket client subscribed to
one channel, which must keep receiving every publication in order while an attacker works
on the same server.

Use it from an async test: `async with Witness(server.ws_url, "witness") as w:` subscribes;
`await w.check(server, n)` publishes `n` messages through the server API (in a worker
thread) and asserts that exactly those arrive, in order, within `timeout` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any, Protocol

import websockets

from tests.support.wait import eventually


class _Api(Protocol):
    def api_result(self, method: str, payload: dict[str, Any] | None = None) -> dict[str, Any]: ...


class Witness:
    def __init__(self, ws_url: str, channel: str) -> None:
        self.ws_url = ws_url
        self.channel = channel
        self.received: list[Any] = []
        self._ws: Any = None
        self._reader: asyncio.Task[None] | None = None
        self._sent = 0
        self._arrived = asyncio.Event()

    async def __aenter__(self) -> Witness:
        self._ws = await websockets.connect(self.ws_url, max_size=None)
        await self._ws.send(json.dumps({"id": 1, "connect": {}}))
        await self._ws.send(json.dumps({"id": 2, "subscribe": {"channel": self.channel}}))
        pending = {1, 2}
        while pending:
            for line in (await asyncio.wait_for(self._ws.recv(), 10)).splitlines():
                reply = json.loads(line)
                assert "error" not in reply, reply
                pending.discard(reply.get("id"))
        self._reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._reader is not None:
            self._reader.cancel()
        await self._ws.close()

    async def _read(self) -> None:
        async for message in self._ws:
            for line in message.splitlines():
                if not line.strip():
                    await self._ws.send("{}")  # pong
                    continue
                push = json.loads(line).get("push", {})
                if push.get("channel") == self.channel and "pub" in push:
                    self.received.append(push["pub"]["data"])
                    self._arrived.set()

    async def check(self, server: _Api, n: int, timeout: float = 10.0) -> None:
        """Publish `n` numbered messages and assert the witness got each once, in order."""
        first = self._sent
        for i in range(first, first + n):
            await asyncio.to_thread(
                server.api_result, "publish", {"channel": self.channel, "data": {"n": i}}
            )
        self._sent += n
        expected = [{"n": i} for i in range(self._sent)]
        with contextlib.suppress(AssertionError):  # the assert below shows what is missing
            await eventually(
                lambda: len(self.received) >= self._sent, timeout, changed=self._arrived
            )
        assert self.received == expected
