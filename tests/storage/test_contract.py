"""The EventLog contract (engine/contracts.py), one suite run against memory, SQLite and
PostgreSQL. Time is a FakeClock; nothing sleeps."""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from centripy.engine.contracts import (
    AppendRequest,
    EventLog,
    HistoryQuery,
    HistoryResult,
    StorageError,
    UnrecoverablePosition,
)
from centripy.engine.types import ClientInfo, StreamPosition
from centripy.storage.factory import migrate, open_event_log
from centripy.storage.memory import MemoryEventLog
from centripy.storage.postgres import PostgresEventLog, PostgresSession
from centripy.storage.sql import SqlEventLog
from centripy.storage.sql_schema import SCHEMA_VERSION
from centripy.storage.sql_statements import Sql
from centripy.storage.sqlite import SqliteEventLog
from tests.storage.conftest import FakeClock, LogFactory

pytestmark = pytest.mark.timeout(60)


def req(channel: str = "ch", n: int = 0, **kw: object) -> AppendRequest:
    opts: dict[str, object] = {"history_size": 10, "history_ttl": 60.0}
    opts.update(kw)
    return AppendRequest(channel, b'{"n":%d}' % n, **opts)  # type: ignore[arg-type]


async def offsets(log: EventLog, channel: str = "ch", **kw: object) -> list[int]:
    result = await log.history(HistoryQuery(channel, limit=-1, **kw))  # type: ignore[arg-type]
    return [p.offset for p in result.publications]


async def fill(log: EventLog, count: int, channel: str = "ch", **kw: object) -> str:
    results = await log.append_many([req(channel, i, **kw) for i in range(1, count + 1)])
    return results[0].epoch


# --- append ---------------------------------------------------------------------------------


async def test_offsets_are_consecutive_per_channel_across_batches(log: EventLog) -> None:
    first = await log.append_many([req("a", 1), req("b", 1), req("a", 2)])
    second = await log.append_many([req("b", 2), req("a", 3)])
    assert [r.publication.offset for r in first] == [1, 1, 2]
    assert [r.publication.offset for r in second] == [2, 3]
    assert first[0].epoch == first[2].epoch == second[1].epoch != ""
    assert first[1].epoch == second[0].epoch != first[0].epoch
    assert not any(r.suppressed for r in first + second)
    assert await offsets(log, "a") == [1, 2, 3]
    assert await offsets(log, "b") == [1, 2]


async def test_epoch_is_eight_ascii_letters(log: EventLog) -> None:
    epoch = (await log.append(req())).epoch
    assert len(epoch) == 8 and epoch.isascii() and epoch.isalpha()


async def test_publication_round_trips_exactly(log: EventLog, clock: FakeClock) -> None:
    info = ClientInfo("user-ü", "client-1", b'{"name":"A\\u00e9"}', b"[1,2]")
    data = b'{"text":"h\xc3\xa9","n":[1,2,{"x":null}]}'
    tags = (("k", "v"), ("z", "é"), ("a", ""))
    result = await log.append(AppendRequest("ch", data, info, tags, 10, 60.0))
    empty = await log.append(AppendRequest("ch", b"1", ClientInfo("", ""), (), 10, 60.0))
    pubs = (await log.history(HistoryQuery("ch", limit=-1))).publications
    assert pubs[0].data == data and pubs[0].info == info
    assert dict(pubs[0].tags) == dict(tags) and list(pubs[0].tags) == ["k", "z", "a"]
    assert pubs[0].time == int(clock.t * 1000) == result.publication.time
    assert pubs[1].info == ClientInfo("", "") and dict(pubs[1].tags) == {}
    assert pubs == [result.publication, empty.publication]


async def test_a_batch_mixing_plain_and_full_rows_round_trips(log: EventLog) -> None:
    """Rows without info and tags go in by a narrower insert than the others (SQL logs):
    one batch of both kinds keeps each row's data, info, tags and offset."""
    info = ClientInfo("u", "c", b"{}", b"")
    made = [
        AppendRequest("ch", b"plain-1", None, (), 10, 60.0),
        AppendRequest("ch", b"info", info, (), 10, 60.0),
        AppendRequest("other", b"plain-2", None, (), 10, 60.0),
        AppendRequest("ch", b"tags", None, (("k", "v"),), 10, 60.0),
        AppendRequest("ch", b"plain-3", None, (), 10, 60.0),
    ]
    results = await log.append_many(made)
    pubs = (await log.history(HistoryQuery("ch", limit=-1))).publications
    assert [p.data for p in pubs] == [b"plain-1", b"info", b"tags", b"plain-3"]
    assert [p.offset for p in pubs] == [1, 2, 3, 4]
    assert [p.info for p in pubs] == [None, info, None, None]
    assert [dict(p.tags) for p in pubs] == [{}, {}, {"k": "v"}, {}]
    assert pubs == [r.publication for r in results if r.publication.data != b"plain-2"]
    other = (await log.history(HistoryQuery("other", limit=-1))).publications
    assert [(p.data, p.offset, p.info) for p in other] == [(b"plain-2", 1, None)]


