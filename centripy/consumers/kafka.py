"""The Kafka consumer (docs/spec/server_api.md 4.3): a `pykka.ThreadingActor` that owns a blocking
kafka-python `KafkaConsumer` (docs/design/ARCHITECTURE.md decision 1: the one actor that wraps a
blocking client gets its own thread).

Record value: `{"method": "publish", "payload": {...}}` (key ignored; `payload` may be a JSON
string holding the JSON). The actor thread polls up to `max_poll_records` records, then runs
one coroutine ON THE EVENT LOOP (`run_coroutine_threadsafe(...).result()`; the loop is never
blocked) that applies each partition's records strictly in order, partitions side by side.
Per partition:

- applied or skipped (malformed, non-retryable error, logged with topic/partition/offset)
  records are marked, and marks are committed synchronously after every batch;
- at the first retryable failure the partition is sought back to that record and paused for
  a backoff (min(5 s, (10 ms + jitter) * 2^n)); other partitions keep flowing. Centrifugo
  retries forever (no DLQ); here a record is logged and skipped (marked) after
  `max_retries` retries (CENTRIPY_CONSUMER_MAX_RETRIES, 0 = forever), so a poison record
  does not block its partition for good.

On revoke the marks of the revoked partitions are committed; on loss nothing is. A poll or
connect error closes the client and re-creates it after a backoff. `stop` commits the marks,
closes the client (leaving the group) and ends the thread. A new group starts from the
earliest offset. Client timings that are not Centrifugo config keys may be set through the
environment: CENTRIPY_KAFKA_SESSION_TIMEOUT_MS (10000), CENTRIPY_KAFKA_HEARTBEAT_INTERVAL_MS
(3000; tests use 2000/500 for Tansu), CENTRIPY_KAFKA_FETCH_MAX_WAIT_MS (500; Tansu holds
a fetch for its wait even when records arrive, so latency there is about half of it) and
CENTRIPY_KAFKA_REQUEST_TIMEOUT_MS (30000: how long a request lost in a broker restart, e.g. a
group sync, stalls the consumer; tests use 6000).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import ssl
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import kafka
import pykka
from kafka import KafkaConsumer
from kafka.structs import OffsetAndMetadata, TopicPartition

from centripy.consumers.backoff import Backoff
from centripy.consumers.dispatch import (
    DEFAULT_MAX_RETRIES,
    BatchOutcome,
    ConsumerStartError,
    ConsumerStats,
    Dispatcher,
    Item,
    RetryLimit,
    apply_in_order,
    decode_record,
)
from centripy.engine.config import KafkaConsumerConfig

log = logging.getLogger("centripy.consumers")

CLIENT_ID: Final = "centripy"
STOP_TIMEOUT: Final = 15.0  # seconds for commit + leave group + close
ENV_TUNABLE: Final = (
    "session_timeout_ms",
    "heartbeat_interval_ms",
    "fetch_max_wait_ms",
    "request_timeout_ms",
)
_CONNECT: Final = "connect"
_POLL: Final = "poll"


@dataclass(frozen=True, slots=True)
class KafkaTuning:
    """Client timings that are not Centrifugo config keys."""

    session_timeout_ms: int = 10_000
    heartbeat_interval_ms: int = 3_000
    fetch_max_wait_ms: int = 500  # Kafka answers a fetch as soon as data arrives; Tansu not
    request_timeout_ms: int = 30_000  # kafka-python's; a request lost in a broker restart
    bootstrap_timeout_ms: int = 5_000  # the start-up ping, as Centrifugo's 5 s
    commit_timeout_ms: int = 5_000
    poll_timeout: float = 0.2  # seconds; also bounds the reaction time to stop()
    commit_retry: float = 1.0  # seconds between retries of a failed commit while idle

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> KafkaTuning:
        """Defaults, overridden by CENTRIPY_KAFKA_SESSION_TIMEOUT_MS,
        CENTRIPY_KAFKA_HEARTBEAT_INTERVAL_MS, CENTRIPY_KAFKA_FETCH_MAX_WAIT_MS and
        CENTRIPY_KAFKA_REQUEST_TIMEOUT_MS (positive integers; the request timeout above the
        fetch wait, as kafka-python requires)."""
        values: dict[str, int] = {}
        for field_name in ENV_TUNABLE:
            raw = env.get(f"CENTRIPY_KAFKA_{field_name.upper()}", "")
            if raw:
                if not raw.isdigit() or int(raw) < 1:
                    raise ConsumerStartError(
                        f"CENTRIPY_KAFKA_{field_name.upper()} must be a positive integer"
                    )
                values[field_name] = int(raw)
        tuning = cls(**values)
        if tuning.request_timeout_ms <= tuning.fetch_max_wait_ms:
            raise ConsumerStartError(
                "CENTRIPY_KAFKA_REQUEST_TIMEOUT_MS must be above CENTRIPY_KAFKA_FETCH_MAX_WAIT_MS"
                f" ({tuning.request_timeout_ms} <= {tuning.fetch_max_wait_ms})"
            )
        return tuning


def tls_context(config: KafkaConsumerConfig) -> ssl.SSLContext | None:
    """System roots by default; honours `tls_root_ca(_pem)`, `tls_cert`/`tls_key` (files)
    and `tls_insecure_skip_verify` (Centrifugo v5.2 silently ignores them)."""
    if not config.tls:
        return None
    ctx = ssl.create_default_context()
    if config.tls_root_ca:
        ctx.load_verify_locations(cafile=config.tls_root_ca)
    if config.tls_root_ca_pem:
        ctx.load_verify_locations(cadata=config.tls_root_ca_pem)
    if config.tls_cert and config.tls_key:
        ctx.load_cert_chain(config.tls_cert, config.tls_key)
    if config.tls_insecure_skip_verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def client_options(config: KafkaConsumerConfig, tuning: KafkaTuning) -> dict[str, Any]:
    """KafkaConsumer keyword arguments for a consumer config (pure)."""
    options: dict[str, Any] = {
        "bootstrap_servers": list(config.brokers),
        "client_id": CLIENT_ID,
        "group_id": config.consumer_group,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "max_poll_records": config.max_poll_records,
        "session_timeout_ms": tuning.session_timeout_ms,
        "heartbeat_interval_ms": tuning.heartbeat_interval_ms,
        "fetch_max_wait_ms": tuning.fetch_max_wait_ms,
        "request_timeout_ms": tuning.request_timeout_ms,
        "bootstrap_timeout_ms": tuning.bootstrap_timeout_ms,
        # A consumer never creates the topics it reads (as Centrifugo's franz-go consumer):
        # metadata requests for a missing topic would create it with the broker's defaults.
        "allow_auto_create_topics": False,
    }
    sasl = config.sasl_mechanism == "plain"
    if sasl:
        options["sasl_mechanism"] = "PLAIN"
        options["sasl_plain_username"] = config.sasl_user
        options["sasl_plain_password"] = config.sasl_password
    context = tls_context(config)
    if context is not None:
        options["ssl_context"] = context
        options["ssl_check_hostname"] = not config.tls_insecure_skip_verify
    options["security_protocol"] = {
        (False, False): "PLAINTEXT",
        (False, True): "SSL",
        (True, False): "SASL_PLAINTEXT",
        (True, True): "SASL_SSL",
    }[(sasl, context is not None)]
    return options


def record_where(tp: TopicPartition, offset: int) -> str:
    return f"topic {tp.topic} partition {tp.partition} offset {offset}"


async def apply_partitions(
    dispatcher: Dispatcher,
    groups: Mapping[TopicPartition, Sequence[Item]],
    consumer: str,
    limits: Mapping[TopicPartition, RetryLimit] | None = None,
) -> dict[TopicPartition, BatchOutcome]:
    """Runs on the event loop: each partition's items in order, partitions concurrently."""
    keys = list(groups)
    limits = limits or {}
    runs = (apply_in_order(dispatcher, groups[key], consumer, limits.get(key)) for key in keys)
    outcomes = await asyncio.gather(*runs)
    return dict(zip(keys, outcomes, strict=True))


