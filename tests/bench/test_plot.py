"""bench/plot.py draws the results history: one PNG per scenario and the ratio to the
websockets peer, from stamped records and from older files whose commit is on the machine
line. Runs plot.py with this interpreter (the test extra has matplotlib), else with the bench
venv's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


def python_with_matplotlib() -> str:
    for python in (sys.executable, str(BENCH / ".venv" / "bin" / "python")):
        if Path(python).exists():
            probe = subprocess.run([python, "-c", "import matplotlib"], timeout=60)
            if probe.returncode == 0:
                return python
    return ""


BENCH_PYTHON = python_with_matplotlib()
pytestmark = pytest.mark.skipif(
    not BENCH_PYTHON, reason="matplotlib (the test extra, or bench/.venv made by run_all.py)"
)


def run(commit: str, date: str, target: str, us: float, p99: float) -> dict[str, object]:
    return {
        "centripy_commit": commit,
        "centripy_commit_date": date,
        "quick": True,
        "scenario": "s6-2k",
        "target": target,
        "server_cpu_us_per_delivery": us,
        "latency_ms": {"p99": p99},
    }


def test_plot_writes_a_png_per_scenario_and_the_ratio(tmp_path: Path) -> None:
    stamped = [
        run("bbb", "2026-12-02T00:00:00+00:00", "centripy", 40.0, 30.0),
        run("aaa", "2026-12-01T00:00:00+00:00", "centripy", 80.0, 60.0),
        run("aaa", "2026-12-01T00:00:00+00:00", "websockets", 50.0, 20.0),
        run("bbb", "2026-12-02T00:00:00+00:00", "websockets", 50.0, 20.0),
        {**run("bbb", "2026-12-02", "centripy", 1.0, 1.0), "error": "exit 1"},
        {
            "centripy_commit": "bbb",
            "scenario": "p-sqlite-single",
            "target": "centripy",
            "server_cpu_s_per_1k": 0.1,
            "ack_ms": {"p99": 9.0},
        },
    ]
    old = [
        {"machine": {}, "centripy_commit": "ccc", "date": "2026-12-03T00:00:00+0000"},
        {"scenario": "s4", "target": "centripy", "server_cpu_us_per_conn": 2, "connect_p99_ms": 4},
    ]
    files = [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]
    for path, rows in zip(files, (stamped, old), strict=True):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "plots"
    done = subprocess.run(
        [str(BENCH_PYTHON), str(BENCH / "plot.py"), *map(str, files), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    names = sorted(p.name for p in out.iterdir())
    assert names == ["p-sqlite-single.png", "ratio_to_websockets.png", "s4.png", "s6-2k.png"]
    assert all((out / n).read_bytes().startswith(b"\x89PNG") for n in names)
    assert done.stdout.count(".png") == 4


def test_plot_without_records_says_so(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"machine": {}, "centripy_commit": "x"}) + "\n")
    done = subprocess.run(
        [str(BENCH_PYTHON), str(BENCH / "plot.py"), str(empty), "--out", str(tmp_path / "p")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1 and "no run records" in done.stderr
