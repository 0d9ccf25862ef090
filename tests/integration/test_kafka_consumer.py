"""The Kafka consumer end to end against the Tansu broker: a real `centripy serve` process
consumes a topic and a real centrifuge-python subscriber receives the publications
(docs/spec/server_api.md 4.3). Group timings are shortened for Tansu through
CENTRIPY_KAFKA_SESSION_TIMEOUT_MS / CENTRIPY_KAFKA_HEARTBEAT_INTERVAL_MS."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaAdminClient, KafkaProducer
from kafka.admin import NewTopic
from kafka.errors import TopicAlreadyExistsError
from kafka.structs import TopicPartition
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.consumers_support import (
    SERVER_CONFIG,
    channel_name,
    history_data,
    server_log,
    subscriber,
    unique,
    wait_for_log,
    wait_for_log_count,
)
from tests.support.server import ServerFactory, ServerProcess
from tests.support.services import TansuBroker
from tests.support.wait import eventually

pytestmark = [pytest.mark.integration, pytest.mark.kafka, pytest.mark.timeout(30)]

KAFKA_ENV = {
    "CENTRIPY_KAFKA_SESSION_TIMEOUT_MS": "2000",
    "CENTRIPY_KAFKA_HEARTBEAT_INTERVAL_MS": "500",
    # a request lost across a broker restart (a group sync) is retried within the tests' waits
    "CENTRIPY_KAFKA_REQUEST_TIMEOUT_MS": "6000",
}
WAIT = 15.0  # a group join on Tansu takes about session_timeout_ms / 2


class Topic:
    """A uniquely named topic on a broker; blocking kafka-python calls run in threads."""

    def __init__(self, broker: TansuBroker, partitions: int = 1) -> None:
        self.broker = broker
        self.name = unique("topic")
        self.group = unique("group")
        self.partitions = partitions

    def create(self) -> None:
        admin = KafkaAdminClient(bootstrap_servers=self.broker.bootstrap_servers)
        try:
            admin.create_topics([NewTopic(self.name, self.partitions, 1)])
        finally:
            admin.close()

    def recreate(self) -> int:
        """`create` after a broker restart; returns the topic's partition count. Tansu creates
        a topic with its default partitions when a client (the reconnecting consumer) asks for
        its metadata first, whatever the client's allow_auto_create_topics says: then the topic
        already exists, with those partitions."""
        try:
            self.create()
            return self.partitions
        except TopicAlreadyExistsError:
            admin = KafkaAdminClient(bootstrap_servers=self.broker.bootstrap_servers)
            try:
                (described,) = admin.describe_topics([self.name])
            finally:
                admin.close()
            return len(described["partitions"])

    def _send(self, values: list[tuple[bytes, int]]) -> None:
        producer = KafkaProducer(bootstrap_servers=self.broker.bootstrap_servers)
        try:
            for value, partition in values:
                producer.send(self.name, value=value, partition=partition)
            producer.flush(timeout=10)
        finally:
            producer.close()

    async def send(self, values: list[bytes], partition: int = 0) -> None:
        await asyncio.to_thread(self._send, [(v, partition) for v in values])

    async def publish(self, channel: str, items: list[Any], partition: int = 0) -> None:
        await self.send([command(channel, d) for d in items], partition)

    def _committed(self) -> dict[int, int]:
        admin = KafkaAdminClient(bootstrap_servers=self.broker.bootstrap_servers)
        try:
            wanted = [TopicPartition(self.name, p) for p in range(self.partitions)]
            offsets = admin.list_group_offsets({self.group: wanted})[self.group]
        finally:
            admin.close()
        return {tp.partition: meta.offset for tp, meta in offsets.items() if meta.offset >= 0}

    async def committed(self) -> dict[int, int]:
        return await asyncio.to_thread(self._committed)

    def config(self, name: str = "kafka_in", **options: Any) -> dict[str, Any]:
        consumer = {
            "name": name,
            "type": "kafka",
            "kafka": {
                "brokers": [self.broker.bootstrap_servers],
                "topics": [self.name],
                "consumer_group": self.group,
                **options,
            },
        }
        return {**SERVER_CONFIG, "consumers": [consumer]}


def command(channel: str, data: Any, *, as_string: bool = False) -> bytes:
    payload: Any = {"channel": channel, "data": data}
    if as_string:
        payload = json.dumps(payload)
    return json.dumps({"method": "publish", "payload": payload}).encode()


@pytest.fixture
def topic(tansu_broker: TansuBroker) -> Topic:
    made = Topic(tansu_broker)
    made.create()
    return made


def start(server_factory: ServerFactory, config: dict[str, Any]) -> ServerProcess:
    return server_factory(config, env=KAFKA_ENV)


async def test_records_are_delivered_in_order(server_factory: ServerFactory, topic: Topic) -> None:
    server = start(server_factory, topic.config(max_poll_records=7))
    channel = channel_name()
    async with subscriber(server, channel) as sub:
        await topic.publish(channel, list(range(30)))
        assert await sub.wait_count(30, within=WAIT) == list(range(30))

    async def all_committed() -> bool:
        return await topic.committed() == {0: 30}

    await eventually(all_committed, WAIT, "offsets committed", interval=0.1)


async def test_each_partition_keeps_its_order(
    server_factory: ServerFactory, tansu_broker: TansuBroker
) -> None:
    topic = Topic(tansu_broker, partitions=3)
    topic.create()
    server = start(server_factory, {**topic.config(), "prometheus": True})
    channels = [channel_name() for _ in range(3)]
    async with (
        subscriber(server, channels[0]) as s0,
        subscriber(server, channels[1]) as s1,
        subscriber(server, channels[2]) as s2,
    ):
        for partition, channel in enumerate(channels):
            await topic.publish(channel, list(range(15)), partition=partition)
        for sub in (s0, s1, s2):
            assert await sub.wait_count(15, within=WAIT) == list(range(15))

    def partition_lags() -> dict[str, float] | None:
        """centripy_consumer_partition_lag by partition, once all three report 0."""
        with urllib.request.urlopen(f"{server.http_url}/metrics", timeout=5) as response:
            text = response.read().decode()
        lags = {
            s.labels["partition"]: s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name == "centripy_consumer_partition_lag" and s.labels["topic"] == topic.name
        }
        return lags if lags == {"0": 0.0, "1": 0.0, "2": 0.0} else None

    assert await eventually(lambda: asyncio.to_thread(partition_lags), WAIT, "lag 0 each")


async def test_garbage_records_are_skipped_and_committed(
    server_factory: ServerFactory, topic: Topic
) -> None:
    server = start(server_factory, topic.config())
    channel = channel_name()
    async with subscriber(server, channel) as sub:
        await topic.send(
            [
                command(channel, 0),
                b"not json",
                b"[1, 2, 3]",
                b'{"payload": {"channel": "x", "data": 1}}',  # no method
                json.dumps({"method": "publish", "payload": {"channel": 7}}).encode(),
                json.dumps({"method": "publish", "payload": {"data": 1}}).encode(),  # 107
                json.dumps({"method": "nope", "payload": {}}).encode(),  # ignored
                command(channel, 1),
            ]
        )
        assert await sub.wait_count(2, within=WAIT) == [0, 1]

    async def all_committed() -> bool:
        return await topic.committed() == {0: 8}

    await eventually(all_committed, WAIT, "offsets committed", interval=0.1)
    log = server_log(server)
    assert f"skipping malformed item at topic {topic.name} partition 0 offset 1" in log
    assert f"skipping publish at topic {topic.name} partition 0 offset 5" in log


async def test_payload_given_as_a_json_string(server_factory: ServerFactory, topic: Topic) -> None:
    server = start(server_factory, topic.config())
    channel = channel_name()
    async with subscriber(server, channel) as sub:
        await topic.send(
            [command(channel, {"text": "as string"}, as_string=True), command(channel, "plain")]
        )
        assert await sub.wait_count(2, within=WAIT) == [{"text": "as string"}, "plain"]


async def test_restart_continues_from_committed_offsets(
    server_factory: ServerFactory, topic: Topic
) -> None:
    server = start(server_factory, topic.config())
    channel = channel_name()
    async with subscriber(server, channel) as sub:
        await topic.publish(channel, [0, 1, 2, 3])
        assert await sub.wait_count(4, within=WAIT) == [0, 1, 2, 3]
    assert server.stop() == 0
    assert await topic.committed() == {0: 4}
    await topic.publish(channel, [4, 5])
    server.start()
    async with subscriber(server, channel) as sub:
        await topic.publish(channel, [6])
        await eventually(lambda: 6 in sub.data, WAIT)
        assert sub.data == [4, 5, 6][-len(sub.data) :]
    assert await history_data(server, channel) == list(range(7))


@pytest.fixture
def private_broker(tmp_path: Path) -> Iterator[TansuBroker]:
    """A broker of this test alone (it is restarted; Tansu keeps data in memory only)."""
    broker = TansuBroker(tmp_path / "tansu").start()
    yield broker
    broker.stop()


def assigned_line(topic: str, partitions: int) -> str:
    """The consumer's log line once it is assigned every partition of `topic`."""
    return "assigned [" + ", ".join(f"('{topic}', {p})" for p in range(partitions)) + "]"


