"""JWT verification for connection and subscription tokens (docs/spec/protocol.md section 6).

Sans-I/O: HMAC/RSA/ECDSA keys come from the config; JWKS documents are fetched through an
injected coroutine (`JWKSCache`). `TokenExpired` maps to reply error 109; `InvalidToken` maps to
disconnect 3500 for connection tokens and reply error 103 for subscription tokens (the caller
decides). Info/data claims are returned as compact raw JSON bytes. Verifier methods are called
from the event loop by connection actors; the sync ones never block.

Tokens come from hostile clients: whatever is wrong with one (size, encoding, JSON nesting, claim
types) ends as `InvalidToken`, never as another exception escaping into the connection actor.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import math
import re
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
from jwt import PyJWK
from jwt.algorithms import ECAlgorithm, HMACAlgorithm, OKPAlgorithm, RSAAlgorithm
from jwt.exceptions import PyJWKError, PyJWTError

from centripy.engine.channels import SubscribeOverride
from centripy.engine.config import Config
from centripy.engine.config_check import load_public_key

__all__ = [
    "MAX_TOKEN_LENGTH",
    "ConnectToken",
    "InvalidToken",
    "JWKSCache",
    "JWKSFetchError",
    "JWKey",
    "SubscribeOptionsClaim",
    "SubscribeOverride",
    "SubscriptionToken",
    "TokenError",
    "TokenExpired",
    "TokenVerifier",
    "make_token",
    "parse_jwks",
    "token_payload",
]


class TokenError(Exception):
    """Base of the token verification outcomes."""


class InvalidToken(TokenError):
    """Unparsable token, bad signature, disabled algorithm, or failed aud/iss/claim checks."""


class TokenExpired(TokenError):
    """`exp` is not in the future or `nbf` is not in the past (reply error 109)."""


class JWKSFetchError(Exception):
    """The JWKS endpoint could not be fetched or parsed: an internal error, not a bad token."""


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


# --------------------------------------------------------------------------- parsing helpers

_HMAC = {
    "HS256": HMACAlgorithm(HMACAlgorithm.SHA256),
    "HS384": HMACAlgorithm(HMACAlgorithm.SHA384),
    "HS512": HMACAlgorithm(HMACAlgorithm.SHA512),
}
_RSA = {
    "RS256": RSAAlgorithm(RSAAlgorithm.SHA256),
    "RS384": RSAAlgorithm(RSAAlgorithm.SHA384),
    "RS512": RSAAlgorithm(RSAAlgorithm.SHA512),
}
_EC = {
    "ES256": ECAlgorithm(ECAlgorithm.SHA256),
    "ES384": ECAlgorithm(ECAlgorithm.SHA384),
    "ES512": ECAlgorithm(ECAlgorithm.SHA512),
}
_OKP = {"EdDSA": OKPAlgorithm()}


MAX_TOKEN_LENGTH = 64 * 1024
"""Longer tokens are rejected before any decoding (a WebSocket frame is 64 KiB by default)."""

_INT64 = 2**63


def _b64url_decode(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def _b64url_encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass(frozen=True, slots=True)
class _Parsed:
    header: Mapping[str, Any]
    claims: Mapping[str, Any]
    payload: bytes
    signing_input: bytes
    signature: bytes


@contextlib.contextmanager
def _hostile_input() -> Iterator[None]:
    """Whatever else parsing or reading the claims of a token raises is an invalid token.

    The helpers below raise InvalidToken themselves for every case we know of; this is the
    backstop for the ones we do not (a crafted token must never kill a connection actor)."""
    try:
        yield
    except (TokenError, JWKSFetchError):
        raise
    except Exception as exc:
        raise InvalidToken(f"malformed token ({type(exc).__name__})") from None


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999: not representable (Go's JSON rejects it too)
        raise ValueError("number out of range")
    return value


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def _json(data: bytes) -> Any:
    """Strict JSON: no NaN/Infinity (Python's json would accept them), no infinite floats."""
    return json.loads(data, parse_float=_finite_float, parse_constant=_reject_constant)


def _parse(token: str) -> _Parsed:
    if not isinstance(token, str):
        raise InvalidToken("malformed token: not a string")
    if len(token) > MAX_TOKEN_LENGTH:
        raise InvalidToken(f"malformed token: longer than {MAX_TOKEN_LENGTH} characters")
    parts = token.split(".")
    if len(parts) != 3:
        raise InvalidToken("malformed token")
    try:
        header = _json(_b64url_decode(parts[0]))
        payload = _b64url_decode(parts[1])
        claims = _json(payload)
        signature = _b64url_decode(parts[2])
    except (ValueError, binascii.Error, RecursionError) as exc:  # RecursionError: deep nesting
        raise InvalidToken(f"malformed token: {type(exc).__name__}") from None
    if not isinstance(header, dict) or not isinstance(claims, dict):
        raise InvalidToken("malformed token: header and claims must be objects")
    for name in ("alg", "kid"):  # looked up in dicts later: an array there is unhashable
        if header.get(name) is not None and not isinstance(header[name], str):
            raise InvalidToken(f"malformed token: {name} must be a string")
    signing_input = f"{parts[0]}.{parts[1]}".encode()
    return _Parsed(header, claims, payload, signing_input, signature)


def token_payload(token: str) -> bytes:
    """The raw JSON claims of a token (no verification): what `checktoken` prints."""
    with _hostile_input():
        return _parse(token).payload


def _raw_json(value: object) -> bytes:
    if value is None:
        return b""
    try:
        return orjson.dumps(value)
    except TypeError:  # integers beyond 64 bits, or nesting deeper than orjson's 255 levels
        pass
    try:
        text = json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (ValueError, RecursionError):
        raise InvalidToken("claim is not representable as JSON") from None
    return text.encode()


def _b64(claims: Mapping[str, Any], key: str) -> bytes | None:
    value = claims.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise InvalidToken(f"{key} must be a string")
    try:
        return base64.b64decode(value, validate=True)
    except ValueError:  # binascii.Error, or non-ASCII characters
        raise InvalidToken(f"{key} is not valid base64") from None


def _payload(claims: Mapping[str, Any], key: str) -> bytes:
    """`key` as raw JSON, replaced by the decoded `b64<key>` when that is present."""
    decoded = _b64(claims, "b64" + key)
    return decoded if decoded is not None else _raw_json(claims.get(key))


def _str_claim(claims: Mapping[str, Any], key: str) -> str:
    value = claims.get(key, "")
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InvalidToken(f"{key} must be a string")
    return value


def _number_claim(claims: Mapping[str, Any], key: str) -> float | None:
    value = claims.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidToken(f"{key} must be a number")
    if isinstance(value, float) and not math.isfinite(value):  # json accepts NaN and Infinity
        raise InvalidToken(f"{key} must be a finite number")
    if not -_INT64 <= value < _INT64:  # Centrifugo reads these as int64
        raise InvalidToken(f"{key} is out of range")
    return float(value)


def _expire_at(claims: Mapping[str, Any]) -> int | None:
    """`expire_at` > 0 overrides `exp`; `expire_at` <= 0 means never; else `exp`."""
    if "expire_at" in claims and claims["expire_at"] is not None:
        value = _number_claim(claims, "expire_at")
        return int(value) if value is not None and value > 0 else None
    exp = _number_claim(claims, "exp")
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
            info=_payload(raw, "info"),
            data=_payload(raw, "data"),
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


def _verify_with_config_keys(parsed: _Parsed, s: _Settings) -> None:
    alg = parsed.header.get("alg")
    ok: bool
    if alg in _HMAC and s.hmac_secret:
        ok = _HMAC[alg].verify(parsed.signing_input, s.hmac_secret, parsed.signature)
    elif alg in _RSA and s.rsa_key is not None:
        ok = _RSA[alg].verify(parsed.signing_input, s.rsa_key, parsed.signature)
    elif alg in _EC and s.ec_key is not None:
        ok = _EC[alg].verify(parsed.signing_input, s.ec_key, parsed.signature)
    else:
        raise InvalidToken(f"algorithm {alg!r} is not enabled")
    if not ok:
        raise InvalidToken("bad signature")


def _check_standard(claims: Mapping[str, Any], s: _Settings, now: float) -> None:
    exp, nbf = _number_claim(claims, "exp"), _number_claim(claims, "nbf")
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
    return _str_claim(claims, s.user_id_claim or "sub")


# --------------------------------------------------------------------------- JWKS

_JWK_FAMILIES: Mapping[str, Mapping[str, Any]] = {"RSA": _RSA, "EC": _EC, "OKP": _OKP}


@dataclass(frozen=True, slots=True)
class JWKey:
    """One usable key of a JWKS document."""

    kty: str  # RSA, EC or OKP
    alg: str  # "" when the document does not pin an algorithm
    key: Any


def parse_jwks(document: bytes) -> dict[str, JWKey]:
    """Signature keys of a JWKS document by `kid`; unsupported or broken entries are skipped."""
    try:
        data = json.loads(document)
    except ValueError as exc:
        raise JWKSFetchError(f"JWKS is not valid JSON: {exc}") from None
    keys = data.get("keys") if isinstance(data, dict) else None
    if not isinstance(keys, list):
        raise JWKSFetchError('JWKS has no "keys" array')
    out: dict[str, JWKey] = {}
    for raw in keys:
        if not isinstance(raw, dict) or raw.get("use") not in (None, "sig"):
            continue
        kid, kty = raw.get("kid"), raw.get("kty")
        if not isinstance(kid, str) or kty not in _JWK_FAMILIES:
            continue
        try:
            key = PyJWK(raw).key
        except (PyJWKError, PyJWTError, ValueError, TypeError, KeyError):
            continue
        alg = raw.get("alg")
        out[kid] = JWKey(kty=str(kty), alg=alg if isinstance(alg, str) else "", key=key)
    return out


@dataclass(slots=True)
class _EndpointState:
    """What one JWKS endpoint told us last, and the fetch in flight."""

    keys: dict[str, JWKey] | None = None  # the last document fetched successfully
    fresh_until: float = 0.0  # keys are served without a fetch until then (ttl)
    checked_at: float | None = None  # when the last fetch ended, successful or not
    error: str = ""  # why the last fetch failed; "" when it succeeded
    inflight: asyncio.Task[None] | None = None  # the one fetch of this endpoint under way


class JWKSCache:
    """JWKS keys by endpoint and `kid`, refreshed after `ttl` seconds or on an unknown `kid`.

    Hostile clients send random `kid`s, so an unknown `kid` may not cost a fetch each:
    * single flight: concurrent lookups of one endpoint share one in-flight fetch;
    * bounded rate: an endpoint is fetched at most once per `min_refresh_interval` seconds
      (counted from the end of the last fetch, successful or not);
    * negative cache: within that interval, a `kid` missing from the document just fetched is
      InvalidToken at once, and a failed fetch is JWKSFetchError at once. The document itself is
      the negative cache, so random kids cost no memory. A key rotated in at the identity
      provider is picked up by the first lookup after the interval.

    `fetch(url)` returns the document body; it runs as a task on the event loop that calls
    `get_key` and must time out by itself. `clock` is monotonic seconds.
    """

    def __init__(
        self,
        fetch: Callable[[str], Awaitable[bytes]],
        ttl: float = 3600.0,
        clock: Callable[[], float] = time.monotonic,
        *,
        min_refresh_interval: float = 10.0,
    ) -> None:
        self._fetch = fetch
        self._ttl = ttl
        self._clock = clock
        self._min_interval = min_refresh_interval
        self._endpoints: dict[str, _EndpointState] = {}

    def cached(self, endpoint: str, kid: str) -> JWKey | None:
        """The key if it is cached and fresh; never fetches."""
        state = self._endpoints.get(endpoint)
        if state is None or state.keys is None or state.fresh_until <= self._clock():
            return None
        return state.keys.get(kid)

    async def get_key(self, endpoint: str, kid: str) -> JWKey:
        """The key for `kid`, fetching the document when needed and allowed. Raises
        InvalidToken for an unknown `kid` and JWKSFetchError when the endpoint fails."""
        found = self.cached(endpoint, kid)
        if found is not None:
            return found
        state = self._endpoints.setdefault(endpoint, _EndpointState())
        task = state.inflight
        if task is None and not self._checked_recently(state):
            task = state.inflight = asyncio.ensure_future(self._refresh(endpoint, state))
        if task is not None:
            # wait() neither raises the task's outcome nor cancels the task when this caller
            # is cancelled: the other waiters still get the document.
            await asyncio.wait({task})
            if task.cancelled():
                raise JWKSFetchError(f"fetching {endpoint}: cancelled")
        if state.error:
            raise JWKSFetchError(state.error)
        if state.keys is None or kid not in state.keys:
            raise InvalidToken(f"public key {kid!r} not found")
        return state.keys[kid]

    def _checked_recently(self, state: _EndpointState) -> bool:
        last = state.checked_at
        return last is not None and self._clock() - last < self._min_interval

    async def _refresh(self, endpoint: str, state: _EndpointState) -> None:
        """The one fetch of `endpoint` in flight (a task); records its outcome in `state`.
        A cancelled fetch (shutdown) records nothing and does not count towards the rate."""
        try:
            document = await self._fetch(endpoint)
            keys = parse_jwks(document)
        except JWKSFetchError as exc:
            state.error = str(exc)
        except Exception as exc:
            state.error = f"fetching {endpoint}: {type(exc).__name__}: {exc}"
        else:
            state.keys, state.error = keys, ""
            state.fresh_until = self._clock() + self._ttl
        finally:
            state.inflight = None
        state.checked_at = self._clock()


def _kid(parsed: _Parsed) -> str:
    kid = parsed.header.get("kid")
    if not isinstance(kid, str) or not kid:
        raise InvalidToken("token has no kid header")
    return kid


def _verify_with_jwk(parsed: _Parsed, jwk: JWKey) -> None:
    alg = parsed.header.get("alg")  # a string or None: _parse checked it
    family = _JWK_FAMILIES[jwk.kty]
    if not isinstance(alg, str) or alg not in family or (jwk.alg and jwk.alg != alg):
        raise InvalidToken(f"algorithm {alg!r} does not match the {jwk.kty} key")
    try:
        ok = family[alg].verify(parsed.signing_input, jwk.key, parsed.signature)
    except (ValueError, TypeError):
        ok = False
    if not ok:
        raise InvalidToken("bad signature")


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

    def verify_connection_token(self, token: str) -> ConnectToken:
        with _hostile_input():
            parsed = _parse(token)
            self._verify_signature(parsed, self._conn)
            return self._connect_token(parsed)

    async def verify_connection_token_async(self, token: str) -> ConnectToken:
        with _hostile_input():
            parsed = _parse(token)
            await self._verify_signature_async(parsed, self._conn)
            return self._connect_token(parsed)

    def verify_subscription_token(self, token: str) -> SubscriptionToken:
        with _hostile_input():
            parsed = _parse(token)
            self._verify_signature(parsed, self._sub)
            return self._subscription_token(parsed)

    async def verify_subscription_token_async(self, token: str) -> SubscriptionToken:
        with _hostile_input():
            parsed = _parse(token)
            await self._verify_signature_async(parsed, self._sub)
            return self._subscription_token(parsed)

    def _verify_signature(self, parsed: _Parsed, s: _Settings) -> None:
        if self._skip_signature:
            return
        if not s.jwks_endpoint:
            _verify_with_config_keys(parsed, s)
            return
        assert self._jwks is not None
        jwk = self._jwks.cached(s.jwks_endpoint, _kid(parsed))
        if jwk is None:
            raise JWKSFetchError("JWKS key not cached: use the async verify method")
        _verify_with_jwk(parsed, jwk)

    async def _verify_signature_async(self, parsed: _Parsed, s: _Settings) -> None:
        if self._skip_signature or not s.jwks_endpoint:
            self._verify_signature(parsed, s)
            return
        assert self._jwks is not None
        _verify_with_jwk(parsed, await self._jwks.get_key(s.jwks_endpoint, _kid(parsed)))

    def _connect_token(self, parsed: _Parsed) -> ConnectToken:
        claims = parsed.claims
        _check_standard(claims, self._conn, self._clock())
        if _str_claim(claims, "channel"):
            raise InvalidToken("channel claim is not allowed in a connection token")
        subs = _subs(claims.get("subs"))
        return ConnectToken(
            user_id=_user_id(claims, self._conn),
            expire_at=_expire_at(claims),
            info=_payload(claims, "info"),
            channels=() if subs else _channels(claims.get("channels")),
            subs=subs,
            meta=_raw_json(claims.get("meta")),
        )

    def _subscription_token(self, parsed: _Parsed) -> SubscriptionToken:
        claims = parsed.claims
        _check_standard(claims, self._sub, self._clock())
        channel = _str_claim(claims, "channel")
        if not channel:
            raise InvalidToken("channel claim required in a subscription token")
        return SubscriptionToken(
            user_id=_user_id(claims, self._sub),
            channel=channel,
            client=_str_claim(claims, "client"),
            expire_at=_expire_at(claims),
            info=_payload(claims, "info"),
            data=_payload(claims, "data"),
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
    if algorithm not in _HMAC:
        raise ValueError(f"unsupported algorithm {algorithm!r}: use HS256, HS384 or HS512")
    issued = int(time.time() if now is None else now)
    claims: dict[str, object] = {"sub": user, "iat": issued}
    if ttl is not None and ttl >= 0:
        claims["exp"] = issued + ttl
    if channel is not None:
        claims["channel"] = channel
    claims.update(extra or {})
    header = _b64url_encode(orjson.dumps({"alg": algorithm, "typ": "JWT"}))
    signing_input = f"{header}.{_b64url_encode(orjson.dumps(claims))}"
    signature = _HMAC[algorithm].sign(signing_input.encode(), secret.encode())
    return f"{signing_input}.{_b64url_encode(signature)}"
