"""The migration runner against real SQLite files: discovery, verification, atomicity, races.

Every test writes its own migrations folder under ``tmp_path``; one test also applies the
shipped edge migrations to a fresh file.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiosqlite
import pytest

from syncengine.errors import MigrationError
from syncengine.migrations import (
    MigrationState,
    MigrationStatus,
    discover,
    migrate_sqlite,
    status_sqlite,
)

SHIPPED_EDGE = Path(__file__).resolve().parents[2] / "migrations" / "edge"

INIT = "-- first\nCREATE TABLE a (id INTEGER PRIMARY KEY);\n"
ADD_COLUMN = "ALTER TABLE a ADD COLUMN label TEXT;\nCREATE INDEX a_label ON a (label);\n"
SEED = "INSERT INTO a (id, label) VALUES (1, 'one'), (2, 'two');"

Connect = Callable[..., Awaitable[aiosqlite.Connection]]


def write(folder: Path, files: dict[str, str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, sql in files.items():
        (folder / name).write_text(sql, encoding="utf-8")
    return folder


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return write(
        tmp_path / "migrations" / "edge",
        {"0001_init.sql": INIT, "0002_add_label.sql": ADD_COLUMN, "0003_seed.sql": SEED},
    )


@pytest.fixture
async def connect(tmp_path: Path) -> AsyncIterator[Connect]:
    """Open connections to one database file (WAL, like the edge); all closed at teardown."""
    opened: list[aiosqlite.Connection] = []

    async def _connect(*, timeout: float = 5.0) -> aiosqlite.Connection:
        conn = await aiosqlite.connect(tmp_path / "edge.db", isolation_level=None, timeout=timeout)
        opened.append(conn)
        await conn.execute_fetchall("PRAGMA journal_mode = WAL")  # finalizes the statement
        return conn

    yield _connect
    for conn in opened:
        await conn.close()


@pytest.fixture
async def conn(connect: Connect) -> aiosqlite.Connection:
    return await connect()


async def tables(conn: aiosqlite.Connection) -> set[str]:
    rows = await conn.execute_fetchall("SELECT name FROM sqlite_master WHERE type = 'table'")
    return {row[0] for row in rows}


async def recorded(conn: aiosqlite.Connection) -> list[tuple[int, str]]:
    rows = await conn.execute_fetchall("SELECT version, name FROM schema_migrations ORDER BY 1")
    return [(row[0], row[1]) for row in rows]


# -- discovery ----------------------------------------------------------------------------


def test_discover_reads_files_in_version_order(folder: Path) -> None:
    write(folder, {"README.md": "not a migration", ".0004_hidden.sql": "", "0010_x.sql~": ""})
    (folder / "sub.sql").mkdir()
    migrations = discover(folder)
    assert [(m.version, m.name) for m in migrations] == [
        (1, "init"),
        (2, "add_label"),
        (3, "seed"),
    ]
    first = migrations[0]
    assert first.path == folder / "0001_init.sql"
    assert first.sql == INIT
    assert len(first.checksum) == 64
    assert int(first.checksum, 16) >= 0


def test_discover_empty_folder_is_no_migrations(tmp_path: Path) -> None:
    assert discover(write(tmp_path / "m", {})) == []


def test_discover_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(MigrationError, match="does not exist"):
        discover(tmp_path / "nowhere")


@pytest.mark.parametrize(
    "filename",
    [
        "1_init.sql",
        "001_init.sql",
        "0002-init.sql",
        "0002_Init.sql",
        "0002_.sql",
        "init.sql",
        "0002_a b.sql",
    ],
)
def test_discover_rejects_bad_names(folder: Path, filename: str) -> None:
    write(folder, {filename: "SELECT 1;"})
    with pytest.raises(MigrationError, match="not a valid migration file name") as info:
        discover(folder)
    assert filename in info.value.message
    assert "NNNN_name.sql" in info.value.hint


@pytest.mark.parametrize("filename", ["0002_other.sql", "00002_add_label.sql"])
def test_discover_rejects_duplicate_versions(folder: Path, filename: str) -> None:
    write(folder, {filename: "SELECT 1;"})
    with pytest.raises(MigrationError, match="share version 2") as info:
        discover(folder)
    assert filename in info.value.message


def test_discover_rejects_gaps(folder: Path) -> None:
    write(folder, {"0005_later.sql": "SELECT 1;"})
    with pytest.raises(MigrationError, match="gap") as info:
        discover(folder)
    assert "0005_later.sql" in info.value.message
    assert info.value.detail["missing_version"] == 4


def test_discover_requires_starting_at_one(tmp_path: Path) -> None:
    folder = write(tmp_path / "m", {"0002_x.sql": "SELECT 1;"})
    with pytest.raises(MigrationError, match=r"0002_x\.sql follows a gap"):
        discover(folder)


def test_discover_rejects_non_utf8(folder: Path) -> None:
    (folder / "0004_latin1.sql").write_bytes(b"-- caf\xe9\n")
    with pytest.raises(MigrationError, match=r"0004_latin1\.sql is not UTF-8"):
        discover(folder)


# -- applying -----------------------------------------------------------------------------


async def test_applies_in_order_and_records_each(
    conn: aiosqlite.Connection, folder: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="syncengine.migrations")
    assert await migrate_sqlite(conn, folder) == [1, 2, 3]
    assert await recorded(conn) == [(1, "init"), (2, "add_label"), (3, "seed")]
    rows = await conn.execute_fetchall("SELECT id, label FROM a ORDER BY id")
    assert [tuple(row) for row in rows] == [(1, "one"), (2, "two")]
    rows = await conn.execute_fetchall("SELECT checksum, applied_at FROM schema_migrations")
    checksums = [m.checksum for m in discover(folder)]
    assert [row[0] for row in rows] == checksums
    assert all(row[1].endswith("Z") for row in rows)
    assert not conn.in_transaction
    applied = [r.getMessage() for r in caplog.records if "applied migration" in r.getMessage()]
    assert [message.split(" in ")[0] for message in applied] == [
        "applied migration 0001_init",
        "applied migration 0002_add_label",
        "applied migration 0003_seed",
    ]


async def test_second_run_applies_nothing_then_only_new_files(
    conn: aiosqlite.Connection, folder: Path
) -> None:
    assert await migrate_sqlite(conn, folder) == [1, 2, 3]
    assert await migrate_sqlite(conn, folder) == []
    write(folder, {"0004_more.sql": "CREATE TABLE b (id INTEGER PRIMARY KEY);"})
    assert await migrate_sqlite(conn, folder) == [4]
    assert await migrate_sqlite(conn, folder) == []
    assert [v for v, _ in await recorded(conn)] == [1, 2, 3, 4]


async def test_empty_folder_creates_only_the_bookkeeping_table(
    conn: aiosqlite.Connection, tmp_path: Path
) -> None:
    assert await migrate_sqlite(conn, write(tmp_path / "none", {})) == []
    assert await tables(conn) == {"schema_migrations"}


async def test_shipped_edge_migrations_apply_to_a_fresh_file(conn: aiosqlite.Connection) -> None:
    shipped = [m.version for m in discover(SHIPPED_EDGE)]
    assert shipped, "the edge migrations folder is empty"
    assert await migrate_sqlite(conn, SHIPPED_EDGE) == shipped
    assert await migrate_sqlite(conn, SHIPPED_EDGE) == []


async def test_refuses_to_start_inside_a_transaction(
    conn: aiosqlite.Connection, folder: Path
) -> None:
    await conn.execute("BEGIN")
    with pytest.raises(MigrationError, match="outside a transaction"):
        await migrate_sqlite(conn, folder)
    await conn.execute("ROLLBACK")


# -- verification of what is applied ------------------------------------------------------


async def test_edited_file_is_detected_before_anything_is_applied(
    conn: aiosqlite.Connection, folder: Path
) -> None:
    assert await migrate_sqlite(conn, folder) == [1, 2, 3]
    write(folder, {"0004_more.sql": "CREATE TABLE b (id INTEGER PRIMARY KEY);"})
    (folder / "0002_add_label.sql").write_text(ADD_COLUMN + "-- a harmless comment\n")
    with pytest.raises(
        MigrationError, match=r"0002_add_label\.sql was edited after it was applied"
    ):
        await migrate_sqlite(conn, folder)
    assert "b" not in await tables(conn)
    assert [v for v, _ in await recorded(conn)] == [1, 2, 3]


async def test_edited_error_carries_checksums_and_a_hint(
    conn: aiosqlite.Connection, folder: Path
) -> None:
    before = discover(folder)[0].checksum
    await migrate_sqlite(conn, folder)
    (folder / "0001_init.sql").write_text(INIT.replace("first", "1st"))
    after = discover(folder)[0].checksum
    with pytest.raises(MigrationError) as info:
        await migrate_sqlite(conn, folder)
    error = info.value
    assert error.code == "migration_error"
    assert f"checksum {before[:12]}≠{after[:12]}" in error.message
    assert error.detail["recorded_checksum"] == before
    assert error.detail["file_checksum"] == after
    assert "new migration file" in error.hint


async def test_renamed_file_is_detected(conn: aiosqlite.Connection, folder: Path) -> None:
    await migrate_sqlite(conn, folder)
    (folder / "0003_seed.sql").rename(folder / "0003_seed_rows.sql")
    with pytest.raises(
        MigrationError, match=r"0003_seed_rows\.sql was renamed after it was applied"
    ):
        await migrate_sqlite(conn, folder)


async def test_missing_file_means_the_database_is_newer(
    conn: aiosqlite.Connection, folder: Path
) -> None:
    await migrate_sqlite(conn, folder)
    (folder / "0003_seed.sql").unlink()
    with pytest.raises(MigrationError, match="newer than this release") as info:
        await migrate_sqlite(conn, folder)
    assert "0003_seed" in info.value.message
    assert "Upgrade syncengine" in info.value.hint


async def test_pending_before_an_applied_version_is_refused(
    conn: aiosqlite.Connection, folder: Path
) -> None:
    await migrate_sqlite(conn, folder)
    await conn.execute("DELETE FROM schema_migrations WHERE version = 2")
    with pytest.raises(MigrationError, match=r"0002_add_label\.sql is not applied but the later"):
        await migrate_sqlite(conn, folder)


# -- atomicity ----------------------------------------------------------------------------


async def test_failing_migration_leaves_no_trace(conn: aiosqlite.Connection, folder: Path) -> None:
    broken = "CREATE TABLE b (id INTEGER PRIMARY KEY);\nINSERT INTO no_such_table VALUES (1);\n"
    write(folder, {"0004_broken.sql": broken})
    with pytest.raises(MigrationError, match=r"0004_broken\.sql failed: no such table") as info:
        await migrate_sqlite(conn, folder)
    assert isinstance(info.value.__cause__, sqlite3.OperationalError)
    assert "Nothing of this migration was applied" in info.value.hint
    assert not conn.in_transaction
    assert "b" not in await tables(conn)
    assert [v for v, _ in await recorded(conn)] == [1, 2, 3]

    # Fixing the file (never applied, so it may still change) and running again applies it.
    write(folder, {"0004_broken.sql": "CREATE TABLE b (id INTEGER PRIMARY KEY);"})
    assert await migrate_sqlite(conn, folder) == [4]


async def test_failing_first_migration_leaves_an_empty_database(
    conn: aiosqlite.Connection, tmp_path: Path
) -> None:
    folder = write(tmp_path / "m", {"0001_init.sql": "CREATE TABLE a (x);\nCREATE TABLE a (y);"})
    with pytest.raises(MigrationError, match="already exists"):
        await migrate_sqlite(conn, folder)
    assert await tables(conn) == {"schema_migrations"}
    assert await recorded(conn) == []


async def test_unterminated_comment_cannot_swallow_the_commit(
    conn: aiosqlite.Connection, tmp_path: Path
) -> None:
    folder = write(tmp_path / "m", {"0001_init.sql": "CREATE TABLE a (x);\n/* never closed"})
    with pytest.raises(MigrationError, match="does not end cleanly"):
        await migrate_sqlite(conn, folder)
    assert not conn.in_transaction
    assert await tables(conn) == {"schema_migrations"}


async def test_lock_held_beyond_the_busy_timeout_escapes_as_sqlite_busy(
    connect: Connect, folder: Path
) -> None:
    holder = await connect()
    assert await migrate_sqlite(holder, folder) == [1, 2, 3]
    write(folder, {"0004_more.sql": "CREATE TABLE b (id INTEGER PRIMARY KEY);"})
    await holder.execute("BEGIN IMMEDIATE")
    impatient = await connect(timeout=0.05)
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        await migrate_sqlite(impatient, folder)
    assert not impatient.in_transaction
    await holder.execute("ROLLBACK")
    assert await migrate_sqlite(impatient, folder) == [4]


# -- concurrency ----------------------------------------------------------------------------


async def test_concurrent_migrators_each_apply_once(connect: Connect, folder: Path) -> None:
    first, second = await connect(), await connect()
    results = await asyncio.gather(migrate_sqlite(first, folder), migrate_sqlite(second, folder))
    assert sorted(results[0] + results[1]) == [1, 2, 3]
    assert await recorded(first) == [(1, "init"), (2, "add_label"), (3, "seed")]
    rows = await first.execute_fetchall("SELECT count(*) FROM a")
    assert next(iter(rows))[0] == 2  # the seed ran once


async def test_racing_migrators_skip_what_the_winner_applied(
    connect: Connect, folder: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Both plan all three migrations, then race for the write lock at the same moment."""
    caplog.set_level(logging.INFO, logger="syncengine.migrations")
    gate = await connect()
    assert await migrate_sqlite(gate, write(tmp_path / "none", {})) == []  # bookkeeping table
    await gate.execute("BEGIN IMMEDIATE")
    racers = [await connect() for _ in range(3)]
    tasks = [asyncio.create_task(migrate_sqlite(racer, folder)) for racer in racers]
    await asyncio.sleep(0.3)  # every racer has read "nothing applied" and waits for the lock
    assert not any(task.done() for task in tasks)
    await gate.execute("ROLLBACK")
    results = await asyncio.gather(*tasks)

    assert sorted(v for result in results for v in result) == [1, 2, 3]
    assert await recorded(gate) == [(1, "init"), (2, "add_label"), (3, "seed")]
    rows = await gate.execute_fetchall("SELECT count(*) FROM a")
    assert next(iter(rows))[0] == 2
    skipped = [r for r in caplog.records if "applied by another connection" in r.getMessage()]
    assert len(skipped) == 2 * 3  # each migration: two losers
    assert not any(racer.in_transaction for racer in racers)


