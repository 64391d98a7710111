"""Applying pushed batches: exactly once, several to one PostgreSQL transaction.

Batches are applied under the region's feed-append lock (a transaction-level advisory
lock). That lock is what makes the change feed gap-free: feed ids are taken from
``feed_head`` while holding it, so ids are contiguous and in commit order, and a puller's
cursor can never pass an id that commits later. It also serializes concurrent pushes of
one node lane, so the dedup check (``node_lanes.acked_seq``) and the apply cannot race.

The cost is that pushes to one region apply one transaction at a time. So a hub process
applies them in groups (:class:`Applier`, group commit): whatever queued while one group
committed goes in the next, one lock acquisition, one commit and a handful of set-based
statements (``unnest`` arrays and COPY, never one statement per change) for all of it.
All decoding and validation happens before, outside the lock, and so does whatever does
not depend on the hub's state (:meth:`Applier.prepare`: the feed rows, and for a large
batch the first version of the records it most likely creates); caching a large committed
group and waking its readers (``after_commit``) happens beside the next group. The lock is
held for the database work and the merge alone. ``benchmarks/backlog.py`` measures one
edge's drain beside raw COPY; ``benchmarks/hub_pushes.py`` many edges' small pushes.

Dedup: per ``(node, lane)`` the hub keeps the highest seq applied. A batch at or below it
is a replay and answers the same ``acked``; a batch starting beyond it + 1 is a gap (409);
an overlapping batch applies only the seqs above it. Edges pipeline their batches, so a
batch may arrive before the one it follows: it waits a moment for it before being called
a gap. A "replay" whose changes differ from the ones held under the same seqs (by ``hlc``)
is refused (409 ``seq_reused``), never dropped. Each batch of a group is decided on its
own: a refused batch fails alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Final

import asyncpg

from syncengine import crashpoints, steps, tasks
from syncengine.clock import HybridClock, hlc_millis
from syncengine.codec import encode
from syncengine.errors import (
    ClockDriftError,
    ForbiddenError,
    HubUnavailableError,
    SequenceError,
    SyncError,
)
from syncengine.hub.db import STAGING_TABLE, pg_json, translated
from syncengine.hub.nodes import Node, check_writable
from syncengine.merge import (
    DEFAULT_RESOLVER,
    Applied,
    Change,
    Conflict,
    RecordState,
    apply_change,
    validate_fields,
)
from syncengine.protocol import PushAnswer, PushBatch
from syncengine.tiers import TierRules

__all__ = ["FEED_LOCK_KEY", "AppliedBatch", "Applier", "apply_push", "check_batch"]

log = logging.getLogger(__name__)

#: How long a batch that arrived before its predecessor waits for it, and how often it looks.
GAP_WAIT_S: Final = 3.0
GAP_POLL_S: Final = 0.05

#: Advisory lock serializing feed appends of one database ("syncfeed").
FEED_LOCK_KEY: Final = 0x73796E6366656564

RecordKey = tuple[str, str, str]


@dataclass(frozen=True, kw_only=True, slots=True)
class AppliedBatch:
    answer: PushAnswer
    #: Feed ids appended, first..last (empty range when nothing new was applied).
    first_id: int
    last_id: int
    #: Tiers that received feed entries (for long-poll wake-ups).
    tiers: frozenset[int]
    #: The feed rows appended, as the cache keeps them:
    #: ``[id, tier, cell, collection, key, node_id, lane, seq, hlc, fields, base]``.
    feed_rows: list[list[Any]] = field(default_factory=list)
    #: The feed's epoch (names this database's feed in the cache).
    epoch: str = ""


def check_batch(
    node: Node,
    batch: PushBatch,
    *,
    region: str,
    clock: HybridClock,
    resolvers: dict[str, str],
) -> None:
    """Everything that can be decided without the database (identity, clock drift, resolver
    value types). Raises a 4xx :class:`SyncError` naming the offending change's seq. Grants
    are checked by :func:`apply_push`, against the changes not applied yet."""
    if batch.node != node.node_id:
        raise ForbiddenError(
            f"this token belongs to node {node.node_id!r}, but the batch claims {batch.node!r}",
            hint="Each node pushes with its own token.",
            code="node_mismatch",
        )
    wall = clock.wall()
    for c in batch.changes:
        try:
            ahead = hlc_millis(c.hlc) - wall
            if ahead > clock.max_drift_ms:
                raise ClockDriftError(
                    f"change {c.seq} is stamped {ahead / 1000:.0f} s ahead of the hub's clock "
                    f"(allowed {clock.max_drift_ms / 1000:.0f} s)",
                    detail={"ahead_ms": ahead, "max_drift_ms": clock.max_drift_ms},
                )
            resolver = resolvers.get(c.collection, DEFAULT_RESOLVER)
            if c.fields is not None and resolver != DEFAULT_RESOLVER:
                validate_fields(c.fields, resolver=resolver)
        except SyncError as exc:
            exc.detail.setdefault("seq", c.seq)
            exc.detail.setdefault("lane", batch.lane)
            raise


def _check_replayed(node: Node, batch: PushBatch, acked: int, held: dict[int, int]) -> None:
    """Refuse seqs the hub already holds when they carry other changes than the ones it holds.

    ``held`` maps the lane's seqs at or below ``acked`` to the ``hlc`` the hub holds under
    them. A real replay resends the very changes (same ``hlc``). Other changes under held
    seqs come from an older copy of the node's store (a backup put back, then written to) or
    from two stores under one node id; answering them as replays would drop them for good.
    """
    # Seqs whose feed entries are gone (retention) cannot be compared; they pass as replays.
    reused = sorted(
        c.seq for c in batch.changes if c.seq <= acked and held.get(c.seq, c.hlc) != c.hlc
    )
    if reused:
        raise SequenceError(
            f"lane {batch.lane} of node {node.node_id!r}: seqs {reused[0]}..{reused[-1]} "
            f"({len(reused)}) carry other changes than the ones the hub holds under them: "
            "this store is an older copy of the node's (restored from a backup?) or another "
            "store runs under the same node id",
            hint="Stop the edge. Give every store its own node id, or move this file aside "
            "and start a new one (it is bootstrapped from the hub).",
            code="seq_reused",
            detail={"lane": batch.lane, "acked": acked, "seqs": reused[:20]},
        )


class _Gap(Exception):
    def __init__(self, acked: int) -> None:
        self.acked = acked


class _Replay(Exception):
    """The whole batch is held already: answer as the first time, change nothing."""


def _admit(
    node: Node, batch: PushBatch, acked: int, held: dict[int, int], region: str
) -> list[Change]:
    """The changes of ``batch`` to apply, given the lane's ``acked`` seq and the ``hlc``s
    held under the seqs at or below it. Raises :class:`_Replay`, :class:`_Gap`, or the
    :class:`SyncError` refusing the batch (nothing of it is written)."""
    _check_replayed(node, batch, acked, held)
    if batch.last_seq <= acked:
        raise _Replay
    if batch.first_seq > acked + 1:
        raise _Gap(acked)
    todo = [c for c in batch.changes if c.seq > acked]
    # Grants are checked here, on what is not applied yet: a replay of changes applied
    # before the operator narrowed the grants must answer as the first time did, not
    # 403 — or the edge would dead-letter changes the hub already holds.
    checked: set[str] = set()  # a batch touches few cells: check each once
    for c in todo:
        if c.cell in checked:
            continue
        try:
            check_writable(node, region, [c.cell])
        except SyncError as exc:
            exc.detail.update(seq=c.seq, lane=batch.lane)
            raise
        checked.add(c.cell)
    return todo


#: Per node lane, set when a batch of it commits in this process (pipelined batches wait
#: on it for their predecessor).
_advanced: dict[tuple[str, int], asyncio.Event] = {}


async def apply_push(applier: Applier, node: Node, batch: PushBatch) -> AppliedBatch:
    """Apply ``batch`` (already checked with :func:`check_batch`) exactly once.

    A batch that starts past the next seq the hub expects waits up to :data:`GAP_WAIT_S`
    for the batches before it (an edge pipelines its pushes: they may arrive out of
    order), then is refused (409 ``seq_gap``)."""
    if len(batch.changes) < LARGE_FROM:
        ready = steps.run(applier.prepare(node, batch, guess=False))
        return await _apply_ready(applier, node, batch, ready)
    async with applier.prepared(node, batch) as ready:
        return await _apply_ready(applier, node, batch, ready)


async def _apply_ready(
    applier: Applier, node: Node, batch: PushBatch, ready: _Ready
) -> AppliedBatch:
    lane_key = (node.node_id, batch.lane)
    deadline = time.monotonic() + GAP_WAIT_S
    while True:
        advanced = _advanced.setdefault(lane_key, asyncio.Event())
        try:
            applied = await applier.apply(node, batch, ready)
        except _Gap as gap:
            left = deadline - time.monotonic()
            if left <= 0:
                raise SequenceError(
                    f"lane {batch.lane} of node {node.node_id!r}: batch starts at seq "
                    f"{batch.first_seq}, but the hub has applied only up to {gap.acked}",
                    hint="Seqs between were never received; the edge's store may have been "
                    "replaced. See `syncengine edge recover`.",
                    detail={"lane": batch.lane, "acked": gap.acked, "first": batch.first_seq},
                ) from None
            # Woken by a commit of this lane here; polled for one in another hub process.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(left, GAP_POLL_S)):
                    await advanced.wait()
            continue
        if applied.answer.applied:
            _advanced.pop(lane_key, advanced).set()
        return applied


#: A group takes at most this many queued batches, and no more once it holds this many
#: changes (a batch is never split). The group's transaction holds the feed lock, and its
#: merge runs on the event loop in one stretch, so this bounds how long the next group
#: (perhaps a critical push) and every other request of the process wait behind it.
MAX_GROUP_BATCHES: Final = 64
MAX_GROUP_CHANGES: Final = 2_000
#: How long closing the applier waits for the group in flight to commit.
CLOSE_TIMEOUT_S: Final = 10.0


#: A batch of at least this many changes has the first versions of the records it creates
#: worked out before its group takes the feed lock (:meth:`Applier.prepare`), and a group
#: of at least this many is announced beside the next group. Below it there is little to
#: take off the lock, and a guess may be wasted on a record that exists (every one, when
#: edges write the same keys); a small group's pushers are answered without a task and
#: the turn of the event loop it takes.
LARGE_FROM: Final = 100
#: At most this many changes of batches waiting to apply hold a prepared first write (about
#: 1.7 KB each: some 35 MB in all); past it, a batch's records are merged in its group as
#: before. Without the bound, edges draining backlogs at once would hold it each.
GUESS_BUDGET: Final = 20_000
#: :meth:`Applier.prepare` pauses after this many changes (about half a millisecond), so
#: that the applier, whose PostgreSQL step may have finished meanwhile, waits for no long
#: stretch: a group's dozen round trips each paid for a whole slice.
PREPARE_SLICE: Final = 64


@dataclass(frozen=True, slots=True)
class _FirstWrite:
    """What a change makes of a record the hub does not hold yet: the merge's result and
    the record's row values (:func:`_record_values`)."""

    applied: Applied
    values: tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class _Ready:
    """What :meth:`Applier.prepare` worked out for a batch before its group takes the feed
    lock, per change in the batch's order: the feed row after its id, and, for a change
    whose writer saw no earlier version of the record (no ``base``: most likely a new
    record), its :class:`_FirstWrite`. The group uses that when the record is indeed absent,
    and merges as always otherwise; either way the result is the same."""

    feed: list[tuple[Any, ...]]
    first: list[_FirstWrite | None]
    #: The tier priority of each cell the batch writes.
    tiers: dict[str, int]


