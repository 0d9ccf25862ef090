"""`/connection/sockjs`: the SockJS 0.3 endpoint (docs/spec/protocol.md 5.3), as Centrifugo v5
serves it through igm/sockjs-go v3. Thin Tornado handlers; sessions and framing live in
`transports/sockjs_session.py`.

Routes under the prefix: `GET /` (greeting), `GET|OPTIONS /info`, `GET /iframe*.html`
(loads `sockjs_url`), and per session `/<server>/<session>/` + `xhr`, `xhr_streaming`,
`eventsource`, `htmlfile`, `jsonp` (receiving), `xhr_send`, `jsonp_send` (sending),
`websocket`. The raw `/websocket` endpoint is disabled (404), as in Centrifugo.

Each SockJS message carries one Centrifuge JSON frame; a disconnect is `c[code,"reason"]`.
Heartbeats: `h` every `sockjs_heartbeat_delay` seconds (default 25 s, sockjs-go's default;
0 disables) while a receiver is attached. Centrifugo v5 turns them off and relies on its
`{}` pings alone; centripy keeps them by default so that proxies do not cut idle streams
and a polling request never hangs longer than the delay.

CORS (HTTP transports): a request whose `Origin` passes `allowed_origins`, or that has no
`Origin`, gets `Access-Control-Allow-Origin` (the origin, or `*`) and
`Access-Control-Allow-Credentials: true`; otherwise no CORS headers (the request is still
served; the browser refuses to read it). The session `websocket` rejects a disallowed
`Origin` with 403, like `/connection/websocket`.

All handlers run on the server's event loop.
"""

from __future__ import annotations

import email.utils
import hashlib
import html
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final

import orjson
import tornado.websocket
from tornado.web import RequestHandler

from centripy.actors.context import ConnContext
from centripy.engine.config import Config
from centripy.transports.http_common import refuse_over_admission, write_timeout
from centripy.transports.origins import origin_allowed
from centripy.transports.sockjs_session import (
    ANOTHER_CONNECTION_FRAME,
    RESPONSE_LIMIT,
    BadPayload,
    HttpReceiver,
    Session,
    SessionRegistry,
    WebSocketReceiver,
    parse_messages,
    quote,
    retrieve,
)

JS_TYPE: Final = "application/javascript; charset=UTF-8"
TEXT_TYPE: Final = "text/plain; charset=UTF-8"
HTML_TYPE: Final = "text/html; charset=UTF-8"
YEAR: Final = 365 * 24 * 60 * 60
MAX_SEND_BODY: Final = 1024 * 1024  # bytes of one xhr_send / jsonp_send body
_INVALID_CALLBACK: Final = re.compile(r"[^a-zA-Z0-9_.]")
_SESSION: Final = r"([^/.]+)/([^/.]+)"

IFRAME_PAGE: Final = """<!DOCTYPE html>
<html>
<head>
  <meta http-equiv="X-UA-Compatible" content="IE=edge" />
  <meta http-equiv="Content-Type" content="text/html; charset=UTF-8" />
  <script>
    document.domain = document.domain;
    _sockjs_onload = function(){{SockJS.bootstrap_iframe();}};
  </script>
  <script src="{url}"></script>
</head>
<body>
  <h2>Don't panic!</h2>
  <p>This is a SockJS hidden iframe. It's used for cross domain magic.</p>
</body>
</html>"""

HTMLFILE_PAGE: Final = """<!doctype html>
<html><head>
  <meta http-equiv="X-UA-Compatible" content="IE=edge" />
  <meta http-equiv="Content-Type" content="text/html; charset=UTF-8" />
</head><body><h2>Don't panic!</h2>
  <script>
    document.domain = document.domain;
    var c = parent.{callback};
    c.start();
    function p(d) {{c.message(d);}};
    window.onload = function() {{c.stop();}};
  </script>
"""


# -- pure helpers -------------------------------------------------------------------------


