"""The edge store: local records in SQLite, written durably first, queued for the hub.

Every ``put``/``delete`` merges into ``records`` and appends to ``outbox`` in one SQLite
transaction and returns only after that transaction is committed with ``synchronous=FULL``:
an acknowledged write survives ``kill -9`` and power loss. Concurrent writers share
transactions (group commit): one task owns the write connection, takes every write queued
while the previous commit was on disk, and commits them together, so throughput is bounded by
the disk and not by one fsync per write.

Reads go through a second, read-only connection and never wait for a commit. Other processes
(the daemon, a CLI) may write the same file at once: every write is ``BEGIN IMMEDIATE`` under
a busy timeout, retried while the lock is merely contended, and stamps and sequence numbers
are allocated inside the write lock so two processes never hand out the same one.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import sqlite3
import time
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Generator,
    Iterable,
    Mapping,
    Sequence,
)
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Final, TypeVar

import aiosqlite

from syncengine import crashpoints
from syncengine.cells import covers_any, home_region, parse_cell
from syncengine.clock import DEFAULT_MAX_DRIFT_MS, HybridClock
from syncengine.edge import sqlite as db
from syncengine.edge.backup import RESTORED_META
from syncengine.edge.outbox import Outbox, encode_payload, queued_change
from syncengine.errors import (
    ClockDriftError,
    ConfigError,
    CorruptStoreError,
    ForbiddenError,
    NotAvailableOffline,
    SequenceError,
    StorageError,
    SyncError,
)
from syncengine.merge import (
    DEFAULT_RESOLVER,
    RESOLVERS,
    BaseStamp,
    Change,
    RecordState,
    apply_change,
    document_json,
    validate_collection,
    validate_fields,
    validate_key,
)
from syncengine.migrations import migrate_sqlite
from syncengine.resources import data_dir
from syncengine.tiers import Retention, Tier, TierPolicy, TierRules

__all__ = ["DEFAULT_MAX_RECORD_BYTES", "EdgeStore", "StepRecord"]

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_MAX_RECORD_BYTES: Final = 1024 * 1024
DEFAULT_BUSY_TIMEOUT_MS: Final = 10_000
#: Most writes one group commit takes. Bounds the transaction's size and the wait of the
#: last writer in it; large enough that 256 concurrent writers share one commit.
MAX_GROUP: Final = 1024
#: SQLite's parameter limit is 32,766; three per key in a row-value IN list.
_KEYS_PER_QUERY: Final = 500
#: The records at or under a prefix after a key ``(cell, collection, key)``, as index range
#: scans read in key order: the prefix's own cell, then the cells under it (``prefix/`` up
#: to ``prefix0``: ``/`` sorts just before ``0``). Each takes the prefix and the key's three
#: parts; the own cell is done once the key is past it. An OR of the two would make SQLite
#: sort the whole prefix for every page.
_UNDER_PREFIX: Final = (
    "cell = ?1 AND (collection, key) > (?3, ?4) AND ?2 <= ?1",
    "cell >= ?1 || '/' AND cell < ?1 || '0' AND (cell, collection, key) > (?2, ?3, ?4)",
)

RecordKey = tuple[str, str, str]
#: A record as the hub sends it: (cell, collection, key, state, feed_id).
HubRecord = tuple[str, str, str, bytes, int]


@dataclass(slots=True)
class _Write:
    cell: str
    collection: str
    key: str
    fields: dict[str, Any] | None  # None: delete
    future: asyncio.Future[int]


@dataclass(slots=True)
class _Job:
    """A transaction body that must run alone on the write connection (pulls, acks …)."""

    body: Callable[[], Awaitable[Any]]
    future: asyncio.Future[Any]
    #: False when ``body`` opens its own transaction (run_transaction on the thread).
    in_transaction: bool = True


_TIER_VALUES: Final = frozenset(t.value for t in Tier)


@dataclass(frozen=True, slots=True)
class StepRecord:
    """The last outcomes of one push or pull step (times in ms since the epoch)."""

    last_ok_ms: int | None
    last_error_ms: int | None
    last_error_code: str | None
    last_error: str | None
    hub_head: int | None

    @property
    def failing(self) -> bool:
        """Whether the last outcome was a failure."""
        return self.last_error_ms is not None and (
            self.last_ok_ms is None or self.last_error_ms > self.last_ok_ms
        )


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class EdgeStore:
    """One edge node's local SQLite store. Open it with :meth:`open`.

    All methods are coroutines safe to call from many tasks of one event loop at once.
    """

    def __init__(
        self,
        *,
        path: Path,
        node_id: str,
        region: str,
        writer: aiosqlite.Connection,
        reader: aiosqlite.Connection,
        clock: HybridClock,
        tier_rules: TierRules,
        resolvers: Mapping[str, str],
        max_record_bytes: int,
        busy_timeout_ms: int,
    ) -> None:
        self.path = path
        self.node_id = node_id
        self.region = region
        self.clock = clock
        self.tier_rules = tier_rules
        self.resolvers = dict(resolvers)
        self.max_record_bytes = max_record_bytes
        self._writer = writer
        #: Why the write connection is closed: its reopen after an I/O error failed too.
        self._writer_lost: SyncError | None = None
        self._reader = reader
        self._busy_timeout_ms = busy_timeout_ms
        self._queue: asyncio.Queue[_Write | _Job] = asyncio.Queue()
        self._closed = False
        self._drift_warned = False
        #: Group commits and the writes they carried since open (writes/commits = batching).
        self.commits = 0
        self.writes_committed = 0
        self.outbox = Outbox(self)
        self._lanes: dict[str, int] = {}  # cell -> lane, for the current tier rules
        self._commit_listeners: list[Callable[[frozenset[int]], None]] = []
        self._task = asyncio.get_running_loop().create_task(
            self._write_loop(), name=f"syncengine-edge-writer:{path.name}"
        )

    # -- lifecycle --------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        path: str | Path,
        *,
        node_id: str,
        region: str,
        tier_rules: TierRules | None = None,
        resolvers: Mapping[str, str] | None = None,
        max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
        busy_timeout_ms: int = DEFAULT_BUSY_TIMEOUT_MS,
        max_drift_ms: int = DEFAULT_MAX_DRIFT_MS,
        wall: Callable[[], int] | None = None,
    ) -> _Opening:
        """Open (creating and migrating if needed) the store at ``path``.

        Use as ``async with EdgeStore.open(...) as store`` or ``store = await EdgeStore.open(...)``
        (then ``await store.close()``). ``tier_rules`` are the offline rules from the node's
        config; rules learnt from the hub and saved in the store take precedence.

        Raises :class:`CorruptStoreError` when the file fails ``PRAGMA quick_check`` (the file
        is left untouched), :class:`ConfigError` when the file belongs to another node or
        region, :class:`StorageError` for folder and disk problems.
        """
        for name, resolver in (resolvers or {}).items():
            if resolver not in RESOLVERS:
                raise ConfigError(
                    f"collection {name!r}: unknown resolver {resolver!r}",
                    hint=f"Use one of: {', '.join(sorted(RESOLVERS))}.",
                )
        return _Opening(
            cls._open(
                Path(path),
                node_id=node_id,
                region=region,
                tier_rules=tier_rules or TierRules([]),
                resolvers=resolvers or {},
                max_record_bytes=max_record_bytes,
                busy_timeout_ms=busy_timeout_ms,
                max_drift_ms=max_drift_ms,
                wall=wall,
            )
        )

    @classmethod
    async def _open(
        cls,
        path: Path,
        *,
        node_id: str,
        region: str,
        tier_rules: TierRules,
        resolvers: Mapping[str, str],
        max_record_bytes: int,
        busy_timeout_ms: int,
        max_drift_ms: int,
        wall: Callable[[], int] | None,
    ) -> EdgeStore:
        writer = await db.connect(path, busy_timeout_ms=busy_timeout_ms)
        reader: aiosqlite.Connection | None = None
        try:
            await _check_integrity(writer, path)
            try:
                await migrate_sqlite(writer, data_dir("migrations") / "edge")
            except sqlite3.Error as exc:
                raise db.translate(exc, path) from None
            meta = await _claim_identity(writer, path, node_id=node_id, region=region)
            reader = await db.connect(path, busy_timeout_ms=busy_timeout_ms, readonly=True)
        except BaseException:
            await writer.close()
            if reader is not None:
                await reader.close()
            raise
        clock = HybridClock(max_drift_ms=max_drift_ms, high_water=int(meta.get("hlc", "0")))
        if wall is not None:
            clock.wall = wall
        learnt = meta.get("tier_rules")
        if learnt is not None:
            tier_rules = TierRules.from_wire(json.loads(learnt))
        learnt_resolvers = meta.get("resolvers")
        if learnt_resolvers is not None:
            resolvers = json.loads(learnt_resolvers)
        return cls(
            path=path,
            node_id=node_id,
            region=region,
            writer=writer,
            reader=reader,
            clock=clock,
            tier_rules=tier_rules,
            resolvers=resolvers,
            max_record_bytes=max_record_bytes,
            busy_timeout_ms=busy_timeout_ms,
        )

    async def close(self) -> None:
        """Finish queued writes, stop the writer and close both connections. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            # Let queued writes commit; bounded so a stuck disk cannot hang shutdown forever.
            async with asyncio.timeout(30):
                await self._queue.join()
        except TimeoutError:
            log.warning(
                "closing %s with writes still queued; they were not acknowledged", self.path
            )
        finally:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._fail_queued(StorageError("the store was closed", code="store_closed"))
            await self._writer.close()
            await self._reader.close()

    async def __aenter__(self) -> EdgeStore:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- writes -----------------------------------------------------------------------------

    def _lane_of(self, cell: str) -> int:
        lane = self._lanes.get(cell)
        if lane is None:
            if len(self._lanes) > 65_536:
                self._lanes.clear()
            lane = self._lanes[cell] = self.tier_rules.tier_for(cell).priority
        return lane

    def resolver_for(self, collection: str) -> str:
        return self.resolvers.get(collection, DEFAULT_RESOLVER)

    def _validate_target(self, cell: str, collection: str, key: str) -> None:
        parse_cell(cell)
        validate_collection(collection)
        validate_key(key)
        if home_region(cell) != self.region:
            raise ForbiddenError(
                f"cell {cell!r} belongs to region {home_region(cell)!r}, "
                f"but this node is in {self.region!r}",
                hint="A node writes only cells of its own region; the hub would refuse it.",
                code="foreign_region",
                detail={"cell": cell, "region": self.region},
            )

    async def put(self, cell: str, collection: str, key: str, fields: Mapping[str, Any]) -> int:
        """Merge ``fields`` into the record and queue the change; return its hlc.

        Returns once the change is committed to disk. Raises a :class:`ValidationError` /
        :class:`LimitExceededError` for bad input (nothing written), :class:`ForbiddenError`
        for a cell of another region, :class:`StorageError` when the disk refused the write
        (nothing acknowledged).
        """
        self._validate_target(cell, collection, key)
        checked = validate_fields(
            fields, resolver=self.resolver_for(collection), max_bytes=self.max_record_bytes
        )
        return await self._submit(cell, collection, key, checked)

    async def delete(self, cell: str, collection: str, key: str) -> int:
        """Delete the record (a tombstone) and queue the change; return its hlc."""
        self._validate_target(cell, collection, key)
        return await self._submit(cell, collection, key, None)

    async def _submit(
        self, cell: str, collection: str, key: str, fields: dict[str, Any] | None
    ) -> int:
        if self._closed:
            raise StorageError("the store is closed", code="store_closed")
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Write(cell, collection, key, fields, future))
        return await future

    def on_commit(self, listener: Callable[[frozenset[int]], None]) -> Callable[[], None]:
        """Call ``listener(lanes)`` on the event loop after each commit of local writes, with
        the outbox lanes they went to (how the daemon pushes a critical write at once).
        Returns a function that removes the listener. Writes of other processes are not
        seen here; the daemon watches ``PRAGMA data_version`` for those."""
        self._commit_listeners.append(listener)
        return lambda: self._commit_listeners.remove(listener)

    async def run_exclusive(self, body: Callable[[aiosqlite.Connection], Awaitable[T]]) -> T:
        """Run ``body(conn)`` inside its own ``BEGIN IMMEDIATE`` transaction on the write
        connection, serialized with local writes. For the outbox and sync layers."""
        if self._closed:
            raise StorageError("the store is closed", code="store_closed")
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Job(lambda: body(self._writer), future))
        return await future

    async def _write_loop(self) -> None:
        carry: _Write | _Job | None = None
        while True:
            item = carry if carry is not None else await self._queue.get()
            carry = None
            if isinstance(item, _Job):
                await self._run_job(item)
                self._queue.task_done()
                continue
            group = [item]
            while len(group) < MAX_GROUP and not self._queue.empty():
                nxt = self._queue.get_nowait()
                if isinstance(nxt, _Job):
                    carry = nxt
                    break
                group.append(nxt)
            await self._commit_group(group)
            for _ in group:
                self._queue.task_done()
            # A carried job was taken off the queue too; its task_done comes when it runs.

    async def _run_job(self, job: _Job) -> None:
        if job.future.cancelled():
            return
        try:
            await self._ensure_writer()
            if job.in_transaction:
                result = await db.transaction(self._writer, self.path, job.body)
            else:
                result = await job.body()
        except Exception as exc:
            if not job.future.done():
                job.future.set_exception(exc)
            await self._after_failure(exc)
        else:
            if not job.future.done():
                job.future.set_result(result)

    async def _commit_group(self, group: list[_Write]) -> None:
        live = [w for w in group if not w.future.cancelled()]
        if not live:
            return
        try:
            await self._ensure_writer()
            stamps = await db.run_transaction(self._writer, self.path, self._write_tx, live)
        except Exception as exc:
            for w in live:
                if not w.future.done():
                    w.future.set_exception(exc)
            await self._after_failure(exc)
            return
        self.commits += 1
        self.writes_committed += len(live)
        crashpoints.crashpoint("edge.put.after_commit_before_ack")
        for w, hlc in zip(live, stamps, strict=True):
            if not w.future.done():
                w.future.set_result(hlc)
        if self._commit_listeners:
            lanes = frozenset(self._lane_of(w.cell) for w in live)
            for listener in list(self._commit_listeners):
                try:
                    listener(lanes)
                except Exception:
                    # A listener's bug must not stop the writer: the writes are committed.
                    log.exception("commit listener %r failed", listener)

    async def _after_failure(self, exc: BaseException) -> None:
        """After an I/O error, or a filesystem that went read-only during a commit, the page
        cache may hold pages the disk never got (fsyncgate): reopen the write connection
        rather than trust it."""
        if not isinstance(exc, StorageError):
            return
        if exc.code != "io_error" and not exc.detail.get("during_commit"):
            return
        if self._writer_lost is not None:
            return  # the reopen itself failed: the next write tries again
        log.error("%s; reopening the write connection", exc.message)
        with contextlib.suppress(sqlite3.Error, ValueError):
            await self._writer.close()
        await self._reopen_writer()

    async def _reopen_writer(self) -> None:
        try:
            self._writer = await db.connect(self.path, busy_timeout_ms=self._busy_timeout_ms)
        except SyncError as again:
            # Keep serving: each write retries the reopen, and fails with this meanwhile.
            self._writer_lost = again
            log.error("reopening %s failed: %s", self.path, again)
        else:
            self._writer_lost = None

    async def _ensure_writer(self) -> None:
        """Reopen the write connection when its last reopen failed; raise why it is still
        closed (a :class:`StorageError`, never "connection closed")."""
        if self._writer_lost is None:
            return
        await self._reopen_writer()
        lost = self._writer_lost
        if lost is not None:
            raise StorageError(lost.message, hint=lost.hint, code=lost.code, detail=lost.detail)

    def _fail_queued(self, exc: SyncError) -> None:
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if not item.future.done():
                item.future.set_exception(exc)
            self._queue.task_done()

    # -- transaction bodies: these run on the write connection's thread, never the loop ----

    @staticmethod
    def _load_states(
        conn: sqlite3.Connection,
        keys: Iterable[RecordKey],
        feed_ids: dict[RecordKey, int] | None = None,
    ) -> dict[RecordKey, RecordState]:
        """Current states of ``keys``, read inside the caller's transaction; fills
        ``feed_ids`` with the ``hub_feed_id`` of those that have one."""
        wanted = list(keys)
        states: dict[RecordKey, RecordState] = {}
        for i in range(0, len(wanted), _KEYS_PER_QUERY):
            chunk = wanted[i : i + _KEYS_PER_QUERY]
            marks = ",".join("(?,?,?)" for _ in chunk)
            params = [v for k in chunk for v in k]
            # A join on a VALUES list, not a row-value IN: SQLite answers the IN form with
            # a scan of the whole table, the join with one primary-key search per key.
            rows = conn.execute(
                f"SELECT r.cell, r.collection, r.key, r.state, r.hub_feed_id "
                f"FROM (VALUES {marks}) AS k "
                "JOIN records AS r ON r.cell = k.column1 AND r.collection = k.column2 "
                "AND r.key = k.column3",
                params,
            )
            for cell, collection, key, blob, feed_id in rows:
                states[(cell, collection, key)] = RecordState.from_bytes(blob)
                if feed_id is not None and feed_ids is not None:
                    feed_ids[(cell, collection, key)] = feed_id
        return states

    @staticmethod
    def _evicted_among(conn: sqlite3.Connection, keys: Iterable[RecordKey]) -> set[RecordKey]:
        """Which of ``keys`` were evicted (one cheap probe when nothing is)."""
        if conn.execute("SELECT 1 FROM evicted LIMIT 1").fetchone() is None:
            return set()
        return _keys_in(conn, "evicted", keys)

    @staticmethod
    def _write_records(
        conn: sqlite3.Connection,
        touched: Mapping[RecordKey, RecordState],
        now_ms: int,
        *,
        from_hub: bool,
    ) -> None:
        """Upsert ``touched``. ``from_hub``: the states came from the hub (a pull), which
        therefore holds them (``synced_at_ms``); a local write clears that mark."""
        synced = now_ms if from_hub else None
        rows = []
        for rk, state in touched.items():
            rows.append((*_record_row(rk, state, now_ms), synced))
        conn.executemany(
            "INSERT INTO records (cell, collection, key, doc, state, hlc, deleted, updated_at_ms, "
            "synced_at_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (cell, collection, key) DO UPDATE SET doc = excluded.doc, "
            "state = excluded.state, hlc = excluded.hlc, deleted = excluded.deleted, "
            "updated_at_ms = excluded.updated_at_ms, synced_at_ms = excluded.synced_at_ms",
            rows,
        )

    def _sync_clock(self, conn: sqlite3.Connection) -> tuple[dict[int, int], dict[int, int]]:
        """Inside the write lock: fold the persisted high-water mark (another process may
        have advanced it) into our clock; return each lane's next seq and first seq."""
        next_seq: dict[int, int] = {}
        first_seq: dict[int, int] = {}
        for lane, seq, first, high_water in conn.execute(
            "SELECT lane, next_seq, first_seq, (SELECT value FROM meta WHERE key = 'hlc') "
            "FROM lanes"
        ):
            next_seq[lane] = seq
            first_seq[lane] = first
            if high_water is not None:
                self.clock.observe_local(int(high_water))
        return next_seq, first_seq

    def _save_clock(self, conn: sqlite3.Connection) -> None:
        conn.execute(
            "INSERT INTO meta (key, value) VALUES ('hlc', ?) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (str(self.clock.last),),
        )

    def _write_tx(self, conn: sqlite3.Connection, group: Sequence[_Write]) -> list[int]:
        """The body of one group commit."""
        next_seq, _ = self._sync_clock(conn)
        issued = dict(next_seq)
        states = self._load_states(conn, {(w.cell, w.collection, w.key) for w in group})
        now_ms = _now_ms()
        touched: dict[RecordKey, RecordState] = {}
        outbox_rows = []
        stamps = []
        for w in group:
            rk = (w.cell, w.collection, w.key)
            state = states.get(rk)
            hlc = self.clock.now()
            base: dict[str, BaseStamp] = {}
            if state is not None:
                names = state.document().keys() if w.fields is None else w.fields.keys()
                base = dict(_seen(state, names))
            lane = self._lane_of(w.cell)
            seq = next_seq[lane]
            next_seq[lane] = seq + 1
            change = Change(
                cell=w.cell,
                collection=w.collection,
                key=w.key,
                hlc=hlc,
                node=self.node_id,
                fields=w.fields,
                base=base,
                lane=lane,
                seq=seq,
            )
            state = apply_change(state, change, self.resolver_for(w.collection)).state
            states[rk] = touched[rk] = state
            outbox_rows.append(
                (lane, seq, w.cell, w.collection, w.key, hlc, encode_payload(change), now_ms)
            )
            stamps.append(hlc)
        self._write_records(conn, touched, now_ms, from_hub=False)
        crashpoints.crashpoint("edge.groupcommit.mid")
        conn.executemany(
            "INSERT INTO outbox (lane, seq, cell, collection, key, hlc, payload, created_at_ms) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            outbox_rows,
        )
        conn.executemany(
            "UPDATE lanes SET next_seq = ? WHERE lane = ?",
            [(seq, lane) for lane, seq in next_seq.items() if seq != issued[lane]],
        )
        self._save_clock(conn)
        crashpoints.crashpoint("edge.put.before_commit")
        return stamps

    # -- changes from the hub -----------------------------------------------------------------

    async def _run_on_thread(self, body: Callable[..., T], *args: Any) -> T:
        """Run ``body(conn, *args)`` in one transaction on the write connection's thread,
        serialized with local writes."""
        if self._closed:
            raise StorageError("the store is closed", code="store_closed")
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()

        async def job() -> T:
            return await db.run_transaction(self._writer, self.path, body, *args)

        self._queue.put_nowait(_Job(job, future, in_transaction=False))
        return await future

    async def apply_remote(
        self,
        changes: Sequence[Change],
        *,
        cursor: int,
        cursor_name: str = "pull",
        ids: Sequence[int] | None = None,
    ) -> int:
        """Merge a page of changes pulled from the hub and move the named pull cursor to
        ``cursor``, in one transaction. Returns how many changes were applied.

        A page whose cursor is behind the stored one (a stale or repeated page) changes
        nothing. Skipped: this node's own changes (applied when written), changes of
        evicted records (the hub holds them; a read fetches the whole record back) and,
        given the feed ``ids`` of the changes, those a snapshot already folded into a
        record (at or below its ``hub_feed_id``).
        """
        if ids is not None and len(ids) != len(changes):
            raise ValueError(f"{len(ids)} feed ids for {len(changes)} changes")
        return await self._run_on_thread(self._apply_tx, changes, ids, cursor_name, cursor)

    def _apply_tx(
        self,
        conn: sqlite3.Connection,
        changes: Sequence[Change],
        ids: Sequence[int] | None,
        cursor_name: str,
        cursor: int,
    ) -> int:
        """The body of applying one pulled page (on the write connection's thread)."""
        row = conn.execute("SELECT value FROM cursors WHERE name = ?", (cursor_name,)).fetchone()
        if row is not None and row[0] >= cursor:
            return 0
        _, first_seq = self._sync_clock(conn)
        theirs = [
            (c, ids[i] if ids is not None else None)
            for i, c in enumerate(changes)
            if not self._is_own(c, first_seq)
        ]
        keys = {(c.cell, c.collection, c.key) for c, _ in theirs}
        feed_ids: dict[RecordKey, int] = {}
        states = self._load_states(conn, keys, feed_ids)
        evicted = self._evicted_among(conn, keys)
        touched: dict[RecordKey, RecordState] = {}
        applied = 0
        for c, feed_id in theirs:
            rk = (c.cell, c.collection, c.key)
            if rk in evicted or (feed_id is not None and feed_id <= feed_ids.get(rk, -1)):
                continue
            state = apply_change(states.get(rk), c, self.resolver_for(c.collection)).state
            states[rk] = touched[rk] = state
            applied += 1
            self._observe(c.hlc)
        self._write_records(conn, touched, _now_ms(), from_hub=True)
        conn.execute(
            "INSERT INTO cursors (name, value) VALUES (?, ?) "
            "ON CONFLICT (name) DO UPDATE SET value = excluded.value",
            (cursor_name, cursor),
        )
        self._save_clock(conn)
        crashpoints.crashpoint("pull.after_apply_before_commit")
        return applied

    def _is_own(self, change: Change, first_seq: Mapping[int, int]) -> bool:
        # Own changes issued by this file are already applied; ones from before it (a rebuilt
        # store) are not, and must be, or a counter would lose them.
        return change.node == self.node_id and change.seq >= first_seq.get(change.lane, 1)

    def _observe_all(self, hlcs: Sequence[int]) -> None:
        """Fold many remote stamps: the newest, or each one when it is refused as drifted."""
        if not hlcs:
            return
        try:
            self.clock.observe(max(hlcs))
        except ClockDriftError:
            for hlc in hlcs:
                self._observe(hlc)

    def _observe(self, hlc: int) -> None:
        try:
            self.clock.observe(hlc)
        except ClockDriftError as exc:
            # Never fold a far-future stamp into our clock; the data itself is still applied.
            if not self._drift_warned:
                log.warning("not folding a remote stamp into the clock: %s", exc.message)
                self._drift_warned = True

    async def cursor(self, name: str = "pull") -> int:
        """The stored pull cursor (0 before the first pull)."""
        rows = await self._read("SELECT value FROM cursors WHERE name = ?", (name,))
        return int(rows[0][0]) if rows else 0

    # -- records from the hub's snapshot: bootstrap and read-back ------------------------------

    async def adopt(
        self,
        records: Sequence[HubRecord],
        acked: Sequence[int],
        *,
        bootstrap: Mapping[str, Any] | None = None,
        absent: Sequence[RecordKey] = (),
    ) -> int:
        """Take the hub's state of ``records`` — ``(cell, collection, key, state, feed_id)``
        from a snapshot page or a read-back — in one transaction; return how many.

        Each record becomes the hub's state with this node's queued changes the hub does not
        hold yet (seq above ``acked[lane]``, read by the hub with the records) applied on
        top: nothing queued is lost, nothing the hub holds is counted twice. Its
        ``hub_feed_id`` makes later pulls skip the feed entries already folded in, and an
        evicted record is local again.

        When the hub already holds more seqs of a lane than this store ever issued (the
        store was lost and this file is new), the lane's queued changes are renumbered
        after the hub's: the hub would otherwise take them for replays and drop them.

        ``bootstrap`` is saved as the bootstrap's progress in the same transaction, so an
        interrupted bootstrap resumes after the last page it kept. ``absent`` names records
        asked for (a read-back): those the hub does not hold become their queued changes
        alone (or nothing), and all of them are local again, evicted or not.
        """
        if len(acked) != len(Tier):
            raise ValueError(f"acked needs one seq per lane, got {len(acked)}")
        progress = None if bootstrap is None else json.dumps(dict(bootstrap))
        return await self._run_on_thread(
            functools.partial(self._adopt_tx, absent=absent),
            records,
            list(acked),
            progress,
        )

    def _adopt_tx(
        self,
        conn: sqlite3.Connection,
        records: Sequence[HubRecord],
        acked: list[int],
        progress: str | None,
        *,
        absent: Sequence[RecordKey] = (),
    ) -> int:
        self._follow_hub_seqs(conn, acked)
        keys = [(cell, coll, key) for cell, coll, key, _, _ in records]
        empty = [rk for rk in absent if rk not in set(keys)]
        queued: dict[RecordKey, list[Change]] = {}
        for lane, seq, cell, coll, key, hlc, payload in _rows_for_keys(
            conn,
            "SELECT o.lane, o.seq, o.cell, o.collection, o.key, o.hlc, o.payload FROM outbox AS o",
            "o",
            [*keys, *empty],
        ):
            if seq > acked[lane]:
                queued.setdefault((cell, coll, key), []).append(
                    queued_change(self.node_id, lane, (seq, cell, coll, key, hlc, payload))
                )
        now_ms = _now_ms()
        rows = []
        hub_hlcs = []
        for (_, coll, _, blob, feed_id), rk in zip(records, keys, strict=True):
            mine = queued.get(rk)
            if mine:
                state = RecordState.from_bytes(blob)
                hub_hlcs.append(state.max_hlc)
                resolver = self.resolver_for(coll)
                for change in mine:
                    state = apply_change(state, change, resolver).state
                rows.append((*_record_row(rk, state, now_ms), feed_id, now_ms))
            else:
                # The hub's own bytes (canonical: it wrote them with to_bytes), as they are,
                # and only what the row needs read from them: decoding the whole state and
                # encoding it again would give the same bytes, at most of the cost of a
                # bootstrap.
                doc, newest = RecordState.view(blob)
                hub_hlcs.append(newest)
                rows.append((*_row_of(rk, doc, blob, newest, now_ms), feed_id, now_ms))
        self._observe_all(hub_hlcs)
        for rk in empty:
            none: RecordState | None = None
            for change in queued.get(rk, ()):
                none = apply_change(none, change, self.resolver_for(rk[1])).state
            if none is None:
                conn.execute(
                    "DELETE FROM records WHERE cell = ? AND collection = ? AND key = ?", rk
                )
            else:
                rows.append((*_record_row(rk, none, now_ms), None, None))
        conn.executemany(
            "INSERT INTO records (cell, collection, key, doc, state, hlc, deleted, updated_at_ms, "
            "hub_feed_id, synced_at_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (cell, collection, key) DO UPDATE SET doc = excluded.doc, "
            "state = excluded.state, hlc = excluded.hlc, deleted = excluded.deleted, "
            "updated_at_ms = excluded.updated_at_ms, hub_feed_id = excluded.hub_feed_id, "
            "synced_at_ms = excluded.synced_at_ms",
            rows,
        )
        if conn.execute("SELECT 1 FROM evicted LIMIT 1").fetchone() is not None:
            conn.executemany(
                "DELETE FROM evicted WHERE cell = ? AND collection = ? AND key = ?",
                [*keys, *empty],
            )
        if progress is not None:
            _set_meta(conn, "bootstrap", progress)
        self._save_clock(conn)
        crashpoints.crashpoint("bootstrap.after_page_before_commit")
        return len(rows)

    async def follow_hub_seqs(self, acked: Sequence[int]) -> None:
        """Check this file's seqs against ``acked``, the highest seq of each lane the hub
        holds from this node, before anything is pushed; see :meth:`_follow_hub_seqs`."""
        if len(acked) != len(Tier):
            raise ValueError(f"acked needs one seq per lane, got {len(acked)}")
        await self._run_on_thread(self._follow_hub_seqs, list(acked))

    def _follow_hub_seqs(self, conn: sqlite3.Connection, acked: Sequence[int]) -> None:
        """Line this file's seqs up with ``acked``, the hub's highest seq of each lane from
        this node, before anything is pushed or pulled.

        - A new file of a node whose store was lost (it never had an acknowledgement of the
          lane) renumbers its queued changes after the hub's: the hub would otherwise take
          them for replays and drop them.
        - A restored backup (see :func:`~syncengine.edge.backup.restore_backup`) drops
          the queued changes the hub holds from the store it replaced and renumbers the
          ones written since the restore after the hub's. (What the replaced store wrote
          after the backup comes back through the bootstrap the restore asked for.)
        - Any other file behind the hub is an older copy put back by hand: which of its
          queued changes the hub holds cannot be told, so nothing is guessed and
          :class:`SequenceError` (``store_behind_hub``) is raised.
        """
        restored = {
            int(k): v for k, v in json.loads(_get_meta(conn, RESTORED_META) or "{}").items()
        }
        for lane, next_seq, acked_seq in list(
            conn.execute("SELECT lane, next_seq, acked_seq FROM lanes")
        ):
            hub = acked[lane]
            mark = restored.get(lane)
            if mark is not None:
                if hub >= mark:
                    # Seqs below the mark are the replaced store's own, held by the hub up
                    # to its ack; the rest were written after the restore.
                    conn.execute("DELETE FROM outbox WHERE lane = ? AND seq < ?", (lane, mark))
                    shift = hub + 1 - mark
                    _shift_seqs(conn, lane, shift, from_seq=mark)
                    conn.execute(
                        "UPDATE lanes SET next_seq = next_seq + ?, acked_seq = ? WHERE lane = ?",
                        (shift, hub, lane),
                    )
                    log.warning(
                        "node %s lane %s: restored from a backup; the hub holds seqs up to %d "
                        "from the store it replaced: %d changes written since the restore "
                        "follow them",
                        self.node_id,
                        Tier.from_priority(lane),
                        hub,
                        next_seq - mark,
                    )
                elif hub > acked_seq:
                    conn.execute("DELETE FROM outbox WHERE lane = ? AND seq <= ?", (lane, hub))
                    conn.execute("UPDATE lanes SET acked_seq = ? WHERE lane = ?", (hub, lane))
                continue
            if next_seq - 1 >= hub:
                continue
            if acked_seq > 0:
                raise SequenceError(
                    f"lane {Tier.from_priority(lane)}: the hub holds seqs up to {hub} from node "
                    f"{self.node_id}, but this file issued only up to {next_seq - 1}: it is an "
                    "older copy of the node's store (restored from a backup by hand?)",
                    hint="Put a backup back with `syncengine edge restore`, which lines it up "
                    "with the hub; or stop the daemon and move this file aside (a new file is "
                    "bootstrapped from the hub).",
                    code="store_behind_hub",
                    detail={"lane": lane, "hub_acked": hub, "issued": next_seq - 1},
                )
            shift = hub - acked_seq
            _shift_seqs(conn, lane, shift)
            conn.execute(
                "UPDATE lanes SET next_seq = next_seq + ?, acked_seq = ?, first_seq = ? "
                "WHERE lane = ?",
                (shift, hub, hub + 1, lane),
            )
            log.warning(
                "node %s lane %s: the hub already holds seqs up to %d from an earlier store of "
                "this node; %d queued changes of this file follow them",
                self.node_id,
                Tier.from_priority(lane),
                hub,
                next_seq - 1 - acked_seq,
            )
        if restored:
            conn.execute("DELETE FROM meta WHERE key = ?", (RESTORED_META,))

    async def needs_bootstrap(self, subscriptions: Iterable[str]) -> bool:
        """Whether some subscribed prefix was never fetched through the snapshot (a new
        store, a newly added subscription) or a bootstrap was interrupted."""
        meta = await self._meta("bootstrap", "bootstrapped")
        if meta.get("bootstrap") is not None:
            return True
        done = json.loads(meta.get("bootstrapped") or "[]")
        return any(not covers_any(done, p) for p in subscriptions)

    async def bootstrap_progress(self) -> dict[str, Any] | None:
        """The saved progress of an unfinished bootstrap (see :meth:`adopt`), or None."""
        raw = (await self._meta("bootstrap")).get("bootstrap")
        return None if raw is None else dict(json.loads(raw))

    async def bootstrapped(self) -> list[str]:
        """The prefixes fetched through the snapshot so far."""
        return list(json.loads((await self._meta("bootstrapped")).get("bootstrapped") or "[]"))

    async def start_bootstrap(self, progress: Mapping[str, Any]) -> None:
        """Mark a bootstrap as begun (pulls wait until it is finished)."""

        def body(conn: sqlite3.Connection) -> None:
            _set_meta(conn, "bootstrap", json.dumps(dict(progress)))

        await self._run_on_thread(body)

    async def request_rebootstrap(self) -> None:
        """Ask for a bootstrap of every subscription, whose end moves the pull cursors up to
        the snapshot's (see :meth:`finish_bootstrap`): what an edge does when the hub's feed
        no longer reaches back to its cursors. Pulls wait until it is done."""

        def body(conn: sqlite3.Connection) -> None:
            progress: dict[str, Any] = {
                "done": [],
                "prefix": None,
                "after": None,
                "cursor": None,
                "records": 0,
            }
            _set_meta(conn, "bootstrap", json.dumps({**progress, "rebase": True}))
            conn.execute("DELETE FROM meta WHERE key = 'bootstrapped'")

        await self._run_on_thread(body)

    async def finish_bootstrap(
        self, prefixes: Iterable[str], cursor: int | None, *, rebase: bool = False
    ) -> None:
        """Record ``prefixes`` as bootstrapped and place the pull cursors.

        A tier never pulled gets ``cursor`` (the feed head when the snapshot began): the
        snapshot holds everything before it. A tier already pulled keeps its cursor, which
        is at or behind it (pulls wait for a bootstrap), so the older subscriptions miss
        nothing; the new prefix's entries in between are skipped record by record through
        ``hub_feed_id``. With ``rebase`` (the snapshot covered every subscription) every
        cursor moves up to ``cursor``.
        """
        wanted = list(prefixes)
        on_conflict = "UPDATE SET value = max(value, excluded.value)" if rebase else "NOTHING"

        def body(conn: sqlite3.Connection) -> None:
            row = conn.execute("SELECT value FROM meta WHERE key = 'bootstrapped'").fetchone()
            done = json.loads(row[0]) if row is not None else []
            done = sorted({*done, *wanted})
            _set_meta(conn, "bootstrapped", json.dumps(done))
            conn.execute("DELETE FROM meta WHERE key = 'bootstrap'")
            if cursor is not None:
                conn.executemany(
                    "INSERT INTO cursors (name, value) VALUES (?, ?) "
                    f"ON CONFLICT (name) DO {on_conflict}",
                    [(f"pull:{t.value}", cursor) for t in Tier],
                )

        await self._run_on_thread(body)

    # -- archive eviction ---------------------------------------------------------------------

    async def evict(
        self,
        *,
        now_ms: int | None = None,
        policies: Mapping[Tier, TierPolicy],
        chunk: int = 2000,
    ) -> int:
        """Drop the local copies of records of ``evict``-retention tiers that the hub has
        held for the tier's ``evict_after_s``; return how many were dropped.

        A record with a change still queued is never evicted. An evicted record is listed
        in ``evicted``: reading it raises :class:`NotAvailableOffline` here (a
        :class:`~syncengine.edge.sync.Syncer` fetches it back), pulls leave it alone, and a
        read-back or a snapshot makes it local again. Works in chunks of ``chunk`` records,
        each its own short transaction, so writers are never held up for long.
        """
        now = _now_ms() if now_ms is None else now_ms
        cutoffs = {
            tier: now - (p.evict_after_s or 0) * 1000
            for tier, p in policies.items()
            if p.retention is Retention.EVICT
        }
        if not cutoffs:
            return 0
        rules = self.tier_rules
        if rules.default in cutoffs:
            prefixes = [""]
        else:
            prefixes = [r.prefix for r in rules if r.tier in cutoffs]
        latest = max(cutoffs.values())
        total = 0
        whole = "(cell, collection, key) > (?2, ?3, ?4)"
        ranges = [(p, where) for p in prefixes for where in (_UNDER_PREFIX if p else (whole,))]
        for prefix, where in ranges:
            after: RecordKey = ("", "", "")
            while True:
                rows = await self._read(
                    "SELECT cell, collection, key, synced_at_ms FROM records "
                    f"WHERE {where} ORDER BY cell, collection, key LIMIT ?5",
                    (prefix, *after, chunk),
                )
                if not rows:
                    break
                after = (rows[-1][0], rows[-1][1], rows[-1][2])
                due = [
                    (cell, coll, key)
                    for cell, coll, key, synced in rows
                    if synced is not None
                    and synced <= latest
                    and synced <= cutoffs.get(rules.tier_for(cell), -1)
                ]
                if due:
                    total += await self._run_on_thread(self._evict_tx, due, cutoffs, now)
                if len(rows) < chunk:
                    break
        return total

    def _evict_tx(
        self,
        conn: sqlite3.Connection,
        due: Sequence[RecordKey],
        cutoffs: Mapping[Tier, int],
        now_ms: int,
    ) -> int:
        queued = {
            tuple(r)
            for r in _rows_for_keys(
                conn, "SELECT o.cell, o.collection, o.key FROM outbox AS o", "o", due
            )
        }
        gone = []
        for rk in due:
            if rk in queued:
                continue
            # Read again under the write lock: a write since the scan clears synced_at_ms.
            row = conn.execute(
                "SELECT synced_at_ms FROM records WHERE cell = ? AND collection = ? AND key = ?",
                rk,
            ).fetchone()
            tier = self.tier_rules.tier_for(rk[0])
            if row is None or row[0] is None or row[0] > cutoffs.get(tier, -1):
                continue
            gone.append(rk)
        conn.executemany(
            "INSERT INTO evicted (cell, collection, key, evicted_at_ms) VALUES (?, ?, ?, ?) "
            "ON CONFLICT DO UPDATE SET evicted_at_ms = excluded.evicted_at_ms",
            [(*rk, now_ms) for rk in gone],
        )
        conn.executemany("DELETE FROM records WHERE cell = ? AND collection = ? AND key = ?", gone)
        return len(gone)

    async def is_evicted(self, cell: str, collection: str, key: str) -> bool:
        rows = await self._read(
            "SELECT 1 FROM evicted WHERE cell = ? AND collection = ? AND key = ?",
            (cell, collection, key),
        )
        return bool(rows)

    async def note_step(
        self,
        step: str,
        tier: Tier,
        *,
        error: SyncError | None = None,
        hub_head: int | None = None,
        at_ms: int | None = None,
    ) -> None:
        """Record the outcome of a push or pull of ``tier`` for ``syncengine status``."""
        at = _now_ms() if at_ms is None else at_ms

        def body(conn: sqlite3.Connection) -> None:
            if error is None:
                conn.execute(
                    "INSERT INTO sync_steps (step, tier, last_ok_ms, hub_head) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT (step, tier) DO UPDATE SET last_ok_ms = excluded.last_ok_ms, "
                    "hub_head = coalesce(excluded.hub_head, hub_head)",
                    (step, tier.value, at, hub_head),
                )
            else:
                conn.execute(
                    "INSERT INTO sync_steps (step, tier, last_error_ms, last_error_code, "
                    "last_error) VALUES (?, ?, ?, ?, ?) ON CONFLICT (step, tier) DO UPDATE SET "
                    "last_error_ms = excluded.last_error_ms, "
                    "last_error_code = excluded.last_error_code, last_error = excluded.last_error",
                    (step, tier.value, at, error.code, error.message[:1000]),
                )

        await self._run_on_thread(body)

    async def sync_steps(self) -> dict[tuple[str, Tier], StepRecord]:
        """The recorded outcome of each step (see :meth:`note_step`)."""
        rows = await self._read(
            "SELECT step, tier, last_ok_ms, last_error_ms, last_error_code, last_error, hub_head "
            "FROM sync_steps"
        )
        return {
            (step, Tier(tier)): StepRecord(ok_ms, err_ms, code, message, head)
            for step, tier, ok_ms, err_ms, code, message, head in rows
            if tier in _TIER_VALUES
        }

    async def save_learnt_rules(
        self, tier_rules: TierRules, resolvers: Mapping[str, str] | None = None
    ) -> None:
        """Keep the tier rules (and resolvers) learnt from the hub for offline use."""

        async def body(conn: aiosqlite.Connection) -> None:
            await conn.execute(
                "INSERT INTO meta (key, value) VALUES ('tier_rules', ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (json.dumps(tier_rules.to_wire()),),
            )
            if resolvers is not None:
                await conn.execute(
                    "INSERT INTO meta (key, value) VALUES ('resolvers', ?) "
                    "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    (json.dumps(dict(resolvers)),),
                )

        await self.run_exclusive(body)
        self.tier_rules = tier_rules
        self._lanes = {}
        if resolvers is not None:
            self.resolvers = dict(resolvers)

    # -- reads --------------------------------------------------------------------------------

    async def _meta(self, *keys: str) -> dict[str, str]:
        marks = ",".join("?" for _ in keys)
        rows = await self._read(f"SELECT key, value FROM meta WHERE key IN ({marks})", keys)
        return {k: v for k, v in rows}

    async def _read(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        try:
            return list(await self._reader.execute_fetchall(sql, params))
        except sqlite3.Error as exc:
            raise db.translate(exc, self.path) from None

    async def get(self, cell: str, collection: str, key: str) -> dict[str, Any] | None:
        """The record's document, or None when it does not exist or is deleted."""
        self._validate_target(cell, collection, key)
        rows = await self._read(
            "SELECT (SELECT doc FROM records WHERE cell = ?1 AND collection = ?2 AND key = ?3), "
            "EXISTS (SELECT 1 FROM evicted WHERE cell = ?1 AND collection = ?2 AND key = ?3)",
            (cell, collection, key),
        )
        doc_json, evicted = rows[0]
        if evicted:
            raise NotAvailableOffline(
                f"record {cell} {collection}/{key} was evicted locally (its tier keeps only "
                "recent copies); the hub holds it",
                hint="Read it through the daemon or `syncengine edge get`, which fetch it back "
                "from the hub when it is reachable.",
                detail={"cell": cell, "collection": collection, "key": key},
            )
        if doc_json is None:
            return None
        doc: dict[str, Any] = json.loads(doc_json)
        return doc

    async def get_state(self, cell: str, collection: str, key: str) -> RecordState | None:
        """The record's full merge state (values, stamps, tombstone), or None."""
        rows = await self._read(
            "SELECT state FROM records WHERE cell = ? AND collection = ? AND key = ?",
            (cell, collection, key),
        )
        return RecordState.from_bytes(rows[0][0]) if rows else None

    async def scan(
        self, cell: str, collection: str, *, page: int = 500
    ) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """Yield ``(key, document)`` for the live records of one cell and collection, by key.

        Reads in pages (keyset pagination) so a large collection is never held in memory.
        """
        parse_cell(cell)
        validate_collection(collection)
        after = ""
        while True:
            rows = await self._read(
                "SELECT key, doc FROM records WHERE cell = ? AND collection = ? AND key > ? "
                "AND deleted = 0 ORDER BY key LIMIT ?",
                (cell, collection, after, page),
            )
            for key, doc in rows:
                yield key, json.loads(doc)
            if len(rows) < page:
                return
            after = rows[-1][0]

    async def integrity_check(self) -> str:
        """``PRAGMA integrity_check``: ``"ok"`` or SQLite's description of the damage."""
        rows = await self._read("PRAGMA integrity_check")
        return "; ".join(str(r[0]) for r in rows)


def _record_row(rk: RecordKey, state: RecordState, now_ms: int) -> tuple[Any, ...]:
    """The leading columns of a ``records`` row: cell, collection, key, doc, state, hlc,
    deleted, updated_at_ms."""
    return _row_of(rk, state.document(), state.to_bytes(), state.max_hlc, now_ms)


def _row_of(
    rk: RecordKey, doc: dict[str, Any], encoded: bytes, hlc: int, now_ms: int
) -> tuple[Any, ...]:
    """:func:`_record_row` from the state's document, bytes and newest stamp."""
    return (*rk, document_json(doc) if doc else None, encoded, hlc, 0 if doc else 1, now_ms)


def _shift_seqs(conn: sqlite3.Connection, lane: int, shift: int, *, from_seq: int = 1) -> None:
    """Add ``shift`` to the seqs from ``from_seq`` up of ``lane``'s queued and dead-lettered
    changes."""
    # Two steps through a range no seq uses: a one-step shift could collide with a row not
    # yet moved (SQLite checks the primary key row by row).
    far = 1 << 50
    for table in ("outbox", "dead_letters"):
        conn.execute(
            f"UPDATE {table} SET seq = seq + ? WHERE lane = ? AND seq >= ?", (far, lane, from_seq)
        )
        conn.execute(
            f"UPDATE {table} SET seq = seq - ? WHERE lane = ? AND seq >= ?",
            (far - shift, lane, far),
        )


def _get_meta(conn: sqlite3.Connection, key: str) -> str | None:
    row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    return None if row is None else str(row[0])


def _set_meta(conn: sqlite3.Connection, key: str, value: str) -> None:
    conn.execute(
        "INSERT INTO meta (key, value) VALUES (?, ?) "
        "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        (key, value),
    )


def _rows_for_keys(
    conn: sqlite3.Connection, select: str, alias: str, keys: Iterable[RecordKey]
) -> Iterable[Any]:
    """``select`` (from a table aliased ``alias`` with cell, collection, key columns)
    restricted to ``keys``, by a join on a VALUES list in chunks."""
    wanted = list(keys)
    for i in range(0, len(wanted), _KEYS_PER_QUERY):
        chunk = wanted[i : i + _KEYS_PER_QUERY]
        marks = ",".join("(?,?,?)" for _ in chunk)
        yield from conn.execute(
            f"{select} JOIN (VALUES {marks}) AS k ON {alias}.cell = k.column1 "
            f"AND {alias}.collection = k.column2 AND {alias}.key = k.column3",
            [v for k in chunk for v in k],
        )


def _keys_in(conn: sqlite3.Connection, table: str, keys: Iterable[RecordKey]) -> set[RecordKey]:
    return {
        (cell, coll, key)
        for cell, coll, key in _rows_for_keys(
            conn, f"SELECT t.cell, t.collection, t.key FROM {table} AS t", "t", keys
        )
    }


def _seen(state: RecordState, names: Iterable[str]) -> Iterable[tuple[str, BaseStamp]]:
    """The stamp of the visible version of each named field: what a writer now replaces."""
    for name in names:
        entry = state.hub.get(name) or state.fields.get(name)
        if entry is not None and (state.tomb is None or (entry[1], entry[2]) > state.tomb):
            yield name, (entry[1], entry[2])


async def _check_integrity(conn: aiosqlite.Connection, path: Path) -> None:
    try:
        rows = await conn.execute_fetchall("PRAGMA quick_check")
    except sqlite3.DatabaseError as exc:
        raise CorruptStoreError(
            f"{path} is not a readable SQLite database: {exc}",
            detail={"path": str(path)},
        ) from None
    result = "; ".join(str(r[0]) for r in rows)
    if result != "ok":
        raise CorruptStoreError(
            f"{path} failed its integrity check: {result[:500]}",
            detail={"path": str(path), "quick_check": result[:2000]},
        )


async def _claim_identity(
    conn: aiosqlite.Connection, path: Path, *, node_id: str, region: str
) -> dict[str, str]:
    """Record which node owns the file, or refuse to open another node's file."""

    async def body() -> dict[str, str]:
        meta: dict[str, str] = {
            k: v for k, v in await conn.execute_fetchall("SELECT key, value FROM meta")
        }
        for key, want in (("node_id", node_id), ("region", region)):
            have = meta.get(key)
            if have is None:
                await conn.execute("INSERT INTO meta (key, value) VALUES (?, ?)", (key, want))
                meta[key] = want
            elif have != want:
                raise ConfigError(
                    f"{path} belongs to {key} {have!r}, not {want!r}",
                    hint="Point `db` at this node's own file; one store serves one node.",
                    code="store_identity",
                )
        return meta

    return await db.transaction(conn, path, body)


class _Opening:
    """What :meth:`EdgeStore.open` returns: awaitable, or usable with ``async with``."""

    __slots__ = ("_coro", "_store")

    def __init__(self, coro: Awaitable[EdgeStore]) -> None:
        self._coro = coro
        self._store: EdgeStore | None = None

    def __await__(self) -> Generator[Any, None, EdgeStore]:
        return self._coro.__await__()

    async def __aenter__(self) -> EdgeStore:
        self._store = await self._coro
        return self._store

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._store is not None:
            await self._store.close()
