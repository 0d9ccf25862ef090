"""Admin web UI tokens, as Centrifugo v5 makes them (pure; no I/O, the clock is a parameter).

Centrifugo signs the admin token with gorilla/securecookie: the name "token" and the value
"authorized" (gob-encoded), HMAC-SHA256 keyed with `admin_secret`, valid for 30 days (the
library's default max age), at most 4096 characters. The token is
`base64url("<unix seconds>|<base64url(value)>|<mac>")` where the MAC covers
`"token|<unix seconds>|<base64url(value)>"`; a token Centrifugo issued with the same secret
verifies here and the other way round. Only the secret authenticates: anyone holding it can
mint tokens, so keep it out of the browser.

Requests carry the token as `Authorization: token <t>` or, without an Authorization header,
as the `token` query parameter; `admin_insecure` skips the check altogether (no password, no
token: only for an admin port nobody else can reach).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import time
from typing import Final

TOKEN_NAME: Final = "token"
TOKEN_VALUE: Final = "authorized"
MAX_AGE: Final = 86400 * 30  # seconds: securecookie's default, which Centrifugo keeps
MAX_LENGTH: Final = 4096  # securecookie's default maximum encoded length
INSECURE_TOKEN: Final = "insecure"  # what /admin/auth answers in admin_insecure mode
_TIMESTAMP = re.compile(rb"[+-]?[0-9]{1,19}")


def _gob_uint(value: int) -> bytes:
    """encoding/gob's unsigned integer: one byte below 128, else the negated byte count
    followed by the big-endian bytes."""
    if value < 0x80:
        return bytes([value])
    raw = value.to_bytes((value.bit_length() + 7) // 8, "big")
    return bytes([256 - len(raw)]) + raw


def gob_string(value: str) -> bytes:
    """A Go string as encoding/gob sends it on its own: message length, type id (string is
    6, sent as 12), the singleton field delta 0, the byte length and the bytes."""
    data = value.encode()
    message = _gob_uint(12) + b"\x00" + _gob_uint(len(data)) + data
    return _gob_uint(len(message)) + message


_SERIALIZED: Final = gob_string(TOKEN_VALUE)


def _mac(secret: str, signed: bytes) -> bytes:
    return hmac.new(secret.encode(), signed, hashlib.sha256).digest()


def issue_token(secret: str, now: float | None = None) -> str:
    """A token for `secret`, issued at `now` (Unix seconds; default: the current time).
    ValueError for an empty secret (Centrifugo refuses to sign without one)."""
    if not secret:
        raise ValueError("admin_secret is empty")
    stamp = int(time.time() if now is None else now)
    value = base64.urlsafe_b64encode(_SERIALIZED)
    signed = b"%s|%d|%s" % (TOKEN_NAME.encode(), stamp, value)
    body = signed[len(TOKEN_NAME) + 1 :] + b"|" + _mac(secret, signed)
    return base64.urlsafe_b64encode(body).decode()


def verify_token(secret: str, token: str, now: float | None = None, max_age: int = MAX_AGE) -> bool:
    """True when `token` was signed with `secret`, is at most `max_age` seconds old at `now`
    and carries the admin value. Never raises on malformed input."""
    if not secret or not token or len(token) > MAX_LENGTH:
        return False
    try:
        raw = base64.b64decode(token.encode("ascii"), altchars=b"-_", validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        return False
    parts = raw.split(b"|", 2)
    if len(parts) != 3:
        return False
    signed = TOKEN_NAME.encode() + b"|" + raw[: len(raw) - len(parts[2]) - 1]
    if not hmac.compare_digest(_mac(secret, signed), parts[2]):
        return False
    if _TIMESTAMP.fullmatch(parts[0]) is None:
        return False
    issued = int(parts[0])
    current = int(time.time() if now is None else now)
    if max_age and issued < current - max_age:
        return False
    try:
        value = base64.b64decode(parts[1], altchars=b"-_", validate=True)
    except (binascii.Error, ValueError):
        return False
    return value == _SERIALIZED


def request_token(authorization: str, query_token: str) -> str | None:
    """The token a request presents, or None when its Authorization header is malformed
    (not exactly `token <t>`, scheme case-insensitive). The query parameter counts only
    without an Authorization header."""
    if authorization:
        parts = authorization.split()
        if len(parts) != 2 or parts[0].lower() != "token":
            return None
        return parts[1]
    return query_token


def authorized(
    secret: str, insecure: bool, authorization: str, query_token: str, now: float | None = None
) -> bool:
    """Centrifugo's admin check: everything passes in insecure mode; otherwise a secret must
    be configured and the request's token must verify against it."""
    if insecure:
        return True
    token = request_token(authorization, query_token)
    return bool(secret) and bool(token) and verify_token(secret, token or "", now)


def password_matches(configured: str, given: str) -> bool:
    """Constant-time comparison; an empty configured password never matches."""
    return bool(configured) and hmac.compare_digest(configured.encode(), given.encode())
