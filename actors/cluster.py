"""Several nodes: what arrives from the broker, the node heartbeat, and server API actions
that must reach connections on every node.

`ClusterLink` is the broker's `BrokerHandler` for this node: remote publications and
join/leave go to the local channel actors (which sequence them against the log), control
messages are heartbeats (the node registry behind `info` and `channels`) or user commands
applied to this node's connections. `ClusterSessions` is the `Sessions` the API uses: it
acts locally and forwards the command to the other nodes. Everything runs on the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Coroutine
from typing import Any

from centripy.actors.hub import Hub, SessionsAdapter
from centripy.engine.cluster import (
    HEARTBEAT_INTERVAL,
    ControlError,
    NodeRegistry,
    apply_command,
    decode_control,
    encode_control,
)
from centripy.engine.contracts import Broker, StorageError
from centripy.engine.node import VERSION, Node
from centripy.engine.sessions import (
    DisconnectCommand,
    NodeInfo,
    NodeStats,
    RefreshCommand,
    ServerSubscribe,
    UnsubscribeCommand,
    UserCommand,
)
from centripy.engine.types import ClientInfo, Publication

log = logging.getLogger("centripy.cluster")


class ClusterLink:
    def __init__(self, node: Node, hub: Hub, broker: Broker) -> None:
        self.node = node
        self.hub = hub
        self.broker = broker
        self.local = SessionsAdapter(hub, node)
        self.registry = NodeRegistry(node.uid)
        self._heartbeat: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        await self.broker.start(self.node.uid, self)
        self._heartbeat = asyncio.get_running_loop().create_task(self._beat())

    async def close(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat
        await self.broker.close()

    def local_info(self) -> NodeInfo:
        uptime = time.time() - self.node.started_at
        return NodeInfo.of(
            self.node.uid,
            self.node.name,
            VERSION,
            self.local.stats(),
            uptime,
            self.local.channels(),
        )

    async def _beat(self) -> None:
        while True:
            info = self.local_info()
            self.registry.update(info)
            try:
                await self.broker.publish_control(encode_control(info))
            except StorageError as exc:
                log.warning("node heartbeat not sent: %s", exc)
            self.registry.prune()
            await asyncio.sleep(HEARTBEAT_INTERVAL)

    # -- BrokerHandler --------------------------------------------------------------------

    def on_publication(self, channel: str, pub: Publication, epoch: str) -> None:
        self.hub.deliver(channel, pub, epoch)

    def on_join(self, channel: str, info: ClientInfo) -> None:
        self.hub.join(channel, info)

    def on_leave(self, channel: str, info: ClientInfo) -> None:
        self.hub.leave(channel, info)

    def on_control(self, data: bytes) -> None:
        try:
            message = decode_control(data)
        except ControlError as exc:
            log.warning("undecodable control message: %s", exc)
            return
        if isinstance(message, NodeInfo):
            if self.registry.update(message):
                log.info("node %s (%s) joined", message.name, message.uid)
            return
        self._spawn(apply_command(self.local, message))

    def on_reconnect(self) -> None:
        log.warning("broker reconnected: re-reading the log of every local channel")
        self.hub.resync()

    # -- forwarding -----------------------------------------------------------------------

    async def forward(self, cmd: UserCommand) -> None:
        """Send a user command to the other nodes (they apply it to their connections)."""
        try:
            await self.broker.publish_control(encode_control(cmd))
        except StorageError as exc:
            log.error("could not forward %s to other nodes: %s", type(cmd).__name__, exc)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)


class ClusterSessions:
    """The engine's `Sessions` on several nodes: act here, then tell the other nodes."""

    def __init__(self, link: ClusterLink) -> None:
        self._link = link
        self._local = link.local

    async def subscribe(self, cmd: ServerSubscribe) -> None:
        await self._local.subscribe(cmd)
        await self._link.forward(cmd)

    async def unsubscribe(self, cmd: UnsubscribeCommand) -> None:
        await self._local.unsubscribe(cmd)
        await self._link.forward(cmd)

    async def disconnect(self, cmd: DisconnectCommand) -> None:
        await self._local.disconnect(cmd)
        await self._link.forward(cmd)

    async def refresh(self, cmd: RefreshCommand) -> None:
        await self._local.refresh(cmd)
        await self._link.forward(cmd)

    def channels(self) -> dict[str, int]:
        self._link.registry.update(self._link.local_info())
        return self._link.registry.channels()

    def stats(self) -> NodeStats:
        return self._local.stats()

    def nodes(self) -> list[NodeInfo]:
        self._link.registry.update(self._link.local_info())
        return self._link.registry.nodes()
