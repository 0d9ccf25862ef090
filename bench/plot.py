#!/usr/bin/env python3
"""plot.py: the trend of every run_all.py scenario across commits, as PNGs (matplotlib).

    bench/.venv/bin/python bench/plot.py                 # bench/results/*.jsonl -> plots/
    bench/.venv/bin/python bench/plot.py /tmp/centripy-bench-*.jsonl --out /tmp/plots

Reads run records (the JSON lines run_all.py appends to bench/results/results.jsonl; older
files whose records carry no commit take it from the machine line before them) and draws, into
--out (default bench/results/plots/):

- <scenario>.png: the cost (server µs of CPU per delivery; per publication for p-*, seconds to
  recover everyone for r-*, µs per connection for s4) and the tail latency (p99) across commits,
  one line per target, each point the median of that commit's runs. --quick runs are a separate
  dashed line with x markers (their sizes differ from the full runs').
- ratio_to_websockets.png: centripy ÷ the websockets peer of the same commit, per scenario run
  against both (cost and p99; 1.0 = on par, below = centripy ahead).

The x axis is the commits in the order of their commit dates (the last --last, 30); a "+"
after a hash means some of its runs were made with server sources modified in the tree (other
work in progress). Runs from the bench venv.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from report import PEER, PLOT_METRICS, Getter, Record, section_of
from scenarios import BY_KEY

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
COLORS = {"centripy": "C0", "websockets": "C1", "socketio": "C2", "socketio-gc-off": "C3"}
STYLE = {False: {"marker": "o", "linestyle": "-"}, True: {"marker": "x", "linestyle": "--"}}

Series = dict[tuple[str, bool], dict[str, list[float]]]  # (target, quick) -> commit -> values


def read(paths: Iterable[Path]) -> list[Record]:
    """The run records of the files (not machine lines, errors or skips), each with its
    commit, commit date and quick flag (taken from the machine line before it if absent)."""
    records = []
    for path in paths:
        context: dict[str, Any] = {}
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            record = json.loads(line)
            if "machine" in record:
                context = {
                    k: record[k]
                    for k in ("centripy_commit", "centripy_commit_date", "date", "quick")
                    if k in record
                }
                continue
            if section_of(record) is None or "error" in record or "skipped" in record:
                continue
            merged = {**context, **record}
            if merged.get("centripy_commit"):
                records.append(merged)
    return records


class Commits:
    """The commits in the order of their dates, and their axis labels."""

    def __init__(self, records: Sequence[Record]) -> None:
        when: dict[str, str] = {}
        dirty: set[str] = set()
        for r in records:
            commit = r["centripy_commit"]
            key = str(r.get("centripy_commit_date") or r.get("date") or "")
            when[commit] = min(when.get(commit, key), key)
            if r.get("centripy_dirty_files"):
                dirty.add(commit)
        self.order = sorted(when, key=lambda c: (when[c], c))
        self.index = {c: i for i, c in enumerate(self.order)}
        self.labels = [
            f"{c}{'+' if c in dirty else ''}\n{when[c][5:16].replace('T', ' ')}" for c in self.order
        ]


def series(records: Sequence[Record], get: Getter) -> Series:
    out: Series = defaultdict(lambda: defaultdict(list))
    for r in records:
        value = get(r)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[(r["target"], bool(r.get("quick")))][r["centripy_commit"]].append(float(value))
    return out


def medians(points: dict[str, list[float]], commits: Commits) -> tuple[list[int], list[float]]:
    xs = sorted(commits.index[c] for c in points)
    return xs, [statistics.median(points[commits.order[x]]) for x in xs]


def axis_commits(ax: Any, commits: Commits) -> None:
    ax.set_xticks(range(len(commits.order)))
    ax.set_xticklabels(commits.labels, fontsize=7, rotation=45, ha="right")
    ax.set_xlim(-0.5, max(0.5, len(commits.order) - 0.5))
    ax.grid(True, alpha=0.3)


def plot_scenario(key: str, records: Sequence[Record], commits: Commits, out: Path) -> Path:
    section = section_of(records[0]) or "fanout"
    scenario = BY_KEY.get(key)
    fig, axes = plt.subplots(2, 1, figsize=(max(7.0, 0.6 * len(commits.order) + 4), 7))
    for ax, (label, get) in zip(axes, PLOT_METRICS[section], strict=True):
        drawn = False
        for (target, quick), points in sorted(series(records, get).items()):
            xs, ys = medians(points, commits)
            name = f"{target}{' (quick)' if quick else ''}"
            ax.plot(xs, ys, color=COLORS.get(target, "C7"), label=name, **STYLE[quick])
            drawn = True
        ax.set_ylabel(label)
        axis_commits(ax, commits)
        if drawn:
            ax.legend(fontsize=8)
            ax.set_ylim(0, ax.get_ylim()[1] * 1.1)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    axes[0].set_title(f"{key}: {scenario.title if scenario else key}", fontsize=9)
    fig.tight_layout()
    path = out / f"{key}.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def ratio_points(
    records: Sequence[Record], get: Getter, commits: Commits
) -> dict[tuple[str, bool], tuple[list[int], list[float]]]:
    """(scenario, quick) -> the commits' centripy ÷ PEER ratios of the medians."""
    by_key: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        by_key[r["scenario"]].append(r)
    out = {}
    for key, rows in by_key.items():
        data = series(rows, get)
        for quick in (False, True):
            mine, theirs = data.get(("centripy", quick), {}), data.get((PEER, quick), {})
            shared = sorted((c for c in mine if c in theirs), key=commits.index.__getitem__)
            pairs = [
                (commits.index[c], statistics.median(mine[c]) / statistics.median(theirs[c]))
                for c in shared
                if statistics.median(theirs[c])
            ]
            if pairs:
                out[(key, quick)] = ([x for x, _ in pairs], [y for _, y in pairs])
    return out


