"""Hostile HTTP clients against a real server: every wait is timed, no body is buffered
before the API key is checked or beyond the endpoint's limit, and a witness subscriber on
the same server keeps receiving every publication in order (issue 15, items 1, 2, 7, 10)."""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import TEST_API_KEY
from tests.integration.test_server_lifecycle import _client_ssl, pki  # noqa: F401
from tests.support.server import ServerFactory, ServerProcess, free_port, port_accepts
from tests.support.wait import eventually, eventually_sync
from tests.support.witness import Witness

pytestmark = pytest.mark.integration

HOSTILE: dict[str, Any] = {
    "allow_anonymous_connect_without_token": True,
    "allow_subscribe_for_client": True,
    "allow_subscribe_for_anonymous": True,
    "http_read_header_timeout": "1s",
    "http_read_timeout": "1s",
    "http_idle_timeout": "1500ms",
    "api_max_request_body_size": 100000,
    "http_stream": True,
    "sockjs": True,
}


def _connect(server: ServerProcess) -> socket.socket:
    sock = socket.create_connection((server.host, server.port), timeout=10)
    sock.settimeout(10)
    return sock


def _read_all(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    out = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return out
        if not chunk:
            return out
        out += chunk


def _closed_within(sock: socket.socket) -> float:
    started = time.monotonic()
    _read_all(sock)
    return time.monotonic() - started


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.fixture
def server(server_factory: ServerFactory) -> ServerProcess:
    return server_factory(HOSTILE)


async def test_idle_socket_and_slowloris_head_are_closed(server: ServerProcess) -> None:
    async with Witness(server.ws_url, "witness") as witness:
        idle = _connect(server)
        slow = _connect(server)

        def slowloris() -> float:
            started = time.monotonic()
            try:
                for byte in b"POST /api/info HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 100:
                    slow.send(bytes([byte]))
                    time.sleep(0.05)
            except OSError:
                return time.monotonic() - started
            return 99.0

        idle_task = asyncio.to_thread(_closed_within, idle)
        slow_task = asyncio.to_thread(slowloris)
        await witness.check(server, 5)
        idle_after, slow_after = await asyncio.gather(idle_task, slow_task)
        assert idle_after < 3.0
        assert slow_after < 4.0  # closed about 1 s in, long before the head was complete
        await witness.check(server, 5)


def test_keep_alive_connection_closed_when_idle(server: ServerProcess) -> None:
    sock = _connect(server)
    body = b"{}"
    sock.sendall(
        b"POST /api/info HTTP/1.1\r\nHost: x\r\nX-API-Key: %s\r\nContent-Length: %d\r\n\r\n%s"
        % (TEST_API_KEY.encode(), len(body), body)
    )
    first = sock.recv(65536)
    assert first.startswith(b"HTTP/1.1 200")
    started = time.monotonic()
    assert _read_all(sock) == b""
    assert 1.0 < time.monotonic() - started < 4.0


def test_wrong_key_refused_before_the_body(server: ServerProcess) -> None:
    """40 MB announced with a wrong key: 401 comes back without a byte of the body sent."""
    sock = _connect(server)
    rss_before = _rss_kib(server.pid or 0)
    sock.sendall(
        b"POST /api/publish HTTP/1.1\r\nHost: x\r\nX-API-Key: wrong\r\n"
        b"Content-Length: 40000000\r\n\r\n"
    )
    response = _read_all(sock)
    assert response.startswith(b"HTTP/1.1 401"), response
    assert b"Connection: close" in response
    assert _rss_kib(server.pid or 0) - rss_before < 10_000


@pytest.mark.parametrize(
    "path",
    [
        "/api/publish",
        "/api",
        "/emulation",
        "/connection/http_stream",
        "/connection/sockjs/1/s/xhr_send",
    ],
)
def test_announced_body_over_the_limit_gets_413_unread(server: ServerProcess, path: str) -> None:
    sock = _connect(server)
    sock.sendall(
        b"POST %s HTTP/1.1\r\nHost: x\r\nX-API-Key: %s\r\nContent-Length: 5000000\r\n\r\n"
        % (path.encode(), TEST_API_KEY.encode())
    )
    response = _read_all(sock)
    assert response.startswith(b"HTTP/1.1 413"), response


@pytest.mark.parametrize(
    ("path", "extra"),
    [
        ("/api/publish", ""),
        ("/connection/http_stream", ""),
        ("/connection/http_stream", "Expect: 100-continue\r\n"),  # Tornado's handler
        ("/emulation", "Expect: 100-continue\r\n"),
    ],
)
def test_a_refused_sender_reads_413_not_a_reset(
    server: ServerProcess, path: str, extra: str
) -> None:
    """The answer comes before the body is read; a client that goes on sending its body
    (as HTTP clients do) still reads it whole, then the server's FIN (`linger.py`)."""
    sock = _connect(server)
    sock.sendall(
        b"POST %s HTTP/1.1\r\nHost: x\r\nX-API-Key: %s\r\n%sContent-Length: 5000000\r\n\r\n"
        % (path.encode(), TEST_API_KEY.encode(), extra.encode())
    )
    head = sock.recv(65536)
    assert head.startswith(b"HTTP/1.1 413"), head
    for _ in range(20):
        sock.sendall(b"x" * 8192)  # a reset would raise here
        time.sleep(0.002)
    rest = b""
    while chunk := sock.recv(65536):  # up to the FIN; a reset would raise here too
        rest += chunk
    assert (head + rest).count(b"HTTP/1.1 ") == 1
    sock.close()


def test_sockjs_send_over_its_own_limit_gets_413_unread(server_factory: ServerFactory) -> None:
    server = server_factory({**HOSTILE, "api_max_request_body_size": 50_000_000})
    sock = _connect(server)
    sock.sendall(
        b"POST /connection/sockjs/1/s/xhr_send HTTP/1.1\r\nHost: x\r\n"
        b"Content-Length: 2000000\r\n\r\n"
    )
    assert _read_all(sock).startswith(b"HTTP/1.1 413")


def test_chunked_api_body_with_wrong_key_refused_before_the_body(server: ServerProcess) -> None:
    """Chunked bodies go through Tornado's handlers: the key is checked in `prepare`."""
    sock = _connect(server)
    sock.sendall(
        b"POST /api/publish HTTP/1.1\r\nHost: x\r\nX-API-Key: wrong\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    response = sock.recv(65536)
    assert response.startswith(b"HTTP/1.1 401"), response


def test_chunked_api_body_over_the_limit_is_cut(server: ServerProcess) -> None:
    sock = _connect(server)
    sock.sendall(
        b"POST /api/publish HTTP/1.1\r\nHost: x\r\nX-API-Key: %s\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n" % TEST_API_KEY.encode()
    )
    chunk = b"%x\r\n%s\r\n" % (50000, b"a" * 50000)
    try:
        for _ in range(10):
            sock.sendall(chunk)
    except OSError:
        pass
    response = _read_all(sock)
    assert not response.startswith(b"HTTP/1.1 200"), response


def test_slow_body_is_dropped(server: ServerProcess) -> None:
    sock = _connect(server)
    sock.sendall(
        b"POST /api/info HTTP/1.1\r\nHost: x\r\nX-API-Key: %s\r\nContent-Length: 100\r\n\r\n{"
        % TEST_API_KEY.encode()
    )
    assert _closed_within(sock) < 4.0


def test_api_key_in_query_not_logged(server: ServerProcess) -> None:
    secret = "query-secret-1234"
    for path in (f"/api/info?api_key={secret}", f"/api/nope?api_key={secret}"):
        sock = _connect(server)
        sock.sendall(b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n" % path.encode())
        assert sock.recv(65536).startswith(b"HTTP/1.1 401")
        sock.close()
    # Tornado's path (a GET to the API answers 405 there) logs too.
    sock = _connect(server)
    sock.sendall(b"GET /api/info?api_key=%s HTTP/1.1\r\nHost: x\r\n\r\n" % secret.encode())
    assert sock.recv(65536).startswith(b"HTTP/1.1 405")
    sock.close()

    def logs() -> str:
        return server.stderr_path.read_text() + server.stdout_path.read_text()

    # the failures are logged (both paths)...
    eventually_sync(lambda: "401 POST /api/nope" in logs() and "405 GET /api/info" in logs(), 5)
    assert secret not in logs()  # ...without the query string


def _tls_info(port: int, ctx: ssl.SSLContext) -> int:
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname="127.0.0.1") as sock,
    ):
        sock.sendall(
            b"POST /api/info HTTP/1.1\r\nHost: x\r\nX-API-Key: %s\r\n"
            b"Content-Length: 2\r\nConnection: close\r\n\r\n{}" % TEST_API_KEY.encode()
        )
        return int(sock.recv(65536).split(b" ")[1])


def _plain_info(port: int) -> int | None:
    """The status of a plain-HTTP call, or None when the server does not answer it."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(
                b"POST /api/info HTTP/1.1\r\nHost: x\r\nX-API-Key: %s\r\n"
                b"Content-Length: 2\r\nConnection: close\r\n\r\n{}" % TEST_API_KEY.encode()
            )
            head = sock.recv(65536)
    except OSError:
        return None
    return int(head.split(b" ")[1]) if head.startswith(b"HTTP/1.1 ") else None


@pytest.mark.parametrize(
    ("tls_external", "separate"), [(False, False), (True, False), (False, True), (True, True)]
)
def test_tls_listener_combinations(
    server_factory: ServerFactory,
    pki: dict[str, Any],  # noqa: F811
    tls_external: bool,
    separate: bool,
) -> None:
    """`tls_external` only takes TLS off a separate internal port; one port is all TLS."""
    internal = free_port() if separate else 0
    config: dict[str, Any] = {
        "tls": True,
        "tls_cert": pki["files"]["server.pem"],
        "tls_key": pki["files"]["server.key"],
        "tls_external": tls_external,
        "http_read_header_timeout": "1s",
    }
    if separate:
        config["internal_port"] = internal
    server = server_factory(config)
    ctx = _client_ssl(pki, with_cert=False)
    if not separate:
        assert _tls_info(server.port, ctx) == 200
        assert _plain_info(server.port) is None
        silent = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        assert _closed_within(silent) < 4.0  # no TLS handshake: dropped like an idle socket
        return
    eventually_sync(
        lambda: port_accepts("127.0.0.1", internal), 5, "the internal port", interval=0.05
    )
    if tls_external:
        assert _plain_info(internal) == 200
    else:
        assert _tls_info(internal, ctx) == 200
        assert _plain_info(internal) is None


async def test_big_integers_in_data_reach_subscribers_exactly(server: ServerProcess) -> None:
    """orjson reads integers beyond 64 bits as floats: the API and client publications keep
    the sender's digits, as Centrifugo passes payload bytes through."""
    async with Witness(server.ws_url, "witness") as witness:
        body = b'{"channel":"witness","data":{"n":123456789012345678901234567890}}'
        status, _ = await asyncio.to_thread(server.api_raw, "publish", body)
        assert status == 200
        await eventually(lambda: witness.received, 5, "the publication", interval=0.05)
        assert witness.received == [{"n": 123456789012345678901234567890}]