@dataclass(slots=True)
class _Pending:
    node: Node
    batch: PushBatch
    ready: _Ready
    future: asyncio.Future[AppliedBatch]


class Applier:
    """Applies pushed batches several to a PostgreSQL transaction (group commit).

    Pushes queue here, and one task applies what has queued: one transaction, one feed-lock
    acquisition, one statement of each kind for the whole group. While a group commits the
    next one gathers, so a lone push waits for nothing, and under load each push costs a
    share of one transaction instead of queueing for the lock on its own. Each batch is
    still decided on its own (replay, gap, grants): a refused batch fails alone and the
    rest of its group commits. Groups are filled most important lane first.

    A group that fails for another reason than the database being unavailable (a bug, a
    value PostgreSQL refuses) is applied again batch by batch, so only the batch at fault
    fails. ``after_commit`` runs after each commit, with the batches that wrote feed rows in
    feed order, before their pushers are answered (the hub caches the rows and sends the
    wake-ups). The next group waits for it only if this one is small (under
    :data:`LARGE_FROM` changes) and nothing is still being announced; the next
    ``after_commit`` always waits for this one.
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        region: str,
        clock: HybridClock,
        tier_rules: TierRules,
        resolvers: dict[str, str],
        after_commit: Callable[[list[AppliedBatch]], Awaitable[None]] | None = None,
        on_group: Callable[[int], None] | None = None,
    ) -> None:
        self.pool = pool
        self.region = region
        self.clock = clock
        self.tier_rules = tier_rules
        self.resolvers = resolvers
        self.after_commit = after_commit
        self.on_group = on_group
        self._queue: list[_Pending] = []
        self._current: list[_Pending] = []  # the group being applied
        self._worker: asyncio.Task[None] | None = None
        #: Announcing the last group committed, then answering its pushers.
        self._answering: asyncio.Task[None] | None = None
        #: Changes of prepared batches holding first-write guesses (:data:`GUESS_BUDGET`).
        self._guessing = 0
        self._closed = False

    @contextlib.asynccontextmanager
    async def prepared(self, node: Node, batch: PushBatch) -> AsyncIterator[_Ready]:
        """:meth:`prepare` ``batch`` for as long as it takes to apply it, with first-write
        guesses while fewer than :data:`GUESS_BUDGET` changes hold them."""
        guessed = len(batch.changes) if self._guessing < GUESS_BUDGET else 0
        self._guessing += guessed
        try:
            yield await steps.run_between(self.prepare(node, batch, guess=guessed > 0))
        finally:
            self._guessing -= guessed

    def prepare(self, node: Node, batch: PushBatch, *, guess: bool = True) -> steps.Steps[_Ready]:
        """Work out what does not depend on the hub's state for ``batch``'s changes (their
        feed rows and, with ``guess``, the first version of records they most likely
        create), before its group holds the feed lock: the work overlaps the group in
        flight, whose transaction is what every push of the region waits on. In steps
        (:mod:`syncengine.steps`) of :data:`PREPARE_SLICE` changes."""
        cells = {c.cell for c in batch.changes}
        tiers = {cell: self.tier_rules.tier_for(cell).priority for cell in cells}
        feed: list[tuple[Any, ...]] = []
        first: list[_FirstWrite | None] = []
        for n, c in enumerate(batch.changes, 1):
            feed.append(
                (
                    tiers[c.cell],
                    c.cell,
                    c.collection,
                    c.key,
                    node.node_id,
                    batch.lane,
                    c.seq,
                    c.hlc,
                    None if c.fields is None else encode(c.fields),
                    encode(dict(c.base)) if c.base else None,
                )
            )
            if c.base or not guess:
                first.append(None)
            else:
                applied = apply_change(
                    None,
                    c,
                    self.resolvers.get(c.collection, DEFAULT_RESOLVER),
                    detect_conflicts=True,
                )
                first.append(_FirstWrite(applied, _record_values(applied.state)))
            if n % PREPARE_SLICE == 0:
                yield
        return _Ready(feed, first, tiers)

    async def apply(self, node: Node, batch: PushBatch, ready: _Ready) -> AppliedBatch:
        """Apply ``batch`` (with what :meth:`prepare` made of it) in the next group: one
        attempt (raises :class:`_Gap` for :func:`apply_push` to wait on). A caller cancelled
        once its group began does not stop it: the batch commits or not with the group, and
        a retry is answered as a replay."""
        if self._closed:
            raise HubUnavailableError(
                "the hub is shutting down", hint="Retry against another hub or later."
            )
        future: asyncio.Future[AppliedBatch] = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(node, batch, ready, future))
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._run(), name="push groups")
        return await future

    async def __aenter__(self) -> Applier:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Refuse new batches, let the group in flight commit and be answered (bounded), fail
        the rest."""
        self._closed = True
        await self._finish(self._worker)
        await self._finish(self._answering)  # the worker may have started it meanwhile

    @staticmethod
    async def _finish(task: asyncio.Task[None] | None) -> None:
        if task is None or task.done():
            return
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT_S):
                await asyncio.shield(task)
        except TimeoutError:
            await tasks.stop(task)

    def _take(self) -> list[_Pending]:
        """The next group: waiting batches by lane priority, then arrival."""
        self._queue = [p for p in self._queue if not p.future.done()]  # callers gone
        self._queue.sort(key=lambda p: p.batch.lane)  # stable: arrival order within a lane
        group: list[_Pending] = []
        changes = 0
        for p in self._queue:
            if group and (
                len(group) >= MAX_GROUP_BATCHES
                or changes + len(p.batch.changes) > MAX_GROUP_CHANGES
            ):
                break
            group.append(p)
            changes += len(p.batch.changes)
        del self._queue[: len(group)]
        return group

    async def _run(self) -> None:
        try:
            while self._queue:
                # One connection for as long as there is work: the applier never queues for
                # the pool behind pulls, and a lost connection is replaced by a fresh one.
                try:
                    async with translated("push"):
                        conn = await self.pool.acquire()
                except HubUnavailableError as exc:
                    _fail(self._take(), exc)
                    continue
                try:
                    await self._groups(conn)
                finally:
                    await self.pool.release(conn)
        finally:
            # Cancelled (closing): no caller may wait for an answer that never comes.
            gone = HubUnavailableError(
                "the hub stopped before applying this batch", hint="The edge retries it."
            )
            _fail(self._current + self._queue, gone)
            self._current = []
            self._queue.clear()

    async def _groups(self, conn: asyncpg.Connection) -> None:
        """Apply groups on ``conn`` until the queue is empty or the database is lost."""
        while self._queue:
            group = self._current = self._take()
            if not group:
                continue
            if self.on_group is not None:
                self.on_group(len(group))
            try:
                await self._commit(conn, group)
            except HubUnavailableError as exc:  # the database is away: all fail alike
                _fail(group, exc)
                return  # and the connection may be gone with it
            except Exception as exc:
                if len(group) == 1:
                    _fail(group, exc)
                    continue
                log.warning(
                    "a group of %d push batches failed (%s); applying them one by one",
                    len(group),
                    exc,
                )
                for p in group:
                    try:
                        await self._commit(conn, [p])
                    except Exception as one:
                        _fail([p], one)
        self._current = []

    async def _commit(self, conn: asyncpg.Connection, group: list[_Pending]) -> None:
        outcomes = await self._apply_group(conn, group)
        previous = self._answering
        if previous is None or previous.done():
            previous = None
            if sum(len(p.batch.changes) for p in group) < LARGE_FROM:
                await self._answer(group, outcomes, previous)
                return
        # The next group need not wait for this one's announcement (Redis round trips):
        # that goes on beside it, after the previous group's, and then answers the pushers.
        self._answering = asyncio.create_task(
            self._answer(group, outcomes, previous), name="push answers"
        )

    async def _answer(
        self,
        group: list[_Pending],
        outcomes: list[AppliedBatch | Exception],
        previous: asyncio.Task[None] | None,
    ) -> None:
        """Announce a committed group (after the group before it), then answer its pushers,
        whatever became of the announcement: what they pushed is committed."""
        try:
            if previous is not None:
                await asyncio.wait([previous])
            # In feed order: a lane's batches may have applied in another order than queued,
            # and the cache keeps the group's rows as one run of ascending ids.
            applied = sorted(
                (o for o in outcomes if isinstance(o, AppliedBatch) and o.feed_rows),
                key=lambda o: o.first_id,
            )
            if applied and self.after_commit is not None:
                crashpoints.crashpoint("hub.cache.after_pg_commit_before_redis_set")
                try:
                    await self.after_commit(applied)
                except Exception:
                    log.exception(
                        "announcing feed ids %d..%d failed; pullers read them from PostgreSQL",
                        applied[0].first_id,
                        applied[-1].last_id,
                    )
        finally:
            for p, outcome in zip(group, outcomes, strict=True):
                if p.future.done():
                    continue
                if isinstance(outcome, BaseException):
                    p.future.set_exception(outcome)
                else:
                    p.future.set_result(outcome)

    async def _apply_group(
        self, conn: asyncpg.Connection, group: list[_Pending]
    ) -> list[AppliedBatch | Exception]:
        outcomes: list[AppliedBatch | Exception] = [_NOT_DECIDED] * len(group)
        order = _in_seq_order(group)
        async with translated("push"), conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", FEED_LOCK_KEY)
            lanes = sorted({(p.node.node_id, p.batch.lane) for p in group})
            rows = await conn.fetch(
                "SELECT node_id, lane, acked_seq FROM node_lanes "
                "WHERE (node_id, lane) IN (SELECT * FROM unnest($1::text[], $2::int2[])) "
                "FOR UPDATE",
                *_columns(lanes),
            )
            # A lane the hub never saw has applied nothing; its row is written only when a
            # batch of it applies (a refused batch changes nothing).
            acked_of = dict.fromkeys(lanes, 0)
            acked_of.update(((r["node_id"], r["lane"]), r["acked_seq"]) for r in rows)
            started = dict(acked_of)
            held = await _held_hlcs(conn, group, acked_of)
            work: list[tuple[int, list[Change]]] = []
            for i in order:
                node, batch = group[i].node, group[i].batch
                lane_key = (node.node_id, batch.lane)
                acked = acked_of[lane_key]
                try:
                    todo = _admit(node, batch, acked, held.setdefault(lane_key, {}), self.region)
                except _Replay:
                    outcomes[i] = AppliedBatch(
                        answer=_answer(batch, acked, self.clock, applied=0, conflicts=0),
                        first_id=0,
                        last_id=0,
                        tiers=frozenset(),
                    )
                    continue
                except (_Gap, SyncError) as exc:
                    outcomes[i] = exc
                    continue
                acked_of[lane_key] = batch.last_seq
                held[lane_key].update((c.seq, c.hlc) for c in todo)
                work.append((i, todo))
            epoch, written = await self._write(conn, group, work) if work else ("", {})
            if work:
                # One row per lane: the last seq the group applied of it (none only in a
                # build whose dedup let replays through: the lanes already hold them).
                if advanced := sorted(k for k, a in acked_of.items() if a != started[k]):
                    await conn.execute(
                        "INSERT INTO node_lanes (node_id, lane, acked_seq) "
                        "SELECT * FROM unnest($1::text[], $2::int2[], $3::int8[]) "
                        "ON CONFLICT (node_id, lane) DO UPDATE "
                        "SET acked_seq = excluded.acked_seq, updated_at = now()",
                        *_columns(
                            (node_id, lane, acked_of[node_id, lane]) for node_id, lane in advanced
                        ),
                    )
                await conn.execute(
                    "UPDATE nodes SET last_seen = now() WHERE node_id = ANY($1::text[])",
                    sorted({group[i].node.node_id for i, _ in work}),
                )
            crashpoints.crashpoint("hub.push.before_commit")
        # Committed. Fold the stamps so the hub clock (sent back to edges) never lags them.
        if work:
            # Cannot drift after check_batch, unless the wall clock stepped back meanwhile.
            with contextlib.suppress(ClockDriftError):
                self.clock.observe(max(c.hlc for _, todo in work for c in todo))
        crashpoints.crashpoint("hub.push.after_commit_before_response")
        for i, todo in work:
            batch = group[i].batch
            wrote = written[i]
            outcomes[i] = AppliedBatch(
                answer=_answer(
                    batch, batch.last_seq, self.clock, applied=len(todo), conflicts=wrote.conflicts
                ),
                first_id=wrote.first_id,
                last_id=wrote.last_id,
                tiers=frozenset(row[1] for row in wrote.feed_rows),
                feed_rows=wrote.feed_rows,
                epoch=epoch,
            )
        return outcomes

    async def _write(
        self,
        conn: asyncpg.Connection,
        group: list[_Pending],
        work: list[tuple[int, list[Change]]],
    ) -> tuple[str, dict[int, _Written]]:
        """Merge and write the admitted changes of the group, in ``work``'s order: feed rows
        (contiguous ids), records, cells, conflicts. Returns the feed's epoch and what each
        batch wrote."""
        changes = [c for _, todo in work for c in todo]
        if not changes:  # batches of skipped seqs only (dead letters): no feed rows
            return "", {i: _Written() for i, _ in work}
        states = await _load_states(conn, {(c.cell, c.collection, c.key) for c in changes})
        held = set(states)  # the records the hub has already
        touched: dict[RecordKey, RecordState] = {}
        firsts: dict[RecordKey, _FirstWrite] = {}  # records a prepared first write created
        conflicts: list[Conflict] = []
        conflicts_of: dict[int, int] = {}
        for i, todo in work:
            before = len(conflicts)
            guesses = group[i].ready.first
            for c, first in zip(todo, guesses[len(guesses) - len(todo) :], strict=True):
                rk = (c.cell, c.collection, c.key)
                state = states.get(rk)
                if state is None and first is not None:  # absent, as prepare() guessed
                    result = first.applied
                    firsts[rk] = first
                else:
                    result = apply_change(
                        state,
                        c,
                        self.resolvers.get(c.collection, DEFAULT_RESOLVER),
                        detect_conflicts=True,
                    )
                states[rk] = touched[rk] = result.state
                conflicts.extend(result.conflicts)
            conflicts_of[i] = len(conflicts) - before
        last_id, epoch = await conn.fetchrow(
            "UPDATE feed_head SET id = id + $1 RETURNING id, epoch", len(changes)
        )
        next_id = last_id - len(changes) + 1
        tier_of: dict[str, int] = {}
        written: dict[int, _Written] = {}
        all_rows: list[list[Any]] = []
        record_feed_id: dict[RecordKey, int] = {}
        for i, todo in work:
            ready = group[i].ready
            tier_of.update(ready.tiers)
            rows = []
            for c, feed in zip(todo, ready.feed[len(ready.feed) - len(todo) :], strict=True):
                record_feed_id[(c.cell, c.collection, c.key)] = next_id  # the latest wins
                rows.append([next_id, *feed])
                next_id += 1
            written[i] = _Written(feed_rows=rows, conflicts=conflicts_of[i])
            all_rows.extend(rows)
        await _append_feed(conn, all_rows)
        crashpoints.crashpoint("hub.feed.after_append_before_commit")
        # A record a first write created keeps the row values prepare() made of it, unless
        # a later change of the group merged into it.
        values = {rk: f.values for rk, f in firsts.items() if touched[rk] is f.applied.state}
        await _write_records(conn, touched, record_feed_id, held, values)
        await conn.execute(
            "INSERT INTO cells (cell, tier) SELECT * FROM unnest($1::text[], $2::int2[]) "
            "ON CONFLICT (cell) DO NOTHING",
            list(tier_of),
            list(tier_of.values()),
        )
        if conflicts:
            await _log_conflicts(conn, conflicts)
        return epoch, written


