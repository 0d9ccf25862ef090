"""The node's one group-committing writer to the event log (docs/design/ARCHITECTURE.md decision 2).

Single-row commits cap at ~1-3k rows/s; batching up to `max_batch` rows or `max_delay`
seconds per transaction reaches ~70-140k rows/s. A caller's `submit` returns only after the
batch holding its request has committed.

Batching rule: one batch is in flight at a time; requests arriving while it commits form the
next batch. Before committing, the writer yields to the loop while new requests keep
arriving (callers woken by the previous batch resubmit within an iteration or two), but no
longer than `max_delay` after the oldest request and never beyond `max_batch` requests.
`submit_many` queues several requests as one unit: they share a batch (one transaction),
however many they are.
A failed batch fails every waiter of that batch with StorageError (the log's transaction
applied none of it). Duplicate idempotency keys inside one batch behave as sequential
calls: the log's `append_many` handles them.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

from centripy.engine.contracts import (
    AppendRequest,
    AppendResult,
    EventLog,
    OnCommit,
    StorageError,
)
from centripy.engine.metrics import Metrics
from centripy.storage.rules import Checked, check_append

log = logging.getLogger("centripy.storage.writer")


@dataclass(slots=True)
class _Pending:
    requests: Sequence[AppendRequest]  # committed in one batch
    future: asyncio.Future[list[AppendResult]]
    at: float  # loop.time() when submitted
    on_commit: OnCommit | None


def batch_error(exc: BaseException) -> StorageError:
    """A fresh StorageError per waiter (tracebacks are not shared), cause chained."""
    err = StorageError(f"event log batch failed: {exc}")
    err.__cause__ = exc
    return err


class GroupCommitWriter:
    """Owns the batching task. `start`, `submit` and `close` run on the server's event loop.
    The writer neither starts nor closes `log`; its owner does (close the writer first)."""

    def __init__(self, log: EventLog, max_batch: int = 500, max_delay: float = 0.002) -> None:
        if not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be an int >= 1, got {max_batch!r}")
        if not math.isfinite(max_delay) or max_delay < 0:
            raise ValueError(f"max_delay must be a finite number >= 0, got {max_delay!r}")
        self._log = log
        self._max_batch = max_batch
        self._max_delay = max_delay
        self._pending: collections.deque[_Pending] = collections.deque()
        self._queued = 0  # requests in self._pending
        self._wake = asyncio.Event()  # set when work arrives or on close
        self._task: asyncio.Task[None] | None = None
        # The loop `start` ran on: asyncio.get_running_loop() costs a getpid() syscall per
        # call on Python 3.11, ~8% of a publish's CPU when called per submit.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False
        # The node's metrics (set by the composition root): per batch, its size, its
        # transaction's duration and whether it failed.
        self.metrics: Metrics | None = None

    async def start(self) -> None:
        """Start the batching task on the running loop (idempotent)."""
        if self._closing:
            raise StorageError("writer is closed")
        if self._task is None:
            self._loop = loop = asyncio.get_running_loop()
            self._task = loop.create_task(self._run(), name="centripy-log-writer")

    async def submit(self, request: AppendRequest) -> AppendResult:
        """Queue `request` and wait until its batch commits. Invalid requests raise
        ValueError here and never reach a batch. A caller cancelled after its batch was
        taken still has its publication stored (the transaction is not undone)."""
        return (await self.submit_many((request,)))[0]

    async def submit_many(
        self, requests: Sequence[AppendRequest], *, on_commit: OnCommit | None = None
    ) -> list[AppendResult]:
        """`submit` for several requests at once: they are committed in one batch, in
        order (as `append_many` would), and their results come back in the same order.
        `on_commit(results)` runs on the writer's task right after the commit, units in
        commit order, even when the caller was cancelled meanwhile: the node delivers
        publications there, a loop iteration before the caller resumes (an exception
        it raises is logged)."""
        for request in requests:
            check_append(request)
        if self._closing:
            raise StorageError("writer is closed")
        loop = self._loop
        if loop is None:
            raise StorageError("writer is not started")
        if not requests:
            return []
        future: asyncio.Future[list[AppendResult]] = loop.create_future()
        self._pending.append(_Pending(requests, future, loop.time(), on_commit))
        self._queued += len(requests)
        if len(self._pending) == 1:
            self._wake.set()
        return await future

    async def close(self) -> None:
        """Stop accepting requests, commit everything already submitted, stop the task."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await self._task

    @property
    def pending(self) -> int:
        """Requests submitted and not yet taken into a batch."""
        return self._queued

    async def _run(self) -> None:
        try:
            while self._pending or not self._closing:
                if not self._pending:
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                await self._gather()
                batch = self._take()
                if batch:
                    await self._commit(batch)
        finally:
            self._fail_all(StorageError("writer stopped before the request was committed"))

    async def _gather(self) -> None:
        """Let the batch fill: yield to the loop while requests keep arriving, until it is
        full or its oldest request has waited `max_delay`. A loop iteration that brings no
        new request ends the wait (nobody else is coming now: do not add latency)."""
        loop = self._loop
        assert loop is not None
        deadline = self._pending[0].at + self._max_delay
        while self._queued < self._max_batch and not self._closing:
            if loop.time() >= deadline:
                return
            before = self._queued
            await asyncio.sleep(0)
            if self._queued == before:
                return

    def _take(self) -> list[_Pending]:
        """Units of work up to `max_batch` requests (a larger unit goes alone)."""
        batch: list[_Pending] = []
        rows = 0
        while self._pending and (
            not rows or rows + len(self._pending[0].requests) <= self._max_batch
        ):
            item = self._pending.popleft()
            self._queued -= len(item.requests)
            if not item.future.done():  # skip callers cancelled while waiting
                batch.append(item)
                rows += len(item.requests)
        return batch

    async def _commit(self, batch: list[_Pending]) -> None:
        requests = Checked(request for item in batch for request in item.requests)
        started = time.perf_counter()
        try:
            results = await self._log.append_many(requests)
            if len(results) != len(requests):
                raise StorageError(
                    f"append_many returned {len(results)} results for {len(requests)}"
                )
        except asyncio.CancelledError:
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(StorageError("writer cancelled mid-batch"))
            raise
        except Exception as exc:
            self._observe(len(requests), started, True)
            if not isinstance(exc, StorageError):
                log.exception("event log append_many failed unexpectedly")
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(batch_error(exc))
            return
        self._observe(len(requests), started, False)
        start = 0
        for item in batch:
            end = start + len(item.requests)
            mine = results[start:end]
            if item.on_commit is not None:
                try:
                    item.on_commit(mine)
                except Exception:
                    log.exception("on_commit of a committed batch failed")
            if not item.future.done():
                item.future.set_result(mine)
            start = end

    def _observe(self, rows: int, started: float, failed: bool) -> None:
        if self.metrics is not None:
            self.metrics.log_commit(rows, time.perf_counter() - started, failed)

    def _fail_all(self, exc: StorageError) -> None:
        while self._pending:
            item = self._pending.popleft()
            self._queued -= len(item.requests)
            if not item.future.done():
                item.future.set_exception(batch_error(exc))
