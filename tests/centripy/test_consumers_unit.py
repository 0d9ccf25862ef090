"""Unit tests of the consumers (centripy/consumers): backoff, decoding of consumed values
(including a payload given as a JSON string), the error policy with a fake dispatcher, the
outbox loop against a fake store and a real SQLite file, and the Kafka actor driving a fake
kafka-python client on its own thread. No server process, no external services."""

from __future__ import annotations

import queue
import sqlite3
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
from kafka.errors import CommitFailedError
from kafka.structs import OffsetAndMetadata, TopicPartition

from centripy.consumers import Consumers, start_consumers
from centripy.consumers.backoff import CAP, Backoff, backoff_delay
from centripy.consumers.dispatch import (
    BatchOutcome,
    Command,
    ConsumerStartError,
    ConsumerStats,
    Item,
    Malformed,
    RetryLimit,
    apply_in_order,
    decode_record,
    max_retries_from_env,
    outbox_item,
    payload_bytes,
)
from centripy.consumers.kafka import (
    KafkaConsumerHandle,
    KafkaTuning,
    client_options,
)
from centripy.consumers.outbox import Apply, OutboxConsumer, OutboxSettings
from centripy.consumers.postgres_outbox import (
    PostgresOutboxStore,
    lock_key,
    parse_partition,
    table_identifier,
)
from centripy.consumers.sqlite_outbox import (
    SqliteOutboxStore,
    is_sqlite_dsn,
    sqlite_path,
)
from centripy.engine.api import Executor
from centripy.engine.api_requests import CommandFailed, DecodeError
from centripy.engine.config import (
    Config,
    ConsumerConfig,
    KafkaConsumerConfig,
    PostgresConsumerConfig,
)
from centripy.engine.protocol.codes import Error
from tests.support.wait import eventually

pytestmark = pytest.mark.timeout(30)


# --- fake dispatcher ---------------------------------------------------------------------


@dataclass
class FakeDispatcher:
    """Records dispatched payloads; `failures[data]` = how many times that payload fails
    with `errors[data]` (default: retryable code 100) before succeeding. Loop only."""

    calls: list[tuple[str, bytes]] = field(default_factory=list)
    applied: list[object] = field(default_factory=list)
    failures: dict[object, int] = field(default_factory=dict)
    errors: dict[object, Exception] = field(default_factory=dict)
    thread_ids: set[int] = field(default_factory=set)

    def ints(self) -> list[int]:
        return [d for d in self.applied if isinstance(d, int)]

    async def dispatch(self, method: str, payload: bytes) -> None:
        self.thread_ids.add(threading.get_ident())
        self.calls.append((method, payload))
        value = orjson.loads(payload)
        if isinstance(value, str):
            value = orjson.loads(value)
        data = value.get("data") if isinstance(value, dict) else None
        key = orjson.dumps(data)
        if self.failures.get(key, 0) > 0:
            self.failures[key] -= 1
            raise self.errors.get(key, CommandFailed(Error(100, "internal server error")))
        if key in self.errors and key not in self.failures:
            raise self.errors[key]
        self.applied.append(data)


def publish(data: object, channel: str = "ch") -> Command:
    return Command("publish", orjson.dumps({"channel": channel, "data": data}), "test")


# --- backoff -----------------------------------------------------------------------------


def test_backoff_doubles_from_10_to_20_ms_and_caps_at_5_s() -> None:
    assert backoff_delay(0, lambda: 0.0) == pytest.approx(0.010)
    assert backoff_delay(0, lambda: 0.999) == pytest.approx(0.01999)
    assert backoff_delay(3, lambda: 0.5) == pytest.approx(0.015 * 8)
    assert backoff_delay(9, lambda: 0.0) == CAP  # 10 ms * 512 > 5 s
    assert backoff_delay(10_000, lambda: 0.0) == CAP
    with pytest.raises(ValueError):
        backoff_delay(-1)


def test_backoff_counter_resets_after_success() -> None:
    backoff = Backoff(lambda: 0.0)
    delays = [backoff.next_delay() for _ in range(4)]
    assert delays == pytest.approx([0.01, 0.02, 0.04, 0.08])
    backoff.reset()
    assert backoff.next_delay() == pytest.approx(0.01)


