"""The HTTP server API (docs/spec/server_api.md 1.1-1.3): thin Tornado handlers over
`engine.api.Executor`.

Order of checks, as Centrifugo's middleware chain: POST only (else 405, empty body) ->
API key (else 401, empty body) -> route. `POST <prefix>/<method>` takes the method's JSON
request and answers `{"result":..}` / `{"error":..}` (`batch`: `{"replies":[..]}`);
`POST <prefix>` is the deprecated newline-delimited `{"id","method","params"}` format.
Handlers run on the server's event loop; `InFlight` lets graceful shutdown wait for calls
in progress.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import parse_qs

import orjson
from tornado.web import RequestHandler, stream_request_body

from centripy.engine.api import Executor
from centripy.engine.api_requests import METHODS, DecodeError, api_error, decode_request, error_body
from centripy.engine.config import Config
from centripy.engine.protocol import json_codec
from centripy.engine.protocol.codes import Error
from centripy.transports.linger import duplicate, linger

JSON_TYPE: Final = "application/json"
TEXT_TYPE: Final = "text/plain; charset=utf-8"
BAD_REQUEST: Final = b"Bad Request\n"
TOO_LARGE: Final = b'{"error":"request body too large"}'
NOT_FOUND: Final = b"404 page not found\n"
# HTTP status per API error code in transport error mode.
TRANSPORT_STATUS: Final = {100: 500, 102: 404, 104: 404, 107: 400, 108: 400, 112: 416, 113: 409}
ERROR_MODE_HEADER: Final = "X-Centrifugo-Error-Mode"

# Legacy `method` enum: OSS methods by number; PRO names are known (-> 104), others are 400.
LEGACY_METHODS: Final = (
    "publish", "broadcast", "unsubscribe", "disconnect", "presence", "presence_stats",
    "history", "history_remove", "channels", "info", "rpc", "subscribe", "refresh",
)  # fmt: skip
_LEGACY_PRO: Final = (
    "connections", "update_user_status", "get_user_status", "delete_user_status", "block_user",
    "unblock_user", "revoke_token", "invalidate_user_tokens", "device_register",
    "device_update", "device_remove", "device_list", "device_topic_list",
    "device_topic_update", "user_topic_list", "user_topic_update", "send_push_notification",
    "update_push_status", "cancel_push",
)  # fmt: skip
LEGACY_NUMBERS: Final = {
    **{name.upper(): i for i, name in enumerate(LEGACY_METHODS)},
    **{name.upper(): 14 + i for i, name in enumerate(_LEGACY_PRO)},
}
_UINT32_MAX: Final = 2**32 - 1
_ABSENT: Final = object()


class InFlight:
    """Counts API calls in progress. Used on the event loop only: handlers `track()`
    each call; the composition root awaits `wait_idle` during graceful shutdown."""

    def __init__(self) -> None:
        self._count = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def count(self) -> int:
        return self._count

    def track(self) -> InFlight:
        """`with inflight.track():` counts the block as a call in flight (the InFlight is
        its own context manager: no generator-based one built per API call)."""
        return self

    def __enter__(self) -> None:
        self._count += 1
        if self._count == 1:
            self._idle.clear()

    def __exit__(self, *exc: object) -> None:
        self._count -= 1
        if self._count == 0:
            self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        """True once no call is in flight; False if `timeout` seconds passed first."""
        if self._count == 0:
            return True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True


# --- pure helpers ----------------------------------------------------------------------------


def api_key_valid(key: str, x_api_key: str, authorization: str, query: str) -> bool:
    """Centrifugo's API key check (`api_insecure` is the caller's business): an empty
    configured key refuses everything; a non-empty `X-API-Key` is the only header looked
    at, else `Authorization: apikey KEY`; failing both, the `api_key` query parameter."""
    if not key:
        return False
    valid = False
    if x_api_key:
        valid = _same(key, x_api_key)
    elif authorization:
        parts = authorization.split()
        valid = len(parts) == 2 and parts[0].lower() == "apikey" and _same(key, parts[1])
    if not valid and query:
        values = parse_qs(query, keep_blank_values=True).get("api_key")
        valid = _same(key, values[0] if values else "")
    return valid


def _same(expected: str, given: str) -> bool:
    return hmac.compare_digest(expected.encode(), given.encode())


def _load_body(body: bytes) -> object:
    """The request object of a new-format call (JSON `null` is `{}` as in Go)."""
    if not body:
        raise DecodeError("empty request body")
    try:
        return json_codec.loads_exact(body)  # integers beyond 64 bits stay exact in `data`
    except ValueError as exc:
        raise DecodeError(f"request body is not JSON: {exc}") from None


async def answer_method(
    executor: Executor, method: str, body: bytes, transport_errors: bool
) -> tuple[int, bytes]:
    """(status, JSON body) of `POST <prefix>/<method>`; DecodeError -> handled by caller."""
    try:
        result = await executor.call(method, _load_body(body))
    except Error as exc:
        if transport_errors and method != "batch":
            return TRANSPORT_STATUS.get(exc.code, 500), orjson.dumps(error_body(exc))
        return 200, orjson.dumps({"error": error_body(exc)})
    return 200, orjson.dumps(result if method == "batch" else {"result": result})


@dataclass(frozen=True, slots=True)
class LegacyCommand:
    id: int
    method: int
    params: object  # _ABSENT when the key is missing


def _reject(name: str) -> None:
    raise DecodeError(f"{name} is not JSON")


_LEGACY_JSON = json.JSONDecoder(parse_constant=_reject)


def _skip_whitespace(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\n\r":
        pos += 1
    return pos


def decode_legacy(body: bytes) -> list[LegacyCommand]:
    """The JSON values of a legacy body (any JSON whitespace between them). DecodeError
    when a value does not parse or does not fit `{"id": uint32, "method", "params"}`."""
    try:
        text = body.decode()
    except UnicodeDecodeError:
        raise DecodeError("request body is not UTF-8") from None
    commands: list[LegacyCommand] = []
    pos = _skip_whitespace(text, 0)
    while pos < len(text):
        try:
            value, pos = _LEGACY_JSON.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise DecodeError(f"legacy command is not JSON: {exc}") from None
        except (ValueError, RecursionError):  # an integer of 4,300+ digits; deep nesting
            raise DecodeError("legacy command is not JSON this server can hold") from None
        commands.append(_legacy_command(value))
        pos = _skip_whitespace(text, pos)
    return commands


def _legacy_command(value: object) -> LegacyCommand:
    if value is None:
        return LegacyCommand(0, 0, _ABSENT)
    if not isinstance(value, dict):
        raise DecodeError("legacy command is not an object")
    fields = {str(k).lower(): v for k, v in value.items()}
    ident = fields.get("id")
    if ident is None:
        ident = 0
    if isinstance(ident, bool) or not isinstance(ident, int) or not 0 <= ident <= _UINT32_MAX:
        raise DecodeError("legacy id must be a uint32")
    method = _legacy_method(fields.get("method", 0))
    return LegacyCommand(ident, method, fields.get("params", _ABSENT))


def _legacy_method(value: object) -> int:
    """Numbers as they are; names case-insensitively; anything else (null too) is 400."""
    if isinstance(value, str) and value.upper() in LEGACY_NUMBERS:
        return LEGACY_NUMBERS[value.upper()]
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise DecodeError(f"unknown legacy method {value!r}")


async def legacy_reply(executor: Executor, command: LegacyCommand) -> bytes:
    """One legacy reply: `{"id":N,"result":..}` or `{"id":N,"error":..}` (id 0 omitted);
    params that do not decode give 107; unknown numbers and PRO methods 104."""
    reply: dict[str, Any] = {"id": command.id} if command.id else {}
    try:
        if not 0 <= command.method < len(LEGACY_METHODS):
            raise api_error(104)
        name = LEGACY_METHODS[command.method]
        if name == "info":
            reply["result"] = await executor.call("info", {})
        else:
            if command.params is _ABSENT:
                raise api_error(107)
            try:
                request = decode_request(name, command.params)
            except DecodeError:
                raise api_error(107) from None
            reply["result"] = await executor.execute(request)
    except Error as exc:
        reply["error"] = error_body(exc)
    return orjson.dumps(reply)


# --- the answer both HTTP paths give ----------------------------------------------------------

Answer = tuple[int, bytes, str]  # status, body, Content-Type ('' = none)


class ApiEndpoint:
    """Answers a `POST` to the API: what `ApiMethodHandler`/`ApiLegacyHandler` (Tornado's
    request handlers) and `transports.api_lean` (the lean keep-alive path) both send. The
    caller has already answered anything but POST with 405."""

    def __init__(self, executor: Executor, config: Config, inflight: InFlight | None = None):
        self.executor = executor
        self.config = config
        self.inflight = inflight or InFlight()

    def authorized(self, header: Callable[[str], str], query: str) -> bool:
        """`header(name)` is the first value of a request header ('' when absent)."""
        return self.config.api_insecure or api_key_valid(
            self.config.api_key, header("X-API-Key"), header("Authorization"), query
        )

    async def answer(
        self, method: str | None, body: bytes, header: Callable[[str], str], query: str
    ) -> Answer:
        """`method` is the path below the prefix; None for the legacy `POST <prefix>`."""
        if not self.authorized(header, query):
            return 401, b"", ""
        if method is None:
            return await self._legacy(body)
        if method not in METHODS:
            return 404, NOT_FOUND, TEXT_TYPE
        transport = (
            self.config.api_error_mode == "transport" or header(ERROR_MODE_HEADER) == "transport"
        )
        with self.inflight.track():
            try:
                status, out = await answer_method(self.executor, method, body, transport)
            except DecodeError:
                return 400, BAD_REQUEST, TEXT_TYPE
        return status, out, JSON_TYPE

    async def _legacy(self, body: bytes) -> Answer:
        """Newline-delimited legacy commands, replies joined by `\\n`."""
        if self.executor.node.shutting_down:
            return 503, b"", ""
        with self.inflight.track():
            try:
                if not body:
                    raise DecodeError("empty request body")
                commands = decode_legacy(body)
            except DecodeError:
                return 400, BAD_REQUEST, TEXT_TYPE
            replies = [await legacy_reply(self.executor, c) for c in commands]
        return 200, b"\n".join(replies), JSON_TYPE


# --- Tornado handlers ------------------------------------------------------------------------


class GoAnswers(RequestHandler):
    """Answers as Centrifugo's Go handlers write them: a status, a body and a Content-Type
    only when given (the API's and the admin's handlers)."""

    def _answer(
        self, status: int, body: bytes = b"", content_type: str = ""
    ) -> asyncio.Future[None]:
        """Finish with `status`; the future resolves once the answer is flushed."""
        self.set_status(status)
        self.clear_header("Content-Type")
        if content_type:
            self.set_header("Content-Type", content_type)
        return self.finish(body)

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        """Tornado's own errors (unsupported method, uncaught exception): Go-like bodies."""
        self.clear_header("Content-Type")
        if status_code >= 500:
            self.set_header("Content-Type", TEXT_TYPE)
            self.finish(b"Internal Server Error\n")
        else:
            self.finish()


