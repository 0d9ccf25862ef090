"""Prometheus metrics under Centrifugo v5's names, one registry per node.

Names, types and labels follow what Centrifugo v5 exports (namespace `centrifugo`,
subsystems `node`, `client`, `transport`, `api`, `proxy`), so existing dashboards work;
centripy's own metrics are under `centripy_`.

Every instrument is a plain in-process value (an attribute add on the loop, no lock):
prometheus_client's own Summary and Histogram measured 2.3 us and 5.3 us (the API's
summary + histogram pair) per observation here (a lock, a label lookup, a bucket scan),
against 0.4 us and 0.8 us for these. So:

- counters are rendered by this module in the text format exactly as Go's client writes
  them (`# TYPE x counter`, samples named `x`): prometheus_client's `generate_latest`
  would name a counter's TYPE line `x_total`, which does not match Centrifugo's counter
  names (`..._count`, or no suffix);
- gauges, histograms (`x_bucket`/`x_sum`/`x_count`) and summaries (`x_sum`/`x_count`, no
  quantiles) are yielded as prometheus_client `Metric` families with exact sample names
  by a collector on this node's `CollectorRegistry`, beside the standard process, Python
  GC and platform collectors, and rendered by `generate_latest` (`_created` series are
  switched off, process-wide, at import: Go exports none).

All methods run on the event loop. On the per-delivery path callers count per frame
batch (`TransportCounts.sent`), never through a labelled lookup.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Iterable, Iterator, Sequence

from prometheus_client import (
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.core import (
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

disable_created_metrics()  # type: ignore[no-untyped-call]

Labels = tuple[tuple[str, str], ...]
Sample = tuple[Labels, float]
CollectorFunc = Callable[[], Iterable[tuple[str, str, Labels, float]]]

# Go's prometheus.DefBuckets (prometheus_client's default has more).
GO_DEFAULT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
PING_PONG_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
LOG_APPEND_BUCKETS = (
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
)  # fmt: skip
PUB_SUB_LAG_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
BATCH_SIZE_BUCKETS = (1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0)

PUSH = "push_publication"  # frame_type of channel pushes (publications, joins, leaves)
OTHER = "reply"  # frame_type of everything else a connection writes (replies, other pushes)


class Cell:
    """One counter or gauge value: `cell.value += n`."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0


class _Family:
    __slots__ = ("cells", "help", "kind", "name")

    def __init__(self, name: str, kind: str, help_text: str) -> None:
        self.name = name
        self.kind = kind  # "counter" | "gauge"
        self.help = help_text
        self.cells: dict[Labels, Cell] = {}


class Observer:
    """One child of a histogram (`bounds` set) or of a summary (no bounds)."""

    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # per bucket (not cumulative); last: +Inf
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float, times: int = 1) -> None:
        """`times` observations of `value` (a batch of equal ones counts in one go)."""
        self.count += times
        self.sum += value * times
        if self.bounds:
            self.counts[bisect.bisect_left(self.bounds, value)] += times


class _Timing:
    """A histogram or summary family: children per label values."""

    __slots__ = ("bounds", "children", "help", "labelnames", "name")

    def __init__(
        self, name: str, help_text: str, labelnames: tuple[str, ...], bounds: tuple[float, ...]
    ) -> None:
        self.name = name
        self.help = help_text
        self.labelnames = labelnames
        self.bounds = bounds  # () = summary
        self.children: dict[tuple[str, ...], Observer] = {}

    def labels(self, *values: str) -> Observer:
        child = self.children.get(values)
        if child is None:
            if len(values) != len(self.labelnames):
                raise ValueError(f"{self.name}: labels {self.labelnames}, got {values}")
            child = self.children[values] = Observer(self.bounds)
        return child

    def family(self) -> Metric:
        if not self.bounds:
            summary = SummaryMetricFamily(self.name, self.help, labels=self.labelnames)
            for values, child in sorted(self.children.items()):
                summary.add_metric(values, child.count, child.sum)
            return summary
        histogram = HistogramMetricFamily(self.name, self.help, labels=self.labelnames)
        for values, child in sorted(self.children.items()):
            buckets: list[tuple[str, float]] = []
            total = 0
            for bound, n in zip((*self.bounds, math.inf), child.counts, strict=True):
                total += n
                buckets.append((_go_float(bound), total))
            histogram.add_metric(values, buckets, child.sum)
        return histogram


