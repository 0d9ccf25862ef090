"""A refused request (401, 413) is answered before its body is read; a caller that goes on
sending its body must still read that answer, never a reset (`linger.py`). On both API
paths: the lean one (Content-Length) and Tornado's (a chunked body)."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from centripy.transports import linger as linger_module
from centripy.transports.linger import linger
from tests.transports.test_api_lean import Response, port, read_response  # noqa: F401

BODY = b'{"channel": "c", "data": {}}' + b" " * 40_000


def _head(key: str, framing: str) -> bytes:
    return (f"POST /api/publish HTTP/1.1\r\nHost: x\r\nX-API-Key: {key}\r\n{framing}\r\n").encode()


async def _refused_then_send(number: int, head: bytes, body: bytes) -> tuple[Response, bytes]:
    """Send `head`, read the answer, then send `body` in pieces: (the answer, what follows
    it on the connection). A reset while sending raises."""
    reader, writer = await asyncio.open_connection("127.0.0.1", number)
    writer.write(head)
    response = await read_response(reader)
    for start in range(0, len(body), 8192):
        writer.write(body[start : start + 8192])
        await writer.drain()
        await asyncio.sleep(0.005)
    rest = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    return response, rest


@pytest.mark.parametrize(
    ("framing", "body"),
    [
        (f"Content-Length: {len(BODY)}\r\n", BODY),
        ("Transfer-Encoding: chunked\r\n", b"%x\r\n%s\r\n0\r\n\r\n" % (len(BODY), BODY)),
    ],
    ids=["lean", "tornado-chunked"],
)
async def test_a_refused_caller_reads_the_answer_while_still_sending(
    port: int,  # noqa: F811
    framing: str,
    body: bytes,
) -> None:
    response, rest = await _refused_then_send(port, _head("wrong", framing), body)
    assert response.status == 401
    assert rest == b""  # then FIN, not a reset, with the whole body sent after the answer


async def test_an_oversized_body_is_refused_with_a_linger(port: int) -> None:  # noqa: F811
    head = _head("secret", f"Content-Length: {11 * 1024 * 1024}\r\n")
    response, rest = await _refused_then_send(port, head, BODY)
    assert (response.status, rest) == (413, b"")


async def test_linger_discards_until_the_peer_closes() -> None:
    ours, theirs = socket.socketpair()
    linger(ours)
    theirs.sendall(b"x" * 1000)
    assert theirs.recv(10) == b""  # FIN at once
    theirs.close()
    for _ in range(100):
        await asyncio.sleep(0.01)
        if ours.fileno() == -1:
            break
    assert ours.fileno() == -1


async def test_linger_is_bounded_in_time_and_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(linger_module, "LINGER_SECONDS", 0.2)
    ours, theirs = socket.socketpair()
    started = time.monotonic()
    linger(ours)
    while ours.fileno() != -1 and time.monotonic() - started < 3:
        await asyncio.sleep(0.02)
    assert ours.fileno() == -1 and 0.15 < time.monotonic() - started < 1.0
    theirs.close()

    monkeypatch.setattr(linger_module, "LINGER_BYTES", 4096)
    monkeypatch.setattr(linger_module, "LINGER_SECONDS", 5.0)
    ours, theirs = socket.socketpair()
    linger(ours)
    theirs.sendall(b"x" * 4096)
    for _ in range(100):
        await asyncio.sleep(0.01)
        if ours.fileno() == -1:
            break
    assert ours.fileno() == -1
    theirs.close()


def test_linger_without_a_socket_does_nothing() -> None:
    linger(None)
