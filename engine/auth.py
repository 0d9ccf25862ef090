"""JWT verification for connection and subscription tokens (docs/spec/protocol.md section 6).

Sans-I/O: HMAC/RSA/ECDSA keys come from the config; JWKS documents are fetched through an
injected coroutine (`JWKSCache`, engine/jwks.py). Tokens are parsed and their claims read by
engine/jwt_parse.py. `TokenExpired` maps to reply error 109; `InvalidToken` maps to
disconnect 3500 for connection tokens and reply error 103 for subscription tokens (the caller
decides). Info/data claims are returned as compact raw JSON bytes. Verifier methods are called
from the event loop by connection actors; the sync ones never block.

Tokens come from hostile clients: whatever is wrong with one (size, encoding, JSON nesting, claim
types) ends as `InvalidToken`, never as another exception escaping into the connection actor.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from centripy.engine.channels import SubscribeOverride
from centripy.engine.config import Config
from centripy.engine.config_check import load_public_key
from centripy.engine.jwks import JWKSCache, JWKSFetchError, token_kid, verify_with_jwk
from centripy.engine.jwt_parse import (
    EC,
    HMAC,
    RSA,
    InvalidToken,
    ParsedToken,
    TokenError,
    TokenExpired,
    b64url_encode,
    number_claim,
    parse_token,
    payload_claim,
    raw_json,
    str_claim,
)

__all__ = [
    "ConnectToken",
    "InvalidToken",
    "JWKSFetchError",
    "SubscribeOptionsClaim",
    "SubscribeOverride",
    "SubscriptionToken",
    "TokenError",
    "TokenExpired",
    "TokenVerifier",
    "make_token",
    "token_payload",
]


@dataclass(frozen=True, slots=True)
class SubscribeOptionsClaim:
    """One entry of the connection token `subs` map."""

    info: bytes = b""
    data: bytes = b""
    override: SubscribeOverride = field(default_factory=SubscribeOverride)


@dataclass(frozen=True, slots=True)
class ConnectToken:
    """A verified connection token. `channels` is empty when `subs` is given (subs win)."""

    user_id: str
    expire_at: int | None  # unix seconds; None: never expires
    info: bytes = b""
    channels: tuple[str, ...] = ()
    subs: dict[str, SubscribeOptionsClaim] = field(default_factory=dict)
    meta: bytes = b""


@dataclass(frozen=True, slots=True)
class SubscriptionToken:
    user_id: str
    channel: str
    client: str = ""
    expire_at: int | None = None
    info: bytes = b""
    data: bytes = b""
    override: SubscribeOverride = field(default_factory=SubscribeOverride)


# --------------------------------------------------------------------------- parsing


@contextlib.contextmanager
def _hostile_input() -> Iterator[None]:
    """Whatever else parsing or reading the claims of a token raises is an invalid token.

    The parsing and claim helpers raise InvalidToken themselves for every case we know of; this
    is the backstop for the ones we do not (a crafted token must never kill a connection actor)."""
    try:
        yield
    except (TokenError, JWKSFetchError):
        raise
    except Exception as exc:
        raise InvalidToken(f"malformed token ({type(exc).__name__})") from None


def token_payload(token: str) -> bytes:
    """The raw JSON claims of a token (no verification): what `checktoken` prints."""
    with _hostile_input():
        return parse_token(token).payload


# --------------------------------------------------------------------------- claims


def _expire_at(claims: Mapping[str, Any]) -> int | None:
    """`expire_at` > 0 overrides `exp`; `expire_at` <= 0 means never; else `exp`."""
    if "expire_at" in claims and claims["expire_at"] is not None:
        value = number_claim(claims, "expire_at")
        return int(value) if value is not None and value > 0 else None
    exp = number_claim(claims, "exp")
    return int(exp) if exp is not None else None


def _override(value: object) -> SubscribeOverride:
    if value is None:
        return SubscribeOverride()
    if not isinstance(value, dict):
        raise InvalidToken("override must be an object")
    out: dict[str, bool | None] = {}
    for name in SubscribeOverride.__dataclass_fields__:
        item = value.get(name)
        if item is None:
            continue
        flag = item.get("value") if isinstance(item, dict) else None
        if not isinstance(flag, bool):
            raise InvalidToken(f'override.{name} must be {{"value": bool}}')
        out[name] = flag
    return SubscribeOverride(**out)


def _subs(value: object) -> dict[str, SubscribeOptionsClaim]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidToken("subs must be an object")
    out = {}
    for channel, raw in value.items():
        if not isinstance(raw, dict):
            raise InvalidToken("subs values must be objects")
        out[channel] = SubscribeOptionsClaim(
            info=payload_claim(raw, "info"),
            data=payload_claim(raw, "data"),
            override=_override(raw.get("override")),
        )
    return out


def _channels(value: object) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(ch, str) for ch in value):
        raise InvalidToken("channels must be an array of strings")
    return tuple(value)


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True, slots=True)
class _Settings:
    """The verification keys and claim checks for one token kind."""

    hmac_secret: bytes
    rsa_key: Any
    ec_key: Any
    jwks_endpoint: str
    audience: str
    audience_re: re.Pattern[str] | None
    issuer: str
    issuer_re: re.Pattern[str] | None
    user_id_claim: str


def _settings(config: Config, prefix: str) -> _Settings:
    def get(name: str) -> str:
        value = getattr(config, prefix + name)
        assert isinstance(value, str)
        return value

    rsa, ec = get("rsa_public_key"), get("ecdsa_public_key")
    return _Settings(
        hmac_secret=get("hmac_secret_key").encode(),
        rsa_key=load_public_key(rsa, "rsa", prefix + "rsa_public_key") if rsa else None,
        ec_key=load_public_key(ec, "ec", prefix + "ecdsa_public_key") if ec else None,
        jwks_endpoint=get("jwks_public_endpoint"),
        audience=get("audience"),
        audience_re=re.compile(get("audience_regex")) if get("audience_regex") else None,
        issuer=get("issuer"),
        issuer_re=re.compile(get("issuer_regex")) if get("issuer_regex") else None,
        user_id_claim=get("user_id_claim"),
    )


def _verify_with_config_keys(parsed: ParsedToken, s: _Settings) -> None:
    alg = parsed.header.get("alg")
    ok: bool
    if alg in HMAC and s.hmac_secret:
        ok = HMAC[alg].verify(parsed.signing_input, s.hmac_secret, parsed.signature)
    elif alg in RSA and s.rsa_key is not None:
        ok = RSA[alg].verify(parsed.signing_input, s.rsa_key, parsed.signature)
    elif alg in EC and s.ec_key is not None:
        ok = EC[alg].verify(parsed.signing_input, s.ec_key, parsed.signature)
    else:
        raise InvalidToken(f"algorithm {alg!r} is not enabled")
    if not ok:
        raise InvalidToken("bad signature")


def _check_standard(claims: Mapping[str, Any], s: _Settings, now: float) -> None:
    exp, nbf = number_claim(claims, "exp"), number_claim(claims, "nbf")
    if (exp is not None and not exp > now) or (nbf is not None and not nbf < now):
        raise TokenExpired("token expired")
    aud = claims.get("aud")
    audiences = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
    if s.audience and s.audience not in audiences:
        raise InvalidToken("invalid audience")
    if s.audience_re is not None and not any(
        isinstance(a, str) and s.audience_re.search(a) for a in audiences
    ):
        raise InvalidToken("invalid audience")
    iss = claims.get("iss")
    if s.issuer and iss != s.issuer:
        raise InvalidToken("invalid issuer")
    if s.issuer_re is not None and not (isinstance(iss, str) and s.issuer_re.search(iss)):
        raise InvalidToken("invalid issuer")


def _user_id(claims: Mapping[str, Any], s: _Settings) -> str:
    return str_claim(claims, s.user_id_claim or "sub")


# --------------------------------------------------------------------------- verifier


class TokenVerifier:
    """Verifies connection and subscription tokens with the keys of one `Config`.

    With `token_jwks_public_endpoint` set, every token is verified by JWKS: use the `_async`
    methods (the sync ones only use already-cached keys). Called on the event loop.
    """

    def __init__(
        self,
        config: Config,
        *,
        jwks: JWKSCache | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._skip_signature = config.client_insecure_skip_token_signature_verify
        self._conn = _settings(config, "token_")
        separate = config.separate_subscription_token_config
        self._sub = _settings(config, "subscription_token_") if separate else self._conn
        needs_jwks = bool(self._conn.jwks_endpoint or self._sub.jwks_endpoint)
        if needs_jwks and jwks is None and not self._skip_signature:
            raise ValueError("token_jwks_public_endpoint is set: pass a JWKSCache")
        self._jwks = jwks
        self._clock = clock

    @property
    def jwks(self) -> JWKSCache | None:
        """The JWKS key cache (None without JWKS endpoints): a reload hands it on to the
        verifier built from the new config, keys already fetched included."""
        return self._jwks

    def verify_connection_token(self, token: str) -> ConnectToken:
        with _hostile_input():
            parsed = parse_token(token)
            self._verify_signature(parsed, self._conn)
            return self._connect_token(parsed)

    async def verify_connection_token_async(self, token: str) -> ConnectToken:
        with _hostile_input():
            parsed = parse_token(token)
            await self._verify_signature_async(parsed, self._conn)
            return self._connect_token(parsed)

    def verify_subscription_token(self, token: str) -> SubscriptionToken:
        with _hostile_input():
            parsed = parse_token(token)
            self._verify_signature(parsed, self._sub)
            return self._subscription_token(parsed)

    async def verify_subscription_token_async(self, token: str) -> SubscriptionToken:
        with _hostile_input():
            parsed = parse_token(token)
            await self._verify_signature_async(parsed, self._sub)
            return self._subscription_token(parsed)

    def _verify_signature(self, parsed: ParsedToken, s: _Settings) -> None:
        if self._skip_signature:
            return
        if not s.jwks_endpoint:
            _verify_with_config_keys(parsed, s)
            return
        assert self._jwks is not None
        jwk = self._jwks.cached(s.jwks_endpoint, token_kid(parsed))
        if jwk is None:
            raise JWKSFetchError("JWKS key not cached: use the async verify method")
        verify_with_jwk(parsed, jwk)

    async def _verify_signature_async(self, parsed: ParsedToken, s: _Settings) -> None:
        if self._skip_signature or not s.jwks_endpoint:
            self._verify_signature(parsed, s)
            return
        assert self._jwks is not None
        verify_with_jwk(parsed, await self._jwks.get_key(s.jwks_endpoint, token_kid(parsed)))

    def _connect_token(self, parsed: ParsedToken) -> ConnectToken:
        claims = parsed.claims
        _check_standard(claims, self._conn, self._clock())
        if str_claim(claims, "channel"):
            raise InvalidToken("channel claim is not allowed in a connection token")
        subs = _subs(claims.get("subs"))
        return ConnectToken(
            user_id=_user_id(claims, self._conn),
            expire_at=_expire_at(claims),
            info=payload_claim(claims, "info"),
            channels=() if subs else _channels(claims.get("channels")),
            subs=subs,
            meta=raw_json(claims.get("meta")),
        )

    def _subscription_token(self, parsed: ParsedToken) -> SubscriptionToken:
        claims = parsed.claims
        _check_standard(claims, self._sub, self._clock())
        channel = str_claim(claims, "channel")
        if not channel:
            raise InvalidToken("channel claim required in a subscription token")
        return SubscriptionToken(
            user_id=_user_id(claims, self._sub),
            channel=channel,
            client=str_claim(claims, "client"),
            expire_at=_expire_at(claims),
            info=payload_claim(claims, "info"),
            data=payload_claim(claims, "data"),
            override=_override(claims.get("override")),
        )


def make_token(
    secret: str,
    user: str,
    ttl: int | None,
    *,
    channel: str | None = None,
    extra: Mapping[str, object] | None = None,
    now: float | None = None,
    algorithm: str = "HS256",
) -> str:
    """An HMAC-signed token with `sub`, `iat` and, unless `ttl` is None or negative, `exp`.
    `channel` makes it a subscription token; `extra` claims are merged last."""
    if algorithm not in HMAC:
        raise ValueError(f"unsupported algorithm {algorithm!r}: use HS256, HS384 or HS512")
    issued = int(time.time() if now is None else now)
    claims: dict[str, object] = {"sub": user, "iat": issued}
    if ttl is not None and ttl >= 0:
        claims["exp"] = issued + ttl
    if channel is not None:
        claims["channel"] = channel
    claims.update(extra or {})
    header = b64url_encode(orjson.dumps({"alg": algorithm, "typ": "JWT"}))
    signing_input = f"{header}.{b64url_encode(orjson.dumps(claims))}"
    signature = HMAC[algorithm].sign(signing_input.encode(), secret.encode())
    return f"{signing_input}.{b64url_encode(signature)}"
