"""The scenarios of run_all.py (issues 7 and 20): what each one runs, against which targets,
at full and at --quick size, and which table it goes to. Data only (standard library), so that
run_all.py, report.py and plot.py share it.

Kinds (`Scenario.kind`): "fanout" and "connections" run fanout.py or connections.py (from the
bench venv) against a target that run_all.py starts; "tool" runs another bench script (from the
project's .venv) that starts its own server and prints JSON lines.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

PEER_TARGETS = ("websockets", "socketio", "socketio-gc-off")
ALL_TARGETS = ("centripy", *PEER_TARGETS)
QUICK_TARGETS = ("centripy", "websockets")  # --quick's default: the issue-20 comparisons
PG = "PostgreSQL"
REDIS_SERVICE = "Redis"
SERVICE_PORTS = {PG: 5432, REDIS_SERVICE: 6379}
LOAD_TOOLS = ("fanout.py", "connections.py")
# Sections, in the order of the tables: "fanout", "transport", "channels", "connections",
# "publish", "storm" (see report.py).


@dataclass(frozen=True)
class Scenario:
    key: str
    title: str
    tool: str  # "fanout.py", "connections.py", or another bench script run as a tool
    full: tuple[str, ...]
    quick: tuple[str, ...]
    targets: tuple[str, ...] = ALL_TARGETS
    nodes: int = 1
    engine: str = "memory"
    proto: str = ""  # fanout.py --proto; "" = the target's own (centrifugo or socketio)
    emulation: bool = False  # centripy also serves http_stream and sse
    config: tuple[tuple[str, Any], ...] = ()  # more centripy config keys
    reference: str = ""  # the scenario whose µs/delivery (same target) this one is compared to
    offered: int = 0  # publications/s offered (s6), for the table
    services: tuple[str, ...] = ()  # needed besides the engine's: PG, REDIS_SERVICE
    requires: tuple[str, ...] = ()  # a tool's options that must appear in its --help
    in_quick: bool = True  # part of --quick's default scenario list
    section: str = "fanout"  # the table it goes to: see SECTIONS

    @property
    def kind(self) -> str:
        """ "fanout", "connections" (a load tool against a started target) or "tool" (a bench
        script that starts its own server)."""
        if self.tool in LOAD_TOOLS:
            return self.tool.removesuffix(".py")
        return "tool"

    def needed_services(self) -> tuple[str, ...]:
        by_engine = {"redis": (REDIS_SERVICE, PG), "postgresql": (PG,)}.get(self.engine, ())
        return tuple(dict.fromkeys((*by_engine, *self.services)))


EMULATION_SHAPE = ("-n", "500", "-m", "1000", "-r", "0")
# Quick sizes keep >= 12,000 deliveries: /proc counts server CPU in 10 ms ticks.
EMULATION_QUICK = ("-n", "200", "-m", "300", "-r", "0")


def transport(key: str, what: str, proto: str, **extra: Any) -> Scenario:
    """An s1-* scenario: 500 x 1,000 as fast as acks allow, centripy only, over `proto`, on a
    server that also serves the HTTP emulation transports (the same config as s1-ws)."""
    return Scenario(
        key,
        f"500 subscribers x 1,000 msgs over {what}",
        "fanout.py",
        EMULATION_SHAPE,
        EMULATION_QUICK,
        ("centripy",),
        proto=proto,
        emulation=True,
        reference="" if key == "s1-ws" else "s1-ws",
        section="transport",
        **extra,
    )


# s6: history on the SQLite default for every channel (top-level keys, no namespace).
S6_HISTORY = (("history_size", 100), ("history_ttl", "300s"))


def many_channels(key: str, rate: int) -> Scenario:
    """An s6 scenario: 2,500 channels x 4 subscribers, `rate` publications/s for about 15 s,
    64 requests in flight (quick: 1,000 x 4 for about 5 s)."""

    def shape(subscribers: int, seconds: int) -> tuple[str, ...]:
        channels = subscribers // 4
        return (
            *("-n", str(subscribers), "-c", str(channels), "--inflight", "64"),
            *("-r", str(rate), "-m", str(seconds * rate)),
        )

    return Scenario(
        key,
        f"2,500 channels x 4 subscribers with history, {rate:,} publications/s offered",
        "fanout.py",
        shape(10_000, 15),
        shape(4_000, 5),
        ("centripy", "websockets"),
        config=S6_HISTORY,
        offered=rate,
        section="channels",
    )


def publish_path(backend: str, mode: str) -> Scenario:
    """A p-* scenario: bench_publish.py, one back end and mode, history on."""
    key = f"p-{'pg' if backend == 'postgres' else backend}-{mode}"
    args: tuple[str, ...] = ("--backends", backend, "--modes", mode, "--namespaces", "hist")
    args += ("--repeat", "1")
    if mode == "single":
        args += ("--callers", "64")
        quick = ("--count", "10000")
    else:
        quick = ("--batch-count", "30000")
    what = "POST /api/publish, 64 callers" if mode == "single" else "POST /api/batch of 100"
    return Scenario(
        key,
        f"publish path: {what}, history on {backend}",
        "bench_publish.py",
        args,
        (*args, *quick),
        ("centripy",),
        services=(PG,) if backend == "postgres" else (),
        section="publish",
    )


def storm(backend: str, variant: str) -> Scenario:
    """An r-* scenario: bench_recovery.py --storm, N clients reconnecting at once after a
    server restart (19,000; quick 2,000), in 4 client processes."""
    key = f"r-{'pg' if backend == 'postgres' else backend}-{variant}"

    def args(clients: int) -> tuple[str, ...]:
        return (
            *("--storm", "--clients", str(clients), "--variants", variant),
            *("--backends", backend, "--procs", "4", "--repeat", "1"),
        )

    where = "one channel" if variant == "one" else "a channel each"
    return Scenario(
        key,
        f"reconnect storm after a restart: 19,000 clients on {where}, recovery on {backend}",
        "bench_recovery.py",
        args(19_000),
        args(2_000),
        ("centripy",),
        services=(PG,) if backend == "postgres" else (),
        requires=("--storm",),
        section="storm",
    )


def idle_connections(
    key: str, title: str, full: tuple[str, ...], quick: tuple[str, ...], in_quick: bool = True
) -> Scenario:
    """A connections.py scenario (s4, s7-idle): centripy and the websockets loop."""
    return Scenario(
        key,
        title,
        "connections.py",
        full,
        quick,
        targets=("centripy", "websockets"),
        section="connections",
        in_quick=in_quick,
    )


AFAP_1K = ("-n", "1000", "-m", "2000", "-r", "0")
AFAP_1K_QUICK = ("-n", "200", "-m", "200", "-r", "0")
SCENARIOS = (
    Scenario(
        "s1",
        "1k subscribers x 2,000 msgs, as fast as acks allow",
        "fanout.py",
        AFAP_1K,
        AFAP_1K_QUICK,
    ),
    Scenario(
        "s2",
        "10k subscribers x 100 msgs, as fast as possible",
        "fanout.py",
        ("-n", "10000", "-m", "100", "-r", "0"),
        ("-n", "1000", "-m", "50", "-r", "0"),
    ),
    Scenario(
        "s3",
        "1k subscribers x 2,000 msgs at 10 msg/s (10k deliveries/s offered)",
        "fanout.py",
        ("-n", "1000", "-m", "2000", "-r", "10"),
        ("-n", "200", "-m", "60", "-r", "10"),
    ),
    idle_connections(
        "s4",
        "19,000 idle connections, then one broadcast",
        ("-n", "19000", "--procs", "4"),
        ("-n", "2000", "--procs", "2"),
    ),
    idle_connections(
        "s7-idle",
        "1,000 connections idle for 60 s (pings and pongs only), then one broadcast",
        ("-n", "1000", "--procs", "1", "--hold", "60"),
        ("-n", "1000", "--procs", "1", "--hold", "30"),
        in_quick=False,
    ),
    Scenario(
        "s5-1node",
        "scale-out: 1 node, engine redis, PostgreSQL log",
        "fanout.py",
        AFAP_1K,
        AFAP_1K_QUICK,
        ("centripy",),
        1,
        "redis",
        in_quick=False,
    ),
    Scenario(
        "s5-2nodes",
        "scale-out: 2 nodes, engine redis, PostgreSQL log",
        "fanout.py",
        AFAP_1K,
        AFAP_1K_QUICK,
        ("centripy",),
        2,
        "redis",
        in_quick=False,
    ),
    Scenario(
        "s5-pg-1node",
        "scale-out: 1 node, engine postgresql (LISTEN/NOTIFY), PostgreSQL log",
        "fanout.py",
        AFAP_1K,
        AFAP_1K_QUICK,
        ("centripy",),
        1,
        "postgresql",
        in_quick=False,
    ),
    Scenario(
        "s5-pg-2nodes",
        "scale-out: 2 nodes, engine postgresql (LISTEN/NOTIFY), PostgreSQL log",
        "fanout.py",
        AFAP_1K,
        AFAP_1K_QUICK,
        ("centripy",),
        2,
        "postgresql",
        in_quick=False,
    ),
    transport("s1-ws", "WebSocket, JSON (the reference of the other s1-*)", "centrifugo"),
    transport("s1-sse", "SSE emulation (/connection/sse + /emulation)", "centrifugo-sse"),
    transport(
        "s1-http_stream",
        "HTTP-streaming emulation (/connection/http_stream + /emulation)",
        "centrifugo-http-stream",
    ),
    transport("s1-protobuf", "WebSocket, Protobuf protocol", "centrifugo-protobuf"),
    transport(
        "s1-uni_ws",
        "unidirectional WebSocket (uni_websocket)",
        "centrifugo-uni-ws",
        config=(("uni_websocket", True),),
    ),
    many_channels("s6-1k", 1_000),
    many_channels("s6-2k", 2_000),
    many_channels("s6-5k", 5_000),
    publish_path("sqlite", "single"),
    publish_path("sqlite", "batch"),
    publish_path("postgres", "single"),
    publish_path("postgres", "batch"),
    storm("sqlite", "one"),
    storm("sqlite", "each"),
    storm("postgres", "one"),
    storm("postgres", "each"),
)
BY_KEY = {s.key: s for s in SCENARIOS}
