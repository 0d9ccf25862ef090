"""Statements of the SQL event log (storage/sql.py) and the driver interface that runs them.

SQLAlchemy Core *builds* every statement (`Statements`); each is compiled once per dialect
(multi-row ones once per row count) into an `Sql`, whose positional arguments a `Session`
passes to the pooled connection's raw driver, because SQLAlchemy's per-row parameter
processing and adapter round trips cost 3-4x the throughput (bench/bench_log.py). Rows are
converted to and from `Publication` here too.
"""

from __future__ import annotations

import abc
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import sqlalchemy as sa

from centripy.engine.types import EMPTY_TAGS, ClientInfo, Publication
from centripy.storage.sql_schema import Tables

# --- rows -----------------------------------------------------------------------------------------

PUB_COLUMNS = (
    *("channel", "offset", "data", "info_user", "info_client", "conn_info", "chan_info"),
    *("tags", "time"),
)
# The columns a publication without ClientInfo and tags fills (the others stay NULL): such rows
# go in with `Statements.insert_rows(n, plain=True)`, binding 4 values a row instead of 9
# (sqlite3 runs each bytes or None value through its adapter registry).
PLAIN_COLUMNS = ("channel", "offset", "data", "time")
STREAM_COLUMNS = (
    *("channel", "epoch", "top_offset", "min_offset", "history_size", "last_publish_at"),
    *("pubs_expire_at", "meta_touched_at", "meta_expires_at"),
)
CLAIM_COLUMNS = ("channel", "key", "offset", "epoch", "expires_at")


def json_dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


def publication_args(channel: str, pub: Publication) -> tuple[Any, ...]:
    """A publications row in PUB_COLUMNS order (tags as JSON text)."""
    info = pub.info
    tags = json_dumps(dict(pub.tags)) if pub.tags else None
    if info is None:
        return (channel, pub.offset, pub.data, None, None, None, None, tags, pub.time)
    return (channel, pub.offset, pub.data, info.user, info.client, info.conn_info,
            info.chan_info, tags, pub.time)  # fmt: skip


def plain_args(channel: str, pub: Publication) -> tuple[Any, ...] | None:
    """A publications row in PLAIN_COLUMNS order; None when `pub` has ClientInfo or tags."""
    if pub.info is not None or pub.tags:
        return None
    return (channel, pub.offset, pub.data, pub.time)


def row_to_publication(row: Sequence[Any]) -> Publication:
    """A row of `Statements.forward`/`backward` (offset, data, info..., tags, time)."""
    offset, data, user, client, conn_info, chan_info, tags, ms = row
    info = None if user is None else ClientInfo(user, client, conn_info or b"", chan_info or b"")
    if isinstance(tags, str | bytes):
        tags = orjson.loads(tags)
    return Publication(bytes(data), int(offset), info, tags or EMPTY_TAGS, int(ms))


# --- compiled statements --------------------------------------------------------------------------

_ROW_BIND = re.compile(r"r(\d+)_(\w+)")


@dataclass(frozen=True, slots=True)
class Sql:
    """A statement compiled for one dialect. `slots` name each positional parameter:
    (row index, column) for multi-row VALUES binds `r<i>_<col>`, (-1, name) otherwise."""

    text: str
    slots: tuple[tuple[int, str], ...]
    fixed: Mapping[str, Any]  # literal binds SQLAlchemy made (e.g. `SET offset = 0`)

    def args(
        self, params: Mapping[str, Any] | None = None, rows: Sequence[Mapping[str, Any]] = ()
    ) -> tuple[Any, ...]:
        params = params or {}
        return tuple(
            rows[i][name] if i >= 0 else params[name] if name in params else self.fixed[name]
            for i, name in self.slots
        )


def compile_sql(stmt: sa.ClauseElement, dialect: sa.Dialect) -> Sql:
    compiled = stmt.compile(dialect=dialect)
    assert isinstance(compiled, sa.sql.compiler.SQLCompiler)
    names = tuple(compiled.positiontup or ())
    slots = []
    for name in names:
        match = _ROW_BIND.fullmatch(name)
        slots.append((int(match[1]), match[2]) if match else (-1, name))
    fixed = {n: compiled.binds[n].value for n in names if not compiled.binds[n].required}
    return Sql(compiled.string, tuple(slots), fixed)


_PARAM = re.compile(r"\$(\d+)")


