"""Sans-I/O HTTP/1.1 request heads for the lean path (in the manner of h11): bytes in, one
typed `RequestHead` out, no sockets, loops or Tornado objects.

The lean path (`api_lean.py`) shares its port with Tornado, so the parser's job is not to
understand every request but to recognise, strictly, the ones it may answer itself and to
leave everything else to Tornado, which then parses the same bytes and answers them as it
always does (malformed requests included). The policy is explicit, in two steps:

1. `parse_request_head(head)` accepts a head only when all of this holds, else None:
   - the request line is `token SP target SP version` (RFC 9112 3), the version `HTTP/1.1`
     or `HTTP/1.0`, the target in origin form (`/...`) without `%` (no percent-decoding
     here) or `#`;
   - every header line is `token ":" OWS value OWS` with a value of visible characters,
     spaces and tabs only (RFC 9110 5.5; the grammar Tornado checks), lines ending in CRLF:
     so a folded line (leading whitespace), a bare CR or LF, a NUL, a missing colon or a
     space in a name are all refused;
   - at most one Content-Length, of 1 to 18 ASCII digits (no sign, no list, no overflow);
   - at most one Host, a valid host[:port] without `%` or `,` (Tornado answers 400 to the
     others). A missing Host is accepted (the API path has always answered those; the
     upgrade policy requires one).
2. What the parsed head is for is decided by its user:
   - `lean_post(request)`: a POST without Transfer-Encoding, Expect or Upgrade (Tornado
     implements those; we do not), answered by the API fast path;
   - `ws_protocol.accept_upgrade(request)`: a WebSocket handshake.

Both see the same `RequestHead`: a head is parsed once. And a head seen recently is not
parsed again: an API client sends the same head over and over (the same headers, often the
same Content-Length), so the `RequestHead`s of up to `REMEMBERED` short heads are kept, and
shared (read-only: a frozen dataclass).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

HEAD_END: Final = b"\r\n\r\n"
MAX_HEAD: Final = 65536  # the largest head read, end included (Tornado's max_header_size)
MAX_CONTENT_LENGTH_DIGITS: Final = 18  # below 2**63: never an overflow anywhere
REMEMBERED: Final = 512  # heads whose parse is kept (all forgotten when full)
REMEMBERED_SIZE: Final = 2048  # longer heads are parsed each time

# The grammar (RFC 9110 / 9112, as Tornado's `httputil._ABNF` checks it), on the head
# decoded as latin-1 (one character per byte). A field line is `token ":" OWS value OWS`
# where the value starts and ends with a visible character; with the OWS around it, what
# follows the colon is any run of visible characters, spaces and tabs, which one
# character class checks. The whole head is checked by one match.
_TOKEN: Final = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_FIELD_VCHAR: Final = r"[\x21-\x7e\x80-\xff]"
_HEAD: Final = re.compile(
    r"(" + _TOKEN + r") (" + _FIELD_VCHAR + r"+) HTTP/1\.([01])\r\n"  # the request line
    r"((?:" + _TOKEN + r":[\t\x20-\x7e\x80-\xff]*\r\n)*)\r\n"  # the field lines
)
_OWS: Final = " \t"
_HOST: Final = re.compile(r"[A-Za-z0-9\-._~!$&'()*+;=\[\]:]*(?::[0-9]*)?")  # no `%`, no `,`
# Headers that make a POST Tornado's business (it implements them; we do not).
_HANDED_OVER: Final = ("transfer-encoding", "expect", "upgrade")


@dataclass(frozen=True, slots=True)
class RequestHead:
    """A request head `parse_request_head` accepted (shared by the requests with the same
    head: never change its `headers`)."""

    method: str
    path: str  # the target before `?`
    query: str  # the target after `?` ("" when none)
    http10: bool
    headers: dict[str, str]  # lower-cased names; the first value of each, stripped
    fields: tuple[tuple[str, str], ...]  # every (lower-cased name, value), in order
    content_length: int  # 0 when absent

    def header(self, name: str) -> str:
        """The first value of header `name` (any case), or ""."""
        return self.headers.get(name.lower(), "")

    def joined(self, name: str) -> str | None:
        """All values of header `name` (lower case) joined by `,` (RFC 9110 5.3), or None
        when the header is absent."""
        values = [value for key, value in self.fields if key == name]
        return ",".join(values) if values else None

    @property
    def keep_alive(self) -> bool:
        """Whether the connection stays open after the response (HTTP/1.0: only with
        `Connection: keep-alive`; HTTP/1.1: unless `Connection: close`)."""
        connection = self.headers.get("connection", "").lower()
        return "keep-alive" in connection if self.http10 else "close" not in connection


_remembered: dict[bytes, RequestHead | None] = {}


def parse_request_head(head: bytes) -> RequestHead | None:
    """The request in `head` (request line and header lines, ending with an empty line, as
    read up to the first `\\r\\n\\r\\n`) when it passes the policy in the module docstring;
    None otherwise (the caller then leaves the bytes to Tornado). Never raises."""
    if len(head) > REMEMBERED_SIZE:
        return _parse(head)
    try:
        return _remembered[head]
    except KeyError:
        pass
    if len(_remembered) >= REMEMBERED:
        _remembered.clear()
    request = _remembered[head] = _parse(head)
    return request


def _parse(head: bytes) -> RequestHead | None:
    match = _HEAD.fullmatch(head.decode("latin-1"))
    if match is None:
        return None
    method, target, minor, block = match.groups()
    if target[0] != "/" or "%" in target or "#" in target:
        return None
    headers: dict[str, str] = {}
    fields: list[tuple[str, str]] = []
    length = ""
    if block:
        for line in block[:-2].split("\r\n"):
            name, _, value = line.partition(":")
            key = name.lower()
            text = value.strip(_OWS)
            if key == "content-length":
                if (
                    length
                    or len(text) > MAX_CONTENT_LENGTH_DIGITS
                    or not (text.isascii() and text.isdigit())
                ):
                    return None
                length = text
            elif key == "host" and (key in headers or _HOST.fullmatch(text) is None):
                return None
            if key not in headers:
                headers[key] = text
            fields.append((key, text))
    path, _, query = target.partition("?")
    return RequestHead(method, path, query, minor == "0", headers, tuple(fields), int(length or 0))


def lean_post(request: RequestHead) -> bool:
    """True when the API fast path may answer `request`: a POST with at most a
    Content-Length body, nothing Tornado implements and we do not (chunked bodies,
    `Expect: 100-continue`, protocol upgrades)."""
    if request.method != "POST":
        return False
    headers = request.headers
    return not any(name in headers for name in _HANDED_OVER)
