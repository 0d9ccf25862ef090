"""RedisBroker and RedisPresence over TLS, through Redis Sentinel and on a Redis Cluster, each
against PRIVATE servers started here (tests/support/private_servers.py): a TLS-only
redis-server with a throwaway CA, a master + replica + three sentinels, a three-master cluster.
"""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from centripy.engine.config import Config, ConfigError
from centripy.engine.contracts import StorageError
from centripy.engine.types import ClientInfo, Publication
from centripy.storage.broker_redis import RedisBroker
from centripy.storage.presence_redis import RedisPresence
from centripy.storage.redis_conn import RedisTLS, SentinelOptions, redis_options
from tests.storage.test_broker_contract import Recorder
from tests.support.private_servers import (
    PrivateRedisCluster,
    PrivateSentinelSet,
    PrivateTLSRedis,
    ThrowawayPKI,
)
from tests.support.wait import eventually

pytestmark = pytest.mark.timeout(120)

WAIT = 10.0
INFO = ClientInfo("42", "client-1", b"{}", b"{}")


def pub(offset: int) -> Publication:
    return Publication(b'{"i":%d}' % offset, offset, INFO, {}, 1_700_000_000_000)


async def _pair(**kw: Any) -> tuple[list[RedisBroker], list[Recorder]]:
    brokers = [RedisBroker(io_timeout=2.0, **kw) for _ in range(2)]
    recorders = [Recorder(), Recorder()]
    for i, (broker, recorder) in enumerate(zip(brokers, recorders, strict=True)):
        await broker.start(f"node-{i}-{uuid.uuid4().hex[:6]}", recorder)
    return brokers, recorders


async def _close(brokers: list[RedisBroker]) -> None:
    for broker in brokers:
        await broker.close()


async def _exchange(brokers: list[RedisBroker], recorders: list[Recorder], channel: str) -> None:
    """b subscribes `channel`; a publishes offsets 1..3 (a barrier first) and a control
    message; b gets them in order."""
    a, b = brokers
    await b.subscribe(channel)
    await a.barrier(channel)
    for offset in (1, 2, 3):
        await a.publish(channel, pub(offset), "E")
    for offset in (1, 2, 3):
        event = await recorders[1].next()
        assert event[:2] == ("pub", channel) and event[2].offset == offset, event
    await a.publish_control(b"ctl")
    assert await recorders[1].next() == ("control", b"ctl")


