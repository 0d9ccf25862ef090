#!/usr/bin/env python3
"""Peer: python-socketio's AsyncServer on aiohttp, the typical Python fan-out stack, with the
same publish API as centripy. One process, one event loop.

    Socket.IO  ws://HOST:PORT/socket.io/?EIO=4&transport=websocket
      the client emits "subscribe" <channel> with an ack id -> joins the room of that name,
      ack [true]; every publication is emitted to the room as event "publication" <data>
    HTTP       POST http://HOST:PORT/api/publish  (X-API-Key, {"channel":..,"data":..})
      -> {"result":{}} once sio.emit() returned (python-socketio has queued the packet for
         every member of the room)

--gc-off disables the cyclic garbage collector (python-socketio's best configuration here:
its per-packet objects make the collector run often under fan-out).
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
from typing import Any

import socketio
from aiohttp import web


def make_app(api_key: str) -> web.Application:
    """The aiohttp application: socket.io attached, plus POST /api/publish."""
    sio = socketio.AsyncServer(
        async_mode="aiohttp", cors_allowed_origins="*", logger=False, engineio_logger=False
    )

    async def subscribe(sid: str, channel: Any) -> bool:
        if not isinstance(channel, str) or not channel:
            return False
        await sio.enter_room(sid, channel)
        return True

    sio.on("subscribe", subscribe)

    async def publish(request: web.Request) -> web.Response:
        if request.headers.get("X-API-Key") != api_key:
            return web.json_response(
                {"error": {"code": 101, "message": "unauthorized"}}, status=401
            )
        try:
            body = json.loads(await request.read())
            channel, data = body["channel"], body["data"]
        except (ValueError, KeyError, TypeError) as exc:
            return web.json_response({"error": {"code": 107, "message": f"bad request: {exc}"}})
        await sio.emit("publication", data, room=channel)
        return web.json_response({"result": {}})

    app = web.Application()
    sio.attach(app)
    app.router.add_post("/api/publish", publish)
    return app


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--api-key", default="bench")
    ap.add_argument("--gc-off", action="store_true", help="disable the cyclic garbage collector")
    ap.add_argument("--uvloop", action="store_true")
    args = ap.parse_args()
    if args.gc_off:
        gc.disable()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if args.uvloop:
        import uvloop

        uvloop.install()
    print(f"peer_socketio http://{args.host}:{args.port} gc_off={args.gc_off}", flush=True)
    web.run_app(
        make_app(args.api_key),
        host=args.host,
        port=args.port,
        access_log=None,
        print=None,
        backlog=4096,
    )


if __name__ == "__main__":
    main()
