"""The NATS broker against the machine's NATS (127.0.0.1:4222), each test with its own
subject prefix: the broker contract suite of test_broker_contract.py (imported, run here
with a NATS `cluster`), plus what is NATS's own: subject names, publish order against
barriers, a late PONG, a server that is not there yet.

Every node reaches NATS through its own TcpProxy, so that a test can cut or stall one
node's connection without touching the other nodes (or other suites).
"""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import nats
import pytest

from centripy.engine.config import ConfigError
from centripy.engine.config_load import load_config
from centripy.engine.contracts import Broker, StorageError
from centripy.engine.types import Publication
from centripy.server import build_engine
from centripy.storage.broker_nats import NatsBroker, client_subject, plain_subject_part
from centripy.storage.presence_memory import MemoryPresence
from centripy.storage.presence_postgres import PostgresPresence
from centripy.storage.presence_redis import RedisPresence
from tests.storage.test_broker_contract import (
    INFO,
    PUB,
    WAIT,
    Cluster,
    Recorder,
    test_a_node_never_receives_its_own_messages,
    test_barrier_returns_after_what_other_nodes_published_before,
    test_control_to_every_node_and_to_one_node,
    test_join_and_leave,
    test_large_payloads,
    test_publication_reaches_only_other_nodes_subscribed_to_the_channel,
    test_reconnect_resubscribes_and_reports,
    test_unsubscribe_stops_delivery,
)
from tests.support.server import free_port, port_accepts
from tests.support.services import nats_url, unavailable
from tests.support.tcp_proxy import TcpProxy
from tests.support.wait import eventually

pytestmark = pytest.mark.timeout(90)

CONTRACT = (
    test_a_node_never_receives_its_own_messages,
    test_barrier_returns_after_what_other_nodes_published_before,
    test_control_to_every_node_and_to_one_node,
    test_join_and_leave,
    test_large_payloads,
    test_publication_reaches_only_other_nodes_subscribed_to_the_channel,
    test_reconnect_resubscribes_and_reports,
    test_unsubscribe_stops_delivery,
)


class NatsCluster(Cluster):
    """Brokers sharing one subject prefix, each node behind its own proxy."""

    def __init__(self) -> None:
        super().__init__("nats", nats_url())
        self.proxies: dict[str, TcpProxy] = {}

    async def node(self, uid: str = "", **kw: Any) -> tuple[Broker, Recorder, str]:
        uid = uid or f"node-{uuid.uuid4().hex[:8]}"
        proxy = await TcpProxy("127.0.0.1", 4222).start()
        self.proxies[uid] = proxy
        options = {"write_timeout": 2.0, "reconnect_wait": 0.2, **kw}
        broker, recorder = NatsBroker(proxy.url, prefix=self.name, **options), Recorder()
        await broker.start(uid, recorder)
        self.nodes.append((broker, recorder))
        return broker, recorder, uid

    async def kill_listeners(self, uid: str) -> None:
        self.proxies[uid].cut()

    async def aclose(self) -> None:
        await super().aclose()
        for proxy in self.proxies.values():
            await proxy.close()


@pytest.fixture
async def cluster() -> AsyncIterator[NatsCluster]:
    c = NatsCluster()
    try:
        yield c
    finally:
        await c.aclose()


# -- subjects -------------------------------------------------------------------------------


def test_plain_channels_keep_centrifugos_subject_and_others_are_encoded() -> None:
    assert client_subject("p", "chat:index") == "p.client.chat:index"
    assert client_subject("p", "a.b$c#42,7/x") == "p.client.a.b$c#42,7/x"
    for channel in ("with space", "a..b", ".a", "a.", "news.*", "news.>", "x>y", "été", "\n"):
        assert not plain_subject_part(channel)
        subject = client_subject("p", channel)
        prefix, _, encoded = subject.partition(".clientx.")
        assert prefix == "p" and plain_subject_part(subject)
        padded = encoded + "=" * (-len(encoded) % 4)
        assert base64.urlsafe_b64decode(padded).decode() == channel


async def test_subjects_on_the_wire(cluster: NatsCluster) -> None:
    """A plain channel is `<prefix>.client.<channel>` (what Centrifugo's nodes use);
    channels NATS could not carry as such still reach the other nodes."""
    a, _, _ = await cluster.node()
    b, rb, _ = await cluster.node()
    raw = await nats.connect(nats_url())
    try:
        seen: list[str] = []

        async def record(msg: Any) -> None:
            seen.append(msg.subject)

        await raw.subscribe(f"{cluster.name}.>", cb=record)
        await raw.flush()
        odd = ["with space", "news.*", "news.>", "a..b", "été", "tab\tand\nnewline"]
        for channel in ["chat:index", *odd]:
            await b.subscribe(channel)
            await a.publish(channel, PUB, "E")
            assert await rb.next() == ("pub", channel, PUB, "E")
        await eventually(lambda: len(seen) >= 7, WAIT, "raw subscriber saw all")
        assert seen[0] == f"{cluster.name}.client.chat:index"
        assert all(s.startswith(f"{cluster.name}.clientx.") for s in seen[1:])
        assert len(set(seen)) == 7
    finally:
        await raw.close()