# --- decoding ----------------------------------------------------------------------------


def test_record_with_object_payload() -> None:
    item = decode_record(b'{"method":"publish","payload":{"channel":"c","data":{"x":1}}}', "w")
    assert isinstance(item, Command)
    assert item.method == "publish"
    assert orjson.loads(item.payload) == {"channel": "c", "data": {"x": 1}}


def test_record_with_payload_as_json_string_is_unwrapped() -> None:
    inner = '{"channel":"c","data":{"text":"hi"}}'
    value = orjson.dumps({"method": "publish", "payload": inner})
    item = decode_record(value, "w")
    assert isinstance(item, Command)
    assert item.payload == inner.encode()


def test_record_keys_match_case_insensitively_and_missing_payload_is_null() -> None:
    item = decode_record(b'{"Method":"broadcast","PAYLOAD":{"channels":["a"]}}', "w")
    assert isinstance(item, Command) and item.method == "broadcast"
    bare = decode_record(b'{"method":"publish"}', "w")
    assert isinstance(bare, Command) and bare.payload == b"null"


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (None, "empty"),
        (b"", "empty"),
        (b"not json", "not JSON"),
        (b"[1,2]", "not a JSON object"),
        (b'{"payload":{}}', "method"),
        (b'{"method":7,"payload":{}}', "method"),
        (b'{"method":"","payload":{}}', "method"),
    ],
)
def test_malformed_records(value: bytes | None, reason: str) -> None:
    item = decode_record(value, "topic t partition 0 offset 3")
    assert isinstance(item, Malformed)
    assert reason in item.reason
    assert item.where == "topic t partition 0 offset 3"


def test_outbox_payload_and_row_conversion() -> None:
    assert payload_bytes('{"a":1}') == b'{"a":1}'
    assert payload_bytes(b"{}") == b"{}"
    assert payload_bytes(memoryview(b"{}")) == b"{}"
    assert payload_bytes({"a": [1]}) == b'{"a":[1]}'
    assert payload_bytes(None) == b"null"
    assert isinstance(outbox_item("publish", "{}", "w"), Command)
    assert isinstance(outbox_item(None, "{}", "w"), Malformed)
    assert isinstance(outbox_item("", "{}", "w"), Malformed)


# --- error policy ------------------------------------------------------------------------


async def test_policy_stops_at_first_retryable_failure() -> None:
    dispatcher = FakeDispatcher(failures={b"2": 1})
    items = [publish(1), publish(2), publish(3)]
    outcome = await apply_in_order(dispatcher, items, "c")
    assert outcome == BatchOutcome(done=1, applied=1, skipped=0, failure=outcome.failure)
    assert outcome.failure is not None and "100" in outcome.failure
    assert dispatcher.applied == [1]  # 3 was not attempted


async def test_policy_skips_malformed_and_non_retryable() -> None:
    dispatcher = FakeDispatcher(
        errors={b"2": CommandFailed(Error(102, "unknown channel")), b"3": DecodeError("bad")}
    )
    items: list[Item] = [publish(1), publish(2), Malformed("junk", "w"), publish(3), publish(4)]
    outcome = await apply_in_order(dispatcher, items, "c")
    assert outcome == BatchOutcome(done=5, applied=2, skipped=3, failure=None)
    assert dispatcher.applied == [1, 4]


async def test_policy_treats_unexpected_exceptions_as_retryable() -> None:
    dispatcher = FakeDispatcher(failures={b"1": 1}, errors={b"1": RuntimeError("boom")})
    outcome = await apply_in_order(dispatcher, [publish(1)], "c")
    assert outcome.done == 0 and outcome.failure == "RuntimeError: boom"


def test_retry_limit_counts_failures_of_one_item_and_gives_up() -> None:
    limit = RetryLimit(2)
    assert [limit.exhausted("a") for _ in range(2)] == [False, False]
    assert limit.failures("a") == 2 and limit.failures("b") == 0
    assert limit.exhausted("a") is True  # the third failure: 2 retries are used up
    assert limit.failures("a") == 0
    assert limit.exhausted("b") is False and limit.exhausted("c") is False  # a new count
    assert limit.failures("c") == 1
    forever = RetryLimit(0)
    assert not any(forever.exhausted("a") for _ in range(1000))
    with pytest.raises(ValueError):
        RetryLimit(-1)


