"""Archive eviction against a real hub: records the hub acknowledged are dropped locally
after the tier's delay, never while a change of theirs is queued; reading one fetches it
back from the hub, or says clearly that it cannot while offline; pulls do not resurrect
partial copies; `syncengine edge get` reads through."""

from __future__ import annotations

import asyncio
import json
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from support.edges import ARCHIVE, CELL, Edge, edge, edge_rows, hub_rows
from support.servers import free_port
from syncengine.cli import cli
from syncengine.edge.link import HubLink
from syncengine.edge.store import EdgeStore
from syncengine.edge.sync import Syncer
from syncengine.errors import NotAvailableOffline
from syncengine.tiers import Tier, load_policies

pytestmark = pytest.mark.integration

DAY_MS = 86_400_000
POLICIES = load_policies()  # archive: evict 14 days after the hub's acknowledgement
LATER = 15 * DAY_MS  # past the archive tier's delay


def later_ms() -> int:
    return int(time.time() * 1000) + LATER


async def archived(hub: Any, tmp_path: Path, stack: AsyncExitStack, name: str = "edge-e") -> Edge:
    """An edge with five archive records and one standard record, all acknowledged."""
    token = await hub.add_node(name, CELL)
    e = await stack.enter_async_context(edge(stack, tmp_path, name, hub.url, token))
    for i in range(5):
        await e.store.put(ARCHIVE, "visits", f"old{i}", {"year": 2019, "i": i})
    await e.store.put(CELL, "visits", "current", {"year": 2026})
    assert (await e.syncer.sync_once()).errors == ()
    return e


async def test_acknowledged_archive_records_are_evicted_after_the_delay(
    hub: Any, tmp_path: Path
) -> None:
    async with AsyncExitStack() as stack:
        e = await archived(hub, tmp_path, stack)
        assert POLICIES[Tier.ARCHIVE].evict_after_s == 14 * 86_400
        assert await e.store.evict(policies=POLICIES) == 0  # acknowledged just now: kept
        await e.store.put(ARCHIVE, "visits", "old0", {"note": "queued"})  # not pushed yet

        assert await e.store.evict(policies=POLICIES, now_ms=later_ms(), chunk=2) == 4
        left = edge_rows(e.store.path)
        assert (ARCHIVE, "visits", "old0") in left  # a queued change keeps it
        assert (CELL, "visits", "current") in left  # standard cells are never evicted
        assert not any(k[0] == ARCHIVE and k[2] != "old0" for k in left)
        for i in range(1, 5):
            assert await e.store.is_evicted(ARCHIVE, "visits", f"old{i}")
            with pytest.raises(NotAvailableOffline) as info:
                await e.store.get(ARCHIVE, "visits", f"old{i}")
            assert "evicted" in info.value.message
        assert await e.store.evict(policies=POLICIES, now_ms=later_ms()) == 0  # idempotent

        # Pushed and acknowledged, it goes too, at its own time.
        assert (await e.syncer.sync_once()).errors == ()
        assert await e.store.evict(policies=POLICIES, now_ms=later_ms()) == 1


async def test_reading_an_evicted_record_fetches_it_back(hub: Any, tmp_path: Path) -> None:
    async with AsyncExitStack() as stack:
        e = await archived(hub, tmp_path, stack)
        other = await archived(hub, tmp_path, stack, "edge-o")
        assert await e.store.evict(policies=POLICIES, now_ms=later_ms()) == 5

        # Another node changes an evicted record: a pull leaves it evicted (no partial copy).
        await other.store.put(ARCHIVE, "visits", "old1", {"seen_by": "other"})
        assert (await other.syncer.sync_once()).errors == ()
        assert (await e.syncer.sync_once()).errors == ()
        assert (ARCHIVE, "visits", "old1") not in edge_rows(e.store.path)
        assert await e.store.is_evicted(ARCHIVE, "visits", "old1")

        # A local write to an evicted record is kept and stays on top of the hub's copy.
        await e.store.put(ARCHIVE, "visits", "old2", {"fixed": True})

        assert await e.syncer.get(ARCHIVE, "visits", "old1") == {
            "year": 2019,
            "i": 1,
            "seen_by": "other",
        }
        assert await e.syncer.get(ARCHIVE, "visits", "old2") == {
            "year": 2019,
            "i": 2,
            "fixed": True,
        }
        assert not await e.store.is_evicted(ARCHIVE, "visits", "old1")
        assert await e.store.get(ARCHIVE, "visits", "old1") is not None  # local again
        at_hub = await hub_rows(hub)
        assert (
            edge_rows(e.store.path)[(ARCHIVE, "visits", "old1")][0]
            == at_hub[(ARCHIVE, "visits", "old1")][0]
        )
        assert (await e.syncer.sync_once()).errors == ()
        assert (await hub_rows(hub))[(ARCHIVE, "visits", "old2")][1] == {
            "year": 2019,
            "i": 2,
            "fixed": True,
        }
        assert await e.syncer.get(ARCHIVE, "visits", "never-written") is None

        # Offline: a clear error, and the record stays evicted for a later read.
        dead = await stack.enter_async_context(
            HubLink(f"http://127.0.0.1:{free_port()}", "se1_x", node_id="edge-e", timeout_s=2)
        )
        offline = Syncer(e.store, dead, subscriptions=[CELL])
        with pytest.raises(NotAvailableOffline) as info:
            await offline.get(ARCHIVE, "visits", "old3")
        assert "cannot be reached" in info.value.message
        assert info.value.detail["key"] == "old3"
        assert await e.store.is_evicted(ARCHIVE, "visits", "old3")
        assert await e.syncer.get(ARCHIVE, "visits", "old3") == {"year": 2019, "i": 3}


async def invoke(*args: str) -> Any:
    """Run the CLI in a worker thread: it calls asyncio.run, which cannot nest in our loop."""
    return await asyncio.to_thread(CliRunner().invoke, cli, list(args))


def edge_toml(tmp_path: Path, hub_url: str, token: str, name: str = "edge.toml") -> Path:
    (tmp_path / "token").write_text(token + "\n")
    path = tmp_path / name
    path.write_text(
        f'node_id = "edge-c"\nregion = "west"\ndb = "edge.db"\nhub_url = "{hub_url}"\n'
        f'token_file = "token"\nsubscriptions = ["{CELL}"]\n'
    )
    return path


async def test_edge_get_reads_an_evicted_record_through(hub: Any, tmp_path: Path) -> None:
    token = await hub.add_node("edge-c", CELL)
    config = edge_toml(tmp_path, hub.url, token)
    put = await invoke("edge", "put", "--config", str(config), ARCHIVE, "visits", "r", '{"a": 1}')
    assert put.exit_code == 0, put.output
    synced = await invoke("edge", "sync", "--config", str(config), "--now")
    assert synced.exit_code == 0, synced.output
    async with EdgeStore.open(tmp_path / "edge.db", node_id="edge-c", region="west") as store:
        assert await store.evict(policies=POLICIES, now_ms=later_ms()) == 1

    unreachable = edge_toml(tmp_path, f"http://127.0.0.1:{free_port()}", token, "offline.toml")
    result = await invoke("edge", "get", "--config", str(unreachable), ARCHIVE, "visits", "r")
    assert result.exit_code == 1
    assert "evicted" in result.output and "cannot be reached" in result.output

    result = await invoke("edge", "get", "--config", str(config), ARCHIVE, "visits", "r")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == {"a": 1}
