"""One actor per client connection: the protocol state machine of docs/spec/protocol.md.

`ConnectionCore` (`connection_core.py`) keeps the lifecycle (outbound queue, timers,
closing); this module keeps the command handlers, whose decisions are mostly pure helpers
in `engine/`. Every handler runs on the loop inside the actor, one command at a time.
"""

from __future__ import annotations

import logging
import time
from typing import Any, NamedTuple

from centripy.actors import connection_proxy
from centripy.actors.connection_core import (
    CONNECTED,
    NEW,
    UNUSABLE,
    ConnectionCore,
    Subscription,
)
from centripy.actors.hub import ServerDisconnectMsg
from centripy.engine import auth, channels, proxy, recovery
from centripy.engine.channels import ChannelName, SubscribeOverride, SubscriptionFeatures
from centripy.engine.node import VERSION
from centripy.engine.protocol.codes import Disconnect, DisconnectCode, Error, ErrorCode
from centripy.engine.protocol.commands import (
    Command,
    ConnectRequest,
    HistoryRequest,
    PresenceRequest,
    PresenceStatsRequest,
    PublishRequest,
    RefreshRequest,
    RPCRequest,
    SubRefreshRequest,
    SubscribeRequest,
    UnsubscribeRequest,
)
from centripy.engine.sessions import DisconnectCommand, ServerSubscribe
from centripy.engine.types import ClientInfo, StreamPosition

log = logging.getLogger("centripy.connection")

JsonObj = dict[str, Any]
Result = Any  # a result object of the connection's codec (a dict for JSON, a message for protobuf)


def _bad_request() -> Disconnect:
    return Disconnect.of(DisconnectCode.BAD_REQUEST)


# -- tokens that fail verification ------------------------------------------------------------

TOKEN_FAILURES = (auth.JWKSFetchError, auth.TokenExpired, auth.InvalidToken)


class TokenReplies(NamedTuple):
    """What an expired and an invalid token become, by where the token was sent."""

    expired: ErrorCode | DisconnectCode
    invalid: ErrorCode | DisconnectCode


CONNECT_TOKEN = TokenReplies(ErrorCode.TOKEN_EXPIRED, DisconnectCode.INVALID_TOKEN)
SUBSCRIPTION_TOKEN = TokenReplies(ErrorCode.TOKEN_EXPIRED, ErrorCode.PERMISSION_DENIED)
REFRESH_TOKEN = TokenReplies(DisconnectCode.EXPIRED, DisconnectCode.INVALID_TOKEN)


def token_failure(exc: Exception, replies: TokenReplies) -> Error | Disconnect:
    """The error reply or disconnect (to raise) for a token whose verification raised one
    of `TOKEN_FAILURES`: a JWKS endpoint that cannot be read is an internal error (the
    client retries), otherwise `replies` decides."""
    if isinstance(exc, auth.JWKSFetchError):
        return Error.of(ErrorCode.INTERNAL)
    code = replies.expired if isinstance(exc, auth.TokenExpired) else replies.invalid
    return Disconnect.of(code) if isinstance(code, DisconnectCode) else Error.of(code)