async def test_without_history_nothing_is_stored(log: EventLog) -> None:
    for size, ttl in ((0, 60.0), (10, 0.0), (0, 0.0)):
        result = await log.append(req(history_size=size, history_ttl=ttl))
        assert (result.publication.offset, result.epoch, result.suppressed) == (0, "", False)
    history = await log.history(HistoryQuery("ch", limit=-1))
    assert history.publications == [] and history.position.offset == 0


async def test_mixed_batch_with_and_without_history(log: EventLog) -> None:
    results = await log.append_many([req(n=1), req(n=2, history_size=0), req(n=3)])
    assert [r.publication.offset for r in results] == [1, 0, 2]
    assert [r.publication.data for r in results] == [b'{"n":1}', b'{"n":2}', b'{"n":3}']
    assert await offsets(log) == [1, 2]


async def test_empty_batch(log: EventLog) -> None:
    assert await log.append_many([]) == []


async def test_history_size_trims_oldest(log: EventLog) -> None:
    await fill(log, 5, history_size=3)
    await log.append_many([req(n=6, history_size=3), req(n=7, history_size=3)])
    result = await log.history(HistoryQuery("ch", limit=-1))
    assert [p.offset for p in result.publications] == [5, 6, 7]
    assert [p.data for p in result.publications] == [b'{"n":5}', b'{"n":6}', b'{"n":7}']
    assert result.position.offset == 7


async def test_history_ttl_drops_publications_keeps_position(
    log: EventLog, clock: FakeClock
) -> None:
    epoch = await fill(log, 3, history_ttl=10.0)
    clock.advance(10.0)
    assert await offsets(log) == [1, 2, 3]  # not yet: expires once now > last publish + ttl
    clock.advance(0.5)
    result = await log.history(HistoryQuery("ch", limit=-1))
    assert result.publications == [] and result.position == StreamPosition(3, epoch)
    nxt = await log.append(req(n=4, history_ttl=10.0))
    assert (nxt.publication.offset, nxt.epoch) == (4, epoch)
    assert await offsets(log) == [4]


async def test_history_ttl_counts_from_last_publish(log: EventLog, clock: FakeClock) -> None:
    await fill(log, 2, history_ttl=10.0)
    clock.advance(8)
    await log.append(req(n=3, history_ttl=10.0))
    clock.advance(8)
    assert await offsets(log) == [1, 2, 3]


async def test_meta_ttl_forgets_untouched_stream(log: EventLog, clock: FakeClock) -> None:
    epoch = await fill(log, 3, meta_ttl=100.0, history_ttl=1000.0)
    clock.advance(100.5)
    result = await log.history(HistoryQuery("ch", limit=-1, meta_ttl=100.0))
    assert result.position.offset == 0 and result.position.epoch not in ("", epoch)
    assert result.publications == []
    nxt = await log.append(req(n=9, meta_ttl=100.0, history_ttl=1000.0))
    assert (nxt.publication.offset, nxt.epoch) == (1, result.position.epoch)
    pubs = (await log.history(HistoryQuery("ch", limit=-1))).publications
    assert [(p.offset, p.data) for p in pubs] == [(1, b'{"n":9}')]


async def test_meta_ttl_expiry_on_append_restarts_offsets(log: EventLog, clock: FakeClock) -> None:
    epoch = await fill(log, 5, meta_ttl=50.0, history_ttl=1000.0)
    clock.advance(51)
    results = await log.append_many([req(n=7, meta_ttl=50.0), req(n=8, meta_ttl=50.0)])
    assert [r.publication.offset for r in results] == [1, 2]
    assert results[0].epoch not in ("", epoch)
    pubs = (await log.history(HistoryQuery("ch", limit=-1))).publications
    assert [(p.offset, p.data) for p in pubs] == [(1, b'{"n":7}'), (2, b'{"n":8}')]


async def test_reads_keep_stream_meta_alive(log: EventLog, clock: FakeClock) -> None:
    epoch = await fill(log, 2, meta_ttl=10.0, history_ttl=1000.0)
    for _ in range(5):
        clock.advance(8)
        position = (await log.history(HistoryQuery("ch", meta_ttl=10.0))).position
        assert position == StreamPosition(2, epoch)
    assert await offsets(log, meta_ttl=10.0) == [1, 2]


async def test_meta_ttl_zero_never_forgets(log: EventLog, clock: FakeClock) -> None:
    epoch = await fill(log, 2, history_ttl=1e9)
    clock.advance(1e8)
    assert (await log.history(HistoryQuery("ch"))).position == StreamPosition(2, epoch)


