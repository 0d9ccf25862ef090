import math
import re
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from centripy.engine.metrics import Metrics

DASHBOARD = Path(__file__).parents[2] / "examples" / "grafana" / "centripy-dashboard.json"


def parse(m: Metrics) -> dict[str, tuple[str, list[Sample]]]:
    """Family name -> (type, samples), through prometheus_client's own parser."""
    return {
        f.name: (f.type, f.samples) for f in text_string_to_metric_families(m.render().decode())
    }


def test_counters_keep_go_names_without_total_suffix() -> None:
    m = Metrics()
    m.inc("centrifugo_node_messages_sent_count", "sent", type="publication")
    m.inc("centrifugo_node_messages_sent_count", type="publication", amount=2)
    m.server_disconnect(3008)
    text = m.render().decode()
    # exactly as Go writes a counter: TYPE line and samples under the same name
    assert "# TYPE centrifugo_node_messages_sent_count counter\n" in text
    assert 'centrifugo_node_messages_sent_count{type="publication"} 3\n' in text
    assert 'centrifugo_client_num_server_disconnects{code="3008"} 1\n' in text
    assert "_total" not in "".join(line for line in text.splitlines() if "centrifugo_" in line)
    assert "_created" not in text
    families = parse(m)
    kind, samples = families["centrifugo_node_messages_sent_count"]
    assert kind == "counter" and samples[0].value == 3
    assert m.value("centrifugo_node_messages_sent_count", type="publication") == 3


def test_gauges_collectors_and_escaping() -> None:
    m = Metrics()
    m.set("centrifugo_node_build", 1, "Node build info.", version='5.2"x\\')
    m.collector(
        lambda: [
            ("centrifugo_node_num_clients", "gauge", (), 3),
            ("centripy_consumer_applied_total", "counter", (("consumer", "k"),), 7),
        ]
    )
    families = parse(m)
    kind, samples = families["centrifugo_node_build"]
    assert kind == "gauge" and samples[0].labels == {"version": '5.2"x\\'}
    assert families["centrifugo_node_num_clients"][1][0].value == 3
    kind, samples = families["centripy_consumer_applied"]
    assert kind == "counter" and samples[0].name == "centripy_consumer_applied_total"
    assert samples[0].value == 7


def test_api_histogram_and_summary_counts() -> None:
    m = Metrics()
    for seconds in (0.001, 0.02, 0.3, 20.0):
        m.api_command("http", "publish", seconds)
    m.api_command("http", "publish", 0.002, times=10)  # a parallel batch's publishes
    m.api_command("http", "batch", 0.004)
    families = parse(m)
    kind, samples = families["centrifugo_api_command_duration_seconds"]
    assert kind == "summary"
    by_name = {(s.name, s.labels["method"]): s.value for s in samples}
    assert by_name[("centrifugo_api_command_duration_seconds_count", "publish")] == 14
    assert by_name[("centrifugo_api_command_duration_seconds_sum", "publish")] == pytest.approx(
        20.321 + 0.02
    )
    kind, samples = families["centrifugo_api_command_duration_seconds_histogram"]
    assert kind == "histogram"
    buckets = {
        s.labels["le"]: s.value
        for s in samples
        if s.name.endswith("_bucket") and s.labels["method"] == "publish"
    }
    # Go's DefBuckets, cumulative, le formatted as Go does
    assert buckets["0.005"] == 11 and buckets["0.025"] == 12 and buckets["0.5"] == 13
    assert buckets["10"] == 13 and buckets["+Inf"] == 14
    assert list(buckets) == [
        "0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1", "2.5", "5", "10", "+Inf",
    ]  # fmt: skip
    assert all(s.labels["protocol"] == "http" for s in samples)


def test_bucket_bound_is_inclusive() -> None:
    m = Metrics()
    m.api_command("grpc", "info", 0.005)  # le="0.005" includes 0.005 itself
    samples = parse(m)["centrifugo_api_command_duration_seconds_histogram"][1]
    first = next(s for s in samples if s.name.endswith("_bucket"))
    assert first.labels["le"] == "0.005" and first.value == 1


def test_transport_counts_per_batch() -> None:
    m = Metrics()
    ws = m.transport("websocket")
    assert m.transport("websocket") is ws  # shared by the transport's connections
    ws.sent([b"x" * 10], pushes=True)
    ws.sent([b"y" * 5, b"z" * 7], pushes=False)
    m.received("websocket", ["connect", "subscribe"], 40)
    families = parse(m)
    sent = {
        s.labels["frame_type"]: s.value for s in families["centrifugo_transport_messages_sent"][1]
    }
    assert sent == {"push_publication": 1, "reply": 2}
    sizes = {
        s.labels["frame_type"]: s.value
        for s in families["centrifugo_transport_messages_sent_size"][1]
    }
    assert sizes == {"push_publication": 10, "reply": 12}
    received = families["centrifugo_transport_messages_received"][1]
    assert {s.labels["frame_type"] for s in received} == {"connect", "subscribe"}
    assert all(s.labels["transport"] == "websocket" for s in received)
    assert all(s.labels["channel_namespace"] == "" for s in received)


