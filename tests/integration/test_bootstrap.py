"""Bootstrap through the hub's snapshot against a real hub: a new edge ends with the hub's
exact state, an interrupted bootstrap resumes where it stopped, queued local writes stay on
top without being counted twice, a new subscription fetches only what is new, and a node
whose store was lost numbers its new changes after what the hub holds."""

from __future__ import annotations

import sqlite3
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest

from support.edges import ALERTS, ARCHIVE, CELL, STOCK_CELL, Edge, edge, edge_rows, hub_rows
from syncengine.edge.sync import BatchSizer
from syncengine.errors import SequenceError
from syncengine.protocol import SnapshotPage
from syncengine.tiers import Tier

pytestmark = pytest.mark.integration

OTHER_CLINIC = "west/ng/lagos/clinic-7"
PAGE = 7


class Interrupted(Exception):
    """Stands for a crash, SIGTERM or a cut link in the middle of a bootstrap."""


async def write_history(e: Edge) -> None:
    """Records of every tier under CELL (edits, a delete, counters) plus one outside it."""
    for i in range(40):
        await e.store.put(CELL, "visits", f"k{i % 25}", {"f": i, "by": e.name})
    for i in range(12):
        await e.store.put(STOCK_CELL, "stock", f"item{i % 3}", {"qty": i + 1})
    await e.store.delete(CELL, "visits", "k3")
    await e.store.put(ALERTS, "alerts", "a1", {"level": "red"})
    await e.store.put(ARCHIVE, "visits", "old", {"year": 2019})
    await e.store.put(OTHER_CLINIC, "visits", "elsewhere", {"x": 1})
    report = await e.syncer.sync_once()
    assert report.errors == (), report


async def under(hub: Any, *prefixes: str) -> dict[tuple[str, str, str], tuple[bytes, Any]]:
    return {
        k: v
        for k, v in (await hub_rows(hub)).items()
        if any(k[0] == p or k[0].startswith(p + "/") for p in prefixes)
    }


def local(e: Edge) -> dict[tuple[str, str, str], bytes]:
    return {k: state for k, (state, _) in edge_rows(e.store.path).items()}


def states(
    rows: dict[tuple[str, str, str], tuple[bytes, Any]],
) -> dict[tuple[str, str, str], bytes]:
    return {k: state for k, (state, _) in rows.items()}


def record_snapshots(e: Edge) -> list[tuple[str, str | None, int]]:
    """Wrap the edge's link so every snapshot request is listed as (prefix, after, records)."""
    calls: list[tuple[str, str | None, int]] = []
    real = e.link.snapshot

    async def snapshot(*, prefix: str, after: str | None = None, limit: int) -> SnapshotPage:
        page = await real(prefix=prefix, after=after, limit=limit)
        calls.append((prefix, after, len(page.records)))
        return page

    e.link.snapshot = snapshot  # type: ignore[method-assign]
    return calls


async def writer(stack: AsyncExitStack, hub: Any, tmp_path: Path) -> Edge:
    token = await hub.add_node("edge-w", "west/ng/lagos")
    w = await stack.enter_async_context(
        edge(stack, tmp_path, "edge-w", hub.url, token, subscriptions=["west/ng/lagos"])
    )
    await write_history(w)
    return w


