"""The consumers under faults (issue 16, item 4), end to end with a real `centripy serve`
process:

- a command that can never succeed (the event log refuses every publication to one
  channel: a real SQLite trigger in the server's log file, as a constraint would) is retried
  CENTRIPY_CONSUMER_MAX_RETRIES times, logged and skipped; the rows/records after it are
  applied and the Kafka offset is committed past it;
- a temporary failure (the same refusal, lifted after a few retries) is retried with the
  backoff the log shows and then applied, nothing skipped;
- Kafka through a broker outage: publishers keep producing across it (a record counts as
  acknowledged once the broker acknowledged it) and every acknowledged record is stored
  exactly once. The outage is shown twice: the Tansu broker itself stopped and restarted
  (Tansu keeps data in memory only, so a restart empties it: the test lets the consumer
  drain before the stop), and the broker's address going away and coming back (a Tansu
  proxy in front of the broker restarted; the broker keeps records and committed offsets,
  so consumption resumes from the committed offsets);
- exactly-once effect with `idempotency_key`: the same record produced twice is stored once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import sqlite3
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaProducer
from kafka.errors import TopicAlreadyExistsError

from tests.integration.consumers_support import (
    channel_name,
    history_data,
    server_log,
    wait_for_log,
    wait_for_log_count,
)
from tests.integration.test_kafka_consumer import KAFKA_ENV, Topic, command
from tests.integration.test_outbox_postgres import PgOutbox, new_outbox
from tests.integration.test_outbox_sqlite import SqliteOutbox
from tests.support.server import ServerFactory, ServerProcess, free_port, port_accepts, tail
from tests.support.services import TansuBroker, postgres_url, tansu_binary
from tests.support.wait import eventually

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

WAIT = 20.0
MAX_RETRIES = 3
RETRY_ENV = {"CENTRIPY_CONSUMER_MAX_RETRIES": str(MAX_RETRIES)}


# --- a command the event log refuses ------------------------------------------------------


def refuse_publications(server: ServerProcess, channel: str) -> None:
    """From now on the server's event log (SQLite, in its working directory) refuses every
    publication to `channel`: each attempt fails with an internal error (code 100)."""
    with contextlib.closing(sqlite3.connect(server.workdir / "centripy.db", timeout=10)) as db:
        db.execute(
            "CREATE TRIGGER refuse_channel BEFORE INSERT ON centripy_publications "
            f"WHEN NEW.channel = '{channel}' BEGIN SELECT RAISE(ABORT, 'refused'); END"
        )
        db.commit()


def accept_publications(server: ServerProcess) -> None:
    with contextlib.closing(sqlite3.connect(server.workdir / "centripy.db", timeout=10)) as db:
        db.execute("DROP TRIGGER refuse_channel")
        db.commit()


def retry_delays(server: ServerProcess) -> list[float]:
    """The backoff delays the outbox logged, in order."""
    found = re.findall(r"partition 0 waits ([0-9.]+) s before retry", server_log(server))
    return [float(d) for d in found]


# --- the outbox ---------------------------------------------------------------------------


@pytest.fixture
async def outbox(tmp_path: Path) -> SqliteOutbox:
    box = SqliteOutbox(tmp_path / "app.db")
    await box.create()
    return box


async def test_outbox_poison_row_is_skipped_after_its_retries(
    server_factory: ServerFactory, outbox: SqliteOutbox
) -> None:
    server = server_factory(outbox.config(), env=RETRY_ENV)
    good, poison = channel_name(), channel_name()
    refuse_publications(server, poison)
    await outbox.publish(good, [0])
    await outbox.publish(poison, ["never"])
    await outbox.publish(good, [1, 2])
    await outbox.drained()
    assert await history_data(server, good) == [0, 1, 2]
    assert await history_data(server, poison) == []
    where = f"{outbox.table} partition 0 id 2"
    log = server_log(server)
    assert f"giving up on publish at {where} after {MAX_RETRIES} retries, skipping it" in log
    assert log.count(f"publish at {where} failed, will retry") == MAX_RETRIES
    assert server.running


async def test_outbox_temporary_failure_is_retried_with_backoff(
    server_factory: ServerFactory, outbox: SqliteOutbox
) -> None:
    server = server_factory(outbox.config())  # default: 16 retries (about 45 s)
    channel = channel_name()
    refuse_publications(server, channel)
    await outbox.publish(channel, [0, 1, 2])
    await wait_for_log_count(server, "failed, will retry", 4, within=WAIT)
    assert await history_data(server, channel) == []
    accept_publications(server)
    await outbox.drained()
    assert await history_data(server, channel) == [0, 1, 2]
    assert "giving up" not in server_log(server)
    delays = retry_delays(server)
    assert len(delays) >= 4
    for n, delay in enumerate(delays):  # min(5 s, (10 ms + jitter[0, 10 ms)) * 2^n)
        assert min(5.0, 0.010 * 2**n) - 0.001 <= delay <= min(5.0, 0.020 * 2**n) + 0.001


@pytest.fixture
async def pg_outbox() -> AsyncIterator[PgOutbox]:
    postgres_url()  # skips (or fails under CI) without PostgreSQL
    box = await new_outbox([])
    try:
        yield box
    finally:
        await box.conn.execute(f"DROP TABLE IF EXISTS {box.table}")
        await box.conn.close()


async def test_postgres_outbox_poison_row_blocks_only_its_partition_and_is_skipped(
    server_factory: ServerFactory, pg_outbox: PgOutbox
) -> None:
    # 8 retries: partition 0 waits at least 2.5 s in all before the row is skipped.
    env = {"CENTRIPY_CONSUMER_MAX_RETRIES": "8"}
    server = server_factory(pg_outbox.config(num_partitions=2), env=env)
    first, second, poison = channel_name(), channel_name(), channel_name()
    refuse_publications(server, poison)
    await pg_outbox.insert(
        [
            ("publish", {"channel": first, "data": 0}),
            ("publish", {"channel": poison, "data": "never"}),
            ("publish", {"channel": first, "data": 1}),
        ],
        partition=0,
    )
    await pg_outbox.publish(second, list(range(5)), partition=1)

    async def other_partition_done() -> bool:
        return await history_data(server, second) == [0, 1, 2, 3, 4]

    async def stuck_at_poison() -> bool:
        return await history_data(server, first) == [0]

    await eventually(other_partition_done, WAIT, "partition 1 consumed", interval=0.05)
    await eventually(stuck_at_poison, WAIT, "partition 0 at the poison row", interval=0.05)
    assert "giving up" not in server_log(server)  # so partition 0 was still blocked
    await pg_outbox.drained()
    assert await history_data(server, first) == [0, 1]
    assert await history_data(server, second) == [0, 1, 2, 3, 4]
    assert await history_data(server, poison) == []
    poison_id = 2
    assert (
        f"giving up on publish at {pg_outbox.table} partition 0 id {poison_id} after "
        "8 retries, skipping it" in server_log(server)
    )


# --- Kafka: poison and temporary failures --------------------------------------------------


@pytest.fixture
def topic(tansu_broker: TansuBroker) -> Topic:
    made = Topic(tansu_broker)
    made.create()
    return made


async def test_kafka_poison_record_is_skipped_and_committed_past(
    server_factory: ServerFactory, topic: Topic
) -> None:
    server = server_factory(topic.config(), env={**KAFKA_ENV, **RETRY_ENV})
    good, poison = channel_name(), channel_name()
    refuse_publications(server, poison)
    await topic.send([command(good, 0), command(poison, "never"), command(good, 1)])
    await topic.publish(good, [2, 3])

    async def stored() -> bool:
        return await history_data(server, good) == [0, 1, 2, 3]

    await eventually(stored, WAIT, "records after the poison one applied", interval=0.1)

    async def committed() -> bool:
        return await topic.committed() == {0: 5}

    await eventually(committed, WAIT, "offset committed past the poison record", interval=0.1)
    where = f"topic {topic.name} partition 0 offset 1"
    log = server_log(server)
    assert f"giving up on publish at {where} after {MAX_RETRIES} retries, skipping it" in log
    assert log.count(f"publish at {where} failed, will retry") == MAX_RETRIES
    assert await history_data(server, poison) == []


async def test_kafka_temporary_failure_is_retried_then_applied_in_order(
    server_factory: ServerFactory, topic: Topic
) -> None:
    server = server_factory(topic.config(), env=KAFKA_ENV)
    channel = channel_name()
    refuse_publications(server, channel)
    await topic.publish(channel, [0, 1, 2])
    await wait_for_log_count(server, "failed, will retry", 3, within=WAIT)
    assert await topic.committed() == {}
    accept_publications(server)

    async def stored() -> bool:
        return await history_data(server, channel) == [0, 1, 2]

    await eventually(stored, WAIT, "records applied after the failure cleared", interval=0.1)

    async def committed() -> bool:
        return await topic.committed() == {0: 3}

    await eventually(committed, WAIT, "offsets committed", interval=0.1)
    log = server_log(server)
    assert "giving up" not in log
    waits = re.findall(r"offset 0 waits ([0-9.]+) s before retry (\d+)", log)
    assert [int(n) for _, n in waits[:3]] == [1, 2, 3]


# --- Kafka: exactly-once effect with idempotency_key ---------------------------------------


def keyed(channel: str, data: Any) -> bytes:
    """A publish record whose idempotency key is derived from its data."""
    payload = {"channel": channel, "data": data, "idempotency_key": f"k{data}"}
    return json.dumps({"method": "publish", "payload": payload}).encode()


async def test_kafka_duplicate_records_with_idempotency_key_are_stored_once(
    server_factory: ServerFactory, topic: Topic
) -> None:
    server = server_factory(topic.config(), env=KAFKA_ENV)
    channel = channel_name()
    # A producer retry (or a redelivery after an uncommitted batch) repeats records.
    await topic.send([keyed(channel, d) for d in (0, 1, 1, 2, 0, 3, 3)])

    async def committed() -> bool:
        return await topic.committed() == {0: 7}

    await eventually(committed, WAIT, "every record consumed", interval=0.1)
    assert await history_data(server, channel) == [0, 1, 2, 3]


async def stream_top(server: ServerProcess, channel: str) -> int:
    reply = await server.api_async("history", {"channel": channel, "limit": 0})
    return int(reply["result"].get("offset", 0))


async def test_kafka_crash_mid_stream_with_idempotency_keys_applies_each_record_once(
    server_factory: ServerFactory, topic: Topic
) -> None:
    server = server_factory(topic.config(), env=KAFKA_ENV)
    channel = channel_name()
    total = 900  # below the namespace's history_size (1000)
    await topic.send([keyed(channel, d) for d in range(total)])

    async def midway() -> bool:
        return await stream_top(server, channel) >= 200

    await eventually(midway, WAIT, "consumption under way", interval=0.02)
    server.kill()  # no graceful stop: the batch in flight is applied but not committed
    committed_at_kill = (await topic.committed()).get(0, 0)
    stored_at_kill = await stream_top(server.start(), channel)

    async def all_stored() -> bool:
        return await stream_top(server, channel) >= total

    await eventually(all_stored, 60, f"{total} records stored", interval=0.2)

    async def committed() -> bool:
        return await topic.committed() == {0: total}

    await eventually(committed, WAIT, "offsets committed", interval=0.1)
    assert await history_data(server, channel) == list(range(total))  # once each, in order
    print(
        f"SIGKILL with {committed_at_kill} records committed and at least {stored_at_kill} "
        f"applied: {max(0, stored_at_kill - committed_at_kill)} consumed again, none stored twice"
    )


# --- Kafka: publishers across a broker outage ----------------------------------------------


class TansuProxy:
    """A Tansu proxy on 127.0.0.1 in front of `origin`: clients that bootstrap through it
    see it as the broker. Stopping it is, for them, the broker going away."""

    def __init__(self, origin: TansuBroker, workdir: Path) -> None:
        self.origin = origin
        self.port = free_port()
        self.log_path = workdir / "tansu-proxy.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> TansuProxy:
        url = f"tcp://127.0.0.1:{self.port}"
        command_line = [
            str(tansu_binary()), "proxy", "--listener-url", url,
            "--advertised-listener-url", url, "--origin-url", f"tcp://{self.origin.bootstrap_servers}",
        ]  # fmt: skip
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                command_line, stdin=subprocess.DEVNULL, stdout=log, stderr=log
            )
        deadline = time.monotonic() + 15
        while not port_accepts("127.0.0.1", self.port):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"Tansu proxy did not start:\n{tail(self.log_path)}")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


class Publisher:
    """Produces numbered publish records (idempotency key: the number) to one partition,
    each retried until the broker acknowledges it; `acked` lists the numbers acknowledged,
    in order, `sent_at` when each was first sent (monotonic). Runs in a thread."""

    def __init__(self, bootstrap: str, topic: str, channel: str, partition: int = 0) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.channel = channel
        self.partition = partition
        self.acked: list[int] = []
        self.sent_at: list[float] = []
        self.failures = 0
        self.sending = threading.Event()  # cleared: paused (nothing is sent)
        self.sending.set()
        self.stopping = False
        self.ready = threading.Event()  # set once connected to the broker

    def run(self) -> None:
        producer = self._producer()
        self.ready.set()
        n = 0
        first_sent: float | None = None
        try:
            while not self.stopping:
                if not self.sending.wait(0.1):  # paused: re-check `stopping` now and then
                    continue
                if first_sent is None:
                    first_sent = time.monotonic()
                try:
                    future = producer.send(
                        self.topic, value=keyed(self.channel, n), partition=self.partition
                    )
                    future.get(timeout=5)
                except Exception:
                    self.failures += 1
                    producer.close(timeout=1)
                    time.sleep(0.2)
                    producer = self._producer()
                    continue
                self.acked.append(n)
                self.sent_at.append(first_sent)
                first_sent = None
                n += 1
                time.sleep(0.005)
        finally:
            producer.close(timeout=1)

    def _producer(self) -> KafkaProducer:
        while not self.stopping:
            try:
                return KafkaProducer(
                    bootstrap_servers=self.bootstrap, acks="all", retries=0,
                    request_timeout_ms=3000, max_block_ms=3000,
                )  # fmt: skip
            except Exception:
                self.failures += 1
                time.sleep(0.2)
        return KafkaProducer(bootstrap_servers=self.bootstrap)


@pytest.fixture
def private_broker(tmp_path: Path) -> Iterator[TansuBroker]:
    broker = TansuBroker(tmp_path / "tansu").start()
    yield broker
    broker.stop()


def fault_summary(server: ServerProcess, acked: int) -> str:
    log = server_log(server)
    return (
        f"{acked} acknowledged records stored once each; consumer log: "
        f"{log.count(' lost [')} partition losses, {log.count('records may be applied again')} "
        f"failed commits, {log.count(' assigned [')} assignments"
    )


async def stored_numbers(server: ServerProcess, channel: str) -> list[Any]:
    return await history_data(server, channel)


async def test_kafka_broker_unreachable_then_back_resumes_from_committed_offsets(
    server_factory: ServerFactory, private_broker: TansuBroker, tmp_path: Path
) -> None:
    proxy = TansuProxy(private_broker, tmp_path).start()
    try:
        topic = Topic(private_broker)
        topic.create()
        config = topic.config()
        config["consumers"][0]["kafka"]["brokers"] = [proxy.bootstrap_servers]
        server = server_factory(config, env=KAFKA_ENV)
        channel = channel_name()
        publisher = Publisher(private_broker.bootstrap_servers, topic.name, channel)
        producing = asyncio.create_task(asyncio.to_thread(publisher.run))
        try:
            await eventually(lambda: len(publisher.acked) >= 50, WAIT, "records produced")

            async def consumed(count: int) -> bool:
                return len(await stored_numbers(server, channel)) >= count

            await eventually(lambda: consumed(20), WAIT, "consumption started", interval=0.1)
            await asyncio.to_thread(proxy.stop)  # the consumer's broker is gone
            stopped_at = time.monotonic()
            await wait_for_log(server, "ECONNREFUSED", within=WAIT)
            outage_started = len(publisher.acked)
            await eventually(
                lambda: len(publisher.acked) >= outage_started + 100, WAIT, "produced meanwhile"
            )
            # Longer than the session timeout (2 s): the group drops the member, whose
            # uncommitted records are consumed again after it rejoins.
            await asyncio.sleep(max(0.0, stopped_at + 3.0 - time.monotonic()))
            await asyncio.to_thread(proxy.start)
            await eventually(
                lambda: len(publisher.acked) >= outage_started + 200, WAIT, "produced after"
            )
        finally:
            publisher.stopping = True
            await producing
        acked = publisher.acked

        async def all_stored() -> bool:
            return len(await stored_numbers(server, channel)) >= len(acked)

        await eventually(all_stored, WAIT, f"{len(acked)} acknowledged records stored")
        # None lost, none twice (records consumed again are de-duplicated by their
        # idempotency keys), in order.
        assert await stored_numbers(server, channel) == acked

        async def committed() -> bool:
            return await topic.committed() == {0: len(acked)}

        await eventually(committed, WAIT, "offsets committed", interval=0.1)
        print(fault_summary(server, len(acked)))
    finally:
        await asyncio.to_thread(proxy.stop)


async def test_kafka_broker_restart_with_publishers_across_it(
    server_factory: ServerFactory, private_broker: TansuBroker
) -> None:
    # Tansu's memory storage loses records, topics and offsets on a restart (a real Kafka
    # keeps them), so the consumer drains before the stop. Records produced across the
    # restart are applied once each: those applied before the consumer learns that its
    # group membership is gone are consumed again and de-duplicated by idempotency key.
    topic = Topic(private_broker, partitions=2)
    topic.create()
    server = server_factory(topic.config(), env=KAFKA_ENV)
    before, after = channel_name(), channel_name()
    first = Publisher(private_broker.bootstrap_servers, topic.name, before, partition=1)
    producing = asyncio.create_task(asyncio.to_thread(first.run))
    await eventually(lambda: len(first.acked) >= 50, WAIT, "records produced")
    first.stopping = True
    await producing

    async def drained() -> bool:
        return await history_data(server, before) == first.acked

    await eventually(drained, WAIT, "records before the restart consumed", interval=0.1)
    second = Publisher(private_broker.bootstrap_servers, topic.name, after, partition=0)
    second.sending.clear()
    producing = asyncio.create_task(asyncio.to_thread(second.run))
    try:
        await eventually(second.ready.is_set, WAIT, "publisher connected")
        await asyncio.to_thread(private_broker.stop)
        second.sending.set()  # sends wait or fail now and are retried until acknowledged
        await wait_for_log(server, "ECONNREFUSED", within=WAIT)
        await asyncio.to_thread(private_broker.start)
        with contextlib.suppress(TopicAlreadyExistsError):  # the producer's metadata
            await asyncio.to_thread(topic.create)  # request may have created it already
        restarted_at = time.monotonic()
        await eventually(lambda: len(second.acked) >= 200, WAIT, "produced after the restart")
    finally:
        second.stopping = True
        await producing
    assert second.sent_at[0] < restarted_at  # the first record was sent during the outage

    async def all_stored() -> bool:
        return await history_data(server, after) == second.acked

    await eventually(all_stored, WAIT, f"{len(second.acked)} acknowledged records stored")
    assert await history_data(server, before) == first.acked
    assert server.running
    print(fault_summary(server, len(second.acked)))
