"""Node orchestration: validate -> dedup -> append to the log -> fan out.

`Node` is the one place where a publication becomes durable and then visible. Everything
that publishes (client `publish`, the HTTP API, batch, consumers) goes through
`Node.publish`. Fan-out goes to a `Fanout` (the actor hub on this node, and on several nodes
the cross-node broker), which this module only knows by its protocol.

All methods run on the server's event loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from centripy.engine.channels import ChannelName, resolve
from centripy.engine.config import Config
from centripy.engine.contracts import (
    AppendRequest,
    AppendResult,
    Broker,
    EventLog,
    HistoryQuery,
    HistoryResult,
    OnCommit,
    PresenceManager,
    PresenceStats,
    StorageError,
    UnrecoverablePosition,
)
from centripy.engine.metrics import Metrics
from centripy.engine.protocol.codes import Error, ErrorCode
from centripy.engine.types import ClientInfo, Publication, StreamPosition

log = logging.getLogger("centripy.node")

VERSION = "5.2.2"  # the Centrifugo version whose behaviour we follow


class Fanout(Protocol):
    """Where committed publications and join/leave events go (the hub of channel actors)."""

    def deliver(self, channel: str, pub: Publication, epoch: str) -> None: ...

    def join(self, channel: str, info: ClientInfo) -> None: ...

    def leave(self, channel: str, info: ClientInfo) -> None: ...


class SubmitMany(Protocol):
    """Commit several append requests in one transaction (the group-commit writer's
    `submit_many`); `on_commit(results)` runs as soon as they are committed, in commit
    order, before the caller resumes."""

    def __call__(
        self,
        requests: Sequence[AppendRequest],
        *,
        on_commit: OnCommit | None = None,
    ) -> Awaitable[list[AppendResult]]: ...


# Not frozen: a frozen dataclass's __init__ costs ~5x (object.__setattr__ per field) and
# this is built for every publication. Treat it as immutable.
@dataclass(slots=True)
class PublishResult:
    offset: int = 0
    epoch: str = ""
    suppressed: bool = False


# Not frozen: a frozen dataclass's __init__ costs ~5x (object.__setattr__ per field) and
# this is built for every publication. Treat it as immutable.
@dataclass(slots=True)
class PublishItem:
    """One publication of `Node.publish_many` (the arguments of `Node.publish`)."""

    name: ChannelName
    data: bytes
    info: ClientInfo | None = None
    tags: Mapping[str, str] | None = None
    skip_history: bool = False
    idempotency_key: str = ""


class Node:
    """One centripy node: config, event log (through its group-commit writer), presence."""

    def __init__(
        self,
        config: Config,
        event_log: EventLog,
        submit_many: SubmitMany,
        presence: PresenceManager,
        uid: str | None = None,
    ) -> None:
        self.config = config
        self.event_log = event_log
        self._submit_many = submit_many
        self.presence_manager = presence
        self.uid = uid or str(uuid.uuid4())
        self.name = config.name or f"centripy_{config.port}"
        self.started_at = time.time()
        self._fanouts: list[Fanout] = []
        self._broker: Broker | None = None
        self._background: set[asyncio.Task[None]] = set()
        self.shutting_down = False
        self.metrics = Metrics()
        self._sent_pub = self.metrics.cell(
            "centrifugo_node_messages_sent_count", "Number of messages sent by node to broker.",
            type="publication",
        )  # fmt: skip
        # `metrics.action("publish")` looked up per call costs a sorted label tuple each.
        self._publish_actions = self.metrics.cell(
            "centrifugo_node_action_count", "Number of various actions called.",
            action="publish",
        )  # fmt: skip

    def attach_fanout(self, fanout: Fanout) -> None:
        self._fanouts.append(fanout)

    def attach_broker(self, broker: Broker) -> None:
        """Several nodes: committed publications and join/leave also go to the others."""
        self._broker = broker

    # -- channels -------------------------------------------------------------------------

    def resolve(self, channel: str) -> ChannelName:
        """Namespace of `channel`; raises Error 102 for an empty or unknown one, 107 for a
        name over `channel_max_length` or not matching the namespace's `channel_regex`
        (`channels.resolve`: every publish, read, presence and subscription path)."""
        return resolve(self.config, channel)

    def meta_ttl(self, name: ChannelName) -> float:
        return name.options.history_meta_ttl or self.config.global_history_meta_ttl

    # -- publish --------------------------------------------------------------------------

    async def publish(
        self,
        channel: str,
        data: bytes,
        *,
        info: ClientInfo | None = None,
        tags: Mapping[str, str] | None = None,
        skip_history: bool = False,
        idempotency_key: str = "",
        name: ChannelName | None = None,
    ) -> PublishResult:
        """Make a publication durable (when the channel keeps history or a key is given),
        then fan it out. Returns only after the commit. Fan-out happens synchronously on the
        writer's task right after the commit (`SubmitMany`'s on_commit), so local delivery
        order equals commit order."""
        name = name or self.resolve(channel)
        item = PublishItem(name, data, info, tags, skip_history, idempotency_key)
        result = (await self.publish_many((item,)))[0]
        if isinstance(result, Error):
            raise result
        return result

    async def publish_many(self, items: Sequence[PublishItem]) -> list[PublishResult | Error]:
        """`publish` for several publications: the ones that go to the log are committed
        in one transaction, then each is fanned out in order. Results in `items` order; a
        failed commit gives every logged item Error 100 (the others were delivered)."""
        results: list[PublishResult | Error] = [PublishResult()] * len(items)
        self._publish_actions.value += len(items)
        requests: list[AppendRequest] = []
        logged: list[int] = []
        fenced: set[str] = set()  # channels whose broker barrier was passed in this call
        for i, item in enumerate(items):
            request = self._append_request(item)
            if request is None:
                tags = dict(sorted(item.tags.items())) if item.tags else {}
                pub = Publication(data=item.data, info=item.info, tags=tags)
                channel = item.name.channel
                if self._broker is not None and channel not in fenced:
                    # No offset to sequence by: deliver after what other nodes published
                    # before (they get ours through the broker, after it too).
                    await self._broker.barrier(channel)
                    fenced.add(channel)
                self._deliver(item.name.channel, pub, "")
                if self._broker is not None:
                    await self._broadcast(item.name.channel, pub, "")
            else:
                requests.append(request)
                logged.append(i)
        if not requests:
            return results

        def deliver(appended: list[AppendResult]) -> None:
            # On the writer's task, right after the commit: deliveries in commit order,
            # a loop iteration sooner than from this coroutine.
            for i, result in zip(logged, appended, strict=True):
                if not result.suppressed:
                    self._deliver(items[i].name.channel, result.publication, result.epoch)

        try:
            appended = await self._submit_many(requests, on_commit=deliver)
        except StorageError as exc:
            log.error("publish to %r failed: %s", requests[0].channel, exc)
            for i in logged:
                results[i] = Error.of(ErrorCode.INTERNAL)
            return results
        for i, result in zip(logged, appended, strict=True):
            if self._broker is not None and not result.suppressed:
                await self._broadcast(items[i].name.channel, result.publication, result.epoch)
            results[i] = PublishResult(result.publication.offset, result.epoch, result.suppressed)
        return results

    def _append_request(self, item: PublishItem) -> AppendRequest | None:
        """What the log must store for `item`; None when nothing (no history, no key)."""
        opts = item.name.options
        keep = opts.history_enabled and not item.skip_history
        if not keep and not item.idempotency_key:
            return None
        return AppendRequest(
            channel=item.name.channel,
            data=item.data,
            info=item.info,
            tags=tuple(sorted(item.tags.items())) if item.tags else (),
            history_size=opts.history_size if keep else 0,
            history_ttl=opts.history_ttl if keep else 0.0,
            meta_ttl=self.meta_ttl(item.name),
            idempotency_key=item.idempotency_key,
            idempotent_ttl=self.config.idempotent_result_ttl,
        )

    def _deliver(self, channel: str, pub: Publication, epoch: str) -> None:
        self._sent_pub.value += 1
        for fanout in self._fanouts:
            fanout.deliver(channel, pub, epoch)

    async def _broadcast(self, channel: str, pub: Publication, epoch: str) -> None:
        """To the other nodes. A failure is only logged: the publication is durable and
        other nodes fill the gap from the log (history channels)."""
        if self._broker is None:
            return
        try:
            await self._broker.publish(channel, pub, epoch)
        except StorageError as exc:
            self.metrics.broker_error("publish")
            log.warning("publication to %r not sent to other nodes: %s", channel, exc)

    def join(self, channel: str, info: ClientInfo) -> None:
        self.metrics.action("join")
        self.metrics.inc("centrifugo_node_messages_sent_count", type="join")
        for fanout in self._fanouts:
            fanout.join(channel, info)
        self._join_leave_remote(channel, info, True)

    def leave(self, channel: str, info: ClientInfo) -> None:
        self.metrics.action("leave")
        self.metrics.inc("centrifugo_node_messages_sent_count", type="leave")
        for fanout in self._fanouts:
            fanout.leave(channel, info)
        self._join_leave_remote(channel, info, False)

    def _join_leave_remote(self, channel: str, info: ClientInfo, join: bool) -> None:
        if self._broker is None:
            return
        task = asyncio.get_running_loop().create_task(
            self._send_join_leave(self._broker, channel, info, join)
        )
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _send_join_leave(
        self, broker: Broker, channel: str, info: ClientInfo, join: bool
    ) -> None:
        try:
            await broker.publish_join_leave(channel, info, join)
        except StorageError as exc:
            self.metrics.broker_error("join" if join else "leave")
            log.warning("join/leave in %r not sent to other nodes: %s", channel, exc)

    # -- history --------------------------------------------------------------------------

    async def history(
        self,
        channel: str,
        *,
        limit: int = 0,
        since: StreamPosition | None = None,
        reverse: bool = False,
        name: ChannelName | None = None,
    ) -> HistoryResult:
        """Read a channel stream. Error 108 when history is off, 112 on an epoch mismatch."""
        name = name or self.resolve(channel)
        if not name.options.history_enabled:
            raise Error.of(ErrorCode.NOT_AVAILABLE)
        query = HistoryQuery(channel, limit, since, reverse, self.meta_ttl(name))
        self.metrics.action("history")
        try:
            return await self.event_log.history(query)
        except UnrecoverablePosition as exc:
            raise Error.of(ErrorCode.UNRECOVERABLE_POSITION) from exc
        except StorageError as exc:
            self.metrics.log_error("history")
            log.error("history of %r failed: %s", channel, exc)
            raise Error.of(ErrorCode.INTERNAL) from exc

    async def history_many(
        self, reads: Sequence[tuple[str, int, StreamPosition | None, ChannelName]]
    ) -> list[HistoryResult | Error]:
        """`history(channel, limit=, since=, name=)` of each (channel, limit, since, name) in
        one log call; results in order, each read's error (108, 112, 100) in its place."""
        out: list[HistoryResult | Error | None] = [None] * len(reads)
        queries: list[HistoryQuery] = []
        index: list[int] = []
        for i, (channel, limit, since, name) in enumerate(reads):
            if not name.options.history_enabled:
                out[i] = Error.of(ErrorCode.NOT_AVAILABLE)
                continue
            self.metrics.action("history")
            queries.append(HistoryQuery(channel, limit, since, False, self.meta_ttl(name)))
            index.append(i)
        if queries:
            try:
                results = await self.event_log.history_many(queries)
            except StorageError as exc:
                self.metrics.log_error("history")
                log.error("history of %d channels failed: %s", len(queries), exc)
                results = [exc] * len(queries)
            for i, result in zip(index, results, strict=True):
                if isinstance(result, HistoryResult):
                    out[i] = result
                elif isinstance(result, UnrecoverablePosition):
                    out[i] = Error.of(ErrorCode.UNRECOVERABLE_POSITION)
                else:
                    out[i] = Error.of(ErrorCode.INTERNAL)
        return out  # type: ignore[return-value]  # every index was filled above

    async def stream_top(self, channel: str, name: ChannelName | None = None) -> StreamPosition:
        return (await self.history(channel, name=name)).position

    async def history_remove(self, channel: str) -> None:
        name = self.resolve(channel)
        if not name.options.history_enabled:
            raise Error.of(ErrorCode.NOT_AVAILABLE)
        self.metrics.action("remove_history")
        try:
            await self.event_log.remove_history(channel)
        except StorageError as exc:
            self.metrics.log_error("remove_history")
            raise Error.of(ErrorCode.INTERNAL) from exc

    # -- presence -------------------------------------------------------------------------

    async def presence(self, channel: str) -> dict[str, ClientInfo]:
        """Error 108 when presence is off; 100 when the presence store fails."""
        if not self.resolve(channel).options.presence:
            raise Error.of(ErrorCode.NOT_AVAILABLE)
        self.metrics.action("presence")
        try:
            return await self.presence_manager.presence(channel)
        except StorageError as exc:
            log.error("presence of %r failed: %s", channel, exc)
            raise Error.of(ErrorCode.INTERNAL) from exc

    async def presence_stats(self, channel: str) -> PresenceStats:
        if not self.resolve(channel).options.presence:
            raise Error.of(ErrorCode.NOT_AVAILABLE)
        self.metrics.action("presence_stats")
        try:
            return await self.presence_manager.stats(channel)
        except StorageError as exc:
            log.error("presence stats of %r failed: %s", channel, exc)
            raise Error.of(ErrorCode.INTERNAL) from exc
