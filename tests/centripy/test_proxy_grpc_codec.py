"""The GRPC proxy's pure parts: proto field numbers as Centrifugo publishes them, the
JSON-shaped request -> proto request, the proto reply -> JSON-shaped response, the call
metadata and the settings read from the config."""

from __future__ import annotations

import base64
from dataclasses import replace
from pathlib import Path

import orjson
import pytest

from centripy.engine.config import Config, ConfigError, ProxyConfig
from centripy.engine.proxy import ProxyError
from centripy.proxy import proxy_pb2 as pb
from centripy.proxy.grpc import (
    METHODS,
    SERVICE,
    GrpcSettings,
    call_metadata,
    decode_response,
    encode_request,
    settings_from_config,
)

# Centrifugo v5 internal/proxyproto/proxy.proto: (message, field, number).
FIELD_NUMBERS = [
    ("Disconnect", "code", 1), ("Disconnect", "reason", 2),
    ("Error", "code", 1), ("Error", "message", 2), ("Error", "temporary", 3),
    ("ConnectRequest", "client", 1), ("ConnectRequest", "transport", 2),
    ("ConnectRequest", "protocol", 3), ("ConnectRequest", "encoding", 4),
    ("ConnectRequest", "data", 10), ("ConnectRequest", "b64data", 11),
    ("ConnectRequest", "name", 12), ("ConnectRequest", "version", 13),
    ("ConnectRequest", "channels", 14),
    ("ConnectResult", "user", 1), ("ConnectResult", "expire_at", 2), ("ConnectResult", "info", 3),
    ("ConnectResult", "b64info", 4), ("ConnectResult", "data", 5), ("ConnectResult", "b64data", 6),
    ("ConnectResult", "channels", 7), ("ConnectResult", "subs", 8), ("ConnectResult", "meta", 9),
    ("SubscribeOptions", "expire_at", 1), ("SubscribeOptions", "info", 2),
    ("SubscribeOptions", "b64info", 3), ("SubscribeOptions", "data", 4),
    ("SubscribeOptions", "b64data", 5), ("SubscribeOptions", "override", 6),
    ("RefreshRequest", "user", 10), ("RefreshRequest", "meta", 11),
    ("RefreshResult", "expired", 1), ("RefreshResult", "expire_at", 2),
    ("RefreshResult", "info", 3), ("RefreshResult", "b64info", 4), ("RefreshResult", "meta", 5),
    ("SubscribeRequest", "user", 10), ("SubscribeRequest", "channel", 11),
    ("SubscribeRequest", "token", 12), ("SubscribeRequest", "meta", 13),
    ("SubscribeRequest", "data", 14), ("SubscribeRequest", "b64data", 15),
    ("SubscribeOptionOverride", "presence", 1), ("SubscribeOptionOverride", "join_leave", 2),
    ("SubscribeOptionOverride", "force_recovery", 3),
    ("SubscribeOptionOverride", "force_positioning", 4),
    ("SubscribeOptionOverride", "force_push_join_leave", 5),
    ("SubscribeResult", "expire_at", 1), ("SubscribeResult", "info", 2),
    ("SubscribeResult", "b64info", 3), ("SubscribeResult", "data", 4),
    ("SubscribeResult", "b64data", 5), ("SubscribeResult", "override", 6),
    ("PublishRequest", "user", 10), ("PublishRequest", "channel", 11),
    ("PublishRequest", "data", 12), ("PublishRequest", "b64data", 13),
    ("PublishRequest", "meta", 14),
    ("PublishResult", "data", 1), ("PublishResult", "b64data", 2),
    ("PublishResult", "skip_history", 3),
    ("RPCRequest", "user", 10), ("RPCRequest", "method", 11), ("RPCRequest", "data", 12),
    ("RPCRequest", "b64data", 13), ("RPCRequest", "meta", 14),
    ("RPCResult", "data", 1), ("RPCResult", "b64data", 2),
    ("SubRefreshRequest", "user", 10), ("SubRefreshRequest", "channel", 11),
    ("SubRefreshRequest", "meta", 12),
    ("SubRefreshResult", "expired", 1), ("SubRefreshResult", "expire_at", 2),
    ("SubRefreshResult", "info", 3), ("SubRefreshResult", "b64info", 4),
]  # fmt: skip