@dataclass(frozen=True, slots=True)
class _Written:
    """What one batch of a group wrote: its feed rows (contiguous ids) and how many values
    its changes made lose (conflicts)."""

    feed_rows: list[list[Any]] = field(default_factory=list)
    conflicts: int = 0

    @property
    def first_id(self) -> int:
        """The first feed id written (0: none)."""
        return self.feed_rows[0][0] if self.feed_rows else 0

    @property
    def last_id(self) -> int:
        return self.feed_rows[-1][0] if self.feed_rows else 0


#: Placeholder of an outcome not decided yet (every one is decided before it is read).
_NOT_DECIDED: Final = Exception("not decided")


def _in_seq_order(group: list[_Pending]) -> list[int]:
    """The order to decide a group's batches in: the group's own (lane priority, then
    arrival), except that the batches of one node lane go in seq order, so pipelined
    batches that queued out of order apply together instead of the later one waiting out
    a gap. (They take the slots the lane's batches hold in the group.)"""
    slots: dict[tuple[str, int], list[int]] = {}
    for i, p in enumerate(group):
        slots.setdefault((p.node.node_id, p.batch.lane), []).append(i)
    order = list(range(len(group)))
    for held in slots.values():
        by_seq = sorted(held, key=lambda i: group[i].batch.first_seq)
        for slot, i in zip(held, by_seq, strict=True):
            order[slot] = i
    return order