def info_body(websocket: bool = True) -> bytes:
    """The `/info` document (with a fresh 31-bit entropy) and sockjs-go's trailing newline."""
    doc = {
        "websocket": websocket,
        "cookie_needed": False,
        "origins": ["*:*"],
        "entropy": secrets.randbelow(2**31),
    }
    return orjson.dumps(doc) + b"\n"


def iframe_page(sockjs_url: str) -> tuple[bytes, str]:
    """The iframe page loading `sockjs_url`, and its ETag."""
    body = IFRAME_PAGE.format(url=html.escape(sockjs_url, quote=True)).encode()
    return body, '"' + hashlib.md5(body, usedforsecurity=False).hexdigest() + '"'


def htmlfile_prelude(callback: str) -> bytes:
    """The htmlfile page head calling `parent.<callback>`, padded past 1 KiB (old IE
    renders nothing before that), then a blank line."""
    page = HTMLFILE_PAGE.format(callback=callback).encode()
    return page + b" " * max(0, 1024 - len(page)) + b"\r\n\r\n"


def callback_error(callback: str) -> tuple[int, str] | None:
    """The error answer for a `c` (callback) query argument, or None if it is usable."""
    if not callback:
        return 500, '"callback" parameter required'
    if _INVALID_CALLBACK.search(callback):
        return 400, 'invalid character in "callback" parameter'
    return None


@dataclass(frozen=True, slots=True)
class ReceiverKind:
    """How one receiving transport frames its response."""

    method: str
    content_type: str
    limit: int  # bytes of frames before the response ends (1: polling)
    callback: bool  # needs the `c` query argument
    options: bool  # answers a CORS preflight

    def prelude(self, name: str, callback: str) -> bytes:
        if name == "xhr_streaming":
            return b"h" * 2048 + b"\n"
        if name == "eventsource":
            return b"\r\n"
        if name == "htmlfile":
            return htmlfile_prelude(callback)
        return b""

    @staticmethod
    def encoder(name: str, callback: str) -> Callable[[bytes], bytes]:
        if name == "eventsource":
            return lambda frame: b"data: " + frame + b"\r\n\r\n"
        if name == "htmlfile":
            return lambda frame: b"<script>\np(" + quote(frame, html=True) + b");\n</script>\r\n"
        if name == "jsonp":
            prefix = callback.encode() + b"("
            return lambda frame: prefix + quote(frame) + b");\r\n"
        return lambda frame: frame + b"\n"


RECEIVERS: Final = {
    "xhr": ReceiverKind("POST", JS_TYPE, 1, callback=False, options=True),
    "xhr_streaming": ReceiverKind("POST", JS_TYPE, RESPONSE_LIMIT, callback=False, options=True),
    "eventsource": ReceiverKind(
        "GET", "text/event-stream; charset=UTF-8", RESPONSE_LIMIT, callback=False, options=False
    ),
    "htmlfile": ReceiverKind("GET", HTML_TYPE, RESPONSE_LIMIT, callback=True, options=False),
    "jsonp": ReceiverKind("GET", JS_TYPE, 1, callback=True, options=True),
}


# -- handlers -----------------------------------------------------------------------------


@dataclass(slots=True)
class SockJSEndpoint:
    """What every SockJS handler of one endpoint shares."""

    config: Config
    ctx: ConnContext
    sessions: SessionRegistry
    iframe_body: bytes
    iframe_etag: str


class _Base(RequestHandler):
    def initialize(self, endpoint: SockJSEndpoint) -> None:
        self.endpoint = endpoint

    def compute_etag(self) -> str | None:
        return None

    def cors(self) -> None:
        origin = self.request.headers.get("Origin")
        allowed = self.endpoint.config.allowed_origins
        if origin is not None and not origin_allowed(allowed, origin):
            return
        self.set_header("Access-Control-Allow-Origin", origin or "*")
        requested = self.request.headers.get("Access-Control-Request-Headers")
        if requested and requested != "null":
            self.set_header("Access-Control-Allow-Headers", requested)
        self.set_header("Access-Control-Allow-Credentials", "true")

    def no_cache(self) -> None:
        self.set_header("Cache-Control", "no-store, no-cache, must-revalidate, max-age=0")

    def cache_for_a_year(self) -> None:
        self.set_header("Cache-Control", f"public, max-age={YEAR}")
        self.set_header("Expires", email.utils.formatdate(time.time() + YEAR, usegmt=True))
        self.set_header("Access-Control-Max-Age", str(YEAR))

    def preflight(self, methods: str) -> None:
        self.cors()
        self.cache_for_a_year()
        self.set_header("Access-Control-Allow-Methods", methods)
        self.set_status(204)
        self.finish()

    def text(self, status: int, message: str) -> None:
        self.set_status(status)
        self.set_header("Content-Type", TEXT_TYPE)
        self.finish(message)

    def not_allowed(self, allow: str) -> None:
        self.clear_header("Content-Type")
        self.set_header("Allow", allow)
        self.set_status(405)
        self.finish()


