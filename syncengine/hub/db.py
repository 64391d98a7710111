"""The hub's PostgreSQL seam: the connection pool and the one place asyncpg errors are
translated into the syncengine tree.

An error whose outcome is unknown (the connection died during COMMIT) is reported as
:class:`HubUnavailableError` (HTTP 503): the edge retries the whole batch and the push dedup
makes that safe. A COMMIT is never re-sent on another connection.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Final

import asyncpg
import orjson

from syncengine.errors import HubUnavailableError, StorageError, SyncError
from syncengine.migrations import migrate_postgres
from syncengine.resources import data_dir

__all__ = ["DEFAULT_COMMAND_TIMEOUT_S", "connect_pool", "pg_json", "translated"]

log = logging.getLogger(__name__)

DEFAULT_COMMAND_TIMEOUT_S: Final = 30.0
_CONNECT_TIMEOUT_S: Final = 5.0

#: SQLSTATE classes meaning "try again": connection exceptions, insufficient resources,
#: operator intervention (shutdown, crash recovery), serialization failure / deadlock.
_TRANSIENT_CLASSES: Final = ("08", "53", "57", "40")


@asynccontextmanager
async def translated(what: str) -> AsyncIterator[None]:
    """Translate asyncpg / socket errors raised inside into :class:`SyncError`."""
    try:
        yield
    except SyncError:
        raise
    except (OSError, TimeoutError, asyncpg.InterfaceError) as exc:
        raise HubUnavailableError(
            f"database unavailable during {what}: {type(exc).__name__}: {exc}",
            hint="PostgreSQL is down or unreachable; the edge keeps its changes and retries.",
            code="database_unavailable",
        ) from exc
    except asyncpg.PostgresError as exc:
        state = getattr(exc, "sqlstate", "") or ""
        if state[:2] in _TRANSIENT_CLASSES:
            raise HubUnavailableError(
                f"database busy or restarting during {what}: {exc}",
                code="database_unavailable",
                detail={"sqlstate": state},
            ) from exc
        log.exception("database error during %s", what)
        raise StorageError(
            f"database error during {what}: {exc}",
            hint="This is a hub bug or a schema mismatch; run `syncengine hub verify`.",
            code="database_error",
            detail={"sqlstate": state},
        ) from exc


#: Where a large push stages its records (COPY) before one upsert into ``records``: a
#: temporary table of each pooled connection, emptied at every commit.
STAGING_TABLE: Final = "records_in"
_CREATE_STAGING: Final = (
    f"CREATE TEMP TABLE IF NOT EXISTS {STAGING_TABLE} (cell text, collection text, key text, "
    "doc text, state bytea, hlc int8, deleted bool, feed_id int8) ON COMMIT DELETE ROWS"
)


async def _init_connection(conn: asyncpg.Connection) -> None:
    await conn.execute(_CREATE_STAGING)


async def _after_release(conn: asyncpg.Connection) -> None:
    """Nothing: a released connection keeps its session as it is (asyncpg still rolls back
    a transaction left open). asyncpg's default sends ``pg_advisory_unlock_all(); CLOSE ALL;
    UNLISTEN *; RESET ALL`` on every release, a round trip for each token look-up and pull.
    The hub sets no session state but in feed maintenance, which undoes its own (``RESET
    lock_timeout``, ``pg_advisory_unlock``); code that sets any must do the same."""


async def connect_pool(
    dsn: str,
    *,
    min_size: int = 2,
    max_size: int = 10,
    migrate: bool = True,
    command_timeout: float = DEFAULT_COMMAND_TIMEOUT_S,
) -> asyncpg.Pool:
    """Open a pool to the region's database, applying ``migrations/hub`` first when asked
    (several hub processes may start at once; the migration lock serializes them)."""
    async with translated("connect"):
        if migrate:
            conn = await asyncpg.connect(dsn, timeout=_CONNECT_TIMEOUT_S)
            try:
                applied = await migrate_postgres(conn, data_dir("migrations") / "hub")
                if applied:
                    log.info("applied hub migrations %s", applied)
            finally:
                await conn.close()
        pool = await asyncpg.create_pool(
            dsn,
            min_size=min_size,
            max_size=max_size,
            timeout=_CONNECT_TIMEOUT_S,
            command_timeout=command_timeout,
            init=_init_connection,
            reset=_after_release,
            # Reconnected pools must not reuse prepared statements of a restarted server.
            max_inactive_connection_lifetime=60.0,
        )
    assert pool is not None
    return pool


def _strip_nul(value: Any) -> Any:
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd")
    if isinstance(value, dict):
        return {k.replace("\x00", "\ufffd"): _strip_nul(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_strip_nul(v) for v in value]
    return value


_JSON: Final = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)


_ORJSON_OPTIONS: Final = orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS


def pg_json(value: Any) -> str:
    """JSON text for a JSONB column, keys sorted. JSONB cannot hold U+0000, so NULs become
    U+FFFD in this operator-facing view only; the exact value stays in the msgpack state.

    orjson on the push path (it is most of the cost of writing a record's document); the
    standard encoder for what orjson refuses (integers beyond 64 bits)."""
    try:
        text = orjson.dumps(value, option=_ORJSON_OPTIONS).decode()
    except orjson.JSONEncodeError:
        text = _JSON.encode(value)
    if "\\u0000" in text:
        text = _JSON.encode(_strip_nul(value))
    return text