def _fail(pending: list[_Pending], exc: BaseException) -> None:
    for p in pending:
        if not p.future.done():
            p.future.set_exception(exc)


def _columns(rows: Iterable[tuple[Any, ...]]) -> list[list[Any]]:
    """Rows as column lists, to bind as ``unnest`` arrays."""
    return [list(column) for column in zip(*rows, strict=True)]


async def _held_hlcs(
    conn: asyncpg.Connection, group: list[_Pending], acked_of: dict[tuple[str, int], int]
) -> dict[tuple[str, int], dict[int, int]]:
    """Per lane, the ``hlc`` the feed holds under each seq the group resends (at or below
    the lane's acked seq): what :func:`_check_replayed` compares with."""
    wanted = {
        (p.node.node_id, p.batch.lane, c.seq)
        for p in group
        for c in p.batch.changes
        if c.seq <= acked_of[(p.node.node_id, p.batch.lane)]
    }
    held: dict[tuple[str, int], dict[int, int]] = {}
    if not wanted:
        return held
    rows = await conn.fetch(
        "SELECT f.node_id, f.lane, f.seq, f.hlc FROM feed f "
        "JOIN unnest($1::text[], $2::int2[], $3::int8[]) AS k (node_id, lane, seq) "
        "ON f.node_id = k.node_id AND f.lane = k.lane AND f.seq = k.seq",
        *_columns(wanted),
    )
    for r in rows:
        held.setdefault((r["node_id"], r["lane"]), {})[r["seq"]] = r["hlc"]
    return held


