"""The Markdown tables of run_all.py and the figures plot.py draws, from run records.

A record is one JSON object of a run (see run_all.py); records of a scenario are grouped by
target and each cell shows the median (min to max) over the runs. Standard library only.
"""

from __future__ import annotations

import functools
import statistics
from collections.abc import Callable, Sequence
from typing import Any

from scenarios import BY_KEY, SCENARIOS, Scenario

Record = dict[str, Any]
Getter = Callable[[Record], Any]
Column = tuple[str, Getter, str]


def cell(values: Sequence[float], fmt: str) -> str:
    """'median (min-max)' of the values, or the value alone when all are equal."""
    if not values:
        return ""
    lo, mid, hi = min(values), statistics.median(values), max(values)
    if lo == hi:
        return fmt.format(mid)
    return f"{fmt.format(mid)} ({fmt.format(lo)} to {fmt.format(hi)})"


def _get(record: Record, path: str) -> Any:
    value: Any = record
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def _col(header: str, path: str, fmt: str) -> Column:
    return header, functools.partial(_get, path=path), fmt


def numbers(values: Sequence[Any]) -> list[float]:
    """The numeric values (booleans count as 0/1)."""
    return [float(v) for v in values if isinstance(v, (int, float))]


def per_publication_us(record: Record) -> Any:
    """bench_publish.py's server CPU seconds per 1,000 publications, as µs per publication."""
    per_1k = record.get("server_cpu_s_per_1k")
    return per_1k * 1000 if isinstance(per_1k, (int, float)) else None


def verified(record: Record) -> int | None:
    """bench_publish.py's checks: 1 if every one present passed, else 0."""
    checks = [record[k] for k in ("acked_offsets_ok", "history_ok") if k in record]
    if not checks and "errors" not in record:
        return None
    return int(all(c is True for c in checks) and not record.get("errors"))


# Column groups shared by the fan-out tables.
_RATE = (
    _col("deliveries/s", "deliveries_per_s", "{:,.0f}"),
    _col("server µs/delivery", "server_cpu_us_per_delivery", "{:.1f}"),
)
_LATENCY = (
    _col("p50 ms", "latency_ms.p50", "{:.1f}"),
    _col("p99 ms", "latency_ms.p99", "{:.1f}"),
)
_ACCOUNTING = (
    _col("lost", "lost", "{:.0f}"),
    _col("dup", "duplicated", "{:.0f}"),
    _col("reord", "reordered", "{:.0f}"),
)
_BUSY = (
    _col("server busy", "server_busy", "{:.2f}"),
    _col("client busy", "client_busy_max", "{:.2f}"),
    _col("other busy", "foreign_busy", "{:.2f}"),
)
FANOUT_COLUMNS: tuple[Column, ...] = (
    *_RATE,
    *_LATENCY,
    _col("max ms", "latency_ms.max", "{:.0f}"),
    _col("RSS MiB", "server_hwm_mb", "{:.0f}"),
    *_ACCOUNTING,
    *_BUSY,
)
TRANSPORT_COLUMNS: tuple[Column, ...] = (*_RATE, *_LATENCY, *_ACCOUNTING, *_BUSY)
CHANNEL_COLUMNS: tuple[Column, ...] = (
    _col("offered pubs/s", "offered_pubs_per_s", "{:,.0f}"),
    _col("achieved pubs/s", "achieved_pubs_per_s", "{:,.0f}"),
    *_LATENCY,
    _col("server µs/publication", "server_cpu_us_per_publication", "{:.0f}"),
    _col("server µs/delivery", "server_cpu_us_per_delivery", "{:.1f}"),
    *_ACCOUNTING,
    _col("connections", "connections", "{:,.0f}"),
    _col("server busy", "server_busy", "{:.2f}"),
    _col("publisher busy", "publisher_busy", "{:.2f}"),
    _col("other busy", "foreign_busy", "{:.2f}"),
)
CONNECTION_COLUMNS: tuple[Column, ...] = (
    _col("connections", "connections", "{:,.0f}"),
    _col("connect/s", "connect_per_s", "{:,.0f}"),
    _col("connect p99 ms", "connect_p99_ms", "{:.0f}"),
    _col("server RSS MiB", "server_rss_mb", "{:.0f}"),
    _col("KiB/conn", "server_kib_per_conn", "{:.1f}"),
    _col("server µs CPU/conn", "server_cpu_us_per_conn", "{:.0f}"),
    _col("idle µs CPU/conn/s", "server_idle_us_per_conn_s", "{:.2f}"),
    _col("broadcast reach s", "reach_s", "{:.3f}"),
    _col("reached", "reached", "{:,.0f}"),
    _col("disconnects", "disconnects", "{:.0f}"),
)
PUBLISH_COLUMNS: tuple[Column, ...] = (
    _col("publications", "acked", "{:,.0f}"),
    _col("pubs/s", "pubs_per_s", "{:,.0f}"),
    _col("server CPU s/1k", "server_cpu_s_per_1k", "{:.3f}"),
    ("server µs/publication", per_publication_us, "{:.0f}"),
    _col("ack p50 ms", "ack_ms.p50", "{:.1f}"),
    _col("ack p99 ms", "ack_ms.p99", "{:.1f}"),
    _col("server busy", "server_busy", "{:.2f}"),
    ("verified (1 = yes)", verified, "{:.0f}"),
)
STORM_COLUMNS: tuple[Column, ...] = (
    _col("clients", "clients", "{:,.0f}"),
    _col("seconds", "seconds", "{:.2f}"),
    _col("recovered", "recovered", "{:,.0f}"),
    *_ACCOUNTING,
    _col("client p99 s", "client_p99_s", "{:.2f}"),
    _col("server CPU s", "server_cpu_s", "{:.1f}"),
    _col("server µs/client", "server_cpu_us_per_client", "{:.0f}"),
    _col("< 10 s, all in order (1 = yes)", "meets_target", "{:.0f}"),
)
TRANSPORT_RATIO = _col("÷ s1-ws", "server_cpu_us_per_delivery", "{:.2f}")
SECTIONS: dict[str, tuple[str, tuple[Column, ...]]] = {
    "fanout": ("Fan-out", FANOUT_COLUMNS),
    "transport": (
        "Transports (one server config; last column: server µs/delivery ÷ s1-ws's)",
        TRANSPORT_COLUMNS,
    ),
    "channels": ("Many small channels with history", CHANNEL_COLUMNS),
    "connections": ("Idle connections and one broadcast", CONNECTION_COLUMNS),
    "publish": ("Publish path (bench_publish.py, history on)", PUBLISH_COLUMNS),
    "storm": ("Reconnect storm (bench_recovery.py --storm)", STORM_COLUMNS),
}