def test_proxy_hook_granular_and_not() -> None:
    m = Metrics()
    m.observe_proxy("http", "connect", "", 0.01, error=False)
    m.observe_proxy("grpc", "rpc", "", 0.02, error=True)
    m.observe_proxy("http", "subscribe", "auth", 0.03, error=True)
    families = parse(m)
    errors = families["centrifugo_proxy_errors"][1]
    assert [(s.labels, s.value) for s in errors] == [({"protocol": "grpc", "type": "rpc"}, 1)]
    granular = families["centrifugo_granular_proxy_errors"][1]
    assert granular[0].labels == {"type": "subscribe", "name": "auth"}
    count = [
        s for s in families["centrifugo_proxy_duration_seconds"][1] if s.name.endswith("_count")
    ]
    assert {s.labels["type"] for s in count} == {"connect", "rpc"}
    assert "centrifugo_granular_proxy_duration_seconds_histogram" in families


def test_log_commit_histograms_and_standard_collectors() -> None:
    m = Metrics()
    m.log_commit(37, 0.0031, failed=False)
    m.log_commit(2, 0.5, failed=True)
    families = parse(m)
    size = {
        s.labels.get("le"): s.value for s in families["centripy_log_batch_size"][1]
    }  # cumulative buckets, then count and sum (no le)
    assert size["20"] == 1 and size["50"] == 2
    append = families["centripy_log_append_duration_seconds"][1]
    assert next(s.value for s in append if s.name.endswith("_count")) == 2
    assert families["centripy_log_errors"][1][0].labels == {"op": "append"}
    for name in (
        "process_cpu_seconds",
        "process_resident_memory_bytes",
        "python_gc_objects_collected",
    ):
        assert name in families
    assert "python_info" in families


def test_each_node_has_its_own_registry() -> None:
    a, b = Metrics(), Metrics()
    a.server_unsubscribe(2500)
    a.recover(True)
    b.recover(False)
    fa, fb = parse(a), parse(b)
    assert fa["centrifugo_client_recover"][1][0].labels == {"recovered": "yes"}
    assert fb["centrifugo_client_recover"][1][0].labels == {"recovered": "no"}
    assert "centrifugo_client_num_server_unsubscribes" not in fb


def test_empty_families_are_not_written_and_values_are_finite() -> None:
    m = Metrics()
    text = m.render().decode()
    assert "centrifugo_proxy_errors" not in text  # no child yet: nothing, as in Go
    assert "centrifugo_transport_messages_sent" not in text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            assert not math.isnan(sample.value)


def test_every_dashboard_metric_is_rendered_under_that_name() -> None:
    """The example Grafana dashboard queries only names this module renders (once every
    instrument saw an event), or the node gauges and consumer counters that
    centripy/server.py's collectors yield (checked against a real server in
    tests/integration/test_metrics.py)."""
    m = Metrics()
    m.api_command("http", "publish", 0.01)
    m.client_command("connect", 0.01)
    m.received("websocket", ["connect"], 10)
    m.transport("websocket").sent([b"x"], pushes=True)
    m.reply_error("subscribe", 102)
    m.server_unsubscribe(2000)
    m.server_disconnect(3008)
    m.recover(True)
    m.ping_pong("websocket", 0.01)
    m.observe_proxy("http", "connect", "", 0.01, error=True)
    m.observe_proxy("http", "rpc", "named", 0.01, error=True)
    m.action("publish")
    m.inc("centrifugo_node_messages_sent_count", type="publication")
    m.inc("centrifugo_transport_connect_count", transport="websocket")
    m.log_commit(3, 0.01, failed=True)
    m.broker_error("publish")
    m.set("centrifugo_node_build", 1, version="x")
    rendered = {
        line.split("{")[0].split(" ")[0]
        for line in m.render().decode().splitlines()
        if not line.startswith("#")
    }
    dashboard = DASHBOARD.read_text()
    queried = set(re.findall(r"\b((?:centrifugo|centripy|process|python)_[a-z_]+)", dashboard))
    from_server = re.compile(r"^centrifugo_node_num_|^centripy_consumer_|connection_limit")
    missing = {q for q in queried if q not in rendered and not from_server.search(q)}
    assert not missing, sorted(missing)
    assert len(queried) > 30