def _answer(
    batch: PushBatch, acked: int, clock: HybridClock, *, applied: int, conflicts: int
) -> PushAnswer:
    return PushAnswer(
        acked=acked,
        lane=batch.lane,
        applied=applied,
        conflicts=conflicts,
        hub_hlc=clock.now(),
    )


async def _load_states(
    conn: asyncpg.Connection, keys: set[RecordKey]
) -> dict[RecordKey, RecordState]:
    cells, colls, ks = zip(*keys, strict=True) if keys else ((), (), ())
    rows = await conn.fetch(
        "SELECT r.cell, r.collection, r.key, r.state FROM records r "
        "JOIN unnest($1::text[], $2::text[], $3::text[]) AS k (cell, collection, key) "
        "ON r.cell = k.cell AND r.collection = k.collection AND r.key = k.key",
        list(cells),
        list(colls),
        list(ks),
    )
    return {
        (r["cell"], r["collection"], r["key"]): RecordState.from_bytes(r["state"]) for r in rows
    }


def _record_values(state: RecordState) -> tuple[Any, ...]:
    """A record's ``doc``, ``state``, ``hlc`` and ``deleted`` columns."""
    doc = state.document()
    return (pg_json(doc) if doc else None, state.to_bytes(), state.max_hlc, not doc)


