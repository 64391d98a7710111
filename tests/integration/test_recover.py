"""`syncengine edge recover` on a store whose file has pages overwritten: every outbox change
that can still be read reaches the hub exactly once, the damaged file is kept aside, and
the new store holds the hub's state."""

from __future__ import annotations

import asyncio
import sqlite3
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from support.edges import CELL, STOCK_CELL, edge, edge_rows, hub_rows
from syncengine.cli import cli

pytestmark = pytest.mark.integration

PAGE = 4096


def outbox_pages(path: Path) -> list[int]:
    """The pages holding the outbox's rows (leaf pages of its b-tree)."""
    with sqlite3.connect(path) as conn:
        return [
            p
            for (p,) in conn.execute(
                "SELECT pageno FROM dbstat WHERE name = 'outbox' AND pagetype = 'leaf' "
                "ORDER BY pageno"
            )
        ]


def readable_rows(path: Path, wanted: list[tuple[int, int, int]]) -> set[int]:
    """The hlcs of the ``(lane, seq, hlc)`` rows a point read still returns intact."""
    found = set()
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
        for lane, seq, hlc in wanted:
            try:
                row = conn.execute(
                    "SELECT hlc FROM outbox WHERE lane = ? AND seq = ?", (lane, seq)
                ).fetchone()
            except sqlite3.DatabaseError:
                continue
            if row is not None and row[0] == hlc:
                found.add(hlc)
    return found


async def test_recover_keeps_every_readable_change(hub: Any, tmp_path: Path) -> None:
    token = await hub.add_node("edge-d", CELL)
    async with AsyncExitStack() as stack:
        e = await stack.enter_async_context(edge(stack, tmp_path, "edge-d", hub.url, token))
        for i in range(300):  # these reach the hub before the damage
            await e.store.put(CELL, "visits", f"early-{i}", {"i": i})
        assert (await e.syncer.sync_once()).errors == ()
        for i in range(2000):  # these are only in the file's outbox
            await e.store.put(CELL, "visits", f"late-{i}", {"i": i, "pad": "x" * 80})
            await e.store.put(STOCK_CELL, "stock", f"item{i % 5}", {"qty": 1})
        path = e.store.path
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        queued = conn.execute("SELECT lane, seq, hlc FROM outbox ORDER BY lane, seq").fetchall()
    assert len(queued) == 4000

    # Overwrite three pages in the middle of the outbox.
    pages = outbox_pages(path)
    raw = bytearray(path.read_bytes())
    for page in pages[len(pages) // 3 : len(pages) // 3 + 3]:
        raw[(page - 1) * PAGE : page * PAGE] = b"\x5a" * PAGE
    path.write_bytes(bytes(raw))
    readable = readable_rows(path, queued)
    assert 3000 < len(readable) < 4000, len(readable)  # damaged, but mostly readable

    config = tmp_path / "edge-d.toml"
    (tmp_path / "token").write_text(token)
    config.write_text(
        f'node_id = "edge-d"\nregion = "west"\ndb = "{path}"\nhub_url = "{hub.url}"\n'
        f'token_file = "token"\nsubscriptions = ["{CELL}"]\n'
    )
    runner = CliRunner()
    result = await asyncio.to_thread(
        runner.invoke, cli, ["edge", "recover", "--config", str(config)]
    )
    assert result.exit_code == 0, result.output
    assert f"{len(readable)} changes salvaged" in result.output
    damaged = list(tmp_path.glob("edge-d.db.damaged-*"))
    assert [p.name for p in damaged if not p.name.endswith(("-wal", "-shm"))]

    synced = await asyncio.to_thread(
        runner.invoke, cli, ["edge", "sync", "--config", str(config), "--now"]
    )
    assert synced.exit_code == 0, synced.output
    feed = await hub.hub.pool.fetch("SELECT hlc, key FROM feed WHERE node_id = 'edge-d'")
    at_hub = [r["hlc"] for r in feed]
    assert len(at_hub) == len(set(at_hub))  # nothing twice
    assert readable <= set(at_hub)  # everything readable arrived
    # Counters count exactly the increments that arrived.
    stock_hlcs = {r["hlc"] for r in feed if r["key"].startswith("item")}
    rows = await hub_rows(hub)
    total = sum(doc["qty"] for (c, coll, _), (_, doc) in rows.items() if coll == "stock")
    assert total == len(stock_hlcs)
    assert {k: s for k, (s, _) in edge_rows(path).items()} == {k: s for k, (s, _) in rows.items()}
