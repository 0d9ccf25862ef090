"""The outbox consumer loop shared by the PostgreSQL and SQLite outboxes
(docs/spec/server_api.md 4.2).

One task per partition 0..N-1 repeats: in one transaction that owns the partition (a
PostgreSQL advisory lock, or SQLite's write lock), select up to `partition_select_limit`
rows in id order, dispatch them in order and stop at the first retryable failure, delete the
rows that were applied or skipped, commit. A retryable failure or a lost database waits a
backoff (min(5 s, (10 ms + jitter) * 2^n)) and tries again; a row that keeps failing is
skipped after `max_retries` retries (dispatch.RetryLimit; 0 = forever, as Centrifugo).
Nothing here ever raises into the server. After a partial batch the task sleeps
`partition_poll_interval`, or less when `wake(partition)` is called (PostgreSQL
LISTEN/NOTIFY).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from centripy.consumers.backoff import Backoff
from centripy.consumers.dispatch import (
    DEFAULT_MAX_RETRIES,
    BatchOutcome,
    ConsumerStats,
    Dispatcher,
    Item,
    RetryLimit,
    apply_in_order,
)

log = logging.getLogger("centripy.consumers")

Apply = Callable[[Sequence[Item]], Awaitable[BatchOutcome]]


@dataclass(frozen=True, slots=True)
class OutboxSettings:
    num_partitions: int = 1
    select_limit: int = 100
    poll_interval: float = 0.3
    max_retries: int = DEFAULT_MAX_RETRIES  # of one failing row; 0: forever


class OutboxStore(Protocol):
    """Database side of an outbox; every method runs on the event loop."""

    label: str  # for log lines, e.g. 'table "centrifugo_outbox"'

    async def start(self) -> None:
        """Connect and check the database answers; raise ConsumerStartError if not."""

    async def process(self, partition: int, limit: int, apply: Apply) -> tuple[int, BatchOutcome]:
        """In one transaction owning `partition`: read up to `limit` rows in id order as
        items, `await apply(items)`, delete the first `outcome.done` rows, commit. Returns
        (rows read, outcome). Database errors propagate; the caller retries."""
        ...

    async def close(self) -> None:
        """Release connections; never raises."""


class Waker(Protocol):
    """Something that calls `wake` (the PostgreSQL LISTEN connection); loop only."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class OutboxConsumer:
    """Runs the per-partition tasks of one outbox consumer. All methods run on the event
    loop; `stop()` lets the batches in flight finish (bounded) before releasing the store."""

    def __init__(
        self,
        name: str,
        store: OutboxStore,
        dispatcher: Dispatcher,
        settings: OutboxSettings,
        stats: ConsumerStats,
    ) -> None:
        self.name = name
        self._store = store
        self._dispatcher = dispatcher
        self._settings = settings
        self._stats = stats
        self._wakeups = [asyncio.Event() for _ in range(settings.num_partitions)]
        self._stopping = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.waker: Waker | None = None

    async def start(self) -> None:
        """Connect (ConsumerStartError if the database does not answer), then start the
        partition tasks and the waker."""
        await self._store.start()
        for partition in range(self._settings.num_partitions):
            task = asyncio.create_task(
                self._partition_loop(partition), name=f"consumer-{self.name}-{partition}"
            )
            self._tasks.append(task)
        if self.waker is not None:
            await self.waker.start()
        log.info(
            "consumer %s: consuming %s, %d partition(s)",
            self.name, self._store.label, self._settings.num_partitions,
        )  # fmt: skip

    def wake(self, partition: int) -> None:
        """Cut the poll wait of `partition` short (1-slot: repeated wakes coalesce)."""
        if 0 <= partition < len(self._wakeups):
            self._wakeups[partition].set()

    def wake_all(self) -> None:
        for event in self._wakeups:
            event.set()

    async def stop(self, timeout: float = 5.0) -> None:
        """Finish the batches in flight (cancelled after `timeout` s; their rows stay in the
        table and are consumed again later), stop the waker, close the store."""
        self._stopping.set()
        self.wake_all()
        if self.waker is not None:
            await self.waker.stop()
        if self._tasks:
            _done, pending = await asyncio.wait(self._tasks, timeout=timeout)
            for task in pending:
                task.cancel()
            for task in pending:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self._store.close()
        log.info("consumer %s: stopped", self.name)

    def stats(self) -> dict[str, object]:
        return self._stats.snapshot()

    # -- per-partition task -----------------------------------------------------------------

    async def _apply(self, retry_limit: RetryLimit, items: Sequence[Item]) -> BatchOutcome:
        return await apply_in_order(self._dispatcher, items, self.name, retry_limit)

    async def _partition_loop(self, partition: int) -> None:
        backoff = Backoff()
        wakeup = self._wakeups[partition]
        limit = self._settings.select_limit
        apply = functools.partial(self._apply, RetryLimit(self._settings.max_retries))
        while not self._stopping.is_set():
            wakeup.clear()  # before reading: a NOTIFY during the batch is not lost
            try:
                fetched, outcome = await self._store.process(partition, limit, apply)
            except Exception as exc:
                self._stats.errors += 1
                delay = backoff.next_delay()
                log.warning(
                    "consumer %s: partition %d: database error (retry %d in %.2f s): %s: %s",
                    self.name, partition, backoff.retries, delay, type(exc).__name__, exc,
                )  # fmt: skip
                await self._sleep(delay, self._stopping)
                continue
            self._stats.add(outcome)
            if outcome.failure is not None:
                delay = backoff.next_delay()
                log.info(
                    "consumer %s: partition %d waits %.3f s before retry %d",
                    self.name, partition, delay, backoff.retries,
                )  # fmt: skip
                await self._sleep(delay, self._stopping)
                continue
            if backoff.retries:
                log.info("consumer %s: partition %d: recovered", self.name, partition)
            backoff.reset()
            if fetched < limit:
                await self._sleep(self._settings.poll_interval, wakeup)

    @staticmethod
    async def _sleep(delay: float, event: asyncio.Event) -> None:
        """Wait `delay` seconds or until `event` is set (stop() sets every event)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), delay)