async def test_broker_restart_is_survived(
    server_factory: ServerFactory, private_broker: TansuBroker
) -> None:
    # Tansu keeps everything in memory: a restart loses the topic, its records and the
    # group's offsets (a real Kafka keeps them). So "before" goes to partition 1 and the
    # records after the restart to partition 0, whose position is still 0.
    topic = Topic(private_broker, partitions=2)
    topic.create()
    server = start(server_factory, topic.config())
    channel = channel_name()
    assigned = assigned_line(topic.name, 2)
    async with subscriber(server, channel) as sub:
        await topic.publish(channel, ["before"], partition=1)
        assert await sub.wait_count(1, within=WAIT) == ["before"]
        await asyncio.to_thread(private_broker.stop)
        await wait_for_log(server, "ECONNREFUSED")  # the consumer noticed
        await asyncio.to_thread(private_broker.start)
        partitions = await asyncio.to_thread(topic.recreate)
        again = assigned_line(topic.name, partitions)  # the group was joined again
        await wait_for_log_count(server, again, 2 if again == assigned else 1, within=WAIT)
        await topic.publish(channel, ["after-0", "after-1"], partition=0)
        assert await sub.wait_count(3, within=WAIT) == ["before", "after-0", "after-1"]
        # Partition 1 lost "before" (offset 0) in the restart, but the group may have
        # committed position 1 again when it rejoined (a revoke commits): the consumer then
        # resumes at offset 1, the second record, as it would on a real Kafka.
        await topic.publish(channel, ["after-2", "after-3"], partition=1)
        await eventually(lambda: "after-3" in sub.data, WAIT, "partition 1 flows again")
        assert sub.data in (
            ["before", "after-0", "after-1", "after-2", "after-3"],
            ["before", "after-0", "after-1", "after-3"],
        )
    assert server.running
