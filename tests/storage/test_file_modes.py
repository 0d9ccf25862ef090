"""Files holding the event log are owner-only (0600): the database and its -wal/-shm files."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from centripy.engine.contracts import AppendRequest, HistoryQuery
from centripy.storage.factory import open_event_log
from centripy.storage.sqlite import SqliteEventLog, create_private_file


@pytest.fixture(params=[0o000, 0o022], ids=["umask-000", "umask-022"])
def permissive_umask(request: pytest.FixtureRequest) -> Iterator[int]:
    previous = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def modes(folder: Path) -> dict[str, int]:
    return {p.name: mode(p) for p in folder.iterdir()}


@pytest.mark.parametrize("scheme", ["sqlite", "sqlite+aiosqlite"])
async def test_sqlite_event_log_files_are_owner_only(
    tmp_path: Path, permissive_umask: int, scheme: str
) -> None:
    db = tmp_path / "events.db"
    log = open_event_log(f"{scheme}:///{db}", gc_interval=None)
    assert isinstance(log, SqliteEventLog)
    await log.start()
    try:
        await log.append(AppendRequest("news", b'{"n":1}', history_size=10, history_ttl=60))
        # WAL mode, connection open: SQLite made -wal and -shm with the database's mode
        names = ["events.db", "events.db-shm", "events.db-wal"]
        assert modes(tmp_path) == dict.fromkeys(names, 0o600)
    finally:
        await log.close()
    assert mode(db) == 0o600
    log = open_event_log(f"{scheme}:///{db}", gc_interval=None)  # reopening keeps the data
    await log.start()
    try:
        assert mode(db) == 0o600
        assert len((await log.history(HistoryQuery("news", limit=-1))).publications) == 1
    finally:
        await log.close()


def test_create_private_file_leaves_other_databases_alone(
    tmp_path: Path, permissive_umask: int
) -> None:
    existing = tmp_path / "existing.db"
    existing.write_bytes(b"")
    existing.chmod(0o640)
    create_private_file(f"sqlite+aiosqlite:///{existing}")
    assert mode(existing) == 0o640  # an operator's choice is kept
    create_private_file("sqlite+aiosqlite://")
    create_private_file("sqlite+aiosqlite:///:memory:")
    create_private_file(f"sqlite+aiosqlite:///{tmp_path}/missing-dir/x.db")  # SQLite reports it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing.db"]
    link = tmp_path / "link.db"
    link.symlink_to(tmp_path / "target.db")
    create_private_file(f"sqlite+aiosqlite:///{link}")
    assert not (tmp_path / "target.db").exists()  # never created through a symlink
    fresh = tmp_path / "fresh.db"
    create_private_file(f"sqlite+aiosqlite:///{fresh}")
    assert mode(fresh) == 0o600 and fresh.stat().st_size == 0
