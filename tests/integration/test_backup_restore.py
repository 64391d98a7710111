"""Backup and restore of an edge store against a real hub: a backup taken during writes,
put back after the store it replaced went further, re-syncs with nothing lost and nothing
counted twice; bad backups are refused with the current store untouched."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from support.edges import CELL, STOCK_CELL, edge, edge_rows, hub_rows
from syncengine.cli import cli
from syncengine.edge.backup import backup_file, restore_backup
from syncengine.errors import ConfigError, CorruptStoreError, StorageError

pytestmark = pytest.mark.integration


def counters(rows: dict[tuple[str, str, str], tuple[bytes, Any]]) -> dict[str, Any]:
    return {
        k[2]: (json.loads(doc) if isinstance(doc, str) else doc)
        for k, (_, doc) in rows.items()
        if k[1] == "stock"
    }


async def test_a_restored_backup_resyncs_with_nothing_lost_or_doubled(
    hub: Any, tmp_path: Path
) -> None:
    token = await hub.add_node("edge-r", CELL)
    backup = tmp_path / "edge-r.backup.db"
    added: Counter[str] = Counter()  # stock item -> total qty added, by anyone
    async with AsyncExitStack() as stack:
        e = await stack.enter_async_context(edge(stack, tmp_path, "edge-r", hub.url, token))

        async def write(n: int, tag: str) -> None:
            for i in range(n):
                await e.store.put(STOCK_CELL, "stock", f"item{i % 3}", {"qty": 1})
                added[f"item{i % 3}"] += 1
                await e.store.put(CELL, "visits", f"{tag}{i}", {"i": i})

        await write(30, "before")
        assert (await e.syncer.sync_once()).errors == ()
        # The backup is taken while writes go on (some pushed, some queued in it).
        writing = asyncio.create_task(write(200, "during"))
        await asyncio.sleep(0.05)
        info = await backup_file(e.store.path, backup)
        await writing
        assert info.node_id == "edge-r" and info.records > 0
        # The store the backup will replace goes further: all of this reaches the hub.
        assert (await e.syncer.sync_once()).errors == ()
        await write(20, "after")
        assert (await e.syncer.sync_once()).errors == ()
        path = e.store.path

    _, aside = await restore_backup(backup, path, node_id="edge-r", region="west")
    assert aside is not None and aside.exists()  # moved aside, never deleted
    async with AsyncExitStack() as stack:
        e = await stack.enter_async_context(
            edge(stack, tmp_path, "edge-r", hub.url, token, learn=False)
        )
        # Written after the restore, before any contact: these reuse seqs the hub holds.
        await e.store.put(STOCK_CELL, "stock", "item0", {"qty": 7})
        added["item0"] += 7
        await e.store.put(CELL, "visits", "after-restore", {"ok": True})
        for _ in range(2):
            report = await e.syncer.sync_once()
            assert report.errors == (), report
        assert await e.store.outbox.dead_letters() == []

        feed = await hub.hub.pool.fetch("SELECT lane, seq FROM feed WHERE node_id = 'edge-r'")
        assert len(feed) == len({(r["lane"], r["seq"]) for r in feed}) == 2 * 250 + 2
        at_hub = await hub_rows(hub)
        assert counters(at_hub) == {k: {"qty": v} for k, v in added.items()}
        assert at_hub[(CELL, "visits", "after-restore")][1] == {"ok": True}
        assert all((CELL, "visits", f"after{i}") in at_hub for i in range(20))
        # The restored file pulled back what the replaced store wrote after the backup,
        # applying none of its own older changes twice.
        assert {k: s for k, (s, _) in edge_rows(e.store.path).items()} == {
            k: s for k, (s, _) in at_hub.items()
        }


async def invoke(*args: str) -> Any:
    return await asyncio.to_thread(CliRunner().invoke, cli, list(args))


def edge_toml(tmp_path: Path, node: str, hub_url: str = "http://127.0.0.1:9") -> Path:
    path = tmp_path / f"{node}.toml"
    path.write_text(
        f'node_id = "{node}"\nregion = "west"\ndb = "{node}.db"\nhub_url = "{hub_url}"\n'
        f'token = "se1_unused"\nsubscriptions = ["{CELL}"]\n'
    )
    return path


async def test_backup_and_restore_commands_refuse_bad_input(tmp_path: Path) -> None:
    config = edge_toml(tmp_path, "edge-c")
    put = await invoke("edge", "put", "--config", str(config), CELL, "visits", "a", '{"v": 1}')
    assert put.exit_code == 0, put.output
    copy = tmp_path / "copy.db"
    made = await invoke("edge", "backup", "--config", str(config), str(copy))
    assert made.exit_code == 0, made.output
    assert "1 records" in made.output and "1 changes not yet at the hub" in made.output

    again = await invoke("edge", "backup", "--config", str(config), str(copy))
    assert again.exit_code == 1 and "exists already" in again.output

    # Another node's backup, a damaged file, a missing file: refused, the store untouched.
    other = edge_toml(tmp_path, "edge-o")
    put = await invoke("edge", "put", "--config", str(other), CELL, "visits", "b", '{"v": 2}')
    assert put.exit_code == 0, put.output
    foreign = tmp_path / "foreign.db"
    await backup_file(tmp_path / "edge-o.db", foreign)
    with pytest.raises(ConfigError, match="belongs to node_id 'edge-o'"):
        await restore_backup(foreign, tmp_path / "edge-c.db", node_id="edge-c", region="west")
    damaged = tmp_path / "damaged.db"
    raw = bytearray(copy.read_bytes())
    raw[4096:] = b"\xff" * (len(raw) - 4096)  # every page after the schema's
    damaged.write_bytes(bytes(raw))
    with pytest.raises(CorruptStoreError):
        await restore_backup(damaged, tmp_path / "edge-c.db", node_id="edge-c", region="west")
    with pytest.raises(StorageError, match="does not exist"):
        await restore_backup(
            tmp_path / "nope.db", tmp_path / "edge-c.db", node_id="edge-c", region="west"
        )
    refused = await invoke("edge", "restore", "--config", str(config), str(foreign), "--yes")
    assert refused.exit_code == 1 and "edge-o" in refused.output
    got = await invoke("edge", "get", "--config", str(config), CELL, "visits", "a")
    assert got.exit_code == 0 and json.loads(got.output) == {"v": 1}

    # No confirmation on a terminal-less stdin: nothing happens.
    asked = await invoke("edge", "restore", "--config", str(config), str(copy))
    assert asked.exit_code == 1
    assert not list(tmp_path.glob("edge-c.db.replaced-*"))

    done = await invoke("edge", "restore", "--config", str(config), str(copy), "--yes")
    assert done.exit_code == 0, done.output
    assert "replaced file is" in done.output and list(tmp_path.glob("edge-c.db.replaced-*"))
    got = await invoke("edge", "get", "--config", str(config), CELL, "visits", "a")
    assert got.exit_code == 0 and json.loads(got.output) == {"v": 1}
