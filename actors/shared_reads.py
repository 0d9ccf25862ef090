"""Log reads shared by the connection actors of one node (subscribe positions, recovery).

When many clients subscribe at once (a reconnect storm after a deploy: thousands of them,
on one channel or each on its own), each would read its stream from the log: one
transaction per client (and, on PostgreSQL, a round trip per statement). Here reads are
batched: the first caller starts a read at once; callers that come while it runs wait for
the next one, which starts when the running one ends and answers all of them in ONE
`Node.history_many` call (one log transaction), whatever their channels. Callers of the same
(channel, limit, since) key share one query of it.

The ordering guarantee of `subscribe_channel` holds for every caller: a caller always gets
the result of a read that *started after* it called (the one in flight when it came is
never handed to it), and it called after joining the channel actor, so every publication
missing from that result is committed after the read started and reaches the caller live.

All methods run on the event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from centripy.engine.channels import ChannelName
from centripy.engine.contracts import HistoryResult
from centripy.engine.node import Node
from centripy.engine.types import StreamPosition

Key = tuple[str, int, int, str, bool]  # channel, limit, since offset, since epoch, has since
MAX_BATCH = 2000  # keys per read; more wait for the next one (they called before it started)


class _Waiters:
    """The callers of one key waiting for the next read, with the channel's name as the
    latest of them resolved it (a config reload between two reads is not answered with the
    old options)."""

    __slots__ = ("futures", "name", "since")

    def __init__(self, name: ChannelName, since: StreamPosition | None) -> None:
        self.futures: list[asyncio.Future[HistoryResult]] = []
        self.name = name
        self.since = since


class SharedReads:
    """`history()` with the semantics of `Node.history(channel, limit=, since=, name=)`,
    batched between concurrent callers as the module docstring says."""

    def __init__(self, node: Node, max_batch: int = MAX_BATCH) -> None:
        self._node = node
        self._max_batch = max_batch
        self._waiting: dict[Key, _Waiters] = {}
        self._task: asyncio.Task[None] | None = None  # the reads in flight, one at a time
        self.reads = 0  # log reads made (for tests and benchmarks)
        self.keys = 0  # keys read, summed over the reads

    async def history(
        self, channel: str, *, limit: int, since: StreamPosition | None, name: ChannelName
    ) -> HistoryResult:
        """Raises what `Node.history` raises (the same exception for every sharer)."""
        if since is None:
            key: Key = (channel, limit, 0, "", False)
        else:
            key = (channel, limit, since.offset, since.epoch, True)
        waiters = self._waiting.get(key)
        if waiters is None:
            waiters = self._waiting[key] = _Waiters(name, since)
        else:
            waiters.name = name
        future: asyncio.Future[HistoryResult] = asyncio.get_running_loop().create_future()
        waiters.futures.append(future)
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())
        return await future

    async def _run(self) -> None:
        """Read for the waiting callers, batch after batch, until none is left."""
        try:
            while self._waiting:
                batch = self._take()
                await self._answer(batch)
        finally:
            self._task = None
            if self._waiting:  # cancelled with callers left (the loop is going away)
                for waiters in self._waiting.values():
                    for future in waiters.futures:
                        future.cancel()
                self._waiting.clear()

    def _take(self) -> list[tuple[Key, _Waiters]]:
        """Up to max_batch waiting keys, oldest first; they leave the waiting set now, so
        that callers from here on wait for a later read."""
        if len(self._waiting) <= self._max_batch:
            batch = list(self._waiting.items())
            self._waiting = {}
            return batch
        batch = []
        for key in list(self._waiting)[: self._max_batch]:
            batch.append((key, self._waiting.pop(key)))
        return batch

    async def _answer(self, batch: list[tuple[Key, _Waiters]]) -> None:
        self.reads += 1
        self.keys += len(batch)
        reads = [(key[0], key[1], w.since, w.name) for key, w in batch]
        try:
            results: Sequence[HistoryResult | Exception] = await self._node.history_many(reads)
        except asyncio.CancelledError:  # the loop is going away: so are the callers
            for _, waiters in batch:
                for future in waiters.futures:
                    future.cancel()
            raise
        except Exception as exc:
            results = [exc] * len(batch)
        for (_, waiters), result in zip(batch, results, strict=True):
            for future in waiters.futures:
                if future.done():  # the caller was cancelled
                    continue
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(result)
