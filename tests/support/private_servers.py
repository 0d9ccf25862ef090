"""Private PostgreSQL and Redis servers that fault tests may break.

Never the machine's shared services (other tests use them): each server here runs on a free
port of 127.0.0.1 from a temporary directory, and can be stopped abruptly and started again on
the SAME port and data directory, so clients see an outage and then the same server back.

- `PrivatePostgres()`: `initdb` + `pg_ctl` (PostgreSQL 15 binaries) in a temp dir of its own
  (removed by `close()`); trust auth, database `postgres`; `stop()` is `pg_ctl stop -m
  immediate` (no shutdown checkpoint, clients see their connections die), `start()` starts
  it again. initdb refuses to run as root: as root
  the cluster belongs to the `postgres` user (run through `runuser`).
- `PrivateRedis(root)`: `redis-server` without persistence; `kill()` is SIGKILL, `start()`
  starts a new process on the same port.

Methods block the calling thread (at most their timeout): call them from a worker thread
(`asyncio.to_thread`) in async tests whose loop must keep running.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

from tests.support.server import free_port, port_accepts
from tests.support.services import unavailable
from tests.support.wait import eventually_sync

PG_BIN = Path("/usr/lib/postgresql/15/bin")
START_TIMEOUT = 30.0


def _wait_port(port: int, up: bool, timeout: float, what: str) -> None:
    state = "accepting" if up else "closed"
    eventually_sync(
        lambda: port_accepts("127.0.0.1", port) == up, timeout, f"{what} :{port} {state}"
    )


class PrivatePostgres:
    """A PostgreSQL cluster of our own in `root/pgdata` (`root`: a fresh temp dir),
    listening on 127.0.0.1:`port`."""

    def __init__(self) -> None:
        initdb, pg_ctl = PG_BIN / "initdb", PG_BIN / "pg_ctl"
        if not initdb.is_file() or not pg_ctl.is_file():
            unavailable(f"PostgreSQL binaries not found in {PG_BIN}")
        self._pg_ctl = str(pg_ctl)
        self._user: str | None = "postgres" if os.geteuid() == 0 else None
        # A directory of its own, directly in the temp dir: pytest's tmp_path is private
        # to root (0700), which the `postgres` user could not enter.
        self.root = Path(tempfile.mkdtemp(prefix="centripy-pg-"))
        self.datadir = self.root / "pgdata"
        self.logfile = self.root / "postgres.log"
        self.port = free_port()
        if self._user is not None:
            shutil.chown(self.root, self._user)
        root = self.root
        self._run(
            [str(initdb), "-D", str(self.datadir), "-A", "trust", "-U", "postgres", "--no-sync"],
            timeout=120,
        )
        # Same port for every start; sockets in our own directory (not /var/run).
        with (self.datadir / "postgresql.conf").open("a") as conf:
            conf.write(
                f"\nport = {self.port}\nlisten_addresses = '127.0.0.1'\n"
                f"unix_socket_directories = '{root}'\nfsync = off\n"
                "max_connections = 200\nshared_buffers = 32MB\n"
            )

    @property
    def url(self) -> str:
        """The SQLAlchemy URL of database `postgres` (what centripy's `database_url` takes)."""
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/postgres"

    @property
    def dsn(self) -> str:
        """The same for asyncpg."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, args: list[str], timeout: float) -> None:
        if self._user is not None:
            args = ["runuser", "-u", self._user, "--", *args]
        done = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{args} failed ({done.returncode}):\n{done.stdout}{done.stderr}")

    def start(self) -> None:
        """Start the cluster (same port, same data) and wait until it accepts connections."""
        self._run(
            [self._pg_ctl, "start", "-D", str(self.datadir), "-l", str(self.logfile), "-w",
             "-t", str(int(START_TIMEOUT))],
            timeout=START_TIMEOUT + 10,
        )  # fmt: skip
        _wait_port(self.port, True, START_TIMEOUT, "private postgres")

    def stop(self) -> None:
        """`pg_ctl stop -m immediate`: every backend dies at once, no checkpoint."""
        self._run(
            [self._pg_ctl, "stop", "-D", str(self.datadir), "-m", "immediate", "-w"], timeout=30
        )
        _wait_port(self.port, False, 10, "private postgres")

    def close(self) -> None:
        """Stop (if running) for good; the data directory goes with the temp dir."""
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            self._run([self._pg_ctl, "stop", "-D", str(self.datadir), "-m", "immediate"], 30)
        shutil.rmtree(self.root, ignore_errors=True)

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.logfile.read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return ""


class PrivateRedis:
    """A `redis-server` of our own on 127.0.0.1:`port` (no persistence)."""

    def __init__(self, root: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            unavailable("redis-server binary not found")
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self._args = [
            binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", str(root),
        ]  # fmt: skip
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        """What centripy's `redis_address` takes."""
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        """Start redis-server on the same port and wait until it accepts connections."""
        if self._proc is not None and self._proc.poll() is None:
            return
        log = (self.root / "redis.log").open("ab")
        self._proc = subprocess.Popen(self._args, cwd=self.root, stdout=log, stderr=log)
        log.close()
        _wait_port(self.port, True, START_TIMEOUT, "private redis")

    def kill(self) -> None:
        """SIGKILL: connections are cut without a goodbye; the data is gone."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        _wait_port(self.port, False, 10, "private redis")

    def close(self) -> None:
        self.kill()


__all__ = ["PrivatePostgres", "PrivateRedis"]
