"""JWKS through a real server process: RS256 and ES256 tokens verified with keys fetched
from `token_jwks_public_endpoint` (served here by a small local HTTP server); hostile tokens
(random kids, deeply nested JSON) neither hammer that endpoint nor break the server."""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
import pytest
import websockets
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from tests.integration.conftest import make_jwt
from tests.support.server import ServerFactory

pytestmark = [pytest.mark.integration, pytest.mark.timeout(30)]


@pytest.fixture
def jwks() -> Iterator[dict[str, Any]]:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    keys = []
    for kid, key, algo in (("r1", rsa_key, RSAAlgorithm), ("e1", ec_key, ECAlgorithm)):
        jwk = json.loads(algo.to_jwk(key.public_key()))
        jwk["kid"] = kid
        keys.append(jwk)
    body = json.dumps({"keys": keys}).encode()
    hits: list[str] = []
    state: dict[str, Any] = {"delay": 0.0}  # seconds before each answer: a slow provider

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            hits.append(self.path)
            time.sleep(state["delay"])
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state.update(
        url=f"http://127.0.0.1:{server.server_address[1]}/jwks.json",
        rsa=rsa_key,
        ec=ec_key,
        hits=hits,
    )
    yield state
    server.shutdown()
    server.server_close()


async def _connect(url: str, token: str) -> Any:
    async with websockets.connect(url) as ws:
        await ws.send(json.dumps({"id": 1, "connect": {"token": token}}))
        try:
            return json.loads(await asyncio.wait_for(ws.recv(), 5))
        except websockets.exceptions.ConnectionClosed as exc:
            return exc.rcvd.code if exc.rcvd else None


async def test_tokens_are_verified_with_jwks_keys(
    server_factory: ServerFactory, jwks: dict[str, Any]
) -> None:
    server = server_factory({"token_jwks_public_endpoint": jwks["url"]})
    rs = jwt.encode({"sub": "alice"}, jwks["rsa"], algorithm="RS256", headers={"kid": "r1"})
    es = jwt.encode({"sub": "bob"}, jwks["ec"], algorithm="ES256", headers={"kid": "e1"})
    assert "connect" in await _connect(server.ws_url, rs)
    assert "connect" in await _connect(server.ws_url, es)
    assert len(jwks["hits"]) == 1  # the key set is cached
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    forged = jwt.encode({"sub": "eve"}, other, algorithm="RS256", headers={"kid": "r1"})
    assert await _connect(server.ws_url, forged) == 3500
    unknown = jwt.encode({"sub": "eve"}, other, algorithm="RS256", headers={"kid": "zz"})
    assert await _connect(server.ws_url, unknown) == 3500
    assert len(jwks["hits"]) == 1  # the unknown kid was answered from the fresh key set


def _random_kid_token(key: Any) -> str:
    return jwt.encode({"sub": "eve"}, key, algorithm="RS256", headers={"kid": uuid.uuid4().hex})


async def test_random_kids_do_not_hammer_the_jwks_endpoint(
    server_factory: ServerFactory, jwks: dict[str, Any]
) -> None:
    server = server_factory({"token_jwks_public_endpoint": jwks["url"]})
    jwks["delay"] = 1.0  # a slow identity provider: serialised fetches would queue for 40 s
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    started = time.monotonic()
    flood = [
        asyncio.ensure_future(_connect(server.ws_url, _random_kid_token(other))) for _ in range(40)
    ]
    await asyncio.sleep(0.5)  # the flood's lookups are waiting on the first fetch by now
    legit = jwt.encode({"sub": "alice"}, jwks["rsa"], algorithm="RS256", headers={"kid": "r1"})
    before = time.monotonic()
    assert "connect" in await _connect(server.ws_url, legit)
    assert time.monotonic() - before < 3.0  # it shared the flood's fetch instead of queueing
    assert await asyncio.gather(*flood) == [3500] * 40
    second_wave = [_connect(server.ws_url, _random_kid_token(other)) for _ in range(40)]
    assert await asyncio.gather(*second_wave) == [3500] * 40
    elapsed = time.monotonic() - started
    # at most one fetch per 10 s refresh interval (one in all, unless this machine crawled)
    assert 1 <= len(jwks["hits"]) <= 1 + int(elapsed // 10)
    jwks["delay"] = 0.0
    before = time.monotonic()
    assert "connect" in await _connect(server.ws_url, legit)
    assert time.monotonic() - before < 2.0


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _poison(header: bytes, payload: bytes) -> str:
    return f"{_b64url(header)}.{_b64url(payload)}.{_b64url(b'not a signature')}"


POISON = {  # each nested far beyond Python's recursion limit, each under 64 KiB
    "header-array": _poison(b"[" * 40_000, b'{"sub":"1"}'),
    "header-object": _poison(b'{"alg":' * 6_000, b'{"sub":"1"}'),
    "payload-array": _poison(b'{"alg":"RS256","kid":"r1"}', b"[" * 40_000),
    "kid-array": _poison(b'{"alg":"RS256","kid":' + b"[" * 30_000, b'{"sub":"1"}'),
}


async def _read_until(ws: Any, key: str) -> dict[str, Any]:
    """The first message of `ws` (frames may hold several, one per line) that has `key`."""
    while True:
        frame = await asyncio.wait_for(ws.recv(), 5)
        for line in str(frame).splitlines():
            message = json.loads(line)
            if key in message:
                return dict(message)


@pytest.mark.parametrize("with_jwks", [False, True], ids=["hmac", "jwks"])
async def test_poison_tokens_are_3500_and_the_server_keeps_serving(
    server_factory: ServerFactory, jwks: dict[str, Any], with_jwks: bool
) -> None:
    server = server_factory({"token_jwks_public_endpoint": jwks["url"]} if with_jwks else {})
    if with_jwks:
        claims = {"sub": "witness", "channels": ["news"]}
        token = jwt.encode(claims, jwks["rsa"], algorithm="RS256", headers={"kid": "r1"})
    else:
        token = make_jwt("witness", channels=["news"])
    async with websockets.connect(server.ws_url) as witness:
        await witness.send(json.dumps({"id": 1, "connect": {"token": token}}))
        assert "news" in (await _read_until(witness, "connect"))["connect"]["subs"]
        for name, poison in POISON.items():
            assert len(poison) < 64 * 1024, name
            assert await _connect(server.ws_url, poison) == 3500, name
        await asyncio.to_thread(server.api, "publish", {"channel": "news", "data": {"n": 1}})
        push = await _read_until(witness, "push")
        assert push["push"]["channel"] == "news" and push["push"]["pub"]["data"] == {"n": 1}
    assert "connect" in await _connect(server.ws_url, token)
    assert server.running
