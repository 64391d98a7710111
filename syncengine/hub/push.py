"""Applying a pushed batch: exactly once, in one PostgreSQL transaction.

The whole batch is applied under the region's feed-append lock (a transaction-level advisory
lock). That lock is what makes the change feed gap-free: feed ids are taken from
``feed_head`` while holding it, so ids are contiguous and in commit order, and a puller's
cursor can never pass an id that commits later. It also serializes concurrent pushes of
one node lane, so the dedup check (``node_lanes.acked_seq``) and the apply cannot race.

The cost is that pushes to one region apply one at a time. What happens inside the lock is
small and set-based — a handful of statements per batch whatever its size (``unnest``
arrays, never one statement per change) — and all decoding and validation happens before
the lock is taken. ``benchmarks/sync_push.py`` measures the resulting rate beside raw COPY.

Dedup: per ``(node, lane)`` the hub keeps the highest seq applied. A batch at or below it
is a replay and answers the same ``acked``; a batch starting beyond it + 1 is a gap (409);
an overlapping batch applies only the seqs above it. Edges pipeline their batches, so a batch
may arrive before the one it follows: it waits a moment for it before being called a gap. A "replay" whose changes differ from the
ones held under the same seqs (by ``hlc``) is refused (409 ``seq_reused``), never dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Final

import asyncpg

from syncengine import crashpoints
from syncengine.clock import HybridClock, hlc_millis
from syncengine.codec import encode
from syncengine.errors import ClockDriftError, ForbiddenError, SequenceError, SyncError
from syncengine.hub.db import STAGING_TABLE, pg_json, translated
from syncengine.hub.nodes import Node, check_writable
from syncengine.merge import (
    DEFAULT_RESOLVER,
    Conflict,
    RecordState,
    apply_change,
    validate_fields,
)
from syncengine.protocol import PushAnswer, PushBatch
from syncengine.tiers import TierRules

__all__ = ["FEED_LOCK_KEY", "AppliedBatch", "apply_push", "check_batch"]

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


async def _check_replayed(
    conn: asyncpg.Connection, node: Node, batch: PushBatch, acked: int
) -> None:
    """Refuse seqs the hub already holds when they carry other changes than the ones it holds.

    A real replay resends the very changes (same ``hlc``). Other changes under held seqs come
    from an older copy of the node's store (a backup put back, then written to) or from two
    stores under one node id; answering them as replays would drop them for good.
    """
    replayed = {c.seq: c.hlc for c in batch.changes if c.seq <= acked}
    if not replayed:
        return
    rows = await conn.fetch(
        "SELECT seq, hlc FROM feed WHERE node_id = $1 AND lane = $2 AND seq = ANY($3::bigint[])",
        node.node_id,
        batch.lane,
        list(replayed),
    )
    # Seqs whose feed entries are gone (retention) cannot be compared; they pass as replays.
    reused = sorted(r["seq"] for r in rows if r["hlc"] != replayed[r["seq"]])
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


#: Per node lane, set when a batch of it commits in this process (pipelined batches wait
#: on it for their predecessor).
_advanced: dict[tuple[str, int], asyncio.Event] = {}


async def apply_push(
    pool: asyncpg.Pool,
    node: Node,
    batch: PushBatch,
    *,
    region: str,
    clock: HybridClock,
    tier_rules: TierRules,
    resolvers: dict[str, str],
) -> AppliedBatch:
    """Apply ``batch`` (already checked with :func:`check_batch`) exactly once.

    A batch that starts past the next seq the hub expects waits up to :data:`GAP_WAIT_S`
    for the batches before it (an edge pipelines its pushes: they may arrive out of
    order), then is refused (409 ``seq_gap``)."""
    lane_key = (node.node_id, batch.lane)
    deadline = time.monotonic() + GAP_WAIT_S
    while True:
        advanced = _advanced.setdefault(lane_key, asyncio.Event())
        try:
            applied = await _apply_once(
                pool,
                node,
                batch,
                region=region,
                clock=clock,
                tier_rules=tier_rules,
                resolvers=resolvers,
            )
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


async def _apply_once(
    pool: asyncpg.Pool,
    node: Node,
    batch: PushBatch,
    *,
    region: str,
    clock: HybridClock,
    tier_rules: TierRules,
    resolvers: dict[str, str],
) -> AppliedBatch:
    async with translated("push"), pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", FEED_LOCK_KEY)
        acked = await conn.fetchval(
            "INSERT INTO node_lanes (node_id, lane) VALUES ($1, $2) "
            "ON CONFLICT (node_id, lane) DO UPDATE SET acked_seq = node_lanes.acked_seq "
            "RETURNING acked_seq",
            node.node_id,
            batch.lane,
        )
        await _check_replayed(conn, node, batch, acked)
        if batch.last_seq <= acked:  # a replay: answer as the first time, change nothing
            return AppliedBatch(
                answer=_answer(batch, acked, clock, applied=0, conflicts=0),
                first_id=0,
                last_id=0,
                tiers=frozenset(),
            )
        if batch.first_seq > acked + 1:
            raise _Gap(acked)  # (the transaction rolls back: nothing was written)
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
        conflicts: list[Conflict] = []
        feed_rows: list[list[Any]] = []
        first_id = last_id = 0
        epoch = ""
        tiers: set[int] = set()
        if todo:
            states = await _load_states(conn, {(c.cell, c.collection, c.key) for c in todo})
            touched: dict[RecordKey, RecordState] = {}
            for c in todo:
                rk = (c.cell, c.collection, c.key)
                result = apply_change(
                    states.get(rk),
                    c,
                    resolvers.get(c.collection, DEFAULT_RESOLVER),
                    detect_conflicts=True,
                )
                states[rk] = touched[rk] = result.state
                conflicts.extend(result.conflicts)
            last_id, epoch = await conn.fetchrow(
                "UPDATE feed_head SET id = id + $1 RETURNING id, epoch", len(todo)
            )
            first_id = last_id - len(todo) + 1
            tier_of = {cell: tier_rules.tier_for(cell).priority for cell in checked}
            tiers = set(tier_of.values())
            feed_rows = [
                [
                    first_id + i,
                    tier_of[c.cell],
                    c.cell,
                    c.collection,
                    c.key,
                    node.node_id,
                    batch.lane,
                    c.seq,
                    c.hlc,
                    None if c.fields is None else encode(c.fields),
                    encode(dict(c.base)) if c.base else None,
                ]
                for i, c in enumerate(todo)
            ]
            await _append_feed(conn, feed_rows)
            crashpoints.crashpoint("hub.feed.after_append_before_commit")
            record_feed_id = {
                (c.cell, c.collection, c.key): first_id + i for i, c in enumerate(todo)
            }
            await _write_records(conn, touched, record_feed_id)
            await conn.execute(
                "INSERT INTO cells (cell, tier) SELECT * FROM unnest($1::text[], $2::int2[]) "
                "ON CONFLICT (cell) DO NOTHING",
                list(tier_of),
                list(tier_of.values()),
            )
            if conflicts:
                await _log_conflicts(conn, conflicts)
        await conn.execute(
            "UPDATE node_lanes SET acked_seq = $3, updated_at = now() "
            "WHERE node_id = $1 AND lane = $2",
            node.node_id,
            batch.lane,
            batch.last_seq,
        )
        await conn.execute("UPDATE nodes SET last_seen = now() WHERE node_id = $1", node.node_id)
        crashpoints.crashpoint("hub.push.before_commit")
    # Committed. Fold the batch's stamps so the hub clock (sent back to edges) never lags them.
    if todo:
        # Cannot drift after check_batch, unless the wall clock stepped back meanwhile.
        with contextlib.suppress(ClockDriftError):
            clock.observe(max(c.hlc for c in todo))
    crashpoints.crashpoint("hub.push.after_commit_before_response")
    return AppliedBatch(
        answer=_answer(batch, batch.last_seq, clock, applied=len(todo), conflicts=len(conflicts)),
        first_id=first_id,
        last_id=last_id,
        tiers=frozenset(tiers),
        feed_rows=feed_rows,
        epoch=epoch,
    )


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


async def _write_records(
    conn: asyncpg.Connection,
    touched: dict[RecordKey, RecordState],
    feed_ids: dict[RecordKey, int],
) -> None:
    rows = []
    for rk, state in touched.items():
        doc = state.document()
        rows.append(
            (
                *rk,
                pg_json(doc) if doc else None,
                state.to_bytes(),
                state.max_hlc,
                not doc,
                feed_ids[rk],
            )
        )
    if len(rows) >= COPY_RECORDS_FROM:
        # Many records: COPY them into the connection's staging table, then one upsert.
        # Binding eight arrays of thousands of elements costs asyncpg more than COPY does.
        await conn.copy_records_to_table(STAGING_TABLE, records=rows)
        await conn.execute(_UPSERT_RECORDS + f"FROM {STAGING_TABLE}" + _ON_CONFLICT)
        return
    await conn.execute(
        _UPSERT_RECORDS
        + "FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::bytea[], "
        "$6::int8[], $7::bool[], $8::int8[]) "
        "AS t (cell, collection, key, doc, state, hlc, deleted, feed_id)" + _ON_CONFLICT,
        *(list(column) for column in zip(*rows, strict=True)),
    )


#: A push stages this many records or more with COPY (fewer: one statement binding arrays,
#: one round trip less under the feed lock).
COPY_RECORDS_FROM: Final = 100
_UPSERT_RECORDS: Final = (
    "INSERT INTO records (cell, collection, key, doc, state, hlc, deleted, feed_id) "
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
