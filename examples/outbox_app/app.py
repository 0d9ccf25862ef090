"""A tiny web app that publishes through a transactional outbox consumed by centripy.

POST /messages stores the message in the app's own `messages` table AND the matching
`publish` command in `centrifugo_outbox` in ONE database transaction: either both are
written or neither is, so subscribers never see a message the database does not have (and
never miss one it has). centripy's outbox consumer applies the command and deletes the row.

    python app.py --database-url sqlite+aiosqlite:///outbox_app.db    # the default
    python app.py --database-url postgresql+asyncpg://postgres@127.0.0.1:5432/test

Routes: GET / (the page), GET /static/centrifuge.js (centrifuge-js, served from
tests/js/node_modules), GET /token (a connection JWT for the page), GET /messages (the last
50), POST /messages ({"text": "..."} -> {"id": N}). Tornado + SQLAlchemy async; all
handlers run on the one asyncio loop.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import uuid
from pathlib import Path
from typing import Any

import jwt
import sqlalchemy as sa
import tornado.web
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

HERE = Path(__file__).resolve().parent
DEFAULT_JS = HERE.parent.parent / "tests" / "js" / "node_modules" / "centrifuge" / "dist"
MAX_TEXT = 1000

metadata = sa.MetaData()
# SQLite autoincrements only an INTEGER PRIMARY KEY; PostgreSQL gets BIGSERIAL and JSONB.
_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
messages = sa.Table(
    "messages",
    metadata,
    sa.Column("id", _ID, primary_key=True, autoincrement=True),
    sa.Column("text", sa.Text, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now()),
)
outbox = sa.Table(
    "centrifugo_outbox",
    metadata,
    sa.Column("id", _ID, primary_key=True, autoincrement=True),
    sa.Column("method", sa.Text, nullable=False),
    sa.Column("payload", sa.JSON().with_variant(JSONB(), "postgresql"), nullable=False),
    sa.Column("partition", sa.Integer, nullable=False, server_default="0"),
    sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now()),
    sqlite_autoincrement=True,
)


async def init_db(engine: AsyncEngine) -> None:
    """Create the tables (idempotent); SQLite goes to WAL so readers never block writers."""
    async with engine.begin() as conn:
        if engine.dialect.name == "sqlite":
            await conn.exec_driver_sql("PRAGMA journal_mode=WAL")
        await conn.run_sync(metadata.create_all)


async def add_message(engine: AsyncEngine, channel: str, text: str) -> int:
    """The app's row and the outbox row, committed together."""
    async with engine.begin() as conn:
        result = await conn.execute(sa.insert(messages).values(text=text).returning(messages.c.id))
        message_id = int(result.scalar_one())
        payload = {
            "channel": channel,
            "data": {"id": message_id, "text": text},
            # A retried command is not published twice (the server keeps it 5 minutes).
            "idempotency_key": f"message-{message_id}",
        }
        await conn.execute(sa.insert(outbox).values(method="publish", payload=payload))
    return message_id


async def last_messages(engine: AsyncEngine, limit: int = 50) -> list[dict[str, Any]]:
    query = sa.select(messages.c.id, messages.c.text).order_by(messages.c.id.desc()).limit(limit)
    async with engine.connect() as conn:
        rows = (await conn.execute(query)).all()
    return [{"id": row.id, "text": row.text} for row in reversed(rows)]


class AppHandler(tornado.web.RequestHandler):
    def initialize(self, options: argparse.Namespace, engine: AsyncEngine) -> None:
        self.app_options = options
        self.engine = engine

    def write_json(self, value: object, status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(value))


class PageHandler(AppHandler):
    def get(self) -> None:
        options = self.app_options
        page_config = {"websocketUrl": options.centrifugo_url, "channel": options.channel}
        # `</` cannot end the inline <script> early: escape it.
        self.render("index.html", config=json.dumps(page_config).replace("</", "<\\/"))


class TokenHandler(AppHandler):
    def get(self) -> None:
        """A short-lived connection token; a real app would use its logged-in user."""
        claims = {"sub": f"visitor-{uuid.uuid4().hex[:8]}"}
        token = jwt.encode(claims, self.app_options.token_secret, algorithm="HS256")
        self.write_json({"token": token})


class MessagesHandler(AppHandler):
    async def get(self) -> None:
        self.write_json({"messages": await last_messages(self.engine)})

    async def post(self) -> None:
        try:
            body = json.loads(self.request.body or b"{}")
        except json.JSONDecodeError:
            body = None
        text = body.get("text") if isinstance(body, dict) else None
        if not isinstance(text, str) or not text.strip() or len(text) > MAX_TEXT:
            self.write_json({"error": f"text must be 1..{MAX_TEXT} characters"}, 400)
            return
        message_id = await add_message(self.engine, self.app_options.channel, text.strip())
        self.write_json({"id": message_id}, 201)


def make_app(options: argparse.Namespace, engine: AsyncEngine) -> tornado.web.Application:
    deps = {"options": options, "engine": engine}
    return tornado.web.Application(
        [
            (r"/", PageHandler, deps),
            (r"/token", TokenHandler, deps),
            (r"/messages", MessagesHandler, deps),
            (
                r"/static/(centrifuge\.js)",
                tornado.web.StaticFileHandler,
                {"path": str(options.centrifuge_js_dir)},
            ),
        ],
        template_path=str(HERE),
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--database-url", default="sqlite+aiosqlite:///outbox_app.db")
    parser.add_argument(
        "--centrifugo-url", default="ws://127.0.0.1:8000/connection/websocket",
        help="the centripy WebSocket endpoint the page connects to",
    )  # fmt: skip
    parser.add_argument("--channel", default="chat:messages")
    parser.add_argument(
        "--token-secret", default="outbox-demo-secret-change-me-please-0123",
        help="centripy's token_hmac_secret_key (see centripy.json)",
    )  # fmt: skip
    parser.add_argument("--centrifuge-js-dir", type=Path, default=DEFAULT_JS)
    parser.add_argument("--init-only", action="store_true", help="create the tables and exit")
    return parser.parse_args(argv)


async def main(argv: list[str] | None = None) -> None:
    options = parse_args(argv)
    engine = create_async_engine(options.database_url)
    await init_db(engine)
    if options.init_only:
        await engine.dispose()
        return
    app = make_app(options, engine)
    app.listen(options.port, options.address)
    print(f"outbox app on http://{options.address}:{options.port}/", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main())
