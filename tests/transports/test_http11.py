"""`http11.parse_request_head`: the lean path's one request-head parser, and its policy.

Differential against Tornado's own parser (as h11 tests against the standard library):
whatever head the lean path accepts, Tornado's request-line and header parsers accept too
and read the same method, target and header values; what the lean path refuses goes to
Tornado, which then answers it itself."""

from __future__ import annotations

import pytest
import tornado.httputil
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from centripy.transports import http11
from centripy.transports.http11 import RequestHead, lean_post, parse_request_head
from centripy.transports.ws_protocol import accept_upgrade
from tests.transports.test_fuzz_transports import ANY_HEAD

MANY = settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def tornado_reading(head: bytes) -> tuple[str, str, tornado.httputil.HTTPHeaders]:
    """What Tornado's HTTP1Connection reads from `head` (it raises HTTPInputError)."""
    text = head.decode("latin-1").lstrip("\r\n")
    eol = text.find("\n")
    start = tornado.httputil.parse_request_start_line(text[:eol].rstrip("\r"))
    headers = tornado.httputil.HTTPHeaders.parse(text[eol:])
    return start.method, start.path, headers


@MANY
@given(ANY_HEAD)
def test_what_the_lean_path_accepts_tornado_reads_the_same(head: bytes) -> None:
    request = parse_request_head(head)
    if request is None:
        return
    method, target, headers = tornado_reading(head)
    assert method == request.method
    assert target == request.path + ("?" + request.query if "?" in target else "")
    for name, value in request.headers.items():
        assert headers.get_list(name)[0] == value
    if "content-length" in request.headers:
        assert int(headers["Content-Length"]) == request.content_length


@pytest.mark.parametrize(
    ("head", "why"),
    [
        (b"POST /api HTTP/1.1\r\nX: a\x00b\r\n\r\n", "NUL in a value"),
        (b"POST /api HTTP/1.1\r\nX: a\rb\r\n\r\n", "bare CR in a value"),
        (b"POST /api HTTP/1.1\r\nX: a\nY: b\r\n\r\n", "bare LF"),
        (b"POST /api HTTP/1.1\r\nX\xc0: a\r\n\r\n", "not a token"),
        (b"POST /api HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", "two hosts"),
        (b"POST /api HTTP/1.1\r\nHost: a,b\r\n\r\n", "a host list"),
        (b"POST /api HTTP/1.1\r\nContent-Length: \xb2\r\n\r\n", "a latin-1 digit"),
        (b"POST /api HTTP/1.1\r\nContent-Length: 1234567890123456789\r\n\r\n", "19 digits"),
        (b"POST /api HTTP/1.1\r\nContent-Length: 1, 1\r\n\r\n", "a list"),
        (b"POST /a b HTTP/1.1\r\n\r\n", "a space in the target"),
        (b"\r\nPOST /api HTTP/1.1\r\n\r\n", "an empty line first"),
        (b"POST /api HTTP/1.1\r\nX: 1", "no end of head"),
    ],
)
def test_refused_heads(head: bytes, why: str) -> None:
    assert parse_request_head(head) is None, why


def test_a_head_is_parsed_once_for_both_users() -> None:
    head = (
        b"GET /connection/websocket?format=protobuf HTTP/1.1\r\nHost: h:80\r\n"
        b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: k\r\n"
        b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: a\r\n"
        b"Sec-WebSocket-Protocol: b\r\nContent-Length: 0\r\n\r\n"
    )
    request = parse_request_head(head)
    assert isinstance(request, RequestHead)
    assert (request.method, request.path, request.query) == (
        "GET",
        "/connection/websocket",
        "format=protobuf",
    )
    assert request.joined("sec-websocket-protocol") == "a,b"
    assert request.header("Sec-WebSocket-Protocol") == "a"
    assert request.joined("origin") is None
    assert not lean_post(request)
    upgrade = accept_upgrade(request)
    assert upgrade is not None and upgrade.subprotocols == ("a", "b")


@given(st.sampled_from([b"HTTP/1.0", b"HTTP/1.1"]), st.sampled_from(["", "close", "keep-alive"]))
def test_keep_alive(version: bytes, connection: str) -> None:
    extra = f"Connection: {connection}\r\n".encode() if connection else b""
    request = parse_request_head(b"POST /api " + version + b"\r\n" + extra + b"\r\n")
    assert request is not None
    if version == b"HTTP/1.0":
        assert request.keep_alive == (connection == "keep-alive")
    else:
        assert request.keep_alive == (connection != "close")


def test_a_head_seen_again_is_not_parsed_again() -> None:
    head = b"POST /api/publish HTTP/1.1\r\nHost: x\r\nContent-Length: 12\r\n\r\n"
    first = parse_request_head(head)
    assert first is not None and first.content_length == 12
    assert parse_request_head(bytes(bytearray(head))) is first  # the same bytes: remembered
    other = parse_request_head(head.replace(b"12", b"13"))
    assert other is not None and other.content_length == 13
    assert parse_request_head(b"POST /a HTTP/1.1\r\nX: \x00\r\n\r\n") is None  # refusals too
    assert parse_request_head(b"POST /a HTTP/1.1\r\nX: \x00\r\n\r\n") is None


def test_what_is_remembered_is_bounded() -> None:
    for i in range(3 * http11.REMEMBERED):
        assert parse_request_head(b"POST /%d HTTP/1.1\r\n\r\n" % i) is not None
        assert len(http11._remembered) <= http11.REMEMBERED
    long = b"POST /a HTTP/1.1\r\nX: " + b"a" * http11.REMEMBERED_SIZE + b"\r\n\r\n"
    request = parse_request_head(long)
    assert request is not None and request.headers["x"] == "a" * http11.REMEMBERED_SIZE
    assert long not in http11._remembered and parse_request_head(long) is not request