class WelcomeHandler(_Base):
    def get(self) -> None:
        self.set_header("Content-Type", TEXT_TYPE)
        self.finish(b"Welcome to SockJS!\n")


class InfoHandler(_Base):
    def get(self) -> None:
        self.cors()
        self.no_cache()
        self.set_header("Content-Type", "application/json; charset=UTF-8")
        self.finish(info_body())

    def options(self) -> None:
        self.preflight("OPTIONS, GET")


class IframeHandler(_Base):
    def get(self) -> None:
        self.cache_for_a_year()
        etag = self.endpoint.iframe_etag
        if self.request.headers.get("If-None-Match", "").strip() in (etag, etag.strip('"')):
            self.set_status(304)
            self.finish()
            return
        self.set_header("Content-Type", HTML_TYPE)
        self.set_header("ETag", etag)
        self.finish(self.endpoint.iframe_body)


class ReceiveHandler(_Base):
    """`xhr`, `xhr_streaming`, `eventsource`, `htmlfile`, `jsonp`: attach a receiver to the
    session (created with its connection actor if new) and hold the response open until the
    receiver ends."""

    _recv: HttpReceiver | None = None

    async def get(self, server: str, session_id: str, name: str) -> None:
        await self._dispatch("GET", session_id, name)

    async def post(self, server: str, session_id: str, name: str) -> None:
        await self._dispatch("POST", session_id, name)

    def options(self, server: str, session_id: str, name: str) -> None:
        if RECEIVERS[name].options:
            self.preflight("OPTIONS, POST")
        else:
            self.not_allowed(RECEIVERS[name].method)

    async def _dispatch(self, method: str, session_id: str, name: str) -> None:
        kind = RECEIVERS[name]
        if method != kind.method:
            self.not_allowed(kind.method + (", OPTIONS" if kind.options else ""))
            return
        sessions = self.endpoint.sessions
        if sessions.get(session_id) is None and refuse_over_admission(self, self.endpoint.ctx):
            return  # a new session over the connection limits
        self.set_header("Content-Type", kind.content_type)
        self.cors()
        self.no_cache()
        callback = self.get_query_argument("c", "") if kind.callback else ""
        error = callback_error(callback) if kind.callback else None
        if error is not None:
            self.text(*error)
            return
        prelude = kind.prelude(name, callback)
        if prelude:
            self.write(prelude)
            self.flush().add_done_callback(retrieve)
        timeout = write_timeout(self.endpoint.ctx)
        recv = HttpReceiver(self, kind.encoder(name, callback), kind.limit, timeout)
        self._recv = recv
        headers = self.endpoint.ctx.proxy_headers(self.request.headers.get)
        session = self.endpoint.sessions.get_or_create(session_id, headers)
        if not session.attach(recv):
            recv.send_frame(ANOTHER_CONNECTION_FRAME)
            recv.close()
            return
        await recv.done

    def on_connection_close(self) -> None:
        if self._recv is not None:
            self._recv.interrupt()


