"""JWT verification (docs/spec/protocol.md section 6): HMAC/RSA/ECDSA, claims, JWKS."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
from dataclasses import replace
from typing import Any

import jwt
import orjson
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from hypothesis import given
from hypothesis import strategies as st
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from centripy.engine import auth as auth_module
from centripy.engine.auth import (
    ConnectToken,
    InvalidToken,
    JWKSFetchError,
    SubscribeOverride,
    SubscriptionToken,
    TokenError,
    TokenExpired,
    TokenVerifier,
    make_token,
    token_payload,
)
from centripy.engine.config import Config
from centripy.engine.jwks import JWKSCache
from centripy.engine.jwt_parse import MAX_TOKEN_LENGTH

NOW = 1_700_000_000
SECRET = "secret"
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())
EC384_KEY = ec.generate_private_key(ec.SECP384R1())
ED_KEY = ed25519.Ed25519PrivateKey.generate()


def pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def verifier(**options: Any) -> TokenVerifier:
    config = replace(Config(token_hmac_secret_key=SECRET), **options)
    return TokenVerifier(config, clock=lambda: NOW + 0.5)


def hs(claims: dict[str, Any], secret: str = SECRET, alg: str = "HS256") -> str:
    return make_token(secret, "", None, extra=claims, now=NOW, algorithm=alg)


def signed(claims: dict[str, Any], key: Any, alg: str, kid: str | None = None) -> str:
    headers = {"kid": kid} if kid else None
    return jwt.encode(claims, key, algorithm=alg, headers=headers)


# --------------------------------------------------------------------------- connection tokens


def test_hs256_connection_token_claims() -> None:
    token = hs(
        {
            "sub": "42",
            "exp": NOW + 60,
            "info": {"name": "Alex", "n": 1},
            "channels": ["news", "chat:1"],
            "meta": {"k": "v"},
        }
    )
    ct = verifier().verify_connection_token(token)
    assert ct.user_id == "42"
    assert ct.expire_at == NOW + 60
    assert ct.info == b'{"name":"Alex","n":1}'
    assert ct.channels == ("news", "chat:1")
    assert ct.subs == {}
    assert ct.meta == b'{"k":"v"}'


@pytest.mark.parametrize("alg", ["HS256", "HS384", "HS512"])
def test_hmac_algorithms(alg: str) -> None:
    assert verifier().verify_connection_token(hs({"sub": "1"}, alg=alg)).user_id == "1"


def test_make_token_ttl() -> None:
    claims = json.loads(token_payload(make_token(SECRET, "u", 3600, now=NOW)))
    assert claims == {"sub": "u", "iat": NOW, "exp": NOW + 3600}
    claims = json.loads(token_payload(make_token(SECRET, "u", -1, now=NOW)))
    assert "exp" not in claims
    claims = json.loads(token_payload(make_token(SECRET, "u", 10, channel="c", now=NOW)))
    assert claims["channel"] == "c"


@pytest.mark.parametrize(
    ("claims", "expected"),
    [
        ({"exp": NOW + 60}, NOW + 60),
        ({"exp": NOW + 60, "expire_at": NOW + 600}, NOW + 600),
        ({"exp": NOW + 60, "expire_at": 0}, None),
        ({}, None),
        ({"expire_at": NOW + 5}, NOW + 5),
    ],
)
def test_expire_at_semantics(claims: dict[str, Any], expected: int | None) -> None:
    assert verifier().verify_connection_token(hs({"sub": "1", **claims})).expire_at == expected


@pytest.mark.parametrize("claims", [{"exp": NOW}, {"exp": NOW - 10}, {"nbf": NOW + 10}])
def test_expired_and_not_yet_valid(claims: dict[str, Any]) -> None:
    with pytest.raises(TokenExpired):
        verifier().verify_connection_token(hs({"sub": "1", **claims}))
    with pytest.raises(TokenExpired):
        verifier().verify_subscription_token(hs({"sub": "1", "channel": "c", **claims}))


@pytest.mark.parametrize(
    "token",
    [
        "garbage",
        "a.b.c",
        hs({"sub": "1"}, secret="other"),
        hs({"sub": 1}),
        hs({"sub": "1", "channel": "news"}),
        hs({"sub": "1", "exp": "soon"}),
        hs({"sub": "1", "b64info": "@@@"}),
        hs({"sub": "1", "channels": "news"}),
        hs({"sub": "1", "subs": {"c": {"override": {"presence": True}}}}),
        jwt.encode({"sub": "1"}, "", algorithm="none"),
    ],
)
def test_invalid_connection_tokens(token: str) -> None:
    with pytest.raises(InvalidToken):
        verifier().verify_connection_token(token)


def test_exp_must_be_strictly_in_the_future() -> None:
    config = Config(token_hmac_secret_key=SECRET)
    at_exp = TokenVerifier(config, clock=lambda: float(NOW))
    with pytest.raises(TokenExpired):
        at_exp.verify_connection_token(hs({"sub": "1", "exp": NOW}))
    with pytest.raises(TokenExpired):
        at_exp.verify_connection_token(hs({"sub": "1", "nbf": NOW}))
    before = TokenVerifier(config, clock=lambda: NOW - 0.001)
    assert before.verify_connection_token(hs({"sub": "1", "exp": NOW})).expire_at == NOW


def test_algorithm_must_be_enabled() -> None:
    token = signed({"sub": "1"}, RSA_KEY, "RS256")
    with pytest.raises(InvalidToken, match="not enabled"):
        verifier().verify_connection_token(token)
    with pytest.raises(InvalidToken, match="not enabled"):
        verifier(token_hmac_secret_key="").verify_connection_token(hs({"sub": "1"}))


def test_b64info_and_subs() -> None:
    token = hs(
        {
            "sub": "7",
            "b64info": base64.b64encode(b"\x00\x01").decode(),
            "channels": ["ignored"],
            "subs": {
                "chat:1": {
                    "info": {"role": "admin"},
                    "b64data": base64.b64encode(b"raw").decode(),
                    "override": {"presence": {"value": False}, "force_recovery": {"value": True}},
                },
                "news": {},
            },
        }
    )
    ct = verifier().verify_connection_token(token)
    assert ct.info == b"\x00\x01"
    assert ct.channels == ()
    assert set(ct.subs) == {"chat:1", "news"}
    sub = ct.subs["chat:1"]
    assert sub.info == b'{"role":"admin"}' and sub.data == b"raw"
    assert sub.override == SubscribeOverride(presence=False, force_recovery=True)
    assert ct.subs["news"].override == SubscribeOverride()


@pytest.mark.parametrize("alg", ["RS256", "RS384", "RS512"])
def test_rsa_tokens(alg: str) -> None:
    v = verifier(token_hmac_secret_key="", token_rsa_public_key=pem(RSA_KEY))
    assert v.verify_connection_token(signed({"sub": "r"}, RSA_KEY, alg)).user_id == "r"
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with pytest.raises(InvalidToken):
        v.verify_connection_token(signed({"sub": "r"}, other, alg))


def test_ecdsa_tokens() -> None:
    v = verifier(token_ecdsa_public_key=pem(EC_KEY))
    assert v.verify_connection_token(signed({"sub": "e"}, EC_KEY, "ES256")).user_id == "e"
    with pytest.raises(InvalidToken):
        v.verify_connection_token(signed({"sub": "e"}, EC384_KEY, "ES384"))
    v384 = verifier(token_ecdsa_public_key=pem(EC384_KEY))
    assert v384.verify_connection_token(signed({"sub": "e"}, EC384_KEY, "ES384")).user_id == "e"


@pytest.mark.parametrize(
    ("options", "claims", "ok"),
    [
        ({"token_audience": "app"}, {"aud": "app"}, True),
        ({"token_audience": "app"}, {"aud": ["x", "app"]}, True),
        ({"token_audience": "app"}, {"aud": "other"}, False),
        ({"token_audience": "app"}, {}, False),
        ({"token_audience_regex": "^app-[a-z]+$"}, {"aud": "app-eu"}, True),
        ({"token_audience_regex": "^app-[a-z]+$"}, {"aud": "app-1"}, False),
        ({"token_issuer": "iss"}, {"iss": "iss"}, True),
        ({"token_issuer": "iss"}, {"iss": "other"}, False),
        (
            {"token_issuer_regex": r"^https://\w+\.example\.com$"},
            {"iss": "https://a.example.com"},
            True,
        ),
        (
            {"token_issuer_regex": r"^https://\w+\.example\.com$"},
            {"iss": "https://evil.com"},
            False,
        ),
    ],
)
def test_audience_and_issuer(options: dict[str, str], claims: dict[str, Any], ok: bool) -> None:
    token = hs({"sub": "1", **claims})
    if ok:
        assert verifier(**options).verify_connection_token(token).user_id == "1"
    else:
        with pytest.raises(InvalidToken):
            verifier(**options).verify_connection_token(token)


def test_user_id_claim() -> None:
    token = hs({"sub": "ignored", "user_id": "u-9"})
    assert verifier(token_user_id_claim="user_id").verify_connection_token(token).user_id == "u-9"


def test_skip_signature_verification() -> None:
    token = hs({"sub": "1", "exp": NOW + 10}, secret="whatever")
    v = verifier(client_insecure_skip_token_signature_verify=True)
    assert v.verify_connection_token(token).user_id == "1"
    with pytest.raises(TokenExpired):
        v.verify_connection_token(hs({"sub": "1", "exp": NOW - 1}, secret="x"))


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
        max_leaves=10,
    )
)
def test_info_is_compact_raw_json(value: object) -> None:
    info = verifier().verify_connection_token(hs({"sub": "1", "info": value})).info
    if value is None:
        assert info == b""
    else:
        assert orjson.loads(info) == value
        assert info == orjson.dumps(value)


# --------------------------------------------------------------------------- subscription tokens


def test_subscription_token() -> None:
    token = hs(
        {
            "sub": "42",
            "channel": "$secret:1",
            "client": "c-1",
            "exp": NOW + 100,
            "info": {"a": 1},
            "data": {"b": 2},
            "override": {"join_leave": {"value": True}},
        }
    )
    st_ = verifier().verify_subscription_token(token)
    assert (st_.user_id, st_.channel, st_.client) == ("42", "$secret:1", "c-1")
    assert st_.expire_at == NOW + 100
    assert st_.info == b'{"a":1}' and st_.data == b'{"b":2}'
    assert st_.override == SubscribeOverride(join_leave=True)
    b64 = hs({"sub": "1", "channel": "c", "b64data": base64.b64encode(b"\xff").decode()})
    assert verifier().verify_subscription_token(b64).data == b"\xff"


def test_subscription_token_needs_channel() -> None:
    with pytest.raises(InvalidToken, match="channel"):
        verifier().verify_subscription_token(hs({"sub": "1"}))


def test_separate_subscription_token_config() -> None:
    v = verifier(separate_subscription_token_config=True, subscription_token_hmac_secret_key="sub")
    assert (
        v.verify_subscription_token(hs({"sub": "1", "channel": "c"}, secret="sub")).channel == "c"
    )
    with pytest.raises(InvalidToken):
        v.verify_subscription_token(hs({"sub": "1", "channel": "c"}))
    assert v.verify_connection_token(hs({"sub": "1"})).user_id == "1"


# --------------------------------------------------------------------------- JWKS


def jwk(key: Any, kid: str, algorithm: type[Any]) -> dict[str, Any]:
    data: dict[str, Any] = algorithm.to_jwk(key.public_key(), as_dict=True)
    data["kid"] = kid
    data["use"] = "sig"
    return data


JWKS = json.dumps(
    {
        "keys": [
            jwk(RSA_KEY, "rsa1", RSAAlgorithm),
            jwk(EC_KEY, "ec1", ECAlgorithm),
            jwk(ED_KEY, "ed1", OKPAlgorithm),
            {"kty": "oct", "kid": "hmac", "k": "c2VjcmV0"},
            {"kty": "RSA", "kid": "broken", "n": "!!", "e": "AQAB"},
        ]
    }
).encode()
ENDPOINT = "https://issuer.example.com/jwks"


class FakeFetch:
    def __init__(self, body: bytes = JWKS, error: Exception | None = None) -> None:
        self.body, self.error, self.urls = body, error, list[str]()

    async def __call__(self, url: str) -> bytes:
        self.urls.append(url)
        if self.error is not None:
            raise self.error
        return self.body


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def jwks_verifier(fetch: FakeFetch, clock: Clock | None = None) -> TokenVerifier:
    config = Config(token_jwks_public_endpoint=ENDPOINT)
    cache = JWKSCache(fetch, ttl=3600, clock=clock or Clock())
    return TokenVerifier(config, jwks=cache, clock=lambda: NOW)


@pytest.mark.parametrize(
    ("key", "alg", "kid"),
    [
        (RSA_KEY, "RS256", "rsa1"),
        (RSA_KEY, "RS512", "rsa1"),
        (EC_KEY, "ES256", "ec1"),
        (ED_KEY, "EdDSA", "ed1"),
    ],
)
async def test_jwks_key_types(key: Any, alg: str, kid: str) -> None:
    fetch = FakeFetch()
    v = jwks_verifier(fetch)
    token = signed({"sub": "j", "exp": NOW + 10}, key, alg, kid=kid)
    assert (await v.verify_connection_token_async(token)).user_id == "j"
    assert fetch.urls == [ENDPOINT]
    sub = signed({"sub": "j", "channel": "c"}, key, alg, kid=kid)
    assert (await v.verify_subscription_token_async(sub)).channel == "c"
    assert v.verify_connection_token(token).user_id == "j"  # sync path uses the cached key
    assert fetch.urls == [ENDPOINT]


async def test_jwks_rejections() -> None:
    v = jwks_verifier(FakeFetch())
    with pytest.raises(InvalidToken, match="kid"):
        await v.verify_connection_token_async(signed({"sub": "1"}, RSA_KEY, "RS256"))
    with pytest.raises(InvalidToken, match="not found"):
        await v.verify_connection_token_async(signed({"sub": "1"}, RSA_KEY, "RS256", kid="nope"))
    with pytest.raises(InvalidToken, match="does not match"):
        await v.verify_connection_token_async(signed({"sub": "1"}, EC_KEY, "ES256", kid="rsa1"))
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with pytest.raises(InvalidToken, match="signature"):
        await v.verify_connection_token_async(signed({"sub": "1"}, other, "RS256", kid="rsa1"))
    with pytest.raises(InvalidToken):  # HMAC keys in a JWKS are not used
        await v.verify_connection_token_async(hs({"sub": "1"}))


async def test_jwks_cache_ttl_and_refetch() -> None:
    fetch, clock = FakeFetch(), Clock()
    v = jwks_verifier(fetch, clock)
    token = signed({"sub": "1"}, RSA_KEY, "RS256", kid="rsa1")
    await v.verify_connection_token_async(token)
    clock.now = 3599
    await v.verify_connection_token_async(token)
    assert len(fetch.urls) == 1
    clock.now = 3600
    await v.verify_connection_token_async(token)
    assert len(fetch.urls) == 2


async def test_jwks_fetch_failures() -> None:
    token = signed({"sub": "1"}, RSA_KEY, "RS256", kid="rsa1")
    with pytest.raises(JWKSFetchError):
        await jwks_verifier(FakeFetch(error=OSError("down"))).verify_connection_token_async(token)
    with pytest.raises(JWKSFetchError):
        await jwks_verifier(FakeFetch(body=b"not json")).verify_connection_token_async(token)
    with pytest.raises(JWKSFetchError):
        jwks_verifier(FakeFetch()).verify_connection_token(token)  # nothing cached yet


def test_jwks_requires_a_cache() -> None:
    with pytest.raises(ValueError, match="JWKSCache"):
        TokenVerifier(Config(token_jwks_public_endpoint=ENDPOINT))


class GatedFetch(FakeFetch):
    """A fetch that waits for `gate` to open, so lookups pile up on it."""

    def __init__(self, body: bytes = JWKS, error: Exception | None = None) -> None:
        super().__init__(body, error)
        self.gate = asyncio.Event()

    async def __call__(self, url: str) -> bytes:
        self.urls.append(url)
        await self.gate.wait()
        if self.error is not None:
            raise self.error
        return self.body


def rsa_token(kid: str, key: Any = RSA_KEY) -> str:
    return signed({"sub": "1"}, key, "RS256", kid=kid)


async def outcomes(v: TokenVerifier, tokens: list[str]) -> list[object]:
    return await asyncio.gather(
        *(v.verify_connection_token_async(t) for t in tokens), return_exceptions=True
    )


async def test_jwks_concurrent_lookups_share_one_fetch() -> None:
    fetch = GatedFetch()
    v = jwks_verifier(fetch)
    tokens = [rsa_token("rsa1"), rsa_token("nope-1"), rsa_token("rsa1"), rsa_token("nope-2")] * 5
    pending = asyncio.ensure_future(outcomes(v, tokens))
    for _ in range(5):
        await asyncio.sleep(0)
    assert fetch.urls == [ENDPOINT]  # everyone waits on the same request
    fetch.gate.set()
    results = await pending
    assert fetch.urls == [ENDPOINT]
    for token, result in zip(tokens, results, strict=True):
        if "nope" in json.loads(base64.urlsafe_b64decode(token.split(".")[0] + "=="))["kid"]:
            assert isinstance(result, InvalidToken)
        else:
            assert isinstance(result, ConnectToken) and result.user_id == "1"


async def test_jwks_concurrent_lookups_share_one_failure() -> None:
    fetch = GatedFetch(error=OSError("down"))
    v = jwks_verifier(fetch)
    pending = asyncio.ensure_future(outcomes(v, [rsa_token("rsa1"), rsa_token("x")] * 10))
    await asyncio.sleep(0)
    fetch.gate.set()
    assert all(isinstance(r, JWKSFetchError) for r in await pending)
    assert fetch.urls == [ENDPOINT]


async def test_jwks_a_cancelled_waiter_does_not_cancel_the_shared_fetch() -> None:
    fetch = GatedFetch()
    v = jwks_verifier(fetch)
    first = asyncio.ensure_future(v.verify_connection_token_async(rsa_token("rsa1")))
    await asyncio.sleep(0)
    second = asyncio.ensure_future(v.verify_connection_token_async(rsa_token("rsa1")))
    await asyncio.sleep(0)
    first.cancel()
    await asyncio.sleep(0)
    fetch.gate.set()
    assert (await second).user_id == "1"
    assert first.cancelled()
    assert fetch.urls == [ENDPOINT]


async def test_jwks_unknown_kids_are_negatively_cached_and_refetches_are_rate_bounded() -> None:
    fetch, clock = FakeFetch(), Clock()
    v = jwks_verifier(fetch, clock)
    with pytest.raises(InvalidToken, match="not found"):
        await v.verify_connection_token_async(rsa_token("unknown"))
    assert len(fetch.urls) == 1
    for i in range(100):  # random kids within the interval: answered from the fresh document
        clock.now = i * 0.099
        with pytest.raises(InvalidToken, match="not found"):
            await v.verify_connection_token_async(rsa_token(f"random-{i}"))
    assert len(fetch.urls) == 1
    assert (await v.verify_connection_token_async(rsa_token("rsa1"))).user_id == "1"
    clock.now = 10.0  # the interval has passed: an unknown kid may refetch once
    with pytest.raises(InvalidToken):
        await v.verify_connection_token_async(rsa_token("unknown"))
    assert len(fetch.urls) == 2
    with pytest.raises(InvalidToken):
        await v.verify_connection_token_async(rsa_token("unknown-again"))
    assert len(fetch.urls) == 2


async def test_jwks_random_kid_flood_costs_one_fetch_per_interval() -> None:
    fetch, clock = FakeFetch(), Clock()
    v = jwks_verifier(fetch, clock)
    for step in range(600):  # 60 seconds, 10 random kids a second
        clock.now = step / 10
        results = await outcomes(v, [rsa_token(f"k{step}"), rsa_token("rsa1")])
        assert isinstance(results[0], InvalidToken) and isinstance(results[1], ConnectToken)
    assert len(fetch.urls) == 6


async def test_jwks_rotated_key_is_picked_up_after_the_interval() -> None:
    fetch, clock = FakeFetch(), Clock()
    v = jwks_verifier(fetch, clock)
    await v.verify_connection_token_async(rsa_token("rsa1"))
    new_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    fetch.body = json.dumps({"keys": [jwk(new_key, "rsa2", RSAAlgorithm)]}).encode()
    clock.now = 5.0  # rotated at the provider, but we fetched 5 s ago
    with pytest.raises(InvalidToken, match="not found"):
        await v.verify_connection_token_async(rsa_token("rsa2", new_key))
    assert len(fetch.urls) == 1
    clock.now = 10.0
    assert (await v.verify_connection_token_async(rsa_token("rsa2", new_key))).user_id == "1"
    assert len(fetch.urls) == 2
    # rsa1 is gone from the new document, and the document is fresh: no fetch for it
    with pytest.raises(InvalidToken, match="not found"):
        await v.verify_connection_token_async(rsa_token("rsa1"))
    assert len(fetch.urls) == 2


async def test_jwks_failures_are_not_retried_within_the_interval() -> None:
    fetch, clock = FakeFetch(error=OSError("down")), Clock()
    v = jwks_verifier(fetch, clock)
    for now in (0.0, 3.0, 9.9):
        clock.now = now
        with pytest.raises(JWKSFetchError, match="down"):
            await v.verify_connection_token_async(rsa_token("rsa1"))
    assert len(fetch.urls) == 1
    fetch.error = None
    clock.now = 10.0
    assert (await v.verify_connection_token_async(rsa_token("rsa1"))).user_id == "1"
    assert len(fetch.urls) == 2
    fetch.error = OSError("down again")  # a failed refresh after the ttl is an error too
    clock.now = 3610.0
    with pytest.raises(JWKSFetchError, match="down again"):
        await v.verify_connection_token_async(rsa_token("rsa1"))
    clock.now = 3615.0
    with pytest.raises(JWKSFetchError):
        await v.verify_connection_token_async(rsa_token("rsa1"))
    assert len(fetch.urls) == 3


async def test_jwks_endpoints_are_fetched_independently() -> None:
    fetch, clock = GatedFetch(), Clock()
    cache = JWKSCache(fetch, ttl=3600, clock=clock, min_refresh_interval=30)
    other = ENDPOINT + "?other"
    pending = asyncio.gather(
        cache.get_key(ENDPOINT, "rsa1"), cache.get_key(other, "ec1"), cache.get_key(other, "ed1")
    )
    await asyncio.sleep(0)
    fetch.gate.set()
    keys = await pending
    assert [k.kty for k in keys] == ["RSA", "EC", "OKP"]
    assert sorted(fetch.urls) == [ENDPOINT, other]
    clock.now = 29.0
    with pytest.raises(InvalidToken):
        await cache.get_key(other, "nope")
    clock.now = 30.0
    with pytest.raises(InvalidToken):
        await cache.get_key(other, "nope")
    assert sorted(fetch.urls) == [ENDPOINT, other, other]


# --------------------------------------------------------------------------- hostile tokens


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def raw_token(header: bytes, payload: bytes, secret: str = SECRET) -> str:
    """A token with exactly these header and payload bytes, HS256-signed with `secret`."""
    signing_input = f"{b64url(header)}.{b64url(payload)}"
    signature = hmac.new(secret.encode(), signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(signature)}"


HS_HEADER = b'{"alg":"HS256","typ":"JWT"}'


def verify_all_ways(v: TokenVerifier, token: Any) -> None:
    """Every verify method must reject `token` with InvalidToken."""
    with pytest.raises(InvalidToken):
        v.verify_connection_token(token)
    with pytest.raises(InvalidToken):
        v.verify_subscription_token(token)
    with pytest.raises(InvalidToken):
        asyncio.run(v.verify_connection_token_async(token))
    with pytest.raises(InvalidToken):
        asyncio.run(v.verify_subscription_token_async(token))


DEEP = 40_000  # nested far beyond the recursion limit, yet the token stays under 64 KiB


@pytest.mark.parametrize(
    "token",
    [
        raw_token(b"[" * DEEP, b'{"sub":"1"}'),
        raw_token(b'{"a":' * (DEEP // 5), b'{"sub":"1"}'),
        raw_token(HS_HEADER, b"[" * DEEP),
        raw_token(HS_HEADER, b'{"sub":"1","info":' + b"[" * (DEEP // 2) + b"]" * (DEEP // 2)),
        raw_token(HS_HEADER, b'{"sub":"1","channel":"c","data":' + b"{" * DEEP + b"}"),
    ],
    ids=["header-array", "header-object", "payload-array", "info-balanced", "data-open"],
)
def test_deeply_nested_json_is_an_invalid_token(token: str) -> None:
    assert len(token) < MAX_TOKEN_LENGTH
    verify_all_ways(verifier(), token)
    verify_all_ways(verifier(client_insecure_skip_token_signature_verify=True), token)
    with pytest.raises(InvalidToken):
        token_payload(token)


def test_moderately_nested_info_is_still_valid() -> None:
    info = b"[" * 400 + b"]" * 400  # deeper than orjson's 255 levels, within the recursion limit
    token = raw_token(HS_HEADER, b'{"sub":"1","info":' + info + b"}")
    assert verifier().verify_connection_token(token).info == info


def test_token_length_is_bounded() -> None:
    def token(filler: int) -> str:
        return hs({"sub": "1", "info": "x" * filler})

    filler = MAX_TOKEN_LENGTH * 3 // 4 - 200
    while len(token(filler + 1)) <= MAX_TOKEN_LENGTH:
        filler += 1
    at_limit, over = token(filler), token(filler + 1)
    assert len(at_limit) <= MAX_TOKEN_LENGTH < len(over)
    assert verifier().verify_connection_token(at_limit).user_id == "1"
    with pytest.raises(InvalidToken, match="longer than"):
        verifier().verify_connection_token(over)
    verify_all_ways(verifier(client_insecure_skip_token_signature_verify=True), over)
    with pytest.raises(InvalidToken):
        token_payload("a." * 100_000 + "b")


@pytest.mark.parametrize(
    "token",
    [
        None,
        42,
        b"a.b.c",
        "",
        "..",
        "a.b.c.d",
        "é.é.é",
        raw_token(b"[]", b'{"sub":"1"}'),
        raw_token(b'"HS256"', b'{"sub":"1"}'),
        raw_token(b"null", b'{"sub":"1"}'),
        raw_token(HS_HEADER, b"[]"),
        raw_token(HS_HEADER, b"1"),
        raw_token(HS_HEADER, b"\xff\xfe"),
        raw_token(b'{"alg":["HS256"]}', b'{"sub":"1"}'),
        raw_token(b'{"alg":{"HS256":1}}', b'{"sub":"1"}'),
        raw_token(b'{"alg":"HS256","kid":["k"]}', b'{"sub":"1"}'),
        raw_token(b'{"alg":"HS256","kid":{}}', b'{"sub":"1"}'),
    ],
)
def test_malformed_token_shapes(token: Any) -> None:
    verify_all_ways(verifier(), token)


BAD_CLAIMS: list[bytes] = [
    b'{"sub":"1","exp":Infinity}',
    b'{"sub":"1","exp":NaN}',
    b'{"sub":"1","exp":1e400}',
    b'{"sub":"1","exp":100000000000000000000000000000}',
    b'{"sub":"1","exp":[1]}',
    b'{"sub":"1","expire_at":Infinity}',
    b'{"sub":"1","expire_at":-1e400}',
    b'{"sub":"1","expire_at":"tomorrow"}',
    b'{"sub":"1","expire_at":true}',
    b'{"sub":"1","nbf":{"t":1}}',
    b'{"sub":"1","nbf":-Infinity}',
    b'{"sub":["1"]}',
    b'{"sub":{"id":"1"}}',
    b'{"sub":"1","b64info":"\xc3\xa9\xc3\xa9"}',
    b'{"sub":"1","b64info":5}',
    b'{"sub":"1","info":[1e999]}',
    b'{"sub":"1","info":{"a":-Infinity}}',
]
BAD_CONNECT_CLAIMS: list[bytes] = [
    b'{"sub":"1","channels":{"a":1}}',
    b'{"sub":"1","channels":[1]}',
    b'{"sub":"1","channels":[["a"]]}',
    b'{"sub":"1","subs":["a"]}',
    b'{"sub":"1","subs":{"a":1}}',
    b'{"sub":"1","subs":{"a":{"override":[]}}}',
    b'{"sub":"1","subs":{"a":{"override":{"presence":1}}}}',
    b'{"sub":"1","subs":{"a":{"override":{"presence":{"value":"yes"}}}}}',
    b'{"sub":"1","subs":{"a":{"b64info":"\xc3\xa9"}}}',
    b'{"sub":"1","subs":{"a":{"b64data":[]}}}',
    b'{"sub":"1","channel":["c"]}',
    b'{"sub":"1","meta":[NaN,100000000000000000000000000000]}',
]
BAD_SUBSCRIBE_CLAIMS: list[bytes] = [
    b'{"sub":"1","channel":["c"]}',
    b'{"sub":"1","channel":{"c":1}}',
    b'{"sub":"1","channel":"c","client":7}',
    b'{"sub":"1","channel":"c","b64data":"!!"}',
    b'{"sub":"1","channel":"c","override":"all"}',
    b'{"sub":"1","channel":"c","override":{"join_leave":[true]}}',
    b'{"sub":"1","channel":"c","data":[Infinity,100000000000000000000000000000]}',
]


@pytest.mark.parametrize("payload", BAD_CLAIMS + BAD_CONNECT_CLAIMS)
def test_wrong_claim_types_in_connection_tokens(payload: bytes) -> None:
    token = raw_token(HS_HEADER, payload)
    with pytest.raises(InvalidToken):
        verifier().verify_connection_token(token)
    with pytest.raises(InvalidToken):
        asyncio.run(verifier().verify_connection_token_async(token))


@pytest.mark.parametrize("payload", BAD_CLAIMS + BAD_SUBSCRIBE_CLAIMS)
def test_wrong_claim_types_in_subscription_tokens(payload: bytes) -> None:
    if b'"channel"' not in payload:
        payload = payload[:-1] + b',"channel":"c"}'
    token = raw_token(HS_HEADER, payload)
    with pytest.raises(InvalidToken):
        verifier().verify_subscription_token(token)


def test_wide_but_valid_numbers_and_payloads() -> None:
    token = raw_token(HS_HEADER, b'{"sub":"1","exp":9.2e18,"info":[100000000000000000000000]}')
    ct = verifier().verify_connection_token(token)
    assert ct.expire_at == int(9.2e18)
    assert ct.info == b"[100000000000000000000000]"


def test_an_unexpected_error_in_a_claim_helper_is_an_invalid_token(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(value: object) -> tuple[str, ...]:
        raise KeyError("surprise")

    monkeypatch.setattr(auth_module, "_channels", broken)
    with pytest.raises(InvalidToken, match="KeyError"):
        verifier().verify_connection_token(hs({"sub": "1"}))
    fetch = FakeFetch(error=OSError("down"))  # ... while JWKS failures keep their own type
    with pytest.raises(JWKSFetchError):
        asyncio.run(
            jwks_verifier(fetch).verify_connection_token_async(
                signed({"sub": "1"}, RSA_KEY, "RS256", kid="rsa1")
            )
        )


# hypothesis: whatever a client sends, the verifier answers with a result or a TokenError


def outcome(v: TokenVerifier, token: Any, subscription: bool) -> object:
    try:
        if subscription:
            return v.verify_subscription_token(token)
        return v.verify_connection_token(token)
    except TokenError as exc:
        # the explicit checks, not the catch-all backstop, should have caught it
        assert "malformed token (" not in str(exc), str(exc)
        return exc


FUZZ_VERIFIERS = [verifier(), verifier(client_insecure_skip_token_signature_verify=True)]

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()  # includes NaN and +-Infinity, which Python's json reads
    | st.text(max_size=8)
    | st.sampled_from(["HS256", "RS256", "none", "c", "1", "@@", "AQID"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner),
    max_leaves=12,
)
CLAIM_NAMES = [
    "sub", "exp", "nbf", "iat", "aud", "iss", "expire_at", "info", "b64info", "data", "b64data",
    "channel", "channels", "subs", "meta", "client", "override", "user_id",
]  # fmt: skip
claim_sets = st.dictionaries(st.sampled_from(CLAIM_NAMES), json_values, max_size=6)
headers = st.dictionaries(st.sampled_from(["alg", "kid", "typ"]), json_values) | json_values


def to_json(value: object) -> bytes:
    return json.dumps(value).encode()  # allow_nan: NaN and Infinity are what a client can send


@given(st.text(max_size=300), st.booleans())
def test_fuzz_arbitrary_text(token: str, subscription: bool) -> None:
    for v in FUZZ_VERIFIERS:
        outcome(v, token, subscription)


@given(st.lists(st.binary(max_size=80), min_size=1, max_size=4), st.booleans())
def test_fuzz_arbitrary_segments(segments: list[bytes], subscription: bool) -> None:
    token = ".".join(b64url(s) for s in segments)
    for v in FUZZ_VERIFIERS:
        outcome(v, token, subscription)


@given(headers, claim_sets | json_values, st.booleans())
def test_fuzz_json_header_and_payload(header: Any, claims: Any, subscription: bool) -> None:
    token = raw_token(to_json(header), to_json(claims))
    for v in FUZZ_VERIFIERS:
        result = outcome(v, token, subscription)
        if not isinstance(result, TokenError):
            assert isinstance(result, SubscriptionToken if subscription else ConnectToken)


@given(claim_sets, st.booleans())
def test_fuzz_signed_claims(claims: dict[str, Any], subscription: bool) -> None:
    token = raw_token(HS_HEADER, to_json(claims))
    for v in FUZZ_VERIFIERS:
        result = outcome(v, token, subscription)
        if not isinstance(result, TokenError):
            assert isinstance(result, SubscriptionToken if subscription else ConnectToken)
            assert result.expire_at is None or -(2**63) <= result.expire_at < 2**63