async def test_messages_of_other_channels_or_foreign_bodies_are_dropped(
    cluster: NatsCluster,
) -> None:
    a, _, _ = await cluster.node()
    b, rb, _ = await cluster.node()
    await b.subscribe("ch")
    raw = await nats.connect(nats_url())
    try:
        subject = client_subject(cluster.name, "ch")
        await raw.publish(subject, b"not a broker body")
        await raw.publish(f"{cluster.name}.control", b"\x00garbage")
        await raw.flush()
        await a.publish("ch", PUB, "E")
        assert await rb.next() == ("pub", "ch", PUB, "E")
        assert rb.events.empty()
    finally:
        await raw.close()


# -- ordering -------------------------------------------------------------------------------


async def test_every_publish_is_routed_before_it_returns(cluster: NatsCluster) -> None:
    """nats-py's own flush() can send its PING ahead of a PUB still queued for its flusher
    (measured 5 in 2,000): one publish, then a barrier on the other node, many times."""
    a, _, _ = await cluster.node()
    b, rb, _ = await cluster.node()
    await b.subscribe("ch")
    for i in range(1500):
        await a.publish("ch", Publication(str(i).encode(), 0), "")
        await b.barrier("ch")
        assert rb.events.qsize() == 1, f"publication {i} not handed over after the barrier"
        rb.events.get_nowait()


async def test_a_late_pong_fails_the_publish_but_not_the_connection(
    cluster: NatsCluster,
) -> None:
    """nats-py's flush() cancels its PONG future on timeout, and the late PONG then stops
    the client's read loop for good; the broker's own round trip must survive it."""
    a, _, a_uid = await cluster.node(write_timeout=0.3)
    b, rb, _ = await cluster.node()
    await b.subscribe("ch")
    proxy = cluster.proxies[a_uid]
    proxy.stall()
    with pytest.raises(StorageError):
        await a.publish("ch", Publication(b"late", 1), "E")
    proxy.resume()
    assert (await rb.next())[2].data == b"late"  # it was sent, only unconfirmed
    for i in range(2, 6):
        await a.publish("ch", Publication(b"on time", i), "E")
        assert (await rb.next())[2].offset == i
    await b.publish_control(b"to-a")
    a_recorder = cluster.nodes[0][1]
    assert await a_recorder.next() == ("control", b"to-a")  # a still reads
    assert a_recorder.reconnects == 0


async def test_publishing_while_disconnected_fails_then_works_after_reconnect(
    cluster: NatsCluster,
) -> None:
    a, ra, a_uid = await cluster.node()
    b, rb, _ = await cluster.node()
    await b.subscribe("ch")
    cluster.proxies[a_uid].cut()

    async def fails() -> bool:
        try:
            await a.publish("ch", Publication(b"lost", 1), "E")
        except StorageError:
            return True
        return False

    await eventually(fails, WAIT, "publish fails while disconnected")
    await asyncio.wait_for(ra.reconnected.wait(), WAIT)
    await a.publish("ch", Publication(b"after", 2), "E")
    await eventually(
        lambda: any(e[0] == "pub" and e[2].data == b"after" for e in list(rb.events._queue)),
        WAIT,
        "the publication after the reconnect arrived",
    )


# -- start-up and configuration -------------------------------------------------------------


@pytest.fixture
def private_nats(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """A nats-server of our own on a free port, not started yet (`start`)."""
    binary = shutil.which("nats-server")
    if binary is None:
        unavailable("nats-server binary not found")
    port = free_port()
    state: dict[str, Any] = {"port": port, "proc": None}

    def start() -> None:
        args = [binary, "-a", "127.0.0.1", "-p", str(port)]
        state["proc"] = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.DEVNULL)

    state["start"] = start
    yield state
    if state["proc"] is not None:
        state["proc"].terminate()
        state["proc"].wait(10)


