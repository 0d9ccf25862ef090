"""Server process lifecycle: TLS and mTLS, graceful shutdown, start-up config errors."""

from __future__ import annotations

import asyncio
import datetime
import json
import signal
import ssl
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import websockets
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.integration.conftest import TEST_API_KEY
from tests.support.server import ServerFactory

pytestmark = pytest.mark.integration


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[str, ec.EllipticCurvePrivateKey] | None = None,
    *,
    ca: bool = False,
    san: str | None = None,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    issuer_name, issuer_key = issuer or (subject, key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_name)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if san:
        import ipaddress

        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(san))]),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256())


def _pem(obj: Any) -> str:
    if isinstance(obj, x509.Certificate):
        return obj.public_bytes(serialization.Encoding.PEM).decode()
    return obj.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Any]:
    ca_key = _key()
    ca = _cert("test-ca", ca_key, ca=True)
    server_key = _key()
    server = _cert("127.0.0.1", server_key, ("test-ca", ca_key), san="127.0.0.1")
    client_key = _key()
    client = _cert("client", client_key, ("test-ca", ca_key))
    files = {}
    for name, obj in {
        "ca.pem": ca,
        "server.pem": server,
        "server.key": server_key,
        "client.pem": client,
        "client.key": client_key,
    }.items():
        path = tmp_path / name
        path.write_text(_pem(obj))
        files[name] = str(path)
    return {"files": files, "ca_pem": _pem(ca)}


def _client_ssl(pki: dict[str, Any], with_cert: bool) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=pki["files"]["ca.pem"])
    if with_cert:
        ctx.load_cert_chain(pki["files"]["client.pem"], pki["files"]["client.key"])
    return ctx


async def _ws_connect(url: str, ctx: ssl.SSLContext) -> dict[str, Any]:
    async with websockets.connect(url, ssl=ctx) as ws:
        await ws.send(json.dumps({"id": 1, "connect": {}}))
        return dict(json.loads(await asyncio.wait_for(ws.recv(), 5)))


def _https_publish(port: int, ctx: ssl.SSLContext) -> dict[str, Any]:
    request = urllib.request.Request(
        f"https://127.0.0.1:{port}/api/info",
        data=b"{}",
        headers={"X-API-Key": TEST_API_KEY},
        method="POST",
    )
    with urllib.request.urlopen(request, context=ctx, timeout=5) as response:
        return dict(json.loads(response.read()))


async def test_tls_serves_websocket_and_api(
    server_factory: ServerFactory, pki: dict[str, Any]
) -> None:
    server = server_factory(
        {
            "tls": True,
            "tls_cert": pki["files"]["server.pem"],
            "tls_key": pki["files"]["server.key"],
            "allow_anonymous_connect_without_token": True,
        }
    )
    ctx = _client_ssl(pki, with_cert=False)
    reply = await _ws_connect(f"wss://127.0.0.1:{server.port}/connection/websocket", ctx)
    assert "connect" in reply
    info = await asyncio.to_thread(_https_publish, server.port, ctx)
    assert info["result"]["nodes"][0]["num_clients"] >= 0


async def test_mtls_requires_a_client_certificate(
    server_factory: ServerFactory, pki: dict[str, Any]
) -> None:
    server = server_factory(
        {
            "tls": True,
            "tls_cert": pki["files"]["server.pem"],
            "tls_key": pki["files"]["server.key"],
            "tls_client_ca_pem": pki["ca_pem"],
            "allow_anonymous_connect_without_token": True,
        }
    )
    url = f"wss://127.0.0.1:{server.port}/connection/websocket"
    reply = await _ws_connect(url, _client_ssl(pki, with_cert=True))
    assert "connect" in reply
    with pytest.raises((ssl.SSLError, OSError, websockets.exceptions.WebSocketException)):
        await _ws_connect(url, _client_ssl(pki, with_cert=False))


async def test_sigterm_disconnects_with_shutdown_and_exits_zero(
    server_factory: ServerFactory,
) -> None:
    server = server_factory(
        {
            "allow_anonymous_connect_without_token": True,
            "allow_subscribe_for_client": True,
            "allow_subscribe_for_anonymous": True,
            "namespaces": [{"name": "hist", "history_size": 100, "history_ttl": "60s"}],
        }
    )
    async with websockets.connect(server.ws_url) as ws:
        await ws.send(json.dumps({"id": 1, "connect": {}}))
        await ws.recv()
        publishers = [
            asyncio.create_task(
                server.api_async("publish", {"channel": "hist:c", "data": {"i": i}})
            )
            for i in range(50)
        ]
        await asyncio.sleep(0.05)
        code = await asyncio.to_thread(server.stop, signal.SIGTERM, 15)
        assert code == 0
        with pytest.raises(websockets.exceptions.ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 5)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 3001
    results = await asyncio.gather(*publishers, return_exceptions=True)
    acked = [r["result"]["offset"] for r in results if isinstance(r, dict) and "result" in r]
    server.start()
    history = server.api_result("history", {"channel": "hist:c", "limit": -1})
    stored = [p["offset"] for p in history["publications"]]
    assert set(acked) <= set(stored)
    assert stored == list(range(1, len(stored) + 1))


def test_invalid_config_fails_at_start_naming_the_key(tmp_path: Path) -> None:
    config = tmp_path / "bad.json"
    config.write_text(json.dumps({"ping_interval": "5s", "pong_timeout": "10s"}))
    proc = subprocess.run(
        [sys.executable, "-m", "centripy.cli", "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tmp_path,
    )
    assert proc.returncode == 1
    assert "ping_interval" in proc.stderr


def test_restart_keeps_the_sqlite_log(server_factory: ServerFactory) -> None:
    """A restart on the same working directory keeps the SQLite log (same epoch)."""
    server = server_factory(
        {"namespaces": [{"name": "hist", "history_size": 10, "history_ttl": "60s"}]}
    )
    first = server.api_result("publish", {"channel": "hist:x", "data": {}})
    server.stop()
    server.start()
    second = server.api_result("publish", {"channel": "hist:x", "data": {}})
    assert second["epoch"] == first["epoch"] and second["offset"] == first["offset"] + 1


async def test_metrics_endpoint(server_factory: ServerFactory) -> None:
    server = server_factory({"prometheus": True, "allow_anonymous_connect_without_token": True})
    async with websockets.connect(server.ws_url) as ws:
        await ws.send(json.dumps({"id": 1, "connect": {}}))
        await ws.recv()
        server.api_result("publish", {"channel": "any", "data": {}})
        text = await asyncio.to_thread(_get, f"{server.http_url}/metrics")
    assert "centrifugo_node_num_clients 1" in text
    assert 'centrifugo_transport_connect_count{transport="websocket"} 1' in text
    assert 'centripy_api_commands_total{method="PublishRequest"} 1' in text


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return str(response.read().decode())
