"""The composition root: config -> storage -> engine -> actors -> Tornado routes.

`run(config)` starts the server process and blocks until SIGTERM/SIGINT, then shuts down
gracefully: stop accepting, disconnect clients with 3001, let in-flight API calls and log
writes finish (bounded by `shutdown_timeout`), close storage, return 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import math
import os
import resource
import signal
import ssl
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import tornado.httpclient
import tornado.httpserver
import tornado.web

from centripy.actors.cluster import ClusterLink, ClusterSessions
from centripy.actors.context import ConnContext
from centripy.actors.hub import Hub, SessionsAdapter
from centripy.consumers import Consumers, start_consumers
from centripy.engine.api import Executor
from centripy.engine.auth import TokenVerifier
from centripy.engine.config import Config
from centripy.engine.contracts import Broker, PresenceManager
from centripy.engine.jwks import JWKSCache
from centripy.engine.metrics import Metrics
from centripy.engine.node import VERSION, Node
from centripy.engine.sessions import Sessions
from centripy.gcpolicy import GcPolicy
from centripy.logs import LogBudget, setup_logging
from centripy.proxy import build_proxies
from centripy.reload import ConfigSource, Reloader
from centripy.storage.broker_postgres import PostgresBroker
from centripy.storage.factory import open_event_log
from centripy.storage.presence_memory import MemoryPresence
from centripy.storage.presence_postgres import PostgresPresence
from centripy.storage.writer import GroupCommitWriter
from centripy.transports.admin import admin_routes
from centripy.transports.api_http import InFlight, api_routes
from centripy.transports.api_lean import LeanHTTPServer, Limits
from centripy.transports.websocket import WebSocketHandler

log = logging.getLogger("centripy.server")
access_log = logging.getLogger("tornado.access")


class HealthHandler(tornado.web.RequestHandler):
    def get(self) -> None:
        self.set_header("Content-Type", "application/json")
        self.finish(b"{}")


class MetricsHandler(tornado.web.RequestHandler):
    def initialize(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def get(self) -> None:
        self.set_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        self.finish(self.metrics.render())


def hub_gauges(
    hub: Hub, link: ClusterLink | None = None, ctx: ConnContext | None = None
) -> Callable[[], list[tuple[str, str, tuple[tuple[str, str], ...], float]]]:
    """Centrifugo's node gauges, read at scrape time; with `ctx`, the connections refused
    by client_connection_limit/_rate_limit (Centrifugo's connection_limit_reached)."""

    def collect() -> list[tuple[str, str, tuple[tuple[str, str], ...], float]]:
        stats = hub.stats()
        out: list[tuple[str, str, tuple[tuple[str, str], ...], float]] = [
            ("centrifugo_node_num_clients", "gauge", (), stats.num_clients),
            ("centrifugo_node_num_users", "gauge", (), stats.num_users),
            ("centrifugo_node_num_channels", "gauge", (), stats.num_channels),
            ("centrifugo_node_num_subscriptions", "gauge", (), stats.num_subs),
            ("centrifugo_node_num_nodes", "gauge", (), len(link.registry) if link else 1),
        ]
        if ctx is not None:  # the name Centrifugo v5 exports, and the one its docs give
            refused = ctx.admission.refused
            out.append(("centrifugo_node_client_connection_limit", "counter", (), refused))
            out.append(("centrifugo_client_connection_limit_reached_total", "counter", (), refused))
        return out

    return collect


def consumer_counters(
    consumers: Consumers,
) -> Callable[[], list[tuple[str, str, tuple[tuple[str, str], ...], float]]]:
    """Per-consumer counters (applied, skipped, retries, errors, gave up) and Kafka lag
    (summed over the consumer's assigned partitions, and per topic and partition)."""

    def collect() -> list[tuple[str, str, tuple[tuple[str, str], ...], float]]:
        out: list[tuple[str, str, tuple[tuple[str, str], ...], float]] = []
        for name, stats in consumers.stats().items():
            labels = (("consumer", name), ("type", str(stats.get("type", ""))))
            for key in ("applied", "skipped", "retries", "errors", "gave_up"):
                value = stats.get(key)
                if isinstance(value, int | float):
                    out.append((f"centripy_consumer_{key}_total", "counter", labels, value))
            lag = stats.get("lag")
            if isinstance(lag, int | float):
                out.append(("centripy_consumer_lag", "gauge", labels, lag))
            per = stats.get("partition_lag")
            for where, value in per.items() if isinstance(per, dict) else ():
                topic, _, partition = str(where).rpartition("/")
                part = (*labels, ("topic", topic), ("partition", partition))
                out.append(("centripy_consumer_partition_lag", "gauge", part, value))
        return out

    return collect


def _log_request(handler: tornado.web.RequestHandler) -> None:
    """Access log: failures at warning level, everything else only at debug (an info line
    per API call costs ~3% of a publish)."""
    status = handler.get_status()
    if status >= 500:
        level = logging.ERROR
    elif status >= 400:
        level = logging.WARNING
    else:
        level = logging.DEBUG
    if access_log.isEnabledFor(level):
        request = handler.request
        millis = 1000.0 * request.request_time()
        # The path, not the URI: a query string may carry the API key or a token.
        summary = f"{request.method} {request.path} ({request.remote_ip})"
        access_log.log(level, "%d %s %.2fms", status, summary, millis)


async def _fetch(url: str) -> bytes:
    response = await tornado.httpclient.AsyncHTTPClient().fetch(url, request_timeout=10)
    return bytes(response.body)


@dataclass
class Services:
    """Everything `start()` built, for `stop()` and for tests that run in-process."""

    config: Config
    node: Node
    hub: Hub
    writer: GroupCommitWriter
    executor: Executor
    inflight: InFlight
    servers: list[LeanHTTPServer] = field(default_factory=list)
    ports: list[int] = field(default_factory=list)
    consumers: Consumers = field(default_factory=Consumers)
    link: ClusterLink | None = None
    ctx: ConnContext | None = None  # what connections read the config and verifier from


def build_engine(config: Config) -> tuple[Broker | None, PresenceManager]:
    """`engine`: memory (one node), redis (Redis PUB/SUB + presence), postgresql
    (LISTEN/NOTIFY + a presence table on the event log's database); `broker: nats` replaces
    the engine's PUB/SUB by NATS and keeps its presence (per node with engine memory)."""
    nats_broker = config.broker == "nats"
    broker, presence = _build_engine(config, with_broker=not nats_broker)
    if not nats_broker:
        return broker, presence
    if config.engine == "memory":
        log.warning("broker nats with engine memory: presence is per node")
    from centripy.storage.broker_nats import NatsBroker  # (back-end clients: imported when used)

    nats = NatsBroker(
        config.nats_url,
        prefix=config.nats_prefix,
        dial_timeout=config.nats_dial_timeout,
        write_timeout=config.nats_write_timeout,
    )
    return nats, presence


def _build_engine(config: Config, with_broker: bool) -> tuple[Broker | None, PresenceManager]:
    if config.engine == "redis":
        from centripy.storage.broker_redis import RedisBroker
        from centripy.storage.presence_redis import RedisPresence
        from centripy.storage.redis_conn import redis_options

        addresses, redis_kw = redis_options(config)  # plain, Sentinel or Cluster; TLS
        return (
            RedisBroker(addresses, **redis_kw) if with_broker else None,
            RedisPresence(addresses, **redis_kw),
        )
    if config.engine == "postgresql":
        prefix = config.postgresql_prefix
        broker = (
            PostgresBroker(
                config.database_url, channel_prefix=prefix, table=f"{prefix}_broker_messages"
            )
            if with_broker
            else None
        )
        return broker, PostgresPresence(config.database_url, table=f"{prefix}_presence")
    return None, MemoryPresence()


def build_verifier(config: Config) -> TokenVerifier:
    endpoints = config.token_jwks_public_endpoint or config.subscription_token_jwks_public_endpoint
    jwks = JWKSCache(_fetch) if endpoints else None
    return TokenVerifier(config, jwks=jwks)


def client_routes(config: Config, ctx: ConnContext) -> list[Any]:
    routes: list[Any] = []
    if not config.websocket_disable:
        routes.append((config.websocket_handler_prefix, WebSocketHandler, {"ctx": ctx}))
    from centripy.transports import emulation, uni  # each adds only the transports switched on

    routes.extend(emulation.routes(config, ctx))
    routes.extend(uni.routes(config, ctx))
    if config.sockjs:
        from centripy.transports.sockjs import sockjs_routes

        routes.extend(sockjs_routes(config, ctx))
    return routes


def internal_routes(config: Config, services: Services) -> list[Any]:
    routes: list[Any] = []
    if not config.api_disable:
        routes.extend(api_routes(services.executor, config, services.inflight))
    if config.health:
        routes.append((config.health_handler_prefix, HealthHandler))
    if config.prometheus:
        metrics = services.node.metrics
        routes.append((config.prometheus_handler_prefix, MetricsHandler, {"metrics": metrics}))
    return routes


@contextlib.contextmanager
def _pem_file(pem: str) -> Iterator[str]:
    fd, path = tempfile.mkstemp(suffix=".pem")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(pem)
        yield path
    finally:
        os.unlink(path)


def ssl_context(config: Config) -> ssl.SSLContext | None:
    """TLS for the HTTP server; mTLS when a client CA is configured."""
    if not config.tls:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    with contextlib.ExitStack() as stack:
        cert = config.tls_cert or stack.enter_context(_pem_file(config.tls_cert_pem))
        key = config.tls_key or stack.enter_context(_pem_file(config.tls_key_pem))
        ctx.load_cert_chain(cert, key)
    if config.tls_client_ca:
        ctx.load_verify_locations(cafile=config.tls_client_ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    elif config.tls_client_ca_pem:
        ctx.load_verify_locations(cadata=config.tls_client_ca_pem)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


Listener = tuple[list[Any], int, str, ssl.SSLContext | None]


def listeners(
    config: Config, external: list[Any], internal: list[Any], tls: ssl.SSLContext | None
) -> list[Listener]:
    """(routes, port, address, TLS) per port. The internal routes share the client port
    unless `internal_port` differs; `tls_external` keeps TLS off a separate internal port
    only (on a single port everything is served over TLS)."""
    separate = bool(config.internal_port) and str(config.internal_port) != str(config.port)
    if not separate:
        return [(external + internal, int(config.port), config.address, tls)]
    internal_tls = None if config.tls_external else tls
    return [
        (external, int(config.port), config.address, tls),
        (internal, int(config.internal_port), config.internal_address, internal_tls),
    ]


async def start(config: Config) -> Services:
    """Build and start every component; listen on the configured ports."""
    proxies = build_proxies(config)  # first: a proxy it cannot serve is a ConfigError
    event_log = open_event_log(config.database_url)
    await event_log.start()
    writer = GroupCommitWriter(event_log)
    await writer.start()
    broker, presence = build_engine(config)
    node = Node(config, event_log, writer.submit_many, presence)
    hub = Hub(node, broker)
    node.attach_fanout(hub)
    sessions: Sessions = SessionsAdapter(hub, node)
    link = None
    if broker is not None:
        node.attach_broker(broker)
        link = ClusterLink(node, hub, broker)
        await link.start()
        sessions = ClusterSessions(link)
    writer.metrics = node.metrics
    if proxies is not None:
        proxies.metrics = node.metrics
    node.metrics.set("centrifugo_node_build", 1, "Node build info.", version=VERSION)
    ctx = ConnContext(config, node, hub, build_verifier(config), proxies=proxies)
    if link is not None:
        ctx.forward_emulation = link.forward_emulation
        ctx.forward_command = link.forward
    node.metrics.collector(hub_gauges(hub, link, ctx))
    executor = Executor(node, sessions)
    services = Services(config, node, hub, writer, executor, InFlight(), link=link, ctx=ctx)
    # the consumers' commands are timed under protocol "consuming", as in Centrifugo
    services.consumers = await start_consumers(config, Executor(node, sessions, "consuming"))
    node.metrics.collector(consumer_counters(services.consumers))
    settings: dict[str, Any] = {
        "websocket_max_message_size": config.websocket_message_size_limit,
        "websocket_ping_interval": None,
        "log_function": _log_request,
    }
    external = client_routes(config, ctx)
    internal = internal_routes(config, services)
    # The admin rules go last (with admin_web_path they catch every path below the prefix),
    # on the internal port unless admin_external puts them on a separate client port.
    separate = len(listeners(config, [], [], None)) > 1
    (external if config.admin_external and separate else internal).extend(
        admin_routes(config, executor, services.inflight)
    )
    tls = ssl_context(config)
    limits = Limits(
        header_timeout=config.http_read_header_timeout,
        body_timeout=config.http_read_timeout,
        idle_timeout=config.http_idle_timeout,
        max_body=config.api_max_request_body_size,
    )
    for routes, port, address, use_tls in listeners(config, external, internal, tls):
        app = tornado.web.Application(routes, **settings)
        server = LeanHTTPServer(app, lean_api=True, ssl_options=use_tls, limits=limits)
        sockets = tornado.netutil.bind_sockets(
            int(port), address or None, backlog=4096, reuse_port=config.reuse_port
        )
        server.add_sockets(sockets)
        services.servers.append(server)
        services.ports.append(sockets[0].getsockname()[1])
    log.info("centripy node %s listening on %s", node.uid, services.ports)
    return services


async def stop(services: Services) -> None:
    """Graceful shutdown: stop accepting, stop the consumers (they finish or commit their
    batch), disconnect clients with 3001, let in-flight API calls and their log writes
    finish, flush the log writer, close storage. Each step gets what is left of
    shutdown_timeout (the caller gives up after it)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + services.config.shutdown_timeout

    def left(cap: float = math.inf) -> float:
        return max(0.0, min(cap, deadline - loop.time()))

    services.node.shutting_down = True
    for server in services.servers:
        server.stop()
    await services.consumers.stop(left(15.0))
    await services.hub.shutdown(left(5.0))
    if not await services.inflight.wait_idle(left()):
        log.warning("shutdown: %d API calls still in flight", services.inflight.count)
    await services.writer.close()
    if services.link is not None:
        await services.link.close()
    await services.node.event_log.close()
    await services.node.presence_manager.close()
    if services.ctx is not None and services.ctx.proxies is not None:
        await services.ctx.proxies.close()
    for server in services.servers:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.close_all_connections(), 1.0)


def tune_gc() -> None:
    """Hand CPython's cyclic garbage collector to centripy/gcpolicy.py, once, on the loop
    thread after start-up: start-up objects frozen, young passes automatic, the older
    generations collected by a check every second, preferably when the process is idle (a
    middle pass of a mass reconnect otherwise stalls the loop for 0.4-0.7 s). Without a
    running loop nobody would run the checks: fixed thresholds then."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        gc.collect()
        gc.freeze()
        gc.set_threshold(50_000, 20, 100)
        return
    GcPolicy().start(loop)


async def serve(config: Config, source: ConfigSource | None = None) -> int:
    loop = asyncio.get_running_loop()
    reloader = Reloader(source, _fetch)  # before listening: SIGHUP must never end the process
    loop.add_signal_handler(signal.SIGHUP, reloader)
    stopping = asyncio.Event()  # set before listening: an early SIGTERM is graceful too
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    services = await start(config)
    reloader.attach(services)
    tune_gc()
    await stopping.wait()
    log.info("shutting down")
    try:  # as Centrifugo: exit code 1 when the shutdown outlives shutdown_timeout
        await asyncio.wait_for(stop(services), config.shutdown_timeout)
    except TimeoutError:
        log.error("shutdown did not finish within %ss", config.shutdown_timeout)
        return 1
    if config.shutdown_termination_delay:
        await asyncio.sleep(config.shutdown_termination_delay)
    return 0


def run(config: Config, source: ConfigSource | None = None) -> int:
    """Entry point of `centripy serve`: blocks until SIGTERM/SIGINT, returns the exit code.
    SIGHUP reloads the config from `source` (centripy/reload.py)."""
    setup_logging(config)
    raise_open_files_limit()
    if config.pid_file:
        with open(config.pid_file, "w") as fh:
            fh.write(str(os.getpid()))
    try:
        return asyncio.run(serve(config, source))
    except OSError as exc:
        log.error("cannot start: %s", exc)
        return 1
    finally:
        if config.pid_file:  # removed on exit, as Centrifugo does
            with contextlib.suppress(OSError):
                os.unlink(config.pid_file)


def raise_open_files_limit() -> None:
    """Raise the soft RLIMIT_NOFILE to the hard limit (Go, and so Centrifugo, does this at
    start-up): every client connection is a file descriptor, and a soft limit of 1024 is
    common."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == hard or (hard != resource.RLIM_INFINITY and soft > hard):
        return
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (OSError, ValueError) as exc:
        log.warning("cannot raise the open files limit from %d to %d: %s", soft, target, exc)
        return
    log.debug("open files limit raised from %d to %d", soft, target)


__all__ = ["LogBudget", "Services", "run", "ssl_context", "start", "stop"]