async def test_a_server_that_comes_later_is_connected_to(private_nats: dict[str, Any]) -> None:
    url = f"nats://127.0.0.1:{private_nats['port']}"
    a = NatsBroker(url, prefix="late", dial_timeout=0.3)
    b = NatsBroker(url, prefix="late", dial_timeout=0.3)
    ra, rb = Recorder(), Recorder()
    try:
        await asyncio.wait_for(a.start("a", ra), WAIT)  # does not raise
        await asyncio.wait_for(b.start("b", rb), WAIT)
        await b.subscribe("ch")  # remembered
        with pytest.raises(StorageError):
            await a.publish("ch", PUB, "E")
        with pytest.raises(StorageError):
            await a.publish_control(b"x")
        await b.barrier("ch")  # nothing to wait for
        private_nats["start"]()
        await eventually(lambda: port_accepts("127.0.0.1", private_nats["port"]), WAIT)
        await asyncio.wait_for(ra.reconnected.wait(), WAIT)
        await asyncio.wait_for(rb.reconnected.wait(), WAIT)
        await a.publish("ch", PUB, "E")
        assert await rb.next() == ("pub", "ch", PUB, "E")
        await a.publish_join_leave("ch", INFO, True)
        assert await rb.next() == ("join", "ch", INFO)
        assert ra.reconnects == rb.reconnects == 1
    finally:
        await a.close()
        await b.close()


async def test_publish_before_start_raises_storage_error() -> None:
    with pytest.raises(StorageError):
        await NatsBroker().publish("ch", PUB, "E")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"url": ""},
        {"url": "127.0.0.1:4222"},
        {"prefix": ""},
        {"prefix": "a b"},
        {"prefix": "a.*"},
        {"dial_timeout": 0},
        {"write_timeout": -1},
    ],
)
def test_bad_settings_raise_value_error(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        NatsBroker(**kwargs)


async def test_control_to_a_node_uid_that_is_no_subject_token_is_refused(
    cluster: NatsCluster,
) -> None:
    a, _, _ = await cluster.node()
    for uid in (">", "*", "a b", "x.>"):
        with pytest.raises(StorageError):
            await a.publish_control(b"x", uid)


async def test_close_is_idempotent_and_stops_delivery(cluster: NatsCluster) -> None:
    a, _, _ = await cluster.node()
    b, rb, _ = await cluster.node()
    c, rc, _ = await cluster.node()
    await b.subscribe("ch")
    await c.subscribe("ch")
    await b.close()
    await a.publish("ch", PUB, "E")
    assert await rc.next() == ("pub", "ch", PUB, "E")
    with pytest.raises(StorageError):
        await b.publish("ch", PUB, "E")
    assert rb.events.empty()


# -- the config keys ------------------------------------------------------------------------

PG = "postgresql://postgres@127.0.0.1:5432/test"


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"broker": "nats"}, "database_url"),  # a SQLite log is local to one node
        ({"broker": "nats", "database_url": PG, "nats_url": "127.0.0.1:4222"}, "nats_url"),
        ({"broker": "nats", "database_url": PG, "nats_prefix": "a.*"}, "nats_prefix"),
        ({"broker": "nats", "database_url": PG, "nats_prefix": "a b"}, "nats_prefix"),
        ({"broker": "nats", "database_url": PG, "nats_dial_timeout": "0s"}, "nats_dial_timeout"),
        ({"broker": "nats", "database_url": PG, "nats_write_timeout": 0}, "nats_write_timeout"),
    ],
)
def test_bad_nats_settings_refuse_the_config(
    tmp_path: Path, data: dict[str, Any], key: str
) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError) as info:
        load_config(str(path), {}, {})
    assert info.value.key == key


@pytest.mark.parametrize("engine", ["memory", "redis", "postgresql"])
def test_broker_nats_keeps_the_engines_presence(tmp_path: Path, engine: str) -> None:
    path = tmp_path / "config.json"
    settings = {
        "broker": "nats",
        "engine": engine,
        "database_url": PG,
        "nats_url": "nats://127.0.0.1:1,nats://127.0.0.1:2",
        "nats_prefix": "p1",
        "nats_dial_timeout": "2s",
        "nats_write_timeout": "3s",
    }
    path.write_text(json.dumps(settings))
    config, warnings = load_config(str(path), {}, {})
    assert not any("nats" in w for w in warnings)
    broker, presence = build_engine(config)
    assert isinstance(broker, NatsBroker)
    assert (broker._servers, broker._prefix) == (["nats://127.0.0.1:1", "nats://127.0.0.1:2"], "p1")
    assert (broker._dial_timeout, broker._write_timeout) == (2.0, 3.0)
    kinds = {"memory": MemoryPresence, "redis": RedisPresence, "postgresql": PostgresPresence}
    assert type(presence) is kinds[engine]
