"""The structural type of a client-protocol codec: what `json_codec` and `protobuf_codec`
both expose, so that a connection actor holds "the codec of its wire format" with a type.

The two codec modules are the implementations (a module satisfies a Protocol structurally);
the `TYPE_CHECKING` block at the end makes mypy check both against `Codec`. Result objects
(`*_result_obj`) are a dict for JSON and a generated message for protobuf: they are opaque
to callers, who only hand them back to the same codec (`encode_reply`, `encode_*_push`), so
they are typed `CodecResult` (Any). Everything here is pure and thread-safe.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from centripy.engine.protocol.codes import Error
from centripy.engine.protocol.commands import Command, ConnectRequest
from centripy.engine.types import ClientInfo, Publication

# A result object of one codec (JSON: a dict; protobuf: a generated message). Only the codec
# that built it reads it, hence no structural type.
CodecResult = Any


class Codec(Protocol):
    """A codec module of the client protocol (`json_codec` or `protobuf_codec`)."""

    @property
    def PING(self) -> bytes:
        """The empty reply sent as a ping (joined into a frame like any message)."""
        ...

    @property
    def PONG_FRAME(self) -> bytes:
        """A whole client frame that only answers a ping (one empty command)."""
        ...

    # -- decoding -------------------------------------------------------------------------

    def decode_commands(self, frame: bytes) -> list[Command]: ...

    def decode_connect_request(self, body: bytes) -> ConnectRequest: ...

    # -- replies and pushes ---------------------------------------------------------------

    def encode_reply(self, id: int, key: str, result: CodecResult) -> bytes: ...

    def encode_error(self, id: int, err: Error) -> bytes: ...

    def encode_pub_push(
        self, channel: str, pub: Publication, *, unidirectional: bool = False
    ) -> bytes: ...

    def encode_join_push(
        self, channel: str, info: ClientInfo, *, unidirectional: bool = False
    ) -> bytes: ...

    def encode_leave_push(
        self, channel: str, info: ClientInfo, *, unidirectional: bool = False
    ) -> bytes: ...

    def encode_unsubscribe_push(
        self, channel: str, code: int, reason: str, *, unidirectional: bool = False
    ) -> bytes: ...

    def encode_subscribe_push(
        self, channel: str, result: CodecResult, *, unidirectional: bool = False
    ) -> bytes: ...

    def encode_message_push(self, data: bytes, *, unidirectional: bool = False) -> bytes: ...

    def encode_disconnect_push(
        self, code: int, reason: str, *, unidirectional: bool = False
    ) -> bytes: ...

    def encode_refresh_push(
        self, expires: bool, ttl: int, *, unidirectional: bool = False
    ) -> bytes: ...

    def encode_connect_push(
        self, result: CodecResult, *, unidirectional: bool = False
    ) -> bytes: ...

    def join_frame(self, lines: Sequence[bytes]) -> bytes: ...

    # -- result objects -------------------------------------------------------------------

    def connect_result_obj(
        self,
        *,
        client: str,
        version: str,
        expires: bool = False,
        ttl: int = 0,
        data: bytes = b"",
        subs: Mapping[str, CodecResult] | None = None,
        ping: int = 0,
        pong: bool = False,
        session: str = "",
        node: str = "",
        time: int = 0,
    ) -> CodecResult: ...

    def subscribe_result_obj(
        self,
        *,
        expires: bool = False,
        ttl: int = 0,
        recoverable: bool = False,
        epoch: str = "",
        publications: Sequence[Publication] = (),
        recovered: bool = False,
        offset: int = 0,
        positioned: bool = False,
        data: bytes = b"",
        was_recovering: bool = False,
    ) -> CodecResult: ...

    def history_result_obj(
        self, publications: Sequence[Publication], epoch: str, offset: int
    ) -> CodecResult: ...

    def presence_result_obj(self, presence: Mapping[str, ClientInfo]) -> CodecResult: ...

    def presence_stats_result_obj(self, num_clients: int, num_users: int) -> CodecResult: ...

    def refresh_result_obj(self, expires: bool, ttl: int) -> CodecResult: ...

    def rpc_result_obj(self, data: bytes) -> CodecResult: ...


if TYPE_CHECKING:  # both codec modules implement the protocol (checked by mypy, no import)
    from centripy.engine.protocol import json_codec, protobuf_codec

    _JSON_CODEC: Codec = json_codec
    _PROTOBUF_CODEC: Codec = protobuf_codec
