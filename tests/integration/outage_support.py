"""What the outage tests (test_faults_postgres.py, test_faults_redis.py) share: a raw client
subscribed on a node, and a publisher that keeps publishing through the nodes' API across the
fault, recording what was acknowledged and what was refused."""

from __future__ import annotations

import asyncio
import time

from tests.integration.test_cluster import Client
from tests.support.server import ServerProcess


async def subscribed(made: list[Client], node: ServerProcess, token: str, channel: str) -> Client:
    """A client of `node` connected with `token` and subscribed to `channel` (added to
    `made`, which the test's fixture closes)."""
    client = await Client.connect(node, token)
    made.append(client)
    reply = await client.call("subscribe", {"channel": channel})
    assert "subscribe" in reply, reply
    return client


class Publisher:
    """Publishes {"i": k} through the API of the nodes in turn, one at a time, recording
    each outcome: the offset of an acknowledged publication (and when), or the error code."""

    def __init__(self, nodes: list[ServerProcess], channel: str) -> None:
        self.nodes = nodes
        self.channel = channel
        self.acked: dict[int, int] = {}  # i -> offset
        self.failed: dict[int, int] = {}  # i -> error code
        self.acked_at: dict[int, float] = {}
        self.stop = False
        self.sent = 0

    async def run(self) -> None:
        while not self.stop:
            i = self.sent
            self.sent += 1
            node = self.nodes[i % len(self.nodes)]
            reply = await node.api_async("publish", {"channel": self.channel, "data": {"i": i}})
            if "error" in reply:
                self.failed[i] = reply["error"]["code"]
            else:
                self.acked[i] = reply["result"]["offset"]
                self.acked_at[i] = time.monotonic()
            await asyncio.sleep(0.02)
