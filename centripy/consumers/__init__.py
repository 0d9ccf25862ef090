"""Asynchronous consumers (docs/spec/server_api.md 4): the PostgreSQL transactional outbox (also on
a SQLite file) and Kafka topics, feeding consumed `{method, payload}` commands to the server
API executor.

`start_consumers(config, dispatcher)` is called once by the composition root on the event
loop after the executor exists; it starts every enabled consumer and fails with
`ConsumerStartError` (after stopping those already started) when one cannot reach its
database or broker. `Consumers.stop()` runs on the loop during shutdown, before the hub shuts
down, so batches in flight still reach their subscribers.

A command that fails retryably is retried with backoff; after CENTRIPY_CONSUMER_MAX_RETRIES
retries (default 16; 0 = forever, as Centrifugo v5.2) it is logged and skipped, so a poison
row or record cannot block its partition for good (dispatch.RetryLimit).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Final, Protocol

from centripy.consumers.dispatch import (
    DEFAULT_MAX_RETRIES,
    ConsumerStartError,
    ConsumerStats,
    Dispatcher,
    max_retries_from_env,
)
from centripy.consumers.outbox import OutboxConsumer, OutboxSettings, OutboxStore
from centripy.consumers.postgres_outbox import NotifyListener, PostgresOutboxStore
from centripy.consumers.sqlite_outbox import SqliteOutboxStore, is_sqlite_dsn
from centripy.engine.config import Config, ConsumerConfig

log = logging.getLogger("centripy.consumers")

__all__ = ["ConsumerStartError", "Consumers", "Dispatcher", "start_consumers"]

STOP_TIMEOUT: Final = 15.0  # seconds for all consumers together, unless the caller says
MIN_STOP_TIMEOUT: Final = 0.5  # each consumer gets at least this to commit and close


class RunningConsumer(Protocol):
    name: str

    async def start(self) -> None: ...

    async def stop(self, timeout: float) -> None: ...

    def stats(self) -> dict[str, object]: ...


class Consumers:
    """The running consumers of a server; methods run on the event loop."""

    def __init__(self, consumers: Sequence[RunningConsumer] = ()) -> None:
        self._consumers = list(consumers)

    def __len__(self) -> int:
        return len(self._consumers)

    async def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Stop every consumer (each finishes or commits what it was doing), all within
        about `timeout` seconds (the server passes what is left of shutdown_timeout)."""
        consumers, self._consumers = self._consumers, []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        for consumer in reversed(consumers):
            try:
                await consumer.stop(max(MIN_STOP_TIMEOUT, deadline - loop.time()))
            except Exception:
                log.exception("consumer %s: error while stopping", consumer.name)

    def stats(self) -> dict[str, dict[str, object]]:
        """Counters per consumer name: type, applied, skipped, retries, errors, lag."""
        return {consumer.name: consumer.stats() for consumer in self._consumers}


def build_outbox(
    consumer: ConsumerConfig, dispatcher: Dispatcher, max_retries: int = DEFAULT_MAX_RETRIES
) -> OutboxConsumer:
    """A PostgreSQL outbox consumer, or a SQLite one when its dsn is `sqlite:///...`."""
    pg = consumer.postgresql
    if pg is None:
        raise ConsumerStartError(f"consumer {consumer.name}: postgresql settings missing")
    settings = OutboxSettings(
        num_partitions=pg.num_partitions,
        select_limit=pg.partition_select_limit,
        poll_interval=pg.partition_poll_interval,
        max_retries=max_retries,
    )
    store: OutboxStore
    if is_sqlite_dsn(pg.dsn):
        store = SqliteOutboxStore(consumer.name, pg.dsn, pg.outbox_table_name)
        outbox = OutboxConsumer(consumer.name, store, dispatcher, settings, ConsumerStats("sqlite"))
        if pg.partition_notification_channel:
            log.warning(
                "consumer %s: partition_notification_channel is ignored for SQLite (polling)",
                consumer.name,
            )
        return outbox
    pg_store = PostgresOutboxStore(consumer.name, pg.dsn, pg.outbox_table_name, pg.num_partitions)
    outbox = OutboxConsumer(
        consumer.name, pg_store, dispatcher, settings, ConsumerStats("postgresql")
    )
    if pg.partition_notification_channel:
        outbox.waker = NotifyListener(
            pg_store, pg.partition_notification_channel, pg.num_partitions,
            outbox.wake, outbox.wake_all,
        )  # fmt: skip
    return outbox


def build_consumer(
    consumer: ConsumerConfig, dispatcher: Dispatcher, env: Mapping[str, str]
) -> RunningConsumer:
    max_retries = max_retries_from_env(env)
    if consumer.type == "postgresql":
        return build_outbox(consumer, dispatcher, max_retries)
    if consumer.type == "kafka" and consumer.kafka is not None:
        # kafka-python is imported only when a Kafka consumer is configured (start-up time)
        from centripy.consumers.kafka import KafkaConsumerHandle, KafkaTuning

        return KafkaConsumerHandle(
            consumer.name, consumer.kafka, dispatcher, KafkaTuning.from_env(env),
            max_retries=max_retries,
        )  # fmt: skip
    raise ConsumerStartError(f"consumer {consumer.name}: unsupported type {consumer.type!r}")


async def start_consumers(
    config: Config, dispatcher: Dispatcher, env: Mapping[str, str] | None = None
) -> Consumers:
    """Start every enabled consumer of `config` (on the event loop). `env` defaults to the
    process environment (read for CENTRIPY_CONSUMER_MAX_RETRIES and the Kafka tuning)."""
    environ = os.environ if env is None else env
    started: list[RunningConsumer] = []
    try:
        for consumer in config.consumers:
            if consumer.disabled:
                log.info("consumer %s: disabled", consumer.name)
                continue
            running = build_consumer(consumer, dispatcher, environ)
            await running.start()
            started.append(running)
    except BaseException:
        await Consumers(started).stop()
        raise
    return Consumers(started)
