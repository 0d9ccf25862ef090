"""The fan-out suite's own checks (bench/): its accounting must count exactly the losses,
duplicates, reorders and rejections that the websockets peer injects, its minimal WebSocket
client must frame correctly, and run_all's tables must show median (min to max)."""

from __future__ import annotations

import array
import asyncio
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.bench.fanout_run import small_fanout

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

pytest.importorskip("aiohttp")
pytest.importorskip("orjson")

import connections  # noqa: E402
import fanout  # noqa: E402
import procs  # noqa: E402
import protocols  # noqa: E402
import run_all  # noqa: E402

# --- framing ----------------------------------------------------------------------------------


def test_accept_key_matches_rfc_6455_example() -> None:
    assert connections.accept_key(b"dGhlIHNhbXBsZSBub25jZQ==") == b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


@pytest.mark.parametrize("size", [0, 5, 125, 126, 65535, 65536])
def test_masked_frame_round_trips_through_the_parser(size: int) -> None:
    payload = bytes(i % 251 for i in range(size))
    buf = bytearray(connections.encode_frame(connections.OP_TEXT, payload, b"\x01\x02\x03\x04"))
    assert connections.take_frames(buf) == [(True, connections.OP_TEXT, payload)]
    assert buf == bytearray()


def test_parser_keeps_an_incomplete_frame_for_later() -> None:
    frame = bytes((0x81, 3)) + b"abc"
    buf = bytearray(frame + frame[:3])
    assert connections.take_frames(buf) == [(True, 1, b"abc")]
    assert bytes(buf) == frame[:3]
    buf += frame[3:]
    assert connections.take_frames(buf) == [(True, 1, b"abc")]


def test_upgrade_check_names_the_problem() -> None:
    key = b"dGhlIHNhbXBsZSBub25jZQ=="
    good = b"HTTP/1.1 101 Switching Protocols\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    assert connections.check_upgrade(good, key) == ""
    assert "no upgrade" in connections.check_upgrade(b"HTTP/1.1 404 Not Found", key)
    assert "Accept" in connections.check_upgrade(good[:-3] + b"xx=", key)


# --- accounting -------------------------------------------------------------------------------


async def test_tally_counts_duplicates_reorders_and_misroutes() -> None:
    tally = fanout.Tally(messages=6, channels=2)
    tally.nsubs = 1
    sub = fanout.Subscriber(chan=0, messages=6, channels=2)  # expects seqs 0, 2, 4
    for seq in (0, 4, 2, 2, 3, 99, "x"):
        tally.record(sub, seq, 1000)
    assert (tally.dup, tally.reordered, tally.misrouted) == (1, 1, 3)
    assert list(tally.uniq) == [1, 0, 1, 0, 1, 0]
    assert tally.all_done.is_set()


def test_losses_are_counted_per_acknowledged_publication() -> None:
    acked = bytes([1, 1, 0, 1])
    uniq = [3, 2, 1, 3]  # seq 1 lost once; seq 2 was not acknowledged but delivered once
    counts = fanout.delivery_counts(acked, uniq, per_chan=[3], channels=1)
    assert counts == {
        "deliveries_expected": 9,
        "deliveries_received": 9,
        "lost": 1,
        "delivered_unacked": 1,
    }


def test_percentile_is_nearest_rank() -> None:
    values = list(range(1, 101))
    assert procs.percentile(values, 50) == 50
    assert procs.percentile(values, 99) == 99
    assert procs.percentile([], 50) is None
    blob = array.array("q", [5, 1]).tobytes()
    assert fanout.latency_summary([blob])["max"] == procs.ms(5)


# --- run_all ----------------------------------------------------------------------------------


def test_table_shows_median_and_range_and_failures() -> None:
    rows = [
        {"scenario": "s1", "target": "centripy", "repeat": i, "deliveries_per_s": v}
        for i, v in enumerate((30_000, 10_000, 20_000))
    ]
    rows.append({"scenario": "s1", "target": "centripy", "repeat": 3, "error": "exit 1; boom"})
    text = run_all.render_tables(rows)
    assert "| s1 | centripy | 3 (+1 failed/skipped) | 20,000 (10,000 to 30,000) |" in text
    assert "boom" in text


def test_two_node_command_spreads_subscribers_and_publishers() -> None:
    scenario = next(s for s in run_all.SCENARIOS if s.key == "s5-2nodes")
    run = run_all.Running(
        proto="centrifugo",
        ws_urls=["ws://a", "ws://b"],
        api_urls=["http://a/api/publish", "http://b/api/publish"],
    )
    args = run_all.parse_args(["--quick"])
    args.bench_python = Path(sys.executable)
    command = run_all.tool_command(scenario, run, args)
    assert command.count("--ws-url") == 2 and command.count("--api-url") == 2


# --- end to end against the websockets peer, with injected faults -----------------------------


@pytest.fixture
def peer(request: pytest.FixtureRequest) -> Iterator[tuple[int, int]]:
    pytest.importorskip("websockets")
    port, api_port = procs.free_port(), procs.free_port()
    command = [
        sys.executable,
        str(BENCH / "peers" / "peer_websockets.py"),
        "--port",
        str(port),
        "--api-port",
        str(api_port),
    ]
    if request.param:
        command += ["--fault", request.param, "--fault-every", "7"]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        procs.wait_ports(proc, [port, api_port], 20)
        yield port, api_port
    finally:
        procs.stop_process(proc, 10)
        if proc.stderr is not None:
            proc.stderr.close()