@dataclass(frozen=True, slots=True)
class RowsTemplate:
    """A multi-row `INSERT .. VALUES (..), (..) ..` statement for any row count, derived
    from its one-row compile by repeating the VALUES group (SQLAlchemy takes ~1 ms per row
    to compile one, 0.3 s for 500 rows). `numbered`: the dialect's parameters are `$<n>`
    (renumbered per row; those after the rows shift by the rows added), else `?`."""

    head: str  # up to and including "VALUES "
    group: str  # one row's "(..)"
    tail: str  # after the last row
    width: int  # parameters per row
    row_slots: tuple[tuple[int, str], ...]  # row 0's slots
    tail_slots: tuple[tuple[int, str], ...]
    fixed: Mapping[str, Any]
    numbered: bool

    @classmethod
    def of(cls, one: Sql) -> RowsTemplate | None:
        """The template of a one-row compile; None if its text has no single VALUES group
        holding exactly row 0's binds first."""
        start = one.text.find(" VALUES (")
        end = one.text.find(")", start)
        width = sum(1 for i, _ in one.slots if i == 0)
        if start < 0 or end < 0 or one.slots[:width] != tuple(s for s in one.slots if s[0] == 0):
            return None
        start += len(" VALUES ")
        group = one.text[start : end + 1]
        numbered = "$" in group
        if group.count("$" if numbered else "?") != width or "(" in group[1:]:
            return None
        return cls(one.text[:start], group, one.text[end + 1 :], width, one.slots[:width],
                   one.slots[width:], one.fixed, numbered)  # fmt: skip

    def build(self, n: int) -> Sql:
        slots = tuple((i, name) for i in range(n) for _, name in self.row_slots)
        if not self.numbered:
            values = ", ".join([self.group] * n)
            return Sql(self.head + values + self.tail, slots + self.tail_slots, self.fixed)
        width = self.width
        parts = _PARAM.split(self.group)  # literal, number, literal, ..., literal
        literals, numbers = parts[0::2], [int(x) for x in parts[1::2]]
        rows = []
        for i in range(n):
            shifted = [f"${k + i * width}" for k in numbers] + [""]
            rows.append("".join(x for pair in zip(literals, shifted, strict=True) for x in pair))
        tail = _PARAM.sub(lambda m: f"${int(m[1]) + (n - 1) * width}", self.tail)
        return Sql(self.head + ", ".join(rows) + tail, slots + self.tail_slots, self.fixed)


def _greatest(a: sa.ColumnElement[Any], b: sa.ColumnElement[Any]) -> sa.ColumnElement[Any]:
    return sa.case((a > b, a), else_=b)


def _rows(table: sa.Table, columns: Sequence[str], n: int) -> list[dict[str, Any]]:
    return [
        {c: sa.bindparam(f"r{i}_{c}", type_=table.c[c].type) for c in columns} for i in range(n)
    ]


