"""PostgresBroker under load: the bounded notification backlog, batched fetches of stored
(large) messages, a lagging node whose stored messages were collected, and the sharded
LISTEN channels. Real PostgreSQL on 127.0.0.1:5432 (database `test`), every test in its own
namespace (prefix, LISTEN channels, table). The contract suite (test_broker_contract.py)
covers the rest."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import orjson
import pytest

from centripy.engine.types import Publication
from centripy.storage.broker_postgres import PostgresBroker, asyncpg_dsn, shard_of
from centripy.storage.wire import encode_publication
from tests.storage.test_broker_contract import WAIT, Cluster, Recorder
from tests.support.services import postgres_url
from tests.support.wait import eventually

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(60)]


class StallingRecorder(Recorder):
    """Blocks the loop for `stall` seconds on its first publication, as a node busy with
    other work would: whatever arrives meanwhile is read in one go afterwards."""

    def __init__(self, stall: float) -> None:
        super().__init__()
        self.stall = stall

    def on_publication(self, channel: str, pub: Publication, epoch: str) -> None:
        if self.stall:
            time.sleep(self.stall)
            self.stall = 0.0
        super().on_publication(channel, pub, epoch)


@pytest.fixture
async def cluster() -> AsyncIterator[Cluster]:
    c = Cluster("postgres", postgres_url())
    try:
        yield c
    finally:
        await c.aclose()


async def stalling_node(
    cluster: Cluster, stall: float, **kw: object
) -> tuple[PostgresBroker, StallingRecorder]:
    broker = cluster.build(**kw)
    assert isinstance(broker, PostgresBroker)
    recorder = StallingRecorder(stall)
    await broker.start(f"node-stall-{len(cluster.nodes)}", recorder)
    cluster.nodes.append((broker, recorder))
    return broker, recorder


def inline(channel: str, offset: int) -> str:
    body = encode_publication("other-node", channel, Publication(str(offset).encode(), offset), "E")
    return "i" + base64.b64encode(body).decode()


def drain(recorder: Recorder) -> list[bytes]:
    out = []
    while not recorder.events.empty():
        event = recorder.events.get_nowait()
        if event[0] == "pub":
            out.append(event[2].data)
    return out


async def test_a_lagging_node_drops_its_backlog_and_resyncs_instead_of_growing(
    cluster: Cluster,
) -> None:
    a, _, _ = await cluster.node()
    b, rb = await stalling_node(cluster, 0.3, max_backlog=5, fetch_batch=2)
    await b.subscribe("ch")
    target = b.shard_channel(shard_of("ch", 32))
    conn = await asyncpg.connect(asyncpg_dsn(cluster.url))
    try:
        async with conn.transaction():  # 50 publications committed at once
            for offset in range(1, 51):
                await conn.execute("SELECT pg_notify($1, $2)", target, inline("ch", offset))
    finally:
        await conn.close()
    await eventually(lambda: rb.reconnects >= 1, WAIT, "on_reconnect after the overflow")
    assert b.overflows >= 1
    await eventually(lambda: b.received >= 50, WAIT, "all 50 notifications read")
    await a.publish("ch", Publication(b"after", 51), "E")
    await a.barrier("ch")
    await eventually(lambda: not rb.events.empty(), WAIT)
    await b.barrier("ch")
    got = drain(rb)
    assert got[-1] == b"after"  # delivery goes on after the resync
    assert len(got) < 51  # the backlog beyond max_backlog was dropped, not kept
    assert b._queue.qsize() <= 5


async def test_stored_messages_queued_together_are_fetched_with_one_select(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, _, _ = await cluster.node()
    b, rb = await stalling_node(cluster, 0.3)
    await b.subscribe("big")
    big = Publication(b"z" * 9000, 1)
    await a.publish("big", big, "E")  # creates the table; fetched alone
    assert await rb.next() == ("pub", "big", big, "E")
    calls: list[list[int]] = []
    fetch = b._fetch

    async def counting(ids: list[int]) -> dict[int, bytes]:
        calls.append(list(ids))
        return await fetch(ids)

    monkeypatch.setattr(b, "_fetch", counting)
    rb.stall = 0.3
    shard = shard_of("big", 32)
    other = next(f"o{i}" for i in range(1000) if shard_of(f"o{i}", 32) == shard)
    table, target = f"{cluster.name}_msgs", b.shard_channel(shard)
    conn = await asyncpg.connect(asyncpg_dsn(cluster.url))
    try:
        async with conn.transaction():
            await conn.execute("SELECT pg_notify($1, $2)", target, inline("big", 2))
            for offset in range(3, 33):
                channel = "big" if offset % 3 else other  # every third: not wanted by b
                body = encode_publication(
                    "other-node", channel, Publication(bytes([offset]) * 9000, offset), "E"
                )
                row = await conn.fetchval(
                    f"INSERT INTO {table} (body) VALUES ($1) RETURNING id", body
                )
                ref = "r" + orjson.dumps([str(row), "other-node", "p", channel]).decode()
                await conn.execute("SELECT pg_notify($1, $2)", target, ref)
    finally:
        await conn.close()
    wanted = [o for o in range(3, 33) if o % 3]
    events = [await rb.next() for _ in range(1 + len(wanted))]
    assert [e[2].offset for e in events] == [2, *wanted]  # in commit order
    assert all(e[2].data == bytes([e[2].offset]) * 9000 for e in events[1:])
    assert sum(len(c) for c in calls) == len(wanted)  # the unwanted ones are not fetched
    assert len(calls) <= 2, f"{len(calls)} SELECTs for {len(wanted)} stored messages"
    assert rb.reconnects == 0 and b.missed_rows == 0


async def test_a_node_lagging_past_the_collection_of_a_stored_message_resyncs(
    cluster: Cluster,
) -> None:
    """A stored message collected before a lagging node fetched it is not silently lost: the
    node calls on_reconnect, so its channels re-read the log (which has the publication)."""
    a, _, _ = await cluster.node(gc_after=0.1)
    b, rb, _ = await cluster.node(pool_size=1)
    await b.subscribe("big")
    await a.publish("big", Publication(b"1" * 9000, 1), "E")
    assert (await rb.next())[2].offset == 1
    assert b._pool is not None
    held = await b._pool.acquire()  # b's only pooled connection: its fetches wait
    try:
        received = b.received
        await a.publish("big", Publication(b"2" * 9000, 2), "E")
        await eventually(lambda: b.received > received, WAIT, "notification of #2")
        await asyncio.sleep(0.3)  # #2 grows older than gc_after
        await a.publish("big", Publication(b"3" * 9000, 3), "E")  # a collects #2
        conn = await asyncpg.connect(asyncpg_dsn(cluster.url))
        try:
            rows = await conn.fetchval(f"SELECT count(*) FROM {cluster.name}_msgs")
        finally:
            await conn.close()
        assert rows == 1  # only #3 is left
    finally:
        await b._pool.release(held)
    event = await rb.next()
    assert event[2].offset == 3  # #2 is gone from the broker ...
    assert rb.reconnects == 1 and b.missed_rows == 1  # ... and the log fills it


async def test_a_node_receives_only_the_shards_of_its_channels(cluster: Cluster) -> None:
    a, _, _ = await cluster.node(shards=8)
    b, rb, _ = await cluster.node(shards=8)
    mine = "room:1"
    shard = shard_of(mine, 8)
    same = next(f"room:{i}" for i in range(2, 1000) if shard_of(f"room:{i}", 8) == shard)
    others = [f"x:{i}" for i in range(40) if shard_of(f"x:{i}", 8) != shard]
    assert len({shard_of(ch, 8) for ch in others}) == 7
    await b.subscribe(mine)
    assert b.listened_shards() == {shard}
    before = b.received
    for ch in others:
        await a.publish(ch, Publication(b"no", 1), "E")
    await a.publish(same, Publication(b"same shard", 1), "E")  # received, then dropped
    await a.publish(mine, Publication(b"yes", 1), "E")
    assert (await rb.next())[1:3] == (mine, Publication(b"yes", 1))
    assert b.received - before == 2  # none of the other shards' publications reached b
    await b.subscribe(same)
    await b.unsubscribe(mine)
    assert b.listened_shards() == {shard}
    await b.unsubscribe(same)
    assert b.listened_shards() == set()  # UNLISTEN after the shard's last channel
    await a.publish(mine, Publication(b"late", 2), "E")
    await a.publish_control(b"marker")
    assert await rb.next() == ("control", b"marker")
    assert b.received - before == 3  # only the control message


async def test_a_new_listen_session_listens_to_every_wanted_shard(cluster: Cluster) -> None:
    a, _, _ = await cluster.node(shards=4)
    b, rb, b_uid = await cluster.node(shards=4)
    channels = [next(f"c{i}" for i in range(100) if shard_of(f"c{i}", 4) == s) for s in range(3)]
    await b.subscribe(channels[0])
    await b.subscribe(channels[1])
    await cluster.kill_listeners(b_uid)
    await b.subscribe(channels[2])  # while the session is down (or dying)
    await asyncio.wait_for(rb.reconnected.wait(), WAIT)
    await eventually(lambda: b.listened_shards() == {0, 1, 2}, WAIT, "shards re-listened")
    for offset, ch in enumerate(channels, 1):
        await a.publish(ch, Publication(b"x", offset), "E")
    got = {(await rb.next())[1] for _ in channels}
    assert got == set(channels)


async def test_concurrent_publications_share_transactions_in_call_order(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Group commit: messages queued meanwhile go in one transaction, in the order of the
    calls, large (stored) ones among them; identical ones (which PostgreSQL folds within a
    transaction) go in separate ones."""
    a, _, _ = await cluster.node()
    b, rb, _ = await cluster.node()
    await b.subscribe("ch")
    await a.publish("ch", Publication(b"L" * 9000, 1), "E")  # creates the table
    assert (await rb.next())[2].offset == 1
    batches: list[list[Any]] = []
    send = a._send_batch

    async def counting(batch: list[Any]) -> None:
        batches.append(list(batch))
        inline = [out.payload for out in batch if out.body is None]
        assert len(set(inline)) == len(inline)
        await send(batch)

    monkeypatch.setattr(a, "_send_batch", counting)
    same = Publication(b"same", 0)  # no offset: every copy must still arrive

    def pub(i: int) -> Publication:
        if i % 4 == 0:
            return same
        if i % 5 == 0:
            return Publication(bytes([i]) * 9000, i)  # stored in the table
        return Publication(str(i).encode(), i)

    pubs = [pub(i) for i in range(2, 202)]
    await asyncio.gather(*(a.publish("ch", p, "E") for p in pubs))
    got = [(await rb.next())[2] for _ in pubs]
    assert got == pubs
    sizes = [len(batch) for batch in batches]
    assert sum(sizes) == len(pubs) and max(sizes) > 1 and len(sizes) < len(pubs)
    mixed = [bt for bt in batches if {out.body is None for out in bt} == {True, False}]
    assert mixed, "no transaction carried inline and stored messages together"
    assert rb.reconnects == 0 and b.missed_rows == 0


def test_shards_and_limits() -> None:
    assert shard_of("anything", 1) == 0
    spread = [shard_of(f"user:{i}", 32) for i in range(3200)]
    assert min(spread.count(s) for s in range(32)) > 50
    assert shard_of("user:1", 32) == shard_of("user:1", 32)
    broker = PostgresBroker("postgresql://x/y", channel_prefix="p", shards=1)
    assert broker.shard_channel(0) == "p_pub"
    assert PostgresBroker("postgresql://x/y", channel_prefix="p").shard_channel(31) == "p_pub_31"
    bad_settings = [{"shards": 0}, {"shards": 1025}, {"max_backlog": 0}, {"fetch_batch": 0}]
    for bad in [*bad_settings, {"notify_batch": 0}]:
        with pytest.raises(ValueError):
            PostgresBroker("postgresql://x/y", **bad)  # type: ignore[arg-type]
