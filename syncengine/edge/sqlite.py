"""Opening the edge's SQLite file safely, and translating sqlite3 errors once.

Order matters when opening: ``busy_timeout`` first (``journal_mode=WAL`` itself can return
SQLITE_BUSY while another process holds the file), then WAL, then ``synchronous=FULL`` so the
commit that acknowledges a write is on disk (NORMAL loses acknowledged writes on power loss).
The file is only ever touched through SQLite.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import sqlite3
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Final, TypeVar

import aiosqlite

from syncengine.errors import CorruptStoreError, StorageError, SyncError

__all__ = ["connect", "is_busy", "run_transaction", "transaction", "translate"]

log = logging.getLogger(__name__)
T = TypeVar("T")

#: How long a write keeps retrying SQLITE_BUSY beyond SQLite's own busy timeout.
BUSY_RETRY_S = 60.0

_NETWORK_FS = {"nfs", "nfs4", "cifs", "smbfs", "smb3", "sshfs", "fuse.sshfs", "9p"}


def is_busy(exc: BaseException) -> bool:
    return isinstance(exc, sqlite3.OperationalError) and (
        "locked" in str(exc) or "busy" in str(exc)
    )


def translate(exc: sqlite3.Error, path: Path) -> SyncError:
    """Map a sqlite3 error to the syncengine tree, naming the file."""
    text = str(exc)
    detail = {"path": str(path), "sqlite": text}
    if "not a database" in text or "malformed" in text or "corrupt" in text:
        return CorruptStoreError(f"{path} is damaged: {text}", detail=detail)
    if "disk is full" in text or "SQLITE_FULL" in text:
        return StorageError(
            f"no space left for {path}: {text}",
            hint="Free disk space; nothing was acknowledged, writes can be retried.",
            code="disk_full",
            detail=detail,
        )
    if "disk I/O error" in text:
        return StorageError(
            f"I/O error on {path}: {text}",
            hint="Check the disk's health (dmesg); the write was not acknowledged.",
            code="io_error",
            detail=detail,
        )
    if "readonly" in text or "read-only" in text:
        return StorageError(
            f"{path} is read-only: {text}",
            hint="Give the daemon's user write access to the file and its folder.",
            code="read_only",
            detail=detail,
        )
    if is_busy(exc):
        return StorageError(
            f"{path} stayed locked by another process for over {BUSY_RETRY_S:.0f} s",
            hint="Find the process holding a long write transaction on the file.",
            code="busy",
            detail=detail,
        )
    return StorageError(f"SQLite error on {path}: {text}", detail=detail)


def read_only_filesystem(folder: Path) -> bool:
    """Whether the filesystem holding ``folder`` is mounted read-only now (Linux turns a
    failing ext4 read-only under its open files: ``errors=remount-ro``)."""
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except OSError:
        return False


class _CommitFailed(Exception):
    """COMMIT itself failed (BEGIN and the statements had succeeded): carries the error."""

    def __init__(self, error: sqlite3.Error) -> None:
        super().__init__(str(error))
        self.error = error


#: The hint of every commit whose outcome is unknown.
_UNKNOWN_OUTCOME_HINT: Final = (
    "The write was not acknowledged and may or may not be stored: check the disk (dmesg), "
    "make it writable again, then read the key back before writing it again."
)


def _commit_error(exc: sqlite3.Error, path: Path) -> SyncError:
    """A failed COMMIT, translated. Short of space, SQLite fails before the commit frame is
    written, so nothing was stored; any other failure can come after the frames reached the
    disk (a failed fsync, a filesystem going read-only): the outcome is unknown, and the
    error says so (``detail.during_commit``)."""
    error = translate(exc, path)
    if not isinstance(error, StorageError) or error.code == "disk_full":
        return error
    return StorageError(
        error.message,
        hint=_UNKNOWN_OUTCOME_HINT,
        code=error.code,
        detail={**error.detail, "during_commit": True},
    )


def _check_durable(path: Path) -> None:
    """Called after every COMMIT. Once a filesystem went read-only under an open file, Linux
    still accepts writes into the page cache and answers fsync with success, although
    nothing reaches the disk again: a commit that SQLite believes durable is lost at the
    next unmount. Such a commit is refused here instead of acknowledged."""
    if read_only_filesystem(path.parent):
        raise StorageError(
            f"the filesystem holding {path} turned read-only during a commit",
            hint=_UNKNOWN_OUTCOME_HINT,
            code="read_only",
            detail={"path": str(path), "during_commit": True},
        )


def _filesystem_type(path: Path) -> str | None:
    """The mount type holding ``path`` (Linux only; None when unknown)."""
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return None
    best, fstype = "", None
    target = str(path.resolve())
    for line in mounts:
        parts = line.split()
        if len(parts) >= 3 and target.startswith(parts[1]) and len(parts[1]) > len(best):
            best, fstype = parts[1], parts[2]
    return fstype


async def connect(
    path: Path, *, busy_timeout_ms: int, readonly: bool = False
) -> aiosqlite.Connection:
    """Open ``path`` with the pragmas the store relies on.

    Raises :class:`StorageError` when the folder is missing or on a network filesystem (WAL
    needs shared memory that network filesystems do not provide), and
    :class:`CorruptStoreError` when the file is not a SQLite database.
    """
    folder = path.parent
    if not folder.is_dir():
        raise StorageError(
            f"folder {folder} for the edge database does not exist",
            hint="Create it (and give the daemon's user write access), or set `db` in edge.toml.",
            code="no_such_folder",
        )
    fstype = _filesystem_type(folder)
    if fstype in _NETWORK_FS:
        raise StorageError(
            f"{path} is on a network filesystem ({fstype}); SQLite WAL is unsafe there",
            hint="Put the edge database on a local disk.",
            code="network_filesystem",
        )
    if not readonly and read_only_filesystem(folder):
        raise StorageError(
            f"{path} is on a read-only filesystem",
            hint=(
                "Check the disk (dmesg: a failing disk is turned read-only by the kernel), "
                "then remount it read-write; nothing is written until then."
            ),
            code="read_only",
            detail={"path": str(path)},
        )
    # isolation_level=None: we issue BEGIN IMMEDIATE / COMMIT ourselves.
    conn = await aiosqlite.connect(path, isolation_level=None)
    try:
        await conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
        if readonly:
            await conn.execute("PRAGMA query_only = ON")
        else:
            await conn.execute("PRAGMA journal_mode = WAL")
            await conn.execute("PRAGMA synchronous = FULL")
            # Bounded WAL: checkpoint every ~4 MB of pages, truncate the file back to 64 MB.
            await conn.execute("PRAGMA wal_autocheckpoint = 1000")
            await conn.execute("PRAGMA journal_size_limit = 67108864")
    except sqlite3.Error as exc:
        await conn.close()
        raise translate(exc, path) from None
    return conn


async def transaction(
    conn: aiosqlite.Connection, path: Path, body: Callable[[], Awaitable[T]]
) -> T:
    """Run ``body`` inside ``BEGIN IMMEDIATE … COMMIT`` on ``conn``.

    SQLITE_BUSY from another process is retried with jittered backoff for up to
    ``BUSY_RETRY_S`` on top of SQLite's busy timeout, so a caller never sees
    "database is locked" while the lock is merely contended. Any failure rolls back (shielded
    from cancellation) and surfaces as a :class:`SyncError`.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + BUSY_RETRY_S
    delay = 0.005
    while True:
        try:
            await conn.execute("BEGIN IMMEDIATE")
            break
        except sqlite3.OperationalError as exc:
            if not is_busy(exc) or loop.time() > deadline:
                raise translate(exc, path) from None
            await asyncio.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 0.25)
        except asyncio.CancelledError:
            # The BEGIN runs on the connection's thread whether or not we wait for it:
            # end it, or the connection stays inside a transaction no one will close.
            await asyncio.shield(_rollback(conn, path))
            raise
    try:
        result = await body()
        try:
            await conn.execute("COMMIT")
        except sqlite3.Error as exc:
            raise _CommitFailed(exc) from None
    except BaseException as exc:
        await asyncio.shield(_rollback(conn, path))
        if isinstance(exc, _CommitFailed):
            raise _commit_error(exc.error, path) from None
        if isinstance(exc, sqlite3.Error):
            raise translate(exc, path) from None
        raise
    _check_durable(path)
    return result


