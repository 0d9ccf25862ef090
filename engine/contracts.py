"""The contracts the engine needs from storage, owned by the engine: `EventLog` (the
publication log), `PresenceManager` and `Broker` (cross-node fan-out), with their request,
result and error types. No SQLAlchemy or client library here: the back ends under
`centripy.storage` implement these (memory, SQLite, PostgreSQL, Redis), and nothing under
`centripy.engine` imports `centripy.storage` (tests/test_layout.py checks it).

The event log is the source of truth for channels with history and for idempotency keys.
Guarantees every implementation must give (checked by tests/storage/test_contract.py):

* `append_many` assigns offsets per channel that are exactly top+1, top+2, ... with no gap or
  repeat, atomically with storing the publications; several processes appending to the same
  channel of one database must still get distinct consecutive offsets.
* A result is returned only after it is durable (committed).
* An idempotency key seen for the same channel within its TTL returns the first result with
  `suppressed=True`, and nothing is stored again.
* A stream whose meta is not touched for `meta_ttl` seconds is forgotten: the next access
  starts it again at offset 0 with a new epoch.
* Reads never create anything: `history` (and so every stream-top read and recovery) of a
  channel without a live stream stores no row and no entry. It reports offset 0 and the
  epoch the channel's first append will get (the same for every read until then, also
  across restarts), so a position read before the first publication stays valid after it.
  Reads of a live stream touch its meta (keep it from being forgotten): after a read at t
  the stream lives at least until t + 0.9 * meta_ttl (SQL back ends skip the write while the
  stored expiry is already that late, so that reconnect storms of reads write nothing).
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from centripy.engine.types import ClientInfo, Publication, StreamPosition


class StorageError(Exception):
    """A back end failed (connection lost, database error). Callers map it to error 100."""


class UnrecoverablePosition(StorageError):
    """`since.epoch` does not match the stream's current epoch (client error 112)."""


# Not frozen: a frozen dataclass's __init__ costs ~5x (object.__setattr__ per field) and
# this is built for every publication. Treat it as immutable.
@dataclass(slots=True)
class AppendRequest:
    """One publication to append to `channel`.

    `history_size`/`history_ttl` > 0 store the publication in the stream (both required);
    with either 0 the publication is not stored and gets offset 0, but an idempotency key
    is still recorded. Durations are in seconds.
    """

    channel: str
    data: bytes
    info: ClientInfo | None = None
    tags: tuple[tuple[str, str], ...] = ()
    history_size: int = 0
    history_ttl: float = 0.0
    meta_ttl: float = 0.0  # 0 = never forget the stream meta
    idempotency_key: str = ""
    idempotent_ttl: float = 300.0


# Not frozen: a frozen dataclass's __init__ costs ~5x (object.__setattr__ per field) and
# this is built for every publication. Treat it as immutable.
@dataclass(slots=True)
class AppendResult:
    publication: Publication  # with the assigned offset (0 when not stored)
    epoch: str  # "" when not stored
    suppressed: bool = False  # True: a duplicate of an earlier call; nothing was stored


# Called with a unit of append requests' results as soon as their batch has committed, in
# commit order, before their submitter resumes (the group-commit writer's `submit_many`).
OnCommit = Callable[[list[AppendResult]], None]


@dataclass(frozen=True, slots=True)
class HistoryQuery:
    """`limit` 0 returns only the position, -1 everything, n up to n publications.
    `since` is exclusive (forward: offsets > since.offset; reverse: offsets < since.offset).
    A non-empty `since.epoch` that differs from the current one raises UnrecoverablePosition."""

    channel: str
    limit: int = 0
    since: StreamPosition | None = None
    reverse: bool = False
    meta_ttl: float = 0.0


@dataclass(frozen=True, slots=True)
class HistoryResult:
    publications: Sequence[Publication]
    position: StreamPosition  # current top offset and epoch


