"""What every consumer shares: the narrow dispatch interface, consumed items, the error
policy and the counters (docs/spec/server_api.md 4.1).

A consumer turns each outbox row or Kafka record into an `Item` (a `Command`, or `Malformed`
when it cannot even be read) and hands runs of them, in order, to `apply_in_order`, which
calls the dispatcher one command at a time and stops at the first retryable failure. The
caller then removes/commits the leading `done` items and retries the rest after a backoff.

Centrifugo v5.2 retries a retryable failure forever, so one command that can never succeed
blocks its partition for good. Here each worker's `RetryLimit` gives up on an item after
`CENTRIPY_CONSUMER_MAX_RETRIES` retries (default 16, about 45 s of backoff; 0 = retry
forever, as Centrifugo): the item is logged at error level and skipped like a non-retryable
failure, and the items after it are applied.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Final, Protocol

import orjson

from centripy.engine.api_requests import DispatchError

log = logging.getLogger("centripy.consumers")

ENV_MAX_RETRIES: Final = "CENTRIPY_CONSUMER_MAX_RETRIES"
DEFAULT_MAX_RETRIES: Final = 16


class ConsumerStartError(ConnectionError):
    """A consumer could not reach its database or broker at start-up (the server then
    refuses to start, as Centrifugo does). An OSError, so the CLI reports it in one line."""


class Dispatcher(Protocol):
    """The one thing consumers need from the server (`engine.api.Executor` fits). `dispatch`
    runs on the event loop; it raises `DispatchError` (`.retryable` says whether to retry)."""

    async def dispatch(self, method: str, payload: bytes) -> None: ...


@dataclass(frozen=True, slots=True)
class Command:
    """One consumed `{method, payload}`; `where` names its source for log lines."""

    method: str
    payload: bytes
    where: str


@dataclass(frozen=True, slots=True)
class Malformed:
    """A row or record that cannot be read as a command; it is logged and skipped."""

    reason: str
    where: str


Item = Command | Malformed


@dataclass(slots=True)
class BatchOutcome:
    """What `apply_in_order` did: the first `done` items were applied or skipped; when
    `failure` is set, item `done` failed retryably and it and the rest must be retried.
    `gave_up` counts the skipped items whose retries ran out."""

    done: int = 0
    applied: int = 0
    skipped: int = 0
    failure: str | None = None
    gave_up: int = 0


@dataclass(slots=True)
class ConsumerStats:
    """Counters of one consumer, read by `/metrics` through `Consumers.stats()`.

    applied: commands that succeeded (unknown methods are ignored and count here, as in
    Centrifugo); skipped: malformed items, non-retryable failures and items whose retries
    ran out (those are counted in gave_up too); retries: retryable failures (each one delays
    its partition by a backoff); errors: lost connections and
    other infrastructure failures; lag: records known to be waiting (Kafka: high watermark
    minus fetch position, summed over the assigned partitions; per partition in
    partition_lag), None where unknown (outbox).
    Each consumer has one writer thread; readers take a `snapshot()`.
    """

    type: str
    applied: int = 0
    skipped: int = 0
    retries: int = 0
    errors: int = 0
    gave_up: int = 0
    lag: int | None = None
    partition_lag: dict[str, int] = field(default_factory=dict)  # "topic/partition" -> lag

    def add(self, outcome: BatchOutcome) -> None:
        self.applied += outcome.applied
        self.skipped += outcome.skipped
        self.gave_up += outcome.gave_up
        if outcome.failure is not None:
            self.retries += 1

    def snapshot(self) -> dict[str, object]:
        return asdict(self)


def max_retries_from_env(env: Mapping[str, str]) -> int:
    """CENTRIPY_CONSUMER_MAX_RETRIES: retries of one failing item before it is skipped
    (a non-negative integer; 0 retries forever). Default 16."""
    raw = env.get(ENV_MAX_RETRIES, "").strip()
    if not raw:
        return DEFAULT_MAX_RETRIES
    if not raw.isdigit():
        raise ConsumerStartError(
            f"{ENV_MAX_RETRIES} must be a non-negative integer (0: retry forever), got {raw!r}"
        )
    return int(raw)


class RetryLimit:
    """Counts the consecutive retryable failures of the item a worker is stuck on (named by
    its `where`). Owned by one worker: a partition task on the loop, or one Kafka partition
    (whose batches run on the loop one at a time)."""

    __slots__ = ("_failures", "_where", "max_retries")

    def __init__(self, max_retries: int = DEFAULT_MAX_RETRIES) -> None:
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        self.max_retries = max_retries
        self._where = ""
        self._failures = 0

    def failures(self, where: str) -> int:
        """Retryable failures counted so far for the item at `where`."""
        return self._failures if where == self._where else 0

    def exhausted(self, where: str) -> bool:
        """Count one more retryable failure of the item at `where` (a different item starts
        a new count); True when it has failed `max_retries + 1` times: give it up."""
        if where != self._where:
            self._where, self._failures = where, 0
        self._failures += 1
        if self.max_retries and self._failures > self.max_retries:
            self._where, self._failures = "", 0
            return True
        return False


def _describe(error: BaseException) -> str:
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


async def apply_in_order(
    dispatcher: Dispatcher,
    items: Sequence[Item],
    consumer: str,
    limit: RetryLimit | None = None,
) -> BatchOutcome:
    """Dispatch `items` one after another (on the event loop) and stop at the first
    retryable failure. Malformed items and non-retryable failures are logged and skipped;
    an exception that is not a `DispatchError` is logged and treated as retryable, so no
    command is lost to a transient fault. With `limit`, an item whose retryable failures
    exceed its retries is logged at error level and skipped (a poison command)."""
    outcome = BatchOutcome()
    for item in items:
        if isinstance(item, Malformed):
            log.warning(
                "consumer %s: skipping malformed item at %s: %s", consumer, item.where, item.reason
            )
            outcome.skipped += 1
            outcome.done += 1
            continue
        failure: str | None = None
        try:
            await dispatcher.dispatch(item.method, item.payload)
        except DispatchError as exc:
            if not exc.retryable:
                log.warning(
                    "consumer %s: skipping %s at %s: %s", consumer, item.method, item.where,
                    _describe(exc),
                )  # fmt: skip
                outcome.skipped += 1
                outcome.done += 1
                continue
            failure = _describe(exc)
        except Exception as exc:
            failure = _describe(exc)
            log.warning(
                "consumer %s: %s at %s raised", consumer, item.method, item.where, exc_info=True
            )
        if failure is None:
            outcome.applied += 1
            outcome.done += 1
            continue
        if limit is not None and limit.exhausted(item.where):
            log.error(
                "consumer %s: giving up on %s at %s after %d retries, skipping it: %s",
                consumer, item.method, item.where, limit.max_retries, failure,
            )  # fmt: skip
            outcome.skipped += 1
            outcome.gave_up += 1
            outcome.done += 1
            continue
        outcome.failure = failure
        log.warning(
            "consumer %s: %s at %s failed, will retry: %s",
            consumer, item.method, item.where, failure,
        )  # fmt: skip
        return outcome
    return outcome


# --- reading consumed values ---------------------------------------------------------------


def payload_bytes(value: object) -> bytes:
    """An outbox `payload` column value as JSON bytes: text (json/jsonb/text columns) is the
    JSON itself, bytes are taken as they are, anything else is serialised."""
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if value is None:
        return b"null"
    return orjson.dumps(value)


def outbox_item(method: object, payload: object, where: str) -> Item:
    """One outbox row as an item; a row without a text `method` is malformed."""
    if not isinstance(method, str) or not method:
        return Malformed(f"method is {method!r}, expected a method name", where)
    return Command(method, payload_bytes(payload), where)


def decode_record(value: bytes | None, where: str) -> Item:
    """A Kafka record value `{"method": "...", "payload": {...}}` as an item.

    Keys match case-insensitively (Go's encoding/json). `payload` may be a JSON string that
    holds the JSON (Debezium style); it is unwrapped. A missing payload is passed on as
    `null` (the dispatcher then rejects it, or ignores an unknown method)."""
    if not value:
        return Malformed("empty record value", where)
    try:
        decoded = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        return Malformed(f"value is not JSON: {exc}", where)
    if not isinstance(decoded, dict):
        return Malformed("value is not a JSON object", where)
    fields = {str(k).lower(): v for k, v in decoded.items()}
    method = fields.get("method")
    if not isinstance(method, str) or not method:
        return Malformed('"method" is missing or not a string', where)
    payload = fields.get("payload")
    if isinstance(payload, str):
        return Command(method, payload.encode(), where)
    return Command(method, orjson.dumps(payload), where)
