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

Both see the same `RequestHead`: a head is parsed once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

HEAD_END: Final = b"\r\n\r\n"
MAX_CONTENT_LENGTH_DIGITS: Final = 18  # below 2**63: never an overflow anywhere

# The grammar (RFC 9110 / 9112, as Tornado's `httputil._ABNF` checks it), on bytes.
_TOKEN: Final = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_FIELD_VCHAR: Final = rb"[\x21-\x7e\x80-\xff]"
_FIELD_VALUE: Final = rb"(?:" + _FIELD_VCHAR + rb"(?:[ \t]*" + _FIELD_VCHAR + rb")*)?"
_REQUEST_LINE: Final = re.compile(rb"(" + _TOKEN + rb") (" + _FIELD_VCHAR + rb"+) (HTTP/1\.[01])")
_FIELD_LINE: Final = re.compile(rb"(" + _TOKEN + rb"):[ \t]*(" + _FIELD_VALUE + rb")[ \t]*")
_HOST: Final = re.compile(rb"[A-Za-z0-9\-._~!$&'()*+;=\[\]:]*(?::[0-9]*)?")  # no `%`, no `,`
# Headers that make a POST Tornado's business (it implements them; we do not).
_HANDED_OVER: Final = ("transfer-encoding", "expect", "upgrade")


@dataclass(frozen=True, slots=True)
class RequestHead:
    """A request head `parse_request_head` accepted."""

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


def parse_request_head(head: bytes) -> RequestHead | None:
    """The request in `head` (request line and header lines, ending with an empty line, as
    read up to the first `\\r\\n\\r\\n`) when it passes the policy in the module docstring;
    None otherwise (the caller then leaves the bytes to Tornado). Never raises."""
    lines = head[: -len(HEAD_END)].split(b"\r\n") if head.endswith(HEAD_END) else [b""]
    start = _REQUEST_LINE.fullmatch(lines[0])
    if start is None:
        return None
    method, target, version = start.groups()
    if not target.startswith(b"/") or b"%" in target or b"#" in target:
        return None
    headers: dict[str, str] = {}
    fields: list[tuple[str, str]] = []
    length: str | None = None
    for line in lines[1:]:
        field = _FIELD_LINE.fullmatch(line)
        if field is None:
            return None  # no colon, not a token name, a control character, a folded line
        key = field[1].lower().decode("ascii")
        text = field[2].decode("latin-1")
        if key == "content-length":
            if (
                length is not None
                or len(text) > MAX_CONTENT_LENGTH_DIGITS
                or not (text.isascii() and text.isdigit())
            ):
                return None
            length = text
        elif key == "host" and (key in headers or _HOST.fullmatch(field[2]) is None):
            return None
        headers.setdefault(key, text)
        fields.append((key, text))
    path, _, query = target.decode("latin-1").partition("?")
    return RequestHead(
        method=method.decode("ascii"),
        path=path,
        query=query,
        http10=version == b"HTTP/1.0",
        headers=headers,
        fields=tuple(fields),
        content_length=int(length or 0),
    )


def lean_post(request: RequestHead) -> bool:
    """True when the API fast path may answer `request`: a POST with at most a
    Content-Length body, nothing Tornado implements and we do not (chunked bodies,
    `Expect: 100-continue`, protocol upgrades)."""
    if request.method != "POST":
        return False
    headers = request.headers
    return not any(name in headers for name in _HANDED_OVER)
