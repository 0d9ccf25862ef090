"""A real GRPC proxy back end for tests: a `grpc.aio` server of Centrifugo's
`centrifugal.centrifugo.proxy.CentrifugoProxy` service on 127.0.0.1 (plaintext or TLS), run on
the test's event loop. It records every call (kind, request message, metadata, peer) and
answers through a handler the test sets per kind (by default an empty result)."""

from __future__ import annotations

import asyncio
import datetime
import inspect
import ipaddress
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from google.protobuf.message import Message

from centripy.proxy.grpc import METHODS, SERVICE

Handler = Callable[[Any], "Message | bytes | Awaitable[Message]"]


@dataclass(frozen=True)
class Recorded:
    kind: str
    request: Any  # the proto request message
    metadata: dict[str, str | bytes]
    peer: str


def self_signed_cert(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key (PEM files in `folder`); the
    certificate is also the CA a client trusts."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "proxy-cert.pem", folder / "proxy-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def _serialize(response: Message | bytes) -> bytes:
    """A handler may answer raw bytes (to send what is not a response message)."""
    return response if isinstance(response, bytes) else response.SerializeToString()


class GrpcProxyBackendServer:
    """Start with `await start()` (returns the port), stop with `await stop()`. `answer(kind,
    handler)` sets how a kind is answered: the handler gets the request message and returns
    the response message (or awaits before returning it, to be slow)."""

    def __init__(
        self,
        *,
        tls: tuple[Path, Path] | None = None,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self.calls: list[Recorded] = []
        self.changed = asyncio.Event()
        self.port = 0
        self._tls = tls
        self._options = tuple(options)
        self._handlers: dict[str, Handler] = {}
        self._server: grpc.aio.Server | None = None

    @property
    def endpoint(self) -> str:
        return f"grpc://127.0.0.1:{self.port}"

    def answer(self, kind: str, handler: Handler) -> None:
        self._handlers[kind] = handler

    def of(self, kind: str) -> list[Recorded]:
        return [c for c in self.calls if c.kind == kind]

    def _method(self, kind: str, response_type: type[Message]) -> Any:
        async def handle(request: Any, context: grpc.aio.ServicerContext) -> Message | bytes:
            metadata = {m.key: m.value for m in context.invocation_metadata() or ()}
            self.calls.append(Recorded(kind, request, metadata, context.peer()))
            self.changed.set()
            handler = self._handlers.get(kind)
            if handler is None:
                empty = response_type()
                empty.result.SetInParent()  # {"result": {}}
                return empty
            response = handler(request)
            if inspect.isawaitable(response):
                response = await response
            return response

        return handle

    async def start(self, port: int = 0) -> int:
        server = grpc.aio.server(options=self._options)
        handlers = {
            method: grpc.unary_unary_rpc_method_handler(
                self._method(kind, response),
                request_deserializer=request.FromString,
                response_serializer=_serialize,
            )
            for kind, (method, request, response) in METHODS.items()
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        address = f"127.0.0.1:{port}"
        if self._tls is None:
            self.port = server.add_insecure_port(address)
        else:
            cert, key = self._tls
            credentials = grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())])
            self.port = server.add_secure_port(address, credentials)
        await server.start()
        self._server = server
        return self.port

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            await server.stop(None)


async def sleep_then(seconds: float, response: Message) -> Message:
    await asyncio.sleep(seconds)
    return response
