from centripy.engine.metrics import Metrics


def test_render_counters_gauges_and_collectors() -> None:
    m = Metrics()
    m.inc("centrifugo_node_messages_sent_count", "sent", type="publication")
    m.inc("centrifugo_node_messages_sent_count", type="publication", amount=2)
    m.set("centrifugo_node_build", 1, version='5.2"x')
    m.collector(lambda: [("centrifugo_node_num_clients", "gauge", (), 3)])
    text = m.render().decode()
    assert "# TYPE centrifugo_node_messages_sent_count counter" in text
    assert 'centrifugo_node_messages_sent_count{type="publication"} 3' in text
    assert 'centrifugo_node_build{version="5.2\\"x"} 1' in text
    assert "centrifugo_node_num_clients 3" in text
    assert m.value("centrifugo_node_messages_sent_count", type="publication") == 3
