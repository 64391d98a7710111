"""Edges for integration tests: a store, link and syncer of one node against a test hub,
and the rows of both sides read straight from their databases."""

from __future__ import annotations

import json
import random
import sqlite3
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from syncengine.edge.link import HubLink
from syncengine.edge.store import EdgeStore
from syncengine.edge.sync import Backoff, Syncer

CELL = "west/ng/lagos/clinic-12"
ALERTS = f"{CELL}/alerts"  # critical by the hub fixture's rules
STOCK_CELL = f"{CELL}/stock"  # important
ARCHIVE = f"{CELL}/2019"  # archive
SEED = 20240611
RESOLVERS = {"stock": "counter"}


@dataclass
class Edge:
    name: str
    store: EdgeStore
    link: HubLink
    syncer: Syncer


@asynccontextmanager
async def edge(
    stack: AsyncExitStack,
    tmp_path: Path,
    name: str,
    url: str,
    token: str,
    *,
    learn: bool = True,
    **syncer_kw: Any,
) -> AsyncIterator[Edge]:
    """Store, link and syncer of node ``name`` (closed with ``stack``). ``wall`` goes to the
    store, ``timeout_s`` to the link, other keywords to the :class:`Syncer` (whose
    ``subscriptions`` default to ``[CELL]``)."""
    store = await stack.enter_async_context(
        EdgeStore.open(
            tmp_path / f"{name}.db", node_id=name, region="west", wall=syncer_kw.pop("wall", None)
        )
    )
    link = await stack.enter_async_context(
        HubLink(url, token, node_id=name, timeout_s=syncer_kw.pop("timeout_s", 10.0))
    )
    syncer_kw.setdefault("backoff", Backoff(rng=random.Random(SEED)))
    syncer_kw.setdefault("subscriptions", [CELL])
    syncer = Syncer(store, link, **syncer_kw)
    if learn:
        # Before any write: lanes and resolvers must be the hub's from the first change.
        await syncer.learn_config()
    yield Edge(name, store, link, syncer)


def edge_rows(path: Path) -> dict[tuple[str, str, str], tuple[bytes, str | None]]:
    """``records`` read straight from the SQLite file, as an operator would."""
    conn = sqlite3.connect(path)
    try:
        return {
            (c, coll, k): (bytes(state), doc)
            for c, coll, k, state, doc in conn.execute(
                "SELECT cell, collection, key, state, doc FROM records"
            )
        }
    finally:
        conn.close()


async def hub_rows(hub: Any) -> dict[tuple[str, str, str], tuple[bytes, Any]]:
    rows = await hub.hub.pool.fetch("SELECT cell, collection, key, state, doc FROM records")
    return {
        (r["cell"], r["collection"], r["key"]): (
            bytes(r["state"]),
            None if r["doc"] is None else json.loads(r["doc"]),
        )
        for r in rows
    }


async def feed_count(hub: Any) -> int:
    return int(await hub.hub.pool.fetchval("SELECT count(*) FROM feed"))
