"""Log reads shared by the connection actors of one node (subscribe positions, recovery).

When many clients subscribe to the same channel at once (a reconnect storm after a deploy:
thousands of them with the same `recover` offset and epoch), each would read the same
stream from the log: one transaction per client, which on PostgreSQL also updates the same
stream row (the read touches its expiry), so the reads serialise on its row lock. Here the
reads of one (channel, limit, since) key share: the first caller reads at once; callers
that come while that read runs wait for the next read, which starts when the running one
ends and answers all of them.

The ordering guarantee of `subscribe_channel` holds for every caller: a caller always gets
the result of a read that *started after* it called (the one in flight when it came is
never handed to it), and it called after joining the channel actor, so every publication
missing from that result is committed after the read started and reaches the caller live.

All methods run on the event loop.
"""

from __future__ import annotations

import asyncio
from typing import Any

from centripy.engine.channels import ChannelName
from centripy.engine.contracts import HistoryResult
from centripy.engine.node import Node
from centripy.engine.types import StreamPosition

Key = tuple[str, int, int, str, bool]  # channel, limit, since offset, since epoch, has since


class _Slot:
    """The callers waiting for the next read of one key (a read of it is in flight)."""

    __slots__ = ("waiting",)

    def __init__(self) -> None:
        # each with the channel's resolved name at its call (a config reload may change it)
        self.waiting: list[tuple[asyncio.Future[HistoryResult], ChannelName]] = []


class SharedReads:
    """`history()` with the semantics of `Node.history(channel, limit=, since=, name=)`,
    shared between concurrent callers as the module docstring says."""

    def __init__(self, node: Node) -> None:
        self._node = node
        self._slots: dict[Key, _Slot] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self.reads = 0  # reads made (for tests and benchmarks)

    async def history(
        self, channel: str, *, limit: int, since: StreamPosition | None, name: ChannelName
    ) -> HistoryResult:
        """Raises what `Node.history` raises (the same exception for every sharer)."""
        if since is None:
            key: Key = (channel, limit, 0, "", False)
        else:
            key = (channel, limit, since.offset, since.epoch, True)
        slot = self._slots.get(key)
        if slot is not None:  # a read is in flight: wait for the next one
            future: asyncio.Future[HistoryResult] = asyncio.get_running_loop().create_future()
            slot.waiting.append((future, name))
            return await future
        self._slots[key] = _Slot()  # nobody reading: read here; later callers queue
        try:
            return await self._read(channel, limit, since, name)
        finally:
            self._next(key, limit, since)

    async def _read(
        self, channel: str, limit: int, since: StreamPosition | None, name: ChannelName
    ) -> HistoryResult:
        self.reads += 1
        return await self._node.history(channel, limit=limit, since=since, name=name)

    def _next(self, key: Key, limit: int, since: StreamPosition | None) -> None:
        """The read of `key` ended: start one for the callers that came meanwhile (with the
        name the latest of them resolved), or forget the key."""
        slot = self._slots[key]
        if not slot.waiting:
            del self._slots[key]
            return
        name = slot.waiting[-1][1]
        batch, slot.waiting = [future for future, _ in slot.waiting], []
        task = asyncio.get_running_loop().create_task(self._answer(key, limit, since, name, batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _answer(
        self,
        key: Key,
        limit: int,
        since: StreamPosition | None,
        name: ChannelName,
        batch: list[asyncio.Future[HistoryResult]],
    ) -> None:
        try:
            result = await self._read(key[0], limit, since, name)
        except asyncio.CancelledError:  # the loop is going away: so are the callers
            for future in batch:
                future.cancel()
            raise
        except BaseException as exc:
            for future in batch:
                if not future.done():
                    future.set_exception(exc)
        else:
            for future in batch:
                if not future.done():
                    future.set_result(result)
        finally:
            self._next(key, limit, since)
