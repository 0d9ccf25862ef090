"""Everything a connection actor needs from its node, passed in (no globals)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from centripy.actors.hub import Hub
from centripy.actors.transport import Format, protobuf_codec
from centripy.engine.admission import Admission
from centripy.engine.auth import TokenVerifier
from centripy.engine.config import Config
from centripy.engine.node import Node
from centripy.engine.protocol import json_codec
from centripy.engine.protocol.codec import Codec
from centripy.engine.protocol.commands import Command


@dataclass(slots=True)
class ConnContext:
    config: Config
    node: Node
    hub: Hub
    verifier: TokenVerifier
    background: set[asyncio.Task[Any]] = field(default_factory=set)
    admission: Admission = field(init=False)  # client_connection_limit / _rate_limit

    def __post_init__(self) -> None:
        config = self.config
        self.admission = Admission(
            config.client_connection_limit,
            config.client_connection_rate_limit,
            self.hub.connection_count,
        )

    def codec(self, fmt: int) -> Codec:
        """The codec module of a wire format: `json_codec` or `protobuf_codec`, which
        both implement the `Codec` protocol."""
        if fmt == Format.PROTOBUF:
            codec: Codec = protobuf_codec()  # imported on first use
            return codec
        return json_codec

    def decode(self, fmt: int, data: bytes) -> list[Command]:
        return self.codec(fmt).decode_commands(data)
