"""What the server API needs from the live connections of a node (implemented by the actor
hub, `actors/hub.py`; on several nodes it also forwards to the other nodes).

All methods run on the server's event loop; they return once the action was handed to the
matching connections (it takes effect on each connection in its own order).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from centripy.engine.channels import SubscribeOverride
from centripy.engine.types import StreamPosition

if TYPE_CHECKING:
    from centripy.engine.cluster import NodeInfo


@dataclass(frozen=True, slots=True)
class ServerSubscribe:
    user: str
    channel: str
    info: bytes = b""
    data: bytes = b""
    client: str = ""
    session: str = ""
    expire_at: int = 0
    recover_since: StreamPosition | None = None
    override: SubscribeOverride | None = None


@dataclass(frozen=True, slots=True)
class NodeStats:
    num_clients: int
    num_users: int
    num_channels: int
    num_subs: int


class Sessions(Protocol):
    async def subscribe(self, cmd: ServerSubscribe) -> None: ...

    async def unsubscribe(self, user: str, channel: str, client: str, session: str) -> None: ...

    async def disconnect(
        self,
        user: str,
        code: int,
        reason: str,
        client: str,
        session: str,
        whitelist: Sequence[str],
    ) -> None: ...

    async def refresh(
        self,
        user: str,
        client: str,
        session: str,
        expired: bool,
        expire_at: int,
        info: bytes | None,
    ) -> None: ...

    def channels(self) -> dict[str, int]:
        """Channels with at least one local subscriber -> number of local subscribers."""
        ...

    def stats(self) -> NodeStats: ...

    def nodes(self) -> list[NodeInfo]:
        """Every live node (this one included) with its counts, for the `info` API."""
        ...