async def test_a_new_edge_takes_the_hubs_exact_state(hub: Any, tmp_path: Path) -> None:
    async with AsyncExitStack() as stack:
        w = await writer(stack, hub, tmp_path)
        token = await hub.add_node("edge-n", CELL)
        n = await stack.enter_async_context(edge(stack, tmp_path, "edge-n", hub.url, token))
        n.syncer.snapshot_sizer = BatchSizer(start=PAGE, ceiling=PAGE)
        assert await n.store.needs_bootstrap(n.syncer.subscriptions)
        seen: list[tuple[int, str]] = []
        taken = await n.syncer.bootstrap(
            progress=lambda records, prefix: seen.append((records, prefix))
        )

        want = await under(hub, CELL)
        # 25 visits (k3 a tombstone: included), 3 stock items, 1 alert, 1 archive record.
        assert taken == len(want) == 30
        assert local(n) == states(want)
        assert [r for r, _ in seen] == sorted(r for r, _ in seen) and seen[-1][0] == taken
        assert len(seen) == -(-taken // PAGE) + (taken % PAGE == 0)
        head = await hub.hub.pool.fetchval("SELECT id FROM feed_head")
        assert [await n.store.cursor(f"pull:{t.value}") for t in Tier] == [head] * len(Tier)
        assert not await n.store.needs_bootstrap(n.syncer.subscriptions)
        assert await n.syncer.bootstrap() == 0  # done: nothing is fetched again

        # The feed continues from the snapshot: later changes arrive once, counters exact.
        for _ in range(5):
            await w.store.put(STOCK_CELL, "stock", "item0", {"qty": 10})
        await w.store.put(CELL, "visits", "k1", {"f": "late"})
        assert (await w.syncer.sync_once()).errors == ()
        assert (await n.syncer.sync_once()).errors == ()
        assert local(n) == states(await under(hub, CELL))
        assert await n.store.get(STOCK_CELL, "stock", "item0") == {"qty": 1 + 4 + 7 + 10 + 50}


async def test_an_interrupted_bootstrap_resumes_where_it_stopped(hub: Any, tmp_path: Path) -> None:
    async with AsyncExitStack() as stack:
        w = await writer(stack, hub, tmp_path)
        token = await hub.add_node("edge-n", CELL)
        async with AsyncExitStack() as first_run:
            n = await first_run.enter_async_context(
                edge(first_run, tmp_path, "edge-n", hub.url, token)
            )
            n.syncer.snapshot_sizer = BatchSizer(start=PAGE, ceiling=PAGE)

            def stop_at_third_page(records: int, prefix: str) -> None:
                if records >= 3 * PAGE:
                    raise Interrupted

            with pytest.raises(Interrupted):
                await n.syncer.bootstrap(progress=stop_at_third_page)
            saved = await n.store.bootstrap_progress()
            assert saved is not None and saved["records"] == 3 * PAGE and saved["after"]
            assert len(local(n)) == 3 * PAGE
            # The feed must not be pulled past records the snapshot has not delivered yet.
            with pytest.raises(SequenceError) as refused:
                await n.syncer.pull_tier(Tier.STANDARD)
            assert refused.value.code == "bootstrap_incomplete"
            assert await n.store.needs_bootstrap(n.syncer.subscriptions)

        # While the edge is down, records already taken and records still ahead change.
        await w.store.put(CELL, "visits", "k0", {"f": "changed"})
        await w.store.put(STOCK_CELL, "stock", "item2", {"qty": 100})
        await w.store.put(CELL, "visits", "k9", {"f": "changed"})
        assert (await w.syncer.sync_once()).errors == ()

        # A restart: a new store on the same file and a new syncer.
        n = await stack.enter_async_context(edge(stack, tmp_path, "edge-n", hub.url, token))
        n.syncer.snapshot_sizer = BatchSizer(start=PAGE, ceiling=PAGE)
        calls = record_snapshots(n)
        total = await n.syncer.bootstrap()
        assert calls[0] == (CELL, saved["after"], PAGE)  # resumed after the last page kept
        assert sum(c[2] for c in calls) == 30 - 3 * PAGE  # nothing fetched twice
        assert total == 30
        assert (await n.syncer.sync_once()).errors == ()
        assert local(n) == states(await under(hub, CELL))
        assert await n.store.get(CELL, "visits", "k0") == {"f": "changed", "by": "edge-w"}
        assert await n.store.get(STOCK_CELL, "stock", "item2") == {"qty": 3 + 6 + 9 + 12 + 100}


async def test_queued_local_writes_stay_on_top_and_count_once(hub: Any, tmp_path: Path) -> None:
    async with AsyncExitStack() as stack:
        await writer(stack, hub, tmp_path)
        token = await hub.add_node("edge-n", CELL)
        n = await stack.enter_async_context(edge(stack, tmp_path, "edge-n", hub.url, token))
        # Written before the first contact with the data (offline install).
        await n.store.put(STOCK_CELL, "stock", "item0", {"qty": 5})
        await n.store.put(CELL, "visits", "k1", {"note": "local"})
        await n.store.put(CELL, "visits", "mine", {"only": "here"})
        await n.syncer.bootstrap()
        assert await n.store.get(STOCK_CELL, "stock", "item0") == {"qty": 22 + 5}
        doc = await n.store.get(CELL, "visits", "k1")
        assert doc == {"f": 26, "by": "edge-w", "note": "local"}
        assert await n.store.get(CELL, "visits", "mine") == {"only": "here"}

        assert (await n.syncer.sync_once()).errors == ()
        assert (await hub_rows(hub))[(STOCK_CELL, "stock", "item0")][1] == {"qty": 27}
        assert local(n) == states(await under(hub, CELL))


async def test_a_new_subscription_fetches_only_the_new_prefix(hub: Any, tmp_path: Path) -> None:
    async with AsyncExitStack() as stack:
        w = await writer(stack, hub, tmp_path)
        token = await hub.add_node("edge-n", CELL)
        async with AsyncExitStack() as before:
            n = await before.enter_async_context(
                edge(before, tmp_path, "edge-n", hub.url, token, subscriptions=[ALERTS])
            )
            assert await n.syncer.bootstrap() == 1
            assert (await n.syncer.sync_once()).errors == ()
        # Stock changes the edge's cursors have passed over (it did not subscribe then) and
        # changes after them: the snapshot holds the first, the feed must add only the rest.
        await w.store.put(STOCK_CELL, "stock", "item1", {"qty": 1000})
        assert (await w.syncer.sync_once()).errors == ()

        n = await stack.enter_async_context(
            edge(stack, tmp_path, "edge-n", hub.url, token, subscriptions=[ALERTS, STOCK_CELL])
        )
        assert await n.store.needs_bootstrap(n.syncer.subscriptions)
        calls = record_snapshots(n)
        assert await n.syncer.bootstrap() == 3
        assert {c[0] for c in calls} == {STOCK_CELL}
        assert sorted(await n.store.bootstrapped()) == [ALERTS, STOCK_CELL]
        await w.store.put(STOCK_CELL, "stock", "item1", {"qty": 1})
        assert (await w.syncer.sync_once()).errors == ()
        assert (await n.syncer.sync_once()).errors == ()
        assert local(n) == states(await under(hub, ALERTS, STOCK_CELL))
        assert await n.store.get(STOCK_CELL, "stock", "item1") == {"qty": 2 + 5 + 8 + 11 + 1001}


def copy_db(src: Path, dst: Path) -> None:
    """A consistent copy through SQLite's backup API (what a backup tool would make)."""
    with sqlite3.connect(src) as a, sqlite3.connect(dst) as b:
        a.backup(b)
    a.close()
    b.close()


async def lose_store(e: Edge, stack: AsyncExitStack) -> None:
    await stack.aclose()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{e.store.path}{suffix}").unlink(missing_ok=True)


@pytest.mark.parametrize("order", ["push_first", "bootstrap_first"])
async def test_a_lost_store_numbers_new_changes_after_the_hubs(
    hub: Any, tmp_path: Path, order: str
) -> None:
    async with AsyncExitStack() as stack:
        await writer(stack, hub, tmp_path)
        token = await hub.add_node("edge-l", CELL)
        old_stack = AsyncExitStack()
        old = await old_stack.enter_async_context(
            edge(old_stack, tmp_path, "edge-l", hub.url, token)
        )
        for i in range(5):
            await old.store.put(CELL, "visits", f"l{i}", {"v": i})
        assert (await old.syncer.sync_once()).errors == ()
        await lose_store(old, old_stack)

        # The new file knows nothing yet: its first changes get seqs 1 and 2 again.
        n = await stack.enter_async_context(
            edge(stack, tmp_path, "edge-l", hub.url, token, learn=False)
        )
        await n.store.put(CELL, "visits", "after-loss", {"v": 1})
        await n.store.put(CELL, "visits", "l0", {"v": "new"})
        if order == "push_first":
            assert await n.syncer.push_lane(Tier.STANDARD.priority) == 2
            await n.syncer.bootstrap()
        else:
            await n.syncer.bootstrap()
            assert await n.syncer.push_lane(Tier.STANDARD.priority) == 2
        feed = await hub.hub.pool.fetch(
            "SELECT key, seq FROM feed WHERE node_id = 'edge-l' ORDER BY seq"
        )
        assert [(r["key"], r["seq"]) for r in feed] == [
            *((f"l{i}", i + 1) for i in range(5)),
            ("after-loss", 6),
            ("l0", 7),
        ]
        assert (await n.syncer.sync_once()).errors == ()
        assert local(n) == states(await under(hub, CELL))
        assert await n.store.get(CELL, "visits", "l0") == {"v": "new"}


async def test_an_older_copy_of_a_store_is_refused(hub: Any, tmp_path: Path) -> None:
    token = await hub.add_node("edge-b", CELL)
    backup = tmp_path / "backup.db"
    async with AsyncExitStack() as stack:
        e = await stack.enter_async_context(edge(stack, tmp_path, "edge-b", hub.url, token))
        await e.store.put(CELL, "visits", "a", {"v": 1})
        assert (await e.syncer.sync_once()).errors == ()
        path = e.store.path
    copy_db(path, backup)
    async with AsyncExitStack() as stack:
        e = await stack.enter_async_context(edge(stack, tmp_path, "edge-b", hub.url, token))
        await e.store.put(CELL, "visits", "b", {"v": 2})
        assert (await e.syncer.sync_once()).errors == ()
    copy_db(backup, path)
    async with AsyncExitStack() as stack:
        e = await stack.enter_async_context(
            edge(stack, tmp_path, "edge-b", hub.url, token, learn=False)
        )
        with pytest.raises(SequenceError) as behind:  # told before anything is pushed
            await e.syncer.learn_config()
        assert behind.value.code == "store_behind_hub"
        # Written to, the copy's seqs catch up with the hub's: the hub tells by the stamps.
        await e.store.put(CELL, "visits", "c", {"v": 3})
        with pytest.raises(SequenceError) as refused:
            await e.syncer.push_lane(Tier.STANDARD.priority)
        assert refused.value.code == "seq_reused"
        assert "backup" in refused.value.message and refused.value.detail["seqs"] == [2]
        batch = await e.store.outbox.next_batch(limit=10, lanes=[Tier.STANDARD.priority])
        assert batch is not None and [c.key for c in batch.changes] == ["c"]  # nothing dropped
