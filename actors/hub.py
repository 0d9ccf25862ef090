"""The node-local registry of connection and channel actors.

The hub is not an actor: it is plain bookkeeping owned by the event loop (every method runs
on the loop thread, synchronously, so its maps never race). It implements the engine's
`Fanout` (committed publications and join/leave go to the channel actor) and `Sessions`
(server API actions reach the connections of a user) protocols.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, NamedTuple

from pykka import ActorDeadError, ActorRef

from actors.channel import AddSubscriber, ChannelActor, Deliver, JoinLeave, RemoveSubscriber
from engine.sessions import NodeStats, ServerSubscribe
from engine.types import ClientInfo, Publication

# -- messages to connection actors (defined here so the hub needs no connection import) ----


class ServerSubscribeMsg(NamedTuple):
    cmd: ServerSubscribe


class ServerUnsubscribeMsg(NamedTuple):
    channel: str


class ServerDisconnectMsg(NamedTuple):
    code: int
    reason: str


class ServerRefreshMsg(NamedTuple):
    expired: bool
    expire_at: int
    info: bytes | None


class Shutdown(NamedTuple):
    """The node is stopping: disconnect with 3001."""


class _Conn(NamedTuple):
    client_id: str
    ref: ActorRef[Any]
    user: str
    session: str


class Hub:
    def __init__(self) -> None:
        self._channels: dict[str, ActorRef[ChannelActor]] = {}
        self._channel_subs: dict[str, int] = {}
        self._conns: dict[str, _Conn] = {}
        self._users: dict[str, set[str]] = {}
        self._sessions: dict[str, str] = {}

    # -- connections ----------------------------------------------------------------------

    def add_connection(self, client_id: str, user: str, session: str, ref: ActorRef[Any]) -> None:
        self._conns[client_id] = _Conn(client_id, ref, user, session)
        self._users.setdefault(user, set()).add(client_id)
        if session:
            self._sessions[session] = client_id

    def remove_connection(self, client_id: str) -> None:
        conn = self._conns.pop(client_id, None)
        if conn is None:
            return
        clients = self._users.get(conn.user)
        if clients is not None:
            clients.discard(client_id)
            if not clients:
                del self._users[conn.user]
        if conn.session:
            self._sessions.pop(conn.session, None)

    def user_connection_count(self, user: str) -> int:
        return len(self._users.get(user, ()))

    def by_session(self, session: str) -> ActorRef[Any] | None:
        client_id = self._sessions.get(session)
        conn = self._conns.get(client_id) if client_id else None
        return conn.ref if conn else None

    def connections(self) -> list[ActorRef[Any]]:
        return [conn.ref for conn in self._conns.values()]

    # -- channels -------------------------------------------------------------------------

    async def subscribe(
        self, channel: str, client_id: str, conn: ActorRef[Any], join_leave: bool
    ) -> None:
        """Add a subscriber; returns once the channel actor has it, so that every
        publication fanned out after this returns reaches the subscriber."""
        ref = self._channels.get(channel)
        if ref is None:
            ref = ChannelActor.start(channel, register=False)
            self._channels[channel] = ref
            self._channel_subs[channel] = 0
        self._channel_subs[channel] += 1
        await ref.ask(AddSubscriber(client_id, conn, join_leave), block=False)

    def unsubscribe(self, channel: str, client_id: str) -> None:
        ref = self._channels.get(channel)
        if ref is None:
            return
        count = self._channel_subs[channel] - 1
        if count > 0:
            self._channel_subs[channel] = count
            ref.tell(RemoveSubscriber(client_id))
            return
        del self._channels[channel]
        del self._channel_subs[channel]
        ref.stop(block=False)

    # -- Fanout ---------------------------------------------------------------------------

    def deliver(self, channel: str, pub: Publication, epoch: str) -> None:
        ref = self._channels.get(channel)
        if ref is not None:
            ref.tell(Deliver(channel, pub, epoch))

    def join(self, channel: str, info: ClientInfo) -> None:
        ref = self._channels.get(channel)
        if ref is not None:
            ref.tell(JoinLeave(channel, info, True))

    def leave(self, channel: str, info: ClientInfo) -> None:
        ref = self._channels.get(channel)
        if ref is not None:
            ref.tell(JoinLeave(channel, info, False))

    # -- Sessions -------------------------------------------------------------------------

    def _matching(self, user: str, client: str, session: str) -> list[_Conn]:
        if client:
            conn = self._conns.get(client)
            found = [conn] if conn is not None and (not user or conn.user == user) else []
        else:
            found = [self._conns[c] for c in self._users.get(user, ())]
        return [c for c in found if not session or c.session == session]

    def _tell(self, conns: Sequence[_Conn], message: Any) -> None:
        for conn in conns:
            try:
                conn.ref.tell(message)
            except ActorDeadError:
                continue

    async def subscribe_user(self, cmd: ServerSubscribe) -> None:
        self._tell(self._matching(cmd.user, cmd.client, cmd.session), ServerSubscribeMsg(cmd))

    async def unsubscribe_user(self, user: str, channel: str, client: str, session: str) -> None:
        self._tell(self._matching(user, client, session), ServerUnsubscribeMsg(channel))

    async def disconnect_user(
        self,
        user: str,
        code: int,
        reason: str,
        client: str,
        session: str,
        whitelist: Sequence[str],
    ) -> None:
        keep = set(whitelist)
        conns = [c for c in self._matching(user, client, session) if c.client_id not in keep]
        self._tell(conns, ServerDisconnectMsg(code, reason))

    async def refresh_user(
        self,
        user: str,
        client: str,
        session: str,
        expired: bool,
        expire_at: int,
        info: bytes | None,
    ) -> None:
        self._tell(
            self._matching(user, client, session), ServerRefreshMsg(expired, expire_at, info)
        )

    def channels(self) -> dict[str, int]:
        return dict(self._channel_subs)

    def stats(self) -> NodeStats:
        return NodeStats(
            num_clients=len(self._conns),
            num_users=len(self._users),
            num_channels=len(self._channels),
            num_subs=sum(self._channel_subs.values()),
        )

    async def shutdown(self, grace: float) -> None:
        """Tell every connection to disconnect with 3001 and wait (bounded) until gone."""
        self._tell(list(self._conns.values()), Shutdown())
        deadline = asyncio.get_running_loop().time() + grace
        while self._conns and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)


class SessionsAdapter:
    """The engine's `Sessions` protocol over a hub (method names as the protocol wants)."""

    def __init__(self, hub: Hub) -> None:
        self._hub = hub

    async def subscribe(self, cmd: ServerSubscribe) -> None:
        await self._hub.subscribe_user(cmd)

    async def unsubscribe(self, user: str, channel: str, client: str, session: str) -> None:
        await self._hub.unsubscribe_user(user, channel, client, session)

    async def disconnect(
        self,
        user: str,
        code: int,
        reason: str,
        client: str,
        session: str,
        whitelist: Sequence[str],
    ) -> None:
        await self._hub.disconnect_user(user, code, reason, client, session, whitelist)

    async def refresh(
        self,
        user: str,
        client: str,
        session: str,
        expired: bool,
        expire_at: int,
        info: bytes | None,
    ) -> None:
        await self._hub.refresh_user(user, client, session, expired, expire_at, info)

    def channels(self) -> dict[str, int]:
        return self._hub.channels()

    def stats(self) -> NodeStats:
        return self._hub.stats()
