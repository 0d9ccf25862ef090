"""A real application backend for the HTTP event proxies (docs/spec/proxy.md): an aiohttp
server on 127.0.0.1 that the test starts on its own loop. `/connect`, `/refresh`,
`/subscribe`, `/publish`, `/sub_refresh` and `/rpc` answer what the test put in `answers`
(a dict, or a function of the request body returning one, possibly async); each request is
recorded (kind, JSON body, headers, client TCP port) in arrival order.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from tests.support.wait import eventually

KINDS = ("connect", "refresh", "subscribe", "publish", "sub_refresh", "rpc")

Answer = Mapping[str, Any] | Callable[[dict[str, Any]], Any]


@dataclass(frozen=True)
class Recorded:
    kind: str
    body: dict[str, Any]
    headers: Mapping[str, str]  # as received (a CIMultiDictProxy: any case)
    peer_port: int  # the proxy client's TCP port: one per TCP connection


class ProxyBackend:
    def __init__(self) -> None:
        self.answers: dict[str, Answer] = {kind: {"result": {}} for kind in KINDS}
        self.requests: list[Recorded] = []
        self.changed = asyncio.Event()
        self.port = 0
        self._runner: web.AppRunner | None = None

    def url(self, kind: str) -> str:
        return f"http://127.0.0.1:{self.port}/{kind}"

    def of(self, kind: str) -> list[Recorded]:
        return [r for r in self.requests if r.kind == kind]

    async def wait_for(self, kind: str, count: int = 1, within: float = 10.0) -> list[Recorded]:
        await eventually(
            lambda: len(self.of(kind)) >= count,
            within,
            f"{count} {kind} proxy requests",
            changed=self.changed,
        )
        return self.of(kind)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        kind = request.match_info["kind"]
        if kind not in KINDS:
            return web.Response(status=404)
        body = await request.json()
        peer = request.transport.get_extra_info("peername") if request.transport else None
        self.requests.append(Recorded(kind, body, request.headers, peer[1] if peer else 0))
        self.changed.set()
        self.changed = asyncio.Event()
        answer = self.answers[kind]
        value = answer(body) if callable(answer) else answer
        if inspect.isawaitable(value):
            value = await value
        if isinstance(value, web.StreamResponse):
            return value
        return web.Response(text=json.dumps(value), content_type="application/json")

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/{kind}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        await web.SockSite(self._runner, sock).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@asynccontextmanager
async def proxy_backend() -> AsyncIterator[ProxyBackend]:
    backend = ProxyBackend()
    await backend.start()
    try:
        yield backend
    finally:
        await backend.stop()


def slow(seconds: float, answer: Mapping[str, Any]) -> Callable[[dict[str, Any]], Awaitable[Any]]:
    """An answer given after `seconds`."""

    async def respond(body: dict[str, Any]) -> Any:
        await asyncio.sleep(seconds)
        return answer

    return respond