class _Rebalance(kafka.ConsumerRebalanceListener):  # type: ignore[misc]
    """Called by kafka-python inside `poll()`, on the actor thread."""

    def __init__(self, actor: KafkaConsumerActor) -> None:
        self._actor = actor

    def on_partitions_revoked(self, revoked: Any) -> None:
        self._actor.partitions_revoked(set(revoked))

    def on_partitions_lost(self, lost: Any) -> None:
        self._actor.partitions_lost(set(lost))

    def on_partitions_assigned(self, assigned: Any) -> None:
        log.info(
            "consumer %s: assigned %s", self._actor.name, sorted(map(tuple, assigned)) or "none"
        )


class KafkaConsumerActor(pykka.ThreadingActor):
    """Owns the KafkaConsumer; every method below runs on the actor's own thread. Started and
    stopped by `KafkaConsumerHandle` from the event loop."""

    use_daemon_thread = True

    def __init__(
        self,
        name: str,
        config: KafkaConsumerConfig,
        dispatcher: Dispatcher,
        loop: asyncio.AbstractEventLoop,
        stats: ConsumerStats,
        stopping: threading.Event,
        tuning: KafkaTuning,
        factory: Callable[..., Any] = KafkaConsumer,
        max_retries: int = DEFAULT_MAX_RETRIES,
    ) -> None:
        super().__init__()
        self.name = name
        self._config = config
        self._dispatcher = dispatcher
        self._loop = loop
        self._stats = stats
        self._stopping = stopping
        self._tuning = tuning
        self._factory = factory
        self._client: Any = None
        self._reconnect = Backoff()
        self._marks: dict[TopicPartition, int] = {}  # next offset to consume, not committed
        self._retries: dict[TopicPartition, Backoff] = {}
        self._max_retries = max_retries
        self._limits: dict[TopicPartition, RetryLimit] = {}
        self._resume_at: dict[TopicPartition, float] = {}
        self._commit_failed_at = 0.0

    # -- pykka hooks ------------------------------------------------------------------------

    def on_receive(self, message: Any) -> Any:
        if message == _CONNECT:
            self._connect()
        elif message == _POLL:
            if self._stopping.is_set():
                return None
            try:
                self._step()
            except Exception:
                self._stats.errors += 1
                log.exception("consumer %s: unexpected error, re-creating the client", self.name)
                self._drop_client()
            if not self._stopping.is_set():
                self.actor_ref.tell(_POLL)
        return None

    def on_stop(self) -> None:
        if self._client is not None:
            self._commit(self._marks)
            self._drop_client(leave=True)
        log.info("consumer %s: stopped", self.name)

    def on_failure(self, *_exc_info: Any) -> None:
        self._drop_client()

    # -- connecting -------------------------------------------------------------------------

    def _connect(self) -> None:
        """Create the client and subscribe; raises on failure (KafkaTimeoutError when no
        broker answers within bootstrap_timeout_ms)."""
        client = self._factory(**client_options(self._config, self._tuning))
        try:
            client.subscribe(list(self._config.topics), listener=_Rebalance(self))
        except BaseException:
            client.close(autocommit=False, timeout_ms=self._tuning.commit_timeout_ms)
            raise
        self._client = client
        log.info(
            "consumer %s: subscribed to %s as group %s",
            self.name, list(self._config.topics), self._config.consumer_group,
        )  # fmt: skip

    def _drop_client(self, leave: bool = False) -> None:
        client, self._client = self._client, None
        self._marks.clear()
        self._retries.clear()
        self._limits.clear()
        self._resume_at.clear()
        if client is None:
            return
        try:
            client.close(autocommit=False, timeout_ms=self._tuning.commit_timeout_ms)
        except Exception as exc:
            log.warning("consumer %s: closing the client failed: %s", self.name, exc)
        if leave:
            log.info("consumer %s: left group %s", self.name, self._config.consumer_group)

    def _ensure_client(self) -> bool:
        if self._client is not None:
            return True
        if self._stopping.wait(self._reconnect.next_delay()):
            return False
        try:
            self._connect()
        except Exception as exc:
            self._stats.errors += 1
            log.warning(
                "consumer %s: cannot connect to %s (attempt %d): %s: %s",
                self.name, list(self._config.brokers), self._reconnect.retries,
                type(exc).__name__, exc,
            )  # fmt: skip
            return False
        self._reconnect.reset()
        return True

    # -- one poll ---------------------------------------------------------------------------

    def _step(self) -> None:
        if not self._ensure_client():
            return
        self._resume_due()
        try:
            batch = self._client.poll(
                timeout_ms=int(self._poll_timeout() * 1000),
                max_records=self._config.max_poll_records,
            )
        except Exception as exc:
            self._stats.errors += 1
            log.warning(
                "consumer %s: poll failed, re-creating the client: %s: %s",
                self.name, type(exc).__name__, exc,
            )  # fmt: skip
            self._drop_client()
            return
        if batch:
            self._handle(batch)
        elif self._marks and time.monotonic() - self._commit_failed_at >= self._tuning.commit_retry:
            self._commit(self._marks)  # an earlier commit failed
        self._stats.lag = self._lag()

    def _poll_timeout(self) -> float:
        timeout = self._tuning.poll_timeout
        if self._resume_at:
            timeout = min(timeout, max(0.0, min(self._resume_at.values()) - time.monotonic()))
        return timeout

    def _resume_due(self) -> None:
        now = time.monotonic()
        assigned = self._client.assignment()
        for tp, at in list(self._resume_at.items()):
            if at <= now:
                del self._resume_at[tp]
                if tp in assigned:
                    self._client.resume(tp)

    def _handle(self, batch: Mapping[TopicPartition, Sequence[Any]]) -> None:
        records = {tp: list(recs) for tp, recs in batch.items() if recs}
        groups = {
            tp: [decode_record(r.value, record_where(tp, r.offset)) for r in recs]
            for tp, recs in records.items()
        }
        for tp in groups:
            if tp not in self._limits:
                self._limits[tp] = RetryLimit(self._max_retries)
        outcomes = self._run_on_loop(groups)
        for tp, recs in records.items():
            self._settle(tp, recs, outcomes[tp])
        self._commit(self._marks)

    def _run_on_loop(
        self, groups: Mapping[TopicPartition, Sequence[Item]]
    ) -> dict[TopicPartition, BatchOutcome]:
        """Run `apply_partitions` on the event loop and wait for it on this thread."""
        future = asyncio.run_coroutine_threadsafe(
            apply_partitions(self._dispatcher, groups, self.name, dict(self._limits)), self._loop
        )
        while True:
            try:
                return future.result(timeout=1.0)
            except concurrent.futures.TimeoutError:
                if self._loop.is_closed() or not self._loop.is_running():
                    future.cancel()
                    raise RuntimeError("the event loop stopped during dispatch") from None

    def _settle(self, tp: TopicPartition, recs: Sequence[Any], outcome: BatchOutcome) -> None:
        self._stats.add(outcome)
        if outcome.done:
            self._marks[tp] = recs[outcome.done - 1].offset + 1
        if outcome.failure is None:
            self._retries.pop(tp, None)
            return
        retry = self._retries.setdefault(tp, Backoff())
        delay = retry.next_delay()
        failed = recs[outcome.done].offset
        self._client.seek(tp, failed)
        self._client.pause(tp)
        self._resume_at[tp] = time.monotonic() + delay
        log.info(
            "consumer %s: %s waits %.2f s before retry %d",
            self.name, record_where(tp, failed), delay, retry.retries,
        )  # fmt: skip

    # -- offsets ----------------------------------------------------------------------------

    def _commit(self, marks: Mapping[TopicPartition, int]) -> None:
        if not marks or self._client is None:
            return
        marks = dict(marks)  # a snapshot: self._marks shrinks below
        offsets = {tp: OffsetAndMetadata(offset, "", -1) for tp, offset in marks.items()}
        try:
            self._client.commit(offsets=offsets, timeout_ms=self._tuning.commit_timeout_ms)
        except Exception as exc:
            self._stats.errors += 1
            self._commit_failed_at = time.monotonic()
            log.warning(
                "consumer %s: commit of %s failed (records may be applied again): %s: %s",
                self.name, sorted((tp.topic, tp.partition, o) for tp, o in marks.items()),
                type(exc).__name__, exc,
            )  # fmt: skip
            return
        for tp, offset in marks.items():
            if self._marks.get(tp) == offset:
                del self._marks[tp]

    def _forget(self, tps: set[TopicPartition]) -> None:
        for tp in tps:
            self._marks.pop(tp, None)
            self._retries.pop(tp, None)
            self._limits.pop(tp, None)
            self._resume_at.pop(tp, None)

    def partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        """Rebalance: commit what is done on the revoked partitions, then forget them."""
        self._commit({tp: o for tp, o in self._marks.items() if tp in revoked})
        self._forget(revoked)
        if revoked:
            log.info("consumer %s: revoked %s", self.name, sorted(map(tuple, revoked)))

    def partitions_lost(self, lost: set[TopicPartition]) -> None:
        """Forced out of the group: another member may own them already; commit nothing."""
        self._forget(lost)
        if lost:
            log.warning("consumer %s: lost %s", self.name, sorted(map(tuple, lost)))

    def _lag(self) -> int | None:
        """Records waiting on the assigned partitions (high watermark minus position): the
        sum, and each partition's in `partition_lag`."""
        total: int | None = None
        per: dict[str, int] = {}
        for tp in self._client.assignment():
            high = self._client.highwater(tp)
            if high is None:
                continue
            try:
                position = self._client.position(tp, timeout_ms=0)
            except Exception:
                continue
            if position is not None:
                per[f"{tp.topic}/{tp.partition}"] = max(0, high - position)
                total = (total or 0) + per[f"{tp.topic}/{tp.partition}"]
        self._stats.partition_lag = per
        return total


