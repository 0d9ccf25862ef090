"""The pure helpers of `transports/emulation.py` and `transports/http_common.py` (the
endpoints themselves, on a real server: tests/integration/test_emulation.py)."""

from __future__ import annotations

import pytest

from centripy.actors.channel import Push
from centripy.transports.emulation import BadEmulationRequest, decode_emulation_request
from centripy.transports.http_common import (
    Framing,
    chunk,
    content_length_exceeds,
    cors_headers,
    frame_lines,
    frame_sse,
)


def test_frames() -> None:
    assert frame_lines([b"{}", b'{"a":1}']) == b'{}\n{"a":1}\n'
    assert frame_sse([b"{}", b'{"a":1}']) == b'data: {}\n\ndata: {"a":1}\n\n'


def test_framing_chunks_and_keeps_the_last_push() -> None:
    assert chunk(b"x" * 26) == b"1a\r\n" + b"x" * 26 + b"\r\n"
    sse = Framing(frame_sse)
    first, second = Push(b"{}"), Push(b'{"a":1}')
    out = sse.chunk([first])
    assert out == b"a\r\ndata: {}\n\n\r\n"
    assert sse.chunk([first]) is out  # the next subscriber of the same fan-out
    assert sse.chunk([second]) == chunk(b'data: {"a":1}\n\n')
    assert sse.chunk([Push(b"{}")]) == out  # an equal Push of another fan-out: reframed
    reply = b'{"id":1}'
    assert sse.chunk([reply]) == chunk(b'data: {"id":1}\n\n')
    assert sse.chunk([second]) == chunk(b'data: {"a":1}\n\n')  # replies are not kept
    lines = Framing(frame_lines)
    assert lines.chunk([first, second]) == chunk(b'{}\n{"a":1}\n')
    assert lines.frame([first]) == b"{}\n"


def test_cors_headers_only_for_allowed_origins() -> None:
    allowed = ("http://*.example.com",)
    assert cors_headers(allowed, None, None) == []
    assert cors_headers(allowed, "http://evil.com", "content-type") == []
    assert cors_headers((), "http://a.example.com", None) == []
    assert cors_headers(allowed, "http://a.example.com", "content-type") == [
        ("Access-Control-Allow-Origin", "http://a.example.com"),
        ("Access-Control-Allow-Credentials", "true"),
        ("Access-Control-Allow-Headers", "content-type"),
    ]
    assert len(cors_headers(allowed, "http://a.example.com", "null")) == 2


def test_content_length_limit() -> None:
    assert not content_length_exceeds(None, 10)
    assert not content_length_exceeds("10", 10)
    assert content_length_exceeds("11", 10)
    assert not content_length_exceeds("junk", 10)


def test_decode_json_emulation_request() -> None:
    body = b'{"node":"n","session":"s","data":"{\\"subscribe\\":{}}\\n{}"}'
    req = decode_emulation_request(body, protobuf=False)
    assert (req.node, req.session, req.data) == ("n", "s", b'{"subscribe":{}}\n{}')
    for bad in (b"", b"[]", b"{", b'{"session":"s","data":{"x":1}}', b'{"session":1,"data":""}'):
        with pytest.raises(BadEmulationRequest):
            decode_emulation_request(bad, protobuf=False)


def test_decode_protobuf_emulation_request() -> None:
    # node=1 "n", session=2 "ss", an unknown varint field 7, data=3 b"\x01\x02"
    body = b"\x0a\x01n\x12\x02ss\x38\x96\x01\x1a\x02\x01\x02"
    req = decode_emulation_request(body, protobuf=True)
    assert (req.node, req.session, req.data) == ("n", "ss", b"\x01\x02")
    for bad in (b"\x0a\x05ab", b"\x0a", b"\x0b\x00", b"\x12\x01\xff"):
        with pytest.raises(BadEmulationRequest):
            decode_emulation_request(bad, protobuf=True)