def test_max_retries_from_env() -> None:
    assert max_retries_from_env({}) == 16
    assert max_retries_from_env({"CENTRIPY_CONSUMER_MAX_RETRIES": "3"}) == 3
    assert max_retries_from_env({"CENTRIPY_CONSUMER_MAX_RETRIES": "0"}) == 0
    for bad in ("-1", "x", "1.5"):
        with pytest.raises(ConsumerStartError, match="CENTRIPY_CONSUMER_MAX_RETRIES"):
            max_retries_from_env({"CENTRIPY_CONSUMER_MAX_RETRIES": bad})


async def test_policy_gives_up_on_a_poison_item_and_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    dispatcher = FakeDispatcher(failures={b"2": 1000}, errors={b"2": RuntimeError("boom")})
    limit = RetryLimit(2)
    items = [publish(1), Command("publish", orjson.dumps({"data": 2}), "row 2"), publish(3)]
    first = await apply_in_order(dispatcher, items, "c", limit)
    assert (first.done, first.applied, first.failure) == (1, 1, "RuntimeError: boom")
    second = await apply_in_order(dispatcher, items[1:], "c", limit)
    assert (second.done, second.failure) == (0, "RuntimeError: boom")
    third = await apply_in_order(dispatcher, items[1:], "c", limit)
    assert third == BatchOutcome(done=2, applied=1, skipped=1, failure=None, gave_up=1)
    assert dispatcher.applied == [1, 3]
    assert "giving up on publish at row 2 after 2 retries, skipping it: RuntimeError: boom" in (
        caplog.text
    )


async def test_real_executor_dispatch_is_a_dispatcher() -> None:
    """The real Executor's errors map onto the policy: a payload that does not decode is
    skipped, an unknown method is ignored (applied)."""

    class Unused:
        def __getattr__(self, name: str) -> Any:
            raise AssertionError(f"unexpected call of {name}")

    executor = Executor(Unused(), Unused())  # type: ignore[arg-type]
    items: list[Item] = [
        Command("publish", b'"[1]"', "w"),
        Command("frobnicate", b"{}", "w"),
        Command("publish", b'{"channel": 5}', "w"),
    ]
    outcome = await apply_in_order(executor, items, "c")
    assert outcome == BatchOutcome(done=3, applied=1, skipped=2, failure=None)


# --- helpers of the stores ---------------------------------------------------------------


def test_postgres_helpers() -> None:
    assert lock_key("pg_outbox", 0) == "centrifugo_partition_lock_pg_outbox0"
    assert table_identifier("public.centrifugo_outbox") == "public.centrifugo_outbox"
    for bad in ("t; DROP TABLE x", 'a"b', "", "1abc", "a.b.c"):
        with pytest.raises(ConsumerStartError):
            table_identifier(bad)
    assert parse_partition("3", 4) == 3
    assert parse_partition(" 0 ", 1) == 0
    assert parse_partition("4", 4) is None
    assert parse_partition("-1", 4) is None
    assert parse_partition("x", 4) is None
    for dsn in ("postgresql+asyncpg://u@h/db", "postgres://u@h/db", "postgresql://u@h/db"):
        assert PostgresOutboxStore("c", dsn, "t", 1).dsn == "postgresql://u@h/db"
    for bad in ("mysql://u@h/db", "u@h/db"):
        with pytest.raises(ConsumerStartError, match="not a PostgreSQL URL"):
            PostgresOutboxStore("c", bad, "t", 1)


def test_sqlite_dsn_paths() -> None:
    assert is_sqlite_dsn("sqlite:///app.db") and not is_sqlite_dsn("postgresql://x")
    assert sqlite_path("sqlite:///app.db") == Path("app.db")
    assert sqlite_path("sqlite:////tmp/a b.db") == Path("/tmp/a b.db")
    assert sqlite_path("sqlite+aiosqlite:////tmp/x.db?mode=rw") == Path("/tmp/x.db")
    for bad in ("sqlite://", "sqlite:///", "sqlite:///:memory:", "sqlite://host/x.db"):
        with pytest.raises(ConsumerStartError):
            sqlite_path(bad)


