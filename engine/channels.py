"""Channel names, namespaces and client-side permissions (docs/spec/server_api.md 2.1, 2.4, 7).

Pure functions over a `ChannelRules` (the real `engine.config.Config` satisfies it
structurally). Called from connection actors (subscribe/publish/presence/history
commands), from `engine.node` (every publish resolves its namespace) and from the API.
Thread-safe; `resolve` keeps a bounded cache of resolved names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Protocol

from centripy.engine.options import ChannelOptions
from centripy.engine.protocol.codes import Error, ErrorCode


class ChannelRules(Protocol):
    """The part of the configuration channel rules need (Centrifugo key names)."""

    @property
    def channel_private_prefix(self) -> str: ...

    @property
    def channel_namespace_boundary(self) -> str: ...

    @property
    def channel_user_boundary(self) -> str: ...

    @property
    def channel_user_separator(self) -> str: ...

    @property
    def channel_max_length(self) -> int: ...

    @property
    def client_insecure(self) -> bool: ...

    def namespace(self, name: str) -> ChannelOptions | None:
        """Options of namespace `name` ("" = top level); None when not configured."""
        ...


class PersonalChannelRules(Protocol):
    @property
    def channel_namespace_boundary(self) -> str: ...

    @property
    def channel_user_boundary(self) -> str: ...

    @property
    def user_personal_channel_namespace(self) -> str: ...


@dataclass(frozen=True, slots=True)
class ChannelName:
    """A resolved channel. `users` lists the users of a user-limited channel (`dialog#1,2`)
    when the namespace has `allow_user_limited_channels`; it is empty otherwise."""

    channel: str
    namespace: str
    options: ChannelOptions
    private: bool
    users: tuple[str, ...]

    @property
    def user_limited(self) -> bool:
        return bool(self.users)


@dataclass(frozen=True, slots=True)
class SubscribeOverride:
    """JWT `subs`/`override` claims or API subscribe options; None keeps the namespace's."""

    presence: bool | None = None
    join_leave: bool | None = None
    force_push_join_leave: bool | None = None
    force_positioning: bool | None = None
    force_recovery: bool | None = None


@dataclass(frozen=True, slots=True)
class SubscriptionFeatures:
    positioned: bool  # true whenever positioning or recovery is on
    recoverable: bool
    join_leave_push: bool  # this subscriber receives join/leave pushes
    presence: bool  # this subscriber is added to presence
    emit_join_leave: bool  # this subscriber's join/leave is published


_CACHE_MAX = 65_536
_cache: dict[tuple[int, str], tuple[ChannelRules, ChannelName]] = {}
_regexes: dict[str, re.Pattern[str]] = {}


def resolve(rules: ChannelRules, channel: str) -> ChannelName:
    """Resolve `channel`'s namespace and options; Error 102 for an empty channel or an
    unknown namespace, then Error 107 for a name `check_channel_name` refuses. Every
    client command and server API method naming a channel resolves it, so none of them
    reaches the event log, presence or the actors with an invalid name. Cached per
    (rules object, channel), bounded; only valid names are cached."""
    key = (id(rules), channel)
    hit = _cache.get(key)
    if hit is not None and hit[0] is rules:  # identity check: ids of dead objects recycle
        return hit[1]
    name = _resolve(rules, channel)
    check_channel_name(rules, name)
    if len(_cache) >= _CACHE_MAX:
        _cache.clear()  # crude but safe from any thread; refills from hot channels
    _cache[key] = (rules, name)
    return name


def clear_cache() -> None:
    """Forget every resolved name (a config reload: the entries of the replaced config would
    otherwise stay, holding it, until the cache fills up)."""
    _cache.clear()


