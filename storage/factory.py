"""Choose an event log back end from a database URL (config `database_url`).

* `memory://` -> MemoryEventLog (nothing persisted)
* `sqlite+aiosqlite:///path.db` (or `sqlite:///path.db`) -> SqliteEventLog
* `postgresql+asyncpg://...` (or `postgresql://`, `postgres://`) -> PostgresEventLog
"""

from __future__ import annotations

from typing import Any

from centripy.engine.contracts import EventLog
from centripy.storage.memory import MemoryEventLog
from centripy.storage.postgres import SCHEME as PG_SCHEME
from centripy.storage.postgres import PostgresEventLog
from centripy.storage.sqlite import SCHEME as SQLITE_SCHEME
from centripy.storage.sqlite import SqliteEventLog

_REWRITES = {
    "postgresql": PG_SCHEME,
    "postgres": PG_SCHEME,
    "sqlite": SQLITE_SCHEME,
}


# Options that only mean something to the SQL back ends; the memory log ignores them so that
# one configuration can switch back ends by URL alone.
SQL_ONLY_OPTIONS = frozenset(
    {"table_prefix", "busy_timeout", "pool_size", "max_overflow", "connect_timeout"}
)


def normalize_url(database_url: str) -> tuple[str, str]:
    """(scheme, url) with plain driver-less schemes rewritten to the async drivers.

    Raises ValueError for a URL without a scheme or with one no back end handles."""
    scheme, sep, rest = database_url.partition("://")
    if not sep or not scheme:
        raise ValueError(f"database_url has no scheme: {database_url!r}")
    scheme = _REWRITES.get(scheme, scheme)
    if scheme not in ("memory", SQLITE_SCHEME, PG_SCHEME):
        raise ValueError(
            f"unsupported database_url scheme {database_url.partition('://')[0]!r} "
            f"(use memory://, {SQLITE_SCHEME}:// or {PG_SCHEME}://)"
        )
    return scheme, f"{scheme}://{rest}"


def open_event_log(database_url: str, **kw: Any) -> EventLog:
    """A new, not yet started event log for `database_url`; `kw` goes to its constructor
    (e.g. `table_prefix`, `now`, `gc_interval`). The caller awaits `start()` next."""
    scheme, url = normalize_url(database_url)
    if scheme == "memory":
        return MemoryEventLog(**{k: v for k, v in kw.items() if k not in SQL_ONLY_OPTIONS})
    if scheme == SQLITE_SCHEME:
        return SqliteEventLog(url, **kw)
    return PostgresEventLog(url, **kw)


async def migrate(database_url: str, **kw: Any) -> None:
    """Create or migrate the schema of `database_url`, then close (CLI `centripy migrate`)."""
    log = open_event_log(database_url, **kw)
    await log.start()
    await log.close()
