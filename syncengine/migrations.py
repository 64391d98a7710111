"""Schema migrations: numbered SQL files applied once, in order, to an edge or a hub database.

A migrations folder holds ``NNNN_name.sql`` files (four or more digits, then ``_``, then
``[a-z0-9_]+``) numbered 1, 2, 3… without gaps. Each database records what it has applied in
``schema_migrations(version, name, checksum, applied_at)``, the checksum being the SHA-256 of
the file's bytes. A run first compares the folder with that table and refuses to touch the
database when an applied file was edited or renamed, or when the database has a migration this
release does not ship (it was migrated by a newer release); only then does it apply what is
pending, each migration in its own transaction together with its bookkeeping row.

Discovery, comparison and planning are pure functions shared by both backends; only the I/O
differs:

- SQLite (edge): a migration runs as one ``executescript`` that opens with ``BEGIN
  IMMEDIATE`` (``executescript`` commits any open transaction before it starts, so the
  transaction has to live inside the script). The bookkeeping row is the first statement after
  the lock is taken, so a second process migrating the same file at the same time fails on its
  primary key before running any of the migration's SQL, rolls back, re-reads the table and
  skips the migration.
- PostgreSQL (hub): the whole run holds a session advisory lock, so concurrent hub processes
  migrate one after the other and the later ones find nothing pending.

Migrations must not contain their own transaction control (``BEGIN``, ``COMMIT``), nor
statements that cannot run inside a transaction (SQLite ``VACUUM``, PostgreSQL ``CREATE INDEX
CONCURRENTLY``).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import sqlite3
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Final, NamedTuple

import aiosqlite
import asyncpg

from syncengine.errors import MigrationError

__all__ = [
    "Migration",
    "MigrationState",
    "MigrationStatus",
    "PG_LOCK_KEY",
    "discover",
    "migrate_postgres",
    "migrate_sqlite",
    "status_postgres",
    "status_sqlite",
]

log = logging.getLogger(__name__)

#: The version and the name end up as literals in SQLite scripts (``executescript`` takes no
#: parameters), so this pattern is also what keeps those scripts safe.
_FILENAME: Final = re.compile(r"(?P<version>[0-9]{4,})_(?P<name>[a-z0-9_]+)\.sql")

#: Key of the PostgreSQL advisory lock held for a whole run: the ASCII bytes of "syncmigr".
PG_LOCK_KEY: Final = 0x73796E636D696772
#: Bound on releasing the advisory lock; a connection that cannot do it is broken anyway, and
#: closing it releases the lock.
_PG_UNLOCK_TIMEOUT_S: Final = 5.0

_SQLITE_TABLE: Final = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    INTEGER PRIMARY KEY,
    name       TEXT    NOT NULL,
    checksum   TEXT    NOT NULL,
    applied_at TEXT    NOT NULL
)"""

_PG_TABLE: Final = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    INTEGER     PRIMARY KEY,
    name       TEXT        NOT NULL,
    checksum   TEXT        NOT NULL,
    applied_at TIMESTAMPTZ NOT NULL
)"""

_SELECT_APPLIED: Final = "SELECT version, name, checksum FROM schema_migrations ORDER BY version"


@dataclass(frozen=True, slots=True, kw_only=True)
class Migration:
    """One migration file, as read from disk."""

    version: int
    #: The part of the file name between the version and ``.sql``.
    name: str
    path: Path
    sql: str
    #: SHA-256 (hex) of the file's bytes, as recorded in ``schema_migrations``.
    checksum: str


class MigrationState(StrEnum):
    """How a migration file and a database's ``schema_migrations`` row relate."""

    APPLIED = "applied"
    PENDING = "pending"
    #: Applied, but the file changed (checksum or name) since.
    EDITED = "edited"
    #: Applied, but this release has no file for it: the database is newer than the release.
    MISSING_FILE = "missing-file"


class MigrationStatus(NamedTuple):
    """One line of ``syncengine migrate --status``."""

    version: int
    name: str
    state: MigrationState


@dataclass(frozen=True, slots=True, kw_only=True)
class _Applied:
    """A row of ``schema_migrations``."""

    version: int
    name: str
    checksum: str


# -- pure core: discovery, comparison, planning ---------------------------------------------


def _shown(path: Path) -> str:
    """A path short enough for a message, e.g. ``migrations/edge/0002_x.sql``."""
    return "/".join(path.parts[-3:])