async def test_reading_missing_stream_reports_the_first_appends_epoch(
    logs: LogFactory, clock: FakeClock
) -> None:
    log = await logs.open()
    first = await log.history(HistoryQuery("new", limit=-1, meta_ttl=3600.0))
    assert first.publications == [] and first.position.offset == 0
    assert len(first.position.epoch) == 8 and first.position.epoch.isalpha()
    clock.advance(60)
    again = await log.history(HistoryQuery("new", meta_ttl=3600.0))
    assert again.position == first.position
    assert await logs.counts() == (0, 0, 0)  # the reads stored nothing
    clock.advance(60)
    appended = await log.append(req("new", meta_ttl=3600.0))
    assert (appended.publication.offset, appended.epoch) == (1, first.position.epoch)
    assert (await logs.counts())[:2] == (1, 1)


# --- reads never write (issue 15: a client must not fill the database by reading names) ----


async def test_reads_of_unknown_channels_store_nothing(logs: LogFactory) -> None:
    log = await logs.open()
    await fill(log, 3, "known", idempotency_key="")
    await log.append(req("keyed", history_size=0, idempotency_key="k"))
    before = await logs.counts()
    assert before == (1, 3, 1)
    for i in range(40):
        channel = f"unknown-{i}"
        meta = 2_592_000.0 if i % 2 else 0.0
        top = (await log.history(HistoryQuery(channel, meta_ttl=meta))).position
        assert top.offset == 0
        everything = await log.history(HistoryQuery(channel, -1, meta_ttl=meta))
        assert everything.publications == [] and everything.position == top
        since = StreamPosition(7, top.epoch)
        assert (await log.history(HistoryQuery(channel, 10, since, meta_ttl=meta))).position == top
        back = HistoryQuery(channel, 10, StreamPosition(5, ""), reverse=True, meta_ttl=meta)
        assert (await log.history(back)).publications == []
        with pytest.raises(UnrecoverablePosition):
            await log.history(HistoryQuery(channel, -1, StreamPosition(3, "AbCdEfGh")))
        await log.remove_history(channel)
    assert await logs.counts() == before
    assert await offsets(log, "known") == [1, 2, 3]


async def test_read_epoch_of_unknown_channel_survives_restart(logs: LogFactory) -> None:
    log = await logs.open()
    read = (await log.history(HistoryQuery("later", meta_ttl=100.0))).position
    await log.close()
    log = await logs.open()
    assert (await log.history(HistoryQuery("later", meta_ttl=100.0))).position == read
    appended = await log.append(req("later", meta_ttl=100.0))
    assert (appended.publication.offset, appended.epoch) == (1, read.epoch)


async def test_reading_forgotten_stream_does_not_revive_it(
    logs: LogFactory, clock: FakeClock
) -> None:
    log = await logs.open()
    old = await fill(log, 2, meta_ttl=10.0, history_ttl=1000.0)
    clock.advance(11)
    fresh = (await log.history(HistoryQuery("ch", -1, meta_ttl=10.0))).position
    assert fresh.offset == 0 and fresh.epoch not in ("", old)
    assert isinstance(log, MemoryEventLog | SqlEventLog)
    await log.gc()
    assert await logs.counts() == (0, 0, 0)
    again = (await log.history(HistoryQuery("ch", -1, meta_ttl=10.0))).position
    assert again == fresh
    nxt = await log.append(req(n=3, meta_ttl=10.0, history_ttl=1000.0))
    assert (nxt.publication.offset, nxt.epoch) == (1, fresh.epoch)
    assert await offsets(log, meta_ttl=10.0) == [1]


async def test_stream_created_again_after_gc_gets_a_new_epoch(
    logs: LogFactory, clock: FakeClock
) -> None:
    log = await logs.open()
    epochs = [await fill(log, 1, meta_ttl=10.0)]
    for _ in range(3):
        clock.advance(10.5)
        assert isinstance(log, MemoryEventLog | SqlEventLog)
        await log.gc()
        assert (await logs.counts())[0] == 0
        epochs.append(await fill(log, 1, meta_ttl=10.0))
    assert len(set(epochs)) == 4


async def test_separate_databases_give_separate_epochs(tmp_path: Path, clock: FakeClock) -> None:
    logs: list[EventLog] = [
        MemoryEventLog(now=clock),
        MemoryEventLog(now=clock),
        SqliteEventLog(f"sqlite+aiosqlite:///{tmp_path / 'a.db'}", now=clock, gc_interval=None),
        SqliteEventLog(f"sqlite+aiosqlite:///{tmp_path / 'b.db'}", now=clock, gc_interval=None),
    ]
    try:
        for log in logs:
            await log.start()
        epochs = [(await log.history(HistoryQuery("same"))).position.epoch for log in logs]
        assert len(set(epochs)) == len(logs)
    finally:
        for log in logs:
            await log.close()


