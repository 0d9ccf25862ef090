"""Everything a connection actor needs from its node, passed in (no globals)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from centripy.actors.hub import Hub
from centripy.actors.shared_reads import SharedReads
from centripy.actors.transport import Format, protobuf_codec
from centripy.engine.admission import Admission
from centripy.engine.auth import TokenVerifier
from centripy.engine.config import Config
from centripy.engine.node import Node
from centripy.engine.protocol import json_codec
from centripy.engine.protocol.codec import Codec
from centripy.engine.protocol.commands import Command
from centripy.engine.proxy import Proxies
from centripy.engine.sessions import UserCommand


@dataclass(slots=True)
class ConnContext:
    config: Config
    node: Node
    hub: Hub
    verifier: TokenVerifier
    background: set[asyncio.Task[Any]] = field(default_factory=set)
    proxies: Proxies | None = None  # the event proxies (docs/spec/proxy.md), if configured
    # several nodes: (node uid, session, commands) -> HTTP status of an /emulation request
    # for a session of another node (ClusterLink.forward_emulation)
    forward_emulation: Callable[[str, str, bytes], Awaitable[int]] | None = None
    # several nodes: send a user command to the other nodes (ClusterLink.forward)
    forward_command: Callable[[UserCommand], Awaitable[None]] | None = None
    admission: Admission = field(init=False)  # client_connection_limit / _rate_limit
    reads: SharedReads = field(init=False)  # stream reads of subscribes, shared per key

    def __post_init__(self) -> None:
        config = self.config
        self.admission = Admission(
            config.client_connection_limit,
            config.client_connection_rate_limit,
            self.hub.connection_count,
        )
        self.reads = SharedReads(self.node)

    def proxy_headers(self, header: Callable[[str], str | None]) -> dict[str, str]:
        """The headers of a client's request (read by name through `header`) that the
        proxies forward (`proxy_http_headers`); transports pass them to the actor."""
        return self.proxies.routes.forwarded(header) if self.proxies is not None else {}

    def codec(self, fmt: int) -> Codec:
        """The codec module of a wire format: `json_codec` or `protobuf_codec`, which
        both implement the `Codec` protocol."""
        if fmt == Format.PROTOBUF:
            codec: Codec = protobuf_codec()  # imported on first use
            return codec
        return json_codec

    def decode(self, fmt: int, data: bytes) -> list[Command]:
        return self.codec(fmt).decode_commands(data)
