"""engine/proxy.py: proxy routes (plain and granular mode), request bodies and the mapping of
proxy responses to results, errors and disconnects (docs/spec/proxy.md)."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from centripy.engine.channels import SubscribeOverride
from centripy.engine.config import Config, ProxyConfig, RpcNamespace
from centripy.engine.options import ChannelOptions
from centripy.engine.protocol.codes import Disconnect, Error
from centripy.engine.proxy import (
    ProxyError,
    ProxyRoutes,
    ProxyTarget,
    add_meta,
    add_payload,
    base_request,
    connect_result,
    outcome,
    payload,
    publish_result,
    refresh_result,
    rpc_data,
    subscribe_result,
)

# -- routes ----------------------------------------------------------------------------------


def test_plain_mode_routes_each_kind_to_its_endpoint_and_namespace_switches() -> None:
    config = Config(
        proxy_connect_endpoint="http://b/connect",
        proxy_connect_timeout=2.5,
        proxy_subscribe_endpoint="http://b/subscribe",
        proxy_rpc_endpoint="http://b/rpc",
        proxy_http_headers=("Cookie", "Authorization"),
        proxy_static_http_headers={"X-Static": "1"},
        proxy_include_connection_meta=True,
    )
    routes = ProxyRoutes(config)
    assert routes.connect is not None and routes.connect.endpoint == "http://b/connect"
    assert routes.connect.timeout == 2.5
    assert routes.connect.include_meta and not routes.connect.binary
    assert routes.refresh is None
    assert routes.subscribe(ChannelOptions(proxy_subscribe=True)) is not None
    assert routes.subscribe(ChannelOptions()) is None  # the namespace switch is off
    assert routes.publish(ChannelOptions(proxy_publish=True)) is None  # no publish endpoint
    assert routes.rpc("anything:at:all").endpoint == "http://b/rpc"
    assert routes.header_names == {"cookie", "authorization"}


def test_plain_mode_without_rpc_endpoint_answers_108() -> None:
    with pytest.raises(Error) as info:
        ProxyRoutes(Config()).rpc("m")
    assert info.value.code == 108


def test_granular_mode_routes_by_proxy_name_and_rpc_namespace() -> None:
    config = Config(
        granular_proxy_mode=True,
        proxies=(
            ProxyConfig(name="auth", endpoint="http://a/", timeout=0.5, http_headers=("Cookie",)),
            ProxyConfig(name="app", endpoint="grpc://b:1", binary_encoding=True),
        ),
        connect_proxy_name="auth",
        rpc_namespaces=(RpcNamespace("admin", rpc_proxy_name="app"), RpcNamespace("off")),
    )
    routes = ProxyRoutes(config)
    assert routes.connect is not None and routes.connect.name == "auth"
    assert routes.connect.timeout == 0.5
    assert routes.refresh is None
    assert routes.subscribe(ChannelOptions(subscribe_proxy_name="app")) == routes.targets["app"]
    assert routes.subscribe(ChannelOptions(proxy_subscribe=True)) is None  # plain switch
    assert routes.rpc("admin:stats").name == "app"
    for method, code in (("off:x", 108), ("nope:x", 104), ("top", 108)):
        with pytest.raises(Error) as info:
            routes.rpc(method)
        assert info.value.code == code, method
    assert routes.header_names == {"cookie"}


def test_forwarded_headers_are_only_the_named_ones_and_static_headers_are_added() -> None:
    routes = ProxyRoutes(
        Config(
            proxy_connect_endpoint="http://b/",
            proxy_http_headers=("Cookie",),
            proxy_static_http_headers={"X-Static": "s"},
        )
    )
    request = {"cookie": "a=1", "authorization": "Bearer x"}
    forwarded = routes.forwarded(request.get)
    assert forwarded == {"cookie": "a=1"}
    assert routes.connect is not None
    assert routes.connect.headers(forwarded) == {"cookie": "a=1", "X-Static": "s"}


# -- requests --------------------------------------------------------------------------------

JSON_TARGET = ProxyTarget("p", "http://b/", 1.0, include_meta=True)
BINARY_TARGET = ProxyTarget("p", "http://b/", 1.0, binary=True)


def test_request_fields_and_payload_encodings() -> None:
    request = base_request("cid", "websocket", "json", JSON_TARGET)
    assert request == {
        "client": "cid",
        "transport": "websocket",
        "protocol": "json",
        "encoding": "json",
    }
    add_payload(request, "data", b'{"n": 12345678901234567890123}', False)
    assert request["data"] == {"n": 12345678901234567890123}  # exact, not a float
    binary = base_request("cid", "websocket", "protobuf", BINARY_TARGET)
    assert binary["encoding"] == "binary"
    add_payload(binary, "data", b"\x00\x01", True)
    assert binary["b64data"] == base64.b64encode(b"\x00\x01").decode()
    not_json: dict[str, Any] = {}
    add_payload(not_json, "data", b"\xff", False)  # a protobuf client's bytes
    assert not_json == {"b64data": "/w=="}
    empty: dict[str, Any] = {}
    add_payload(empty, "data", b"", False)
    assert empty == {}


def test_meta_is_sent_only_when_the_proxy_asks() -> None:
    request: dict[str, Any] = {}
    add_meta(request, b'{"plan":"pro"}', JSON_TARGET)
    assert request == {"meta": {"plan": "pro"}}
    request = {}
    add_meta(request, b'{"plan":"pro"}', BINARY_TARGET)
    assert request == {}


# -- responses -------------------------------------------------------------------------------


def test_outcome_maps_result_error_and_disconnect() -> None:
    assert outcome({"result": {"user": "u"}}) == {"user": "u"}
    assert outcome({}) is None
    assert outcome({"result": None}) is None
    with pytest.raises(Error) as err:
        outcome({"error": {"code": 1000, "message": "custom", "temporary": True}})
    assert (err.value.code, err.value.message, err.value.temporary) == (1000, "custom", True)
    with pytest.raises(Disconnect) as disc:
        outcome({"disconnect": {"code": 4500, "reason": "bye"}, "result": {}})
    assert (disc.value.code, disc.value.reason) == (4500, "bye")


@pytest.mark.parametrize(
    "response",
    [
        [],
        "x",
        {"result": []},
        {"error": "no"},
        {"error": {"code": "1"}},
        {"error": {"code": -1}},
        {"disconnect": {"code": 4000, "reason": 5}},
        {"disconnect": {}},  # code 0: no close frame can carry it
        {"disconnect": {"code": 1000}},
    ],
)
def test_malformed_responses_are_proxy_errors(response: Any) -> None:
    with pytest.raises(ProxyError):
        outcome(response)


def test_payload_accepts_raw_json_base64_and_bytes() -> None:
    assert payload({"data": {"a": [1, "x"]}}, "data") == b'{"a":[1,"x"]}'
    assert payload({"data": "text"}, "data") == b'"text"'
    assert payload({"b64data": "AAE=", "data": {"a": 1}}, "data") == b"\x00\x01"
    assert payload({"data": b"\x01"}, "data") == b"\x01"  # a GRPC back end's bytes
    assert payload({}, "info") is None
    with pytest.raises(ProxyError):
        payload({"b64info": "!!"}, "info")


def test_connect_result() -> None:
    result = connect_result(
        {
            "user": "42",
            "expire_at": 1900000000,
            "info": {"name": "Ann"},
            "b64data": base64.b64encode(b'{"hello":1}').decode(),
            "channels": ["news", "chat:42"],
            "subs": {"notes": {"info": {"r": 1}, "override": {"presence": {"value": True}}}},
            "meta": {"plan": "pro"},
        }
    )
    assert (result.user, result.expire_at) == ("42", 1900000000)
    assert (result.info, result.data, result.meta) == (
        b'{"name":"Ann"}',
        b'{"hello":1}',
        b'{"plan":"pro"}',
    )
    assert result.channels == ("news", "chat:42")
    assert result.subs["notes"].info == b'{"r":1}'
    assert result.subs["notes"].override == SubscribeOverride(presence=True)
    bad: dict[str, Any]
    for bad in ({"user": 1}, {"channels": "news"}, {"expire_at": "soon"}, {"subs": []}):
        with pytest.raises(ProxyError):
            connect_result(bad)


def test_subscribe_publish_rpc_refresh_results() -> None:
    sub = subscribe_result(
        {"info": {"r": 1}, "data": {"d": 2}, "expire_at": 5, "override": {"join_leave": {}}}
    )
    assert (sub.info, sub.data, sub.expire_at) == (b'{"r":1}', b'{"d":2}', 5)
    assert sub.override == SubscribeOverride(join_leave=False)
    assert subscribe_result(None).info == b""
    with pytest.raises(ProxyError):
        subscribe_result({"override": {"presence": {"value": "yes"}}})
    assert publish_result({"data": {"x": 1}, "skip_history": True}).data == b'{"x":1}'
    assert publish_result({"skip_history": True}).skip_history
    assert publish_result({}).data is None  # keeps the client's data
    assert publish_result(None).data is None
    assert rpc_data({"data": [1, 2]}) == b"[1,2]"
    assert rpc_data(None) == b""
    refresh = refresh_result({"expire_at": 7, "info": {"n": 1}})
    assert (refresh.expired, refresh.expire_at, refresh.info) == (False, 7, b'{"n":1}')
    assert refresh_result({"expired": True}).info is None
    with pytest.raises(ProxyError):
        refresh_result({"expired": "yes"})