@pytest.mark.parametrize(("message", "field", "number"), FIELD_NUMBERS)
def test_field_numbers_are_centrifugos(message: str, field: str, number: int) -> None:
    assert pb.DESCRIPTOR.message_types_by_name[message].fields_by_name[field].number == number


def test_service_and_methods_are_centrifugos() -> None:
    service = pb.DESCRIPTOR.services_by_name["CentrifugoProxy"]
    assert service.full_name == SERVICE == "centrifugal.centrifugo.proxy.CentrifugoProxy"
    for name, request, response in METHODS.values():
        method = service.methods_by_name[name]
        assert method.input_type.full_name == request.DESCRIPTOR.full_name
        assert method.output_type.full_name == response.DESCRIPTOR.full_name
    for message in ("ConnectResponse", "SubscribeResponse", "RPCResponse", "RefreshResponse"):
        fields = pb.DESCRIPTOR.message_types_by_name[message].fields_by_name
        assert [fields[n].number for n in ("result", "error", "disconnect")] == [1, 2, 3]


# ----------------------------------------------------------------------------- requests


def test_connect_request_carries_json_data_as_bytes() -> None:
    request = {
        "client": "c1", "transport": "websocket", "protocol": "json", "encoding": "json",
        "name": "js", "version": "5.0", "data": {"token": "é", "n": [1, 2]},
        "channels": ["news", "chat:1"],
    }  # fmt: skip
    message = encode_request("connect", request)
    assert isinstance(message, pb.ConnectRequest)
    assert (message.client, message.transport, message.protocol, message.encoding) == (
        "c1", "websocket", "json", "json",
    )  # fmt: skip
    assert (message.name, message.version) == ("js", "5.0")
    assert orjson.loads(message.data) == {"token": "é", "n": [1, 2]}
    assert list(message.channels) == ["news", "chat:1"]
    assert message.b64data == ""
    # the bytes on the wire decode with the same field numbers
    again = pb.ConnectRequest.FromString(message.SerializeToString())
    assert again == message


def test_raw_json_fragment_is_sent_unchanged() -> None:
    message = encode_request("publish", {"data": orjson.Fragment(b'{"b":1,  "a":2}')})
    assert message.data == b'{"b":1,  "a":2}'


def test_integers_beyond_64_bits_keep_their_digits() -> None:
    big = 2**70 + 1
    message = encode_request("rpc", {"data": {"n": big}})
    assert message.data == b'{"n":%d}' % big


def test_json_mode_sends_bytes_that_are_not_json_in_data() -> None:
    # e.g. a protobuf client's payload: Centrifugo puts the client's bytes in `data`
    b64 = base64.b64encode(b"\x00\xff").decode()
    message = encode_request("publish", {"encoding": "json", "b64data": b64})
    assert (message.data, message.b64data) == (b"\x00\xff", "")
    with pytest.raises(ProxyError, match="not base64"):
        encode_request("publish", {"encoding": "json", "b64data": "%%%"})


def test_binary_mode_sends_the_base64_string_field() -> None:
    b64 = base64.b64encode(b"\x00\xff").decode()
    message = encode_request("rpc", {"encoding": "binary", "method": "m", "b64data": b64})
    assert isinstance(message, pb.RPCRequest)
    assert (message.encoding, message.method, message.b64data, message.data) == (
        "binary", "m", b64, b"",
    )  # fmt: skip


@pytest.mark.parametrize("kind", ["refresh", "subscribe", "publish", "sub_refresh", "rpc"])
def test_user_and_meta(kind: str) -> None:
    message = encode_request(kind, {"user": "42", "meta": {"plan": "pro"}})
    assert message.user == "42"
    assert orjson.loads(message.meta) == {"plan": "pro"}


def test_subscribe_and_sub_refresh_fields() -> None:
    sub = encode_request("subscribe", {"channel": "ns:c", "token": "t", "data": None})
    assert (sub.channel, sub.token, sub.data) == ("ns:c", "t", b"")
    refresh = encode_request("sub_refresh", {"channel": "ns:c", "data": {"x": 1}})
    assert refresh.channel == "ns:c"  # sub_refresh has no data field: left out


def test_keys_without_a_field_are_left_out() -> None:
    message = encode_request("refresh", {"user": "u", "channel": "x", "future_field": 1})
    assert message == pb.RefreshRequest(user="u")