class Statements:
    """Every statement the log runs, compiled once for `dialect`; the multi-row upserts once
    per row count. `insert` is the dialect's (it has `on_conflict_do_update`)."""

    def __init__(self, t: Tables, insert: Callable[[sa.Table], Any], dialect: sa.Dialect) -> None:
        self._t, self._insert, self._dialect = t, insert, dialect
        self._multi: dict[tuple[str, int], Sql] = {}
        self._templates: dict[str, RowsTemplate | None] = {}
        s, p, k = t.streams.c, t.publications.c, t.idempotency.c
        b = sa.bindparam
        pubs = {c: b(c, type_=t.publications.c[c].type) for c in PUB_COLUMNS}
        self.insert_pubs = self._sql(sa.insert(t.publications).values(pubs))
        assert tuple(name for _, name in self.insert_pubs.slots) == PUB_COLUMNS
        plain = {c: pubs[c] for c in PLAIN_COLUMNS}
        self.insert_plain = self._sql(sa.insert(t.publications).values(plain))
        assert tuple(name for _, name in self.insert_plain.slots) == PLAIN_COLUMNS
        self.delete_below = self._sql(
            sa.delete(t.publications).where(p.channel == b("b_channel"), p.offset < b("b_lo"))
        )
        self.record = self._sql(
            sa.update(t.idempotency)
            .where(k.channel == b("b_channel"), k.key == b("b_key"))
            .values(offset=b("b_offset"), epoch=b("b_epoch"))
        )
        window = sa.select(*(p[c] for c in PUB_COLUMNS[1:])).where(
            p.channel == b("b_channel"), p.offset >= b("b_lo"), p.offset <= b("b_hi")
        )
        limit = b("b_limit", type_=sa.Integer)
        self.forward = self._sql(window.order_by(p.offset.asc()).limit(limit))
        self.backward = self._sql(window.order_by(p.offset.desc()).limit(limit))
        self.clear = self._sql(
            sa.update(t.streams)
            .where(s.channel == b("b_channel"))
            .values(min_offset=s.top_offset + 1, pubs_expire_at=sa.null())
        )
        self.delete_channel = self._sql(
            sa.delete(t.publications).where(p.channel == b("b_channel"))
        )
        # touch: refresh a live stream's meta expiry; read: the same, returning its position
        touch = (
            sa.update(t.streams)
            .where(
                s.channel == b("b_channel"),
                sa.or_(s.meta_expires_at.is_(None), s.meta_expires_at >= b("b_now")),
            )
            .values(meta_touched_at=b("b_now"), meta_expires_at=b("b_expires"))
        )
        self.touch = self._sql(touch)
        self.read = self._sql(
            touch.returning(s.epoch, s.top_offset, s.min_offset, s.pubs_expire_at)
        )
        self.forget_keys = self._sql(sa.delete(t.idempotency).where(k.expires_at < b("b_now")))
        # gc, a chunk of streams at a time in key order (the expiry columns have no index):
        # the last channel and size of the next chunk, then the chunk's expired streams
        after, upto = b("b_after", type_=s.channel.type), b("b_upto", type_=s.channel.type)
        chunk = (
            sa.select(s.channel)
            .where(s.channel > after)
            .order_by(s.channel)
            .limit(b("b_limit", type_=sa.Integer))
            .subquery()
        )
        self.gc_bound = self._sql(sa.select(sa.func.max(chunk.c.channel), sa.func.count()))
        in_chunk = sa.and_(s.channel > after, s.channel <= upto)
        self.forget_streams = self._sql(
            sa.delete(t.streams)
            .where(in_chunk, s.meta_expires_at < b("b_now"))
            .returning(s.channel)
        )
        self.expire_pubs = self._sql(
            sa.update(t.streams)
            .where(in_chunk, s.pubs_expire_at < b("b_now"))
            .values(min_offset=s.top_offset + 1, pubs_expire_at=sa.null())
            .returning(s.channel, s.min_offset)
        )

    def _sql(self, stmt: sa.ClauseElement) -> Sql:
        return compile_sql(stmt, self._dialect)

    def _cached(
        self,
        kind: str,
        n: int,
        build: Callable[[int], sa.ClauseElement],
        *,
        rows: bool = False,
    ) -> Sql:
        """`build(n)` compiled, once per (kind, n). `rows`: a multi-row VALUES statement,
        built from its `RowsTemplate` when there is one (`_template`)."""
        sql = self._multi.get((kind, n))
        if sql is None:
            template = self._template(kind, build) if rows else None
            sql = template.build(n) if template is not None else self._sql(build(n))
            self._multi[(kind, n)] = sql
        return sql

    def _template(self, kind: str, build: Callable[[int], sa.ClauseElement]) -> RowsTemplate | None:
        """The `RowsTemplate` of `kind`, trusted once its two-row text and slots equal
        SQLAlchemy's own (else None: every row count is compiled)."""
        if kind not in self._templates:
            template = RowsTemplate.of(self._sql(build(1)))
            if template is not None and template.build(2) != self._sql(build(2)):
                template = None
            self._templates[kind] = template
        return self._templates[kind]

    def insert_rows(self, n: int, *, plain: bool = False) -> Sql:
        """Insert n publications in one statement (rows r<i>_<PUB_COLUMNS>, row by row;
        `plain`: r<i>_<PLAIN_COLUMNS>)."""
        if plain:
            return self._cached("plain", n, self._insert_plain_rows, rows=True)
        return self._cached("pubs", n, self._insert_rows, rows=True)

    def _insert_rows(self, n: int) -> sa.ClauseElement:
        pubs = self._t.publications
        return sa.insert(pubs).values(_rows(pubs, PUB_COLUMNS, n))

    def _insert_plain_rows(self, n: int) -> sa.ClauseElement:
        pubs = self._t.publications
        return sa.insert(pubs).values(_rows(pubs, PLAIN_COLUMNS, n))

    def peek(self, n: int) -> Sql:
        """The live streams among n channels (rows r<i>_channel): channel, epoch, top_offset,
        min_offset, pubs_expire_at, meta_expires_at. Reads only (no row lock)."""
        return self._cached("peek", n, self._peek)

    def _peek(self, n: int) -> sa.ClauseElement:
        s, b = self._t.streams.c, sa.bindparam
        names = [b(f"r{i}_channel", type_=s.channel.type) for i in range(n)]
        return sa.select(
            s.channel, s.epoch, s.top_offset, s.min_offset, s.pubs_expire_at, s.meta_expires_at
        ).where(
            s.channel.in_(names),
            sa.or_(s.meta_expires_at.is_(None), s.meta_expires_at >= b("b_now")),
        )

    def advance(self, n: int) -> Sql:
        """Upsert n streams, each advanced by its row's top_offset (= number of appends)."""
        return self._cached("advance", n, self._advance, rows=True)

    def claim(self, n: int) -> Sql:
        """Insert n idempotency keys; take over expired ones; RETURNING the claimed keys."""
        return self._cached("claim", n, self._claim, rows=True)

    def known(self, n: int) -> Sql:
        """Positions stored for n keys (rows r<i>_channel, r<i>_key)."""
        return self._cached("known", n, self._known)

    def _advance(self, n: int) -> sa.ClauseElement:
        st = self._t.streams
        s, up = st.c, self._insert(st).values(_rows(st, STREAM_COLUMNS, n))
        x = up.excluded  # excluded.top_offset is the number of appends; excluded.* the new stream
        reset = sa.and_(s.meta_expires_at.is_not(None), s.meta_expires_at < x.meta_touched_at)
        gone = sa.or_(s.pubs_expire_at.is_(None), s.pubs_expire_at < x.meta_touched_at)
        trim = s.top_offset + x.top_offset - x.history_size + 1
        values = {
            "epoch": sa.case((reset, x.epoch), else_=s.epoch),
            "top_offset": sa.case((reset, x.top_offset), else_=s.top_offset + x.top_offset),
            "min_offset": sa.case(
                (reset, x.min_offset),
                (gone, _greatest(s.top_offset + 1, trim)),
                else_=_greatest(s.min_offset, trim),
            ),
        } | {c: x[c] for c in ("history_size", "last_publish_at", "pubs_expire_at")}
        values |= {"meta_touched_at": x.meta_touched_at, "meta_expires_at": x.meta_expires_at}
        stmt: sa.ClauseElement = up.on_conflict_do_update(
            index_elements=[s.channel], set_=values
        ).returning(s.channel, s.epoch, s.top_offset, s.min_offset, s.pubs_expire_at)
        return stmt

    def _claim(self, n: int) -> sa.ClauseElement:
        it = self._t.idempotency
        k, up = it.c, self._insert(it).values(_rows(it, CLAIM_COLUMNS, n))
        stmt: sa.ClauseElement = up.on_conflict_do_update(
            index_elements=[k.channel, k.key],
            set_={"offset": 0, "epoch": "", "expires_at": up.excluded.expires_at},
            where=k.expires_at < sa.bindparam("b_now"),
        ).returning(k.channel, k.key)
        return stmt

    def _known(self, n: int) -> sa.ClauseElement:
        k, b = self._t.idempotency.c, sa.bindparam
        match = [
            sa.and_(k.channel == b(f"r{i}_channel"), k.key == b(f"r{i}_key")) for i in range(n)
        ]
        return sa.select(k.channel, k.key, k.offset, k.epoch).where(sa.or_(*match))


# --- execution ------------------------------------------------------------------------------------


class Session(abc.ABC):
    """One open transaction on a pooled connection's raw driver. Runs on the event loop."""

    @abc.abstractmethod
    async def fetch(self, sql: Sql, args: Sequence[Any] = ()) -> Sequence[Sequence[Any]]: ...

    @abc.abstractmethod
    async def execute(self, sql: Sql, args: Sequence[Any] = ()) -> None: ...

    @abc.abstractmethod
    async def executemany(self, sql: Sql, rows: Sequence[Sequence[Any]]) -> None: ...