async def _rollback(conn: aiosqlite.Connection, path: Path) -> None:
    """Roll back whatever transaction is open once the statements queued before have run
    (checked on the connection's thread: a BEGIN still queued counts)."""
    try:
        await conn._execute(_rollback_on_thread, conn)  # type: ignore[no-untyped-call]
    except (sqlite3.Error, ValueError) as exc:  # ValueError: connection already closed
        log.warning("rollback on %s failed: %s", path, exc)


def _rollback_on_thread(conn: aiosqlite.Connection) -> None:
    raw = conn._conn
    if raw.in_transaction:
        raw.execute("ROLLBACK")


async def run_transaction(
    conn: aiosqlite.Connection,
    path: Path,
    body: Callable[..., T],
    *args: Any,
) -> T:
    """Run ``body(raw_sqlite3_connection, *args)`` inside ``BEGIN IMMEDIATE … COMMIT``,
    entirely on ``conn``'s worker thread.

    One thread hop for the whole transaction. Each hop waits for the GIL, which the busy event
    loop holds for up to the switch interval (5 ms): a group commit done as eight awaited
    statements spent most of its time waiting for hops, not in SQLite. The hot write paths
    (group commits, pulled pages) therefore run here; ``body`` must not touch the event loop.
    aiosqlite's own statement methods are built on the same ``_execute`` call.
    """
    try:
        result: T = await conn._execute(_transaction_on_thread, conn, body, *args)  # type: ignore[no-untyped-call]
    except _CommitFailed as exc:
        raise _commit_error(exc.error, path) from None
    except sqlite3.Error as exc:
        raise translate(exc, path) from None
    _check_durable(path)
    return result


