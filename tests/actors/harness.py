"""In-process harness: a real node, hub and connection actors over a recording transport."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Callable, Sequence
from typing import Any

from centripy.actors.base import LoopActor, actor_of
from centripy.actors.connection import ConnectionActor
from centripy.actors.connection_core import Frame, TransportClosed
from centripy.actors.context import ConnContext
from centripy.actors.hub import Hub, Shutdown
from centripy.actors.transport import Format
from centripy.engine.auth import TokenVerifier
from centripy.engine.config import Config
from centripy.engine.node import Node
from centripy.engine.options import ChannelOptions, Namespace
from centripy.engine.types import ClientInfo
from centripy.storage.memory import MemoryEventLog
from centripy.storage.presence_memory import MemoryPresence
from centripy.storage.writer import GroupCommitWriter

SECRET = "harness-secret"

HISTORY = ChannelOptions(
    history_size=1000,
    history_ttl=300.0,
    allow_subscribe_for_client=True,
    allow_subscribe_for_anonymous=True,
    allow_publish_for_client=True,
    allow_publish_for_anonymous=True,
    allow_history_for_client=True,
    allow_history_for_anonymous=True,
    allow_recovery=True,
    allow_positioning=True,
    presence=True,
    join_leave=True,
    allow_presence_for_client=True,
    allow_presence_for_anonymous=True,
)


def make_config(**overrides: Any) -> Config:
    base = Config(
        token_hmac_secret_key=SECRET,
        allow_anonymous_connect_without_token=True,
        channel_options=ChannelOptions(
            allow_subscribe_for_client=True, allow_subscribe_for_anonymous=True
        ),
        namespaces=(Namespace("h", HISTORY),),
    )
    return dataclasses.replace(base, **overrides)


class RecordingTransport:
    name = "websocket"
    format = Format.JSON
    emulation = False
    unidirectional = False
    pong = True

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []
        self.closed: tuple[int, str] | None = None
        self.changed = asyncio.Event()

    def write(self, messages: Sequence[bytes]) -> None:
        for raw in messages:
            self.messages.append(json.loads(raw))
        self.changed.set()

    def close(self, code: int, reason: str) -> None:
        self.closed = (code, reason)
        self.changed.set()


class Client:
    """Drives one connection actor with JSON frames and waits for what it writes."""

    def __init__(self, ctx: ConnContext) -> None:
        self.transport = RecordingTransport()
        self.ref = ConnectionActor.start(ctx, self.transport)
        self._next_id = 0

    def send(self, *commands: dict[str, Any]) -> list[int]:
        ids = []
        lines = []
        for cmd in commands:
            if "id" not in cmd and "send" not in cmd and cmd:
                self._next_id += 1
                cmd = {"id": self._next_id, **cmd}
            ids.append(cmd.get("id", 0))
            lines.append(json.dumps(cmd))
        self.ref.tell(Frame("\n".join(lines).encode()))
        return ids

    async def wait(self, predicate: Any, timeout: float = 3.0) -> Any:
        async def poll() -> Any:
            while True:
                for msg in self.transport.messages:
                    if predicate(msg):
                        return msg
                if self.transport.closed is not None:
                    raise AssertionError(f"closed {self.transport.closed}")
                self.transport.changed.clear()
                await self.transport.changed.wait()

        return await asyncio.wait_for(poll(), timeout)

    async def call(self, method: str, body: dict[str, Any]) -> dict[str, Any]:
        (cmd_id,) = self.send({method: body})
        return dict(await self.wait(lambda m: m.get("id") == cmd_id))

    async def closed(self, timeout: float = 3.0) -> tuple[int, str]:
        async def poll() -> tuple[int, str]:
            while self.transport.closed is None:
                self.transport.changed.clear()
                await self.transport.changed.wait()
            return self.transport.closed

        return await asyncio.wait_for(poll(), timeout)

    def pubs(self, channel: str) -> list[dict[str, Any]]:
        return [
            m["push"]["pub"]
            for m in self.transport.messages
            if "push" in m and m["push"].get("channel") == channel and "pub" in m["push"]
        ]

    def gone(self) -> None:
        self.ref.tell(TransportClosed())


class Harness:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.log = MemoryEventLog()
        self.writer = GroupCommitWriter(self.log)
        self.node = Node(config, self.log, self.writer.submit_many, MemoryPresence())
        self.hub = Hub()
        self.node.attach_fanout(self.hub)
        self.ctx = ConnContext(config, self.node, self.hub, TokenVerifier(config))

    async def __aenter__(self) -> Harness:
        await self.log.start()
        await self.writer.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.hub.shutdown(1.0)
        await self.writer.close()
        await self.log.close()

    async def client(self, connect: dict[str, Any] | None = None) -> Client:
        client = Client(self.ctx)
        reply = await client.call("connect", connect or {})
        assert "connect" in reply, reply
        return client


class FailingPresence(MemoryPresence):
    """The memory presence store with an outage switch (as a store whose server is down)."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False
        self.failures = 0  # calls refused while down (proof that a periodic update ran)

    def _check(self) -> None:
        if self.down:
            self.failures += 1
            raise ConnectionError("presence storage is down")

    async def add(self, channel: str, info: ClientInfo, ttl: float) -> None:
        self._check()
        await super().add(channel, info, ttl)

    async def remove(self, channel: str, client_id: str) -> None:
        self._check()
        await super().remove(channel, client_id)

    async def presence(self, channel: str) -> Any:
        self._check()
        return await super().presence(channel)

    async def stats(self, channel: str) -> Any:
        self._check()
        return await super().stats(channel)


class CountingPresence(MemoryPresence):
    """The memory presence store counting `add` calls: a connection's periodic tick adds its
    presence-enabled subscriptions, so the count proves that the tick ran."""

    def __init__(self) -> None:
        super().__init__()
        self.adds = 0

    async def add(self, channel: str, info: ClientInfo, ttl: float) -> None:
        self.adds += 1
        await super().add(channel, info, ttl)


class BlockingPresence(MemoryPresence):
    """Presence whose stats wait for `release` (a slow storage round trip)."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()

    async def stats(self, channel: str) -> Any:
        await self.release.wait()
        return await super().stats(channel)


class Recorder(LoopActor):
    """A loop-driven actor standing where a connection actor would: it records every message
    it is told (fan-out inline, as ConnectionActor takes it). `on_shutdown` runs for the
    hub's `Shutdown` (e.g. to leave the hub as a connection does)."""

    inline = True

    def __init__(self, on_shutdown: Callable[[], None] | None = None) -> None:
        super().__init__()
        self.got: list[Any] = []
        self.on_shutdown = on_shutdown

    def on_receive(self, message: Any) -> Any:
        self.got.append(message)
        if type(message) is Shutdown and self.on_shutdown is not None:
            self.on_shutdown()

    def of(self, kind: type) -> list[Any]:
        return [m for m in self.got if type(m) is kind]

    @staticmethod
    def start_recorder(on_shutdown: Callable[[], None] | None = None) -> tuple[Any, Recorder]:
        ref = Recorder.start(on_shutdown)
        actor = actor_of(ref)
        assert isinstance(actor, Recorder)
        return ref, actor
