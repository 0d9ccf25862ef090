"""Several server processes on one PostgreSQL database: two PostgresEventLog instances with
separate engines (as two processes would have) appending to the same channels at once."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from centripy.engine.contracts import AppendRequest, AppendResult, HistoryQuery, StorageError
from centripy.storage.postgres import PostgresEventLog
from centripy.storage.writer import GroupCommitWriter
from tests.storage.conftest import drop_prefix, new_prefix

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(120)]
NODES = 2


@pytest.fixture
async def nodes(pg_url: str) -> AsyncIterator[list[tuple[PostgresEventLog, GroupCommitWriter]]]:
    prefix = new_prefix()
    logs = [PostgresEventLog(pg_url, table_prefix=prefix, gc_interval=None) for _ in range(NODES)]
    await asyncio.gather(*(log.start() for log in logs))  # concurrent first start: one migrates
    writers = [GroupCommitWriter(log, max_batch=32, max_delay=0.001) for log in logs]
    for writer in writers:
        await writer.start()
    try:
        yield list(zip(logs, writers, strict=True))
    finally:
        for writer in writers:
            await writer.close()
        for log in logs:
            await log.close()
        await drop_prefix(pg_url, prefix)


def pub(channel: str, node: int, n: int, key: str = "") -> AppendRequest:
    return AppendRequest(
        channel,
        b'{"node":%d,"n":%d}' % (node, n),
        history_size=10_000,
        history_ttl=600,
        idempotency_key=key,
    )


async def test_two_nodes_one_channel_get_each_offset_once(
    nodes: list[tuple[PostgresEventLog, GroupCommitWriter]],
) -> None:
    per_caller, callers = 25, 8

    async def caller(node: int, writer: GroupCommitWriter, c: int) -> list[AppendResult]:
        return [await writer.submit(pub("shared", node, c * 1000 + i)) for i in range(per_caller)]

    chunks = await asyncio.gather(
        *(caller(node, w, c) for node, (_, w) in enumerate(nodes) for c in range(callers))
    )
    results = [r for chunk in chunks for r in chunk]
    total = NODES * callers * per_caller
    assert sorted(r.publication.offset for r in results) == list(range(1, total + 1))
    assert len({r.epoch for r in results}) == 1
    history = await nodes[0][0].history(HistoryQuery("shared", limit=-1))
    by_offset = {r.publication.offset: r.publication.data for r in results}
    assert [(p.offset, p.data) for p in history.publications] == sorted(by_offset.items())
    # the two nodes really interleaved (not one node's batches after the other's)
    owners = [data[:9] for _, data in sorted(by_offset.items())]
    assert sum(a != b for a, b in itertools.pairwise(owners)) > 2


async def test_two_nodes_many_channels_in_opposite_orders(
    nodes: list[tuple[PostgresEventLog, GroupCommitWriter]],
) -> None:
    """Batches touching many channels, locked in opposite orders by the callers, neither
    deadlock nor share offsets (the log sorts its row locks)."""
    channels = [f"ch{i}" for i in range(12)]
    rounds = 15
    batches = [
        [pub(ch, node, r) for ch in (channels if node == 0 else channels[::-1])]
        for r in range(rounds)
        for node in range(NODES)
    ]
    logs = [log for log, _ in nodes]
    chunks = await asyncio.gather(
        *(logs[i % NODES].append_many(batch) for i, batch in enumerate(batches))
    )
    seen: dict[str, list[int]] = {}
    for batch, results in zip(batches, chunks, strict=True):
        for request, result in zip(batch, results, strict=True):
            seen.setdefault(request.channel, []).append(result.publication.offset)
    for ch in channels:
        assert sorted(seen[ch]) == list(range(1, NODES * rounds + 1))


async def test_same_key_on_two_nodes_is_stored_once(
    nodes: list[tuple[PostgresEventLog, GroupCommitWriter]],
) -> None:
    keys = [f"key{i}" for i in range(40)]
    submits = [
        writer.submit(pub("dedup", node, i, key=key))
        for i, key in enumerate(keys)
        for node, (_, writer) in enumerate(nodes)
    ]
    results = await asyncio.gather(*submits)
    for i in range(len(keys)):
        pair = results[i * NODES : (i + 1) * NODES]
        assert sum(not r.suppressed for r in pair) == 1
        assert len({(r.publication.offset, r.epoch) for r in pair}) == 1
    stored = sorted(r.publication.offset for r in results if not r.suppressed)
    assert stored == list(range(1, len(keys) + 1))
    history = await nodes[1][0].history(HistoryQuery("dedup", limit=-1))
    assert [p.offset for p in history.publications] == stored


async def test_lost_connection_is_a_storage_error_then_recovers(
    nodes: list[tuple[PostgresEventLog, GroupCommitWriter]],
) -> None:
    log, writer = nodes[0]
    await writer.submit(pub("lost", 0, 1))
    async with log.engine.connect() as conn:  # the pool's one idle connection
        pid = await conn.scalar(sa.text("SELECT pg_backend_pid()"))
    killer = create_async_engine(log.url, poolclass=NullPool)
    try:
        async with killer.connect() as conn:
            await conn.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
    finally:
        await killer.dispose()
    outcomes: list[AppendResult | None] = []
    for n in range(2, 5):
        try:
            outcomes.append(await writer.submit(pub("lost", 0, n)))
        except StorageError as exc:
            assert exc.__cause__ is not None
            outcomes.append(None)
    # A connection the pool already knows is closed is never handed out (storage/postgres.py);
    # one whose death the driver has not read yet fails its batch once (a StorageError, never
    # a false success), and the pool is rebuilt: later appends succeed.
    assert None not in outcomes[1:], outcomes
    stored = [r.publication.offset for r in outcomes if r is not None]
    assert stored == list(range(2, 2 + len(stored)))
