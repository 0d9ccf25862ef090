"""A real `centripy serve` process for integration tests.

`ServerProcess` writes a config dict to a JSON file, starts the server on a free port of
127.0.0.1 with its working directory in a per-server folder (so the SQLite event log is per
test), waits until the port accepts TCP connections, and captures stdout/stderr to files there
for diagnostics. Everything here is synchronous and is called from the test's thread (in async
tests: the event loop thread; each call blocks for at most its timeout).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

STARTUP_TIMEOUT = 15.0
PORT_RACE_RETRIES = 2
LOG_TAIL_CHARS = 6000

# urllib honours the *_proxy environment variables; requests to the local server must not.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class ServerError(AssertionError):
    """The server did not start, did not stop, or answered the API with a non-200 status."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def port_accepts(host: str, port: int, timeout: float = 0.2) -> bool:
    """True if a TCP connection to host:port succeeds now."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def server_command() -> list[str]:
    """The command that runs the CLI: the venv's `centripy` script next to this interpreter,
    or the module's `main` through this interpreter when the script is not installed."""
    script = Path(sys.executable).with_name("centripy")
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [
        sys.executable,
        "-c",
        "import sys; from centripy.cli import main; sys.exit(main())",
    ]


def tail(path: Path, chars: int = LOG_TAIL_CHARS) -> str:
    """The last `chars` characters of a log file ('' if it does not exist)."""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return ""
    return text[-chars:]