def test_kafka_client_options() -> None:
    plain = client_options(
        KafkaConsumerConfig(brokers=("b:9092",), topics=("t",), consumer_group="g"),
        KafkaTuning(session_timeout_ms=2000, heartbeat_interval_ms=500),
    )
    assert plain["security_protocol"] == "PLAINTEXT"
    assert plain["enable_auto_commit"] is False
    assert plain["auto_offset_reset"] == "earliest"
    assert (plain["session_timeout_ms"], plain["heartbeat_interval_ms"]) == (2000, 500)
    assert plain["group_id"] == "g" and plain["max_poll_records"] == 100
    sasl_tls = client_options(
        KafkaConsumerConfig(
            brokers=("b:9093",), topics=("t",), consumer_group="g", sasl_mechanism="plain",
            sasl_user="u", sasl_password="p", tls=True, tls_insecure_skip_verify=True,
        ),
        KafkaTuning(),
    )  # fmt: skip
    assert sasl_tls["security_protocol"] == "SASL_SSL"
    assert (sasl_tls["sasl_mechanism"], sasl_tls["sasl_plain_username"]) == ("PLAIN", "u")
    assert sasl_tls["ssl_check_hostname"] is False


def test_kafka_tuning_from_env() -> None:
    tuning = KafkaTuning.from_env({"CENTRIPY_KAFKA_SESSION_TIMEOUT_MS": "2000"})
    assert (tuning.session_timeout_ms, tuning.heartbeat_interval_ms) == (2000, 3000)
    with pytest.raises(ConsumerStartError):
        KafkaTuning.from_env({"CENTRIPY_KAFKA_HEARTBEAT_INTERVAL_MS": "soon"})
    tuning = KafkaTuning.from_env({"CENTRIPY_KAFKA_REQUEST_TIMEOUT_MS": "6000"})
    assert tuning.request_timeout_ms == 6000 and KafkaTuning().request_timeout_ms == 30_000
    assert (
        client_options(
            KafkaConsumerConfig(brokers=("b:9092",), topics=("t",), consumer_group="g"), tuning
        )["request_timeout_ms"]
        == 6000
    )
    with pytest.raises(ConsumerStartError, match="CENTRIPY_KAFKA_REQUEST_TIMEOUT_MS"):
        KafkaTuning.from_env({"CENTRIPY_KAFKA_REQUEST_TIMEOUT_MS": "400"})  # <= the fetch wait


# --- the outbox loop with a fake store ---------------------------------------------------


class FakeStore:
    """An in-memory outbox: rows per partition; `down` makes `process` raise."""

    label = "fake table"

    def __init__(self, rows: dict[int, list[tuple[int, str, bytes]]]) -> None:
        self.rows = rows
        self.down = False
        self.calls = 0
        self.closed = False

    async def start(self) -> None:
        return None

    async def process(self, partition: int, limit: int, apply: Apply) -> tuple[int, BatchOutcome]:
        self.calls += 1
        if self.down:
            raise ConnectionError("database is down")
        batch = self.rows.get(partition, [])[:limit]
        items: list[Item] = [outbox_item(m, p, f"id {i}") for i, m, p in batch]
        outcome = await apply(items)
        done = {row[0] for row in batch[: outcome.done]}
        self.rows[partition] = [r for r in self.rows.get(partition, []) if r[0] not in done]
        return len(batch), outcome

    async def close(self) -> None:
        self.closed = True


def rows(start: int, stop: int) -> list[tuple[int, str, bytes]]:
    return [(i, "publish", orjson.dumps({"channel": "ch", "data": i})) for i in range(start, stop)]


