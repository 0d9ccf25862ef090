"""Our server-side WebSocket framing (`ws_protocol.frame`; the adapters write it straight to
the transport, see websocket.py)."""

import struct

import pytest

from centripy.transports.ws_protocol import frame


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, 70000])
def test_frame_lengths(size: int) -> None:
    data = b"x" * size
    out = frame(0x1, data)
    assert out[0] == 0x81
    if size < 126:
        assert out[1] == size and out[2:] == data
    elif size <= 0xFFFF:
        assert out[1] == 126 and struct.unpack("!H", out[2:4])[0] == size and out[4:] == data
    else:
        assert out[1] == 127 and struct.unpack("!Q", out[2:10])[0] == size and out[10:] == data


def test_binary_opcode() -> None:
    assert frame(0x2, b"\x00")[:2] == b"\x82\x01"
