"""JWKS keys for token verification: `parse_jwks` reads a document, `JWKSCache` fetches and
caches one per endpoint (through an injected coroutine), `verify_with_jwk` checks a token's
signature with one of its keys.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from jwt import PyJWK
from jwt.exceptions import PyJWKError, PyJWTError

from centripy.engine.jwt_parse import EC, OKP, RSA, InvalidToken, ParsedToken


class JWKSFetchError(Exception):
    """The JWKS endpoint could not be fetched or parsed: an internal error, not a bad token."""


_JWK_FAMILIES: Mapping[str, Mapping[str, Any]] = {"RSA": RSA, "EC": EC, "OKP": OKP}


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


def token_kid(parsed: ParsedToken) -> str:
    kid = parsed.header.get("kid")
    if not isinstance(kid, str) or not kid:
        raise InvalidToken("token has no kid header")
    return kid


def verify_with_jwk(parsed: ParsedToken, jwk: JWKey) -> None:
    alg = parsed.header.get("alg")  # a string or None: parse_token checked it
    family = _JWK_FAMILIES[jwk.kty]
    if not isinstance(alg, str) or alg not in family or (jwk.alg and jwk.alg != alg):
        raise InvalidToken(f"algorithm {alg!r} does not match the {jwk.kty} key")
    try:
        ok = family[alg].verify(parsed.signing_input, jwk.key, parsed.signature)
    except (ValueError, TypeError):
        ok = False
    if not ok:
        raise InvalidToken("bad signature")