async def test_racer_with_another_version_of_a_file_is_refused(
    connect: Connect, folder: Path, tmp_path: Path
) -> None:
    """A loser whose file differs from what the winner applied must not skip it silently."""
    winner = await connect()
    await migrate_sqlite(winner, write(tmp_path / "none", {}))
    # The winner holds the write lock while applying 0001 as released in `folder`...
    await winner.execute("BEGIN IMMEDIATE")
    await winner.execute(INIT)
    await winner.execute(
        "INSERT INTO schema_migrations VALUES (1, 'init', ?, '2030-01-01T00:00:00Z')",
        (discover(folder)[0].checksum,),
    )
    # ...while a process with another 0001_init.sql has planned it and waits for the lock.
    other = write(tmp_path / "other", {"0001_init.sql": INIT + "-- other release\n"})
    loser = await connect()
    losing = asyncio.create_task(migrate_sqlite(loser, other))
    await asyncio.sleep(0.3)
    assert not losing.done()
    await winner.execute("COMMIT")
    with pytest.raises(MigrationError, match=r"0001_init\.sql was edited after it was applied"):
        await losing
    assert not loser.in_transaction


# -- status -------------------------------------------------------------------------------


async def test_status_of_a_fresh_database_is_all_pending_and_read_only(
    conn: aiosqlite.Connection, folder: Path
) -> None:
    assert await status_sqlite(conn, folder) == [
        MigrationStatus(1, "init", MigrationState.PENDING),
        MigrationStatus(2, "add_label", MigrationState.PENDING),
        MigrationStatus(3, "seed", MigrationState.PENDING),
    ]
    assert await tables(conn) == set()


