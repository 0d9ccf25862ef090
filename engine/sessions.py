"""What the server API needs from the live connections of a node (implemented by the actor
hub, `actors/hub.py`; on several nodes it also forwards to the other nodes), and the values
it passes and returns.

The four user commands (`ServerSubscribe`, `UnsubscribeCommand`, `DisconnectCommand`,
`RefreshCommand`) are what the API executor hands to `Sessions` and what `engine/cluster.py`
encodes to forward them to the other nodes; `NodeInfo` is what `Sessions.nodes()` returns
and what every node broadcasts as its heartbeat. `engine/cluster.py` imports this module,
never the other way round.

All methods run on the server's event loop; they return once the action was handed to the
matching connections (it takes effect on each connection in its own order).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from centripy.engine.channels import SubscribeOverride
from centripy.engine.types import StreamPosition

_EMPTY: Mapping[str, int] = {}


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
class UnsubscribeCommand:
    user: str
    channel: str
    client: str = ""
    session: str = ""


@dataclass(frozen=True, slots=True)
class DisconnectCommand:
    user: str
    code: int
    reason: str
    client: str = ""
    session: str = ""
    whitelist: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class RefreshCommand:
    user: str
    client: str = ""
    session: str = ""
    expired: bool = False
    expire_at: int = 0
    info: bytes | None = None


UserCommand = ServerSubscribe | UnsubscribeCommand | DisconnectCommand | RefreshCommand


@dataclass(frozen=True, slots=True)
class NodeStats:
    num_clients: int
    num_users: int
    num_channels: int
    num_subs: int


@dataclass(frozen=True, slots=True)
class NodeInfo:
    uid: str
    name: str
    version: str
    num_clients: int = 0
    num_users: int = 0
    num_channels: int = 0
    num_subs: int = 0
    uptime: int = 0  # seconds
    channels: Mapping[str, int] = field(default_factory=lambda: _EMPTY)

    @classmethod
    def of(
        cls,
        uid: str,
        name: str,
        version: str,
        stats: NodeStats,
        uptime: float,
        channels: Mapping[str, int],
    ) -> NodeInfo:
        """Build the heartbeat from `Sessions.stats()` and `Sessions.channels()`."""
        return cls(
            uid,
            name,
            version,
            stats.num_clients,
            stats.num_users,
            stats.num_channels,
            stats.num_subs,
            int(uptime),
            dict(channels),
        )


class Sessions(Protocol):
    async def subscribe(self, cmd: ServerSubscribe) -> None: ...

    async def unsubscribe(self, cmd: UnsubscribeCommand) -> None: ...

    async def disconnect(self, cmd: DisconnectCommand) -> None: ...

    async def refresh(self, cmd: RefreshCommand) -> None: ...

    def channels(self) -> dict[str, int]:
        """Channels with at least one local subscriber -> number of local subscribers."""
        ...

    def stats(self) -> NodeStats: ...

    def nodes(self) -> list[NodeInfo]:
        """Every live node (this one included) with its counts, for the `info` API."""
        ...
