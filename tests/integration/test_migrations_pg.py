"""The migration runner against a real PostgreSQL database (``pg_dsn``: a fresh, empty one).

Every test writes its own migrations folder under ``tmp_path``; one also applies the shipped
hub migrations.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import asyncpg
import pytest

from syncengine.errors import MigrationError
from syncengine.migrations import (
    PG_LOCK_KEY,
    MigrationState,
    discover,
    migrate_postgres,
    status_postgres,
)

pytestmark = pytest.mark.integration

SHIPPED_HUB = Path(__file__).resolve().parents[2] / "migrations" / "hub"

# pg_sleep widens the window in which concurrent migrators overlap.
INIT = "CREATE TABLE a (id INTEGER PRIMARY KEY);\nSELECT pg_sleep(0.2);\n"
ADD_COLUMN = "ALTER TABLE a ADD COLUMN label TEXT;\nCREATE INDEX a_label ON a (label);\n"
SEED = "INSERT INTO a (id, label) VALUES (1, 'one'), (2, 'two');"

Connect = Callable[[], Awaitable[asyncpg.Connection]]


def write(folder: Path, files: dict[str, str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, sql in files.items():
        (folder / name).write_text(sql, encoding="utf-8")
    return folder


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return write(
        tmp_path / "migrations" / "hub",
        {"0001_init.sql": INIT, "0002_add_label.sql": ADD_COLUMN, "0003_seed.sql": SEED},
    )


@pytest.fixture
async def connect(pg_dsn: str) -> AsyncIterator[Connect]:
    """Open connections to the test database; all closed at teardown."""
    opened: list[asyncpg.Connection] = []

    async def _connect() -> asyncpg.Connection:
        conn = await asyncpg.connect(pg_dsn)
        opened.append(conn)
        return conn

    yield _connect
    for conn in opened:
        await conn.close()


@pytest.fixture
async def conn(connect: Connect) -> asyncpg.Connection:
    return await connect()


async def recorded(conn: asyncpg.Connection) -> list[tuple[int, str]]:
    rows = await conn.fetch("SELECT version, name FROM schema_migrations ORDER BY version")
    return [(row["version"], row["name"]) for row in rows]


async def holds_migration_lock(conn: asyncpg.Connection) -> bool:
    """Whether any session holds the advisory lock (a bigint key is split into two oids)."""
    count = await conn.fetchval(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted"
        " AND classid = ($1::bigint >> 32)::oid AND objid = ($1::bigint & 4294967295)::oid",
        PG_LOCK_KEY,
    )
    return bool(count)


async def test_applies_in_order_then_nothing(conn: asyncpg.Connection, folder: Path) -> None:
    assert await migrate_postgres(conn, folder) == [1, 2, 3]
    assert await recorded(conn) == [(1, "init"), (2, "add_label"), (3, "seed")]
    assert await conn.fetchval("SELECT count(*) FROM a WHERE label IS NOT NULL") == 2
    checksums = await conn.fetch("SELECT checksum FROM schema_migrations ORDER BY version")
    assert [row["checksum"] for row in checksums] == [m.checksum for m in discover(folder)]
    assert not await holds_migration_lock(conn)

    assert await migrate_postgres(conn, folder) == []
    write(folder, {"0004_more.sql": "CREATE TABLE b (id INTEGER PRIMARY KEY);"})
    assert await migrate_postgres(conn, folder) == [4]
    assert [v for v, _ in await recorded(conn)] == [1, 2, 3, 4]


async def test_shipped_hub_migrations_apply(conn: asyncpg.Connection) -> None:
    shipped = [m.version for m in discover(SHIPPED_HUB)]
    assert await migrate_postgres(conn, SHIPPED_HUB) == shipped
    assert await migrate_postgres(conn, SHIPPED_HUB) == []


async def test_concurrent_migrators_each_apply_once(connect: Connect, folder: Path) -> None:
    first, second = await connect(), await connect()
    results = await asyncio.gather(
        migrate_postgres(first, folder), migrate_postgres(second, folder)
    )
    # The advisory lock serialises whole runs: one applies everything, the other nothing.
    assert sorted(results, key=len) == [[], [1, 2, 3]]
    assert await recorded(first) == [(1, "init"), (2, "add_label"), (3, "seed")]
    assert await first.fetchval("SELECT count(*) FROM a") == 2
    assert not await holds_migration_lock(first)


async def test_edited_file_is_detected_before_anything_is_applied(
    conn: asyncpg.Connection, folder: Path
) -> None:
    assert await migrate_postgres(conn, folder) == [1, 2, 3]
    write(folder, {"0004_more.sql": "CREATE TABLE b (id INTEGER PRIMARY KEY);"})
    (folder / "0002_add_label.sql").write_text(ADD_COLUMN + "-- a harmless comment\n")
    with pytest.raises(
        MigrationError, match=r"0002_add_label\.sql was edited after it was applied"
    ):
        await migrate_postgres(conn, folder)
    assert await conn.fetchval("SELECT to_regclass('b') IS NULL")
    assert [v for v, _ in await recorded(conn)] == [1, 2, 3]
    assert not await holds_migration_lock(conn)
    statuses = await status_postgres(conn, folder)
    assert [s.state for s in statuses] == [
        MigrationState.APPLIED,
        MigrationState.EDITED,
        MigrationState.APPLIED,
        MigrationState.PENDING,
    ]


async def test_missing_file_means_the_database_is_newer(
    conn: asyncpg.Connection, folder: Path
) -> None:
    await migrate_postgres(conn, folder)
    (folder / "0003_seed.sql").unlink()
    with pytest.raises(MigrationError, match="newer than this release"):
        await migrate_postgres(conn, folder)


async def test_failing_migration_leaves_no_trace_and_releases_the_lock(
    conn: asyncpg.Connection, folder: Path
) -> None:
    broken = "CREATE TABLE b (id INTEGER PRIMARY KEY);\nINSERT INTO no_such_table VALUES (1);\n"
    write(folder, {"0004_broken.sql": broken})
    with pytest.raises(MigrationError, match=r"0004_broken\.sql failed") as info:
        await migrate_postgres(conn, folder)
    assert isinstance(info.value.__cause__, asyncpg.UndefinedTableError)
    assert not conn.is_in_transaction()
    assert await conn.fetchval("SELECT to_regclass('b') IS NULL")
    assert [v for v, _ in await recorded(conn)] == [1, 2, 3]
    assert not await holds_migration_lock(conn)


async def test_status_of_a_fresh_database_is_all_pending(
    conn: asyncpg.Connection, folder: Path
) -> None:
    statuses = await status_postgres(conn, folder)
    assert [(s.version, s.state) for s in statuses] == [
        (1, "pending"),
        (2, "pending"),
        (3, "pending"),
    ]
    assert await conn.fetchval("SELECT to_regclass('schema_migrations') IS NULL")