class TransportCounts:
    """Messages and bytes written and read over one transport (all its connections on this
    node). `sent` is called once per transport write, a frame batch: a few attribute adds,
    no lock, no label lookup."""

    __slots__ = ("push_bytes", "pushes", "received", "received_bytes", "replies", "reply_bytes")

    def __init__(self) -> None:
        self.pushes = 0
        self.push_bytes = 0
        self.replies = 0
        self.reply_bytes = 0
        self.received: dict[str, int] = {}
        self.received_bytes: dict[str, int] = {}

    def sent(self, messages: Sequence[bytes], pushes: bool) -> None:
        """A write of `messages`; `pushes`: a batch of channel pushes (labelled by its first
        message, see `PUSH`)."""
        if len(messages) == 1:
            n, size = 1, len(messages[0])
        else:
            n, size = len(messages), sum(map(len, messages))
        if pushes:
            self.pushes += n
            self.push_bytes += size
        else:
            self.replies += n
            self.reply_bytes += size


class Metrics:
    """The metrics of one node (tests run several nodes in one process)."""

    def __init__(self) -> None:
        self._families: dict[str, _Family] = {}
        self._timings: list[_Timing] = []
        self._collectors: list[CollectorFunc] = []
        self._transports: dict[str, TransportCounts] = {}
        self._scraped: list[tuple[str, str, Labels, float]] = []
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_Families(self))
        ProcessCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        timing = self.timing
        self._api_summary = timing(
            "centrifugo_api_command_duration_seconds", "Duration of API per command.",
            ("protocol", "method"),
        )  # fmt: skip
        self._api_histogram = timing(
            "centrifugo_api_command_duration_seconds_histogram",
            "Histogram of duration of API per command.", ("protocol", "method"),
            GO_DEFAULT_BUCKETS,
        )  # fmt: skip
        self._client_summary = timing(
            "centrifugo_client_command_duration_seconds", "Client command duration summary.",
            ("method",),
        )  # fmt: skip
        self._ping_pong = timing(
            "centrifugo_client_ping_pong_duration_seconds", "Ping/Pong duration in seconds",
            ("transport",), PING_PONG_BUCKETS,
        )  # fmt: skip
        self._proxy_summary = timing(
            "centrifugo_proxy_duration_seconds", "Duration of proxy call.", ("protocol", "type")
        )
        self._proxy_histogram = timing(
            "centrifugo_proxy_duration_seconds_histogram", "Duration of proxy call.",
            ("protocol", "type"), GO_DEFAULT_BUCKETS,
        )  # fmt: skip
        self._granular_summary = timing(
            "centrifugo_granular_proxy_duration_seconds", "Duration of granular proxy call.",
            ("type", "name"),
        )  # fmt: skip
        self._granular_histogram = timing(
            "centrifugo_granular_proxy_duration_seconds_histogram",
            "Duration of granular proxy call.", ("type", "name"), GO_DEFAULT_BUCKETS,
        )  # fmt: skip
        self._log_append = timing(
            "centripy_log_append_duration_seconds",
            "Event-log group commit: seconds per batch transaction.",
            (),
            LOG_APPEND_BUCKETS,
        ).labels()
        self._log_batch = timing(
            "centripy_log_batch_size", "Event-log group commit: requests per batch.", (),
            BATCH_SIZE_BUCKETS,
        ).labels()  # fmt: skip
        self._pub_sub_lag = timing(
            "centrifugo_node_pub_sub_lag_seconds", "Pub sub lag in seconds", (),
            PUB_SUB_LAG_BUCKETS,
        ).labels()  # fmt: skip
        self._api_children: dict[tuple[str, str], tuple[Observer, Observer]] = {}

    # -- generic counters, gauges and timings (exact names) ---------------------------------

    def _family(self, name: str, kind: str, help_text: str) -> _Family:
        family = self._families.get(name)
        if family is None:
            family = self._families[name] = _Family(name, kind, help_text)
        elif help_text and not family.help:
            family.help = help_text
        return family

    def cell(self, name: str, /, help_text: str = "", kind: str = "counter", **labels: str) -> Cell:
        """The cell of `name` with `labels`, for a hot path to add to directly."""
        cells = self._family(name, kind, help_text).cells
        key = tuple(sorted(labels.items()))
        found = cells.get(key)
        if found is None:
            found = cells[key] = Cell()
        return found

    def inc(self, name: str, /, help_text: str = "", amount: float = 1.0, **labels: str) -> None:
        """Add `amount` to the counter `name` with `labels`."""
        self.cell(name, help_text, "counter", **labels).value += amount

    def set(self, name: str, value: float, /, help_text: str = "", **labels: str) -> None:
        self.cell(name, help_text, "gauge", **labels).value = value

    def timing(
        self, name: str, help_text: str, labelnames: tuple[str, ...], bounds: Sequence[float] = ()
    ) -> _Timing:
        """A histogram (with bucket `bounds`) or a summary (without) family."""
        family = _Timing(name, help_text, labelnames, tuple(sorted(bounds)))
        self._timings.append(family)
        return family

    def collector(self, func: CollectorFunc) -> None:
        """Register a callback yielding (name, kind, labels, value) at every render."""
        self._collectors.append(func)

    def value(self, name: str, /, **labels: str) -> float:
        family = self._families.get(name)
        if family is None:
            return 0.0
        found = family.cells.get(tuple(sorted(labels.items())))
        return 0.0 if found is None else found.value

    # -- Centrifugo's instruments ------------------------------------------------------------

    def api_command(self, protocol: str, method: str, seconds: float, times: int = 1) -> None:
        """A server API command (`protocol` http or grpc, `method` as Centrifugo names it);
        `times` commands that took `seconds` each (the publishes of a parallel batch)."""
        key = (protocol, method)
        children = self._api_children.get(key)
        if children is None:
            children = self._api_children[key] = (
                self._api_summary.labels(protocol, method),
                self._api_histogram.labels(protocol, method),
            )
        children[0].observe(seconds, times)
        children[1].observe(seconds, times)

    def client_command(self, method: str, seconds: float) -> None:
        """A client protocol command handled (`method`: connect, subscribe, rpc, ...; ""
        is a pong, which Centrifugo does not time)."""
        if method:
            self._client_summary.labels(method).observe(seconds)

    def received(self, transport: str, methods: Sequence[str], size: int) -> None:
        """A client frame of `size` bytes carrying commands `methods` (once per frame; the
        size is shared out evenly; "" is a pong: frame_type client_pong)."""
        counts = self.transport(transport)
        share = size // len(methods) if methods else 0
        for method in methods:
            method = method or "client_pong"
            counts.received[method] = counts.received.get(method, 0) + 1
            counts.received_bytes[method] = counts.received_bytes.get(method, 0) + share

    def reply_error(self, method: str, code: int) -> None:
        self.inc(
            "centrifugo_client_num_reply_errors", "Number of errors in replies sent to clients.",
            method=method, code=str(code),
        )  # fmt: skip

    def server_unsubscribe(self, code: int) -> None:
        self.inc(
            "centrifugo_client_num_server_unsubscribes",
            "Number of server initiated unsubscribes.", code=str(code),
        )  # fmt: skip

    def server_disconnect(self, code: int) -> None:
        self.inc(
            "centrifugo_client_num_server_disconnects",
            "Number of server initiated disconnects.", code=str(code),
        )  # fmt: skip

    def recover(self, recovered: bool) -> None:
        self.inc(
            "centrifugo_client_recover", "Count of recover operations.",
            recovered="yes" if recovered else "no",
        )  # fmt: skip

    def ping_pong(self, transport: str, seconds: float) -> None:
        self._ping_pong.labels(transport).observe(seconds)

    def transport(self, name: str) -> TransportCounts:
        """The shared counts of transport `name` (a transport takes it once, at its start)."""
        counts = self._transports.get(name)
        if counts is None:
            counts = self._transports[name] = TransportCounts()
        return counts

    def observe_proxy(
        self, protocol: str, kind: str, name: str, seconds: float, error: bool
    ) -> None:
        """One event-proxy call: `protocol` http or grpc, `kind` connect, refresh,
        subscribe, publish, rpc or sub_refresh; `name` the granular proxy's name, "" when
        granular proxy mode is off (Centrifugo then reports the non-granular metrics)."""
        if name:
            self._granular_summary.labels(kind, name).observe(seconds)
            self._granular_histogram.labels(kind, name).observe(seconds)
            if error:
                self.inc(
                    "centrifugo_granular_proxy_errors", "Granular proxy call error count.",
                    type=kind, name=name,
                )  # fmt: skip
            return
        self._proxy_summary.labels(protocol, kind).observe(seconds)
        self._proxy_histogram.labels(protocol, kind).observe(seconds)
        if error:
            self.inc(
                "centrifugo_proxy_errors", "Proxy call error count.", protocol=protocol, type=kind
            )

    def received_from_broker(self, kind: str) -> Cell:
        """The counter of messages of `kind` (publication, join, leave, control) received
        from the other nodes through the broker, for the receiver to add to."""
        return self.cell(
            "centrifugo_node_messages_received_count", "Number of messages received from broker.",
            type=kind,
        )  # fmt: skip

    def pub_sub_lag(self, seconds: float) -> None:
        """A publication from another node, `seconds` after its commit (absolute value, as
        Centrifugo: the clocks of two machines may disagree)."""
        self._pub_sub_lag.observe(abs(seconds))

    def action(self, action: str, times: int = 1) -> None:
        self.inc(
            "centrifugo_node_action_count", "Number of various actions called.", times,
            action=action,
        )  # fmt: skip

    def log_commit(self, rows: int, seconds: float, failed: bool) -> None:
        """One group-commit batch of the event log (`rows` requests, one transaction)."""
        self._log_batch.observe(rows)
        self._log_append.observe(seconds)
        if failed:
            self.log_error("append")

    def log_error(self, op: str) -> None:
        self.inc("centripy_log_errors_total", "Event-log errors.", op=op)

    def broker_error(self, op: str) -> None:
        self.inc("centripy_broker_errors_total", "Broker errors (node to node).", op=op)

    # -- rendering ---------------------------------------------------------------------------

    def render(self) -> bytes:
        """The text exposition format (version 0.0.4) of everything."""
        scraped = [item for collect in self._collectors for item in collect()]
        self._scraped = [item for item in scraped if item[1] != "counter"]
        counters = [item for item in scraped if item[1] == "counter"]
        try:
            text = _render_counters(self._counter_families(counters))
            return text.encode() + generate_latest(self.registry)
        finally:
            self._scraped = []

    def _counter_families(
        self, extra: list[tuple[str, str, Labels, float]]
    ) -> dict[str, tuple[str, list[Sample]]]:
        out: dict[str, tuple[str, list[Sample]]] = {}
        for family in self._families.values():
            if family.kind == "counter":
                samples = [(labels, cell.value) for labels, cell in family.cells.items()]
                out[family.name] = (family.help, samples)
        for name, _, labels, value in extra:
            out.setdefault(name, ("", []))[1].append((labels, value))
        self._transport_families(out)
        return out

    def _transport_families(self, out: dict[str, tuple[str, list[Sample]]]) -> None:
        sent: list[Sample] = []
        sent_size: list[Sample] = []
        received: list[Sample] = []
        received_size: list[Sample] = []
        for name, counts in self._transports.items():
            for frame_type, n, size in (
                (PUSH, counts.pushes, counts.push_bytes),
                (OTHER, counts.replies, counts.reply_bytes),
            ):
                if n:
                    labels = _transport_labels(name, frame_type)
                    sent.append((labels, n))
                    sent_size.append((labels, size))
            for frame_type, n in list(counts.received.items()):
                labels = _transport_labels(name, frame_type)
                received.append((labels, n))
                received_size.append((labels, counts.received_bytes.get(frame_type, 0)))
        base = "centrifugo_transport_messages_"
        what = "messages {} client connections over specific transport"
        bytes_note = " (uncompressed, without framing overhead)."
        out[base + "sent"] = ("Number of " + what.format("sent to") + ".", sent)
        out[base + "sent_size"] = (
            "Size in bytes of " + what.format("sent to") + bytes_note, sent_size
        )  # fmt: skip
        out[base + "received"] = ("Number of " + what.format("received from") + ".", received)
        out[base + "received_size"] = (
            "Size in bytes of " + what.format("received from") + bytes_note, received_size
        )  # fmt: skip