async def test_outbox_loop_applies_in_order_retries_and_wakes() -> None:
    store = FakeStore({0: rows(0, 25), 1: rows(100, 103)})
    dispatcher = FakeDispatcher(failures={b"7": 3})
    stats = ConsumerStats("fake")
    settings = OutboxSettings(num_partitions=2, select_limit=10, poll_interval=30.0)
    outbox = OutboxConsumer("c", store, dispatcher, settings, stats)
    await outbox.start()
    try:
        await eventually(lambda: not store.rows[0] and not store.rows[1])
        assert [d for d in dispatcher.applied if isinstance(d, int) and d < 100] == list(range(25))
        assert [d for d in dispatcher.applied if isinstance(d, int) and d >= 100] == [100, 101, 102]
        assert (stats.applied, stats.retries, stats.skipped) == (28, 3, 0)
        # Idle now for 30 s; a wake-up is served at once.
        store.rows[1] = rows(200, 201)
        outbox.wake(1)
        outbox.wake(99)  # out of range: ignored
        await eventually(lambda: 200 in dispatcher.applied, 2.0)
    finally:
        await outbox.stop()
    assert store.closed
    assert outbox.stats()["applied"] == 29


async def test_outbox_loop_skips_a_poison_row_after_its_retries() -> None:
    store = FakeStore({0: rows(0, 6)})
    dispatcher = FakeDispatcher(failures={b"2": 1000, b"4": 2})  # 2 never passes, 4 does
    stats = ConsumerStats("fake")
    settings = OutboxSettings(select_limit=10, poll_interval=30.0, max_retries=3)
    outbox = OutboxConsumer("c", store, dispatcher, settings, stats)
    await outbox.start()
    try:
        await eventually(lambda: not store.rows[0])
        assert dispatcher.ints() == [0, 1, 3, 4, 5]
        assert (stats.applied, stats.skipped, stats.gave_up, stats.retries) == (5, 1, 1, 5)
        assert dispatcher.failures[b"2"] == 1000 - 4  # tried once and retried 3 times
    finally:
        await outbox.stop()


async def test_outbox_loop_survives_a_database_outage() -> None:
    store = FakeStore({0: []})
    store.down = True
    stats = ConsumerStats("fake")
    outbox = OutboxConsumer("c", store, FakeDispatcher(), OutboxSettings(poll_interval=0.01), stats)
    await outbox.start()
    try:
        await eventually(lambda: stats.errors >= 3)
        store.rows[0] = rows(0, 3)
        store.down = False
        await eventually(lambda: stats.applied == 3)
        assert not store.rows[0]
    finally:
        await outbox.stop()


# --- the SQLite store on a real file -----------------------------------------------------


def make_sqlite_outbox(path: Path, table: str, count: int, partitions: int = 1) -> None:
    with sqlite3.connect(path) as db:
        db.execute(
            f"CREATE TABLE {table} (id INTEGER PRIMARY KEY AUTOINCREMENT, method TEXT,"
            " payload TEXT NOT NULL, partition INTEGER NOT NULL DEFAULT 0)"
        )
        db.executemany(
            f"INSERT INTO {table} (method, payload, partition) VALUES (?, ?, ?)",
            [
                ("publish", orjson.dumps({"channel": "ch", "data": i}).decode(), i % partitions)
                for i in range(count)
            ],
        )


async def test_sqlite_store_two_consumers_share_a_file_without_overlap(tmp_path: Path) -> None:
    path = tmp_path / "app.db"
    make_sqlite_outbox(path, "outbox", 300)
    dispatcher = FakeDispatcher()
    settings = OutboxSettings(select_limit=7, poll_interval=0.01)
    outboxes = [
        OutboxConsumer(
            f"c{i}",
            SqliteOutboxStore("c", f"sqlite:///{path}", "outbox"),
            dispatcher,
            settings,
            ConsumerStats("sqlite"),
        )
        for i in range(2)
    ]
    for outbox in outboxes:
        await outbox.start()
    try:
        await eventually(lambda: len(dispatcher.applied) >= 300)
    finally:
        for outbox in outboxes:
            await outbox.stop()
    assert dispatcher.applied == list(range(300))
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT count(*) FROM outbox").fetchone() == (0,)


