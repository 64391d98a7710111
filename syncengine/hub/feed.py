"""Reading the change feed: what an edge pulls after its cursor.

Feed ids are contiguous and in commit order (see :mod:`syncengine.hub.push`), so a page is
simply "ids above the cursor, in order", read in one snapshot together with the head. When
a page is not full, the cursor moves to the end of the id window it scanned (at most the
head seen in that snapshot): every id at or below the head had committed when the
snapshot was taken, so nothing can appear behind the cursor later.

Pulls are per tier (live tiers are long-polled, others fetched on their schedule) and per
subscribed prefixes; a node's own changes are not sent back to it.

Retention (:mod:`syncengine.hub.retention`) drops old entries; a cursor below the feed's
horizon is answered ``cursor_behind_horizon`` and the edge re-bootstraps.
"""

from __future__ import annotations

from typing import Any

import asyncpg
import msgpack

from syncengine.cells import covers_any
from syncengine.clock import HybridClock
from syncengine.errors import SequenceError
from syncengine.hub.cache import Cache
from syncengine.hub.db import translated
from syncengine.merge import Change, base_stamps
from syncengine.protocol import CURSOR_BEHIND_HORIZON, PullPage

__all__ = ["feed_head", "read_page", "rows_to_changes"]

#: Most feed ids one page examines. Bounds every pull's cost whatever the planner does
#: and however sparse the node's subscriptions are in the feed: a page that finds fewer
#: matches than its limit moves the cursor to the end of the window it scanned.
SCAN_WINDOW = 50_000

#: The cache's row layout (see :class:`syncengine.hub.cache.Cache`).
_COLUMNS = (
    "id",
    "tier",
    "cell",
    "collection",
    "key",
    "node_id",
    "lane",
    "seq",
    "hlc",
    "fields",
    "base",
)

#: A page, read cell by cell: for each cell under the prefixes (``cells``, byte-ordered, so
#: a prefix's cells are the range from ``prefix/`` up to ``prefix0``), the first matching
#: entries after the cursor through ``feed_cell_id``; then the first ``limit`` of their union.
#: The per-cell LIMIT sits after every filter, so no cell's page can hide a later match. An
#: edge's few cells cost a few index probes, where the tier's whole window was scanned
#: before. (A cell's tier is taken from its feed entries: tier rules can change.)
_PAGE_SQL = (
    "SELECT f.id, f.cell, f.collection, f.key, f.node_id, f.lane, f.seq, f.hlc, f.fields, "
    "f.base FROM ("
    "  SELECT DISTINCT c.cell FROM unnest($4::text[]) AS p (prefix) JOIN cells c "
    '  ON c.cell = p.prefix COLLATE "C" OR (c.cell >= p.prefix || \'/\' COLLATE "C" '
    "  AND c.cell < p.prefix || '0' COLLATE \"C\")"
    ") AS c CROSS JOIN LATERAL ("
    "  SELECT * FROM feed WHERE feed.cell = c.cell AND feed.id > $2 AND feed.id <= $6 "
    "  AND feed.tier = $1 AND feed.node_id <> $3 ORDER BY feed.id LIMIT $5"
    ") AS f ORDER BY f.id LIMIT $5"
)


async def feed_head(pool: asyncpg.Pool) -> int:
    async with translated("feed head"):
        head: int = await pool.fetchval("SELECT id FROM feed_head")
    return head


def _check_horizon(after: int, horizon: int) -> None:
    if after < horizon:
        raise SequenceError(
            f"pull cursor {after} is behind the feed's retention horizon {horizon}: the "
            "entries after it were dropped",
            hint="The edge was away longer than the hub keeps its feed; it re-bootstraps from "
            "a snapshot by itself (or run `syncengine edge bootstrap`).",
            code=CURSOR_BEHIND_HORIZON,
            detail={"cursor": after, "horizon": horizon},
        )


def rows_to_changes(rows: list[Any]) -> tuple[list[int], list[Change]]:
    ids, changes = [], []
    for r in rows:
        ids.append(r["id"])
        changes.append(
            Change(
                cell=r["cell"],
                collection=r["collection"],
                key=r["key"],
                hlc=r["hlc"],
                node=r["node_id"],
                fields=None if r["fields"] is None else msgpack.unpackb(r["fields"], raw=False),
                base={}
                if r["base"] is None
                else base_stamps(msgpack.unpackb(r["base"], raw=False)),
                lane=r["lane"],
                seq=r["seq"],
            )
        )
    return ids, changes


async def read_page(
    pool: asyncpg.Pool,
    *,
    node_id: str,
    tier: int,
    prefixes: list[str],
    after: int,
    limit: int,
    clock: HybridClock,
    cache: Cache | None = None,
) -> PullPage:
    """One page of ``tier``'s changes under ``prefixes`` after ``after``, for ``node_id``.

    Served from the cached feed tail when the cache holds the whole id range, else from
    PostgreSQL. No transaction is needed: feed appends are serialized and become visible at
    commit, so every id at or below the head read first is settled, and any later read of
    that range sees exactly the same rows.
    """
    async with translated("pull"):
        # No connection is held while the cache is read: a pool of ten serves a thousand
        # edges only if each request holds one for its own queries alone.
        head, epoch, horizon = await pool.fetchrow("SELECT id, epoch, horizon FROM feed_head")
        _check_horizon(after, horizon)
        if after > head:
            raise SequenceError(
                f"pull cursor {after} is ahead of this hub's feed (head {head})",
                hint="The hub's database was restored or replaced: re-bootstrap the edge "
                "from a snapshot.",
                code="cursor_ahead",
                detail={"cursor": after, "head": head},
            )
        window_end = min(head, after + SCAN_WINDOW)
        cached = None
        if cache is not None and cache.configured and not cache.degraded and after < window_end:
            cached = await cache.feed_page(
                epoch,
                after + 1,
                window_end,
                wanted=lambda r: r[1] == tier and r[5] != node_id and covers_any(prefixes, r[2]),
                limit=limit,
            )
        if cached is not None:
            rows: list[Any] = [dict(zip(_COLUMNS, r, strict=True)) for r in cached]
        else:
            async with pool.acquire() as conn:
                rows = await conn.fetch(
                    _PAGE_SQL, tier, after, node_id, prefixes, limit, window_end
                )
                # Retention may have dropped a partition between the two reads (DDL is not
                # bound by a snapshot): the rows would lack its entries. Check again after.
                _check_horizon(after, await conn.fetchval("SELECT horizon FROM feed_head"))
    ids, changes = rows_to_changes(rows)
    full = len(rows) == limit
    return PullPage(
        changes=changes,
        ids=ids,
        next_cursor=ids[-1] if full else window_end,
        head=head,
        more=full or window_end < head,
        hub_hlc=clock.now(),
    )