# --- history queries -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("limit", "since", "reverse", "expected"),
    [
        (0, None, False, []),
        (-1, None, False, [1, 2, 3, 4, 5]),
        (2, None, False, [1, 2]),
        (-1, None, True, [5, 4, 3, 2, 1]),
        (2, None, True, [5, 4]),
        (-1, 2, False, [3, 4, 5]),
        (2, 2, False, [3, 4]),
        (-1, 5, False, []),
        (-1, 9, False, []),
        (-1, 4, True, [3, 2, 1]),
        (1, 4, True, [3]),
        (-1, 1, True, []),
        (-1, 0, True, []),
        (-1, 0, False, [1, 2, 3, 4, 5]),
        (0, 2, False, []),
    ],
)
async def test_history_window(
    log: EventLog, limit: int, since: int | None, reverse: bool, expected: list[int]
) -> None:
    epoch = await fill(log, 5)
    position = None if since is None else StreamPosition(since, epoch)
    result = await log.history(HistoryQuery("ch", limit, position, reverse))
    assert [p.offset for p in result.publications] == expected
    assert result.position == StreamPosition(5, epoch)


async def test_since_older_than_oldest_starts_from_oldest(log: EventLog) -> None:
    epoch = await fill(log, 8, history_size=3)
    forward = await log.history(HistoryQuery("ch", -1, StreamPosition(2, epoch)))
    assert [p.offset for p in forward.publications] == [6, 7, 8]
    reverse = await log.history(HistoryQuery("ch", -1, StreamPosition(7, epoch), reverse=True))
    assert [p.offset for p in reverse.publications] == [6]


async def test_since_with_other_epoch_is_unrecoverable(log: EventLog) -> None:
    epoch = await fill(log, 2)
    with pytest.raises(UnrecoverablePosition):
        await log.history(HistoryQuery("ch", -1, StreamPosition(1, "other")))
    with pytest.raises(UnrecoverablePosition):
        await log.history(HistoryQuery("ch", 0, StreamPosition(1, "other")))
    no_epoch = await log.history(HistoryQuery("ch", -1, StreamPosition(1, "")))
    assert [p.offset for p in no_epoch.publications] == [2]
    assert no_epoch.position.epoch == epoch


async def test_unrecoverable_after_meta_reset_still_recreates(
    log: EventLog, clock: FakeClock
) -> None:
    epoch = await fill(log, 2, meta_ttl=5.0)
    clock.advance(6)
    with pytest.raises(UnrecoverablePosition):
        await log.history(HistoryQuery("ch", -1, StreamPosition(2, epoch), meta_ttl=5.0))
    fresh = (await log.history(HistoryQuery("ch", meta_ttl=5.0))).position
    assert fresh.offset == 0 and fresh.epoch != epoch


async def test_remove_history_keeps_epoch_and_top(log: EventLog) -> None:
    epoch = await fill(log, 4)
    await log.remove_history("ch")
    await log.remove_history("never-existed")
    result = await log.history(HistoryQuery("ch", limit=-1))
    assert result.publications == [] and result.position == StreamPosition(4, epoch)
    nxt = await log.append(req(n=5))
    assert (nxt.publication.offset, nxt.epoch) == (5, epoch)
    assert await offsets(log) == [5]


# --- idempotency ---------------------------------------------------------------------------------


async def test_duplicate_key_returns_first_result(log: EventLog) -> None:
    first = await log.append(req(n=1, idempotency_key="k"))
    await log.append(req(n=2))
    dup = await log.append(req(n=3, idempotency_key="k"))
    assert dup.suppressed and not first.suppressed
    assert (
        (dup.publication.offset, dup.epoch)
        == (first.publication.offset, first.epoch)
        == (1, first.epoch)
    )
    pubs = (await log.history(HistoryQuery("ch", limit=-1))).publications
    assert [(p.offset, p.data) for p in pubs] == [(1, b'{"n":1}'), (2, b'{"n":2}')]


async def test_key_scope_is_per_channel(log: EventLog) -> None:
    a = await log.append(req("a", idempotency_key="k"))
    b = await log.append(req("b", idempotency_key="k"))
    assert not a.suppressed and not b.suppressed
    assert await offsets(log, "b") == [1]


async def test_key_without_history_is_still_checked(log: EventLog) -> None:
    first = await log.append(req(history_size=0, idempotency_key="k"))
    dup = await log.append(req(history_size=0, idempotency_key="k"))
    assert (first.publication.offset, first.epoch, first.suppressed) == (0, "", False)
    assert (dup.publication.offset, dup.epoch, dup.suppressed) == (0, "", True)


async def test_key_expires_after_idempotent_ttl(log: EventLog, clock: FakeClock) -> None:
    await log.append(req(idempotency_key="k", idempotent_ttl=300.0))
    clock.advance(300)
    assert (await log.append(req(idempotency_key="k", idempotent_ttl=300.0))).suppressed
    clock.advance(1)
    again = await log.append(req(idempotency_key="k", idempotent_ttl=300.0))
    assert not again.suppressed and again.publication.offset == 2
    assert (await log.append(req(idempotency_key="k"))).publication.offset == 2