def plot_ratio(records: Sequence[Record], commits: Commits, out: Path) -> Path | None:
    compared = [r for r in records if r["target"] in ("centripy", PEER)]
    figures = ("cost", "p99")
    fig, axes = plt.subplots(2, 1, figsize=(max(7.0, 0.6 * len(commits.order) + 4), 7))
    drawn = False
    for index, (ax, title) in enumerate(zip(axes, figures, strict=True)):
        keys = sorted(
            {r["scenario"] for r in compared if r["target"] == PEER}
            & {r["scenario"] for r in compared if r["target"] == "centripy"}
        )
        for n, key in enumerate(keys):
            section = section_of(next(r for r in compared if r["scenario"] == key)) or "fanout"
            get = PLOT_METRICS[section][index][1]
            for (_, quick), (xs, ys) in ratio_points(
                [r for r in compared if r["scenario"] == key], get, commits
            ).items():
                name = f"{key}{' (quick)' if quick else ''}"
                ax.plot(xs, ys, color=plt.get_cmap("tab20")(n % 20), label=name, **STYLE[quick])
                drawn = True
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_ylabel(f"{title}: centripy ÷ {PEER}", fontsize=9)
        axis_commits(ax, commits)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, ncol=2)
            ax.set_ylim(0, ax.get_ylim()[1] * 1.1)
    axes[0].set_title(
        f"centripy ÷ {PEER}, medians per commit (below 1: centripy ahead)\n"
        "cost = server CPU per delivery (per connection for s4)",
        fontsize=8,
    )
    fig.tight_layout()
    path = out / f"ratio_to_{PEER}.png"
    if drawn:
        fig.savefig(path, dpi=100)
    plt.close(fig)
    return path if drawn else None


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("files", type=Path, nargs="*", help="JSON lines (default: bench/results/)")
    ap.add_argument("--out", type=Path, default=RESULTS / "plots", help="folder of the PNGs")
    ap.add_argument("--last", type=int, default=30, help="plot only the last N commits")
    args = ap.parse_args(argv)
    files = args.files or sorted(RESULTS.glob("*.jsonl"))
    records = read(files)
    if not records:
        print(f"no run records in {[str(f) for f in files]}", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    commits = Commits(records)
    if len(commits.order) > args.last > 0:
        keep = set(commits.order[-args.last :])
        records = [r for r in records if r["centripy_commit"] in keep]
        commits = Commits(records)
    by_key: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        by_key[r["scenario"]].append(r)
    written = [plot_scenario(key, rows, commits, args.out) for key, rows in sorted(by_key.items())]
    ratio = plot_ratio(records, commits, args.out)
    written += [ratio] if ratio else []
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
