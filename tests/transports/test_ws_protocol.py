"""`ws_protocol.ServerProtocol`: the sans-I/O WebSocket state machine (OPEN, CLOSING,
CLOSED), its events and the bytes it asks to send. The frame parser itself is checked
against a reference parser in test_fuzz_transports.py."""

from __future__ import annotations

import struct

from centripy.actors.channel import Push
from centripy.transports.websocket import frame_messages
from centripy.transports.ws_protocol import Close, Message, ServerProtocol, State, frame
from tests.transports.test_fuzz_transports import client_frame


def test_messages_split_anyhow() -> None:
    protocol = ServerProtocol(max_size=1000)
    data = client_frame(0x1, b"hi") + client_frame(0x9, b"p")
    protocol.receive_data(data[:9])
    assert protocol.events_received() == [Message(b"hi", True)]
    assert protocol.data_to_send() == b""
    protocol.receive_data(data[9:])
    assert protocol.events_received() == ()
    assert protocol.data_to_send() == frame(0xA, b"p")


def test_ping_is_answered_and_binary_is_delivered() -> None:
    protocol = ServerProtocol(max_size=1000)
    protocol.receive_data(client_frame(0x9, b"p") + client_frame(0x2, b"\x00\xff"))
    assert protocol.data_to_send() == frame(0xA, b"p")
    assert protocol.events_received() == [Message(b"\x00\xff", False)]
    assert protocol.state is State.OPEN


def test_pongs_are_counted_and_not_answered() -> None:
    protocol = ServerProtocol(1000)
    protocol.receive_data(client_frame(0xA, b"") + client_frame(0xA, b"payload"))
    assert protocol.pongs == 2
    assert protocol.data_to_send() == b"" and protocol.events_received() == ()
    assert protocol.state is State.OPEN


def test_peer_closes_first() -> None:
    protocol = ServerProtocol(max_size=1000)
    protocol.receive_data(client_frame(0x8, struct.pack("!H", 1001) + b"bye"))
    assert protocol.data_to_send() == frame(0x8, struct.pack("!H", 1001))
    assert protocol.events_received() == [Close(1001, False)]
    assert protocol.state is State.CLOSED and protocol.closed
    protocol.receive_data(client_frame(0x1, b"late"))  # ignored once closed
    assert protocol.events_received() == () and protocol.data_to_send() == b""


def test_we_close_first_and_drop_messages_until_the_answer() -> None:
    protocol = ServerProtocol(max_size=1000)
    protocol.send_close(3501, "bad request")
    assert protocol.data_to_send() == frame(0x8, struct.pack("!H", 3501) + b"bad request")
    assert protocol.state is State.CLOSING
    protocol.send_close(3000, "again")  # only once
    protocol.receive_data(client_frame(0x1, b"dropped") + client_frame(0x9, b"no pong"))
    assert protocol.events_received() == () and protocol.data_to_send() == b""
    protocol.receive_data(client_frame(0x8, struct.pack("!H", 3501)))
    assert protocol.data_to_send() == b""  # no echo: we closed first
    assert protocol.events_received() == [Close(3501, False)]
    assert protocol.state is State.CLOSED


def test_protocol_errors_fail_with_a_code() -> None:
    protocol = ServerProtocol(max_size=4)
    protocol.receive_data(client_frame(0x1, b"12345"))
    assert protocol.data_to_send() == frame(0x8, struct.pack("!H", 1009) + b"message too big")
    assert protocol.events_received() == [Close(1009, True)]
    protocol = ServerProtocol(max_size=100)
    protocol.send_close(3000)
    protocol.data_to_send()
    protocol.receive_data(b"\x81\x01x")  # unmasked, after our close: no second close frame
    assert protocol.data_to_send() == b""
    assert protocol.events_received() == [Close(None, True)]


def test_eof_closes() -> None:
    protocol = ServerProtocol(max_size=100)
    protocol.receive_data(client_frame(0x1, b"par", fin=False))
    protocol.receive_eof()
    assert protocol.state is State.CLOSED
    protocol.receive_data(client_frame(0x0, b"t"))
    assert protocol.events_received() == ()


def test_a_push_is_framed_once_for_every_subscriber() -> None:
    push = Push(b'{"push":1}')
    first = frame_messages([push], protobuf=False)
    assert first == frame(0x1, push) and push.framed is first
    assert frame_messages([push], protobuf=False) is first
    reply = b'{"id":1}'
    assert frame_messages([reply], protobuf=False) == frame(0x1, reply)
    assert frame_messages([push, reply], protobuf=False) == frame(0x1, push + b"\n" + reply)
    binary = Push(b"\x08\x01")
    assert frame_messages([binary], protobuf=True) == frame(0x2, b"\x02\x08\x01")
