"""The proxy calls of a connection actor (docs/spec/proxy.md): each function builds the
request from the connection's state, calls the proxy through `ctx.proxies` and returns
the mapped result; the command handlers in `connection.py` apply it. Runs on the loop,
inside the actor's handler (the next command waits for the call).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from centripy.actors.transport import Format
from centripy.engine import proxy
from centripy.engine.channels import ChannelName
from centripy.engine.protocol.codes import Disconnect, DisconnectCode, Error, ErrorCode
from centripy.engine.protocol.commands import (
    ConnectRequest,
    PublishRequest,
    RPCRequest,
    SubscribeRequest,
)
from centripy.engine.types import ClientInfo

if TYPE_CHECKING:
    from centripy.actors.connection_core import ConnectionCore, Subscription


def _request(conn: ConnectionCore, target: proxy.ProxyTarget) -> dict[str, Any]:
    protocol = "protobuf" if conn.transport.format == Format.PROTOBUF else "json"
    return proxy.base_request(conn.client_id, conn.transport.name, protocol, target)


def _user_request(conn: ConnectionCore, target: proxy.ProxyTarget) -> dict[str, Any]:
    request = _request(conn, target)
    request["user"] = conn.user
    proxy.add_meta(request, conn.meta, target)
    return request


def _proxies(conn: ConnectionCore) -> proxy.Proxies:
    proxies = conn.ctx.proxies
    assert proxies is not None
    return proxies


def connect_target(conn: ConnectionCore) -> proxy.ProxyTarget | None:
    proxies = conn.ctx.proxies
    return proxies.routes.connect if proxies is not None else None


def refresh_target(conn: ConnectionCore) -> proxy.ProxyTarget | None:
    """The refresh proxy: with one the server refreshes connections itself."""
    proxies = conn.ctx.proxies
    return proxies.routes.refresh if proxies is not None else None


def subscribe_target(conn: ConnectionCore, name: ChannelName) -> proxy.ProxyTarget | None:
    """The subscribe proxy of the channel (never for user-limited channels)."""
    proxies = conn.ctx.proxies
    if proxies is None or name.user_limited:
        return None
    return proxies.routes.subscribe(name.options)


def sub_refresh_target(conn: ConnectionCore, name: ChannelName) -> proxy.ProxyTarget | None:
    proxies = conn.ctx.proxies
    return proxies.routes.sub_refresh(name.options) if proxies is not None else None


def publish_target(conn: ConnectionCore, name: ChannelName) -> proxy.ProxyTarget | None:
    proxies = conn.ctx.proxies
    return proxies.routes.publish(name.options) if proxies is not None else None


def _connect_parse(result: dict[str, Any] | None) -> proxy.ConnectResult | None:
    return proxy.connect_result(result) if result is not None else None


async def connect(
    conn: ConnectionCore, target: proxy.ProxyTarget, req: ConnectRequest
) -> proxy.ConnectResult:
    """Authenticate a tokenless connect with the connect proxy: sets the connection's user,
    info, meta and expiry. A response without a result leaves the connection anonymous
    only where anonymous connections are allowed (3501 otherwise)."""
    request = _request(conn, target)
    if req.name:
        request["name"] = req.name
    if req.version:
        request["version"] = req.version
    proxy.add_payload(request, "data", req.data, target.binary)
    if req.subs:
        request["channels"] = list(req.subs)
    result = await _proxies(conn).call(
        target, "connect", request, conn.proxy_headers, _connect_parse
    )
    if result is None:
        config = conn.config
        if not (config.allow_anonymous_connect_without_token or config.client_insecure):
            raise Disconnect.of(DisconnectCode.BAD_REQUEST)
        return proxy.ConnectResult()
    conn.user = result.user
    conn.conn_info = result.info
    conn.meta = result.meta
    conn.expire_at = max(result.expire_at, 0)
    return result


async def subscribe(
    conn: ConnectionCore, target: proxy.ProxyTarget, req: SubscribeRequest
) -> proxy.SubscribeResult:
    request = _user_request(conn, target)
    request["channel"] = req.channel
    if req.token:
        request["token"] = req.token
    proxy.add_payload(request, "data", req.data, target.binary)
    return await _proxies(conn).call(
        target, "subscribe", request, conn.proxy_headers, proxy.subscribe_result
    )


async def publish(
    conn: ConnectionCore, target: proxy.ProxyTarget, req: PublishRequest
) -> proxy.PublishResult:
    request = _user_request(conn, target)
    request["channel"] = req.channel
    proxy.add_payload(request, "data", req.data, target.binary)
    return await _proxies(conn).call(
        target, "publish", request, conn.proxy_headers, proxy.publish_result
    )


async def rpc(conn: ConnectionCore, req: RPCRequest) -> bytes:
    """The rpc proxy's reply data; Error 108 without an rpc proxy for the method."""
    proxies = conn.ctx.proxies
    if proxies is None:
        raise Error.of(ErrorCode.NOT_AVAILABLE)
    target = proxies.routes.rpc(req.method)
    request = _user_request(conn, target)
    request["method"] = req.method
    proxy.add_payload(request, "data", req.data, target.binary)
    return await proxies.call(target, "rpc", request, conn.proxy_headers, proxy.rpc_data)


def _refresh_parse(result: dict[str, Any] | None) -> proxy.RefreshResult | None:
    return proxy.refresh_result(result) if result is not None else None


async def refresh(conn: ConnectionCore, target: proxy.ProxyTarget) -> None:
    """Server-side refresh when the connection's expiry passed (as Centrifugo): a result
    moves the expiry (and info/meta); no result, `expired` or an expiry in the past closes
    with 3005; a failed call tries again in a minute; an error reply closes with 3004, a
    disconnect with its code."""
    request = _user_request(conn, target)
    now = int(time.time())
    try:
        result = await _proxies(conn).call_or_fail(
            target, "refresh", request, conn.proxy_headers, _refresh_parse
        )
    except proxy.ProxyError:
        conn.expire_at = now + proxy.RETRY_AFTER_FAILED_REFRESH
        conn._schedule_expiry()
        return
    except Disconnect as exc:
        conn.close(exc.code, exc.reason)
        return
    except Error:
        conn.close(DisconnectCode.INTERNAL)
        return
    if result is None or result.expired:
        conn.close(DisconnectCode.EXPIRED)
        return
    if result.expire_at > 0:
        conn.expire_at = result.expire_at
        if result.info is not None:
            conn.conn_info = result.info
        if result.meta is not None:
            conn.meta = result.meta
    if conn.expire_at <= time.time():
        conn.close(DisconnectCode.EXPIRED)
        return
    conn._schedule_expiry()


async def sub_refresh(
    conn: ConnectionCore, target: proxy.ProxyTarget, channel: str, sub: Subscription
) -> bool:
    """Server-side refresh of an expired subscription; False when it stays expired (the
    caller unsubscribes it). A failed call tries again in a minute."""
    request = _user_request(conn, target)
    request["channel"] = channel
    now = int(time.time())
    try:
        result = await _proxies(conn).call_or_fail(
            target, "sub_refresh", request, conn.proxy_headers, _refresh_parse
        )
    except proxy.ProxyError:
        sub.expire_at = now + proxy.RETRY_AFTER_FAILED_REFRESH
        return True
    except Disconnect as exc:
        conn.close(exc.code, exc.reason)
        return True
    except Error:
        return False
    if result is None or result.expired or 0 < result.expire_at < now:
        return False
    sub.expire_at = result.expire_at
    if result.info:
        old = sub.info
        sub.info = ClientInfo(old.user, old.client, old.conn_info, result.info)
    return True