class KafkaConsumerHandle:
    """The event-loop side of one Kafka consumer: starts and stops its actor."""

    def __init__(
        self,
        name: str,
        config: KafkaConsumerConfig,
        dispatcher: Dispatcher,
        tuning: KafkaTuning,
        factory: Callable[..., Any] = KafkaConsumer,
        max_retries: int = DEFAULT_MAX_RETRIES,
    ) -> None:
        self.name = name
        self._config = config
        self._dispatcher = dispatcher
        self._tuning = tuning
        self._factory = factory
        self._max_retries = max_retries
        self._stats = ConsumerStats("kafka")
        self._stopping = threading.Event()
        self._ref: pykka.ActorRef[KafkaConsumerActor] | None = None

    async def start(self) -> None:
        """Start the actor and wait (in a worker thread) until the broker answers; raise
        ConsumerStartError otherwise."""
        if self._config.tls_server_name:
            log.warning(
                "consumer %s: tls_server_name is not supported (kafka-python has no SNI "
                "override); the broker address is verified instead", self.name,
            )  # fmt: skip
        ref = KafkaConsumerActor.start(
            self.name, self._config, self._dispatcher, asyncio.get_running_loop(),
            self._stats, self._stopping, self._tuning, self._factory, self._max_retries,
        )  # fmt: skip
        timeout = self._tuning.bootstrap_timeout_ms / 1000 + 5
        try:
            await asyncio.to_thread(ref.ask, _CONNECT, timeout=timeout)
        except Exception as exc:
            self._stopping.set()
            await asyncio.to_thread(lambda: ref.stop(block=True, timeout=STOP_TIMEOUT))
            raise ConsumerStartError(
                f"consumer {self.name}: cannot reach Kafka at {list(self._config.brokers)}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        self._ref = ref
        ref.tell(_POLL)

    async def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Commit, leave the group and end the thread (waited for in a worker thread, so
        dispatches the actor is waiting on still run on the loop)."""
        ref, self._ref = self._ref, None
        self._stopping.set()
        if ref is None:
            return
        try:
            await asyncio.to_thread(lambda: ref.stop(block=True, timeout=timeout))
        except pykka.Timeout:
            log.error("consumer %s: did not stop within %.0f s", self.name, timeout)

    def stats(self) -> dict[str, object]:
        return self._stats.snapshot()
