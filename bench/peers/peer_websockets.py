#!/usr/bin/env python3
"""Peer: a bare `websockets.broadcast()` loop speaking the subset of Centrifugo's client
protocol v2 (JSON) that the benchmarks use: the near-limit reference for Python fan-out.

    WebSocket  ws://HOST:PORT/connection/websocket   (any path is accepted)
      {"id":1,"connect":{}}   -> {"id":1,"connect":{"client":..,"ping":25,"pong":true}}
      {"id":2,"subscribe":{"channel":"c"}}   -> {"id":2,"subscribe":{}}
      several commands in one frame, newline-joined, are answered in one frame
      a server ping {} every --ping seconds; the client's {} pong is ignored
    HTTP       POST http://HOST:API_PORT/api/publish  (X-API-Key, {"channel":..,"data":..})
      -> {"result":{}} once the push {"push":{"channel":c,"pub":{"data":..,"offset":N}}} was
         handed to every subscriber's socket (encoded once, no per-subscriber task or queue)

The websockets server parses only GET requests, so the API has its own port, served by aiohttp
on the same event loop. --fault is for the harness's self-test only: on every --fault-every'th
publication of a channel, drop it for one subscriber, send it twice to one subscriber, send it
to one subscriber after the channel's next publication, or reject it with an API error.
Everything runs on the one event loop of this process.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import uuid
from collections import defaultdict
from typing import Any

import websockets
from aiohttp import web
from websockets.asyncio.server import ServerConnection, serve

DUMPS = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
FAULTS = ("drop", "dup", "reorder", "reject")


class Hub:
    """Channels, offsets and the fault injector; used only on the event loop."""

    def __init__(self, ping: float, fault: str | None, every: int) -> None:
        self.ping = ping
        self.fault = fault
        self.every = every
        self.channels: defaultdict[str, set[ServerConnection]] = defaultdict(set)
        self.offsets: defaultdict[str, int] = defaultdict(int)
        self.held: dict[str, tuple[ServerConnection, str]] = {}

    def command(
        self, ws: ServerConnection, client: str, mine: set[str], cmd: dict[str, Any]
    ) -> Any:
        """The reply to one client command (None for a pong)."""
        if not cmd:
            return None
        cid = cmd.get("id", 0)
        if "connect" in cmd:
            body = {
                "client": client,
                "version": "peer-websockets",
                "ping": int(self.ping),
                "pong": True,
            }
            return {"id": cid, "connect": body}
        if "subscribe" in cmd:
            channel = cmd["subscribe"]["channel"]
            self.channels[channel].add(ws)
            mine.add(channel)
            return {"id": cid, "subscribe": {}}
        if "unsubscribe" in cmd:
            channel = cmd["unsubscribe"]["channel"]
            self.channels[channel].discard(ws)
            mine.discard(channel)
            return {"id": cid, "unsubscribe": {}}
        return {"id": cid, "error": {"code": 107, "message": "not available"}}

    def publish(self, channel: str, data: Any) -> bool:
        """Fan one publication out; False when the fault injector rejects it."""
        targets = self.channels.get(channel, set())
        offset = self.offsets[channel] + 1
        self.offsets[channel] = offset
        faulty = bool(self.fault and targets and offset % self.every == 0)
        if faulty and self.fault == "reject":
            return False
        msg = DUMPS({"push": {"channel": channel, "pub": {"data": data, "offset": offset}}})
        if not faulty:
            websockets.broadcast(targets, msg)
            if channel in self.held:  # reorder: the held publication goes after this one
                victim, old = self.held.pop(channel)
                websockets.broadcast([victim], old)
            return True
        victim = min(targets, key=id)
        others = [ws for ws in targets if ws is not victim]
        if self.fault == "drop":
            websockets.broadcast(others, msg)
        elif self.fault == "dup":
            websockets.broadcast(targets, msg)
            websockets.broadcast([victim], msg)
        else:  # reorder
            websockets.broadcast(others, msg)
            self.held[channel] = (victim, msg)
        return True


def make_handler(hub: Hub) -> Any:
    async def handler(ws: ServerConnection) -> None:
        client = str(uuid.uuid4())
        mine: set[str] = set()
        try:
            async for message in ws:
                text = message.decode() if isinstance(message, bytes) else message
                replies = [
                    hub.command(ws, client, mine, json.loads(line))
                    for line in text.split("\n")
                    if line.strip()
                ]
                out = [DUMPS(r) for r in replies if r is not None]
                if out:
                    await ws.send("\n".join(out))
        except websockets.ConnectionClosed:
            pass
        finally:
            for channel in mine:
                hub.channels[channel].discard(ws)

    return handler


def make_api(hub: Hub, api_key: str) -> web.Application:
    async def publish(request: web.Request) -> web.Response:
        if request.headers.get("X-API-Key") != api_key:
            return web.json_response(
                {"error": {"code": 101, "message": "unauthorized"}}, status=401
            )
        try:
            body = await request.json()
            channel, data = body["channel"], body["data"]
        except (ValueError, KeyError, TypeError) as exc:
            return web.json_response({"error": {"code": 107, "message": f"bad request: {exc}"}})
        if not hub.publish(channel, data):
            return web.json_response({"error": {"code": 100, "message": "injected fault"}})
        return web.json_response({"result": {}})

    app = web.Application()
    app.router.add_post("/api/publish", publish)
    return app


async def pinger(hub: Hub) -> None:
    while True:
        await asyncio.sleep(hub.ping)
        websockets.broadcast(set().union(*hub.channels.values()), "{}")


async def amain(args: argparse.Namespace) -> None:
    hub = Hub(args.ping, args.fault, args.fault_every)
    runner = web.AppRunner(make_api(hub, args.api_key), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, args.host, args.api_port, backlog=4096).start()
    ping_task = asyncio.create_task(pinger(hub))
    async with serve(
        make_handler(hub),
        args.host,
        args.port,
        compression=None,
        ping_interval=None,
        max_size=2**20,
        backlog=4096,
    ):
        print(f"peer_websockets ws://{args.host}:{args.port} api :{args.api_port}", flush=True)
        try:
            await asyncio.Future()
        finally:
            ping_task.cancel()
            await runner.cleanup()


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000, help="WebSocket port")
    ap.add_argument("--api-port", type=int, default=8001, help="HTTP publish API port")
    ap.add_argument("--api-key", default="bench")
    ap.add_argument("--ping", type=float, default=25.0, help="server ping interval, s")
    ap.add_argument("--uvloop", action="store_true")
    ap.add_argument("--fault", choices=FAULTS, help="harness self-test only (see above)")
    ap.add_argument("--fault-every", type=int, default=7)
    args = ap.parse_args()
    if args.fault_every < 1:
        ap.error("--fault-every must be at least 1")
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if args.uvloop:
        import uvloop

        uvloop.run(amain(args))
    else:
        asyncio.run(amain(args))


if __name__ == "__main__":
    main()