def test_bad_requests() -> None:
    with pytest.raises(ValueError, match="unknown proxy call kind"):
        encode_request("presence", {})
    with pytest.raises(ProxyError, match="'user'"):
        encode_request("rpc", {"user": 42})
    with pytest.raises(ProxyError, match="not JSON"):
        encode_request("rpc", {"data": {1, 2}})


# ---------------------------------------------------------------------------- responses


def test_disconnect_wins_over_error_and_result() -> None:
    reply = pb.ConnectResponse(
        result=pb.ConnectResult(user="u"),
        error=pb.Error(code=1000, message="no"),
        disconnect=pb.Disconnect(code=4501, reason="unauthorized"),
    )
    assert decode_response(reply) == {"disconnect": {"code": 4501, "reason": "unauthorized"}}


def test_error_wins_over_result() -> None:
    reply = pb.SubscribeResponse(
        result=pb.SubscribeResult(), error=pb.Error(code=403, message="denied", temporary=True)
    )
    assert decode_response(reply) == {
        "error": {"code": 403, "message": "denied", "temporary": True}
    }


def test_no_result_and_empty_result_differ() -> None:
    assert decode_response(pb.ConnectResponse()) == {}
    assert decode_response(pb.ConnectResponse(result=pb.ConnectResult())) == {
        "result": {"user": ""}
    }
    assert decode_response(pb.SubscribeResponse(result=pb.SubscribeResult())) == {"result": {}}
    assert decode_response(pb.RPCResponse()) == {}


def test_connect_result() -> None:
    result = pb.ConnectResult(
        user="56",
        expire_at=1_735_689_600,
        info=b'{"name":"Alex"}',
        data=b'{"hello":1}',
        channels=["news"],
        meta=b'{"k":"v"}',
    )
    result.subs["$personal:56"].CopyFrom(
        pb.SubscribeOptions(
            data=b"\x01",
            b64info=base64.b64encode(b"ci").decode(),
            override=pb.SubscribeOptionOverride(presence=pb.BoolValue(value=False)),
        )
    )
    out = decode_response(pb.ConnectResponse(result=result))
    assert out == {
        "result": {
            "user": "56",
            "expire_at": 1_735_689_600,
            "b64info": base64.b64encode(b'{"name":"Alex"}').decode(),
            "b64data": base64.b64encode(b'{"hello":1}').decode(),
            "channels": ["news"],
            "subs": {
                "$personal:56": {
                    "b64data": "AQ==",
                    "b64info": base64.b64encode(b"ci").decode(),
                    "override": {"presence": {"value": False}},
                }
            },
            "meta": {"k": "v"},
        }
    }


def test_a_set_base64_field_wins_over_bytes() -> None:
    result = pb.RPCResult(data=b"bytes", b64data=base64.b64encode(b"b64").decode())
    assert decode_response(pb.RPCResponse(result=result)) == {
        "result": {"b64data": base64.b64encode(b"b64").decode()}
    }


def test_publish_refresh_and_sub_refresh_results() -> None:
    publish = pb.PublishResponse(result=pb.PublishResult(data=b'"x"', skip_history=True))
    assert decode_response(publish) == {
        "result": {"b64data": base64.b64encode(b'"x"').decode(), "skip_history": True}
    }
    refresh = pb.RefreshResponse(result=pb.RefreshResult(expired=True))
    assert decode_response(refresh) == {"result": {"expired": True}}
    sub_refresh = pb.SubRefreshResponse(result=pb.SubRefreshResult(expire_at=5, info=b"{}"))
    assert decode_response(sub_refresh) == {"result": {"expire_at": 5, "b64info": "e30="}}
    override = pb.SubscribeOptionOverride(
        join_leave=pb.BoolValue(value=True), force_recovery=pb.BoolValue(value=True)
    )
    subscribe = pb.SubscribeResponse(result=pb.SubscribeResult(override=override))
    assert decode_response(subscribe) == {
        "result": {"override": {"join_leave": {"value": True}, "force_recovery": {"value": True}}}
    }


def test_meta_that_is_not_json_is_a_proxy_error() -> None:
    with pytest.raises(ProxyError, match="meta is not JSON"):
        decode_response(pb.RefreshResponse(result=pb.RefreshResult(meta=b"{nope")))


# ----------------------------------------------------------------------------- metadata