async def _write_records(
    conn: asyncpg.Connection,
    touched: dict[RecordKey, RecordState],
    feed_ids: dict[RecordKey, int],
    held: set[RecordKey],
    values: dict[RecordKey, tuple[Any, ...]],
) -> None:
    """Write the ``touched`` records; ``held`` are those the hub had before this group,
    ``values`` the row values already made of some (:func:`_record_values`)."""
    held_rows: list[tuple[Any, ...]] = []
    new_rows: list[tuple[Any, ...]] = []
    for rk, state in touched.items():
        made = values.get(rk)
        row = (*rk, *(made or _record_values(state)), feed_ids[rk])
        (held_rows if rk in held else new_rows).append(row)
    if len(held_rows) + len(new_rows) < COPY_RECORDS_FROM:
        rows = held_rows + new_rows
        await conn.execute(
            _UPSERT_RECORDS
            + "FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::bytea[], "
            "$6::int8[], $7::bool[], $8::int8[]) "
            "AS t (cell, collection, key, doc, state, hlc, deleted, feed_id)" + _ON_CONFLICT,
            *(list(column) for column in zip(*rows, strict=True)),
        )
        return
    # Many records. Binding eight arrays of thousands of elements costs asyncpg more than
    # COPY does: records the hub had are COPYed into the connection's staging table, then
    # upserted in one statement; new ones are COPYed straight into ``records`` (half the
    # cost of the upsert). That cannot collide: only pushes write ``records``, always under
    # the feed lock this group holds since it found them absent.
    if held_rows:
        await conn.copy_records_to_table(STAGING_TABLE, records=held_rows)
        await conn.execute(_UPSERT_RECORDS + f"FROM {STAGING_TABLE}" + _ON_CONFLICT)
    if new_rows:
        await conn.copy_records_to_table("records", records=new_rows, columns=RECORD_COLUMNS)