def discover(directory: Path) -> list[Migration]:
    """The migrations in ``directory``, sorted by version.

    Files not ending in ``.sql``, hidden files and sub-folders are ignored. Raises
    :class:`MigrationError` naming the file when the folder is missing, a ``.sql`` file is
    badly named or not UTF-8, two files share a version, or the versions are not 1, 2, 3…
    without gaps.
    """
    if not directory.is_dir():
        raise MigrationError(
            f"migrations folder {directory} does not exist",
            hint="Reinstall syncengine; its migration files are part of the package.",
            detail={"path": str(directory)},
        )
    found: dict[int, Migration] = {}
    for path in sorted(directory.iterdir()):
        if path.name.startswith(".") or path.suffix != ".sql" or not path.is_file():
            continue
        match = _FILENAME.fullmatch(path.name)
        if match is None:
            raise MigrationError(
                f"{_shown(path)} is not a valid migration file name",
                hint="Name migration files NNNN_name.sql: 4+ digits, '_', then [a-z0-9_]+.",
                detail={"path": str(path)},
            )
        raw = path.read_bytes()
        try:
            sql = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise MigrationError(
                f"{_shown(path)} is not UTF-8 text: {exc}",
                hint="Save the migration file as UTF-8.",
                detail={"path": str(path)},
            ) from exc
        migration = Migration(
            version=int(match["version"]),
            name=match["name"],
            path=path,
            sql=sql,
            checksum=hashlib.sha256(raw).hexdigest(),
        )
        other = found.get(migration.version)
        if other is not None:
            raise MigrationError(
                f"{_shown(path)} and {other.path.name} share version {migration.version}",
                hint="Give each migration file its own number.",
                detail={"path": str(path), "other": str(other.path)},
            )
        found[migration.version] = migration
    migrations = [found[version] for version in sorted(found)]
    for expected, migration in enumerate(migrations, start=1):
        if migration.version != expected:
            raise MigrationError(
                f"{_shown(migration.path)} follows a gap: "
                f"no migration numbered {expected} in {directory}",
                hint="Number migration files 1, 2, 3… without gaps.",
                detail={"path": str(migration.path), "missing_version": expected},
            )
    return migrations


def _state(migration: Migration | None, row: _Applied | None) -> MigrationState:
    if row is None:
        return MigrationState.PENDING
    if migration is None:
        return MigrationState.MISSING_FILE
    if migration.checksum != row.checksum or migration.name != row.name:
        return MigrationState.EDITED
    return MigrationState.APPLIED


def _compare(
    migrations: Sequence[Migration], applied: Mapping[int, _Applied]
) -> list[MigrationStatus]:
    """Every version known to the folder or the database, with its state, by version."""
    by_version = {m.version: m for m in migrations}
    statuses = []
    for version in sorted(by_version.keys() | applied.keys()):
        migration, row = by_version.get(version), applied.get(version)
        name = migration.name if migration is not None else applied[version].name
        statuses.append(MigrationStatus(version, name, _state(migration, row)))
    return statuses


def _edited_error(migration: Migration, row: _Applied) -> MigrationError:
    shown = _shown(migration.path)
    if migration.checksum != row.checksum:
        message = (
            f"{shown} was edited after it was applied "
            f"(checksum {row.checksum[:12]}≠{migration.checksum[:12]})"
        )
    else:
        message = f"{shown} was renamed after it was applied as {row.version:04d}_{row.name}"
    return MigrationError(
        message,
        hint=(
            "Restore the file exactly as it was released (e.g. `git checkout` it); "
            "put further schema changes in a new migration file."
        ),
        detail={
            "path": str(migration.path),
            "version": migration.version,
            "recorded_name": row.name,
            "recorded_checksum": row.checksum,
            "file_checksum": migration.checksum,
        },
    )


def _missing_error(directory: Path, row: _Applied) -> MigrationError:
    return MigrationError(
        f"the database has migration {row.version:04d}_{row.name} applied but "
        f"{_shown(directory)} has no such file: the database is newer than this release",
        hint="Upgrade syncengine to the release that migrated this database.",
        detail={"path": str(directory), "version": row.version, "recorded_name": row.name},
    )


