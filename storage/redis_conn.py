"""How centripy reaches Redis (engine `redis`): addresses, TLS, Sentinel and Cluster, shared by
the Redis broker and the Redis presence.

* `RedisTLS`: Centrifugo's `redis_tls*` keys (and `redis_sentinel_tls*`) as an SSLContext.
* `RedisTarget`: one Redis server as a pooled command client plus fresh connections for a
  PUB/SUB session. With a `MasterLocator` (Sentinel), every new socket goes to the master the
  sentinels name at that moment and is refused unless `ROLE` says master, so connections
  made after a failover reach the new master.
* `cluster_slots`: the masters of a Redis Cluster and the slots each serves (CLUSTER SLOTS).

Everything here runs on the node's event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
import tempfile
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.connection import (
    AbstractConnection,
    Connection,
    SSLConnection,
    UnixDomainSocketConnection,
    parse_url,
)
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from centripy.engine.config import Config, ConfigError

__all__ = [
    "REDIS_ERRORS",
    "ClusterMap",
    "MasterLocator",
    "RedisTLS",
    "RedisTarget",
    "cluster_slots",
    "connection_kwargs",
    "key_slot",
    "redis_options",
]

REDIS_ERRORS = (RedisError, OSError, asyncio.TimeoutError)


@dataclass(frozen=True, slots=True)
class RedisTLS:
    """Client TLS to Redis (Go's tls.Config as Centrifugo builds it): a client certificate
    (file or PEM), root CAs (file or PEM; the system's when neither), the name to verify
    (default: the host dialled), or no verification at all."""

    cert: str = ""
    key: str = ""
    cert_pem: str = ""
    key_pem: str = ""
    root_ca: str = ""
    root_ca_pem: str = ""
    server_name: str = ""
    insecure_skip_verify: bool = False

    def context(self) -> ssl.SSLContext:
        """A client SSLContext; raises ValueError naming what cannot be loaded."""
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        try:
            if self.root_ca or self.root_ca_pem:
                ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
                if self.root_ca:
                    ctx.load_verify_locations(cafile=self.root_ca)
                if self.root_ca_pem:
                    ctx.load_verify_locations(cadata=self.root_ca_pem)
            if bool(self.cert or self.cert_pem) != bool(self.key or self.key_pem):
                raise ValueError("a client certificate needs both a certificate and a key")
            if self.cert or self.cert_pem:
                _load_cert_chain(ctx, self)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"cannot load redis TLS material: {exc}") from exc
        if self.insecure_skip_verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        return ctx


def _load_cert_chain(ctx: ssl.SSLContext, tls: RedisTLS) -> None:
    """ssl only loads a certificate chain from files: PEM values go through a private
    temporary directory that is removed at once."""
    with tempfile.TemporaryDirectory(prefix="centripy-tls-") as tmp:
        cert, key = tls.cert, tls.key
        if tls.cert_pem:
            cert = os.path.join(tmp, "cert.pem")
            with open(cert, "w", opener=_private) as f:
                f.write(tls.cert_pem)
        if tls.key_pem:
            key = os.path.join(tmp, "key.pem")
            with open(key, "w", opener=_private) as f:
                f.write(tls.key_pem)
        ctx.load_cert_chain(cert, key)


def _private(path: str, flags: int) -> int:
    return os.open(path, flags, 0o600)


def connection_kwargs(
    address: str,
    *,
    db: int = 0,
    user: str = "",
    password: str = "",
    connect_timeout: float = 1.0,
    io_timeout: float = 4.0,
) -> dict[str, Any]:
    """redis-py connection kwargs for `address` ("host:port" or a redis://, rediss:// or
    unix:// URL; values in the URL win over the arguments). Raises ValueError for an
    unusable address."""
    url = address if "://" in address else f"redis://{address}"
    try:
        parsed: dict[str, Any] = dict(parse_url(url))
    except ValueError as exc:
        raise ValueError(f"invalid redis address {address!r}: {exc}") from exc
    if "host" not in parsed and "path" not in parsed:
        raise ValueError(f"invalid redis address {address!r}: no host")
    kwargs: dict[str, Any] = {
        "db": db,
        "username": user or None,
        "password": password or None,
        "socket_connect_timeout": connect_timeout,
        "socket_timeout": io_timeout,
        "protocol": 2,
    }
    kwargs.update(parsed)
    return kwargs


Locate = Callable[[], Awaitable[tuple[str, int]]]


class _Connection(Connection):
    """A TCP connection with our SSLContext (and server name) and, when `locate` is given,
    the address asked for before each new socket and a `ROLE` check after the handshake."""

    def __init__(
        self,
        *,
        tls: ssl.SSLContext | None = None,
        server_name: str = "",
        locate: Locate | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self._tls = tls
        self._server_name = server_name
        self._locate = locate

    def _connection_arguments(self) -> Mapping[str, Any]:
        args: dict[str, Any] = {"host": self.host, "port": self.port}
        if self._tls is not None:
            args["ssl"] = self._tls
            args["server_hostname"] = self._server_name or self.host
        return args

    async def _connect(self) -> None:
        if self._locate is not None:
            self.host, self.port = await self._locate()
        await super()._connect()  # type: ignore[no-untyped-call]

    async def on_connect(self) -> None:
        await super().on_connect()
        if self._locate is None:
            return
        await self.send_command("ROLE")
        role = await self.read_response()
        if not isinstance(role, list) or not role or role[0] != b"master":
            label = f"{self.host}:{self.port}"
            raise RedisConnectionError(f"{label} is not a master (sentinel failover under way?)")


@dataclass(frozen=True, slots=True)
class SentinelOptions:
    """`redis_sentinel_*`: how to ask the sentinels for the current master."""

    master_name: str
    user: str = ""
    password: str = ""
    tls: RedisTLS | None = None


class MasterLocator:
    """Asks the sentinels (in turn, starting with the last one that answered) for the
    address of master `master_name`; remembers the last answer in `current` and falls back
    to it while no sentinel can be reached."""

    def __init__(
        self,
        addresses: Sequence[str],
        options: SentinelOptions,
        *,
        connect_timeout: float,
        io_timeout: float,
    ) -> None:
        if not options.master_name:
            raise ValueError("redis_sentinel_master_name is required with redis_sentinel_address")
        self._targets = [
            RedisTarget(
                connection_kwargs(
                    address,
                    user=options.user,
                    password=options.password,
                    connect_timeout=connect_timeout,
                    io_timeout=io_timeout,
                ),
                options.tls,
            )
            for address in addresses
        ]
        self._name = options.master_name
        self._first = 0
        self.current: tuple[str, int] | None = None

    async def __call__(self) -> tuple[str, int]:
        errors: list[str] = []
        n = len(self._targets)
        for step in range(n):
            index = (self._first + step) % n
            target = self._targets[index]
            conn = target.new_connection("")
            try:
                await conn.connect()  # type: ignore[no-untyped-call]
                await conn.send_command("SENTINEL", "get-master-addr-by-name", self._name)
                reply = await conn.read_response()
            except REDIS_ERRORS as exc:
                errors.append(f"{target.label}: {exc}")
                continue
            finally:
                await conn.disconnect(nowait=True)
            if isinstance(reply, list) and len(reply) == 2:
                self._first = index
                self.current = (reply[0].decode(), int(reply[1]))
                return self.current
            errors.append(f"{target.label}: does not know master {self._name!r}")
        if self.current is not None and not any("does not know" in e for e in errors):
            return self.current  # no sentinel reachable: the last master (ROLE still checked)
        raise RedisConnectionError(f"no sentinel named the master: {'; '.join(errors)}")


class RedisTarget:
    """One Redis server (or, with `locate`, whichever the sentinels name master): a pooled
    command client (one retry on a fresh connection, since pooled connections are stale
    after a restart or a failover) and fresh connections for PUB/SUB sessions."""

    def __init__(
        self,
        kwargs: dict[str, Any],
        tls: RedisTLS | None = None,
        *,
        locate: Locate | None = None,
    ) -> None:
        options = {k: v for k, v in kwargs.items() if k != "connection_class"}
        cls = kwargs.get("connection_class")
        self._unix = cls is not None and issubclass(cls, UnixDomainSocketConnection)
        if cls is not None and issubclass(cls, SSLConnection) and tls is None:
            tls = RedisTLS()  # rediss:// without redis_tls: TLS with the system's roots
        for key in [k for k in options if k.startswith("ssl")]:
            options.pop(key)  # rediss:// query options: TLS is configured by RedisTLS
        if self._unix and (tls is not None or locate is not None):
            raise ValueError("a unix socket address takes neither TLS nor Sentinel")
        if not self._unix:
            options["tls"] = tls.context() if tls is not None else None
            options["server_name"] = tls.server_name if tls is not None else ""
            options["locate"] = locate
        self._options = options
        self._where = str(
            options.get("path") or f"{options.get('host')}:{options.get('port', 6379)}"
        )
        self._locate = locate
        self.client = self._make_client()

    @property
    def label(self) -> str:
        """For messages: "host:port", or the master the sentinels named last."""
        if self._locate is None:
            return self._where
        current = getattr(self._locate, "current", None)
        return f"sentinel master {current[0]}:{current[1]}" if current else "sentinel master"

    def _connection_class(self) -> type[AbstractConnection]:
        return UnixDomainSocketConnection if self._unix else _Connection

    def _make_client(self) -> Redis:
        pool = ConnectionPool(
            connection_class=self._connection_class(),
            retry=Retry(NoBackoff(), 1),
            **self._options,
        )
        return Redis(connection_pool=pool)

    def new_connection(self, client_name: str) -> AbstractConnection:
        """An unconnected connection that never reconnects by itself."""
        conn: AbstractConnection = self._connection_class()(
            **self._options,
            retry=Retry(NoBackoff(), 0),
            client_name=client_name or None,
        )
        return conn

    async def aclose(self) -> None:
        await self.client.aclose()


# -- cluster ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ClusterMap:
    """Masters of a Redis Cluster ("host:port") and, per hash slot, the index of its master."""

    masters: tuple[str, ...]
    slots: tuple[int, ...]

    def index(self, name: bytes | str) -> int:
        key = name.encode() if isinstance(name, str) else name
        return self.slots[key_slot(key)]


async def cluster_slots(seeds: Sequence[RedisTarget]) -> ClusterMap:
    """CLUSTER SLOTS from the first seed that answers; raises ConnectionError when none does
    or the slots are not all served."""
    errors: list[str] = []
    for seed in seeds:
        try:
            reply = await seed.client.execute_command("CLUSTER", "SLOTS")  # type: ignore[no-untyped-call]
        except REDIS_ERRORS as exc:
            errors.append(f"{seed.label}: {exc}")
            continue
        masters: list[str] = []
        slots = [-1] * REDIS_CLUSTER_HASH_SLOTS
        for entry in reply:
            start, end, master = int(entry[0]), int(entry[1]), entry[2]
            host = master[0].decode() if isinstance(master[0], bytes) else str(master[0])
            address = f"{host or seed.label.rsplit(':', 1)[0]}:{int(master[1])}"
            if address not in masters:
                masters.append(address)
            slots[start : end + 1] = [masters.index(address)] * (end - start + 1)
        if -1 in slots:
            errors.append(f"{seed.label}: slot {slots.index(-1)} is not served")
            continue
        return ClusterMap(tuple(masters), tuple(slots))
    raise RedisConnectionError(f"no redis cluster node answered CLUSTER SLOTS: {'; '.join(errors)}")


async def close_quietly(targets: Sequence[RedisTarget]) -> None:
    for target in targets:
        with contextlib.suppress(*REDIS_ERRORS):
            await target.aclose()


# -- from the configuration -------------------------------------------------------------------


def _tls_of(c: Config) -> RedisTLS | None:
    if not c.redis_tls:
        return None
    return RedisTLS(
        cert=c.redis_tls_cert,
        key=c.redis_tls_key,
        cert_pem=c.redis_tls_cert_pem,
        key_pem=c.redis_tls_key_pem,
        root_ca=c.redis_tls_root_ca,
        root_ca_pem=c.redis_tls_root_ca_pem,
        server_name=c.redis_tls_server_name,
        insecure_skip_verify=c.redis_tls_insecure_skip_verify,
    )


def _sentinel_tls_of(c: Config) -> RedisTLS | None:
    if not c.redis_sentinel_tls:
        return None
    return RedisTLS(
        cert=c.redis_sentinel_tls_cert,
        key=c.redis_sentinel_tls_key,
        cert_pem=c.redis_sentinel_tls_cert_pem,
        key_pem=c.redis_sentinel_tls_key_pem,
        root_ca=c.redis_sentinel_tls_root_ca,
        root_ca_pem=c.redis_sentinel_tls_root_ca_pem,
        server_name=c.redis_sentinel_tls_server_name,
        insecure_skip_verify=c.redis_sentinel_tls_insecure_skip_verify,
    )


def redis_options(config: Config) -> tuple[tuple[str, ...], dict[str, Any]]:
    """(addresses, keyword arguments) for RedisBroker and RedisPresence from the
    `redis_*` keys: `redis_sentinel_address` wins over `redis_cluster_address`, which wins
    over `redis_address`. A cluster item is its seeds comma-separated, as in Centrifugo
    (several items, i.e. several clusters sharded, are refused). Raises ConfigError for
    that and for TLS material that cannot be loaded."""
    kwargs: dict[str, Any] = {
        "prefix": config.redis_prefix,
        "db": config.redis_db,
        "user": config.redis_user,
        "password": config.redis_password,
        "connect_timeout": config.redis_connect_timeout,
        "io_timeout": config.redis_io_timeout,
        "tls": _tls_of(config),
    }
    for key, tls in (
        ("redis_tls", _tls_of(config)),
        ("redis_sentinel_tls", _sentinel_tls_of(config)),
    ):
        if tls is not None:
            try:
                tls.context()
            except ValueError as exc:
                raise ConfigError(key, str(exc)) from exc
    if config.redis_sentinel_address:
        sentinels = tuple(a for item in config.redis_sentinel_address for a in _seeds(item))
        kwargs["sentinel"] = SentinelOptions(
            master_name=config.redis_sentinel_master_name,
            user=config.redis_sentinel_user,
            password=config.redis_sentinel_password,
            tls=_sentinel_tls_of(config),
        )
        return sentinels, kwargs
    if config.redis_cluster_address:
        if len(config.redis_cluster_address) > 1:
            raise ConfigError(
                "redis_cluster_address",
                "sharding over several Redis Clusters is not supported: give one item "
                '(its seed nodes comma-separated, e.g. "host1:7000,host2:7000")',
            )
        kwargs["cluster"] = True
        return _seeds(config.redis_cluster_address[0]), kwargs
    return config.redis_address, kwargs


def _seeds(item: str) -> tuple[str, ...]:
    """Centrifugo's comma-separated seed addresses within one item."""
    return tuple(a.strip() for a in item.split(",") if a.strip())
