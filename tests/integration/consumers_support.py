"""Shared pieces of the consumer integration tests (outbox on PostgreSQL/SQLite, Kafka):
a real centrifuge-python subscriber that records publications, the server config, the
outbox table DDL and log waits (over tests/support/wait.py). Everything runs on the test's
event loop."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from centrifuge import Client, PublicationContext, SubscriptionEventHandler

from tests.integration.conftest import make_jwt
from tests.support.server import ServerProcess
from tests.support.wait import eventually

WAIT = 10.0
NAMESPACE = {
    "name": "ob",
    "history_size": 1000,
    "history_ttl": "300s",
    "allow_subscribe_for_client": True,
}
SERVER_CONFIG: dict[str, Any] = {"namespaces": [NAMESPACE]}
PG_DSN = "postgresql://postgres@127.0.0.1:5432/test"

PG_OUTBOX_DDL = """
CREATE TABLE {table} (
  id BIGSERIAL PRIMARY KEY, method text NOT NULL, payload JSONB NOT NULL,
  partition INTEGER NOT NULL default 0,
  created_at TIMESTAMP WITH TIME ZONE DEFAULT now() NOT NULL)
"""
PG_NOTIFY_DDL = """
CREATE OR REPLACE FUNCTION {table}_notify() RETURNS TRIGGER AS $$
BEGIN PERFORM pg_notify('{channel}', NEW.partition::text); RETURN NEW; END; $$
LANGUAGE plpgsql;
CREATE OR REPLACE TRIGGER {table}_trigger AFTER INSERT ON {table}
FOR EACH ROW EXECUTE FUNCTION {table}_notify();
"""
SQLITE_OUTBOX_DDL = """
CREATE TABLE {table} (
  id INTEGER PRIMARY KEY AUTOINCREMENT, method TEXT NOT NULL, payload TEXT NOT NULL,
  partition INTEGER NOT NULL DEFAULT 0, created_at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP)
"""


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


def channel_name() -> str:
    return f"ob:{uuid.uuid4().hex[:10]}"


class Recorder(SubscriptionEventHandler):  # type: ignore[misc]
    """Publications of one subscription: data and arrival time (monotonic)."""

    def __init__(self) -> None:
        self.data: list[Any] = []
        self.offsets: list[int] = []
        self.arrived: list[float] = []
        self.changed = asyncio.Event()

    async def on_publication(self, ctx: PublicationContext) -> None:
        self.data.append(ctx.pub.data)
        self.offsets.append(ctx.pub.offset)
        self.arrived.append(time.monotonic())
        self.changed.set()

    async def wait_count(self, count: int, within: float = WAIT) -> list[Any]:
        """The data of the first `count` publications (the AssertionError lists what came)."""
        try:
            await eventually(lambda: len(self.data) >= count, within, changed=self.changed)
        except AssertionError:
            raise AssertionError(f"{len(self.data)}/{count} publications: {self.data}") from None
        return self.data[:count]


@asynccontextmanager
async def subscriber(server: ServerProcess, channel: str) -> AsyncIterator[Recorder]:
    """A centrifuge-python client subscribed to `channel` (ready when entered)."""
    client = Client(server.ws_url, token=make_jwt("consumer-test"), proxy=None)
    recorder = Recorder()
    sub = client.new_subscription(channel, events=recorder)
    await client.connect()
    try:
        await client.ready(timeout=WAIT)
        await sub.subscribe()
        await sub.ready(timeout=WAIT)
        yield recorder
    finally:
        await client.disconnect()


async def history_data(server: ServerProcess, channel: str) -> list[Any]:
    """The data of every publication of `channel` in the server's history, oldest first."""
    reply = await server.api_async("history", {"channel": channel, "limit": -1})
    return [pub.get("data") for pub in reply["result"].get("publications", [])]


def outbox_consumer(name: str, dsn: str, table: str, **options: Any) -> dict[str, Any]:
    """A `consumers[]` item of type postgresql (PostgreSQL, or SQLite for a sqlite dsn)."""
    return {
        "name": name,
        "type": "postgresql",
        "postgresql": {"dsn": dsn, "outbox_table_name": table, **options},
    }


def server_log(server: ServerProcess) -> str:
    return Path(server.stderr_path).read_text(errors="replace") + Path(
        server.stdout_path
    ).read_text(errors="replace")


async def wait_for_log(server: ServerProcess, text: str, within: float = WAIT) -> None:
    await eventually(lambda: text in server_log(server), within, f"log line {text!r}")


async def wait_for_log_count(
    server: ServerProcess, text: str, count: int, within: float = WAIT
) -> None:
    """Wait until `text` appears at least `count` times in the server's log."""
    await eventually(
        lambda: server_log(server).count(text) >= count, within, f"{count} x log line {text!r}"
    )
