"""engine/admin_auth.py: Centrifugo's admin tokens (gorilla/securecookie, name "token", value
"authorized", HMAC-SHA256 with admin_secret, 30 days) and the request check."""

from __future__ import annotations

import base64
import hashlib
import hmac

import pytest
from hypothesis import given
from hypothesis import strategies as st

from centripy.engine import admin_auth
from centripy.engine.admin_auth import (
    MAX_AGE,
    authorized,
    gob_string,
    issue_token,
    password_matches,
    request_token,
    verify_token,
)

SECRET = "admin-secret"
NOW = 1_760_000_000


def test_gob_encoding_of_the_value_is_what_go_writes() -> None:
    # encoding/gob of the Go string "authorized": length 13, type id 6 (as 12), field 0,
    # byte length 10, the bytes.
    assert gob_string("authorized") == b"\x0d\x0c\x00\x0aauthorized"
    assert gob_string("") == b"\x03\x0c\x00\x00"
    # at 128 and above: the negated byte count, then big-endian bytes
    assert gob_string("x" * 200)[:6] == b"\xff\xcc\x0c\x00\xff\xc8"
    assert gob_string("x" * 300)[:8] == b"\xfe\x01\x31\x0c\x00\xfe\x01\x2c"


def test_token_layout_is_securecookies() -> None:
    token = issue_token(SECRET, now=NOW)
    raw = base64.urlsafe_b64decode(token)
    stamp, value, mac = raw.split(b"|", 2)
    assert stamp == str(NOW).encode()
    assert base64.urlsafe_b64decode(value) == gob_string("authorized")
    expected = hmac.new(SECRET.encode(), b"token|" + stamp + b"|" + value, hashlib.sha256)
    assert mac == expected.digest()
    assert len(token) <= admin_auth.MAX_LENGTH


def test_a_fresh_token_verifies_until_it_is_thirty_days_old() -> None:
    token = issue_token(SECRET, now=NOW)
    assert verify_token(SECRET, token, now=NOW)
    assert verify_token(SECRET, token, now=NOW + MAX_AGE)
    assert not verify_token(SECRET, token, now=NOW + MAX_AGE + 1)
    assert MAX_AGE == 30 * 86400
    assert verify_token(SECRET, token, now=NOW + 3600, max_age=3600)
    assert not verify_token(SECRET, token, now=NOW + 3601, max_age=3600)


def test_another_secret_or_a_changed_byte_fails() -> None:
    token = issue_token(SECRET, now=NOW)
    assert not verify_token("other-secret", token, now=NOW)
    raw = bytearray(base64.urlsafe_b64decode(token))
    for i in range(len(raw)):
        tampered = bytearray(raw)
        tampered[i] ^= 0x01
        assert not verify_token(SECRET, base64.urlsafe_b64encode(tampered).decode(), now=NOW), i


def test_a_token_signed_over_another_value_fails() -> None:
    value = base64.urlsafe_b64encode(gob_string("nobody"))
    signed = b"token|%d|%s" % (NOW, value)
    mac = hmac.new(SECRET.encode(), signed, hashlib.sha256).digest()
    token = base64.urlsafe_b64encode(signed[len(b"token|") :] + b"|" + mac).decode()
    assert not verify_token(SECRET, token, now=NOW)


@pytest.mark.parametrize(
    "token", ["", "insecure", "!!!", "dG9rZW4", "a" * 5000, "fA==", "MXwyfDM=", "w6k="]
)
def test_garbage_never_verifies(token: str) -> None:
    assert not verify_token(SECRET, token, now=NOW)


@given(st.text(max_size=300))
def test_verify_never_raises(token: str) -> None:
    assert verify_token(SECRET, token, now=NOW) is False


def test_an_empty_secret_signs_nothing_and_verifies_nothing() -> None:
    with pytest.raises(ValueError, match="admin_secret"):
        issue_token("")
    assert not verify_token("", issue_token(SECRET))


def test_request_token_follows_centrifugo() -> None:
    assert request_token("token abc", "") == "abc"
    assert request_token("TOKEN abc", "q") == "abc"
    assert request_token("  token   abc ", "") == "abc"
    assert request_token("Bearer abc", "q") is None  # a header that is not `token` -> 401
    assert request_token("token", "q") is None
    assert request_token("token a b", "q") is None
    assert request_token("", "q") == "q"
    assert request_token("", "") == ""


def test_authorized() -> None:
    token = issue_token(SECRET, now=NOW)
    assert authorized(SECRET, False, f"token {token}", "", now=NOW)
    assert authorized(SECRET, False, "", token, now=NOW)
    assert not authorized(SECRET, False, "", "", now=NOW)
    assert not authorized(SECRET, False, "apikey x", token, now=NOW)
    assert not authorized("", False, f"token {token}", "", now=NOW)  # no secret configured
    assert not authorized(SECRET, False, f"token {token}", "", now=NOW + MAX_AGE + 1)
    assert authorized("", True, "", "")  # admin_insecure lets everything through
    assert authorized(SECRET, True, "Bearer junk", "")


def test_password_matches() -> None:
    assert password_matches("pw", "pw")
    assert not password_matches("pw", "pW")
    assert not password_matches("pw", "")
    assert not password_matches("", "")  # no configured password: nobody logs in
