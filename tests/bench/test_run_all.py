"""run_all.py's own logic (no server): the quick defaults, the s6 derived figures and the
"highest rate sustained" line, the transport ratio column, tool scenarios' JSON lines and the
results history every record is stamped for."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import report  # noqa: E402
import run_all  # noqa: E402
from scenarios import BY_KEY, Scenario  # noqa: E402


def test_quick_defaults_cover_issue_20_with_centripy_and_the_websockets_loop() -> None:
    args = run_all.parse_args(["--quick"])
    assert args.target_names == ["centripy", "websockets"]
    assert args.repeats == 1
    for key in ("s1", "s2", "s3", "s4", "s6-1k", "s6-2k", "s6-5k", "s1-protobuf", "s1-uni_ws"):
        assert key in args.scenario_keys
    for key in ("p-sqlite-single", "p-pg-batch", "r-sqlite-one", "r-pg-each"):
        assert key in args.scenario_keys
    assert not [k for k in args.scenario_keys if k.startswith("s5")]
    full = run_all.parse_args([])
    assert "s5-2nodes" in full.scenario_keys and "socketio" in full.target_names
    explicit = run_all.parse_args(["--quick", "--targets", "socketio", "--scenarios", "s5-1node"])
    assert explicit.target_names == ["socketio"] and explicit.scenario_keys == ["s5-1node"]


def test_s6_runs_2500_channels_of_4_with_history_at_the_offered_rate() -> None:
    scenario = BY_KEY["s6-5k"]
    full = list(scenario.full)
    assert full[full.index("-n") + 1] == "10000" and full[full.index("-c") + 1] == "2500"
    assert full[full.index("-r") + 1] == "5000" and full[full.index("-m") + 1] == "75000"
    assert full[full.index("--inflight") + 1] == "64"
    config = run_all.centripy_config(scenario, "pg", "t")
    assert config["history_size"] == 100 and config["history_ttl"] == "300s"
    assert scenario.targets == ("centripy", "websockets")


def test_uni_websocket_scenario_switches_it_on() -> None:
    config = run_all.centripy_config(BY_KEY["s1-uni_ws"], "pg", "t")
    assert config["uni_websocket"] is True
    assert "uni_websocket" not in run_all.centripy_config(BY_KEY["s1-ws"], "pg", "t")


def fanout_record(key: str, target: str, **fields: object) -> dict[str, object]:
    record: dict[str, object] = {
        "scenario": key,
        "target": target,
        "repeat": 0,
        "publish_acked": 5000,
        "publish_s": 2.5,
        "deliveries_received": 20000,
        "server_cpu_us_per_delivery": 50.0,
        "client_cpu_publisher_s": 0.5,
        "latency_ms": {"p50": 1.0, "p99": 20.0},
    }
    record.update(fields)
    return run_all.derive(BY_KEY[key], record)


def test_derive_per_publication_achieved_rate_and_sustained() -> None:
    ok = fanout_record("s6-2k", "centripy")
    assert ok["achieved_pubs_per_s"] == 2000.0
    assert ok["server_cpu_us_per_publication"] == 200.0  # 50 µs x 20,000 / 5,000
    assert ok["publisher_busy"] == 0.2
    assert ok["offered_pubs_per_s"] == 2000 and ok["sustained"] is True
    slow = fanout_record("s6-2k", "centripy", publish_s=2.7)  # 1,852/s < 95% of 2,000
    assert slow["sustained"] is False
    late = fanout_record("s6-2k", "centripy", latency_ms={"p50": 1.0, "p99": 100.0})
    assert late["sustained"] is False
    assert "sustained" not in fanout_record("s1", "centripy")


def test_sustained_line_takes_the_highest_rate_that_held() -> None:
    records = [
        fanout_record("s6-1k", "centripy", publish_s=5.0),
        fanout_record("s6-2k", "centripy"),
        fanout_record("s6-5k", "centripy", publish_s=1.5),  # 3,333/s of 5,000
        fanout_record("s6-5k", "websockets", publish_s=1.0),
        fanout_record("s6-1k", "websockets", publish_s=5.0, latency_ms={"p99": 150.0}),
    ]
    text = report.render_tables(records)
    assert "sustained with p99 < 100 ms, centripy: 2,000/s" in text
    assert "sustained with p99 < 100 ms, websockets: 5,000/s" in text
    assert "| s6-2k | centripy | 1 | 2,000 | 2,000 | 1.0 | 20.0 | 200 | 50.0 |" in text
    assert "| s6-5k | server µs CPU per delivery | 50.0 | 50.0 | 1.00 |" in text
    none = report.render_tables([fanout_record("s6-5k", "centripy", publish_s=1.5)])
    assert "centripy: none of the offered rates" in none


def test_transport_table_shows_the_ratio_to_s1_ws() -> None:
    records = [
        {"scenario": "s1-ws", "target": "centripy", "repeat": 0, "server_cpu_us_per_delivery": 10},
        {"scenario": "s1-sse", "target": "centripy", "repeat": 0, "server_cpu_us_per_delivery": 25},
        {"scenario": "s1-sse", "target": "centripy", "repeat": 1, "server_cpu_us_per_delivery": 35},
    ]
    lines = report.render_tables(records).splitlines()
    sse = next(ln for ln in lines if ln.startswith("| s1-sse |"))
    assert sse.endswith("| 3.00 |")
    assert next(ln for ln in lines if ln.startswith("| s1-ws |")).endswith("|  |")


def test_missing_protocol_and_tool_option_are_skipped_with_a_reason() -> None:
    args = argparse.Namespace(protocols=["centrifugo"], project_python=Path(sys.executable))
    assert "not in bench/protocols.py" in run_all.requirement_problem(BY_KEY["s1-protobuf"], args)
    assert run_all.requirement_problem(BY_KEY["s1-ws"], args) == ""


def tool_args(tmp_path: Path) -> argparse.Namespace:
    return argparse.Namespace(
        quick=True,
        project_python=Path(sys.executable),
        pg_url="pg",
        quiet=100.0,
        quiet_timeout=0.0,
        run_timeout=60.0,
        protocols=None,
    )


def fake_tool(tmp_path: Path, body: str) -> Scenario:
    script = tmp_path / "tool.py"
    script.write_text(body)
    return Scenario("p-fake", "fake", str(script), ("--full",), ("--quick",), ("centripy",))


def test_tool_scenario_keeps_every_json_line_but_summaries(tmp_path: Path) -> None:
    scenario = fake_tool(
        tmp_path,
        "import json, sys\n"
        "print('warming up')\n"
        "print(json.dumps({'pubs_per_s': 100, 'args': sys.argv[1:]}))\n"
        "print(json.dumps({'pubs_per_s': 200}))\n"
        "print(json.dumps({'summary': True, 'pubs_per_s': 150}))\n",
    )
    records = run_all.tool_runs(scenario, 0, tool_args(tmp_path))
    assert [r["pubs_per_s"] for r in records] == [100, 200]
    assert records[0]["args"] == ["--quick"]
    assert all(r["scenario"] == "p-fake" and r["target"] == "centripy" for r in records)


def test_failing_tool_gives_an_error_record(tmp_path: Path) -> None:
    scenario = fake_tool(tmp_path, "import sys\nsys.exit('unrecognized arguments: --storm')\n")
    [record] = run_all.tool_runs(scenario, 0, tool_args(tmp_path))
    assert "exit 1" in record["error"] and "--storm" in record["error"]
    assert "p-fake / centripy #0: exit 1" in report.render_tables([record])


def test_sink_stamps_records_and_appends_to_out_and_results(tmp_path: Path) -> None:
    out, results = tmp_path / "out.jsonl", tmp_path / "results" / "results.jsonl"
    stamp = run_all.commit_stamp(True)
    assert stamp["quick"] is True and stamp["centripy_commit"]
    sink = run_all.Sink(out, results, stamp)
    sink.emit({"machine": {}})
    sink.emit({"scenario": "s1", "target": "centripy"})
    for path in (out, results):
        lines = [json.loads(ln) for ln in path.read_text().splitlines()]
        assert "machine" in lines[0] and lines[1]["scenario"] == "s1"
        assert all(ln["invocation"] == stamp["invocation"] and "date" in ln for ln in lines)
    run_all.Sink(tmp_path / "only.jsonl", None, stamp).emit({"x": 1})
    assert len(results.read_text().splitlines()) == 2


@pytest.mark.parametrize(
    ("key", "flag"), [("p-pg-single", "--pg-url"), ("r-sqlite-each", "--storm")]
)
def test_tool_commands(key: str, flag: str) -> None:
    args = run_all.parse_args(["--quick"])
    command = run_all.script_command(BY_KEY[key], args)
    assert flag in command and command[0] == str(args.project_python)


def test_s7_holds_1000_connections_idle_and_reports_their_cpu_per_second() -> None:
    scenario = BY_KEY["s7-idle"]
    full = list(scenario.full)
    assert scenario.tool == "connections.py" and scenario.targets == ("centripy", "websockets")
    assert full[full.index("-n") + 1] == "1000" and full[full.index("--hold") + 1] == "60"
    assert "s7-idle" not in run_all.parse_args(["--quick"]).scenario_keys
    assert "idle µs CPU/conn/s" in [c[0] for c in report.CONNECTION_COLUMNS]
