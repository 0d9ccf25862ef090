"""Fixtures for integration tests: real centripy processes, JWTs, and the centrifuge-js driver.

- `server_factory(config=None) -> ServerProcess`: starts a server with `config` merged over
  `BASE_CONFIG`; every server is stopped (SIGTERM) at teardown and its log tails are printed
  (pytest shows them for failed tests).
- `make_token(user, *, exp_in=None, secret=TEST_SECRET, **claims) -> str`: an HS256 JWT.
- `js_client(scenario, timeout=30) -> list[dict]`: runs tests/js/client.mjs on a scenario and
  returns its events; `js_client.start(scenario)` runs it in the background (async).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import subprocess
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

import jwt
import pytest

from tests.support.server import ServerFactory
from tests.support.services import unavailable
from tests.support.wait import eventually

TEST_API_KEY = "test-api-key"
TEST_SECRET = "test-secret"
BASE_CONFIG: dict[str, Any] = {
    "api_key": TEST_API_KEY,
    "token_hmac_secret_key": TEST_SECRET,
    "health": True,
    "log_level": "info",
}

JS_DIR = Path(__file__).resolve().parent.parent / "js"
JS_CLIENT = JS_DIR / "client.mjs"


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[ServerFactory]:
    factory = ServerFactory(tmp_path, BASE_CONFIG)
    yield factory
    problems = factory.stop_all()
    for server in factory.servers:
        print(server.diagnostics())
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


class TokenMaker(Protocol):
    def __call__(
        self, user: str, *, exp_in: float | None = None, secret: str = ..., **claims: Any
    ) -> str: ...


def make_jwt(
    user: str, *, exp_in: float | None = None, secret: str = TEST_SECRET, **claims: Any
) -> str:
    """HS256 token with `sub=user`, `iat=now`, `exp=now+exp_in` (if given) and `claims`."""
    now = int(time.time())
    payload: dict[str, Any] = {"sub": user, "iat": now}
    if exp_in is not None:
        payload["exp"] = int(now + exp_in)
    payload.update(claims)
    with warnings.catch_warnings():
        # The test secrets are short on purpose (the brief's "test-secret").
        warnings.simplefilter("ignore", jwt.warnings.InsecureKeyLengthWarning)
        return jwt.encode(payload, secret, algorithm="HS256")


@pytest.fixture
def make_token() -> TokenMaker:
    return make_jwt


def _require_node() -> str:
    node = shutil.which("node")
    if node is None:
        unavailable("node is not installed (centrifuge-js tests need Node.js 20)")
    if not (JS_DIR / "node_modules" / "centrifuge").is_dir():
        unavailable("tests/js/node_modules is missing: run ./scripts/setup.sh")
    return node


def _parse_events(stdout: str) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    for line in stdout.split("\n"):
        if line.strip():
            events.append(json.loads(line))
    return events


class JsRun:
    """A client.mjs process running in the background; its methods run on the test's loop."""

    def __init__(self, proc: asyncio.subprocess.Process, scenario: Mapping[str, Any]) -> None:
        self.proc = proc
        self.scenario = scenario
        self.events: list[dict[str, Any]] = []
        self._changed = asyncio.Event()
        self._reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        async for line in self.proc.stdout:
            if line.strip():
                self.events.append(json.loads(line))
                self._changed.set()
        self._changed.set()

    def _first(self, predicate: Callable[[dict[str, Any]], bool]) -> tuple[dict[str, Any]] | None:
        """`(event,)` for the first event so far matching `predicate`, else None;
        AssertionError once client.mjs has ended without one."""
        for event in self.events:
            if predicate(event):
                return (event,)
        if self._reader.done():
            raise AssertionError(f"client.mjs ended without the event: {self.events}")
        return None

    async def wait_for(
        self, predicate: Callable[[dict[str, Any]], bool], within: float = 10.0
    ) -> dict[str, Any]:
        """The first event (past or future) matching `predicate`; AssertionError after
        `within` seconds."""
        (event,) = await eventually(
            lambda: self._first(predicate), within, "a client.mjs event", changed=self._changed
        )
        return event

    async def finish(self, within: float = 30.0, check: bool = True) -> list[dict[str, Any]]:
        """Wait (at most `within` seconds) for the process to end; with `check`, fail unless
        it ended with "done"."""
        try:
            async with asyncio.timeout(within):
                await self._reader
                code = await self.proc.wait()
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
            raise AssertionError(f"client.mjs timed out after {within} s: {self.events}") from None
        if check:
            _check_outcome(code, self.events, await self._stderr())
        return self.events

    async def _stderr(self) -> str:
        assert self.proc.stderr is not None
        return (await self.proc.stderr.read()).decode(errors="replace")


def _check_outcome(code: int, events: list[dict[str, Any]], stderr: str) -> None:
    if code != 0 or not events or events[-1].get("event") != "done":
        lines = "\n".join(json.dumps(event) for event in events)
        raise AssertionError(f"client.mjs exited with {code}\nevents:\n{lines}\nstderr:\n{stderr}")


class JsClient:
    """Runs tests/js/client.mjs (see its header for the scenario format)."""

    def __init__(self, node: str) -> None:
        self.node = node
        self.runs: list[JsRun] = []

    def __call__(
        self, scenario: Mapping[str, Any], timeout: float = 30.0, check: bool = True
    ) -> list[dict[str, Any]]:
        """Run a scenario to its end (blocking the caller's thread) and return its events."""
        try:
            completed = subprocess.run(
                [self.node, str(JS_CLIENT)],
                input=json.dumps(scenario),
                capture_output=True,
                text=True,
                timeout=timeout,
                cwd=JS_DIR,
            )
        except subprocess.TimeoutExpired as error:
            out = error.stdout.decode() if isinstance(error.stdout, bytes) else error.stdout
            raise AssertionError(f"client.mjs timed out after {timeout} s:\n{out}") from None
        events = _parse_events(completed.stdout)
        if check:
            _check_outcome(completed.returncode, events, completed.stderr)
        return events

    async def start(self, scenario: Mapping[str, Any]) -> JsRun:
        """Start a scenario in the background; use the returned JsRun to follow it."""
        proc = await asyncio.create_subprocess_exec(
            self.node,
            str(JS_CLIENT),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=JS_DIR,
        )
        assert proc.stdin is not None
        proc.stdin.write(json.dumps(scenario).encode())
        await proc.stdin.drain()
        proc.stdin.close()
        run = JsRun(proc, scenario)
        self.runs.append(run)
        return run

    def kill_all(self) -> None:
        """Kill background runs still going (a test that failed half-way)."""
        for run in self.runs:
            if run.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    run.proc.kill()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests driving centrifuge-js get the `node` marker (select with `-m node`)."""
    for item in items:
        if "js_client" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.node)


@pytest.fixture
def js_client() -> Iterator[JsClient]:
    client = JsClient(_require_node())
    yield client
    client.kill_all()
