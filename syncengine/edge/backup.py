"""Backing up an edge store while it is in use, and putting a backup back.

A backup is a plain SQLite file: a consistent snapshot taken with ``VACUUM INTO`` (a read
transaction, so writers and the daemon carry on), verified, synced and renamed into place.

Putting it back is the delicate part. The store it replaces usually went further: it wrote
and pushed changes after the backup, under seqs the backup will issue again. The restored
file is marked with each lane's next seq at the time of the backup (meta ``restored``); on
its first contact with the hub, :meth:`EdgeStore._follow_hub_seqs` uses the mark and the
hub's acknowledged seqs to drop what the hub already holds and number the changes written
since the restore after the hub's. The restore also asks for a bootstrap: every record is
taken anew from the hub's snapshot, which brings back what the replaced store wrote after
the backup (a pull never returns a node its own changes).
Nothing is lost and nothing counts twice; the replaced file is moved aside, never deleted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from syncengine.errors import ConfigError, CorruptStoreError, StorageError

__all__ = ["BackupInfo", "backup_file", "move_aside", "restore_backup"]

#: A SQLite database and its journal files.
_DB_SUFFIXES: Final = ("", "-wal", "-shm", "-journal")
#: meta key of a restored file: ``{lane: next_seq}`` when the backup was taken.
RESTORED_META = "restored"


@dataclass(frozen=True, slots=True)
class BackupInfo:
    """What a backup file holds."""

    path: Path
    node_id: str
    region: str
    size_bytes: int
    records: int
    queued: int


async def backup_file(db_path: Path, dest: Path) -> BackupInfo:
    """Write a consistent copy of the store at ``db_path`` to ``dest`` while it stays in use.

    Raises :class:`StorageError` when ``dest`` exists or cannot be written, and
    :class:`CorruptStoreError` when the copy fails its integrity check (nothing is left at
    ``dest`` then).
    """
    return await asyncio.to_thread(_backup, Path(db_path), Path(dest))


async def restore_backup(
    backup: Path, db_path: Path, *, node_id: str, region: str
) -> tuple[BackupInfo, Path | None]:
    """Put ``backup`` in place of the store at ``db_path``; return what it holds and where
    the replaced file went (None when there was none).

    The edge daemon and every application using the store must be stopped first. Raises
    :class:`ConfigError` when the backup belongs to another node or region,
    :class:`CorruptStoreError` when it is damaged, :class:`StorageError` for file problems;
    the current store is untouched then.
    """
    return await asyncio.to_thread(_restore, Path(backup), Path(db_path), node_id, region)


# -- the work, on a thread --------------------------------------------------------------------


def _backup(db_path: Path, dest: Path) -> BackupInfo:
    if not db_path.exists():
        raise StorageError(
            f"edge database {db_path} does not exist",
            hint="Check `db` in the node's edge.toml.",
            code="no_store",
            detail={"path": str(db_path)},
        )
    if dest.exists():
        raise StorageError(
            f"{dest} exists already; a backup never overwrites a file",
            hint="Name a new file, or move the old one away first.",
            code="backup_exists",
            detail={"path": str(dest)},
        )
    tmp = dest.with_name(f".{dest.name}.partial")
    tmp.unlink(missing_ok=True)
    try:
        with contextlib.closing(
            sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=30)
        ) as src:
            src.execute("VACUUM INTO ?", (str(tmp),))
        info = _inspect(tmp, shown=dest)
        _fsync(tmp)
        tmp.replace(dest)
        _fsync(dest.parent)
        return info
    except sqlite3.Error as exc:
        raise StorageError(
            f"backup of {db_path} to {dest} failed: {exc}",
            hint="Check that the destination folder exists, is writable and has space.",
            code="backup_failed",
            detail={"path": str(dest)},
        ) from None
    finally:
        tmp.unlink(missing_ok=True)


def _restore(
    backup: Path, db_path: Path, node_id: str, region: str
) -> tuple[BackupInfo, Path | None]:
    if not backup.is_file():
        raise StorageError(
            f"backup {backup} does not exist", hint="Check the path.", code="no_backup"
        )
    info = _inspect(backup, shown=backup)
    for key, have, want in (("node_id", info.node_id, node_id), ("region", info.region, region)):
        if have != want:
            raise ConfigError(
                f"backup {backup} belongs to {key} {have!r}, not {want!r}",
                hint="Restore this node's own backup; one store serves one node.",
                code="store_identity",
            )
    tmp = db_path.with_name(f".{db_path.name}.restoring")
    _remove_db(tmp)
    try:
        with (
            contextlib.closing(sqlite3.connect(f"file:{backup}?mode=ro", uri=True)) as src,
            contextlib.closing(sqlite3.connect(tmp)) as dst,
        ):
            src.backup(dst)
            # A single file to move into place: no -wal beside it.
            dst.execute("PRAGMA journal_mode = DELETE")
            with dst:
                _mark_restored(dst)
        _fsync(tmp)
        aside = move_aside(db_path, "replaced") if db_path.exists() else None
        tmp.replace(db_path)
        _fsync(db_path.parent)
    except sqlite3.Error as exc:
        raise StorageError(
            f"restoring {backup} to {db_path} failed: {exc}",
            hint="Check that the folder of `db` is writable and has space; the current store "
            "was not replaced.",
            code="restore_failed",
        ) from None
    finally:
        _remove_db(tmp)
    return info, aside


def _mark_restored(conn: sqlite3.Connection) -> None:
    """Record each lane's next seq as the backup has it, unless the backup was itself taken
    from a restored file that never reached the hub (its older mark stands)."""
    row = conn.execute("SELECT value FROM meta WHERE key = ?", (RESTORED_META,)).fetchone()
    mark: dict[str, int] = json.loads(row[0]) if row is not None else {}
    for lane, next_seq in conn.execute("SELECT lane, next_seq FROM lanes"):
        mark[str(lane)] = min(mark.get(str(lane), next_seq), next_seq)
    conn.executemany(
        "INSERT INTO meta (key, value) VALUES (?, ?) "
        "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        [
            (RESTORED_META, json.dumps(mark, sort_keys=True)),
            # What the replaced store wrote after the backup is at the hub only, and pulls
            # never return a node its own changes: take every record anew from the
            # snapshot (queued changes stay on top). Pulls wait until it is done.
            ("bootstrap", "{}"),
        ],
    )
    conn.execute("DELETE FROM meta WHERE key = 'bootstrapped'")


def _inspect(path: Path, *, shown: Path) -> BackupInfo:
    """Check that ``path`` is a sound edge store and say whose it is and what it holds."""
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
            check = "; ".join(str(r[0]) for r in conn.execute("PRAGMA integrity_check"))
            if check != "ok":
                raise CorruptStoreError(
                    f"{shown} failed its integrity check: {check[:500]}",
                    detail={"path": str(shown)},
                )
            meta = dict(conn.execute("SELECT key, value FROM meta"))
            records = conn.execute("SELECT count(*) FROM records").fetchone()[0]
            queued = conn.execute("SELECT count(*) FROM outbox").fetchone()[0]
    except sqlite3.DatabaseError as exc:
        raise CorruptStoreError(
            f"{shown} is not a readable edge store: {exc}",
            hint="Use a file written by `syncengine edge backup`.",
            detail={"path": str(shown)},
        ) from None
    if "node_id" not in meta or "region" not in meta:
        raise CorruptStoreError(
            f"{shown} is not an edge store (it names no node)",
            hint="Use a file written by `syncengine edge backup`.",
            detail={"path": str(shown)},
        )
    return BackupInfo(
        path=shown,
        node_id=str(meta["node_id"]),
        region=str(meta["region"]),
        size_bytes=path.stat().st_size,
        records=int(records),
        queued=int(queued),
    )


def move_aside(db_path: Path, why: str) -> Path:
    """Rename a store file and its journal files to ``<name>.<why>-<UTC time>`` (never
    deleted); return the new name of the database file."""
    aside = db_path.with_name(
        f"{db_path.name}.{why}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
    )
    for suffix in _DB_SUFFIXES:
        part = Path(f"{db_path}{suffix}")
        if part.exists():
            part.replace(f"{aside}{suffix}")
    return aside


def _remove_db(path: Path) -> None:
    for suffix in _DB_SUFFIXES:
        Path(f"{path}{suffix}").unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