def test_call_metadata() -> None:
    settings = GrpcSettings(
        endpoint="grpc://h:1",
        target="h:1",
        credentials=("x-api-key", "secret"),
        static_only=frozenset({"x-static"}),
    )
    headers = {
        "Cookie": "sid=1",
        "X-Static": "s",
        "Origin": "http://a",
        "User-Agent": "ua",
        "X-Latin": "caf\xe9",
        "Bad Key": "v",
        "X-Trace-Bin": "\x01",
    }
    assert call_metadata(headers, settings) == (
        ("cookie", "sid=1"),
        ("origin", "http://a"),
        ("x-trace-bin", b"\x01"),
        ("x-api-key", "secret"),
    )


# ----------------------------------------------------------------------------- settings


def test_settings_from_top_level_keys(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_bytes(b"PEM")
    config = Config(
        proxy_connect_endpoint="grpc://127.0.0.1:5000",
        proxy_grpc_cert_file=str(ca),
        proxy_grpc_credentials_key="Authorization",
        proxy_grpc_credentials_value="Bearer t",
        proxy_grpc_compression=True,
        proxy_http_headers=("Cookie", "X-Both"),
        proxy_static_http_headers={"X-Static": "1", "X-Both": "2"},
    )
    settings = settings_from_config("grpc://127.0.0.1:5000", config)
    assert settings == GrpcSettings(
        endpoint="grpc://127.0.0.1:5000",
        target="127.0.0.1:5000",
        root_certificates=b"PEM",
        credentials=("authorization", "Bearer t"),
        compression=True,
        static_only=frozenset({"x-static"}),
    )


def test_settings_in_granular_mode() -> None:
    config = Config(
        granular_proxy_mode=True,
        proxies=(
            ProxyConfig(name="h", endpoint="http://127.0.0.1:1/x"),
            ProxyConfig(name="g", endpoint="grpc://[::1]:7000", grpc_compression=True,
                        grpc_credentials_key="k", grpc_credentials_value="v"),
        ),
    )  # fmt: skip
    settings = settings_from_config("grpc://[::1]:7000", config)
    assert (settings.target, settings.compression, settings.credentials) == (
        "[::1]:7000", True, ("k", "v"),
    )  # fmt: skip


def test_granular_proxies_sharing_an_endpoint_are_told_apart_by_name() -> None:
    config = Config(
        granular_proxy_mode=True,
        proxies=(
            ProxyConfig(name="a", endpoint="grpc://h:1", grpc_credentials_key="ka"),
            ProxyConfig(name="b", endpoint="grpc://h:1", grpc_credentials_key="kb"),
        ),
    )
    assert settings_from_config("grpc://h:1", config, "b").credentials == ("kb", "")
    assert settings_from_config("grpc://h:1", config).credentials == ("ka", "")


@pytest.mark.parametrize(
    ("config", "endpoint", "key"),
    [
        (Config(proxy_rpc_endpoint="grpc://"), "grpc://", "proxy_rpc_endpoint"),
        (Config(proxy_rpc_endpoint="grpc://h:1/path"), "grpc://h:1/path", "proxy_rpc_endpoint"),
        (Config(proxy_connect_endpoint="grpc://h:x"), "grpc://h:x", "proxy_connect_endpoint"),
        (Config(proxy_connect_endpoint="http://h:1"), "http://h:1", "proxy_connect_endpoint"),
        (
            Config(proxy_grpc_cert_file="/nonexistent/ca.pem", proxy_rpc_endpoint="grpc://h:1"),
            "grpc://h:1",
            "proxy_grpc_cert_file",
        ),
        (
            Config(proxy_grpc_credentials_key="bad key", proxy_rpc_endpoint="grpc://h:1"),
            "grpc://h:1",
            "proxy_grpc_credentials_key",
        ),
        (
            Config(granular_proxy_mode=True, proxies=(ProxyConfig(name="p", endpoint="grpc://h"),
                   ProxyConfig(name="q", endpoint="grpc://h:1", grpc_cert_file="/nonexistent"))),
            "grpc://h:1",
            "proxies[1].grpc_cert_file",
        ),
    ],
)  # fmt: skip
def test_bad_settings_name_the_key(config: Config, endpoint: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        settings_from_config(endpoint, config)
    assert info.value.key == key


def test_unknown_granular_endpoint() -> None:
    config = replace(Config(), granular_proxy_mode=True)
    with pytest.raises(ConfigError, match="no proxy has the endpoint"):
        settings_from_config("grpc://h:1", config)