class SendHandler(_Base):
    """`xhr_send` (204) and `jsonp_send` (200 "ok"): hand the messages to the session
    (503 while it is saturated). A body announced over `body_limit` is refused with 413 by
    the lean HTTP path before it is read."""

    body_limit = MAX_SEND_BODY

    def post(self, server: str, session_id: str, name: str) -> None:
        self.cors()
        self.no_cache()
        status = 500 if name == "xhr_send" else 400
        payload = self.request.body
        if len(payload) > MAX_SEND_BODY:
            self.text(413, "Payload too large.")
            return
        if name == "jsonp_send":
            form = self.get_body_argument("d", "")
            payload = form.encode() if form else payload
        try:
            messages = parse_messages(payload)
        except BadPayload as exc:
            self.text(status, str(exc))
            return
        session = self.endpoint.sessions.get(session_id)
        if session is None:
            self.text(404, "404 page not found\n")
            return
        if session.saturated(self.endpoint.config.client_max_pending_frames):
            self.text(503, "sockjs: session saturated, retry")
            return
        if not session.accept(messages):
            self.text(500, "sockjs: session not in open state")
            return
        if name == "xhr_send":
            self.set_status(204)
            self.finish()
        else:
            self.set_header("Content-Type", TEXT_TYPE)
            self.finish(b"ok")

    def options(self, server: str, session_id: str, name: str) -> None:
        if name == "xhr_send":
            self.preflight("OPTIONS, POST")
        else:
            self.not_allowed("POST")


class SessionWebSocketHandler(tornado.websocket.WebSocketHandler):
    """`/<server>/<session>/websocket`: a session of its own over one WebSocket."""

    def initialize(self, endpoint: SockJSEndpoint) -> None:
        self.endpoint = endpoint
        self.session: Session | None = None
        self.recv: WebSocketReceiver | None = None

    def check_origin(self, origin: str) -> bool:
        return origin_allowed(self.endpoint.config.allowed_origins, origin)

    def prepare(self) -> None:
        refuse_over_admission(self, self.endpoint.ctx)

    def open(self, *args: str, **kwargs: str) -> None:
        session = Session(args[1], heartbeat=self.endpoint.config.sockjs_heartbeat_delay)
        session.start(self.endpoint.ctx, self.endpoint.ctx.proxy_headers(self.request.headers.get))
        self.session = session
        self.recv = WebSocketReceiver(self)
        session.attach(self.recv)

    def on_message(self, message: str | bytes) -> Awaitable[None] | None:
        """Hand the messages to the session; while its actor has too many frames waiting,
        Tornado reads nothing more from this WebSocket (read backpressure)."""
        data = message.encode() if isinstance(message, str) else message
        if not data.strip():
            return None  # SockJS ignores empty frames
        try:
            messages = parse_messages(data)
        except BadPayload:
            self.close()
            if self.recv is not None:
                self.recv.end()
            return None
        session = self.session
        if session is None or not session.accept(messages):
            return None
        if session.saturated(self.endpoint.config.client_max_pending_frames):
            return session.resumed()
        return None

    def on_close(self) -> None:
        if self.recv is not None:
            self.recv.end()


def sockjs_routes(config: Config, ctx: ConnContext) -> list[Any]:
    """Tornado routes of the SockJS endpoint at `config.sockjs_handler_prefix`."""
    prefix = re.escape(config.sockjs_handler_prefix.rstrip("/"))
    body, etag = iframe_page(config.sockjs_url)
    endpoint = SockJSEndpoint(
        config, ctx, SessionRegistry(ctx, config.sockjs_heartbeat_delay), body, etag
    )
    kwargs = {"endpoint": endpoint}
    session = prefix + "/" + _SESSION + "/"
    return [
        (prefix + "/?", WelcomeHandler, kwargs),
        (prefix + "/info", InfoHandler, kwargs),
        (prefix + r"/iframe[0-9\-.a-z_]*\.html", IframeHandler, kwargs),
        (session + "(xhr|xhr_streaming|eventsource|htmlfile|jsonp)", ReceiveHandler, kwargs),
        (session + "(xhr_send|jsonp_send)", SendHandler, kwargs),
        (session + "websocket", SessionWebSocketHandler, kwargs),
    ]


__all__ = [
    "SockJSEndpoint",
    "callback_error",
    "htmlfile_prelude",
    "iframe_page",
    "info_body",
    "sockjs_routes",
]
