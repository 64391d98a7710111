"""`syncengine hub verify`: check the hub database's invariants and say what is wrong.

Read-only. Each check counts what violates one invariant and names a few examples. The
quick checks are index lookups and aggregates; ``deep`` also replays the whole change feed
record by record through the merge function and compares the result with ``records``
(what every edge converges to), which reads the entire feed once; once retention has
dropped old entries that replay is no longer possible and is reported as not run.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

import asyncpg

from syncengine.hub.feed import rows_to_changes
from syncengine.merge import DEFAULT_RESOLVER, RecordState, apply_change

__all__ = ["Check", "verify"]

_EXAMPLES: Final = 5


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    problems: int
    examples: list[str] = field(default_factory=list)
    hint: str = ""

    @property
    def ok(self) -> bool:
        return self.problems == 0


async def verify(
    pool: asyncpg.Pool, *, resolvers: Mapping[str, str], deep: bool = False
) -> list[Check]:
    """Run the checks (all of them, even after a failing one) and return their results."""
    async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        checks = [
            await _feed_contiguous(conn),
            await _feed_seqs_unique(conn),
            await _acked_covers_feed(conn),
            await _records_point_into_feed(conn),
            await _feed_nodes_known(conn),
            await _cells_known(conn),
            await _catalog_health(conn),
        ]
        if deep:
            checks.append(await _replay_matches_records(conn, resolvers))
    return checks


async def _feed_contiguous(conn: asyncpg.Connection) -> Check:
    # Retention drops whole partitions up to the horizon; from there on nothing may lack.
    head, horizon = await conn.fetchrow("SELECT id, horizon FROM feed_head")
    high, count = await conn.fetchrow("SELECT max(id), count(*) FROM feed WHERE id > $1", horizon)
    examples = []
    if count and high != head:
        examples.append(f"feed_head is {head} but the newest feed entry is {high}")
    if count != head - horizon:
        examples.append(
            f"{head - horizon - count} ids missing between the horizon {horizon} and the "
            f"head {head}"
        )
    return Check(
        "feed ids are contiguous from the retention horizon to the head",
        len(examples),
        examples,
        "Pullers may skip changes: restore the database from a backup taken before this.",
    )


async def _feed_seqs_unique(conn: asyncpg.Connection) -> Check:
    rows = await conn.fetch(
        "SELECT node_id, lane, seq, count(*) AS n FROM feed GROUP BY node_id, lane, seq "
        "HAVING count(*) > 1 ORDER BY node_id, lane, seq LIMIT 100"
    )
    return Check(
        "every change of a node is in the feed once",
        len(rows),
        [f"node {r['node_id']} lane {r['lane']} seq {r['seq']}: {r['n']} times" for r in rows],
        "A change was applied twice (pullers count it twice): report it as a bug, with the "
        "database kept for diagnosis.",
    )


async def _acked_covers_feed(conn: asyncpg.Connection) -> Check:
    rows = await conn.fetch(
        "SELECT f.node_id, f.lane, max(f.seq) AS top, l.acked_seq FROM feed f "
        "LEFT JOIN node_lanes l USING (node_id, lane) GROUP BY f.node_id, f.lane, l.acked_seq "
        "HAVING l.acked_seq IS NULL OR max(f.seq) > l.acked_seq"
    )
    return Check(
        "every change in the feed is at or below its node's acknowledged seq",
        len(rows),
        [
            f"node {r['node_id']} lane {r['lane']}: feed has seq {r['top']}, "
            f"acknowledged {r['acked_seq']}"
            for r in rows[:_EXAMPLES]
        ],
        "Replays would be applied twice: set node_lanes.acked_seq to the feed's highest seq.",
    )


async def _records_point_into_feed(conn: asyncpg.Connection) -> Check:
    rows = await conn.fetch(
        "SELECT r.cell, r.collection, r.key, r.feed_id FROM records r "
        "WHERE r.feed_id > (SELECT id FROM feed_head) OR "
        "(r.feed_id > (SELECT horizon FROM feed_head) AND NOT EXISTS "
        "(SELECT 1 FROM feed f WHERE f.id = r.feed_id)) LIMIT 1000"
    )
    return Check(
        "every record's last feed entry exists",
        len(rows),
        [f"{r['cell']} {r['collection']}/{r['key']}: feed id {r['feed_id']}" for r in rows[:5]],
        "Snapshots would make edges skip or repeat changes of these records.",
    )


async def _feed_nodes_known(conn: asyncpg.Connection) -> Check:
    rows = await conn.fetch(
        "SELECT DISTINCT f.node_id FROM feed f WHERE NOT EXISTS "
        "(SELECT 1 FROM nodes n WHERE n.node_id = f.node_id) LIMIT 100"
    )
    return Check(
        "every node in the feed is registered",
        len(rows),
        [r["node_id"] for r in rows[:_EXAMPLES]],
        "Orphan entries: a node was deleted by hand. Register it again to keep its history "
        "attributable (`syncengine hub add-node`), then revoke it.",
    )


async def _cells_known(conn: asyncpg.Connection) -> Check:
    rows = await conn.fetch(
        "SELECT DISTINCT r.cell FROM records r WHERE NOT EXISTS "
        "(SELECT 1 FROM cells c WHERE c.cell = r.cell) LIMIT 100"
    )
    return Check(
        "every record's cell is registered with its tier",
        len(rows),
        [r["cell"] for r in rows[:_EXAMPLES]],
        "Orphan rows written around the hub: find where they came from before deleting.",
    )


async def _catalog_health(conn: asyncpg.Connection) -> Check:
    rows = await conn.fetch(
        "SELECT 'constraint ' || conname AS what FROM pg_constraint c "
        "JOIN pg_namespace n ON n.oid = c.connamespace "
        "WHERE n.nspname = current_schema() AND NOT c.convalidated "
        "UNION ALL SELECT 'index ' || i.indexrelid::regclass::text FROM pg_index i "
        "JOIN pg_class t ON t.oid = i.indrelid JOIN pg_namespace n ON n.oid = t.relnamespace "
        "WHERE n.nspname = current_schema() AND NOT (i.indisvalid AND i.indisready)"
    )
    return Check(
        "constraints are validated and indexes valid",
        len(rows),
        [r["what"] for r in rows[:_EXAMPLES]],
        "An interrupted migration or CREATE INDEX CONCURRENTLY: run `syncengine migrate`, "
        "or REINDEX the named index.",
    )


async def _replay_matches_records(conn: asyncpg.Connection, resolvers: Mapping[str, str]) -> Check:
    """Replay the feed per record (in feed order) and compare with the stored state."""
    horizon = await conn.fetchval("SELECT horizon FROM feed_head")
    if horizon:
        return Check(
            f"records equal the replay of the feed (not run: retention dropped the entries "
            f"up to {horizon}, so the feed no longer holds every record's history)",
            0,
        )
    stored = {
        (r["cell"], r["collection"], r["key"]): bytes(r["state"])
        for r in await conn.fetch("SELECT cell, collection, key, state FROM records")
    }
    examples: list[str] = []
    problems = 0
    current: tuple[str, str, str] | None = None
    state: RecordState | None = None

    def settle() -> None:
        nonlocal problems
        if current is None:
            return
        have = stored.pop(current, None)
        if state is None or have != state.to_bytes():
            problems += 1
            if len(examples) < _EXAMPLES:
                what = "missing" if have is None else "differs from the feed's replay"
                examples.append(f"{' '.join(current)}: {what}")

    async for row in conn.cursor(
        "SELECT id, cell, collection, key, node_id, lane, seq, hlc, fields, base FROM feed "
        "ORDER BY cell, collection, key, id",
        prefetch=2000,
    ):
        _, (change,) = rows_to_changes([row])
        rk = (change.cell, change.collection, change.key)
        if rk != current:
            settle()
            current, state = rk, None
        resolver = resolvers.get(change.collection, DEFAULT_RESOLVER)
        state = apply_change(state, change, resolver).state
    settle()
    for rk in list(stored)[: max(0, _EXAMPLES - len(examples))]:
        examples.append(f"{' '.join(rk)}: no feed entry")
    problems += len(stored)
    return Check(
        "records equal the replay of the feed",
        problems,
        examples,
        "Snapshots hand out these rows while pulls replay the feed: edges would diverge. "
        "Keep the database for diagnosis and report it as a bug.",
    )