async def test_same_key_twice_in_one_batch_is_sequential(log: EventLog) -> None:
    results = await log.append_many(
        [
            req(n=1, idempotency_key="k"),
            req(n=2),
            req(n=3, idempotency_key="k"),
            req("o", 4, idempotency_key="k"),
        ]
    )
    assert [(r.publication.offset, r.suppressed) for r in results] == [
        (1, False),
        (2, False),
        (1, True),
        (1, False),
    ]
    assert results[2].epoch == results[0].epoch
    assert results[2].publication.data == b'{"n":3}'
    assert await offsets(log) == [1, 2]


async def test_batch_key_already_stored_suppresses_all_copies(log: EventLog) -> None:
    first = await log.append(req(n=1, idempotency_key="k"))
    results = await log.append_many(
        [req(n=2, idempotency_key="k"), req(n=3, idempotency_key="k"), req(n=4)]
    )
    assert [(r.publication.offset, r.suppressed) for r in results] == [
        (1, True),
        (1, True),
        (2, False),
    ]
    assert {r.epoch for r in results} == {first.epoch}


async def test_duplicate_does_not_touch_stream(log: EventLog, clock: FakeClock) -> None:
    await log.append(req(idempotency_key="k", meta_ttl=10.0))
    clock.advance(8)
    await log.append(req(idempotency_key="k", meta_ttl=10.0))
    clock.advance(3)
    assert (await log.history(HistoryQuery("ch", meta_ttl=10.0))).position.offset == 0


# --- persistence and maintenance --------------------------------------------------------------


async def test_restart_keeps_data_keys_and_epoch(logs: LogFactory) -> None:
    if not logs.persistent:
        pytest.skip("the memory log keeps nothing across restarts")
    log = await logs.open()
    first = await log.append(req(n=1, idempotency_key="k"))
    await log.close()
    log = await logs.open()  # start() again on existing tables: migrates, drops nothing
    dup = await log.append(req(n=2, idempotency_key="k"))
    assert dup.suppressed and (dup.publication.offset, dup.epoch) == (1, first.epoch)
    nxt = await log.append(req(n=3))
    assert (nxt.publication.offset, nxt.epoch) == (2, first.epoch)
    assert await offsets(log) == [1, 2]


async def test_gc_drops_only_expired_state(logs: LogFactory, clock: FakeClock) -> None:
    log = await logs.open()
    await log.append(req("old", history_size=0, idempotency_key="gone", idempotent_ttl=10.0))
    await log.append_many([req("short", i, history_ttl=5.0) for i in range(3)])
    await log.append(req("meta", meta_ttl=5.0, history_ttl=100.0))
    clock.advance(6)
    await log.append(req("live", idempotency_key="kept", idempotent_ttl=100.0, meta_ttl=50.0))
    clock.advance(5)
    assert isinstance(log, MemoryEventLog | SqlEventLog)
    await log.gc()
    if logs.persistent:
        assert await logs.rows("idempotency") == 1
        assert await logs.rows("publications") == 1
        assert await logs.rows("streams") == 2  # "short" (top/epoch kept) and "live"
    assert (await log.append(req("live", idempotency_key="kept"))).suppressed
    assert await offsets(log, "live") == [1]
    assert (await log.history(HistoryQuery("short"))).position.offset == 3
    assert not (await log.append(req("old", idempotency_key="gone"))).suppressed


async def test_gc_walks_every_chunk_of_streams(logs: LogFactory, clock: FakeClock) -> None:
    log = await logs.open()
    if isinstance(log, SqlEventLog):
        log.gc_chunk = 2  # 7 streams: 4 transactions
    names = [f"ch{i}" for i in range(7)]
    await log.append_many([req(ch, history_ttl=5.0, meta_ttl=100.0) for ch in names[:3]])
    await log.append_many([req(ch, history_ttl=100.0, meta_ttl=5.0) for ch in names[3:5]])
    clock.advance(6)
    await log.append_many([req(ch, history_ttl=100.0, meta_ttl=100.0) for ch in names[5:]])
    assert isinstance(log, MemoryEventLog | SqlEventLog)
    await log.gc()
    if logs.persistent:
        assert await logs.rows("streams") == 5  # ch3, ch4 forgotten
        assert await logs.rows("publications") == 2  # ch0-ch2 expired
    for ch in names[:3]:
        kept = await log.history(HistoryQuery(ch, -1, meta_ttl=100.0))
        assert kept.publications == [] and kept.position.offset == 1
    assert await offsets(log, "ch6") == [1]
    assert (await log.append(req("ch3", meta_ttl=5.0))).publication.offset == 1


async def test_invalid_input_raises_value_error(log: EventLog) -> None:
    bad = [
        AppendRequest("", b"x"),
        AppendRequest("ch", "text"),  # type: ignore[arg-type]
        AppendRequest("ch", b"x", history_size=-1),
        AppendRequest("ch", b"x", history_ttl=float("nan")),
        AppendRequest("ch", b"x", idempotency_key="k", idempotent_ttl=0),
        AppendRequest("ch", b"x", tags=(("k",),)),  # type: ignore[arg-type]
    ]
    for item in bad:
        with pytest.raises(ValueError):
            await log.append_many([req(n=1), item])
    for query in (
        HistoryQuery(""),
        HistoryQuery("ch", limit=-2),
        HistoryQuery("ch", 1, StreamPosition(-1, "")),
    ):
        with pytest.raises(ValueError):
            await log.history(query)
    assert (await log.history(HistoryQuery("ch"))).position.offset == 0  # nothing applied