def _split(rules: ChannelRules, channel: str) -> tuple[str, str]:
    """(namespace, rest) as Centrifugo's rule container splits them: the private prefix is
    stripped, then the FIRST boundary splits; without a boundary rest is the whole name."""
    prefix = rules.channel_private_prefix
    trimmed = channel[len(prefix) :] if prefix and channel.startswith(prefix) else channel
    boundary = rules.channel_namespace_boundary
    if boundary and boundary in trimmed:
        namespace, rest = trimmed.split(boundary, 1)
        return namespace, rest
    return "", channel


def _resolve(rules: ChannelRules, channel: str) -> ChannelName:
    if not channel:
        raise Error.of(ErrorCode.UNKNOWN_CHANNEL)
    namespace, _ = _split(rules, channel)
    options = rules.namespace(namespace)
    if options is None:
        raise Error.of(ErrorCode.UNKNOWN_CHANNEL)
    prefix = rules.channel_private_prefix
    return ChannelName(
        channel=channel,
        namespace=namespace,
        options=options,
        private=bool(prefix) and channel.startswith(prefix),
        users=_allowed_users(rules, options, channel),
    )


def _allowed_users(rules: ChannelRules, options: ChannelOptions, channel: str) -> tuple[str, ...]:
    boundary = rules.channel_user_boundary
    if not options.allow_user_limited_channels or not boundary or boundary not in channel:
        return ()
    last = channel.rsplit(boundary, 1)[1]
    separator = rules.channel_user_separator
    return tuple(last.split(separator)) if separator else (last,)


def check_channel_name(rules: ChannelRules, name: ChannelName) -> None:
    """Name checks for every channel, whoever names it (107): `channel_max_length` (bytes,
    0 = unlimited), then the namespace's `channel_regex` where set, against the part after
    `ns:` (searched, like Go's MatchString, so anchor it with ^...$). Centrifugo applies
    them to client-side subscribe only; centripy applies them everywhere (`resolve`), so
    that no path stores or routes a name a client could never subscribe to."""
    channel = name.channel
    limit = rules.channel_max_length
    if limit > 0 and (len(channel) > limit or len(channel.encode()) > limit):
        raise Error.of(ErrorCode.BAD_REQUEST)
    pattern = name.options.channel_regex
    if pattern:
        _, rest = _split(rules, channel)
        if _compiled(pattern).search(rest) is None:
            raise Error.of(ErrorCode.BAD_REQUEST)


def check_client_channel_name(rules: ChannelRules, name: ChannelName) -> None:
    """Client-side name checks (107), for channels a client names (subscribe, publish,
    history, presence, connect `subs`): `check_channel_name`, and ASCII-only when the
    namespace sets no `channel_regex`."""
    check_channel_name(rules, name)
    if not name.options.channel_regex and not name.channel.isascii():
        raise Error.of(ErrorCode.BAD_REQUEST)


def _compiled(pattern: str) -> re.Pattern[str]:
    compiled = _regexes.get(pattern)
    if compiled is None:
        try:
            compiled = re.compile(pattern)
        except re.error:  # config validation should have refused it: internal error
            raise Error.of(ErrorCode.INTERNAL) from None
        _regexes[pattern] = compiled
    return compiled


def subscribe_proxy_decides(name: ChannelName) -> bool:
    """A subscribe (or subscribe-stream) proxy answers for this channel: the caller asks it
    when no token is given (user-limited channels never go to the proxy)."""
    opts = name.options
    proxied = opts.proxy_subscribe or bool(opts.subscribe_proxy_name)
    return (proxied or opts.proxy_subscribe_stream) and not name.user_limited


def publish_proxy_decides(name: ChannelName) -> bool:
    """A publish proxy (or a bidirectional subscribe stream) answers for this channel."""
    opts = name.options
    return opts.proxy_publish or bool(opts.publish_proxy_name) or opts.proxy_subscribe_stream


