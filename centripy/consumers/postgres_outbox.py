"""The PostgreSQL transactional outbox consumer (docs/spec/server_api.md 4.2), on asyncpg.

The application inserts `(method, payload, partition)` rows into the outbox table in the same
transaction as its own data; this consumer applies them in id order per partition:

    BEGIN (READ COMMITTED)
    SELECT pg_advisory_xact_lock(hashtext('centrifugo_partition_lock_' || name || partition))
    SELECT id, method, payload FROM <table> WHERE partition = $1 ORDER BY id ASC LIMIT $2
    -- dispatch in order, stop at the first retryable failure
    DELETE FROM <table> WHERE id = ANY($1)   -- the rows applied or skipped
    COMMIT

The advisory lock serialises a partition across every server sharing the table (same consumer
name), so order holds with several nodes. With `partition_notification_channel` set, one
extra connection LISTENs on it; a notification whose payload is a partition number wakes that
partition's worker (reconnecting 1 s after any error). Connections carry
`application_name=centripy-consumer-<name>`. Everything runs on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Callable
from typing import Any, Final

import asyncpg

from centripy.consumers.dispatch import (
    BatchOutcome,
    ConsumerStartError,
    Item,
    outbox_item,
)
from centripy.consumers.outbox import Apply
from centripy.storage.broker_postgres import asyncpg_dsn

log = logging.getLogger("centripy.consumers")

CONNECT_TIMEOUT: Final = 10.0  # seconds, the start-up ping and every (re)connect
LISTEN_RETRY: Final = 1.0  # seconds between LISTEN reconnects, as in Centrifugo
LISTEN_CHECK: Final = 10.0  # seconds between liveness checks of the LISTEN connection
CLOSE_TIMEOUT: Final = 3.0
_IDENT: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_$]*(\.[A-Za-z_][A-Za-z0-9_$]*)?")


def lock_key(consumer: str, partition: int) -> str:
    """The advisory lock name of a partition, exactly as Centrifugo builds it (no separator:
    `centrifugo_partition_lock_pg_outbox0`)."""
    return f"centrifugo_partition_lock_{consumer}{partition}"


def table_identifier(name: str) -> str:
    """`name` if it is a plain `[schema.]table` identifier (used unquoted, as Centrifugo
    does, so PostgreSQL folds it to lower case); anything else is refused."""
    if not _IDENT.fullmatch(name):
        raise ConsumerStartError(
            f"outbox_table_name {name!r} is not a plain [schema.]table identifier"
        )
    return name


def parse_partition(payload: str, num_partitions: int) -> int | None:
    """The partition a NOTIFY payload names, or None when it is not one of 0..N-1."""
    text = payload.strip()
    if not text.lstrip("-").isdigit():
        return None
    partition = int(text)
    return partition if 0 <= partition < num_partitions else None


def application_name(consumer: str) -> str:
    return f"centripy-consumer-{consumer}"


class PostgresOutboxStore:
    """The outbox table through an asyncpg pool (one connection per busy partition)."""

    def __init__(self, consumer: str, dsn: str, table: str, num_partitions: int) -> None:
        self.consumer = consumer
        try:  # SQLAlchemy-style `postgresql+asyncpg://` as well as libpq URLs
            self.dsn = asyncpg_dsn(dsn)
        except ValueError as exc:
            raise ConsumerStartError(f"consumer {consumer}: {exc}") from exc
        self.table = table_identifier(table)
        self.label = f'PostgreSQL table "{table}"'
        self._pool_size = max(1, num_partitions)
        self._pool: asyncpg.Pool | None = None
        self._select = (
            f"SELECT id, method, payload FROM {self.table} "
            "WHERE partition = $1 ORDER BY id ASC LIMIT $2"
        )
        self._delete = f"DELETE FROM {self.table} WHERE id = ANY($1::bigint[])"

    def connect_kwargs(self) -> dict[str, Any]:
        return {
            "timeout": CONNECT_TIMEOUT,
            "server_settings": {"application_name": application_name(self.consumer)},
        }

    async def start(self) -> None:
        try:
            pool = await asyncio.wait_for(
                asyncpg.create_pool(
                    self.dsn, min_size=1, max_size=self._pool_size, **self.connect_kwargs()
                ),
                CONNECT_TIMEOUT,
            )
            self._pool = pool
            await pool.fetchval("SELECT 1", timeout=CONNECT_TIMEOUT)
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            await self.close()
            raise ConsumerStartError(
                f"consumer {self.consumer}: cannot connect to PostgreSQL: {exc!r}"
            ) from exc

    async def process(self, partition: int, limit: int, apply: Apply) -> tuple[int, BatchOutcome]:
        if self._pool is None:
            raise RuntimeError("store not started")
        async with self._pool.acquire() as conn, conn.transaction(isolation="read_committed"):
            await conn.execute(
                "SELECT pg_advisory_xact_lock(hashtext($1))", lock_key(self.consumer, partition)
            )
            rows = await conn.fetch(self._select, partition, limit)
            items: list[Item] = [
                outbox_item(row[1], row[2], f"{self.table} partition {partition} id {row[0]}")
                for row in rows
            ]
            outcome = await apply(items)
            if outcome.done:
                await conn.execute(self._delete, [row[0] for row in rows[: outcome.done]])
        return len(rows), outcome

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is None:
            return
        try:
            await asyncio.wait_for(pool.close(), CLOSE_TIMEOUT)
        except Exception:
            pool.terminate()


class NotifyListener:
    """LISTENs on the notification channel on its own connection; reconnects 1 s after an
    error and then wakes every partition (notifications sent meanwhile were lost)."""

    def __init__(
        self,
        store: PostgresOutboxStore,
        channel: str,
        num_partitions: int,
        wake: Callable[[int], None],
        wake_all: Callable[[], None],
    ) -> None:
        self._store = store
        self._channel = channel
        self._num_partitions = num_partitions
        self._wake = wake
        self._wake_all = wake_all
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(
            self._run(), name=f"consumer-{self._store.consumer}-listen"
        )

    async def stop(self) -> None:
        self._stopping.set()
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _on_notify(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        partition = parse_partition(payload, self._num_partitions)
        if partition is None:
            log.warning(
                "consumer %s: ignoring notification %r on %s: not a partition 0..%d",
                self._store.consumer, payload, self._channel, self._num_partitions - 1,
            )  # fmt: skip
            return
        self._wake(partition)

    async def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                await self._listen_once()
            except Exception as exc:
                log.warning(
                    "consumer %s: LISTEN %s failed, reconnecting in %.0f s: %s: %s",
                    self._store.consumer, self._channel, LISTEN_RETRY, type(exc).__name__, exc,
                )  # fmt: skip
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), LISTEN_RETRY)

    async def _listen_once(self) -> None:
        conn = await asyncpg.connect(self._store.dsn, **self._store.connect_kwargs())
        lost = asyncio.Event()
        conn.add_termination_listener(lambda _conn: lost.set())
        try:
            await conn.add_listener(self._channel, self._on_notify)
            log.info("consumer %s: listening on %s", self._store.consumer, self._channel)
            self._wake_all()
            while not lost.is_set():
                try:
                    await asyncio.wait_for(lost.wait(), LISTEN_CHECK)
                except TimeoutError:
                    await conn.fetchval("SELECT 1", timeout=CONNECT_TIMEOUT)
            raise ConnectionError("LISTEN connection closed")
        finally:
            if not conn.is_closed():
                try:
                    await asyncio.wait_for(conn.close(), CLOSE_TIMEOUT)
                except Exception:
                    conn.terminate()