#: A push stages this many records or more with COPY (fewer: one statement binding arrays,
#: one round trip less under the feed lock).
COPY_RECORDS_FROM: Final = 100
#: The ``records`` columns a push writes, in the order of its rows.
RECORD_COLUMNS: Final = ("cell", "collection", "key", "doc", "state", "hlc", "deleted", "feed_id")
_UPSERT_RECORDS: Final = (
    f"INSERT INTO records ({', '.join(RECORD_COLUMNS)}) "
    "SELECT cell, collection, key, doc::jsonb, state, hlc, deleted, feed_id "
)
_ON_CONFLICT: Final = (
    " ON CONFLICT (cell, collection, key) DO UPDATE SET doc = excluded.doc, "
    "state = excluded.state, hlc = excluded.hlc, deleted = excluded.deleted, "
    "feed_id = excluded.feed_id, updated_at = now()"
)


#: The feed columns a push writes, in the order of its feed rows.
FEED_COLUMNS: Final = (
    "id", "tier", "cell", "collection", "key", "node_id", "lane", "seq", "hlc", "fields", "base"
)  # fmt: skip


async def _append_feed(conn: asyncpg.Connection, rows: list[list[Any]]) -> None:
    # COPY, not INSERT … unnest(arrays): asyncpg encodes rows for COPY without checking
    # every array element for nesting, and the server skips building the arrays.
    await conn.copy_records_to_table("feed", records=rows, columns=FEED_COLUMNS)