def run_fanout(port: int, api_port: int) -> dict[str, object]:
    command = [
        sys.executable,
        str(BENCH / "fanout.py"),
        "--ws-url",
        f"ws://127.0.0.1:{port}",
        "--api-url",
        f"http://127.0.0.1:{api_port}/api/publish",
        "-n",
        "8",
        "-c",
        "2",
        "-m",
        "60",
        "--drain",
        "1",
        "--settle",
        "0.2",
        "--max-seconds",
        "40",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=True)
    record: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return record


# 2 channels x 30 publications, every 7th of a channel is faulty: offsets 7, 14, 21, 28 -> 8.
@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    ("peer", "expected"),
    [
        (None, {"publish_acked": 60, "lost": 0, "duplicated": 0, "reordered": 0}),
        ("drop", {"publish_acked": 60, "lost": 8, "duplicated": 0, "reordered": 0}),
        ("dup", {"publish_acked": 60, "lost": 0, "duplicated": 8, "reordered": 0}),
        ("reorder", {"publish_acked": 60, "lost": 0, "duplicated": 0, "reordered": 8}),
        ("reject", {"publish_acked": 52, "lost": 0, "duplicated": 0, "reordered": 0}),
    ],
    indirect=["peer"],
)
def test_fanout_counts_exactly_the_injected_faults(
    peer: tuple[int, int], expected: dict[str, int]
) -> None:
    record = run_fanout(*peer)
    assert {k: record[k] for k in expected} == expected
    assert record["connections"] == 8
    assert record["misrouted"] == 0 and record["delivered_unacked"] == 0
    assert record["deliveries_expected"] == 4 * expected["publish_acked"]


@pytest.mark.timeout(90)
@pytest.mark.parametrize("peer", [None], indirect=True)
def test_idle_connections_all_receive_one_broadcast(peer: tuple[int, int]) -> None:
    port, api_port = peer
    command = [
        sys.executable,
        str(BENCH / "connections.py"),
        "--port",
        str(port),
        "--api-port",
        str(api_port),
        "-n",
        "60",
        "--procs",
        "2",
        "--settle",
        "0.2",
        "--hold",
        "0.2",
        "--max-seconds",
        "40",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=True)
    record = json.loads(done.stdout.strip().splitlines()[-1])
    assert record["connections"] == 60 and record["connect_failed"] == 0
    assert record["reached"] == 60 and record["disconnects"] == 0
    assert record["sources"] == ["127.0.0.2", "127.0.0.3"]
    assert 0 < record["reach_s"] < 10


def test_wait_message_returns_none_when_the_parent_is_silent() -> None:
    import multiprocessing

    mine, theirs = multiprocessing.Pipe()
    assert asyncio.run(procs.wait_message(theirs, 0.05)) is None
    mine.send(("go", {}))
    assert asyncio.run(procs.wait_message(theirs, 5)) == ("go", {})


# --- Centrifugo's bidirectional emulation (http_stream, sse) ----------------------------------


def test_stream_framing_keeps_incomplete_lines_and_events() -> None:
    buf = bytearray(b'{"id":1}\n{}\n{"pu')
    assert protocols.take_lines(buf) == '{"id":1}\n{}'
    assert buf == bytearray(b'{"pu')
    assert protocols.take_lines(buf) is None
    sse = bytearray(b'\r\ndata: {"id":1}\n\ndata: {}\n\ndata: {"x"')
    assert protocols.take_sse(sse) == '{"id":1}\n{}'
    assert sse == bytearray(b'data: {"x"')
    assert protocols.take_sse(bytearray(b"\r\n: comment\n\n")) == ""
    assert protocols.http_base("ws://127.0.0.1:9/") == "http://127.0.0.1:9"


def test_emulation_scenarios_switch_the_transports_on_and_pick_the_protocol() -> None:
    args = run_all.parse_args(["--quick", "--scenarios", "s1-sse,s1-http_stream,s1-ws"])
    args.bench_python = Path(sys.executable)
    run = run_all.Running(proto="centrifugo", ws_urls=["ws://a"], api_urls=["http://a/api"])
    protos = {}
    for scenario in run_all.SCENARIOS:
        if scenario.key in args.scenario_keys:
            config = run_all.centripy_config(scenario, args.pg_url, "t")
            assert config["http_stream"] is True and config["sse"] is True
            command = run_all.tool_command(scenario, run, args)
            protos[scenario.key] = command[command.index("--proto") + 1]
    assert protos == {
        "s1-ws": "centrifugo",
        "s1-sse": "centrifugo-sse",
        "s1-http_stream": "centrifugo-http-stream",
    }


@pytest.mark.timeout(120)
@pytest.mark.parametrize("proto", ["centrifugo-sse", "centrifugo-http-stream"])
def test_fanout_over_emulation_against_centripy(tmp_path: Path, proto: str) -> None:
    small_fanout(
        {"client_insecure": True, "api_key": "bench", "http_stream": True, "sse": True},
        tmp_path,
        proto,
        http_url=True,
    )
