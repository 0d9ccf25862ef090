"""What every consumer shares: the narrow dispatch interface, consumed items, the error
policy and the counters (docs/spec/server_api.md 4.1).

A consumer turns each outbox row or Kafka record into an `Item` (a `Command`, or `Malformed`
when it cannot even be read) and hands runs of them, in order, to `apply_in_order`, which
calls the dispatcher one command at a time and stops at the first retryable failure. The
caller then removes/commits the leading `done` items and retries the rest after a backoff.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Protocol

import orjson

from centripy.engine.api_requests import DispatchError

log = logging.getLogger("centripy.consumers")


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
    `failure` is set, item `done` failed retryably and it and the rest must be retried."""

    done: int = 0
    applied: int = 0
    skipped: int = 0
    failure: str | None = None


@dataclass(slots=True)
class ConsumerStats:
    """Counters of one consumer, read by `/metrics` through `Consumers.stats()`.

    applied: commands that succeeded (unknown methods are ignored and count here, as in
    Centrifugo); skipped: malformed items and non-retryable failures; retries: retryable
    failures (each one delays its partition by a backoff); errors: lost connections and
    other infrastructure failures; lag: records known to be waiting (Kafka: high watermark
    minus fetch position, summed over the assigned partitions), None where unknown (outbox).
    Each consumer has one writer thread; readers take a `snapshot()`.
    """

    type: str
    applied: int = 0
    skipped: int = 0
    retries: int = 0
    errors: int = 0
    lag: int | None = None

    def add(self, outcome: BatchOutcome) -> None:
        self.applied += outcome.applied
        self.skipped += outcome.skipped
        if outcome.failure is not None:
            self.retries += 1

    def snapshot(self) -> dict[str, object]:
        return asdict(self)


def _describe(error: BaseException) -> str:
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


async def apply_in_order(
    dispatcher: Dispatcher, items: Sequence[Item], consumer: str
) -> BatchOutcome:
    """Dispatch `items` one after another (on the event loop) and stop at the first
    retryable failure. Malformed items and non-retryable failures are logged and skipped;
    an exception that is not a `DispatchError` is logged and treated as retryable, so no
    command is lost to a bug or a transient fault."""
    outcome = BatchOutcome()
    for item in items:
        if isinstance(item, Malformed):
            log.warning(
                "consumer %s: skipping malformed item at %s: %s", consumer, item.where, item.reason
            )
            outcome.skipped += 1
        else:
            try:
                await dispatcher.dispatch(item.method, item.payload)
            except DispatchError as exc:
                if exc.retryable:
                    outcome.failure = _describe(exc)
                    log.warning(
                        "consumer %s: %s at %s failed, will retry: %s",
                        consumer, item.method, item.where, outcome.failure,
                    )  # fmt: skip
                    return outcome
                log.warning(
                    "consumer %s: skipping %s at %s: %s", consumer, item.method, item.where,
                    _describe(exc),
                )  # fmt: skip
                outcome.skipped += 1
            except Exception as exc:
                outcome.failure = _describe(exc)
                log.exception(
                    "consumer %s: %s at %s raised, will retry", consumer, item.method, item.where
                )
                return outcome
            else:
                outcome.applied += 1
        outcome.done += 1
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