class ConnectionActor(ConnectionCore):
    """Started by a transport with `ConnectionActor.start(ctx, transport)`."""

    async def handle_command(self, cmd: Command) -> None:
        """Handle one command; errors become error replies, Disconnect propagates."""
        if cmd.id == 0 and cmd.method != "send":
            self.on_pong()
            return
        if cmd.method == "" or cmd.request is None:
            raise _bad_request()
        if self.state is NEW and cmd.method != "connect":
            raise _bad_request()
        if self.state is CONNECTED and cmd.method == "connect":
            raise _bad_request()
        handler = _HANDLERS[cmd.method]
        try:
            result = await handler(self, cmd.request)
        except Error as err:
            self._reply_error(cmd, err)
            return
        except Disconnect:
            raise
        except Exception:  # storage or a bug: this command fails, the connection goes on
            log.exception("connection %s: %s failed", self.client_id, cmd.method)
            self._reply_error(cmd, Error.of(ErrorCode.INTERNAL))
            return
        if cmd.method != "send":
            self._enqueue(self.encode_reply(cmd.id, cmd.method, result))
        if cmd.method == "connect":
            self._after_connect()

    def _reply_error(self, cmd: Command, err: Error) -> None:
        if cmd.method == "connect":
            self.state = UNUSABLE
        self.node.metrics.reply_error(cmd.method, err.code)
        self._enqueue(self.codec.encode_error(cmd.id, err))

    # -- connect --------------------------------------------------------------------------

    async def cmd_connect(self, req: ConnectRequest) -> Result:
        token, proxied = None, None
        target = None if req.token else connection_proxy.connect_target(self)
        if target is not None:  # tokenless, with a connect proxy: it authenticates
            proxied = await connection_proxy.connect(self, target, req)
        else:
            token = await self._authenticate(req)
        config = self.config
        hub = self.ctx.hub
        limit = config.client_user_connection_limit
        if limit and self.user and hub.user_connection_count(self.user) >= limit:
            raise Disconnect.of(DisconnectCode.CONNECTION_LIMIT)
        now = time.time()
        if self.expire_at and self.expire_at <= now:
            raise Error.of(ErrorCode.EXPIRED)
        try:
            subs = await self._connect_subscriptions(req, token, proxied)
        except BaseException:
            for channel, sub in list(self.subs.items()):
                self._leave_channel(channel, sub)
            self.subs.clear()
            raise
        self.state = CONNECTED
        hub.add_connection(self.client_id, self.user, self.session, self.actor_ref)
        if config.user_personal_single_connection and self.user:
            others = [c for c in hub.matching(self.user, "", "") if c.client_id != self.client_id]
            code = DisconnectCode.CONNECTION_LIMIT
            reason = Disconnect.of(code).reason
            hub.tell(others, ServerDisconnectMsg(code, reason))
            if self.ctx.forward_command is not None:  # the user's connections on other nodes
                cmd = DisconnectCommand(self.user, code, reason, whitelist=(self.client_id,))
                await self.ctx.forward_command(cmd)
        transport = self.transport
        # with a refresh proxy the server refreshes: the client is not told of the expiry
        client_refresh = connection_proxy.refresh_target(self) is None
        return self.codec.connect_result_obj(
            client=self.client_id,
            version=VERSION,
            expires=bool(self.expire_at) and client_refresh,
            ttl=_ttl(self.expire_at, now) if client_refresh else 0,
            data=proxied.data if proxied is not None else b"",
            subs=subs,
            ping=int(self.config.ping_interval),
            pong=transport.pong and self.config.pong_timeout > 0,
            session=self.session if transport.emulation or transport.unidirectional else "",
            node=self.node.uid if transport.emulation else "",
        )

    async def _authenticate(self, req: ConnectRequest) -> auth.ConnectToken | None:
        config = self.config
        if not req.token:
            if not (config.allow_anonymous_connect_without_token or config.client_insecure):
                raise Disconnect(DisconnectCode.BAD_REQUEST, "bad request")
            return None
        try:
            token = await self.ctx.verifier.verify_connection_token_async(req.token)
        except TOKEN_FAILURES as exc:
            raise token_failure(exc, CONNECT_TOKEN) from None
        if not token.user_id and config.disallow_anonymous_connection_tokens:
            raise Disconnect.of(DisconnectCode.PERMISSION_DENIED)
        self.user = token.user_id
        self.conn_info = token.info
        self.meta = token.meta
        if not config.client_insecure and token.expire_at:
            self.expire_at = token.expire_at
        return token

    async def _connect_subscriptions(
        self,
        req: ConnectRequest,
        token: auth.ConnectToken | None,
        proxied: proxy.ConnectResult | None = None,
    ) -> dict[str, Result]:
        """Server-side subscriptions: token (or connect proxy) subs/channels, personal
        channel, and channels of the request's `subs` the client could subscribe to itself."""
        wanted: dict[str, tuple[bytes, bytes, SubscribeOverride | None]] = {}
        if token is not None:
            if token.subs:
                for ch, claim in token.subs.items():
                    wanted[ch] = (claim.info, claim.data, claim.override)
            else:
                for ch in token.channels:
                    wanted[ch] = (b"", b"", None)
        if proxied is not None:
            for ch in proxied.channels:
                wanted[ch] = (b"", b"", None)
            for ch, opts in proxied.subs.items():
                wanted[ch] = (opts.info, opts.data, opts.override)
        config = self.config
        if config.user_subscribe_to_personal and self.user:
            wanted.setdefault(channels.personal_channel(config, self.user), (b"", b"", None))
        for ch in req.subs:
            if ch in wanted:
                continue
            name = self.node.resolve(ch)
            channels.check_client_channel_name(config, name)
            if not name.private and channels.can_subscribe_without_token(config, name, self.user):
                wanted[ch] = (b"", b"", None)
        if len(wanted) > config.client_channel_limit:
            raise Disconnect.of(DisconnectCode.CHANNEL_LIMIT)
        results: dict[str, Result] = {}
        for ch, (info, data, override) in wanted.items():
            name = self.node.resolve(ch)
            sreq = req.subs.get(ch)
            position = StreamPosition(sreq.offset, sreq.epoch) if sreq and sreq.recover else None
            features = channels.subscription_features(
                config, name, self.user, False, False, False, override
            )
            results[ch] = await self.subscribe_channel(
                name, features, info, data, position, server_side=True, expire_at=0
            )
        return results

    def _after_connect(self) -> None:
        if self.state is CONNECTED:
            self._start_timers()

    async def uni_connect(self, req: ConnectRequest) -> None:
        """Unidirectional transports: a bare connect request, answered by a connect push."""
        try:
            result = await self.cmd_connect(req)
        except Error as err:
            self.close(*_uni_connect_disconnect(err.code))
            return
        except Disconnect as exc:
            self.close(exc.code, exc.reason)
            return
        self._enqueue(self.codec.encode_connect_push(result, unidirectional=True))
        self._after_connect()

    # -- subscribe ------------------------------------------------------------------------

    async def cmd_subscribe(self, req: SubscribeRequest) -> Result:
        if not req.channel:
            raise _bad_request()
        if req.delta and req.delta != "fossil":
            raise _bad_request()
        config = self.config
        name = self.node.resolve(req.channel)
        channels.check_client_channel_name(config, name)
        if req.channel in self.subs:
            raise Error.of(ErrorCode.ALREADY_SUBSCRIBED)
        if len(self.subs) >= config.client_channel_limit:
            raise Error.of(ErrorCode.LIMIT_EXCEEDED)
        info, data, override, expire_at = b"", b"", None, 0
        target = None if req.token else connection_proxy.subscribe_target(self, name)
        by_proxy = False  # the sub_refresh proxy refreshes it
        if req.token:
            claims = await self._verify_sub_token(req.token, req.channel)
            info, data, override, expire_at = (
                claims.info,
                claims.data,
                claims.override,
                claims.expire_at or 0,
            )
        elif name.private:
            raise Error.of(ErrorCode.PERMISSION_DENIED)
        elif target is not None:
            res = await connection_proxy.subscribe(self, target, req)
            info, data, override, expire_at = res.info, res.data, res.override, res.expire_at
            by_proxy = connection_proxy.sub_refresh_target(self, name) is not None
        elif channels.subscribe_proxy_decides(name):
            raise Error.of(ErrorCode.NOT_AVAILABLE)
        elif not channels.can_subscribe_without_token(config, name, self.user):
            raise Error.of(ErrorCode.PERMISSION_DENIED)
        if expire_at and expire_at <= time.time():
            raise Error.of(ErrorCode.EXPIRED)
        features = channels.subscription_features(
            config, name, self.user, req.positioned, req.recoverable, req.join_leave, override
        )
        position = StreamPosition(req.offset, req.epoch) if req.recover else None
        return await self.subscribe_channel(
            name,
            features,
            info,
            data,
            position,
            server_side=False,
            expire_at=expire_at,
            refresh_by_proxy=by_proxy,
        )

    async def _verify_sub_token(self, token: str, channel: str) -> auth.SubscriptionToken:
        try:
            claims = await self.ctx.verifier.verify_subscription_token_async(token)
        except TOKEN_FAILURES as exc:
            raise token_failure(exc, SUBSCRIPTION_TOKEN) from None
        if claims.channel != channel or claims.user_id != self.user:
            raise Disconnect.of(DisconnectCode.INVALID_TOKEN)
        if claims.client and claims.client != self.client_id:
            raise Disconnect.of(DisconnectCode.INVALID_TOKEN)
        return claims

    async def subscribe_channel(
        self,
        name: ChannelName,
        features: SubscriptionFeatures,
        chan_info: bytes,
        data: bytes,
        position: StreamPosition | None,
        *,
        server_side: bool,
        expire_at: int,
        refresh_by_proxy: bool = False,
    ) -> Result:
        """Join the channel actor first (later publications queue in our inbox), then read
        the stream position or recover; the reply is queued before any of those pushes."""

        channel = name.channel
        info = ClientInfo(self.user, self.client_id, self.conn_info, chan_info)
        sub = Subscription(
            name=name,
            info=info,
            positioned=features.positioned,
            recoverable=features.recoverable,
            join_leave_push=features.join_leave_push,
            presence=features.presence,
            emit_join_leave=features.emit_join_leave,
            server_side=server_side,
            expire_at=expire_at,
            refresh_by_proxy=refresh_by_proxy,
        )
        self.subs[channel] = sub
        self._want_tick()
        try:  # the hub leaves nothing behind when it raises (the position read failed)
            await self.ctx.hub.subscribe(
                channel, self.client_id, self.actor_ref, sub.join_leave_push
            )
        except BaseException:
            self.subs.pop(channel, None)
            raise
        try:
            result = await self._position(sub, position)
            if sub.presence:
                ttl = self.config.global_presence_ttl
                await self.node.presence_manager.add(channel, info, ttl)
        except BaseException:
            self.subs.pop(channel, None)
            self._leave_channel(channel, sub)
            raise
        if sub.emit_join_leave:
            self.node.join(channel, info)
        now = time.time()
        client_refresh = bool(expire_at) and not refresh_by_proxy
        return self.codec.subscribe_result_obj(
            expires=client_refresh,
            ttl=_ttl(expire_at, now) if client_refresh else 0,
            data=data,
            **result,
        )

    async def _position(self, sub: Subscription, position: StreamPosition | None) -> JsonObj:
        if not sub.positioned:
            return {}
        channel = sub.name.channel
        out: JsonObj = {"positioned": True, "recoverable": sub.recoverable}
        if sub.recoverable and position is not None:
            out["was_recovering"] = True
            limit = self.config.client_recovery_max_publication_limit
            try:
                res = await self.ctx.reads.history(
                    channel, limit=limit, since=position, name=sub.name
                )
                pubs, top = list(res.publications), res.position
                recovered = recovery.recovery_verdict(position, top, pubs)
            except Error as err:
                if err.code != ErrorCode.UNRECOVERABLE_POSITION:
                    raise
                top = await self.stream_top(channel, sub.name)
                pubs, recovered = [], False
            sub.epoch = top.epoch
            self.node.metrics.recover(recovered)
            if recovered:
                sub.offset = pubs[-1].offset if pubs else position.offset
                out.update(recovered=True, publications=pubs, offset=position.offset)
            else:
                sub.offset = max(top.offset, pubs[-1].offset if pubs else 0)
                out["offset"] = sub.offset
            out["epoch"] = top.epoch
            return out
        top = await self.stream_top(channel, sub.name)
        sub.epoch, sub.offset = top.epoch, top.offset
        out.update(epoch=top.epoch, offset=top.offset)
        return out

    async def server_subscribe(self, cmd: ServerSubscribe) -> None:
        """Server API subscribe: subscribe and push `subscribe` to the client (nothing
        when it is subscribed already or at `client_channel_limit`, as in Centrifugo)."""
        if cmd.channel in self.subs:
            return
        if len(self.subs) >= self.config.client_channel_limit:
            log.info(
                "connection %s: server subscribe to %s over the channel limit",
                self.client_id,
                cmd.channel,
            )
            return
        try:
            name = self.node.resolve(cmd.channel)
            features = channels.subscription_features(
                self.config, name, self.user, False, False, False, cmd.override
            )
            result = await self.subscribe_channel(
                name,
                features,
                cmd.info,
                cmd.data,
                cmd.recover_since,
                server_side=True,
                expire_at=cmd.expire_at,
            )
        except Error:
            return
        self._enqueue(self.codec.encode_subscribe_push(cmd.channel, result, **self._uni_kw()))

    # -- other commands -------------------------------------------------------------------

    async def cmd_unsubscribe(self, req: UnsubscribeRequest) -> Result:
        sub = self.subs.get(req.channel)
        if sub is not None and not sub.server_side:
            self._unsubscribe(req.channel, 0, push=False)
        return {}

    async def cmd_publish(self, req: PublishRequest) -> Result:
        if not req.channel or not req.data:
            raise _bad_request()
        name = self.node.resolve(req.channel)
        channels.check_client_channel_name(self.config, name)
        sub = self.subs.get(req.channel)
        info = sub.info if sub else ClientInfo(self.user, self.client_id, self.conn_info)
        target = connection_proxy.publish_target(self, name)
        if target is not None:  # the proxy decides, and may replace the data
            res = await connection_proxy.publish(self, target, req)
            data = req.data if res.data is None else res.data
            await self.node.publish(
                req.channel, data, info=info, name=name, skip_history=res.skip_history
            )
            return {}
        if channels.publish_proxy_decides(name):
            raise Error.of(ErrorCode.NOT_AVAILABLE)
        if not channels.can_publish(self.config, name, self.user, sub is not None):
            raise Error.of(ErrorCode.PERMISSION_DENIED)
        await self.node.publish(req.channel, req.data, info=info, name=name)
        return {}

    def _check_read(self, channel: str, feature: str) -> ChannelName:
        if not channel:
            raise _bad_request()
        name = self.node.resolve(channel)
        channels.check_client_channel_name(self.config, name)
        subscribed = channel in self.subs
        if feature == "presence":
            available = channels.presence_available(name.options)
            allowed = channels.can_presence(self.config, name, self.user, subscribed)
        else:
            available = channels.history_available(name.options)
            allowed = channels.can_history(self.config, name, self.user, subscribed)
        if not available:
            raise Error.of(ErrorCode.NOT_AVAILABLE)
        if not allowed:
            raise Error.of(ErrorCode.PERMISSION_DENIED)
        return name

    async def cmd_presence(self, req: PresenceRequest) -> Result:
        self._check_read(req.channel, "presence")
        return self.codec.presence_result_obj(
            await self.node.presence_manager.presence(req.channel)
        )

    async def cmd_presence_stats(self, req: PresenceStatsRequest) -> Result:
        self._check_read(req.channel, "presence")
        stats = await self.node.presence_manager.stats(req.channel)
        return self.codec.presence_stats_result_obj(stats.num_clients, stats.num_users)

    async def cmd_history(self, req: HistoryRequest) -> Result:
        name = self._check_read(req.channel, "history")
        cap = self.config.client_history_max_publication_limit
        limit = cap if req.limit < 0 or req.limit > cap else req.limit
        since = None
        if req.since is not None:
            if req.reverse and req.since.offset == 0:
                raise Error.of(ErrorCode.BAD_REQUEST)
            since = StreamPosition(req.since.offset, req.since.epoch)
        res = await self.node.history(
            req.channel, limit=limit, since=since, reverse=req.reverse, name=name
        )
        return self.codec.history_result_obj(
            res.publications, res.position.epoch, res.position.offset
        )

    async def cmd_rpc(self, req: RPCRequest) -> Result:
        return self.codec.rpc_result_obj(await connection_proxy.rpc(self, req))

    async def cmd_send(self, req: Any) -> Result:
        raise Disconnect.of(DisconnectCode.NOT_AVAILABLE)

    async def cmd_refresh(self, req: RefreshRequest) -> Result:
        if not req.token:
            raise _bad_request()
        try:
            token = await self.ctx.verifier.verify_connection_token_async(req.token)
        except TOKEN_FAILURES as exc:
            raise token_failure(exc, REFRESH_TOKEN) from None
        if token.user_id != self.user:
            raise Disconnect.of(DisconnectCode.INVALID_TOKEN)
        now = time.time()
        expire_at = 0 if self.config.client_insecure else (token.expire_at or 0)
        if expire_at and expire_at <= now:
            raise Error.of(ErrorCode.EXPIRED)
        self.expire_at = expire_at
        if token.info:
            self.conn_info = token.info
        self.meta = token.meta or self.meta
        self._schedule_expiry()
        ttl = _ttl(expire_at, now)
        return self.codec.refresh_result_obj(bool(expire_at), ttl)

    async def cmd_sub_refresh(self, req: SubRefreshRequest) -> Result:
        sub = self.subs.get(req.channel)
        if sub is None:
            raise Error.of(ErrorCode.PERMISSION_DENIED)
        if not req.token:
            raise Error.of(ErrorCode.BAD_REQUEST)
        claims = await self._verify_sub_token(req.token, req.channel)
        now = time.time()
        expire_at = claims.expire_at or 0
        if expire_at and expire_at <= now:
            raise Error.of(ErrorCode.EXPIRED)
        sub.expire_at = expire_at
        self._want_tick()
        ttl = _ttl(expire_at, now)
        return self.codec.refresh_result_obj(bool(expire_at), ttl)

    def server_refresh(self, expired: bool, expire_at: int, info: bytes | None) -> None:
        """Server API refresh: expire now, move the expiry, or remove it (expire_at 0)."""
        now = time.time()
        if expired or (expire_at and expire_at <= now):
            self.close(DisconnectCode.EXPIRED)
            return
        self.expire_at = expire_at
        if info is not None:
            self.conn_info = info
        self._schedule_expiry()
        if self.transport.unidirectional or expire_at:
            ttl = _ttl(expire_at, now)
            self._enqueue(self.codec.encode_refresh_push(bool(expire_at), ttl, **self._uni_kw()))