class ServerProcess:
    """One centripy server process; see the module docstring."""

    def __init__(
        self,
        config: Mapping[str, Any],
        workdir: Path,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        env: Mapping[str, str] | None = None,
        startup_timeout: float = STARTUP_TIMEOUT,
    ) -> None:
        self.config: dict[str, Any] = dict(config)
        self.workdir = workdir
        self.host = host
        self.port = port if port is not None else free_port(host)
        self.startup_timeout = startup_timeout
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.config_path = workdir / "config.json"
        self.stdout_path = workdir / "server.stdout.log"
        self.stderr_path = workdir / "server.stderr.log"
        self._proc: subprocess.Popen[bytes] | None = None

    # --- addresses -----------------------------------------------------------------------

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://{self.host}:{self.port}/connection/websocket"

    @property
    def api_url(self) -> str:
        """Base URL of the server API, as `cent.Client` wants it."""
        return f"{self.http_url}/api"

    @property
    def api_key(self) -> str:
        return str(self.config.get("api_key", ""))

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # --- lifecycle -----------------------------------------------------------------------

    def start(self) -> ServerProcess:
        """Start the process and wait until its port accepts connections (at most
        `startup_timeout` seconds). Raises ServerError with the captured stderr if the
        process exits first or the port never opens."""
        if self.running:
            raise ServerError(f"server on port {self.port} is already running")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps(self.config, indent=2))
        command = [
            *server_command(),
            "serve",
            "--config",
            str(self.config_path),
            "--port",
            str(self.port),
            "--address",
            self.host,
        ]
        with self.stdout_path.open("ab") as out, self.stderr_path.open("ab") as err:
            self._proc = subprocess.Popen(
                command,
                cwd=self.workdir,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
            )
        self._wait_ready(self._proc)
        return self

    def _wait_ready(self, proc: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while not port_accepts(self.host, self.port):
            try:
                # Doubles as the pause between attempts and the check that it is alive.
                code = proc.wait(timeout=0.05)
            except subprocess.TimeoutExpired:
                code = None
            if code is not None:
                raise ServerError(
                    f"centripy exited with code {code} before listening on port "
                    f"{self.port}\n{self.diagnostics()}"
                )
            if time.monotonic() > deadline:
                self.kill()
                raise ServerError(
                    f"centripy did not listen on port {self.port} within "
                    f"{self.startup_timeout} s\n{self.diagnostics()}"
                )

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        """Send `sig` and wait for the exit; returns the exit code (negative: killed by a
        signal). If the process outlives `timeout`, it is killed and ServerError raised."""
        proc = self._proc
        if proc is None:
            raise ServerError("server was never started")
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise ServerError(
                    f"centripy did not exit within {timeout} s of signal {sig}\n"
                    f"{self.diagnostics()}"
                ) from None
        return proc.returncode

    def kill(self) -> int:
        """SIGKILL the process (no graceful shutdown) and return its exit code."""
        proc = self._proc
        if proc is None:
            raise ServerError("server was never started")
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        return proc.returncode

    def restart(self, sig: int = signal.SIGTERM) -> ServerProcess:
        """Stop (if running) and start again: same config, working directory and port."""
        if self.running:
            self.stop(sig)
        return self.start()

    # --- server API ----------------------------------------------------------------------

    def api_raw(
        self,
        method: str,
        body: bytes,
        headers: Mapping[str, str] | None = None,
        timeout: float = 10.0,
    ) -> tuple[int, bytes]:
        """POST `body` to /api/<method> (`method` "" posts to /api) with the given headers
        (default: the X-API-Key of the config); returns (status, body) whatever the status."""
        url = f"{self.api_url}/{method}" if method else self.api_url
        if headers is None:
            headers = {"X-API-Key": self.api_key, "Content-Type": "application/json"}
        request = urllib.request.Request(url, data=body, headers=dict(headers), method="POST")
        try:
            with _OPENER.open(request, timeout=timeout) as response:
                return int(response.status), response.read()
        except urllib.error.HTTPError as error:
            with contextlib.closing(error):
                return int(error.code), error.read()

    def api(self, method: str, payload: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Call a server API method and return the decoded body (`{"result": ...}` or
        `{"error": ...}`; batch: `{"replies": [...]}`). A non-200 status raises ServerError."""
        status, body = self.api_raw(method, json.dumps(payload or {}).encode())
        if status != 200:
            raise ServerError(f"POST /api/{method} -> HTTP {status}: {body[:500]!r}")
        decoded = json.loads(body)
        if not isinstance(decoded, dict):
            raise ServerError(f"POST /api/{method} returned a non-object: {body[:500]!r}")
        return decoded

    def api_result(self, method: str, payload: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Like `api` but returns the `result` object and raises ServerError on `error`."""
        decoded = self.api(method, payload)
        if "error" in decoded:
            raise ServerError(f"POST /api/{method} -> error {decoded['error']}")
        result = decoded.get("result", {})
        if not isinstance(result, dict):
            raise ServerError(f"POST /api/{method}: result is not an object: {decoded}")
        return result

    async def api_async(
        self, method: str, payload: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """`api` in a worker thread, for async tests (the caller's loop keeps running)."""
        return await asyncio.to_thread(self.api, method, payload)

    # --- diagnostics ---------------------------------------------------------------------

    def diagnostics(self) -> str:
        """The tails of the captured stdout and stderr, for failure messages."""
        return (
            f"--- centripy :{self.port} stdout ({self.stdout_path}) ---\n"
            f"{tail(self.stdout_path)}\n"
            f"--- centripy :{self.port} stderr ({self.stderr_path}) ---\n"
            f"{tail(self.stderr_path)}"
        )

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<ServerProcess {self.host}:{self.port} {state} in {self.workdir}>"


class ServerFactory:
    """Starts servers with a config merged (top-level keys) over `base_config`, each in its own
    folder under `root`; `stop_all` stops every one of them. Used by the `server_factory`
    fixture, from the test's thread."""

    def __init__(self, root: Path, base_config: Mapping[str, Any]) -> None:
        self.root = root
        self.base_config = dict(base_config)
        self.servers: list[ServerProcess] = []

    def __call__(
        self,
        config: Mapping[str, Any] | None = None,
        *,
        start: bool = True,
        env: Mapping[str, str] | None = None,
    ) -> ServerProcess:
        merged = {**self.base_config, **(config or {})}
        workdir = self.root / f"server{len(self.servers)}"
        server = ServerProcess(merged, workdir, env=env)
        self.servers.append(server)
        if not start:
            return server
        for _ in range(PORT_RACE_RETRIES):
            try:
                return server.start()
            except ServerError as error:
                # The free port was taken by someone else between the pick and the bind.
                if "already in use" not in str(error):
                    raise
                server.port = free_port(server.host)
        return server.start()

    def stop_all(self) -> list[str]:
        """Stop every server still running; returns the problems met (empty if none)."""
        problems: list[str] = []
        for server in self.servers:
            if not server.running:
                continue
            try:
                server.stop()
            except ServerError as error:
                problems.append(str(error))
        return problems
