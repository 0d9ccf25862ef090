"""engine.channels: name resolution, name checks and permission helpers (server_api 2.1, 2.4)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from centripy.engine.channels import (
    ChannelName,
    SubscribeOverride,
    SubscriptionFeatures,
    can_history,
    can_presence,
    can_publish,
    can_subscribe_without_token,
    check_channel_name,
    check_client_channel_name,
    history_available,
    personal_channel,
    presence_available,
    publish_proxy_decides,
    resolve,
    subscribe_proxy_decides,
    subscription_features,
)
from centripy.engine.options import ChannelOptions
from centripy.engine.protocol.codes import Error


@dataclass(frozen=True)
class Rules:
    namespaces: dict[str, ChannelOptions] = field(default_factory=lambda: {"": ChannelOptions()})
    channel_private_prefix: str = "$"
    channel_namespace_boundary: str = ":"
    channel_user_boundary: str = "#"
    channel_user_separator: str = ","
    channel_max_length: int = 255
    client_insecure: bool = False
    user_personal_channel_namespace: str = ""

    def namespace(self, name: str) -> ChannelOptions | None:
        return self.namespaces.get(name)


def rules_with(top: ChannelOptions | None = None, **namespaces: ChannelOptions) -> Rules:
    return Rules(namespaces={"": top or ChannelOptions(), **namespaces})


def code_of(exc: pytest.ExceptionInfo[Error]) -> int:
    return exc.value.code


# ------------------------------------------------------------------ resolve

USER_LIMITED = ChannelOptions(allow_user_limited_channels=True)
CHAT = ChannelOptions(presence=True)
RULES = rules_with(chat=CHAT, dialog=USER_LIMITED, personal=USER_LIMITED)


@pytest.mark.parametrize(
    ("channel", "namespace", "private"),
    [
        ("news", "", False),
        ("chat:1", "chat", False),
        ("chat:a:b", "chat", False),
        ("$chat:1", "chat", True),
        ("$secret", "", True),
        ("$", "", True),
        (":x", "", False),  # empty namespace name: top-level options, as in Centrifugo
        ("news#42", "", False),
    ],
)
def test_resolve_namespace_and_privacy(channel: str, namespace: str, private: bool) -> None:
    name = resolve(RULES, channel)
    assert (name.channel, name.namespace, name.private) == (channel, namespace, private)
    assert name.options is RULES.namespaces[namespace]


@pytest.mark.parametrize("channel", ["", "unknown:x", "$unknown:x", "chat2:x"])
def test_resolve_unknown_is_102(channel: str) -> None:
    with pytest.raises(Error) as exc:
        resolve(RULES, channel)
    assert code_of(exc) == 102


@pytest.mark.parametrize(
    ("channel", "users"),
    [
        ("dialog:a#42,43", ("42", "43")),
        ("personal:#42", ("42",)),
        ("dialog:a#b#c", ("c",)),
        ("dialog:chat#", ("",)),
        ("dialog:plain", ()),
        ("chat:x#42", ()),  # namespace without allow_user_limited_channels
        ("news#42", ()),
    ],
)
def test_resolve_user_limited(channel: str, users: tuple[str, ...]) -> None:
    name = resolve(RULES, channel)
    assert name.users == users
    assert name.user_limited == bool(users)


def test_resolve_without_separator_or_boundaries() -> None:
    rules = Rules(
        namespaces={"": USER_LIMITED},
        channel_user_separator="",
        channel_namespace_boundary="",
        channel_private_prefix="",
    )
    name = resolve(rules, "$a:b#1,2")
    assert (name.namespace, name.private, name.users) == ("", False, ("1,2",))
    assert (
        resolve(Rules(namespaces={"": USER_LIMITED}, channel_user_boundary=""), "a#1").users == ()
    )


def test_resolve_is_cached_per_rules_object() -> None:
    first = resolve(RULES, "chat:cached")
    assert resolve(RULES, "chat:cached") is first
    other = rules_with(chat=ChannelOptions(history_size=10, history_ttl=60))
    assert resolve(other, "chat:cached").options.history_size == 10
    assert resolve(RULES, "chat:cached").options is CHAT
    with pytest.raises(Error):
        resolve(rules_with(), "chat:cached")


# ------------------------------------------------------------------ check_client_channel_name


def check(rules: Rules, channel: str) -> int:
    try:
        check_client_channel_name(rules, resolve(rules, channel))
    except Error as err:
        return err.code
    return 0


def test_channel_length_limit_counts_bytes() -> None:
    assert check(RULES, "a" * 255) == 0
    assert check(RULES, "a" * 256) == 107
    assert check(Rules(channel_max_length=0), "a" * 5000) == 0
    regex_any = rules_with(ChannelOptions(channel_regex="^.*$"))
    assert check(regex_any, "é" * 127) == 0  # 254 bytes
    assert check(regex_any, "é" * 128) == 107  # 256 bytes


def test_non_ascii_rejected_without_regex() -> None:
    assert check(RULES, "chat:привет") == 107
    assert check(RULES, "chat:hello") == 0


def test_channel_regex_matches_part_after_namespace() -> None:
    rules = rules_with(
        ChannelOptions(channel_regex="^[a-z]+$"), ns=ChannelOptions(channel_regex="^[0-9]+$")
    )
    assert check(rules, "ns:123") == 0
    assert check(rules, "ns:12a") == 107
    assert check(rules, "$ns:123") == 0  # private prefix stripped before the split
    assert check(rules, "abc") == 0
    assert check(rules, "$abc") == 107  # top level: the whole name, prefix included
    unicode_ok = rules_with(ns=ChannelOptions(channel_regex="^\\w+$"))
    assert check(unicode_ok, "ns:привет") == 0


def test_channel_regex_is_searched_like_go() -> None:
    rules = rules_with(ns=ChannelOptions(channel_regex="[a-z]"))
    assert check(rules, "ns:1a2") == 0
    assert check(rules, "ns:123") == 107


def test_invalid_regex_is_internal_error() -> None:
    assert check(rules_with(ns=ChannelOptions(channel_regex="(")), "ns:x") == 100


def resolve_code(rules: Rules, channel: str) -> int:
    try:
        resolve(rules, channel)
    except Error as err:
        return err.code
    return 0


def test_resolve_applies_length_and_regex_to_every_caller() -> None:
    """The server API and every client command resolve names: 107 for a name no client
    could subscribe to, after 102 for an unknown namespace (Centrifugo's order)."""
    rules = rules_with(chat=CHAT, ns=ChannelOptions(channel_regex="^[0-9]+$"))
    assert resolve_code(rules, "a" * 255) == 0
    assert resolve_code(rules, "a" * 256) == 107
    assert resolve_code(rules, "chat:" + "é" * 126) == 107  # 257 bytes, 131 characters
    assert resolve_code(rules, "unknown:" + "a" * 300) == 102
    assert resolve_code(rules, "ns:123") == 0
    assert resolve_code(rules, "ns:12a") == 107
    assert resolve_code(rules, "ns:12a") == 107  # refused names are not cached
    assert resolve_code(Rules(channel_max_length=0), "a" * 5000) == 0
    # ASCII-only (without channel_regex) stays a client-side rule, as in Centrifugo
    assert resolve_code(rules, "chat:привет") == 0
    assert check(rules, "chat:привет") == 107


def test_check_channel_name_directly() -> None:
    name = ChannelName("chat:" + "x" * 300, "chat", CHAT, False, ())
    with pytest.raises(Error) as exc:
        check_channel_name(RULES, name)
    assert code_of(exc) == 107
    check_channel_name(RULES, ChannelName("chat:привет", "chat", CHAT, False, ()))
    with pytest.raises(Error) as exc:
        check_client_channel_name(RULES, ChannelName("chat:привет", "chat", CHAT, False, ()))
    assert code_of(exc) == 107


# ------------------------------------------------------------------ permissions


def name_for(
    opts: ChannelOptions, channel: str = "c", insecure: bool = False
) -> tuple[Rules, ChannelName]:
    rules = Rules(namespaces={"": opts}, client_insecure=insecure)
    return rules, resolve(rules, channel)


def test_subscribe_without_token() -> None:
    for_client = ChannelOptions(allow_subscribe_for_client=True)
    rules, name = name_for(for_client)
    assert can_subscribe_without_token(rules, name, "42")
    assert not can_subscribe_without_token(rules, name, "")
    rules, name = name_for(
        ChannelOptions(allow_subscribe_for_client=True, allow_subscribe_for_anonymous=True)
    )
    assert can_subscribe_without_token(rules, name, "")
    rules, name = name_for(ChannelOptions(allow_subscribe_for_anonymous=True))
    assert not can_subscribe_without_token(rules, name, "42")  # anonymous flag needs _for_client
    rules, name = name_for(ChannelOptions(), insecure=True)
    assert can_subscribe_without_token(rules, name, "")
    rules, name = name_for(for_client, "$private", insecure=True)
    assert not can_subscribe_without_token(rules, name, "42")  # private always needs a token


def test_subscribe_user_limited() -> None:
    opts = ChannelOptions(allow_user_limited_channels=True, allow_subscribe_for_client=True)
    rules, name = name_for(opts, "dialog#42,43")
    assert can_subscribe_without_token(rules, name, "42")
    assert can_subscribe_without_token(rules, name, "43")
    # A user-limited channel is not open to every client, only to insecure mode.
    assert not can_subscribe_without_token(rules, name, "44")
    rules, name = name_for(opts, "dialog#42,43", insecure=True)
    assert can_subscribe_without_token(rules, name, "44")
    rules, name = name_for(opts, "$dialog#42")
    assert not can_subscribe_without_token(rules, name, "42")
    rules, name = name_for(ChannelOptions(allow_subscribe_for_client=True), "dialog#42")
    assert can_subscribe_without_token(rules, name, "44")  # user limits off in namespace


def test_subscribe_proxy_decides() -> None:
    proxied = ChannelOptions(
        proxy_subscribe=True, allow_subscribe_for_client=True, allow_user_limited_channels=True
    )
    rules, name = name_for(proxied, "c", insecure=True)
    assert subscribe_proxy_decides(name)
    assert not can_subscribe_without_token(rules, name, "42")
    rules, name = name_for(proxied, "c#42")
    assert not subscribe_proxy_decides(name)
    assert can_subscribe_without_token(rules, name, "42")
    _, name = name_for(ChannelOptions(subscribe_proxy_name="p"))
    assert subscribe_proxy_decides(name)
    _, name = name_for(ChannelOptions(proxy_subscribe_stream=True))
    assert subscribe_proxy_decides(name)


def test_publish_permissions() -> None:
    rules, name = name_for(ChannelOptions(allow_publish_for_client=True))
    assert can_publish(rules, name, "42", False)
    assert not can_publish(rules, name, "", True)
    rules, name = name_for(ChannelOptions(allow_publish_for_subscriber=True))
    assert can_publish(rules, name, "42", True)
    assert not can_publish(rules, name, "42", False)
    assert not can_publish(rules, name, "", True)
    rules, name = name_for(
        ChannelOptions(allow_publish_for_subscriber=True, allow_publish_for_anonymous=True)
    )
    assert can_publish(rules, name, "", True)
    rules, name = name_for(ChannelOptions(), insecure=True)
    assert can_publish(rules, name, "", False)
    rules, name = name_for(
        ChannelOptions(proxy_publish=True, allow_publish_for_client=True), insecure=True
    )
    assert publish_proxy_decides(name)
    assert not can_publish(rules, name, "42", True)
    _, name = name_for(ChannelOptions(publish_proxy_name="p"))
    assert publish_proxy_decides(name)


@pytest.mark.parametrize("kind", ["presence", "history"])
def test_presence_and_history_permissions(kind: str) -> None:
    check_fn = can_presence if kind == "presence" else can_history

    def opts(**flags: bool) -> ChannelOptions:
        kwargs: dict[str, Any] = {f"allow_{kind}_for_{k}": v for k, v in flags.items()}
        return ChannelOptions(**kwargs)

    rules, name = name_for(opts(client=True))
    assert check_fn(rules, name, "42", False)
    assert not check_fn(rules, name, "", False)
    rules, name = name_for(opts(client=True, anonymous=True))
    assert check_fn(rules, name, "", False)
    rules, name = name_for(opts(subscriber=True))
    assert check_fn(rules, name, "42", True)
    assert not check_fn(rules, name, "42", False)
    rules, name = name_for(opts(subscriber=True, anonymous=True))
    assert check_fn(rules, name, "", True)
    rules, name = name_for(opts(), insecure=True)
    assert check_fn(rules, name, "", False)
    rules, name = name_for(opts())
    assert not check_fn(rules, name, "42", True)


def test_feature_availability() -> None:
    assert presence_available(ChannelOptions(presence=True))
    assert not presence_available(ChannelOptions())
    assert history_available(ChannelOptions(history_size=10, history_ttl=60))
    assert not history_available(ChannelOptions(history_size=10))
    assert not history_available(ChannelOptions(history_ttl=60))


# ------------------------------------------------------------------ subscription_features


def features(
    opts: ChannelOptions,
    user: str = "42",
    positioned: bool = False,
    recoverable: bool = False,
    join_leave: bool = False,
    override: SubscribeOverride | None = None,
    insecure: bool = False,
) -> SubscriptionFeatures:
    rules, name = name_for(opts, insecure=insecure)
    return subscription_features(rules, name, user, positioned, recoverable, join_leave, override)


def test_features_default_off() -> None:
    assert features(ChannelOptions(), positioned=True, recoverable=True, join_leave=True) == (
        SubscriptionFeatures(False, False, False, False, False)
    )


def test_features_forced_by_namespace() -> None:
    opts = ChannelOptions(
        presence=True,
        join_leave=True,
        force_push_join_leave=True,
        force_recovery=True,
        history_size=10,
        history_ttl=60,
    )
    assert features(opts) == SubscriptionFeatures(True, True, True, True, True)
    assert features(ChannelOptions(force_positioning=True)).positioned


def test_features_on_request() -> None:
    allow = ChannelOptions(allow_positioning=True, allow_recovery=True)
    assert features(allow, positioned=True) == SubscriptionFeatures(
        True, False, False, False, False
    )
    assert features(allow, recoverable=True) == SubscriptionFeatures(
        True, True, False, False, False
    )
    history = ChannelOptions(allow_history_for_client=True)
    assert features(history, recoverable=True).recoverable
    assert not features(history, user="", recoverable=True).recoverable
    assert not features(
        ChannelOptions(allow_history_for_subscriber=True), recoverable=True
    ).recoverable
    assert features(ChannelOptions(), recoverable=True, insecure=True).recoverable


def test_features_join_leave_push() -> None:
    ok = ChannelOptions(join_leave=True, allow_presence_for_client=True)
    assert features(ok, join_leave=True).join_leave_push
    assert features(ok, join_leave=True).emit_join_leave
    assert not features(ok).join_leave_push  # not asked
    assert not features(ChannelOptions(join_leave=True), join_leave=True).join_leave_push
    no_ns = ChannelOptions(allow_presence_for_client=True)
    assert not features(no_ns, join_leave=True).join_leave_push
    assert features(ChannelOptions(join_leave=True), join_leave=True, insecure=True).join_leave_push


def test_features_override() -> None:
    opts = ChannelOptions(
        presence=True, join_leave=True, force_recovery=True, history_size=1, history_ttl=1
    )
    off = SubscribeOverride(
        presence=False, join_leave=False, force_recovery=False, force_positioning=False
    )
    assert features(opts, override=off) == SubscriptionFeatures(False, False, False, False, False)
    on = SubscribeOverride(
        presence=True, join_leave=True, force_push_join_leave=True, force_positioning=True
    )
    assert features(ChannelOptions(), override=on) == SubscriptionFeatures(
        True, False, True, True, True
    )
    # An override does not stop a client from asking for what its permissions allow.
    allow = ChannelOptions(allow_recovery=True)
    assert features(
        allow, recoverable=True, override=SubscribeOverride(force_recovery=False)
    ).recoverable


@given(
    st.booleans(),
    st.booleans(),
    st.booleans(),
    st.booleans(),
    st.booleans(),
    st.booleans(),
    st.booleans(),
    st.sampled_from(["", "42"]),
)
def test_recovery_implies_positioning(
    force_rec: bool,
    force_pos: bool,
    allow_rec: bool,
    allow_pos: bool,
    ask_rec: bool,
    ask_pos: bool,
    history: bool,
    user: str,
) -> None:
    opts = ChannelOptions(
        force_recovery=force_rec,
        force_positioning=force_pos,
        allow_recovery=allow_rec,
        allow_positioning=allow_pos,
        allow_history_for_client=history,
    )
    got = features(opts, user=user, positioned=ask_pos, recoverable=ask_rec)
    assert not got.recoverable or got.positioned
    history_ok = history and user != ""
    assert got.recoverable == (force_rec or (ask_rec and (allow_rec or history_ok)))


# ------------------------------------------------------------------ personal_channel


def test_personal_channel() -> None:
    assert personal_channel(Rules(), "42") == "#42"
    assert (
        personal_channel(Rules(user_personal_channel_namespace="personal"), "42") == "personal:#42"
    )
    custom = Rules(
        user_personal_channel_namespace="p",
        channel_namespace_boundary="/",
        channel_user_boundary="@",
    )
    assert personal_channel(custom, "7") == "p/@7"