def _transport_labels(transport: str, frame_type: str) -> Labels:
    return (("channel_namespace", ""), ("frame_type", frame_type), ("transport", transport))


class _Families(Collector):
    """Gauges (set with `Metrics.set`, or yielded by collectors at this scrape), histograms
    and summaries of one `Metrics`, for `generate_latest`."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def describe(self) -> list[Metric]:
        return []  # dynamic: the registry checks no names against it

    def collect(self) -> Iterator[Metric]:
        metrics = self._metrics
        gauges: dict[str, GaugeMetricFamily] = {}
        for family in metrics._families.values():
            if family.kind == "gauge":
                gauge = gauges[family.name] = GaugeMetricFamily(family.name, family.help)
                for labels, cell in family.cells.items():
                    gauge.add_sample(family.name, dict(labels), cell.value)
        for name, _, labels, value in metrics._scraped:
            gauge = gauges.get(name) or gauges.setdefault(name, GaugeMetricFamily(name, name))
            gauge.add_sample(name, dict(labels), value)
        yield from gauges.values()
        for timing in metrics._timings:
            if timing.children:
                yield timing.family()


def _render_counters(families: dict[str, tuple[str, list[Sample]]]) -> str:
    lines: list[str] = []
    for name in sorted(families):
        help_text, samples = families[name]
        if not samples:
            continue  # as Go: a vector without children writes nothing
        lines.append(f"# HELP {name} {_escape_help(help_text or name)}")
        lines.append(f"# TYPE {name} counter")
        for labels, value in sorted(samples):
            lines.append(f"{name}{_labels(labels)} {_number(value)}")
    return "".join(line + "\n" for line in lines)


def _labels(labels: Labels) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(labels))
    return "{" + inner + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n")


def _number(value: float) -> str:
    if math.isfinite(value) and value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return str(floatToGoString(value))  # type: ignore[no-untyped-call]


def _go_float(value: float) -> str:
    """A bucket bound as Go's client writes it (`1`, `2.5`, `+Inf`)."""
    if value == math.inf:
        return "+Inf"
    if value == int(value) and abs(value) < 1e21:
        return str(int(value))
    return repr(value)
