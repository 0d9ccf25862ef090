"""One contract suite for PresenceManager: memory, Redis and PostgreSQL, all on a fake clock
(expiry is decided by the clock passed in, so short TTLs need no waiting). Plus checks of
the Redis key layout and the PostgreSQL table.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest
import redis.asyncio as aioredis

from centripy.engine.contracts import PresenceManager, PresenceStats, StorageError
from centripy.engine.types import ClientInfo
from centripy.storage.broker_postgres import asyncpg_dsn
from centripy.storage.presence_memory import MemoryPresence
from centripy.storage.presence_postgres import PostgresPresence
from centripy.storage.presence_redis import RedisPresence
from centripy.storage.wire import decode_client_info
from tests.storage.conftest import FakeClock
from tests.support.server import free_port
from tests.support.services import postgres_url, redis_url

pytestmark = pytest.mark.timeout(60)

A1 = ClientInfo("alice", "c-a1", b'{"name":"Alice"}', b'{"role":"admin"}')
A2 = ClientInfo("alice", "c-a2")
B1 = ClientInfo("bob", "c-b1", b"\x00\xff", b"")
ANON1 = ClientInfo("", "c-x1")
ANON2 = ClientInfo("", "c-x2")


def unique() -> str:
    return f"t{uuid.uuid4().hex[:12]}"


@pytest.fixture(
    params=["memory", "redis", pytest.param("postgres", marks=pytest.mark.postgres)],
)
async def presence(
    request: pytest.FixtureRequest, clock: FakeClock
) -> AsyncIterator[PresenceManager]:
    name = unique()
    manager: PresenceManager
    if request.param == "memory":
        manager = MemoryPresence(now=clock)
    elif request.param == "redis":
        manager = RedisPresence([redis_url()], prefix=name, now=clock)
    else:
        manager = PostgresPresence(postgres_url(), table=name, now=clock)
    try:
        yield manager
    finally:
        await manager.close()
        if request.param == "postgres":
            conn = await asyncpg.connect(asyncpg_dsn(postgres_url()))
            try:
                await conn.execute(f"DROP TABLE IF EXISTS {name}")
            finally:
                await conn.close()


async def test_empty_channel(presence: PresenceManager) -> None:
    assert await presence.presence("nobody") == {}
    assert await presence.stats("nobody") == PresenceStats(0, 0)


async def test_add_and_read_keep_every_field(presence: PresenceManager) -> None:
    await presence.add("chat:1", A1, 60)
    await presence.add("chat:1", B1, 60)
    assert await presence.presence("chat:1") == {"c-a1": A1, "c-b1": B1}
    assert await presence.presence("chat:2") == {}


async def test_add_again_replaces_the_entry(presence: PresenceManager) -> None:
    await presence.add("ch", A1, 60)
    updated = ClientInfo("alice", "c-a1", b'{"name":"A."}')
    await presence.add("ch", updated, 60)
    assert await presence.presence("ch") == {"c-a1": updated}


async def test_remove(presence: PresenceManager) -> None:
    await presence.add("ch", A1, 60)
    await presence.add("ch", A2, 60)
    await presence.remove("ch", "c-a1")
    await presence.remove("ch", "unknown")
    await presence.remove("other", "c-a2")
    assert await presence.presence("ch") == {"c-a2": A2}
    await presence.remove("ch", "c-a2")
    assert await presence.presence("ch") == {}


async def test_entries_expire_after_ttl_unless_refreshed(
    presence: PresenceManager, clock: FakeClock
) -> None:
    await presence.add("ch", A1, 2.0)
    await presence.add("ch", B1, 2.0)
    clock.advance(1.5)
    await presence.add("ch", B1, 2.0)  # refresh: B1 now lives until 3.5
    clock.advance(0.4)
    assert set(await presence.presence("ch")) == {"c-a1", "c-b1"}
    clock.advance(0.1)  # A1 reached its expiry
    assert set(await presence.presence("ch")) == {"c-b1"}
    assert await presence.stats("ch") == PresenceStats(1, 1)
    clock.advance(1.6)
    assert await presence.presence("ch") == {}
    assert await presence.stats("ch") == PresenceStats(0, 0)
    await presence.add("ch", A1, 2.0)  # a new entry after expiry
    assert await presence.presence("ch") == {"c-a1": A1}


async def test_stats_count_clients_and_distinct_users(presence: PresenceManager) -> None:
    for info in (A1, A2, B1, ANON1, ANON2):
        await presence.add("room", info, 60)
    # every anonymous connection counts as the one user ""
    assert await presence.stats("room") == PresenceStats(num_clients=5, num_users=3)
    await presence.remove("room", "c-b1")
    assert await presence.stats("room") == PresenceStats(num_clients=4, num_users=2)


async def test_channel_names_with_special_characters(presence: PresenceManager) -> None:
    names = ["news", "personal:#42", "a.b$c", "ünï cödé", "x" * 255]
    for i, name in enumerate(names):
        await presence.add(name, ClientInfo(str(i), f"c{i}"), 60)
    for i, name in enumerate(names):
        assert await presence.presence(name) == {f"c{i}": ClientInfo(str(i), f"c{i}")}


async def test_non_positive_ttl_is_rejected() -> None:
    for presence in (
        RedisPresence(["127.0.0.1:1"]),
        PostgresPresence("postgresql://postgres@127.0.0.1:1/test"),
    ):
        with pytest.raises(ValueError):
            await presence.add("ch", A1, 0)  # rejected before any I/O
        await presence.close()


# -- back-end specifics ---------------------------------------------------------------------


async def test_redis_layout_hash_zset_and_key_ttl(clock: FakeClock) -> None:
    url = redis_url()
    prefix = unique()
    presence = RedisPresence([url], prefix=prefix, now=clock)
    client = aioredis.Redis.from_url(url)
    try:
        await presence.add("chat:1", A1, 30)
        data_key, expire_key = f"{prefix}.presence.data.chat:1", f"{prefix}.presence.expire.chat:1"
        value = await client.hget(data_key, "c-a1")
        assert isinstance(value, bytes) and decode_client_info(value) == A1
        assert await client.zscore(expire_key, "c-a1") == pytest.approx(clock() + 30)
        assert 0 < await client.ttl(data_key) <= 30
        assert 0 < await client.ttl(expire_key) <= 30
        clock.advance(31)
        assert await presence.presence("chat:1") == {}
        assert await client.hlen(data_key) == 0  # pruned on read
        assert await client.zcard(expire_key) == 0
    finally:
        await presence.close()
        await client.aclose()


async def test_redis_shards_channels_over_addresses(clock: FakeClock) -> None:
    url = redis_url()
    presence = RedisPresence([url, "redis://localhost:6379/0"], prefix=unique(), now=clock)
    try:
        for i in range(8):
            await presence.add(f"ch{i}", ClientInfo("u", f"c{i}"), 30)
        for i in range(8):
            assert list(await presence.presence(f"ch{i}")) == [f"c{i}"]
    finally:
        await presence.close()


async def test_redis_unreachable_raises_storage_error() -> None:
    presence = RedisPresence([f"127.0.0.1:{free_port()}"], connect_timeout=0.5)
    try:
        with pytest.raises(StorageError):
            await presence.add("ch", A1, 10)
        with pytest.raises(StorageError):
            await presence.presence("ch")
    finally:
        await presence.close()


@pytest.mark.postgres
async def test_postgres_rows_are_pruned_and_swept(clock: FakeClock) -> None:
    table = unique()
    presence = PostgresPresence(postgres_url(), table=table, now=clock, sweep_interval=10)
    conn = await asyncpg.connect(asyncpg_dsn(postgres_url()))
    try:
        await presence.add("a", A1, 5)
        await presence.add("b", B1, 5)
        clock.advance(6)
        assert await presence.presence("a") == {}
        assert await conn.fetchval(f"SELECT count(*) FROM {table} WHERE channel = 'a'") == 0
        assert await conn.fetchval(f"SELECT count(*) FROM {table} WHERE channel = 'b'") == 1
        clock.advance(10)
        await presence.add("c", A2, 5)  # sweeps every channel's expired rows
        assert await conn.fetchval(f"SELECT count(*) FROM {table}") == 1
    finally:
        await presence.close()
        await conn.execute(f"DROP TABLE IF EXISTS {table}")
        await conn.close()


async def test_postgres_unreachable_raises_storage_error() -> None:
    presence = PostgresPresence(
        f"postgresql://postgres@127.0.0.1:{free_port()}/test", connect_timeout=0.5
    )
    with pytest.raises(StorageError):
        await presence.add("ch", A1, 10)
    await presence.close()