def _plan(
    migrations: Sequence[Migration], applied: Mapping[int, _Applied], directory: Path
) -> list[Migration]:
    """The migrations to apply, in order, after checking what is already applied.

    Raises :class:`MigrationError` when an applied file was edited or renamed, when an applied
    version has no file, or when a pending migration sorts before an applied one (the
    database's history diverges from the folder's).
    """
    by_version = {m.version: m for m in migrations}
    statuses = _compare(migrations, applied)
    for status in statuses:
        if status.state is MigrationState.EDITED:
            raise _edited_error(by_version[status.version], applied[status.version])
        if status.state is MigrationState.MISSING_FILE:
            raise _missing_error(directory, applied[status.version])
    pending = [by_version[s.version] for s in statuses if s.state is MigrationState.PENDING]
    if pending and applied and pending[0].version < max(applied):
        first, last = pending[0], applied[max(applied)]
        raise MigrationError(
            f"{_shown(first.path)} is not applied but the later {last.version:04d}_{last.name} is",
            hint="The database was migrated from another set of files; restore it from a "
            "backup or migrate it with the release that wrote it.",
            detail={"path": str(first.path), "version": first.version},
        )
    return pending


def _failed_error(migration: Migration, exc: Exception) -> MigrationError:
    return MigrationError(
        f"{_shown(migration.path)} failed: {exc}",
        hint=(
            "Nothing of this migration was applied; fix the cause (disk, permissions or the "
            "migration's SQL) and start again."
        ),
        detail={"path": str(migration.path), "version": migration.version, "error": str(exc)},
    )


def _log_applied(migration: Migration, started: float) -> None:
    elapsed_ms = (time.perf_counter() - started) * 1000
    log.info("applied migration %04d_%s in %.1f ms", migration.version, migration.name, elapsed_ms)


def _not_in_transaction(backend: str) -> MigrationError:
    return MigrationError(
        f"{backend} migrations must start outside a transaction",
        hint="Commit or roll back the connection's transaction before migrating.",
    )


# -- SQLite ---------------------------------------------------------------------------------


def _sqlite_busy(exc: sqlite3.Error) -> bool:
    return isinstance(exc, sqlite3.OperationalError) and (
        "locked" in str(exc) or "busy" in str(exc)
    )


async def _sqlite_applied(conn: aiosqlite.Connection) -> dict[int, _Applied]:
    rows = await conn.execute_fetchall(_SELECT_APPLIED)
    return {row[0]: _Applied(version=row[0], name=row[1], checksum=row[2]) for row in rows}


async def _sqlite_rollback(conn: aiosqlite.Connection) -> None:
    try:
        if conn.in_transaction:
            async with conn.execute("ROLLBACK"):
                pass
    except (sqlite3.Error, ValueError) as exc:  # ValueError: the connection is closed
        log.warning("rollback after a failed migration failed: %s", exc)


async def _sqlite_apply(conn: aiosqlite.Connection, migration: Migration) -> bool:
    """Apply one migration atomically; False when another connection applied it first."""
    # Literals are safe: discover() restricts the name to [a-z0-9_] and the checksum is hex.
    script = (
        "BEGIN IMMEDIATE;\n"
        "INSERT INTO schema_migrations (version, name, checksum, applied_at) VALUES "
        f"({migration.version}, '{migration.name}', '{migration.checksum}', "
        "strftime('%Y-%m-%dT%H:%M:%fZ', 'now'));\n"
        f"{migration.sql}\n;\nCOMMIT;"
    )
    started = time.perf_counter()
    try:
        async with conn.executescript(script):
            pass
    except sqlite3.Error as exc:
        await asyncio.shield(_sqlite_rollback(conn))
        row = (await _sqlite_applied(conn)).get(migration.version)
        if row is not None:
            # Lost the race: our bookkeeping insert hit the row of a connection that took the
            # lock first. Skip, provided it applied this very file.
            if _state(migration, row) is MigrationState.EDITED:
                raise _edited_error(migration, row) from exc
            log.info(
                "migration %04d_%s was applied by another connection",
                migration.version,
                migration.name,
            )
            return False
        if _sqlite_busy(exc):
            raise  # the caller's I/O seam turns this into its "busy" StorageError
        raise _failed_error(migration, exc) from exc
    except BaseException:
        await asyncio.shield(_sqlite_rollback(conn))
        raise
    if conn.in_transaction:
        # The script swallowed our COMMIT: an unterminated /* comment in the migration.
        await asyncio.shield(_sqlite_rollback(conn))
        raise _failed_error(
            migration, ValueError("the file does not end cleanly (unterminated comment?)")
        )
    _log_applied(migration, started)
    return True


