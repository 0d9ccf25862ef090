"""Where the SQLite log's transactions run (storage/sqlite.py): small ones on the event loop's
thread, large ones, the GC and any that find the database locked on aiosqlite's worker thread,
never interleaved and in the order they were made."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from centripy.engine.contracts import AppendRequest, HistoryQuery, StorageError
from centripy.storage.sql import SMALL_ROWS
from centripy.storage.sqlite import SqliteEventLog


def request(channel: str, n: int) -> AppendRequest:
    return AppendRequest(channel, b'{"n":%d}' % n, history_size=2 * SMALL_ROWS, history_ttl=60)


def statement_threads(log: SqliteEventLog) -> list[int]:
    """The thread of every statement run on the log's connection from now on."""
    threads: list[int] = []
    assert log._db is not None
    log._db.set_trace_callback(lambda _sql: threads.append(threading.get_ident()))
    return threads


async def test_small_transactions_run_on_the_loops_thread(sqlite_log: SqliteEventLog) -> None:
    threads = statement_threads(sqlite_log)
    await sqlite_log.append(request("a", 1))
    await sqlite_log.append_many([request("a", i) for i in range(SMALL_ROWS)])
    await sqlite_log.history(HistoryQuery("a", limit=-1))
    await sqlite_log.remove_history("a")
    assert sqlite_log.worker_transactions == 0
    assert set(threads) == {threading.get_ident()}


async def test_large_appends_and_the_gc_run_on_the_worker_thread(
    sqlite_log: SqliteEventLog,
) -> None:
    threads = statement_threads(sqlite_log)
    results = await sqlite_log.append_many([request("a", i) for i in range(SMALL_ROWS + 1)])
    assert [r.publication.offset for r in results] == list(range(1, SMALL_ROWS + 2))
    await sqlite_log.gc()
    assert sqlite_log.worker_transactions == 2
    assert threading.get_ident() not in threads


async def test_a_transaction_made_during_a_worker_transaction_queues_behind_it(
    sqlite_log: SqliteEventLog,
) -> None:
    large = asyncio.create_task(
        sqlite_log.append_many([request("a", i) for i in range(SMALL_ROWS + 1)])
    )
    await asyncio.sleep(0)  # the large append is on the worker thread now
    assert sqlite_log._queued == 1
    small = await sqlite_log.append(request("a", 99))
    assert small.publication.offset == SMALL_ROWS + 2  # after every row of the large one
    assert (await large)[-1].publication.offset == SMALL_ROWS + 1
    assert sqlite_log.worker_transactions == 2
    history = await sqlite_log.history(HistoryQuery("a", limit=-1))
    assert [p.offset for p in history.publications] == list(range(1, SMALL_ROWS + 3))


async def test_a_cancelled_caller_leaves_the_connection_to_the_worker_until_it_is_done(
    sqlite_log: SqliteEventLog,
) -> None:
    loop_thread = threading.get_ident()
    inside, gate = threading.Event(), threading.Event()

    def hold_worker(sql: str) -> None:  # the worker thread stops inside the large INSERT
        if threading.get_ident() != loop_thread and sql.startswith("INSERT"):
            inside.set()
            gate.wait(5)

    assert sqlite_log._db is not None
    sqlite_log._db.set_trace_callback(hold_worker)
    large = asyncio.create_task(
        sqlite_log.append_many([request("a", i) for i in range(SMALL_ROWS + 1)])
    )
    async with asyncio.timeout(5):
        while not inside.is_set():
            await asyncio.sleep(0.005)
    large.cancel()
    await asyncio.wait([large])  # its caller is gone; the worker is still in its transaction
    asyncio.get_running_loop().call_later(0.2, gate.set)
    small = await sqlite_log.append(request("a", 99))  # behind the large one, which commits
    assert small.publication.offset == SMALL_ROWS + 2
    assert large.cancelled() and sqlite_log._queued == 0


async def lag_while(task: asyncio.Task[object]) -> float:
    """The longest a 10 ms sleep overran while `task` ran: how long the loop was held."""
    worst = 0.0
    while not task.done():
        started = time.monotonic()
        await asyncio.sleep(0.01)
        worst = max(worst, time.monotonic() - started - 0.01)
    return worst


async def test_a_locked_database_is_waited_for_off_the_loop(
    sqlite_log: SqliteEventLog, db_path: Path
) -> None:
    other = sqlite3.connect(db_path, isolation_level=None)
    try:
        for round_ in (1, 2):  # the second round: the connection's busy timeout is 0 again
            other.execute("BEGIN IMMEDIATE")
            append = asyncio.create_task(sqlite_log.append(request("a", round_)))
            release = asyncio.get_running_loop().call_later(1.0, other.execute, "ROLLBACK")
            assert await lag_while(append) < 0.5
            assert (await append).publication.offset == round_
            assert sqlite_log.worker_transactions == round_
            release.cancel()
        await sqlite_log.append(request("a", 3))  # nobody holds the lock: on the loop's thread
        assert sqlite_log.worker_transactions == 2
    finally:
        other.close()


async def test_a_lock_held_past_the_busy_timeout_fails_the_transaction(db_path: Path) -> None:
    log = SqliteEventLog(f"sqlite+aiosqlite:///{db_path}", gc_interval=None, busy_timeout=0.2)
    await log.start()
    other = sqlite3.connect(db_path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        with pytest.raises(StorageError, match="locked"):
            await log.append(request("a", 1))
        other.execute("ROLLBACK")
        assert (await log.append(request("a", 2))).publication.offset == 1
    finally:
        other.close()
        await log.close()