async def test_failed_batch_applies_nothing(
    logs: LogFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = await logs.open()
    await log.append(req(n=1))
    if not isinstance(log, SqlEventLog):
        pytest.skip("the memory log cannot fail mid-batch (validation runs first)")
    # the publications insert (after offsets and keys were written) hits a missing table
    sql = log._sql
    assert sql is not None
    name = log.tables.publications.name

    def broken(stmt: Sql) -> Sql:
        return dataclasses.replace(stmt, text=stmt.text.replace(name, name + "_x"))

    insert_rows = sql.insert_rows  # SQLite's multi-row insert, PostgreSQL's executemany
    monkeypatch.setattr(sql, "insert_rows", lambda n, **kw: broken(insert_rows(n, **kw)))
    monkeypatch.setattr(sql, "insert_pubs", broken(sql.insert_pubs))
    monkeypatch.setattr(sql, "insert_plain", broken(sql.insert_plain))
    with pytest.raises(StorageError) as info:
        await log.append_many([req(n=2, idempotency_key="k"), req("other", 1)])
    assert info.value.__cause__ is not None
    monkeypatch.undo()
    assert (await log.history(HistoryQuery("other"))).position.offset == 0
    nxt = await log.append(req(n=3, idempotency_key="k"))
    assert (nxt.publication.offset, nxt.suppressed) == (2, False)


async def test_closed_log_raises_storage_error(logs: LogFactory) -> None:
    log = await logs.open()
    await log.close()
    if not isinstance(log, SqlEventLog):
        pytest.skip("the memory log has nothing to close")
    with pytest.raises(StorageError):
        await log.append(req())
    with pytest.raises(StorageError):
        await log.history(HistoryQuery("ch"))


async def test_trimmed_rows_are_deleted_physically(logs: LogFactory) -> None:
    log = await logs.open()
    for _ in range(25):
        await log.append_many([req(n=i, history_size=10) for i in range(7)])
    assert await offsets(log) == list(range(166, 176))
    if logs.persistent:
        assert await logs.rows("publications") <= 2 * 10


# --- schema -------------------------------------------------------------------------------------


async def test_schema_newer_than_code_is_refused(logs: LogFactory) -> None:
    if not logs.persistent:
        pytest.skip("no schema in memory")
    log = await logs.open()
    assert isinstance(log, SqlEventLog)
    async with log.engine.begin() as conn:
        await conn.execute(sa.update(log.tables.schema_version).values(version=SCHEMA_VERSION + 1))
    with pytest.raises(StorageError, match="newer"):
        await logs.open()


async def test_start_recreates_missing_index_and_keeps_data(logs: LogFactory) -> None:
    if not logs.persistent:
        pytest.skip("no schema in memory")
    log = await logs.open()
    assert isinstance(log, SqlEventLog)
    await log.append(req(n=1))
    index = next(iter(log.tables.idempotency.indexes))
    async with log.engine.begin() as conn:
        await conn.run_sync(lambda sync: index.drop(sync))
    await log.close()
    log = await logs.open()
    assert isinstance(log, SqlEventLog)
    async with log.engine.connect() as conn:
        names = await conn.run_sync(
            lambda sync: {
                i["name"] for i in sa.inspect(sync).get_indexes(log.tables.idempotency.name)
            }
        )
    assert index.name in names
    assert await offsets(log) == [1]


async def test_start_drops_the_obsolete_expiry_indexes(logs: LogFactory) -> None:
    """Earlier releases indexed the streams' expiry columns; start() drops those indexes."""
    if not logs.persistent:
        pytest.skip("no schema in memory")
    log = await logs.open()
    assert isinstance(log, SqlEventLog)
    epoch = await fill(log, 3)
    streams = log.tables.streams
    old = [
        sa.Index(f"{logs.prefix}streams_meta_expires_idx", streams.c.meta_expires_at),
        sa.Index(f"{logs.prefix}streams_pubs_expire_idx", streams.c.pubs_expire_at),
    ]
    async with log.engine.begin() as conn:
        for index in old:
            await conn.run_sync(lambda sync, i=index: i.create(sync))
    await log.close()
    log = await logs.open()
    assert isinstance(log, SqlEventLog)
    async with log.engine.connect() as conn:
        names = await conn.run_sync(
            lambda sync: {i["name"] for i in sa.inspect(sync).get_indexes(streams.name)}
        )
        version = await conn.scalar(sa.select(log.tables.schema_version.c.version))
    assert not names & {i.name for i in old} and version == SCHEMA_VERSION
    assert await offsets(log) == [1, 2, 3]
    nxt = await log.append(req(n=4))
    assert (nxt.publication.offset, nxt.epoch) == (4, epoch)


async def test_sqlite_lock_timeout_is_a_storage_error(tmp_path: Path, clock: FakeClock) -> None:
    path = tmp_path / "locked.db"
    log = SqliteEventLog(f"sqlite+aiosqlite:///{path}", now=clock, busy_timeout=0.05)
    await log.start()
    other = sqlite3.connect(path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        with pytest.raises(StorageError) as info:
            await log.append(req())
        assert isinstance(info.value.__cause__, sqlite3.OperationalError)
        other.execute("ROLLBACK")
        assert (await log.append(req())).publication.offset == 1
    finally:
        other.close()
        await log.close()


# --- factory ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "cls", "expected"),
    [
        ("memory://", MemoryEventLog, None),
        ("sqlite+aiosqlite:///x.db", SqliteEventLog, "sqlite+aiosqlite:///x.db"),
        ("sqlite:///x.db", SqliteEventLog, "sqlite+aiosqlite:///x.db"),
        ("postgresql+asyncpg://u@h/db", PostgresEventLog, "postgresql+asyncpg://u@h/db"),
        ("postgresql://u@h:5/db", PostgresEventLog, "postgresql+asyncpg://u@h:5/db"),
        ("postgres://u@h/db", PostgresEventLog, "postgresql+asyncpg://u@h/db"),
    ],
)
def test_factory_chooses_back_end_by_scheme(url: str, cls: type, expected: str | None) -> None:
    log = open_event_log(url, table_prefix="x_")
    assert type(log) is cls
    if expected is not None:
        assert isinstance(log, SqlEventLog) and log.url == expected


@pytest.mark.parametrize("url", ["mysql://h/db", "postgresql+psycopg://h/db", "x.db", "://x"])
def test_factory_rejects_unknown_scheme(url: str) -> None:
    with pytest.raises(ValueError, match="scheme"):
        open_event_log(url)


def test_bad_table_prefix_is_refused() -> None:
    with pytest.raises(ValueError, match="table_prefix"):
        SqliteEventLog("sqlite+aiosqlite:///x.db", table_prefix="drop table;")


async def test_migrate_creates_schema(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'm.db'}"
    await migrate(url)
    await migrate(url)  # idempotent
    with sqlite3.connect(tmp_path / "m.db") as conn:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"centripy_streams", "centripy_publications", "centripy_idempotency"} <= tables


