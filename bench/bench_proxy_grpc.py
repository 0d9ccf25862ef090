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

import argparse
import asyncio
import base64
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench_proxy import run
from common import CpuWindow, load_average

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from centripy.engine.config import Config
from centripy.engine.proxy import ProxyCall
from centripy.proxy.grpc import GrpcProxyBackend
from tests.integration.conftest import make_jwt
from tests.support.server import ServerProcess, free_port, port_accepts

SECRET = "bench-secret-bench-secret-bench-secret"

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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connects", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=200)
    args = parser.parse_args()

    port = free_port()
    endpoint = f"grpc://127.0.0.1:{port}"
    backend = subprocess.Popen([sys.executable, "-c", BACKEND, str(port)])
    try:
        deadline = time.monotonic() + 10
        while not port_accepts("127.0.0.1", port):
            if time.monotonic() > deadline or backend.poll() is not None:
                raise SystemExit("backend did not start")
            time.sleep(0.05)
        config = {
            "api_key": "bench",
            "token_hmac_secret_key": SECRET,
            "log_level": "warn",
            "proxy_connect_endpoint": endpoint,
            "client_connection_rate_limit": 0,
        }
        with tempfile.TemporaryDirectory() as workdir:
            server = ServerProcess(config, Path(workdir)).start()
            try:
                token = make_jwt("jwt-user", secret=SECRET)
                for mode, tok in (("jwt", token), ("connect_proxy_grpc", "")):
                    asyncio.run(run(server.ws_url, args.warmup, args.concurrency, tok))
                    assert server.pid is not None
                    with CpuWindow(server.pid) as cpu:
                        result = asyncio.run(
                            run(server.ws_url, args.connects, args.concurrency, tok)
                        )
                    result["mode"] = mode
                    result["server_cpu_ms_per_connect"] = round(
                        1000 * cpu.server_cpu / args.connects, 3
                    )
                    result["loadavg"] = load_average()
                    if mode == "connect_proxy_grpc":
                        result["backend"] = asyncio.run(backend_stats(endpoint))
                    print(json.dumps(result), flush=True)
            finally:
                server.stop()
    finally:
        backend.terminate()
        backend.wait(10)


if __name__ == "__main__":
    main()