class EventLog(abc.ABC):
    """Append-only per-channel publication log. All methods run on the server's event loop."""

    @abc.abstractmethod
    async def start(self) -> None:
        """Open connections and create or migrate the schema. Never drops data."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Finish in-flight appends, then release connections."""

    @abc.abstractmethod
    async def append_many(self, requests: Sequence[AppendRequest]) -> list[AppendResult]:
        """Append a batch in one transaction; results in request order."""

    async def append(self, request: AppendRequest) -> AppendResult:
        return (await self.append_many([request]))[0]

    @abc.abstractmethod
    async def history(self, query: HistoryQuery) -> HistoryResult:
        """Read a stream and touch its meta. Without a live stream: no publications, offset
        0 and the epoch the first append will get; nothing is stored."""

    async def history_many(
        self, queries: Sequence[HistoryQuery]
    ) -> list[HistoryResult | Exception]:
        """`history` of each query, in query order; a query's own failure (UnrecoverablePosition,
        ValueError for a bad query) is returned in its place. SQL back ends read them all in
        one transaction; a failure of the read itself (StorageError) raises for all."""
        results: list[HistoryResult | Exception] = []
        for query in queries:
            try:
                results.append(await self.history(query))
            except (UnrecoverablePosition, ValueError) as exc:
                results.append(exc)
        return results

    @abc.abstractmethod
    async def remove_history(self, channel: str) -> None:
        """Delete the publications of a stream, keeping its epoch and top offset."""


@dataclass(frozen=True, slots=True)
class PresenceStats:
    num_clients: int
    num_users: int


class PresenceManager(abc.ABC):
    """Who is subscribed to a channel with presence on. Entries expire `ttl` seconds after
    their last `add` unless refreshed (connections re-add every
    `client_presence_update_interval`); `remove` drops one at once. Runs on the loop."""

    @abc.abstractmethod
    async def add(self, channel: str, info: ClientInfo, ttl: float) -> None: ...

    @abc.abstractmethod
    async def remove(self, channel: str, client_id: str) -> None: ...

    @abc.abstractmethod
    async def presence(self, channel: str) -> dict[str, ClientInfo]: ...

    @abc.abstractmethod
    async def stats(self, channel: str) -> PresenceStats: ...

    async def close(self) -> None:  # noqa: B027  (optional hook, not abstract)
        """Release connections (no-op for in-memory back ends)."""


class BrokerHandler(Protocol):
    """What a broker calls (on the node's loop) for messages from OTHER nodes."""

    def on_publication(self, channel: str, pub: Publication, epoch: str) -> None: ...

    def on_join(self, channel: str, info: ClientInfo) -> None: ...

    def on_leave(self, channel: str, info: ClientInfo) -> None: ...

    def on_control(self, data: bytes) -> None: ...

    def on_reconnect(self) -> None:
        """The broker lost and regained its connection: messages may have been missed, so
        every channel must be re-checked against the log."""
        ...


class Broker(abc.ABC):
    """Cross-node fan-out (Redis PUB/SUB, PostgreSQL LISTEN/NOTIFY, NATS). Delivery is at most
    once and a node never receives its own messages back; ordering and gaps are the
    receiving node's job (it sequences by offset and fills gaps from the event log).
    All methods run on the loop; publish_* return once the message was handed to the
    back end (or raise StorageError)."""

    @abc.abstractmethod
    async def start(self, node_uid: str, handler: BrokerHandler) -> None: ...

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    async def subscribe(self, channel: str) -> None:
        """Receive this channel's messages (called when it gets its first local subscriber)."""

    @abc.abstractmethod
    async def unsubscribe(self, channel: str) -> None: ...

    @abc.abstractmethod
    async def publish(self, channel: str, pub: Publication, epoch: str) -> None: ...

    @abc.abstractmethod
    async def publish_join_leave(self, channel: str, info: ClientInfo, join: bool) -> None: ...

    async def barrier(self, channel: str) -> None:
        """Return once every message of `channel` that any node published before this call
        has been handed to the handler, so that a publication without an offset (which no
        receiver can sequence) is delivered locally after them: publish order. Default:
        nothing to wait for."""
        return None

    @abc.abstractmethod
    async def publish_control(self, data: bytes, node_uid: str = "") -> None:
        """To every other node ("") or to one node."""
