"""Schema of the SQL event log (storage/sql.py): its tables, version and migrations.

Every name starts with `table_prefix`, default `centripy_`:

* `streams`: one row per channel with history meta. `top_offset` is the last assigned
  offset; publications `min_offset..top_offset` are the kept ones (rows below `min_offset`
  are trimmed logically at once and deleted physically by the next append or by `gc`).
  `pubs_expire_at` (NULL: nothing kept) is `last_publish_at + history_ttl`;
  `meta_expires_at` (NULL: never) is the last access + `meta_ttl`. Neither is indexed:
  every append rewrites both, and an index entry per column doubled the pages an append
  transaction writes (bench/bench_log.py); `gc` scans the streams in key order instead, a
  chunk per transaction (`SqlEventLog.gc_chunk`).
* `publications`: PK (channel, offset).
* `idempotency`: PK (channel, key), the first call's offset/epoch until `expires_at`.
* `schema_version`: one row with the schema version `start()` migrated to.
* `settings`: named values of this database; `epoch_salt` keys `stream_epoch`, so a stream
  gets the epoch a read reported before its first append without the read storing anything.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import sqlalchemy as sa

from centripy.engine.contracts import StorageError
from centripy.storage.rules import new_salt

SCHEMA_VERSION = 1
_PREFIX_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,40}$")


@dataclass(frozen=True, slots=True)
class Tables:
    metadata: sa.MetaData
    streams: sa.Table
    publications: sa.Table
    idempotency: sa.Table
    schema_version: sa.Table
    settings: sa.Table


def make_tables(prefix: str = "centripy_") -> Tables:
    """The schema with every table and index name prefixed by `prefix`."""
    if not _PREFIX_RE.match(prefix):
        raise ValueError(f"table_prefix must match {_PREFIX_RE.pattern}, got {prefix!r}")
    md = sa.MetaData()
    streams = sa.Table(
        f"{prefix}streams",
        md,
        sa.Column("channel", sa.Text, primary_key=True),
        sa.Column("epoch", sa.Text, nullable=False),
        sa.Column("top_offset", sa.BigInteger, nullable=False),
        sa.Column("min_offset", sa.BigInteger, nullable=False),
        sa.Column("history_size", sa.BigInteger, nullable=False),
        sa.Column("last_publish_at", sa.Double),
        sa.Column("pubs_expire_at", sa.Double),
        sa.Column("meta_touched_at", sa.Double, nullable=False),
        sa.Column("meta_expires_at", sa.Double),
    )
    publications = sa.Table(
        f"{prefix}publications",
        md,
        sa.Column("channel", sa.Text, primary_key=True),
        sa.Column("offset", sa.BigInteger, primary_key=True),
        sa.Column("data", sa.LargeBinary, nullable=False),
        sa.Column("info_user", sa.Text),  # NULL: no ClientInfo
        sa.Column("info_client", sa.Text),
        sa.Column("conn_info", sa.LargeBinary),
        sa.Column("chan_info", sa.LargeBinary),
        sa.Column("tags", sa.JSON(none_as_null=True)),
        sa.Column("time", sa.BigInteger, nullable=False),  # unix ms
    )
    idempotency = sa.Table(
        f"{prefix}idempotency",
        md,
        sa.Column("channel", sa.Text, primary_key=True),
        sa.Column("key", sa.Text, primary_key=True),
        sa.Column("offset", sa.BigInteger, nullable=False),
        sa.Column("epoch", sa.Text, nullable=False),
        sa.Column("expires_at", sa.Double, nullable=False),
        sa.Index(f"{prefix}idempotency_expires_idx", "expires_at"),
    )
    version = sa.Table(
        f"{prefix}schema_version",
        md,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("version", sa.Integer, nullable=False),
    )
    settings = sa.Table(
        f"{prefix}settings",
        md,
        sa.Column("name", sa.Text, primary_key=True),
        sa.Column("value", sa.Text, nullable=False),
    )
    return Tables(md, streams, publications, idempotency, version, settings)


# Steps from version v to v + 1, run inside start()'s transaction. Never drop data.
MIGRATIONS: dict[int, Callable[[sa.Connection, Tables], None]] = {}

# Indexes an earlier release made and this one does not want; every start() drops them.
# Dropping an index is no schema version of its own: a server of that release still runs on
# this schema (and recreates them at its start, as any missing index).
OBSOLETE_INDEXES = ("streams_meta_expires_idx", "streams_pubs_expire_idx")


def migrate_sync(conn: sa.Connection, tables: Tables) -> None:
    """Create missing tables and indexes, drop OBSOLETE_INDEXES, then bring the schema to
    SCHEMA_VERSION."""
    insp = sa.inspect(conn)
    existing = set(insp.get_table_names())
    had_version = tables.schema_version.name in existing
    version = SCHEMA_VERSION
    if had_version:
        found = conn.execute(sa.select(tables.schema_version.c.version)).scalar()
        version = SCHEMA_VERSION if found is None else int(found)
    if version > SCHEMA_VERSION:
        raise StorageError(f"database schema version {version} is newer than {SCHEMA_VERSION}")
    tables.metadata.create_all(conn, checkfirst=True)
    for table in tables.metadata.sorted_tables:
        if table.name in existing:
            for index in table.indexes:
                index.create(conn, checkfirst=True)
    prefix = tables.streams.name[: -len("streams")]
    quote = conn.dialect.identifier_preparer.quote
    for name in OBSOLETE_INDEXES:
        conn.execute(sa.text(f"DROP INDEX IF EXISTS {quote(prefix + name)}"))
    for step in range(version, SCHEMA_VERSION):
        MIGRATIONS[step](conn, tables)
    conn.execute(sa.delete(tables.schema_version))
    conn.execute(sa.insert(tables.schema_version).values(id=1, version=SCHEMA_VERSION))


def load_salt_sync(conn: sa.Connection, tables: Tables) -> bytes:
    """This database's `epoch_salt`, created on first use. Runs in start()'s transaction,
    which concurrent starts take in turn (SQLite: BEGIN IMMEDIATE; PostgreSQL: the schema
    lock), so every process sharing the database reads the same salt."""
    st = tables.settings
    query = sa.select(st.c.value).where(st.c.name == "epoch_salt")
    found = conn.execute(query).scalar()
    if found is None:
        found = new_salt().hex()
        conn.execute(sa.insert(st).values(name="epoch_salt", value=found))
    return bytes.fromhex(found)
