"""Presence in PostgreSQL (engine `postgresql`).

Table `<table>(channel, client, "user", conn_info, chan_info, expires_at)` with primary key
(channel, client): `add` upserts (refreshing the expiry), `remove` deletes, reads delete the
channel's expired rows and return the rest in one statement. Expiry times come from the
`now` clock of the calling node (unix seconds), so the nodes' clocks must roughly agree.
Rows of channels nobody reads are swept by `add` at most every `sweep_interval` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

import asyncpg

from centripy.engine.contracts import PresenceManager, PresenceStats, StorageError
from centripy.engine.types import ClientInfo
from centripy.storage.broker_postgres import PG_ERRORS, asyncpg_dsn, check_identifier


class PostgresPresence(PresenceManager):
    """Runs on the loop. `start()` (optional: the first call does it) opens the pool and
    creates the table; every method raises StorageError when the database fails."""

    def __init__(
        self,
        dsn: str,
        *,
        table: str = "centripy_presence",
        pool_size: int = 4,
        connect_timeout: float = 5.0,
        io_timeout: float = 5.0,
        sweep_interval: float = 60.0,
        now: Callable[[], float] = time.time,
    ) -> None:
        self._dsn = asyncpg_dsn(dsn)
        self._table = check_identifier(table, "table")
        self._pool_size = pool_size
        self._connect_timeout = connect_timeout
        self._io_timeout = io_timeout
        self._sweep_interval = sweep_interval
        self._now = now
        self._pool: asyncpg.Pool | None = None
        self._start_lock = asyncio.Lock()
        self._last_sweep = 0.0
        t = self._table
        self._sql_add = (
            f'INSERT INTO {t} (channel, client, "user", conn_info, chan_info, expires_at) '
            "VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (channel, client) DO UPDATE SET "
            '"user" = EXCLUDED."user", conn_info = EXCLUDED.conn_info, '
            "chan_info = EXCLUDED.chan_info, expires_at = EXCLUDED.expires_at"
        )
        self._sql_remove = f"DELETE FROM {t} WHERE channel = $1 AND client = $2"
        self._sql_read = (
            f"WITH gone AS (DELETE FROM {t} WHERE channel = $1 AND expires_at <= $2) "
            f'SELECT client, "user", conn_info, chan_info FROM {t} '
            "WHERE channel = $1 AND expires_at > $2"
        )
        self._sql_sweep = f"DELETE FROM {t} WHERE expires_at <= $1"

    async def start(self) -> None:
        """Open the pool and create the table (idempotent; safe on several nodes)."""
        async with self._start_lock:
            if self._pool is not None:
                return
            try:
                pool = await asyncpg.create_pool(
                    self._dsn,
                    min_size=0,
                    max_size=self._pool_size,
                    timeout=self._connect_timeout,
                    command_timeout=self._io_timeout,
                )
                await self._create_table(pool)
            except PG_ERRORS as exc:
                raise StorageError(f"postgres presence: {exc}") from exc
            self._pool = pool

    async def _create_table(self, pool: asyncpg.Pool) -> None:
        ddl = (
            f"CREATE TABLE IF NOT EXISTS {self._table} (channel text NOT NULL, "
            'client text NOT NULL, "user" text NOT NULL, conn_info bytea NOT NULL, '
            "chan_info bytea NOT NULL, expires_at double precision NOT NULL, "
            "PRIMARY KEY (channel, client))"
        )
        # another node may create it concurrently: the loser sees a duplicate
        with contextlib.suppress(asyncpg.UniqueViolationError, asyncpg.DuplicateTableError):
            await pool.execute(ddl)

    async def _run(self, fn: Callable[[asyncpg.Pool], Any]) -> Any:
        if self._pool is None:
            await self.start()
        assert self._pool is not None
        try:
            return await fn(self._pool)
        except PG_ERRORS as exc:
            raise StorageError(f"postgres presence: {exc}") from exc

    async def add(self, channel: str, info: ClientInfo, ttl: float) -> None:
        if ttl <= 0:
            raise ValueError("presence ttl must be positive")
        now = self._now()
        args = (channel, info.client, info.user, info.conn_info, info.chan_info, now + ttl)
        await self._run(lambda pool: pool.execute(self._sql_add, *args))
        if now - self._last_sweep >= self._sweep_interval:
            self._last_sweep = now
            await self._run(lambda pool: pool.execute(self._sql_sweep, now))

    async def remove(self, channel: str, client_id: str) -> None:
        await self._run(lambda pool: pool.execute(self._sql_remove, channel, client_id))

    async def presence(self, channel: str) -> dict[str, ClientInfo]:
        now = self._now()
        rows = await self._run(lambda pool: pool.fetch(self._sql_read, channel, now))
        return {
            row["client"]: ClientInfo(
                row["user"], row["client"], bytes(row["conn_info"]), bytes(row["chan_info"])
            )
            for row in rows
        }

    async def stats(self, channel: str) -> PresenceStats:
        entries = await self.presence(channel)
        users = {info.user for info in entries.values()}
        return PresenceStats(num_clients=len(entries), num_users=len(users))

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()