@stream_request_body
class _ApiHandler(GoAnswers):
    """The body is streamed in, after the checks of `prepare`: a caller without the API
    key, or announcing a body over `api_max_request_body_size`, is answered before any
    of its body is read (then the connection closes, with a linger); a chunked body that grows
    past the limit makes Tornado drop the connection."""

    SUPPORTED_METHODS = ("GET", "HEAD", "POST", "DELETE", "PATCH", "PUT", "OPTIONS")

    def initialize(self, endpoint: ApiEndpoint) -> None:
        self.endpoint = endpoint
        self._chunks: list[bytes] = []

    def prepare(self) -> None:
        if self.request.method != "POST":
            self._answer(405)
            return
        if not self.endpoint.authorized(self._header, self.request.query):
            self._refuse(401)
            return
        limit = self.endpoint.config.api_max_request_body_size
        length = self.request.headers.get("Content-Length", "").strip()
        if length.isdigit() and int(length) > limit:
            self._refuse(413, TOO_LARGE, JSON_TYPE)
            return
        self.request.connection.set_max_body_size(limit)  # type: ignore[union-attr]

    def _refuse(self, status: int, body: bytes = b"", content_type: str = "") -> None:
        """Answer before the body is read; Tornado then closes its stream, and a duplicate
        of the socket lingers (`linger.py`) so that a caller still sending reads the answer."""
        sock = duplicate(self.request.connection.stream)  # type: ignore[union-attr]
        self._answer(status, body, content_type).add_done_callback(lambda _: linger(sock))

    def data_received(self, chunk: bytes) -> None:
        self._chunks.append(chunk)

    def _header(self, name: str) -> str:
        values = self.request.headers.get_list(name)
        return values[0] if values else ""

    async def _post(self, method: str | None) -> None:
        body = b"".join(self._chunks)
        answer = await self.endpoint.answer(method, body, self._header, self.request.query)
        self._answer(*answer)


class ApiMethodHandler(_ApiHandler):
    """`POST <prefix>/<method>`."""

    async def post(self, method: str) -> None:
        await self._post(method)


class ApiLegacyHandler(_ApiHandler):
    """`POST <prefix>`: the deprecated newline-delimited format."""

    async def post(self) -> None:
        await self._post(None)


def api_routes(
    executor: Executor, config: Config, inflight: InFlight | None = None
) -> list[tuple[str, type, dict[str, Any]]]:
    """Tornado rules for the API under `api_handler_prefix` (legacy route first). Pass the
    composition root's `InFlight` to wait for in-progress calls on shutdown."""
    prefix = re.escape(config.api_handler_prefix.rstrip("/"))
    kwargs: dict[str, Any] = {"endpoint": ApiEndpoint(executor, config, inflight)}
    return [
        (prefix or "/", ApiLegacyHandler, kwargs),
        (prefix + "/(.*)", ApiMethodHandler, kwargs),
    ]