async def test_sqlite_store_skips_rows_without_method_and_keeps_failed_rows(
    tmp_path: Path,
) -> None:
    path = tmp_path / "app.db"
    make_sqlite_outbox(path, "outbox", 3)
    with sqlite3.connect(path) as db:
        db.execute("INSERT INTO outbox (method, payload) VALUES (NULL, '{}')")
        db.execute("""INSERT INTO outbox (method, payload) VALUES ('publish', '{"data": 9}')""")
    store = SqliteOutboxStore("c", f"sqlite:///{path}", "outbox")
    await store.start()
    dispatcher = FakeDispatcher(failures={b"9": 1})
    try:

        async def apply(items: Sequence[Item]) -> BatchOutcome:
            return await apply_in_order(dispatcher, items, "c")

        fetched, outcome = await store.process(0, 100, apply)
        assert (fetched, outcome.done, outcome.skipped) == (5, 4, 1)
        with sqlite3.connect(path) as db:
            assert db.execute("SELECT payload FROM outbox").fetchall() == [('{"data": 9}',)]
        fetched, outcome = await store.process(0, 100, apply)
        assert (fetched, outcome.done, outcome.failure) == (1, 1, None)
        assert await store.process(0, 100, apply) == (0, BatchOutcome())
    finally:
        await store.close()
    assert dispatcher.applied == [0, 1, 2, 9]


async def test_sqlite_store_refuses_a_missing_file(tmp_path: Path) -> None:
    store = SqliteOutboxStore("c", f"sqlite:///{tmp_path / 'missing.db'}", "outbox")
    with pytest.raises(ConsumerStartError):
        await store.start()
    assert not (tmp_path / "missing.db").exists()
    # the failed connection's worker thread is gone (else it posts to this loop once closed)
    assert not [t for t in threading.enumerate() if "_connection_worker_thread" in t.name]


# --- start_consumers ---------------------------------------------------------------------


async def test_start_consumers_skips_disabled_and_reports_stats(tmp_path: Path) -> None:
    path = tmp_path / "app.db"
    make_sqlite_outbox(path, "outbox", 2)
    pg = PostgresConsumerConfig(
        dsn=f"sqlite:///{path}", outbox_table_name="outbox", partition_poll_interval=0.01
    )
    config = Config(
        consumers=(
            ConsumerConfig("lite", "postgresql", postgresql=pg),
            ConsumerConfig("off", "kafka", disabled=True),
        )
    )
    dispatcher = FakeDispatcher()
    consumers = await start_consumers(config, dispatcher, env={})
    try:
        assert len(consumers) == 1
        await eventually(lambda: consumers.stats()["lite"]["applied"] == 2)
        assert consumers.stats()["lite"]["type"] == "sqlite"
    finally:
        await consumers.stop()
    assert consumers.stats() == {}


async def test_start_consumers_fails_when_the_database_is_unreachable(tmp_path: Path) -> None:
    pg = PostgresConsumerConfig(dsn=f"sqlite:///{tmp_path}/none.db", outbox_table_name="t")
    config = Config(consumers=(ConsumerConfig("lite", "postgresql", postgresql=pg),))
    with pytest.raises(ConsumerStartError, match="lite"):
        await start_consumers(config, FakeDispatcher(), env={})
    assert isinstance(ConsumerStartError("x"), OSError)
    await Consumers().stop()


# --- the Kafka actor with a fake client --------------------------------------------------


@dataclass
class Rec:
    offset: int
    value: bytes | None


