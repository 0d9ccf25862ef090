"""The SQLite log's WAL is checkpointed by a thread of its own (storage/sqlite_wal.py), not
inside the writer's COMMITs."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from centripy.engine.contracts import AppendRequest
from centripy.storage.sqlite import SqliteEventLog, in_worker
from centripy.storage.sqlite_wal import BACKSTOP_PAGES, WalCheckpointer


def checkpointer(log: SqliteEventLog) -> WalCheckpointer:
    wal = log._wal
    assert wal is not None
    return wal


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.005)


async def append(log: SqliteEventLog, n: int) -> None:
    for i in range(n):  # one transaction each, as at a low publish rate
        await log.append(
            AppendRequest(f"room:{i % 7}", b'{"n":%d}' % i, history_size=50, history_ttl=60)
        )


async def test_the_writer_keeps_only_a_backstop_checkpoint(sqlite_log: SqliteEventLog) -> None:
    assert sqlite_log._raw is not None

    def pragma(db: sqlite3.Connection) -> int:
        return int(db.execute("PRAGMA wal_autocheckpoint").fetchone()[0])

    assert await in_worker(sqlite_log._raw, pragma) == BACKSTOP_PAGES


async def test_written_frames_are_checkpointed_and_the_wal_starts_over(
    sqlite_log: SqliteEventLog,
) -> None:
    wal = checkpointer(sqlite_log)
    await append(sqlite_log, 60)
    await until(lambda: wal.last is not None and wal.last[2] == wal.last[1] >= 60)
    frames = wal.last[1] if wal.last else 0
    done = wal.checkpoints
    await append(sqlite_log, 1)  # the WAL was fully copied: this transaction starts it over
    await until(lambda: wal.checkpoints > done)
    assert wal.last is not None and wal.last[0] == 0
    assert wal.last[2] == wal.last[1] < frames


async def test_an_idle_log_runs_no_checkpoints_and_its_thread_sleeps(
    sqlite_log: SqliteEventLog,
) -> None:
    wal = checkpointer(sqlite_log)
    await asyncio.sleep(0.2)  # four intervals before any transaction
    assert wal.wakeups == 0
    await append(sqlite_log, 1)
    await until(lambda: wal.checkpoints == 1)
    await asyncio.sleep(0.3)  # six intervals without a transaction
    assert wal.checkpoints == 1 and wal.wakeups == 1


async def test_transactions_of_one_interval_share_a_checkpoint(
    sqlite_log: SqliteEventLog,
) -> None:
    wal = checkpointer(sqlite_log)
    await append(sqlite_log, 20)  # well within one 50 ms interval
    await until(lambda: wal.checkpoints >= 1)
    await asyncio.sleep(0.15)
    assert wal.checkpoints <= 4 and wal.wakeups == wal.checkpoints  # not one per transaction
    assert wal.last is not None and wal.last[2] == wal.last[1]  # everything copied


async def test_close_stops_the_thread(tmp_path: Path) -> None:
    log = SqliteEventLog(f"sqlite+aiosqlite:///{tmp_path / 'events.db'}", gc_interval=None)
    await log.start()
    wal = checkpointer(log)
    await append(log, 3)
    await log.close()
    assert not wal._thread.is_alive()
    assert log._wal is None


async def test_close_waits_for_a_stuck_checkpoint_only_so_long(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    stuck = threading.Event()  # a checkpoint that does not return (a stuck disk)
    wal = WalCheckpointer(str(tmp_path / "events.db"))
    wal._thread = threading.Thread(target=stuck.wait, args=(10,), daemon=True)
    wal.start()
    try:
        async with asyncio.timeout(2):
            await wal.close(timeout=0.2)
        assert wal._thread.is_alive()
        assert "not waited for" in caplog.text
    finally:
        stuck.set()


async def test_a_memory_database_has_no_checkpointer() -> None:
    log = SqliteEventLog("sqlite+aiosqlite://", gc_interval=None)
    await log.start()
    try:
        await append(log, 3)
        assert log._wal is None
    finally:
        await log.close()
