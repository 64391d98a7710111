"""The hub's side of store-and-forward bundles (see :mod:`syncengine.bundle`).

An edge's outbox bundle is applied exactly like its pushes — the same decoding, checks,
dedup, merge, conflict log and grants — batch by batch; a reply bundle holds what the node
would pull and what the hub holds of it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import asyncpg

from syncengine.bundle import BundleError, now_iso, open_bundle, peek_manifest, write_bundle
from syncengine.clock import HybridClock
from syncengine.config import HubConfig
from syncengine.errors import AuthenticationError, SyncError
from syncengine.hub import push
from syncengine.hub.db import translated
from syncengine.hub.feed import read_page
from syncengine.hub.nodes import Node
from syncengine.hub.snapshot import acked_seqs
from syncengine.protocol import MAX_PULL_LIMIT, decode_push, encode_pull_page
from syncengine.tiers import Tier

__all__ = ["export_reply", "import_outbox"]


async def _node_and_key(pool: asyncpg.Pool, node_id: object, path: Path) -> tuple[Node, bytes]:
    if not isinstance(node_id, str):
        raise BundleError(f"{path}: the manifest names no node")
    async with translated("bundle"):
        row = await pool.fetchrow(
            "SELECT node_id, region, grants, last_seen, revoked_at, token_hash FROM nodes "
            "WHERE node_id = $1",
            node_id,
        )
    if row is None:
        raise BundleError(
            f"{path} is from node {node_id!r}, which this hub does not know",
            hint="Import it at the hub of the node's region; nothing was applied.",
            code="bundle_foreign",
        )
    if row["revoked_at"] is not None:
        raise AuthenticationError(
            f"node {node_id!r} is revoked; its bundles are refused",
            code="revoked_token",
        )
    node = Node(
        node_id=row["node_id"],
        region=row["region"],
        grants=tuple(row["grants"]),
        last_seen=row["last_seen"],
    )
    return node, bytes(row["token_hash"])


async def import_outbox(pool: asyncpg.Pool, config: HubConfig, path: Path) -> dict[str, Any]:
    """Verify an edge's outbox bundle and apply its batches like pushes. Returns what was
    applied, what the hub refused (per batch, with the reason; that lane stops there, as
    its later seqs would be a gap) and the node's acknowledged seqs afterwards."""
    node, key = await _node_and_key(pool, peek_manifest(path).get("node"), path)
    bundle = open_bundle(path, key)
    manifest = bundle.manifest
    if manifest.get("kind") != "outbox":
        raise BundleError(
            f"{path} is a {manifest.get('kind')!r} bundle; the hub imports edges' outboxes",
            hint="Import replies on the edge: `syncengine edge import-bundle`.",
        )
    if manifest.get("region") != config.region:
        raise BundleError(
            f"{path} is for region {manifest.get('region')!r}; this hub serves {config.region!r}",
            hint="Import it at that region's hub; nothing was applied.",
            code="bundle_foreign",
        )
    clock = HybridClock(max_drift_ms=config.max_clock_drift_s * 1000)
    resolvers = dict(config.resolvers)
    batches = []
    for raw in bundle.payload.get("batches", []):
        batch = decode_push(
            raw,
            max_changes=config.max_batch_changes,
            max_record_bytes=config.max_record_bytes,
        )
        if batch.node != node.node_id:
            raise BundleError(
                f"{path}: a batch of node {batch.node!r} in {node.node_id!r}'s bundle"
            )
        push.check_batch(node, batch, region=config.region, clock=clock, resolvers=resolvers)
        batches.append(batch)
    applied = conflicts = 0
    refused: list[dict[str, Any]] = []
    stopped: set[int] = set()
    async with push.Applier(
        pool,
        region=config.region,
        clock=clock,
        tier_rules=config.tier_rules,
        resolvers=resolvers,
    ) as applier:
        for batch in batches:
            if batch.lane in stopped:
                continue
            try:
                result = await push.apply_push(applier, node, batch)
            except SyncError as exc:
                if exc.http_status >= 500:
                    raise
                stopped.add(batch.lane)
                refused.append(
                    {
                        "tier": Tier.from_priority(batch.lane).value,
                        "first_seq": batch.first_seq,
                        "last_seq": batch.last_seq,
                        "code": exc.code,
                        "message": exc.message,
                    }
                )
                continue
            applied += result.answer.applied
            conflicts += result.answer.conflicts
    async with translated("bundle"):
        acked = await acked_seqs(pool, node.node_id)
    return {
        "node": node.node_id,
        "batches": len(batches),
        "applied": applied,
        "conflicts": conflicts,
        "refused": refused,
        "acked": acked,
        "cursors": manifest.get("cursors") or {},
    }


async def export_reply(
    pool: asyncpg.Pool,
    config: HubConfig,
    node_id: str,
    path: Path,
    *,
    since: Mapping[str, int] | int | None = None,
) -> dict[str, Any]:
    """Write what ``node_id`` would pull (under its grants, after ``since`` — a cursor per
    tier, one for all, or what the hub last saw it pull) and the seqs the hub holds of it."""
    node, key = await _node_and_key(pool, node_id, path)
    clock = HybridClock(max_drift_ms=config.max_clock_drift_s * 1000)
    if since is None:
        async with translated("bundle"):
            rows = await pool.fetch(
                "SELECT tier, cursor FROM node_pulls WHERE node_id = $1", node_id
            )
        since = {Tier.from_priority(r["tier"]).value: r["cursor"] for r in rows}
    start = {t.value: since if isinstance(since, int) else int(since.get(t.value, 0)) for t in Tier}
    pages: list[dict[str, Any]] = []
    cursors: dict[str, int] = {}
    changes = 0
    async with translated("bundle"):
        for tier in Tier:
            after = start[tier.value]
            while True:
                page = await read_page(
                    pool,
                    node_id=node_id,
                    tier=tier.priority,
                    prefixes=list(node.grants),
                    after=after,
                    limit=MAX_PULL_LIMIT,
                    clock=clock,
                )
                pages.append({"tier": tier.value, "page": encode_pull_page(page)})
                changes += len(page.changes)
                after = page.next_cursor
                if not page.more:
                    break
            cursors[tier.value] = after
        acked = await acked_seqs(pool, node_id)
    manifest = {
        "kind": "reply",
        "node": node_id,
        "region": config.region,
        "created_at": now_iso(),
        "since": start,
        "cursors": cursors,
        "changes": changes,
        "acked": acked,
    }
    size = write_bundle(path, manifest, {"pages": pages, "acked": acked}, key)
    return {**manifest, "bytes": size}