class FakeKafka:
    """Enough of kafka.KafkaConsumer for the actor; called on the actor thread only (the
    test reads its fields after waiting)."""

    def __init__(self, logs: dict[TopicPartition, list[bytes | None]], **options: Any) -> None:
        self.options = options
        self.logs = logs
        self.positions = {tp: 0 for tp in logs}
        self.paused: set[TopicPartition] = set()
        self.committed: dict[TopicPartition, int] = {}
        self.seeks: list[tuple[TopicPartition, int]] = []
        self.listener: Any = None
        self.closed = False
        self.idle = threading.Event()
        self.fail_commits = 0
        self.rebalances: queue.Queue[tuple[str, set[TopicPartition]]] = queue.Queue()

    def subscribe(self, topics: list[str], listener: Any) -> None:
        self.listener = listener
        listener.on_partitions_assigned(set(self.logs))

    def assignment(self) -> set[TopicPartition]:
        return set(self.logs)

    def poll(self, timeout_ms: int, max_records: int) -> dict[TopicPartition, list[Rec]]:
        while not self.rebalances.empty():  # kafka-python calls the listener inside poll
            kind, tps = self.rebalances.get()
            if kind == "revoke":
                self.listener.on_partitions_revoked(tps)
            else:
                self.listener.on_partitions_lost(tps)
            self.listener.on_partitions_assigned(set(self.logs) - tps)
        out: dict[TopicPartition, list[Rec]] = {}
        for tp, log in self.logs.items():
            start = self.positions[tp]
            if tp in self.paused or start >= len(log):
                continue
            out[tp] = [Rec(o, log[o]) for o in range(start, min(len(log), start + max_records))]
            self.positions[tp] = out[tp][-1].offset + 1
        if not out:
            self.idle.set()
            self.idle.wait(timeout_ms / 1000 / 10)  # an idle poll: do not spin hot
        return out

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.seeks.append((tp, offset))
        self.positions[tp] = offset

    def pause(self, tp: TopicPartition) -> None:
        self.paused.add(tp)

    def resume(self, tp: TopicPartition) -> None:
        self.paused.discard(tp)

    def commit(self, offsets: dict[TopicPartition, OffsetAndMetadata], timeout_ms: int) -> None:
        if self.fail_commits:
            self.fail_commits -= 1
            raise CommitFailedError("rebalance in progress")
        for tp, meta in offsets.items():
            self.committed[tp] = meta.offset

    def highwater(self, tp: TopicPartition) -> int:
        return len(self.logs[tp])

    def position(self, tp: TopicPartition, timeout_ms: int) -> int:
        return self.positions[tp]

    def close(self, autocommit: bool, timeout_ms: int) -> None:
        self.closed = True


def record(data: object, *, as_string: bool = False) -> bytes:
    payload: object = {"channel": "ch", "data": data}
    if as_string:
        payload = orjson.dumps(payload).decode()
    return orjson.dumps({"method": "publish", "payload": payload})


async def test_kafka_actor_applies_in_order_skips_retries_and_commits() -> None:
    tp0, tp1 = TopicPartition("t", 0), TopicPartition("t", 1)
    logs: dict[TopicPartition, list[bytes | None]] = {
        tp0: [record(0), b"garbage", record(1, as_string=True), record(2), record(3)],
        tp1: [record(10), record(11)],
    }
    clients: list[FakeKafka] = []

    def factory(**options: Any) -> FakeKafka:
        clients.append(FakeKafka(logs, **options))
        return clients[-1]

    dispatcher = FakeDispatcher(failures={b"2": 2})
    config = KafkaConsumerConfig(
        brokers=("b",), topics=("t",), consumer_group="g", max_poll_records=3
    )
    handle = KafkaConsumerHandle("k", config, dispatcher, KafkaTuning(poll_timeout=0.05), factory)
    await handle.start()
    try:
        client = clients[0]
        await eventually(lambda: client.committed == {tp0: 5, tp1: 2})
        applied = dispatcher.ints()
        assert [d for d in applied if d < 10] == [0, 1, 2, 3]
        assert [d for d in applied if d >= 10] == [10, 11]
        assert client.seeks == [(tp0, 3), (tp0, 3)]  # record 2 was retried twice
        stats = handle.stats()
        assert (stats["applied"], stats["skipped"], stats["retries"]) == (6, 1, 2)
        assert stats["lag"] == 0
        assert threading.get_ident() in dispatcher.thread_ids  # dispatched on the loop
        assert client.options["group_id"] == "g" and client.options["enable_auto_commit"] is False
        logs[tp1].append(record(12))
        await eventually(lambda: client.committed.get(tp1) == 3)
    finally:
        await handle.stop()
    assert client.closed


async def test_kafka_actor_skips_a_poison_record_after_its_retries() -> None:
    tp = TopicPartition("t", 0)
    logs: dict[TopicPartition, list[bytes | None]] = {tp: [record(d) for d in range(5)]}
    clients: list[FakeKafka] = []

    def factory(**options: Any) -> FakeKafka:
        clients.append(FakeKafka(logs, **options))
        return clients[-1]

    dispatcher = FakeDispatcher(failures={b"1": 1000})
    config = KafkaConsumerConfig(brokers=("b",), topics=("t",), consumer_group="g")
    handle = KafkaConsumerHandle(
        "k", config, dispatcher, KafkaTuning(poll_timeout=0.05), factory, max_retries=2
    )
    await handle.start()
    try:
        client = clients[0]
        await eventually(lambda: client.committed == {tp: 5})
        assert dispatcher.ints() == [0, 2, 3, 4]
        assert client.seeks == [(tp, 1), (tp, 1)]  # two retries, then skipped
        stats = handle.stats()
        assert (stats["applied"], stats["skipped"], stats["gave_up"]) == (4, 1, 1)
    finally:
        await handle.stop()