async def migrate_sqlite(conn: aiosqlite.Connection, directory: Path) -> list[int]:
    """Apply the pending migrations of ``directory`` to the SQLite database of ``conn``.

    ``conn`` must not be inside a transaction; it should have a busy timeout (aiosqlite's
    default is 5 s) since each migration waits for the database's write lock. Returns the
    versions this call applied, in order (empty when the database is up to date).

    Guarantees: each migration and its ``schema_migrations`` row commit together or not at
    all; several connections or processes migrating the same file at once all succeed and
    each migration is applied exactly once.

    Raises :class:`MigrationError` when the folder is invalid (see :func:`discover`), when an
    applied file was edited or is missing (checked before anything is applied), or when a
    migration fails (naming its file; nothing of it is applied). ``sqlite3.Error`` escapes
    for failures outside a migration's SQL (e.g. the lock stayed busy beyond the timeout).
    """
    migrations = discover(directory)
    if conn.in_transaction:
        raise _not_in_transaction("SQLite")
    async with conn.execute(_SQLITE_TABLE):
        pass
    applied = await _sqlite_applied(conn)
    done = []
    for migration in _plan(migrations, applied, directory):
        if await _sqlite_apply(conn, migration):
            done.append(migration.version)
    return done


async def status_sqlite(conn: aiosqlite.Connection, directory: Path) -> list[MigrationStatus]:
    """Each migration of ``directory`` or of the database, with its state, by version.

    Read-only: a database without ``schema_migrations`` shows every file as pending. Raises
    :class:`MigrationError` only for an invalid folder (see :func:`discover`).
    """
    migrations = discover(directory)
    tables = await conn.execute_fetchall(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_migrations'"
    )
    applied = await _sqlite_applied(conn) if list(tables) else {}
    return _compare(migrations, applied)


# -- PostgreSQL -----------------------------------------------------------------------------


async def _pg_applied(conn: asyncpg.Connection) -> dict[int, _Applied]:
    rows = await conn.fetch(_SELECT_APPLIED)
    return {
        row["version"]: _Applied(version=row["version"], name=row["name"], checksum=row["checksum"])
        for row in rows
    }


async def _pg_unlock(conn: asyncpg.Connection) -> None:
    try:
        await conn.execute(
            "SELECT pg_advisory_unlock($1)", PG_LOCK_KEY, timeout=_PG_UNLOCK_TIMEOUT_S
        )
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
        # The lock is a session lock: closing the connection releases it.
        log.warning("could not release the migration lock (close the connection): %s", exc)


async def migrate_postgres(conn: asyncpg.Connection, directory: Path) -> list[int]:
    """Apply the pending migrations of ``directory`` to the PostgreSQL database of ``conn``.

    ``conn`` must not be inside a transaction. The whole run holds the session advisory lock
    :data:`PG_LOCK_KEY`, so hub processes starting together migrate one at a time (a caller
    waits as long as another run takes). Returns the versions this call applied, in order.

    Guarantees: each migration and its ``schema_migrations`` row commit together or not at
    all; the lock is released on return, on error and on cancellation (if releasing fails,
    closing the connection releases it).

    Raises :class:`MigrationError` when the folder is invalid (see :func:`discover`), when an
    applied file was edited or is missing (checked before anything is applied), or when a
    migration fails (naming its file; nothing of it is applied). asyncpg errors escape for
    failures outside a migration's SQL.
    """
    migrations = discover(directory)
    if conn.is_in_transaction():
        raise _not_in_transaction("PostgreSQL")
    await conn.execute("SELECT pg_advisory_lock($1)", PG_LOCK_KEY)
    try:
        await conn.execute(_PG_TABLE)
        applied = await _pg_applied(conn)
        done = []
        for migration in _plan(migrations, applied, directory):
            started = time.perf_counter()
            try:
                async with conn.transaction():
                    # No arguments: the simple query protocol, which runs several statements.
                    await conn.execute(migration.sql)
                    await conn.execute(
                        "INSERT INTO schema_migrations (version, name, checksum, applied_at) "
                        "VALUES ($1, $2, $3, now())",
                        migration.version,
                        migration.name,
                        migration.checksum,
                    )
            except asyncpg.PostgresError as exc:
                raise _failed_error(migration, exc) from exc
            _log_applied(migration, started)
            done.append(migration.version)
        return done
    finally:
        await asyncio.shield(_pg_unlock(conn))


async def status_postgres(conn: asyncpg.Connection, directory: Path) -> list[MigrationStatus]:
    """Each migration of ``directory`` or of the database, with its state, by version.

    Read-only and lock-free: a database without ``schema_migrations`` shows every file as
    pending. Raises :class:`MigrationError` only for an invalid folder (see :func:`discover`).
    """
    migrations = discover(directory)
    exists = await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
    applied = await _pg_applied(conn) if exists else {}
    return _compare(migrations, applied)