async def test_status_reports_every_state(conn: aiosqlite.Connection, folder: Path) -> None:
    await migrate_sqlite(conn, folder)
    (folder / "0003_seed.sql").unlink()
    write(folder, {"0003_seed_v2.sql": SEED, "0004_more.sql": "SELECT 1;"})
    (folder / "0001_init.sql").write_text(INIT + "-- edited\n")
    await conn.execute(
        "INSERT INTO schema_migrations VALUES (5, 'future', 'ff', '2030-01-01T00:00:00Z')"
    )
    statuses = await status_sqlite(conn, folder)
    assert statuses == [
        (1, "init", "edited"),
        (2, "add_label", "applied"),
        (3, "seed_v2", "edited"),
        (4, "more", "pending"),
        (5, "future", "missing-file"),
    ]
    assert {s.state for s in statuses} <= {"applied", "pending", "edited", "missing-file"}


async def test_concurrent_processes_each_apply_once(folder: Path, tmp_path: Path) -> None:
    """Separate processes, as when an edge daemon and `syncengine` CLI start together."""
    db = tmp_path / "edge.db"
    script = (
        "import asyncio, sys, aiosqlite\n"
        "from pathlib import Path\n"
        "from syncengine.migrations import migrate_sqlite\n"
        "async def main():\n"
        "    async with aiosqlite.connect(sys.argv[1], isolation_level=None) as conn:\n"
        "        await conn.execute_fetchall('PRAGMA journal_mode = WAL')\n"
        "        print(*await migrate_sqlite(conn, Path(sys.argv[2])))\n"
        "asyncio.run(main())\n"
    )
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-c", script, str(db), str(folder), stdout=asyncio.subprocess.PIPE
        )
        for _ in range(3)
    ]
    outputs = [await proc.communicate() for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0, 0]
    applied = [int(v) for stdout, _ in outputs for v in stdout.split()]
    assert sorted(applied) == [1, 2, 3]
    async with aiosqlite.connect(db) as conn:
        assert await recorded(conn) == [(1, "init"), (2, "add_label"), (3, "seed")]
