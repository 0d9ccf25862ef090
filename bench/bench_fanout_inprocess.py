"""In-process fan-out micro-benchmark: node.publish -> channel actor -> N connection actors
-> a transport that only counts. Measures the actor path alone (no sockets, no client).

    .venv/bin/python bench/bench_fanout_inprocess.py [--subs 1000] [--msgs 200] [--every 10]
        [--profile]

Prints one JSON line: deliveries/s and microseconds of server CPU per delivery.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from centripy.actors.connection import ConnectionActor
from centripy.actors.connection_core import Frame
from centripy.actors.context import ConnContext
from centripy.actors.hub import Hub
from centripy.actors.transport import Format
from centripy.engine.auth import TokenVerifier
from centripy.engine.config import Config
from centripy.engine.node import Node
from centripy.engine.options import ChannelOptions
from centripy.server import tune_gc
from centripy.storage.memory import MemoryEventLog
from centripy.storage.presence_memory import MemoryPresence
from centripy.storage.writer import GroupCommitWriter


class CountingTransport:
    name = "websocket"
    format = Format.JSON
    emulation = False
    unidirectional = False
    pong = True

    def __init__(self, done: asyncio.Event, target: int) -> None:
        self.count = 0
        self.frames = 0
        self.done = done
        self.target = target

    def write(self, messages: Sequence[bytes]) -> None:
        self.frames += 1
        self.count += len(messages)
        if self.count >= self.target:
            self.done.set()

    def close(self, code: int, reason: str) -> None:
        self.done.set()


async def run(subs: int, msgs: int, every: int) -> dict[str, float]:
    config = Config(
        client_insecure=True,
        channel_options=ChannelOptions(allow_subscribe_for_client=True),
    )
    log = MemoryEventLog()
    writer = GroupCommitWriter(log)
    await writer.start()
    node = Node(config, log, writer.submit_many, MemoryPresence())
    hub = Hub()
    node.attach_fanout(hub)
    ctx = ConnContext(config, node, hub, TokenVerifier(config))
    transports = []
    for _ in range(subs):
        done = asyncio.Event()
        transport = CountingTransport(done, msgs + 2)  # + connect and subscribe replies
        ref = ConnectionActor.start(ctx, transport)
        ref.tell(Frame(b'{"id":1,"connect":{}}\n{"id":2,"subscribe":{"channel":"bench"}}'))
        transports.append(transport)
    while hub.stats().num_subs < subs:
        await asyncio.sleep(0.01)
    tune_gc()  # as the server does once started
    cpu0, t0 = time.process_time(), time.perf_counter()
    for i in range(msgs):
        await node.publish("bench", b'{"seq":%d,"payload":"xxxxxxxxxxxxxxxxxxxx"}' % i)
        if i % every == every - 1:
            for _ in range(4 if every == 1 else 1):  # every 1: each message fans out alone
                await asyncio.sleep(0)
    await asyncio.wait_for(asyncio.gather(*(t.done.wait() for t in transports)), 120)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - t0
    deliveries = subs * msgs
    frames = sum(t.frames for t in transports)
    await writer.close()
    return {
        "subs": subs,
        "msgs": msgs,
        "every": every,
        "deliveries_per_s": round(deliveries / wall),
        "cpu_us_per_delivery": round(cpu / deliveries * 1e6, 2),
        "messages_per_frame": round(deliveries / max(frames, 1), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--subs", type=int, default=1000)
    parser.add_argument("--msgs", type=int, default=200)
    parser.add_argument("--every", type=int, default=10, help="publishes per loop turn")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    if args.profile:
        import cProfile
        import pstats

        prof = cProfile.Profile()
        prof.enable()
        result = asyncio.run(run(args.subs, args.msgs, args.every))
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    else:
        result = asyncio.run(run(args.subs, args.msgs, args.every))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
