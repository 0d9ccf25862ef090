"""A static file server for the chat example: the page, its script and centrifuge-js.

    python serve.py --port 8080 --server http://127.0.0.1:8000

centripy serves no static files, so the page comes from here, on its own origin (which
config.json lists in `allowed_origins`). Routes: GET / (index.html), GET /chat.js,
GET /centrifuge.js (centrifuge-js's browser build, from tests/js/node_modules) and
GET /settings.js (`window.CHAT_SETTINGS = {"server": ..., "namespace": ...}`: where the page
finds centripy). Tornado; every handler runs on the one asyncio loop.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path
from urllib.parse import urlsplit

import tornado.web

HERE = Path(__file__).resolve().parent
DEFAULT_JS = HERE.parent.parent / "tests" / "js" / "node_modules" / "centrifuge" / "dist"


def server_url(value: str) -> str:
    """`--server` checked: an http(s)://host[:port] URL, returned without a trailing `/`."""
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise argparse.ArgumentTypeError(f"expected http(s)://host:port, got {value!r}")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise argparse.ArgumentTypeError(f"expected no path, query or fragment in {value!r}")
    return f"{parts.scheme}://{parts.netloc}"


def settings_script(server: str, namespace: str) -> str:
    """The body of /settings.js (`</` escaped, although JSON of these values has none)."""
    settings = json.dumps({"server": server, "namespace": namespace}).replace("</", "<\\/")
    return f"window.CHAT_SETTINGS = {settings};\n"


class SettingsHandler(tornado.web.RequestHandler):
    def initialize(self, script: str) -> None:
        self.script = script

    def get(self) -> None:
        self.set_header("Content-Type", "text/javascript; charset=utf-8")
        self.set_header("Cache-Control", "no-store")
        self.finish(self.script)


def make_app(options: argparse.Namespace) -> tornado.web.Application:
    centrifuge_js = Path(options.centrifuge_js_dir)
    if not (centrifuge_js / "centrifuge.js").is_file():
        raise SystemExit(
            f"{centrifuge_js / 'centrifuge.js'} not found: run ./scripts/setup.sh "
            "(it installs centrifuge-js into tests/js/node_modules)"
        )
    script = settings_script(options.server, options.namespace)
    return tornado.web.Application(
        [
            (r"/settings\.js", SettingsHandler, {"script": script}),
            (
                r"/(|chat\.js)",
                tornado.web.StaticFileHandler,
                {"path": str(HERE), "default_filename": "index.html"},
            ),
            (r"/(centrifuge\.js)", tornado.web.StaticFileHandler, {"path": str(centrifuge_js)}),
        ]
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument(
        "--server", type=server_url, default="http://127.0.0.1:8000",
        help="centripy's base URL as the browser reaches it",
    )  # fmt: skip
    parser.add_argument("--namespace", default="chat", help="the namespace of the rooms")
    parser.add_argument("--centrifuge-js-dir", type=Path, default=DEFAULT_JS)
    return parser.parse_args(argv)


async def main(argv: list[str] | None = None) -> None:
    options = parse_args(argv)
    app = make_app(options)
    app.listen(options.port, options.address)
    print(f"chat page on http://{options.address}:{options.port}/", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main())