# What plot.py draws per section: (label, getter) of the cost and of the tail latency.
Metric = tuple[str, Getter]
PLOT_METRICS: dict[str, tuple[Metric, Metric]] = {
    "fanout": (
        ("server µs CPU per delivery", functools.partial(_get, path="server_cpu_us_per_delivery")),
        ("p99 latency, ms", functools.partial(_get, path="latency_ms.p99")),
    ),
    "connections": (
        ("server µs CPU per connection", functools.partial(_get, path="server_cpu_us_per_conn")),
        ("connect p99, ms", functools.partial(_get, path="connect_p99_ms")),
    ),
    "publish": (
        ("server µs CPU per publication", per_publication_us),
        ("ack p99, ms", functools.partial(_get, path="ack_ms.p99")),
    ),
    "storm": (
        ("seconds until all recovered", functools.partial(_get, path="seconds")),
        ("client p99, s", functools.partial(_get, path="client_p99_s")),
    ),
}
PLOT_METRICS["transport"] = PLOT_METRICS["channels"] = PLOT_METRICS["fanout"]
PEER = "websockets"  # the reference peer of the ratio table and plot


def section_of(record: Record) -> str | None:
    """The table a record goes to (None: not a run record)."""
    if "scenario" not in record or "target" not in record:
        return None
    scenario = BY_KEY.get(record["scenario"])
    if scenario is not None:
        return scenario.section
    return "connections" if "connect_per_s" in record else "fanout"


def good(rows: Sequence[Record]) -> list[Record]:
    return [r for r in rows if "error" not in r and "skipped" not in r]


def group(records: Sequence[Record]) -> dict[tuple[str, str], list[Record]]:
    groups: dict[tuple[str, str], list[Record]] = {}
    for record in records:
        if "scenario" in record and "target" in record:
            groups.setdefault((record["scenario"], record["target"]), []).append(record)
    return groups


def median_of(rows: Sequence[Record], get: Getter) -> float | None:
    values = numbers([get(r) for r in good(rows)])
    return statistics.median(values) if values else None


def table(
    records: Sequence[Record], columns: Sequence[Column], ratio: Column | None = None
) -> list[str]:
    """One Markdown table; with `ratio`, a last column: the median of its value over the
    median of the same target's runs of the scenario's `reference`."""
    groups = group(records)
    headers = [c[0] for c in columns] + ([ratio[0]] if ratio else [])
    lines = [
        "| scenario | target | runs | " + " | ".join(headers) + " |",
        "|---|---|---|" + "---|" * len(headers),
    ]
    for (key, target), rows in groups.items():
        ok = good(rows)
        cells = [cell(numbers([get(r) for r in ok]), fmt) for _, get, fmt in columns]
        if ratio:
            cells.append(ratio_cell(key, target, groups, ratio))
        note = f"{len(ok)}" + (
            f" (+{len(rows) - len(ok)} failed/skipped)" if len(ok) < len(rows) else ""
        )
        lines.append(f"| {key} | {target} | {note} | " + " | ".join(cells) + " |")
    return lines


