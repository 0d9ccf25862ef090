"""Several nodes: what arrives from the broker, the node heartbeat, and server API actions
that must reach connections on every node.

`ClusterLink` is the broker's `BrokerHandler` for this node: remote publications and
join/leave go to the local channel actors (which sequence them against the log), control
messages are heartbeats (the node registry behind `info` and `channels`) or user commands
applied to this node's connections, or `/emulation` requests forwarded by the node that
received them (`forward_emulation` on that side, `emulate` on the session's node).
`ClusterSessions` is the `Sessions` the API uses: it acts locally and forwards the command to
the other nodes. Everything runs on the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
import uuid
from collections.abc import Coroutine
from typing import Any

from pykka import ActorDeadError

from centripy.actors.connection_core import frames_waiting, tell_frame
from centripy.actors.hub import Hub, SessionsAdapter
from centripy.engine.cluster import (
    HEARTBEAT_INTERVAL,
    ControlError,
    EmulationForward,
    EmulationReply,
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

EMULATION_TIMEOUT = 5.0  # seconds a forwarded /emulation request waits for the owner's reply


def emulate(hub: Hub, session: str, data: bytes, max_pending: int) -> int:
    """Hand an `/emulation` request's commands to the connection actor of `session` on this
    node; the HTTP status to answer: 204 (handed over, or no such session: dropped as
    Centrifugo does), 503 while `max_pending` of its frames wait (the client retries)."""
    actor = hub.by_session(session) if session else None
    if actor is None:
        return 204
    if frames_waiting(actor) >= max_pending:
        return 503
    with contextlib.suppress(ActorDeadError):
        tell_frame(actor, data)
    return 204


class ClusterLink:
    def __init__(self, node: Node, hub: Hub, broker: Broker) -> None:
        self.node = node
        self.hub = hub
        self.broker = broker
        self.local = SessionsAdapter(hub, node)
        self.registry = NodeRegistry(node.uid)
        self._heartbeat: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._emulations: dict[str, asyncio.Future[int]] = {}  # request id -> reply
        self._emulation_ids = itertools.count(1)
        received = node.metrics.received_from_broker
        self._received = {k: received(k) for k in ("publication", "join", "leave", "control")}

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
        self._received["publication"].value += 1
        if pub.time:  # set by the log when committed (channels with history)
            self.node.metrics.pub_sub_lag(time.time() - pub.time / 1000)
        self.hub.deliver(channel, pub, epoch)

    def on_join(self, channel: str, info: ClientInfo) -> None:
        self._received["join"].value += 1
        self.hub.join(channel, info)

    def on_leave(self, channel: str, info: ClientInfo) -> None:
        self._received["leave"].value += 1
        self.hub.leave(channel, info)

    def on_control(self, data: bytes) -> None:
        self._received["control"].value += 1
        try:
            message = decode_control(data)
        except ControlError as exc:
            log.warning("undecodable control message: %s", exc)
            return
        if isinstance(message, NodeInfo):
            if self.registry.update(message):
                log.info("node %s (%s) joined", message.name, message.uid)
        elif isinstance(message, EmulationForward):
            self._spawn(self._serve_emulation(message))
        elif isinstance(message, EmulationReply):
            waiter = self._emulations.pop(message.request_id, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(message.status)
        else:
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

    async def forward_emulation(
        self, node_uid: str, session: str, data: bytes, timeout: float = EMULATION_TIMEOUT
    ) -> int:
        """Send an `/emulation` request to the node owning `session` and return the HTTP
        status to answer: the owner's (204, 503); 404 for something that is not a node uid,
        or when no reply comes and the node is not a live one (a session of a node that is
        gone); 500 when a live node does not answer within `timeout` or the broker fails."""
        try:
            uuid.UUID(node_uid)
        except ValueError:
            return 404  # not a node uid (every node's is a UUID): nowhere to send it
        request_id = f"{self.node.uid}:{next(self._emulation_ids)}"
        waiter: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._emulations[request_id] = waiter
        message = EmulationForward(request_id, self.node.uid, session, data)
        try:
            await self.broker.publish_control(encode_control(message), node_uid)
            return await asyncio.wait_for(waiter, timeout)
        except StorageError as exc:
            log.warning("emulation request not forwarded to %s: %s", node_uid, exc)
            return 500
        except TimeoutError:
            live = any(n.uid == node_uid for n in self.registry.nodes())
            return 500 if live else 404
        finally:
            self._emulations.pop(request_id, None)

    async def _serve_emulation(self, message: EmulationForward) -> None:
        limit = self.node.config.client_max_pending_frames
        status = emulate(self.hub, message.session, message.data, limit)
        reply = EmulationReply(message.request_id, status)
        try:
            await self.broker.publish_control(encode_control(reply), message.origin)
        except StorageError as exc:
            log.warning("emulation reply to %s not sent: %s", message.origin, exc)

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