# -- TLS --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> ThrowawayPKI:
    return ThrowawayPKI.create(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tls_redis(
    tmp_path_factory: pytest.TempPathFactory, pki: ThrowawayPKI
) -> Iterator[PrivateTLSRedis]:
    server = PrivateTLSRedis(tmp_path_factory.mktemp("tls-redis"), pki, auth_clients="yes")
    server.start()
    yield server
    server.close()


def _client_tls(pki: ThrowawayPKI, **kw: Any) -> RedisTLS:
    return RedisTLS(cert=str(pki.client_cert), key=str(pki.client_key), root_ca=str(pki.ca), **kw)


async def test_broker_and_presence_over_tls_with_a_client_certificate(
    tls_redis: PrivateTLSRedis, pki: ThrowawayPKI
) -> None:
    tls = _client_tls(pki)
    prefix = f"t{uuid.uuid4().hex[:8]}"
    brokers, recorders = await _pair(addresses=[tls_redis.address], prefix=prefix, tls=tls)
    presence = RedisPresence([tls_redis.address], prefix=prefix, tls=tls)
    try:
        await _exchange(brokers, recorders, "room")
        await presence.add("room", INFO, 60)
        assert list(await presence.presence("room")) == ["client-1"]
    finally:
        await _close(brokers)
        await presence.close()


async def test_tls_from_pem_values_and_server_name(
    tls_redis: PrivateTLSRedis, pki: ThrowawayPKI
) -> None:
    tls = RedisTLS(
        cert_pem=pki.client_cert.read_text(),
        key_pem=pki.client_key.read_text(),
        root_ca_pem=pki.ca.read_text(),
        server_name="localhost",  # in the certificate; 127.0.0.1 is dialled
    )
    presence = RedisPresence([tls_redis.address], prefix=f"t{uuid.uuid4().hex[:8]}", tls=tls)
    try:
        await presence.add("room", INFO, 60)
        assert (await presence.stats("room")).num_clients == 1
    finally:
        await presence.close()


@pytest.mark.parametrize(
    ("case", "tls_kw"),
    [
        ("unknown CA (system roots)", {"root_ca": ""}),
        ("name not in the certificate", {"server_name": "redis.example.org"}),
        ("no client certificate", {"cert": "", "key": ""}),
    ],
)
async def test_tls_refuses_what_it_cannot_verify(
    tls_redis: PrivateTLSRedis, pki: ThrowawayPKI, case: str, tls_kw: dict[str, Any]
) -> None:
    tls = dataclasses.replace(_client_tls(pki), **tls_kw)
    presence = RedisPresence([tls_redis.address], prefix="t", tls=tls, connect_timeout=2.0)
    try:
        with pytest.raises(StorageError):
            await presence.add("room", INFO, 60)
    finally:
        await presence.close()


async def test_tls_insecure_skip_verify_accepts_an_unknown_ca(
    tls_redis: PrivateTLSRedis, pki: ThrowawayPKI
) -> None:
    tls = RedisTLS(cert=str(pki.client_cert), key=str(pki.client_key), insecure_skip_verify=True)
    presence = RedisPresence([tls_redis.address], prefix=f"t{uuid.uuid4().hex[:8]}", tls=tls)
    try:
        await presence.add("room", INFO, 60)
    finally:
        await presence.close()


async def test_plain_text_to_a_tls_port_fails_cleanly(tls_redis: PrivateTLSRedis) -> None:
    presence = RedisPresence([tls_redis.address], prefix="t", io_timeout=1.0)
    try:
        with pytest.raises(StorageError):
            await presence.add("room", INFO, 60)
    finally:
        await presence.close()


def test_bad_tls_material_is_a_clear_error(tmp_path: Path, pki: ThrowawayPKI) -> None:
    with pytest.raises(ValueError, match="redis TLS"):
        RedisTLS(root_ca=str(tmp_path / "missing.pem")).context()
    with pytest.raises(ValueError, match="both a certificate and a key"):
        RedisTLS(cert=str(pki.client_cert)).context()


# -- Sentinel ---------------------------------------------------------------------------------


@pytest.fixture
def sentinels(tmp_path: Path) -> Iterator[PrivateSentinelSet]:
    group = PrivateSentinelSet(tmp_path / "sentinel")
    group.start()
    yield group
    group.close()


async def test_sentinel_broker_and_presence_follow_a_failover(
    sentinels: PrivateSentinelSet,
) -> None:
    prefix = f"t{uuid.uuid4().hex[:8]}"
    options = SentinelOptions(master_name=sentinels.name)
    kw: dict[str, Any] = {"addresses": sentinels.sentinel_addresses, "prefix": prefix}
    brokers, recorders = await _pair(**kw, sentinel=options, reconnect_backoff=(0.05, 0.5))
    presence = RedisPresence(sentinels.sentinel_addresses, prefix=prefix, sentinel=options)
    try:
        await _exchange(brokers, recorders, "room")
        await presence.add("room", INFO, 60)
        old = sentinels.master_port()
        new = await asyncio.to_thread(sentinels.kill_master)
        assert new != old
        # Both sessions notice, find the new master through the sentinels and resubscribe.
        for recorder in recorders:
            await asyncio.wait_for(recorder.reconnected.wait(), 30)

        async def delivered() -> bool:
            try:
                await brokers[0].publish("room", pub(4), "E")
            except StorageError:
                return False
            event = await asyncio.wait_for(recorders[1].events.get(), 1.0)
            return bool(event[0] == "pub" and event[2].offset == 4)

        await eventually(delivered, 30, "publishing through the new master")

        async def presence_back() -> bool:
            try:
                await presence.add("room", INFO, 60)  # the replica had the entry, or re-add
            except StorageError:
                return False
            return list(await presence.presence("room")) == ["client-1"]

        await eventually(presence_back, 30, "presence on the new master")
    finally:
        await _close(brokers)
        await presence.close()


async def test_sentinel_manual_failover_demotes_the_master_without_killing_it(
    sentinels: PrivateSentinelSet,
) -> None:
    """The old master stays up as a replica: connections to it must not be kept (PUBLISH
    there would reach only its own subscribers, presence writes would fail READONLY)."""
    prefix = f"t{uuid.uuid4().hex[:8]}"
    options = SentinelOptions(master_name=sentinels.name)
    kw: dict[str, Any] = {"addresses": sentinels.sentinel_addresses, "prefix": prefix}
    brokers, recorders = await _pair(**kw, sentinel=options, reconnect_backoff=(0.05, 0.5))
    presence = RedisPresence(sentinels.sentinel_addresses, prefix=prefix, sentinel=options)
    try:
        await _exchange(brokers, recorders, "room")
        await presence.add("room", INFO, 60)
        new = await asyncio.to_thread(sentinels.failover)
        for recorder in recorders:
            await asyncio.wait_for(recorder.reconnected.wait(), 30)

        async def on_new_master() -> bool:
            try:
                await presence.add("room", INFO, 60)
            except StorageError:
                return False
            return True

        await eventually(on_new_master, 30, "presence writes on the new master")
        for broker in brokers:  # both sessions and publishers are on the new master
            assert broker._shards[0].conn is not None
            assert broker._shards[0].label == f"sentinel master 127.0.0.1:{new}"
        await brokers[0].publish("room", pub(4), "E")
        event = await recorders[1].next()
        assert event[0] == "pub" and event[2].offset == 4
    finally:
        await _close(brokers)
        await presence.close()


async def test_sentinels_over_tls(tmp_path: Path, pki: ThrowawayPKI) -> None:
    """redis_sentinel_tls*: the sentinels are asked over TLS (the master stays plain)."""
    group = PrivateSentinelSet(tmp_path / "tls-sentinel", sentinels=1, tls=pki)
    await asyncio.to_thread(group.start)
    prefix = f"t{uuid.uuid4().hex[:8]}"
    good = SentinelOptions(master_name=group.name, tls=RedisTLS(root_ca=str(pki.ca)))
    plain = SentinelOptions(master_name=group.name)
    brokers: list[RedisBroker] = []
    presences = [
        RedisPresence(group.sentinel_addresses, prefix=prefix, sentinel=good),
        RedisPresence(group.sentinel_addresses, prefix=prefix, sentinel=plain, io_timeout=1.0),
    ]
    try:
        brokers, recorders = await _pair(
            addresses=group.sentinel_addresses, prefix=prefix, sentinel=good
        )
        await _exchange(brokers, recorders, "room")
        await presences[0].add("room", INFO, 60)
        with pytest.raises(StorageError, match="no sentinel named the master"):
            await presences[1].presence("room")
    finally:
        await _close(brokers)
        for presence in presences:
            await presence.close()
        await asyncio.to_thread(group.close)


async def test_without_sentinels_the_last_master_is_used(sentinels: PrivateSentinelSet) -> None:
    prefix = f"t{uuid.uuid4().hex[:8]}"
    options = SentinelOptions(master_name=sentinels.name)
    kw: dict[str, Any] = {"addresses": sentinels.sentinel_addresses, "prefix": prefix}
    brokers, recorders = await _pair(**kw, sentinel=options, reconnect_backoff=(0.05, 0.5))
    presence = RedisPresence(sentinels.sentinel_addresses, prefix=prefix, sentinel=options)
    try:
        await presence.add("room", INFO, 60)
        await asyncio.to_thread(sentinels.kill_sentinels)
        await asyncio.sleep(2.5)  # a few session pings that cannot reach a sentinel
        # new connections must be made without any sentinel to ask
        await presence._targets[0].client.connection_pool.disconnect()
        await brokers[0]._shards[0].target.client.connection_pool.disconnect()
        await _exchange(brokers, recorders, "room")
        assert list(await presence.presence("room")) == ["client-1"]
        assert all(r.reconnects == 0 for r in recorders)
    finally:
        await _close(brokers)
        await presence.close()


def test_sentinel_needs_a_master_name() -> None:
    with pytest.raises(ValueError, match="master_name"):
        RedisBroker(["127.0.0.1:26379"], sentinel=SentinelOptions(master_name=""))


# -- Cluster ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateRedisCluster]:
    group = PrivateRedisCluster(tmp_path_factory.mktemp("cluster"))
    group.start()
    yield group
    group.close()


@pytest.fixture
async def cluster_pair(
    cluster: PrivateRedisCluster,
) -> AsyncIterator[tuple[list[RedisBroker], list[Recorder]]]:
    brokers, recorders = await _pair(
        addresses=cluster.addresses[:1], prefix=f"t{uuid.uuid4().hex[:8]}", cluster=True
    )
    yield brokers, recorders
    await _close(brokers)


async def test_cluster_broker_uses_sharded_pubsub_on_every_master(
    cluster_pair: tuple[list[RedisBroker], list[Recorder]],
) -> None:
    brokers, recorders = cluster_pair
    channels = [f"room:{i}" for i in range(24)]
    masters = {brokers[0]._shard_for(ch).label for ch in channels}
    assert len(masters) == 3, masters  # channels spread over all three masters
    for channel in channels[:6]:
        await _exchange(brokers, recorders, channel)
    # join/leave and a control message to one node
    await brokers[0].publish_join_leave(channels[0], INFO, True)
    assert (await recorders[1].next())[0] == "join"
    await brokers[1].publish_control(b"to-a", node_uid=brokers[0]._uid)
    assert await recorders[0].next() == ("control", b"to-a")


async def test_cluster_barrier_orders_after_earlier_publications(
    cluster_pair: tuple[list[RedisBroker], list[Recorder]],
) -> None:
    brokers, recorders = cluster_pair
    a, b = brokers
    await a.subscribe("feed")
    for offset in range(1, 51):
        await b.publish("feed", pub(offset), "E")
    await a.barrier("feed")  # everything b published before is handed over by now
    assert recorders[0].events.qsize() == 50


async def test_cluster_unsubscribe_and_resubscribe_keeps_the_session(
    cluster_pair: tuple[list[RedisBroker], list[Recorder]],
) -> None:
    """Our own SUNSUBSCRIBE's answer, arriving after the channel was subscribed again, is
    not taken for the server dropping the subscription (which restarts the session)."""
    brokers, recorders = cluster_pair
    a, b = brokers
    for _ in range(20):
        await b.subscribe("flip")
        await b.unsubscribe("flip")
    await b.subscribe("flip")
    await b.barrier("flip")  # every SUNSUBSCRIBE answer has been read by now
    await a.publish("flip", pub(1), "E")
    event = await recorders[1].next()
    assert event[:2] == ("pub", "flip")
    assert recorders[1].reconnects == 0


async def test_cluster_presence_keeps_both_keys_in_one_slot(cluster: PrivateRedisCluster) -> None:
    presence = RedisPresence(cluster.addresses, prefix=f"t{uuid.uuid4().hex[:8]}", cluster=True)
    try:
        for i in range(12):
            info = ClientInfo(f"u{i}", f"c{i}", b"{}", b"{}")
            await presence.add(f"room:{i}", info, 60)
        for i in range(12):
            assert list(await presence.presence(f"room:{i}")) == [f"c{i}"]
        await presence.remove("room:0", "c0")
        assert await presence.presence("room:0") == {}
        assert presence.keys("a")[0].endswith("{a}")
    finally:
        await presence.close()


# -- configuration ----------------------------------------------------------------------------


def test_redis_options_from_the_config_keys(pki: ThrowawayPKI, tmp_path: Path) -> None:
    base = Config(engine="redis", redis_prefix="p", redis_password="pw")
    addresses, kw = redis_options(base)
    assert addresses == base.redis_address and kw["tls"] is None and "sentinel" not in kw
    tls_on = dataclasses.replace(
        base,
        redis_tls=True,
        redis_tls_root_ca=str(pki.ca),
        redis_tls_server_name="localhost",
        redis_sentinel_address=("127.0.0.1:1", "127.0.0.1:2"),
        redis_sentinel_master_name="m",
        redis_sentinel_password="spw",
        redis_sentinel_tls=True,
        redis_sentinel_tls_insecure_skip_verify=True,
        redis_cluster_address=("127.0.0.1:3",),
    )
    addresses, kw = redis_options(tls_on)
    assert addresses == ("127.0.0.1:1", "127.0.0.1:2")  # sentinel wins
    assert kw["tls"] == RedisTLS(root_ca=str(pki.ca), server_name="localhost")
    assert kw["sentinel"] == SentinelOptions(
        master_name="m", password="spw", tls=RedisTLS(insecure_skip_verify=True)
    )
    cluster = dataclasses.replace(base, redis_cluster_address=("127.0.0.1:3, 127.0.0.1:4",))
    assert redis_options(cluster) == (
        ("127.0.0.1:3", "127.0.0.1:4"),
        {**redis_options(base)[1], "cluster": True},
    )
    two_clusters = dataclasses.replace(base, redis_cluster_address=("h:1,h:2", "k:1"))
    with pytest.raises(ConfigError, match="several Redis Clusters"):
        redis_options(two_clusters)
    missing = dataclasses.replace(base, redis_tls=True, redis_tls_cert=str(tmp_path / "no.pem"),
                                  redis_tls_key=str(tmp_path / "no.pem"))  # fmt: skip
    with pytest.raises(ConfigError) as info:
        redis_options(missing)
    assert info.value.key == "redis_tls"


async def test_cluster_broker_and_presence_follow_a_master_failover(tmp_path: Path) -> None:
    group = PrivateRedisCluster(tmp_path / "cluster-ha", masters=3, replicas=1)
    await asyncio.to_thread(group.start)
    prefix = f"t{uuid.uuid4().hex[:8]}"
    brokers: list[RedisBroker] = []
    presence = RedisPresence(group.addresses, prefix=prefix, cluster=True)
    try:
        brokers, recorders = await _pair(
            addresses=group.addresses, prefix=prefix, cluster=True, reconnect_backoff=(0.05, 0.5)
        )
        await _exchange(brokers, recorders, "room")
        await presence.add("room", INFO, 60)
        victim = brokers[0]._shard_for("room").label
        await asyncio.to_thread(group.kill, victim)
        for recorder in recorders:
            await asyncio.wait_for(recorder.reconnected.wait(), 30)
        for broker in brokers:
            assert broker._shard_for("room").label != victim
        await brokers[0].publish("room", pub(4), "E")
        event = await recorders[1].next()
        assert event[0] == "pub" and event[2].offset == 4

        async def presence_back() -> bool:
            try:
                await presence.add("room", INFO, 60)
            except StorageError:
                return False
            return list(await presence.presence("room")) == ["client-1"]

        await eventually(presence_back, 30, "presence on the promoted replica")
    finally:
        await _close(brokers)
        await presence.close()
        await asyncio.to_thread(group.close)
