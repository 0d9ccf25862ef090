"""The service helpers work for real: Tansu carries a Kafka message end to end, and the
PostgreSQL/Redis/NATS probes find the machine's servers (or skip/fail as documented)."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.admin import NewTopic

from tests.support.services import TansuBroker, nats_url, postgres_url, redis_url


@pytest.mark.kafka
def test_tansu_broker_produces_and_consumes(tansu_broker: TansuBroker) -> None:
    topic = f"test-{uuid.uuid4().hex[:8]}"
    admin = KafkaAdminClient(bootstrap_servers=tansu_broker.bootstrap_servers)
    try:
        admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])
    finally:
        admin.close()

    producer = KafkaProducer(bootstrap_servers=tansu_broker.bootstrap_servers)
    try:
        metadata = producer.send(topic, key=b"k1", value=b'{"text":"hi"}').get(timeout=10)
        producer.flush(timeout=10)
    finally:
        producer.close()
    assert metadata.topic == topic
    assert metadata.offset == 0

    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=tansu_broker.bootstrap_servers,
        group_id=f"group-{topic}",
        auto_offset_reset="earliest",
        session_timeout_ms=2000,
        heartbeat_interval_ms=500,
        consumer_timeout_ms=15000,
    )
    try:
        received = next(iter(consumer))
    finally:
        consumer.close()
    assert (received.key, received.value, received.offset) == (b"k1", b'{"text":"hi"}', 0)


@pytest.mark.postgres
def test_postgres_url_reaches_the_test_database() -> None:
    import asyncpg

    url = postgres_url()
    assert url.startswith("postgresql+asyncpg://")

    async def query() -> str:
        connection = await asyncpg.connect(url.replace("+asyncpg", "", 1))
        try:
            return str(await connection.fetchval("SELECT current_database()"))
        finally:
            await connection.close()

    assert asyncio.run(query()) == "test"


def test_redis_url_answers_ping() -> None:
    url = redis_url()
    assert url == "redis://127.0.0.1:6379/0"


def test_nats_url_greets() -> None:
    assert nats_url() == "nats://127.0.0.1:4222"
