"""Parsing untrusted JWTs (docs/spec/protocol.md section 6): the token errors, the signature
algorithms, the compact serialization and typed readers of single claims.

Sans-I/O. Tokens come from hostile clients: every helper here turns what it finds wrong (size,
encoding, JSON nesting, claim types) into `InvalidToken`; the verifier (engine/auth.py) adds
the backstop for anything else.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from jwt.algorithms import ECAlgorithm, HMACAlgorithm, OKPAlgorithm, RSAAlgorithm


class TokenError(Exception):
    """Base of the token verification outcomes."""


class InvalidToken(TokenError):
    """Unparsable token, bad signature, disabled algorithm, or failed aud/iss/claim checks."""


class TokenExpired(TokenError):
    """`exp` is not in the future or `nbf` is not in the past (reply error 109)."""


# --------------------------------------------------------------------------- algorithms

HMAC = {
    "HS256": HMACAlgorithm(HMACAlgorithm.SHA256),
    "HS384": HMACAlgorithm(HMACAlgorithm.SHA384),
    "HS512": HMACAlgorithm(HMACAlgorithm.SHA512),
}
RSA = {
    "RS256": RSAAlgorithm(RSAAlgorithm.SHA256),
    "RS384": RSAAlgorithm(RSAAlgorithm.SHA384),
    "RS512": RSAAlgorithm(RSAAlgorithm.SHA512),
}
EC = {
    "ES256": ECAlgorithm(ECAlgorithm.SHA256),
    "ES384": ECAlgorithm(ECAlgorithm.SHA384),
    "ES512": ECAlgorithm(ECAlgorithm.SHA512),
}
OKP = {"EdDSA": OKPAlgorithm()}


MAX_TOKEN_LENGTH = 64 * 1024
"""Longer tokens are rejected before any decoding (a WebSocket frame is 64 KiB by default)."""

_INT64 = 2**63


def b64url_decode(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def b64url_encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


# --------------------------------------------------------------------------- parsing


@dataclass(frozen=True, slots=True)
class ParsedToken:
    header: Mapping[str, Any]
    claims: Mapping[str, Any]
    payload: bytes
    signing_input: bytes
    signature: bytes


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999: not representable (Go's JSON rejects it too)
        raise ValueError("number out of range")
    return value


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def strict_json(data: bytes) -> Any:
    """Strict JSON: no NaN/Infinity (Python's json would accept them), no infinite floats."""
    return json.loads(data, parse_float=_finite_float, parse_constant=_reject_constant)


def parse_token(token: str) -> ParsedToken:
    if not isinstance(token, str):
        raise InvalidToken("malformed token: not a string")
    if len(token) > MAX_TOKEN_LENGTH:
        raise InvalidToken(f"malformed token: longer than {MAX_TOKEN_LENGTH} characters")
    parts = token.split(".")
    if len(parts) != 3:
        raise InvalidToken("malformed token")
    try:
        header = strict_json(b64url_decode(parts[0]))
        payload = b64url_decode(parts[1])
        claims = strict_json(payload)
        signature = b64url_decode(parts[2])
    except (ValueError, binascii.Error, RecursionError) as exc:  # RecursionError: deep nesting
        raise InvalidToken(f"malformed token: {type(exc).__name__}") from None
    if not isinstance(header, dict) or not isinstance(claims, dict):
        raise InvalidToken("malformed token: header and claims must be objects")
    for name in ("alg", "kid"):  # looked up in dicts later: an array there is unhashable
        if header.get(name) is not None and not isinstance(header[name], str):
            raise InvalidToken(f"malformed token: {name} must be a string")
    signing_input = f"{parts[0]}.{parts[1]}".encode()
    return ParsedToken(header, claims, payload, signing_input, signature)


# --------------------------------------------------------------------------- claims


def raw_json(value: object) -> bytes:
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


def b64_claim(claims: Mapping[str, Any], key: str) -> bytes | None:
    value = claims.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise InvalidToken(f"{key} must be a string")
    try:
        return base64.b64decode(value, validate=True)
    except ValueError:  # binascii.Error, or non-ASCII characters
        raise InvalidToken(f"{key} is not valid base64") from None


def payload_claim(claims: Mapping[str, Any], key: str) -> bytes:
    """`key` as raw JSON, replaced by the decoded `b64<key>` when that is present."""
    decoded = b64_claim(claims, "b64" + key)
    return decoded if decoded is not None else raw_json(claims.get(key))


def str_claim(claims: Mapping[str, Any], key: str) -> str:
    value = claims.get(key, "")
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InvalidToken(f"{key} must be a string")
    return value


def number_claim(claims: Mapping[str, Any], key: str) -> float | None:
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