async def test_kafka_revoke_commits_what_is_done_and_loss_commits_nothing() -> None:
    tp0, tp1 = TopicPartition("t", 0), TopicPartition("t", 1)
    logs: dict[TopicPartition, list[bytes | None]] = {tp0: [record(0)], tp1: [record(10)]}
    clients: list[FakeKafka] = []

    def factory(**options: Any) -> FakeKafka:
        clients.append(FakeKafka(logs, **options))
        clients[-1].fail_commits = 1  # the commit after the first batch fails
        return clients[-1]

    dispatcher = FakeDispatcher()
    config = KafkaConsumerConfig(brokers=("b",), topics=("t",), consumer_group="g")
    tuning = KafkaTuning(poll_timeout=0.05, commit_retry=60.0)  # no retry within the test
    handle = KafkaConsumerHandle("k", config, dispatcher, tuning, factory)
    await handle.start()
    try:
        client = clients[0]
        await eventually(lambda: sorted(dispatcher.ints()) == [0, 10] and client.fail_commits == 0)
        assert client.committed == {}
        client.rebalances.put(("lost", {tp1}))
        client.rebalances.put(("revoke", {tp0}))
        await eventually(lambda: tp0 in client.committed)
        assert client.committed == {tp0: 1}  # tp1 was lost: its mark is dropped
        assert handle.stats()["errors"] == 1
    finally:
        await handle.stop()
    assert client.committed == {tp0: 1}


async def test_kafka_failed_commit_is_retried_while_idle() -> None:
    tp = TopicPartition("t", 0)
    logs: dict[TopicPartition, list[bytes | None]] = {tp: [record(0), record(1)]}
    clients: list[FakeKafka] = []

    def factory(**options: Any) -> FakeKafka:
        clients.append(FakeKafka(logs, **options))
        clients[-1].fail_commits = 1
        return clients[-1]

    config = KafkaConsumerConfig(brokers=("b",), topics=("t",), consumer_group="g")
    tuning = KafkaTuning(poll_timeout=0.02, commit_retry=0.05)
    handle = KafkaConsumerHandle("k", config, FakeDispatcher(), tuning, factory)
    await handle.start()
    try:
        await eventually(lambda: clients[0].committed == {tp: 2})
    finally:
        await handle.stop()


async def test_kafka_handle_start_fails_when_no_broker_answers() -> None:
    def factory(**options: Any) -> FakeKafka:
        raise ConnectionError("no brokers")

    config = KafkaConsumerConfig(brokers=("b",), topics=("t",), consumer_group="g")
    handle = KafkaConsumerHandle("k", config, FakeDispatcher(), KafkaTuning(), factory)
    with pytest.raises(ConsumerStartError, match="no brokers"):
        await handle.start()


async def test_kafka_actor_recreates_the_client_after_a_poll_error() -> None:
    tp = TopicPartition("t", 0)
    logs: dict[TopicPartition, list[bytes | None]] = {tp: [record(0)]}
    clients: list[FakeKafka] = []

    class Flaky(FakeKafka):
        def poll(self, timeout_ms: int, max_records: int) -> dict[TopicPartition, list[Rec]]:
            if len(clients) == 1:
                raise OSError("broker went away")
            return super().poll(timeout_ms, max_records)

    def factory(**options: Any) -> FakeKafka:
        clients.append(Flaky(logs, **options))
        return clients[-1]

    dispatcher = FakeDispatcher()
    config = KafkaConsumerConfig(brokers=("b",), topics=("t",), consumer_group="g")
    handle = KafkaConsumerHandle("k", config, dispatcher, KafkaTuning(poll_timeout=0.05), factory)
    await handle.start()
    try:
        await eventually(lambda: dispatcher.applied == [0])
        assert clients[0].closed and len(clients) == 2
        assert handle.stats()["errors"] == 1
    finally:
        await handle.stop()