async def test_background_gc_runs_periodically(tmp_path: Path, clock: FakeClock) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'gc.db'}"
    log = SqliteEventLog(url, now=clock, gc_interval=0.01)
    ran = asyncio.Event()
    real_gc = log.gc

    async def spy_gc() -> None:
        await real_gc()
        ran.set()

    log.gc = spy_gc  # type: ignore[method-assign]
    await log.start()
    try:
        await log.append(req(history_size=0, idempotency_key="k", idempotent_ttl=1.0))
        clock.advance(2)
        ran.clear()
        await asyncio.wait_for(ran.wait(), 5)
        async with log.engine.connect() as conn:
            count = await conn.scalar(
                sa.select(sa.func.count()).select_from(log.tables.idempotency)
            )
        assert count == 0
    finally:
        await log.close()


async def test_sqlite_in_memory_database(clock: FakeClock) -> None:
    log = open_event_log("sqlite+aiosqlite://", now=clock)
    await log.start()
    try:
        await log.append_many([req(n=1), req(n=2)])
        assert await offsets(log) == [1, 2]
    finally:
        await log.close()


# --- history_many ---------------------------------------------------------------------------


def shape(result: object) -> object:
    """A comparable form of a history result, or of the error in its place."""
    if isinstance(result, Exception):
        return type(result)
    return ([(p.offset, p.data) for p in result.publications], result.position)  # type: ignore[attr-defined]


async def test_history_many_equals_one_history_per_query(log: EventLog, clock: FakeClock) -> None:
    epoch = await fill(log, 8, history_size=5)
    await fill(log, 3, "gone", meta_ttl=5.0, history_ttl=1000.0)
    await fill(log, 2, "dropped", history_ttl=3.0)
    await log.append_many([req(f"many{i}", i) for i in range(600)])  # more than one peek
    clock.advance(6)  # "gone" is forgotten, "dropped" keeps only its position
    queries = [
        HistoryQuery("ch", -1),
        HistoryQuery("ch", 2),
        HistoryQuery("ch", 0),
        HistoryQuery("ch", -1, StreamPosition(5, epoch)),
        HistoryQuery("ch", 2, StreamPosition(8, epoch), reverse=True),
        HistoryQuery("ch", -1, StreamPosition(1, "")),
        HistoryQuery("ch", -1, StreamPosition(1, "other")),
        HistoryQuery("unknown", -1),
        HistoryQuery("unknown", 0, StreamPosition(0, "")),
        HistoryQuery("gone", -1, meta_ttl=5.0),
        HistoryQuery("dropped", -1),
        HistoryQuery("", -1),
        *(HistoryQuery(f"many{i}", -1) for i in range(0, 600, 7)),
    ]
    many = await log.history_many(queries)
    assert len(many) == len(queries)
    for query, result in zip(queries, many, strict=True):
        try:
            alone: object = await log.history(query)
        except (UnrecoverablePosition, ValueError) as exc:
            alone = exc
        assert shape(result) == shape(alone), query
    assert shape(many[6]) is UnrecoverablePosition and shape(many[11]) is ValueError
    assert shape(many[1]) == ([(4, b'{"n":4}'), (5, b'{"n":5}')], StreamPosition(8, epoch))
    assert shape(many[7]) == ([], StreamPosition(0, many[8].position.epoch))  # type: ignore[union-attr]
    assert many[9].position.offset == 0 and many[10].publications == []  # type: ignore[union-attr]
    assert many[10].position.offset == 2  # type: ignore[union-attr]
    assert await log.history_many([]) == []