def _ttl(expire_at: float, now: float) -> int:
    """Seconds left until `expire_at` (0: never), as the protocol's uint32 `ttl` holds it
    (a token expiring in centuries must not overflow the protobuf field)."""
    if not expire_at:
        return 0
    return min(max(int(expire_at - now), 1), 2**32 - 1)


_UNI_CONNECT_DISCONNECTS: dict[int, DisconnectCode] = {
    ErrorCode.TOKEN_EXPIRED: DisconnectCode.EXPIRED,
    ErrorCode.EXPIRED: DisconnectCode.EXPIRED,
    ErrorCode.TOO_MANY_REQUESTS: DisconnectCode.TOO_MANY_REQUESTS,
    ErrorCode.PERMISSION_DENIED: DisconnectCode.PERMISSION_DENIED,
}


def _uni_connect_disconnect(code: int) -> tuple[int, str]:
    """The disconnect (code, reason) for a connect error on a unidirectional transport,
    which has no error reply (docs/spec/protocol.md 4.4); any other error is 3004."""
    mapped = _UNI_CONNECT_DISCONNECTS.get(code, DisconnectCode.INTERNAL)
    return mapped, Disconnect.of(mapped).reason


_HANDLERS: dict[str, Any] = {
    "connect": ConnectionActor.cmd_connect,
    "subscribe": ConnectionActor.cmd_subscribe,
    "unsubscribe": ConnectionActor.cmd_unsubscribe,
    "publish": ConnectionActor.cmd_publish,
    "presence": ConnectionActor.cmd_presence,
    "presence_stats": ConnectionActor.cmd_presence_stats,
    "history": ConnectionActor.cmd_history,
    "rpc": ConnectionActor.cmd_rpc,
    "send": ConnectionActor.cmd_send,
    "refresh": ConnectionActor.cmd_refresh,
    "sub_refresh": ConnectionActor.cmd_sub_refresh,
}