async def _log_conflicts(conn: asyncpg.Connection, conflicts: list[Conflict]) -> None:
    await conn.execute(
        "INSERT INTO conflicts (cell, collection, key, field, winner_value, winner_hlc, "
        "winner_node, winner_deleted, loser_value, loser_hlc, loser_node) "
        "SELECT cell, collection, key, field, winner_value::jsonb, winner_hlc, winner_node, "
        "winner_deleted, loser_value::jsonb, loser_hlc, loser_node FROM unnest("
        "$1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::int8[], $7::text[], "
        "$8::bool[], $9::text[], $10::int8[], $11::text[]) AS t (cell, collection, key, field, "
        "winner_value, winner_hlc, winner_node, winner_deleted, loser_value, loser_hlc, loser_node)",
        [k.cell for k in conflicts],
        [k.collection for k in conflicts],
        [k.key for k in conflicts],
        [k.field for k in conflicts],
        [None if k.winner_deleted else pg_json(k.winner_value) for k in conflicts],
        [k.winner_hlc for k in conflicts],
        [k.winner_node for k in conflicts],
        [k.winner_deleted for k in conflicts],
        [pg_json(k.loser_value) for k in conflicts],
        [k.loser_hlc for k in conflicts],
        [k.loser_node for k in conflicts],
    )
