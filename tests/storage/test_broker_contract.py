"""One contract suite for the cross-node brokers (RedisBroker, PostgresBroker): several
broker instances in one process play several nodes. Plus the shared wire codec and the
Redis sharding hash.

Redis (127.0.0.1:6379) and PostgreSQL (127.0.0.1:5432) are real; when absent the tests
skip, under CI=true they fail. Every test uses its own prefix / LISTEN channels / table.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis
from hypothesis import given
from hypothesis import strategies as st

from centripy.engine.contracts import Broker, StorageError
from centripy.engine.types import ClientInfo, Publication
from centripy.storage.broker_postgres import PostgresBroker, asyncpg_dsn
from centripy.storage.broker_redis import (
    RedisBroker,
    connection_kwargs,
    fnv1a64,
    jump_hash,
    shard_index,
)
from centripy.storage.wire import (
    decode_client_info,
    decode_message,
    encode_client_info,
    encode_control_envelope,
    encode_join_leave,
    encode_publication,
)
from tests.support.server import free_port
from tests.support.services import postgres_url, redis_url

pytestmark = pytest.mark.timeout(60)

WAIT = 10.0  # seconds any single expected event may take

INFO = ClientInfo("42", "client-1", b'{"name":"Alex"}', b'{"role":"x"}')
PUB = Publication(b'{"text":"hi"}', 7, INFO, {"k": "v"}, 1_700_000_000_123)


class Recorder:
    """A BrokerHandler that queues every call (made on the loop) for the test to await."""

    def __init__(self) -> None:
        self.events: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()
        self.reconnects = 0
        self.reconnected = asyncio.Event()

    def on_publication(self, channel: str, pub: Publication, epoch: str) -> None:
        self.events.put_nowait(("pub", channel, pub, epoch))

    def on_join(self, channel: str, info: ClientInfo) -> None:
        self.events.put_nowait(("join", channel, info))

    def on_leave(self, channel: str, info: ClientInfo) -> None:
        self.events.put_nowait(("leave", channel, info))

    def on_control(self, data: bytes) -> None:
        self.events.put_nowait(("control", data))

    def on_reconnect(self) -> None:
        self.reconnects += 1
        self.reconnected.set()

    async def next(self) -> tuple[Any, ...]:
        return await asyncio.wait_for(self.events.get(), WAIT)


class Cluster:
    """Brokers of one kind sharing one namespace (prefix, LISTEN channels, table)."""

    def __init__(self, kind: str, url: str) -> None:
        self.kind = kind
        self.url = url
        self.name = f"t{uuid.uuid4().hex[:12]}"
        self.nodes: list[tuple[Broker, Recorder]] = []

    def build(self, **kw: Any) -> Broker:
        if self.kind == "redis":
            return RedisBroker([self.url], prefix=self.name, io_timeout=2.0, **kw)
        return PostgresBroker(
            self.url, channel_prefix=self.name, table=f"{self.name}_msgs", io_timeout=2.0, **kw
        )

    async def node(self, uid: str = "", **kw: Any) -> tuple[Broker, Recorder, str]:
        uid = uid or f"node-{uuid.uuid4().hex[:8]}"
        broker, recorder = self.build(**kw), Recorder()
        await broker.start(uid, recorder)
        self.nodes.append((broker, recorder))
        return broker, recorder, uid

    async def kill_listeners(self, uid: str) -> None:
        """Cut the receiving connection of node `uid` from the server side."""
        if self.kind == "redis":
            client = aioredis.Redis.from_url(self.url)
            try:
                await kill_pubsub(client, uid)
            finally:
                await client.aclose()
            return
        conn = await asyncpg.connect(asyncpg_dsn(self.url))
        try:
            name = f"centripy-listen-{uid}"[:63]
            killed = await conn.fetch(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name = $1",
                name,
            )
            assert killed, f"no listener named {name}"
        finally:
            await conn.close()

    async def aclose(self) -> None:
        for broker, _ in self.nodes:
            await broker.close()
        if self.kind == "postgres":
            conn = await asyncpg.connect(asyncpg_dsn(self.url))
            try:
                await conn.execute(f"DROP TABLE IF EXISTS {self.name}_msgs")
            finally:
                await conn.close()


async def kill_pubsub(client: aioredis.Redis, uid: str) -> None:
    """`CLIENT KILL` of the PUB/SUB connections (CLIENT LIST TYPE pubsub) of node `uid`
    only, so that other suites sharing this Redis are left alone."""
    raw = await client.execute_command("CLIENT", "LIST", "TYPE", "pubsub")  # type: ignore[no-untyped-call]
    listing = raw.decode()
    ids = [
        fields["id"]
        for line in listing.splitlines()
        if (fields := dict(f.split("=", 1) for f in line.split() if "=" in f))
        and fields.get("name") == f"centripy-pubsub-{uid[:24]}"
    ]
    assert ids, "no pubsub connection found"
    for client_id in ids:
        await client.execute_command("CLIENT", "KILL", "ID", client_id)  # type: ignore[no-untyped-call]


@pytest.fixture(
    params=["redis", pytest.param("postgres", marks=pytest.mark.postgres)],
)
async def cluster(request: pytest.FixtureRequest) -> AsyncIterator[Cluster]:
    url = redis_url() if request.param == "redis" else postgres_url()
    c = Cluster(request.param, url)
    try:
        yield c
    finally:
        await c.aclose()


async def test_publication_reaches_only_other_nodes_subscribed_to_the_channel(
    cluster: Cluster,
) -> None:
    a, ra, _ = await cluster.node()
    b, rb, _ = await cluster.node()
    await b.subscribe("chat:index")
    await a.publish("chat:other", PUB, "EPOCH")
    binary = Publication(b"\x00\xff\n\x01", 8, None, {}, 0)
    await a.publish("chat:index", PUB, "EPOCH")
    await a.publish("chat:index", binary, "EPOCH")
    assert await rb.next() == ("pub", "chat:index", PUB, "EPOCH")
    assert await rb.next() == ("pub", "chat:index", binary, "EPOCH")
    await a.publish_control(b"marker")
    assert await rb.next() == ("control", b"marker")  # nothing of chat:other came first
    assert ra.events.empty()
    assert ra.reconnects == rb.reconnects == 0


async def test_a_node_never_receives_its_own_messages(cluster: Cluster) -> None:
    a, ra, _ = await cluster.node()
    b, rb, _ = await cluster.node()
    await a.subscribe("ch")
    await b.subscribe("ch")
    await a.publish("ch", Publication(b"1", 1), "E")
    await a.publish_join_leave("ch", INFO, True)
    await a.publish_control(b"from-a")
    assert (await rb.next())[2].data == b"1"
    assert (await rb.next())[0] == "join"
    assert await rb.next() == ("control", b"from-a")
    await b.publish("ch", Publication(b"2", 2), "E")
    # a would have seen its own messages before b's (one connection, commit order)
    assert await ra.next() == ("pub", "ch", Publication(b"2", 2), "E")


async def test_barrier_returns_after_what_other_nodes_published_before(
    cluster: Cluster,
) -> None:
    """A publication without an offset cannot be sequenced by its receivers: a node delivers
    its own only after `barrier`, which returns once every message of the channel that
    other nodes published before the call has been handed to the handler."""
    a, _, _ = await cluster.node()
    b, rb, _ = await cluster.node()
    await b.subscribe("ch")
    for rounds in range(20):
        for i in range(5):
            await a.publish("ch", Publication(f"{rounds}-{i}".encode(), 0), "")
        await b.barrier("ch")
        assert rb.events.qsize() == 5, f"round {rounds}: {rb.events.qsize()} of 5 handed over"
        for _ in range(5):
            rb.events.get_nowait()


async def test_join_and_leave(cluster: Cluster) -> None:
    a, _, _ = await cluster.node()
    b, rb, _ = await cluster.node()
    await b.subscribe("room")
    await a.publish_join_leave("room", INFO, True)
    await a.publish_join_leave("room", ClientInfo("", "anon"), False)
    assert await rb.next() == ("join", "room", INFO)
    assert await rb.next() == ("leave", "room", ClientInfo("", "anon"))


async def test_unsubscribe_stops_delivery(cluster: Cluster) -> None:
    a, _, _ = await cluster.node()
    b, rb, _ = await cluster.node()
    await b.subscribe("ch")
    await b.subscribe("ch")  # idempotent
    await a.publish("ch", Publication(b"1", 1), "E")
    assert (await rb.next())[0] == "pub"
    await b.unsubscribe("ch")
    await b.unsubscribe("ch")
    await a.publish("ch", Publication(b"2", 2), "E")
    await a.publish_control(b"marker")
    assert await rb.next() == ("control", b"marker")
    await b.subscribe("ch")
    await a.publish("ch", Publication(b"3", 3), "E")
    assert (await rb.next())[2].data == b"3"


async def test_control_to_every_node_and_to_one_node(cluster: Cluster) -> None:
    a, ra, a_uid = await cluster.node()
    b, rb, b_uid = await cluster.node()
    _, rc, c_uid = await cluster.node()
    await a.publish_control(b"all")
    assert await rb.next() == ("control", b"all")
    assert await rc.next() == ("control", b"all")
    await a.publish_control(b"to-b", b_uid)
    await a.publish_control(b"to-c", c_uid)
    assert await rb.next() == ("control", b"to-b")
    assert await rc.next() == ("control", b"to-c")  # to-b did not reach c
    await a.publish_control(b"to-self", a_uid)
    await b.publish_control(b"b-to-a", a_uid)
    assert await ra.next() == ("control", b"b-to-a")
    assert ra.events.empty() and rb.events.empty() and rc.events.empty()


@pytest.mark.parametrize("size", [5_000, 5_990, 8_192, 200_000])
async def test_large_payloads(cluster: Cluster, size: int) -> None:
    a, _, _ = await cluster.node()
    b, rb, _ = await cluster.node()
    await b.subscribe("big")
    data = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    pub = Publication(data, 3, INFO, {"t": "1"}, 5)
    await a.publish("big", pub, "E")
    await a.publish_control(data)
    assert await rb.next() == ("pub", "big", pub, "E")
    assert await rb.next() == ("control", data)


async def test_reconnect_resubscribes_and_reports(cluster: Cluster) -> None:
    a, _, _ = await cluster.node()
    b, rb, b_uid = await cluster.node()
    await b.subscribe("ch")
    await a.publish("ch", Publication(b"before", 1), "E")
    assert (await rb.next())[2].data == b"before"
    await cluster.kill_listeners(b_uid)
    await asyncio.wait_for(rb.reconnected.wait(), WAIT)
    assert rb.reconnects == 1
    await a.publish("ch", Publication(b"after", 2), "E")
    await a.publish_control(b"ctl-after")
    assert (await rb.next())[2].data == b"after"
    assert await rb.next() == ("control", b"ctl-after")


async def test_publish_raises_storage_error_when_the_server_is_unreachable() -> None:
    port = free_port()
    for broker in (
        RedisBroker([f"127.0.0.1:{port}"], prefix="t", connect_timeout=0.5),
        PostgresBroker(f"postgresql://postgres@127.0.0.1:{port}/test", connect_timeout=0.5),
    ):
        recorder = Recorder()
        await asyncio.wait_for(broker.start("lonely", recorder), WAIT)
        await broker.subscribe("ch")  # remembered, not an error
        with pytest.raises(StorageError):
            await asyncio.wait_for(broker.publish("ch", PUB, "E"), WAIT)
        with pytest.raises(StorageError):
            await asyncio.wait_for(broker.publish_control(b"x"), WAIT)
        await broker.close()
        assert recorder.reconnects == 0


async def test_publish_before_start_raises_storage_error() -> None:
    with pytest.raises(StorageError):
        await RedisBroker(["127.0.0.1:6379"]).publish("ch", PUB, "E")
    with pytest.raises(StorageError):
        await PostgresBroker("postgresql://postgres@127.0.0.1/test").publish("ch", PUB, "E")


# -- Redis specifics ------------------------------------------------------------------------


async def test_redis_shards_channels_over_several_addresses() -> None:
    url = redis_url()
    prefix = f"t{uuid.uuid4().hex[:12]}"
    # two "instances" that are the same server: each channel must still arrive exactly once
    addresses = [url, "redis://localhost:6379/0"]
    a, b = RedisBroker(addresses, prefix=prefix), RedisBroker(addresses, prefix=prefix)
    ra, rb = Recorder(), Recorder()
    await a.start("sa", ra)
    await b.start("sb", rb)
    try:
        channels = [f"ch{i}" for i in range(16)]
        assert {shard_index(ch, 2) for ch in channels} == {0, 1}
        for ch in channels:
            await b.subscribe(ch)
        for i, ch in enumerate(channels):
            await a.publish(ch, Publication(str(i).encode(), i + 1), "E")
        got = [await rb.next() for _ in channels]
        assert sorted(e[1] for e in got) == sorted(channels)
        await b.unsubscribe(channels[0])
        await a.publish(channels[0], PUB, "E")
        await a.publish(channels[1], PUB, "E")
        assert (await rb.next())[1] == channels[1]
    finally:
        await a.close()
        await b.close()


async def test_redis_subscribes_only_channels_with_local_subscribers() -> None:
    url = redis_url()
    prefix = f"t{uuid.uuid4().hex[:12]}"
    broker = RedisBroker([url], prefix=prefix)
    await broker.start("only", Recorder())
    client = aioredis.Redis.from_url(url)
    try:
        await broker.subscribe("x")
        listed = await client.pubsub_channels(f"{prefix}.*")
        assert sorted(listed) == sorted(
            [
                f"{prefix}.client.x".encode(),
                f"{prefix}.control".encode(),
                f"{prefix}.node.only".encode(),
            ]
        )
        await broker.unsubscribe("x")
        await asyncio.wait_for(_until_gone(client, f"{prefix}.client.x"), WAIT)
    finally:
        await broker.close()
        await client.aclose()


async def _until_gone(client: aioredis.Redis, name: str) -> None:
    while name.encode() in await client.pubsub_channels(name):
        await asyncio.sleep(0.01)


# -- PostgreSQL specifics -------------------------------------------------------------------


@pytest.mark.postgres
async def test_postgres_stored_messages_are_garbage_collected() -> None:
    c = Cluster("postgres", postgres_url())
    try:
        a, _, _ = await c.node()
        b, rb, _ = await c.node()
        await b.subscribe("big")
        await a.publish("big", Publication(b"x" * 9000, 1), "E")  # creates the table
        assert (await rb.next())[2].data == b"x" * 9000
        conn = await asyncpg.connect(asyncpg_dsn(c.url))
        try:
            table = f"{c.name}_msgs"
            await conn.execute(
                f"INSERT INTO {table} (body, created_at) VALUES ('old', now() - interval '2 min')"
            )
            a2, _, _ = await c.node()  # a fresh node collects on its first large publish
            await a2.publish("big", Publication(b"y" * 9000, 2), "E")
            assert (await rb.next())[2].data == b"y" * 9000
            bodies = [bytes(r["body"]) for r in await conn.fetch(f"SELECT body FROM {table}")]
            assert len(bodies) == 2 and b"old" not in bodies
        finally:
            await conn.close()
    finally:
        await c.aclose()


def test_postgres_broker_rejects_bad_names() -> None:
    with pytest.raises(ValueError):
        PostgresBroker("postgresql://x/y", channel_prefix="bad-name")
    with pytest.raises(ValueError):
        PostgresBroker("postgresql://x/y", table="t; DROP TABLE x")
    with pytest.raises(ValueError):
        PostgresBroker("mysql://x/y")


# -- codec and hashing ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "pub",
    [
        PUB,
        Publication(b""),
        Publication(b"\n\n\x00", 1, ClientInfo("", "", b"", b"\n")),
        Publication(b"{}", 2**40, ClientInfo("usér\n", "c", b"\xff", b""), {"a\n": "b"}),
    ],
)
def test_publication_codec_round_trip(pub: Publication) -> None:
    msg = decode_message(encode_publication("origin", "chan:\n#1", pub, "EP"))
    assert (msg.kind, msg.origin, msg.channel, msg.pub, msg.epoch) == (
        "p",
        "origin",
        "chan:\n#1",
        pub,
        "EP",
    )


def test_join_leave_and_control_codec_round_trip() -> None:
    join = decode_message(encode_join_leave("o", "ch", INFO, True))
    leave = decode_message(encode_join_leave("o", "ch", INFO, False))
    assert (join.kind, join.info, leave.kind, leave.info) == ("j", INFO, "l", INFO)
    control = decode_message(encode_control_envelope("o", b"\x00data\n", "target"))
    assert (control.kind, control.data, control.target) == ("c", b"\x00data\n", "target")
    assert decode_client_info(encode_client_info(INFO)) == INFO


@pytest.mark.parametrize(
    "body",
    [b"", b"no header", b"[]\n", b'[2,"p","o","c"]\n', b'[1,"x","o","c"]\n', b"{}\n"],
)
def test_malformed_bodies_raise_value_error(body: bytes) -> None:
    with pytest.raises(ValueError):
        decode_message(body)


@given(st.binary(max_size=64), st.binary(max_size=64))
def test_decoder_returns_or_raises_value_error(prefix: bytes, tail: bytes) -> None:
    for body in (prefix + b"\n" + tail, b'[1,"p"' + prefix + b"\n" + tail):
        try:
            msg = decode_message(body)
        except ValueError:
            continue
        assert msg.kind in ("p", "j", "l", "c")


def test_jump_hash_matches_the_reference_vectors() -> None:
    # go-jump's test vectors (Lamping & Veach)
    assert jump_hash(1, 1) == 0
    assert jump_hash(42, 57) == 43
    assert jump_hash(0xDEAD10CC, 1) == 0
    assert jump_hash(0xDEAD10CC, 666) == 361
    assert jump_hash(256, 1024) == 520


def test_fnv1a64_and_shard_index() -> None:
    assert fnv1a64(b"") == 0xCBF29CE484222325
    assert fnv1a64(b"a") == 0xAF63DC4C8601EC8C
    assert shard_index("anything", 1) == 0
    channels = [f"user:{i}" for i in range(1000)]
    spread = [shard_index(ch, 4) for ch in channels]
    assert all(0 <= s < 4 for s in spread)
    assert min(spread.count(i) for i in range(4)) > 150
    # consistent: growing 4 -> 5 shards only moves channels to the new shard
    assert all(shard_index(ch, 5) in (s, 4) for ch, s in zip(channels, spread, strict=True))


def test_redis_addresses_accept_host_port_and_urls() -> None:
    plain = connection_kwargs("127.0.0.1:6379", db=2, user="u", password="p")
    assert (plain["host"], plain["port"], plain["db"], plain["username"]) == (
        "127.0.0.1",
        6379,
        2,
        "u",
    )
    url = connection_kwargs("redis://a:b@h:7/5", db=2, user="u", password="p")
    assert (url["host"], url["port"], url["db"], url["username"], url["password"]) == (
        "h",
        7,
        5,
        "a",
        "b",
    )
    with pytest.raises(ValueError):
        connection_kwargs("http://h:1")
    with pytest.raises(ValueError):
        RedisBroker([])
