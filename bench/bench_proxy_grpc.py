"""Connects per second through the GRPC connect proxy against JWT connects (not a test).

The GRPC twin of bench_proxy.py: a real `centripy serve` process whose
`proxy_connect_endpoint` is `grpc://`; a local GRPC back end (grpc.aio, in its own process)
answering Connect with a user; WebSocket clients (aiohttp, in this process) that each open a
WebSocket, send `connect`, wait for the reply and close, `--concurrency` at a time. The same
run with a JWT and no proxy call is the baseline. Prints one JSON line per mode; for the proxy
mode also the number of Connect calls and of distinct client peers (TCP connections) the back
end saw (one long-lived channel: one peer). The server's CPU per connect is the figure to
compare on a busy machine (every record carries the loadavg):

    .venv/bin/python bench/bench_proxy_grpc.py --connects 3000 --concurrency 50
"""

from __future__ import annotations

import base64
import json
import sys
from pathlib import Path
from typing import Any

from bench_proxy import compare, parse_args

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from centripy.engine.config import Config
from centripy.engine.proxy import ProxyCall
from centripy.proxy.grpc import GrpcProxyBackend

# Connect answers with a user; RPC answers with the counters (requests, distinct peers).
BACKEND = """
import asyncio, json, sys
import grpc, grpc.aio
from centripy.proxy import proxy_pb2 as pb
from centripy.proxy.grpc import SERVICE

requests, peers = 0, set()

async def connect(request, context):
    global requests
    requests += 1
    peers.add(context.peer())
    return pb.ConnectResponse(result=pb.ConnectResult(user="user-%d" % requests))

async def stats(request, context):
    data = json.dumps({"requests": requests, "connections": len(peers)}).encode()
    return pb.RPCResponse(result=pb.RPCResult(data=data))

async def main():
    server = grpc.aio.server()
    handlers = {
        "Connect": grpc.unary_unary_rpc_method_handler(
            connect, pb.ConnectRequest.FromString, pb.ConnectResponse.SerializeToString),
        "RPC": grpc.unary_unary_rpc_method_handler(
            stats, pb.RPCRequest.FromString, pb.RPCResponse.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_insecure_port("127.0.0.1:" + sys.argv[1])
    await server.start()
    await server.wait_for_termination()

asyncio.run(main())
"""


async def backend_stats(endpoint: str) -> dict[str, Any]:
    client = GrpcProxyBackend.from_config(endpoint, Config(proxy_rpc_endpoint=endpoint))
    try:
        reply = await client.call(ProxyCall("rpc", {"method": "stats"}, {}, 5.0))
    finally:
        await client.close()
    stats: dict[str, Any] = json.loads(base64.b64decode(reply["result"]["b64data"]))
    return stats


def main() -> None:
    compare(
        parse_args(), BACKEND, lambda port: f"grpc://127.0.0.1:{port}", "connect_proxy_grpc",
        backend_stats,
    )  # fmt: skip


if __name__ == "__main__":
    main()
