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
from dataclasses import dataclass
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


# -- Redis TLS, Sentinel and Cluster (task K) -------------------------------------------------


def _redis_cli(*args: str, timeout: float = 10.0) -> str:
    binary = shutil.which("redis-cli")
    if binary is None:
        unavailable("redis-cli binary not found")
    done = subprocess.run(
        [binary, *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"redis-cli {args} failed ({done.returncode}): {done.stderr}")
    return done.stdout


@dataclass(frozen=True)
class ThrowawayPKI:
    """A throwaway CA and, signed by it, a server certificate for 127.0.0.1 / localhost
    and a client certificate (files in `root`, PEM)."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    @classmethod
    def create(cls, root: Path) -> ThrowawayPKI:
        import datetime
        import ipaddress

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        root.mkdir(parents=True, exist_ok=True)
        now = datetime.datetime.now(datetime.UTC)

        def name(cn: str) -> x509.Name:
            return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

        def write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
            path.write_bytes(
                key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            )

        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca = (
            x509.CertificateBuilder()
            .subject_name(name("centripy test CA"))
            .issuer_name(name("centripy test CA"))
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA256())
        )
        (root / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))

        def leaf(cn: str, usage: x509.ObjectIdentifier, stem: str) -> None:
            key = ec.generate_private_key(ec.SECP256R1())
            builder = (
                x509.CertificateBuilder()
                .subject_name(name(cn))
                .issuer_name(ca.subject)
                .public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(hours=1))
                .not_valid_after(now + datetime.timedelta(days=2))
                .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            )
            if usage == ExtendedKeyUsageOID.SERVER_AUTH:
                builder = builder.add_extension(
                    x509.SubjectAlternativeName(
                        [x509.DNSName("localhost"),
                         x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                    ),
                    critical=False,
                )  # fmt: skip
            cert = builder.sign(ca_key, hashes.SHA256())
            (root / f"{stem}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
            write_key(key, root / f"{stem}-key.pem")

        leaf("redis.test", ExtendedKeyUsageOID.SERVER_AUTH, "server")
        leaf("centripy", ExtendedKeyUsageOID.CLIENT_AUTH, "client")
        return cls(
            root / "ca.pem", root / "server.pem", root / "server-key.pem",
            root / "client.pem", root / "client-key.pem",
        )  # fmt: skip


class PrivateTLSRedis(PrivateRedis):
    """A PrivateRedis that listens on TLS only (`port` is the TLS port), with the server
    certificate of `pki`; `auth_clients`: "yes" demands a client certificate."""

    def __init__(self, root: Path, pki: ThrowawayPKI, auth_clients: str = "yes") -> None:
        super().__init__(root)
        self._args[self._args.index("--port") + 1] = "0"
        self._args += [
            "--tls-port", str(self.port), "--tls-cert-file", str(pki.server_cert),
            "--tls-key-file", str(pki.server_key), "--tls-ca-cert-file", str(pki.ca),
            "--tls-auth-clients", auth_clients,
        ]  # fmt: skip


class PrivateSentinelSet:
    """One master, one replica and three sentinels (quorum 2, `down-after` 1 s) of our own,
    monitoring master `name`. `kill_master()` SIGKILLs whichever server is master now and
    waits until the sentinels name the other one; `start_all()` restarts what was killed
    (the sentinels make it a replica). With `tls`, the sentinels listen on TLS only (server
    certificate of the PKI, no client certificate asked); `sentinels=1` gives quorum 1."""

    def __init__(
        self,
        root: Path,
        name: str = "centripy",
        *,
        sentinels: int = 3,
        tls: ThrowawayPKI | None = None,
    ) -> None:
        self.name = name
        self._tls = tls
        self._quorum = 2 if sentinels >= 3 else 1
        self.servers = [PrivateRedis(root / "a"), PrivateRedis(root / "b")]
        replica = self.servers[1]
        replica._args += ["--replicaof", "127.0.0.1", str(self.servers[0].port)]
        used = {server.port for server in self.servers}
        while len(used) < 2:  # a port free a moment ago may be handed out twice
            replica.port = free_port()
            replica._args[replica._args.index("--port") + 1] = str(replica.port)
            used = {server.port for server in self.servers}
        self.sentinel_ports = []
        while len(self.sentinel_ports) < sentinels:
            port = free_port()
            if port not in used:
                used.add(port)
                self.sentinel_ports.append(port)
        self._sentinels: list[subprocess.Popen[bytes]] = []
        self._root = root

    @property
    def sentinel_addresses(self) -> list[str]:
        return [f"127.0.0.1:{p}" for p in self.sentinel_ports]

    def start(self) -> None:
        for server in self.servers:
            server.start()
        binary = shutil.which("redis-server")
        assert binary is not None
        master = self.servers[0].port
        for i, port in enumerate(self.sentinel_ports):
            conf = self._root / f"sentinel-{i}.conf"
            listen = f"port {port}\n"
            if self._tls is not None:
                pki = self._tls
                listen = (
                    f"port 0\ntls-port {port}\ntls-cert-file {pki.server_cert}\n"
                    f"tls-key-file {pki.server_key}\ntls-ca-cert-file {pki.ca}\n"
                    "tls-auth-clients no\ntls-replication no\n"
                )
            conf.write_text(
                f"{listen}bind 127.0.0.1\ndir {self._root}\n"
                f"sentinel monitor {self.name} 127.0.0.1 {master} {self._quorum}\n"
                f"sentinel down-after-milliseconds {self.name} 1000\n"
                f"sentinel failover-timeout {self.name} 4000\n"
                f"sentinel parallel-syncs {self.name} 1\n"
            )
            log = (self._root / f"sentinel-{i}.log").open("ab")
            self._sentinels.append(
                subprocess.Popen([binary, str(conf), "--sentinel"], stdout=log, stderr=log)
            )
            log.close()
        for port in self.sentinel_ports:
            _wait_port(port, True, START_TIMEOUT, "private sentinel")
        eventually_sync(lambda: self._replica_synced(), START_TIMEOUT, "replica in sync")
        eventually_sync(
            lambda: all(self._sentinel_sees_replica(p) for p in self.sentinel_ports),
            START_TIMEOUT, "sentinels know the replica and each other",
        )  # fmt: skip

    def _replica_synced(self) -> bool:
        info = _redis_cli("-p", str(self.servers[1].port), "info", "replication")
        return "master_link_status:up" in info

    def _sentinel_sees_replica(self, port: int) -> bool:
        out = self._sentinel_cli(port, "sentinel", "master", self.name)
        fields = out.split()
        stats = dict(zip(fields[::2], fields[1::2], strict=False))
        others = str(len(self.sentinel_ports) - 1)
        return stats.get("num-slaves") == "1" and stats.get("num-other-sentinels") == others

    def _sentinel_cli(self, port: int, *args: str) -> str:
        tls = ["--tls", "--cacert", str(self._tls.ca)] if self._tls is not None else []
        return _redis_cli(*tls, "-p", str(port), *args)

    def master_port(self) -> int:
        out = self._sentinel_cli(
            self.sentinel_ports[0], "sentinel", "get-master-addr-by-name", self.name
        ).split()
        return int(out[1])

    def kill_master(self, failover_timeout: float = 30.0) -> int:
        """SIGKILL the master; returns the new master's port once the sentinels agree."""
        old = self.master_port()
        next(s for s in self.servers if s.port == old).kill()
        eventually_sync(
            lambda: all(self._master_of(p) not in (old, None) for p in self.sentinel_ports),
            failover_timeout, "sentinel failover",
        )  # fmt: skip
        return self.master_port()

    def failover(self, timeout: float = 30.0) -> int:
        """SENTINEL FAILOVER (the master is demoted, not killed); returns the new master's
        port once every sentinel names it and it is ready."""
        old = self.master_port()
        self._sentinel_cli(self.sentinel_ports[0], "sentinel", "failover", self.name)
        eventually_sync(
            lambda: all(self._master_of(p) not in (old, None) for p in self.sentinel_ports),
            timeout, "sentinel failover",
        )  # fmt: skip
        return self.master_port()

    def _master_of(self, port: int) -> int | None:
        try:
            out = self._sentinel_cli(port, "sentinel", "get-master-addr-by-name", self.name)
        except RuntimeError:
            return None
        parts = out.split()
        return int(parts[1]) if len(parts) == 2 else None

    def start_all(self) -> None:
        for server in self.servers:
            server.start()

    def kill_sentinels(self) -> None:
        """SIGKILL every sentinel (the Redis servers stay up)."""
        for proc in self._sentinels:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        for port in self.sentinel_ports:
            _wait_port(port, False, 10, "private sentinel")

    def close(self) -> None:
        for proc in self._sentinels:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        for server in self.servers:
            server.close()


class PrivateRedisCluster:
    """A Redis Cluster of `masters` masters with `replicas` replicas each, of our own on
    free ports (node timeout 2 s: a dead master's replica takes over a few seconds later)."""

    def __init__(self, root: Path, masters: int = 3, replicas: int = 0) -> None:
        self._replicas = replicas
        self.servers = [PrivateRedis(root / f"n{i}") for i in range(masters * (1 + replicas))]
        used: set[int] = set()
        for server in self.servers:
            while server.port in used:  # a port free a moment ago may be handed out twice
                server.port = free_port()
                server._args[server._args.index("--port") + 1] = str(server.port)
            used.add(server.port)
        for server in self.servers:
            bus = free_port()
            while bus in used:  # a port free a moment ago may be handed out twice
                bus = free_port()
            used.add(bus)
            server._args += [
                "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", "2000", "--cluster-port", str(bus),
                "--cluster-replica-validity-factor", "0",
            ]  # fmt: skip

    @property
    def addresses(self) -> list[str]:
        return [server.address for server in self.servers]

    def start(self) -> None:
        for server in self.servers:
            server.start()
        _redis_cli("--cluster", "create", *self.addresses, "--cluster-replicas",
                   str(self._replicas), "--cluster-yes", timeout=60)  # fmt: skip
        self.wait_ok(self.servers)
        eventually_sync(self._replicas_in_sync, START_TIMEOUT, "cluster replicas in sync")

    def _replicas_in_sync(self) -> bool:
        for server in self.servers:
            info = _redis_cli("-p", str(server.port), "info", "replication")
            if "role:slave" in info and "master_link_status:up" not in info:
                return False
        return True

    def wait_ok(self, servers: list[PrivateRedis], timeout: float = START_TIMEOUT) -> None:
        """Until every one of `servers` says cluster_state:ok (all slots served)."""
        eventually_sync(
            lambda: all(
                "cluster_state:ok" in _redis_cli("-p", str(s.port), "cluster", "info")
                for s in servers
            ),
            timeout, "redis cluster state ok",
        )  # fmt: skip

    def kill(self, address: str) -> None:
        """SIGKILL the server at `address` and wait until the others serve every slot again
        (its replica promoted)."""
        victim = next(s for s in self.servers if s.address == address)
        victim.kill()
        others = [s for s in self.servers if s is not victim]

        def promoted() -> bool:
            slots = _redis_cli("-p", str(others[0].port), "cluster", "slots")
            return f"\n{victim.port}\n" not in f"\n{slots}"

        eventually_sync(promoted, 60, f"a replica of {address} promoted")
        self.wait_ok(others, timeout=60)

    def close(self) -> None:
        for server in self.servers:
            server.close()


__all__ = [
    "PrivatePostgres",
    "PrivateRedis",
    "PrivateRedisCluster",
    "PrivateSentinelSet",
    "PrivateTLSRedis",
    "ThrowawayPKI",
]
