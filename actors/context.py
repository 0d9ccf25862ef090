"""Everything a connection actor needs from its node, passed in (no globals)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, cast

from centripy.actors.hub import Hub
from centripy.actors.transport import Format, protobuf_codec
from centripy.engine.auth import TokenVerifier
from centripy.engine.config import Config
from centripy.engine.node import Node
from centripy.engine.protocol import json_codec
from centripy.engine.protocol.commands import Command


@dataclass(slots=True)
class ConnContext:
    config: Config
    node: Node
    hub: Hub
    verifier: TokenVerifier
    background: set[asyncio.Task[Any]] = field(default_factory=set)

    def codec(self, fmt: int) -> Any:
        """The codec module of a wire format: `json_codec` or `protobuf_codec`, which
        expose the same functions (typed as Any: modules have no structural type)."""
        return protobuf_codec() if fmt == Format.PROTOBUF else json_codec

    def decode(self, fmt: int, data: bytes) -> list[Command]:
        return cast(list[Command], self.codec(fmt).decode_commands(data))
