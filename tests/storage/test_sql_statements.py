"""The SQL log's statements and how SQLite runs them: multi-row statements built from their
one-row compile equal SQLAlchemy's own compile, the SQLite log keeps one checked-out
connection, and a batch's publications go in as one INSERT."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.postgresql.asyncpg import dialect as pg_dialect
from sqlalchemy.dialects.sqlite import dialect as sqlite_dialect
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from centripy.engine.contracts import AppendRequest, HistoryQuery
from centripy.storage.sql_schema import make_tables
from centripy.storage.sql_statements import RowsTemplate, Sql, Statements, compile_sql
from centripy.storage.sqlite import SqliteEventLog, in_worker

DIALECTS = {
    "sqlite": (sqlite_insert, sqlite_dialect()),
    "postgres": (pg_insert, pg_dialect()),
}


def statements(dialect: str) -> Statements:
    insert, compiled_for = DIALECTS[dialect]
    return Statements(make_tables(), insert, compiled_for)


@pytest.mark.parametrize("dialect", sorted(DIALECTS))
@pytest.mark.parametrize("kind", ["advance", "claim", "insert_rows", "insert_plain_rows"])
@pytest.mark.parametrize("n", [1, 2, 3, 10, 129])
def test_multi_row_statements_equal_sqlalchemys_compile(dialect: str, kind: str, n: int) -> None:
    sql = statements(dialect)
    build: Callable[[int], sa.ClauseElement] = getattr(sql, f"_{kind}")
    plain = kind == "insert_plain_rows"
    made: Sql = sql.insert_rows(n, plain=True) if plain else getattr(sql, kind)(n)
    assert made == compile_sql(build(n), DIALECTS[dialect][1])
    template = {"insert_rows": "pubs", "insert_plain_rows": "plain"}.get(kind, kind)
    assert sql._templates[template] is not None  # derived


def test_a_statement_without_one_values_group_has_no_template() -> None:
    one = compile_sql(sa.select(sa.literal(1)), sqlite_dialect())
    assert RowsTemplate.of(one) is None


def append(channel: str, n: int) -> AppendRequest:
    return AppendRequest(channel, b"%d" % n, history_size=10, history_ttl=60.0)


async def test_sqlite_keeps_one_connection_checked_out(tmp_path: Path) -> None:
    log = SqliteEventLog(f"sqlite+aiosqlite:///{tmp_path / 'one.db'}", gc_interval=None)
    await log.start()
    checkouts: list[Any] = []
    sa.event.listen(log.engine.sync_engine, "checkout", lambda *a: checkouts.append(a))
    try:
        for i in range(3):
            await log.append_many([append("a", i), append("b", i)])
        result = await log.history(HistoryQuery("a", limit=-1))
        assert [p.data for p in result.publications] == [b"0", b"1", b"2"]
        assert checkouts == []  # no pool checkout per transaction
        async with log.engine.connect() as conn:  # the engine still serves its own callers
            count = await conn.scalar(sa.select(sa.func.count()).select_from(log.tables.streams))
        assert count == 2
    finally:
        await log.close()


async def test_sqlite_inserts_a_batch_with_one_statement(tmp_path: Path) -> None:
    log = SqliteEventLog(f"sqlite+aiosqlite:///{tmp_path / 'ins.db'}", gc_interval=None)
    await log.start()
    statements_run: list[str] = []
    try:
        raw = log._raw
        assert raw is not None

        def trace(db: sqlite3.Connection) -> None:
            db.set_trace_callback(statements_run.append)

        await in_worker(raw, trace)
        await log.append_many([append(f"c{i % 3}", i) for i in range(7)])
        await in_worker(raw, lambda db: db.set_trace_callback(None))
    finally:
        await log.close()
    inserts = [s for s in statements_run if s.startswith("INSERT INTO centripy_publications")]
    assert len(inserts) == 1
    assert inserts[0].count("), (") == 6  # seven rows in one VALUES list