async def read_snapshot(
    conn: aiosqlite.Connection,
    path: Path,
    body: Callable[..., T],
    *args: Any,
) -> T:
    """Run ``body(raw_sqlite3_connection, *args)`` inside one read transaction (``BEGIN``
    … ``COMMIT``), entirely on ``conn``'s worker thread: the statements see one snapshot.

    One queued call, so a caller cancelled while it waits cannot leave the transaction open
    on the shared connection, as separate ``BEGIN`` and ``COMMIT`` awaits could: the next
    reader's ``BEGIN`` would fail with "cannot start a transaction within a transaction",
    for good.
    """
    try:
        result: T = await conn._execute(_snapshot_on_thread, conn, body, *args)  # type: ignore[no-untyped-call]
    except sqlite3.Error as exc:
        raise translate(exc, path) from None
    return result


def _snapshot_on_thread(conn: aiosqlite.Connection, body: Callable[..., T], *args: Any) -> T:
    raw = conn._conn  # on the connection's own thread
    raw.execute("BEGIN")
    try:
        return body(raw, *args)
    finally:
        if raw.in_transaction:
            raw.execute("COMMIT")  # read-only: COMMIT just ends the snapshot


def _transaction_on_thread(conn: aiosqlite.Connection, body: Callable[..., T], *args: Any) -> T:
    raw = conn._conn  # on the connection's own thread
    deadline = time.monotonic() + BUSY_RETRY_S
    delay = 0.005
    while True:
        try:
            raw.execute("BEGIN IMMEDIATE")
            break
        except sqlite3.OperationalError as exc:
            if not is_busy(exc) or time.monotonic() > deadline:
                raise
            time.sleep(delay * (0.5 + random.random()))  # the worker thread, not the loop
            delay = min(delay * 2, 0.25)
    try:
        result = body(raw, *args)
        try:
            raw.execute("COMMIT")
        except sqlite3.Error as exc:
            raise _CommitFailed(exc) from None
    except BaseException:
        if raw.in_transaction:
            try:
                raw.execute("ROLLBACK")
            except sqlite3.Error as exc:
                log.warning("rollback failed: %s", exc)
        raise
    return result
