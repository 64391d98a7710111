"""The edge's side of store-and-forward bundles (see :mod:`syncengine.bundle`)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any, Final

from syncengine.bundle import BundleError, bundle_key, now_iso, open_bundle, write_bundle
from syncengine.edge.store import EdgeStore
from syncengine.errors import SequenceError
from syncengine.protocol import PushBatch, decode_pull_page, encode_push
from syncengine.tiers import Tier

__all__ = ["export_outbox", "import_reply"]

#: Changes per push batch inside a bundle: below every hub's max_batch_changes.
BATCH: Final = 500


async def export_outbox(
    store: EdgeStore, path: Path, *, token: str, tiers: Iterable[Tier] = tuple(Tier)
) -> dict[str, Any]:
    """Write the queued changes of ``tiers`` and the pull cursors to a bundle; return its
    manifest. The outbox is left as it is: changes leave it when an acknowledgement (a
    reply bundle, or the network) says the hub holds them."""
    batches: list[dict[str, Any]] = []
    seqs: dict[str, list[int]] = {}
    changes = 0
    for tier in sorted(set(tiers), key=lambda t: t.priority):
        lane = tier.priority
        after: int | None = None
        while True:
            batch = await store.outbox.next_batch(
                limit=BATCH, lanes=[lane], after=None if after is None else {lane: after}
            )
            if batch is None:
                break
            message = PushBatch(
                node=store.node_id,
                lane=lane,
                first_seq=batch.first_seq,
                last_seq=batch.last_seq,
                skipped=list(batch.skipped),
                changes=list(batch.changes),
            )
            batches.append(encode_push(message))
            changes += len(batch.changes)
            seqs.setdefault(tier.value, [batch.first_seq, batch.last_seq])[1] = batch.last_seq
            after = batch.last_seq
    cursors = {t.value: await store.cursor(f"pull:{t.value}") for t in Tier}
    manifest = {
        "kind": "outbox",
        "node": store.node_id,
        "region": store.region,
        "created_at": now_iso(),
        "changes": changes,
        "batches": len(batches),
        "seqs": seqs,
        "cursors": cursors,
    }
    size = write_bundle(path, manifest, {"batches": batches, "cursors": cursors}, bundle_key(token))
    return {**manifest, "bytes": size}


async def import_reply(store: EdgeStore, path: Path, *, token: str) -> dict[str, Any]:
    """Apply a reply bundle from the hub: its pages like pulls (entries at or below a
    tier's cursor are skipped, so an old or repeated bundle changes nothing) and its
    acknowledgements (the outbox drops what the hub holds). Nothing is applied unless the
    whole bundle verifies."""
    bundle = open_bundle(path, bundle_key(token))
    manifest, payload = bundle.manifest, bundle.payload
    if manifest.get("kind") != "reply":
        raise BundleError(
            f"{path} is an {manifest.get('kind')!r} bundle; the edge imports the hub's replies",
            hint="Import edge bundles on the hub: `syncengine hub import-bundle`.",
        )
    _check_owner(manifest, store, path)
    if await store.bootstrap_progress() is not None:
        raise SequenceError(
            "a bootstrap of this store is unfinished; a reply bundle is applied after it",
            hint="Finish it with `syncengine edge bootstrap` when a link exists.",
            code="bootstrap_incomplete",
        )
    pages = []
    for entry in payload.get("pages", []):
        tier = Tier(entry["tier"])
        page = decode_pull_page(entry["page"])
        pages.append((tier, page))
    applied = 0
    for tier, page in pages:
        name = f"pull:{tier.value}"
        cursor = await store.cursor(name)
        fresh = [(i, c) for i, c in zip(page.ids, page.changes, strict=True) if i > cursor]
        if page.next_cursor <= cursor:
            continue
        applied += await store.apply_remote(
            [c for _, c in fresh],
            cursor=page.next_cursor,
            cursor_name=name,
            ids=[i for i, _ in fresh],
        )
    acked = payload.get("acked", [])
    dropped = 0
    for lane, seq in enumerate(acked):
        if isinstance(seq, int) and seq > 0:
            issued = await store.outbox.last_issued(lane)
            if seq > issued:
                raise SequenceError(
                    f"the bundle says the hub holds seq {seq} of lane {Tier.from_priority(lane)}, "
                    f"but this store issued only up to {issued}",
                    hint="This file is not the store the hub knows for this node: see "
                    "`syncengine edge recover`.",
                )
            dropped += await store.outbox.ack(lane, seq)
    return {"applied": applied, "acknowledged": dropped, "created_at": manifest.get("created_at")}


def _check_owner(manifest: dict[str, Any], store: EdgeStore, path: Path) -> None:
    if manifest.get("region") != store.region:
        raise BundleError(
            f"{path} is for region {manifest.get('region')!r}, this node is in {store.region!r}",
            hint="Nothing was applied: the bundle belongs to another region.",
            code="bundle_foreign",
        )
    if manifest.get("node") != store.node_id:
        raise BundleError(
            f"{path} is for node {manifest.get('node')!r}, this is {store.node_id!r}",
            hint="Nothing was applied: give each node its own bundle.",
            code="bundle_foreign",
        )