def ratio_cell(
    key: str, target: str, groups: dict[tuple[str, str], list[Record]], ratio: Column
) -> str:
    scenario = BY_KEY.get(key)
    if scenario is None or not scenario.reference:
        return ""
    mine = median_of(groups[(key, target)], ratio[1])
    theirs = median_of(groups.get((scenario.reference, target), []), ratio[1])
    if mine is None or not theirs:
        return ""
    return ratio[2].format(mine / theirs)


def sustained_lines(records: Sequence[Record]) -> list[str]:
    """Per target: the highest offered rate whose median run achieved >= 95% of it with a
    median p99 under 100 ms."""
    best: dict[str, list[int]] = {}
    for (key, target), rows in group(records).items():
        scenario = BY_KEY.get(key)
        if scenario is None or not scenario.offered or not good(rows):
            continue
        best.setdefault(target, [])
        achieved = median_of(rows, functools.partial(_get, path="achieved_pubs_per_s"))
        p99 = median_of(rows, functools.partial(_get, path="latency_ms.p99"))
        if is_sustained(scenario.offered, achieved, p99):
            best[target].append(scenario.offered)
    return [
        f"- highest rate sustained with p99 < {SUSTAINED_P99_MS:.0f} ms, {target}: "
        + (f"{max(rates):,}/s" if rates else "none of the offered rates")
        for target, rates in best.items()
    ]


SUSTAINED_SHARE = 0.95
SUSTAINED_P99_MS = 100.0


def is_sustained(offered: float, achieved: Any, p99: Any) -> bool:
    """Sustained: achieved >= 95% of the offered publications/s and p99 < 100 ms."""
    return (
        isinstance(achieved, (int, float))
        and isinstance(p99, (int, float))
        and achieved >= SUSTAINED_SHARE * offered
        and p99 < SUSTAINED_P99_MS
    )


def peer_ratio_lines(records: Sequence[Record]) -> list[str]:
    """centripy ÷ the websockets peer, per scenario run against both: cost and p99."""
    groups = group(records)
    rows = []
    for (key, target), mine in groups.items():
        if target != "centripy" or (key, PEER) not in groups:
            continue
        section = section_of(mine[0]) or "fanout"
        for label, get in PLOT_METRICS.get(section, PLOT_METRICS["fanout"]):
            a, b = median_of(mine, get), median_of(groups[(key, PEER)], get)
            if a is None or b is None:
                continue
            share = f"{a / b:.2f}" if b else ""
            rows.append(f"| {key} | {label} | {a:,.1f} | {b:,.1f} | {share} |")
    if not rows:
        return []
    return [
        f"### centripy ÷ {PEER} (medians)",
        "",
        f"| scenario | figure | centripy | {PEER} | ratio |",
        "|---|---|---|---|---|",
        *rows,
        "",
    ]


def render_tables(records: Sequence[Record]) -> str:
    out: list[str] = []
    for name, (title, columns) in SECTIONS.items():
        mine = [r for r in records if section_of(r) == name]
        if not mine:
            continue
        ratio = TRANSPORT_RATIO if name == "transport" else None
        out += [f"### {title}", "", *table(mine, columns, ratio), ""]
        if name == "channels":
            out += [*sustained_lines(mine), ""]
    out += peer_ratio_lines(records)
    out.append(
        "Cells: median (min to max) over the runs. Busy: CPU seconds per second of the "
        "delivery window (1.0 = one core); other = everything on the machine but the "
        "server and the load generator; publisher = fanout.py's publishing process over the "
        "publish window. RSS: the server's peak (VmHWM; summed over nodes). Server µs per "
        "publication = µs per delivery x deliveries / publications acknowledged."
    )
    for key in sorted({r["scenario"] for r in records if "scenario" in r}):
        scenario: Scenario | None = BY_KEY.get(key)
        out.append(f"- {key}: {scenario.title if scenario else key}")
    for r in records:
        if "error" in r or "skipped" in r:
            out.append(
                f"- {r.get('scenario')} / {r.get('target')} #{r.get('repeat')}: "
                f"{r.get('error') or 'skipped: ' + str(r['skipped'])}"[:400]
            )
    return "\n".join(out)


__all__ = ["SCENARIOS", "cell", "render_tables", "table"]