def can_subscribe_without_token(rules: ChannelRules, name: ChannelName, user: str) -> bool:
    """Steps 4, 7, 8 of the subscribe order: a listed user of a user-limited channel,
    `allow_subscribe_for_client` (+ `_for_anonymous` for user ""), or `client_insecure`.
    Private channels always need a token; False when a proxy decides (see
    `subscribe_proxy_decides`)."""
    if name.private:
        return False
    if name.user_limited and user in name.users:
        return True
    if subscribe_proxy_decides(name):
        return False
    opts = name.options
    open_to_clients = opts.allow_subscribe_for_client and not name.user_limited
    if open_to_clients and (user or opts.allow_subscribe_for_anonymous):
        return True
    return rules.client_insecure


def can_publish(rules: ChannelRules, name: ChannelName, user: str, subscribed: bool) -> bool:
    """Client publish permission; False when a proxy decides (`publish_proxy_decides`)."""
    if publish_proxy_decides(name):
        return False
    opts = name.options
    if user or opts.allow_publish_for_anonymous:
        if opts.allow_publish_for_client:
            return True
        if opts.allow_publish_for_subscriber and subscribed:
            return True
    return rules.client_insecure


def can_presence(rules: ChannelRules, name: ChannelName, user: str, subscribed: bool) -> bool:
    """Presence/presence_stats permission (the feature itself: `presence_available`)."""
    opts = name.options
    if user or opts.allow_presence_for_anonymous:
        if opts.allow_presence_for_client:
            return True
        if opts.allow_presence_for_subscriber and subscribed:
            return True
    return rules.client_insecure


def can_history(rules: ChannelRules, name: ChannelName, user: str, subscribed: bool) -> bool:
    """History permission (the feature itself: `history_available`)."""
    opts = name.options
    if user or opts.allow_history_for_anonymous:
        if opts.allow_history_for_client:
            return True
        if opts.allow_history_for_subscriber and subscribed:
            return True
    return rules.client_insecure


def presence_available(opts: ChannelOptions) -> bool:
    return opts.presence


def history_available(opts: ChannelOptions) -> bool:
    return opts.history_size > 0 and opts.history_ttl > 0


def _pick(override: bool | None, default: bool) -> bool:
    return default if override is None else override


def subscription_features(
    rules: ChannelRules,
    name: ChannelName,
    user: str,
    req_positioned: bool,
    req_recoverable: bool,
    req_join_leave: bool,
    override: SubscribeOverride | None = None,
) -> SubscriptionFeatures:
    """Features of a new subscription, as Centrifugo's subscribe handler sets them: the
    namespace's force_* flags (or the override's), plus what the client asked for when
    allowed (history permission grants positioning/recovery; join/leave pushes need the
    namespace's join_leave and presence permission). Permissions are evaluated as not yet
    subscribed. Recovery implies positioning."""
    opts = name.options
    ov = override or SubscribeOverride()
    positioning = _pick(ov.force_positioning, opts.force_positioning)
    recovery = _pick(ov.force_recovery, opts.force_recovery)
    push_join_leave = _pick(ov.force_push_join_leave, opts.force_push_join_leave)
    if (req_positioned or req_recoverable) and not (positioning and recovery):
        history_ok = can_history(rules, name, user, False)
        if req_positioned and (opts.allow_positioning or history_ok):
            positioning = True
        if req_recoverable and (opts.allow_recovery or history_ok):
            recovery = True
    if req_join_leave and opts.join_leave and can_presence(rules, name, user, False):
        push_join_leave = True
    return SubscriptionFeatures(
        positioned=positioning or recovery,
        recoverable=recovery,
        join_leave_push=push_join_leave,
        presence=_pick(ov.presence, opts.presence),
        emit_join_leave=_pick(ov.join_leave, opts.join_leave),
    )


def personal_channel(rules: PersonalChannelRules, user: str) -> str:
    """`#42`, or `ns:#42` with `user_personal_channel_namespace`."""
    namespace = rules.user_personal_channel_namespace
    if not namespace:
        return rules.channel_user_boundary + user
    return namespace + rules.channel_namespace_boundary + rules.channel_user_boundary + user
