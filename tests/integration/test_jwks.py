"""JWKS through a real server process: RS256 and ES256 tokens verified with keys fetched
from `token_jwks_public_endpoint` (served here by a small local HTTP server)."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
import pytest
import websockets
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

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

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            hits.append(self.path)
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
    yield {
        "url": f"http://127.0.0.1:{server.server_address[1]}/jwks.json",
        "rsa": rsa_key,
        "ec": ec_key,
        "hits": hits,
    }
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
