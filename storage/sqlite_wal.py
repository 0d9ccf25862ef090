"""Checkpoints of the SQLite log's write-ahead log, off the commit path.

SQLite's automatic checkpoint runs inside the COMMIT that takes the WAL past
`wal_autocheckpoint` pages (1,000 by default). With one publication per commit that is every
~170 commits, and that COMMIT took 4-6 ms instead of ~0.2 ms, so every publication queued
behind it waited too (small transactions run on the event loop's thread: see sqlite.py). As
SQLite's documentation suggests for writers that care about latency, the log's connection
keeps the automatic checkpoint only as a backstop (`BACKSTOP_PAGES`), and a thread of this
module runs PASSIVE checkpoints on a connection of its own, `interval` seconds after a
transaction. A PASSIVE checkpoint never waits for or blocks the writer; once it has copied
every frame, the writer's next transaction starts the WAL over from its beginning, so the
file stays small.

The thread sleeps until a transaction marks work: an idle server's checkpointer does not
wake at all (it used to poll every `interval`, 20 wake-ups a second, each taking the GIL
from the event loop), and a busy one wakes once per `interval`.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading

log = logging.getLogger("centripy.storage.sqlite")

# The writer's own automatic checkpoint, kept for when this thread falls behind (~40 MiB).
BACKSTOP_PAGES = 10_000


class WalCheckpointer:
    """A thread that checkpoints the WAL of the database file at `path`. `written` (called on
    the event loop after each transaction of the log) marks work and, when none was marked,
    wakes the thread, which checkpoints `interval` seconds later (the transactions of that
    interval together). Start with `start`, stop with `close`."""

    def __init__(self, path: str, *, interval: float = 0.05) -> None:
        self._path = path
        self._interval = interval
        self._dirty = False  # work marked and not yet taken by the thread
        self._work = threading.Event()  # set with the first mark: wakes the thread
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name="centripy-wal-checkpoint", daemon=True
        )
        self.checkpoints = 0  # PASSIVE checkpoints run (for tests and diagnostics)
        self.wakeups = 0  # times the thread woke for work (for tests and diagnostics)
        self.last: tuple[int, int, int] | None = None  # (busy, WAL frames, frames copied)

    def start(self) -> None:
        self._thread.start()

    def written(self) -> None:
        if not self._dirty:  # one Event.set per checkpoint, not per transaction
            self._dirty = True
            self._work.set()

    async def close(self, timeout: float = 5.0) -> None:
        """Stop the thread; it finishes a checkpoint it is running first. Waits at most
        `timeout` seconds (a stuck disk): the thread is a daemon and its connection only
        reads and copies committed frames, so leaving it behind loses nothing."""
        self._stop.set()
        self._work.set()
        if self._thread.is_alive():
            await asyncio.to_thread(self._thread.join, timeout)
            if self._thread.is_alive():
                log.warning(
                    "WAL checkpoint thread still busy after %.0f s; not waited for", timeout
                )

    def _run(self) -> None:
        try:
            db = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            log.warning("WAL checkpoints not run (the backstop remains): %s", exc)
            return
        try:
            while True:
                self._work.wait()
                if self._stop.wait(self._interval):  # let the interval's transactions in
                    return
                self.wakeups += 1
                self._work.clear()  # before the mark: a later transaction sets both again
                self._dirty = False
                try:
                    row = db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                except sqlite3.Error as exc:  # another checkpoint, I/O error: try next time
                    log.warning("WAL checkpoint failed: %s", exc)
                    continue
                self.last = (int(row[0]), int(row[1]), int(row[2]))
                self.checkpoints += 1
        finally:
            db.close()
