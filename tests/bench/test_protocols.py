"""The Protobuf and uni_websocket adapters of bench/protocols.py: the hand-written Protobuf
encoder/decoder against the project's generated module, and a fan-out over each protocol
against a real centripy process (every delivery accounted, none lost)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.bench.fanout_run import small_fanout

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

pytest.importorskip("aiohttp")
pytest.importorskip("orjson")

import protocols  # noqa: E402

from centripy.engine.protocol import client_pb2  # noqa: E402


def delimited(message: bytes) -> bytes:
    return protocols.varint(len(message)) + message


def test_commands_decode_with_the_generated_module() -> None:
    adapter = protocols.CentrifugoProtobuf("tok")
    (raw,) = protocols.pb_messages(adapter.connect_command)
    command = client_pb2.Command.FromString(raw)
    assert command.id == 1 and command.HasField("connect") and command.connect.token == "tok"
    (raw,) = protocols.pb_messages(protocols.pb_command(300, 5, protocols.pb_field(1, b"ch")))
    command = client_pb2.Command.FromString(raw)
    assert command.id == 300 and command.subscribe.channel == "ch"
    assert protocols.pb_messages(protocols.PB_PING_REPLY) == [b""]


def test_replies_encoded_by_the_generated_module_parse() -> None:
    pub = client_pb2.Reply(
        push=client_pb2.Push(
            channel="c", pub=client_pb2.Publication(data=b'{"seq":7}', offset=2**40)
        )
    )
    ping = client_pb2.Reply()
    frame = b"".join(delimited(m.SerializeToString()) for m in (pub, ping, pub))
    adapter = protocols.CentrifugoProtobuf()
    assert adapter.parse(frame) == ([{"seq": 7}, {"seq": 7}], protocols.PB_PING_REPLY)
    gone = client_pb2.Reply(push=client_pb2.Push(disconnect=client_pb2.Disconnect(code=3001)))
    with pytest.raises(protocols.Disconnected):
        adapter.parse(delimited(gone.SerializeToString()))
    error = client_pb2.Reply(id=2, error=client_pb2.Error(code=103, message="x"))
    with pytest.raises(protocols.Disconnected):
        adapter.parse(delimited(error.SerializeToString()))
    with pytest.raises(ValueError):
        protocols.pb_messages(b"\x05ab")  # a message cut short


def test_uni_pushes_parse() -> None:
    adapter = protocols.CentrifugoUniWs()
    assert adapter.parse('{"channel":"c","pub":{"data":{"seq":1}}}') == ([{"seq": 1}], None)
    assert adapter.parse("{}") == ([], None)
    with pytest.raises(protocols.Disconnected):
        adapter.parse('{"disconnect":{"code":3001,"reason":"shutdown"}}')


@pytest.mark.timeout(120)
@pytest.mark.parametrize("proto", ["centrifugo-protobuf", "centrifugo-uni-ws"])
def test_fanout_against_centripy(tmp_path: Path, proto: str) -> None:
    small_fanout(
        {"client_insecure": True, "api_key": "bench", "uni_websocket": True},
        tmp_path,
        proto,
        http_url=False,
    )