async def test_history_many_reads_every_window_exactly(
    logs: LogFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Many windows in one call (one statement per direction on PostgreSQL): each gets its
    own channel's publications, info and tags intact, in its own order and limit."""
    log = await logs.open()
    info = ClientInfo("user-ü", "client-1", b'{"a":1}', b"[1]")
    for ch in ("a", "b", "c"):
        await log.append_many(
            [AppendRequest(ch, b'"%s%d"' % (ch.encode(), i), info, (("k", ch),), 10, 60.0)
             for i in range(1, 6)]
        )  # fmt: skip
    queries = [
        HistoryQuery("a", -1),
        HistoryQuery("b", 2, reverse=True),
        HistoryQuery("a", 2, StreamPosition(1, "")),
        HistoryQuery("c", -1, reverse=True),
        HistoryQuery("b", -1, StreamPosition(4, "")),
        HistoryQuery("c", 1, StreamPosition(2, ""), reverse=True),
    ]
    expected = [("a", [1, 2, 3, 4, 5]), ("b", [5, 4]), ("a", [2, 3]), ("c", [5, 4, 3, 2, 1]),
                ("b", [5]), ("c", [1])]  # fmt: skip
    results = await log.history_many(queries)
    for result, (ch, offsets) in zip(results, expected, strict=True):
        assert isinstance(result, HistoryResult)
        assert [p.offset for p in result.publications] == offsets
        data = [b'"%s%d"' % (ch.encode(), i) for i in offsets]
        assert [p.data for p in result.publications] == data
        assert all(p.info == info and dict(p.tags) == {"k": ch} for p in result.publications)
    if isinstance(log, PostgresEventLog):  # and in how many statements
        fetched: list[str] = []
        real = PostgresSession.fetch

        async def counted(self: PostgresSession, sql: Sql, args: Sequence[object] = ()) -> Any:
            fetched.append(sql.text)
            return await real(self, sql, args)

        monkeypatch.setattr(PostgresSession, "fetch", counted)
        again = await log.history_many(queries)
        assert [shape(r) for r in again] == [shape(r) for r in results]
        assert len(fetched) == 3, fetched  # the peek, then one read per direction


async def test_history_many_keeps_stream_meta_alive(log: EventLog, clock: FakeClock) -> None:
    epochs = [await fill(log, 2, ch, meta_ttl=10.0, history_ttl=1000.0) for ch in ("a", "b")]
    for _ in range(5):
        clock.advance(8)
        results = await log.history_many([HistoryQuery(ch, meta_ttl=10.0) for ch in ("a", "b")])
        assert [r.position for r in results] == [StreamPosition(2, e) for e in epochs]  # type: ignore[union-attr]
    clock.advance(4)  # a read at most 8 s ago keeps the stream at least 0.9 * 10 s
    assert await offsets(log, "a", meta_ttl=10.0) == [1, 2]
    clock.advance(11)
    assert await offsets(log, "b", meta_ttl=10.0) == []


@pytest.mark.parametrize("keyed", [False, True])  # PostgreSQL: one statement / the plan
async def test_a_recreated_stream_keeps_no_row_of_its_earlier_incarnation(
    logs: LogFactory, clock: FakeClock, keyed: bool
) -> None:
    log = await logs.open()
    await fill(log, 8, meta_ttl=5.0, history_ttl=1000.0)
    clock.advance(6)
    key = {"idempotency_key": "k"} if keyed else {}
    results = await log.append_many(
        [req(n=9, meta_ttl=5.0, **key), req(n=10, meta_ttl=5.0, history_ttl=1000.0)]
    )
    assert [r.publication.offset for r in results] == [1, 2]
    pubs = (await log.history(HistoryQuery("ch", -1, meta_ttl=5.0))).publications
    assert [(p.offset, p.data) for p in pubs] == [(1, b'{"n":9}'), (2, b'{"n":10}')]
    if logs.persistent:
        assert await logs.rows("publications") == 2
