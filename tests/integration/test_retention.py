"""Feed retention against a real hub: day partitions are made ahead, expired ones are dropped
once no node still syncing needs them, a node whose cursor fell behind the horizon
re-bootstraps by itself and ends with the hub's exact state (deletions included, its queued
writes on top), and a node still syncing holds the feed until it has pulled."""

from __future__ import annotations

import datetime as dt
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest

from support.edges import CELL, Edge, edge, edge_rows, hub_rows
from syncengine.errors import SequenceError
from syncengine.hub.retention import DAYS_AHEAD, maintain_feed
from syncengine.hub.verify import verify
from syncengine.protocol import CURSOR_BEHIND_HORIZON
from syncengine.tiers import Tier

pytestmark = pytest.mark.integration

RETENTION = 30
LATER = dt.datetime.now(dt.UTC) + dt.timedelta(days=RETENTION + 10)


async def two_edges(stack: AsyncExitStack, hub: Any, tmp_path: Path) -> tuple[Edge, Edge]:
    pair = []
    for name in ("edge-w", "edge-a"):
        token = await hub.add_node(name, CELL)
        pair.append(await stack.enter_async_context(edge(stack, tmp_path, name, hub.url, token)))
    return pair[0], pair[1]


async def synced(e: Edge) -> None:
    report = await e.syncer.sync_once()
    assert report.errors == (), report.errors


async def feed_count(hub: Any) -> int:
    return int(await hub.hub.pool.fetchval("SELECT count(*) FROM feed"))


async def test_partitions_are_made_ahead_and_pushes_land_in_them(hub: Any, tmp_path: Path) -> None:
    pool = hub.hub.pool
    ends = await pool.fetchval("SELECT max(ends_at) FROM feed_partitions")
    today = dt.datetime.now(dt.UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    assert ends == today + dt.timedelta(days=DAYS_AHEAD)
    async with AsyncExitStack() as stack:
        w, _ = await two_edges(stack, hub, tmp_path)
        await w.store.put(CELL, "visits", "k1", {"n": 1})
        await synced(w)
    where = await pool.fetch("SELECT DISTINCT tableoid::regclass::text AS part FROM feed")
    assert [r["part"] for r in where] == ["feed_p_initial"]
    assert await pool.fetchval("SELECT count(*) FROM feed_p_default") == 0
    # A second run (another hub process, the hourly timer) makes nothing twice.
    again = await maintain_feed(pool, retention_days=RETENTION)
    assert again.created == [] and again.dropped == [] and again.horizon == 0


async def test_an_edge_behind_the_horizon_rebootstraps_and_resurrects_nothing(
    hub: Any, tmp_path: Path
) -> None:
    async with AsyncExitStack() as stack:
        w, a = await two_edges(stack, hub, tmp_path)
        for i in range(6):
            await w.store.put(CELL, "visits", f"k{i}", {"n": i})
        await synced(w)
        await synced(a)
        assert len(edge_rows(a.store.path)) == 6

        # edge-a goes away; meanwhile edge-w deletes, edits and adds, and edge-a writes.
        await w.store.delete(CELL, "visits", "k1")
        await w.store.put(CELL, "visits", "k2", {"n": 20})
        await w.store.put(CELL, "visits", "k6", {"n": 6})
        await synced(w)
        await a.store.put(CELL, "visits", "k3", {"by": "a"})

        # Forty days on: every partition ended before the horizon, and no node pulled since.
        report = await maintain_feed(hub.hub.pool, retention_days=RETENTION, now=LATER)
        head = await hub.hub.pool.fetchval("SELECT id FROM feed_head")
        assert "feed_p_initial" in report.dropped and report.held_by == {}
        assert report.horizon == head and await feed_count(hub) == 0

        with pytest.raises(SequenceError) as behind:
            await a.link.pull(tier=Tier.STANDARD, prefixes=[CELL], after=0, limit=10)
        assert behind.value.code == CURSOR_BEHIND_HORIZON
        assert behind.value.detail["horizon"] == head

        await synced(a)  # pushes k3, is told it is behind, re-bootstraps, pulls on
        hub_state = {k: v for k, v in (await hub_rows(hub)).items() if k[0] == CELL}
        assert {k: state for k, (state, _) in edge_rows(a.store.path).items()} == {
            k: state for k, (state, _) in hub_state.items()
        }
        assert hub_state[(CELL, "visits", "k1")][1] is None  # the delete, kept as a tombstone
        assert await a.store.get(CELL, "visits", "k1") is None
        assert await a.store.get(CELL, "visits", "k3") == {"n": 3, "by": "a"}  # fields merge
        assert await a.syncer.store.bootstrap_progress() is None
        assert await a.store.cursor("pull:standard") >= report.horizon

        # From there on the feed serves it as before.
        await w.store.put(CELL, "visits", "k7", {"n": 7})
        await synced(w)
        await synced(a)
        assert await a.store.get(CELL, "visits", "k7") == {"n": 7}
        await synced(w)
        assert edge_rows(w.store.path) == edge_rows(a.store.path)

    checks = await verify(hub.hub.pool, resolvers=hub.config.resolvers, deep=True)
    assert [c.name for c in checks if not c.ok] == []


async def test_a_node_still_syncing_holds_the_feed_until_it_has_pulled(
    hub: Any, tmp_path: Path
) -> None:
    pool = hub.hub.pool
    async with AsyncExitStack() as stack:
        w, a = await two_edges(stack, hub, tmp_path)
        await synced(a)  # edge-a pulls every tier once (cursor 0)
        for i in range(5):
            await w.store.put(CELL, "visits", f"k{i}", {"n": i})
        await synced(w)
        # As if edge-a had kept long-polling up to LATER without ever getting past cursor 0.
        await pool.execute(
            "UPDATE node_pulls SET pulled_at = $1, cursor = 0 WHERE node_id = 'edge-a'", LATER
        )
        dry = await maintain_feed(pool, retention_days=RETENTION, now=LATER, dry_run=True)
        assert dry.held_by == {"feed_p_initial": ["edge-a"]} and dry.dropped == []
        held = await maintain_feed(pool, retention_days=RETENTION, now=LATER)
        assert held.held_by == {"feed_p_initial": ["edge-a"]}
        assert held.horizon == 0 and await feed_count(hub) == 5
        assert "feed_p_initial" in {p.name for p in held.partitions}

        # Once it has pulled the partition (or is revoked), the partition goes.
        await synced(a)
        head = await pool.fetchval("SELECT id FROM feed_head")
        await pool.execute(
            "UPDATE node_pulls SET pulled_at = $1, cursor = $2 WHERE node_id = 'edge-a'",
            LATER,
            head,
        )
        dry = await maintain_feed(pool, retention_days=RETENTION, now=LATER, dry_run=True)
        assert dry.dropped[0] == "feed_p_initial" and dry.horizon == 0
        gone = await maintain_feed(pool, retention_days=RETENTION, now=LATER)
        assert gone.held_by == {} and gone.horizon == head and await feed_count(hub) == 0
        # Its cursor is at the horizon: it pulls on without a bootstrap.
        await w.store.put(CELL, "visits", "k9", {"n": 9})
        await synced(w)
        await synced(a)
        assert await a.store.get(CELL, "visits", "k9") == {"n": 9}
