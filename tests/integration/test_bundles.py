"""Store-and-forward bundles against a real hub: an edge that never touches the network
converges through bundles alone; any mix of bundles and network ends converged with no
change counted twice; tampered, cut, replayed and foreign bundles change nothing."""

from __future__ import annotations

import random
from collections import Counter
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest

from support.edges import CELL, RESOLVERS, SEED, STOCK_CELL, edge, edge_rows, hub_rows
from syncengine.bundle import BundleError
from syncengine.edge.bundles import export_outbox, import_reply
from syncengine.edge.store import EdgeStore
from syncengine.hub.bundles import export_reply, import_outbox
from syncengine.tiers import TierRules

pytestmark = pytest.mark.integration

RULES = TierRules.from_config(
    [{"prefix": f"{CELL}/alerts", "tier": "critical"}, {"prefix": STOCK_CELL, "tier": "important"},
     {"prefix": f"{CELL}/2019", "tier": "archive"}],
    source="test",
    region="west",
)


def under_cell(rows: dict[Any, Any]) -> dict[Any, bytes]:
    return {k: v[0] for k, v in rows.items() if k[0] == CELL or k[0].startswith(CELL + "/")}


class Courier:
    """Carries bundles between one edge store and the hub, numbering the files."""

    def __init__(self, hub: Any, store: EdgeStore, token: str, folder: Path) -> None:
        self.hub, self.store, self.token, self.folder = hub, store, token, folder
        self.n = 0

    def path(self, what: str) -> Path:
        self.n += 1
        return self.folder / f"{self.n:03d}-{what}.bundle"

    async def to_hub(self) -> tuple[Path, Path]:
        out = self.path("outbox")
        await export_outbox(self.store, out, token=self.token)
        reply = self.path("reply")
        done = await import_outbox(self.hub.hub.pool, self.hub.config, out)
        assert done["refused"] == []
        await export_reply(self.hub.hub.pool, self.hub.config, self.store.node_id, reply,
                           since=done["cursors"] or None)
        return out, reply

    async def to_edge(self, reply: Path) -> dict[str, Any]:
        return await import_reply(self.store, reply, token=self.token)


async def test_an_edge_with_no_network_converges_through_bundles(hub: Any, tmp_path: Path) -> None:
    added: Counter[str] = Counter()
    async with AsyncExitStack() as stack:
        w = await stack.enter_async_context(
            edge(stack, tmp_path, "edge-w", hub.url, await hub.add_node("edge-w", CELL)))
        token = await hub.add_node("edge-b", CELL)
        b = await stack.enter_async_context(EdgeStore.open(
            tmp_path / "edge-b.db", node_id="edge-b", region="west", tier_rules=RULES,
            resolvers=RESOLVERS))
        courier = Courier(hub, b, token, tmp_path)
        for rnd in range(3):
            for i in range(20):
                await b.put(CELL, "visits", f"b{rnd}-{i}", {"i": i})
                await b.put(STOCK_CELL, "stock", "item", {"qty": 1})
                await w.store.put(STOCK_CELL, "stock", "item", {"qty": 2})
                await w.store.put(CELL, "visits", f"w{rnd}-{i}", {"i": i})
                added["item"] += 3
            assert (await w.syncer.sync_once()).errors == ()
            _, reply = await courier.to_hub()
            done = await courier.to_edge(reply)
            assert done["acknowledged"] == 40 and done["applied"] == 40 * (rnd + 1) - 40 * rnd
        assert await b.outbox.next_batch() is None
        at_hub = await hub_rows(hub)
        assert at_hub[(STOCK_CELL, "stock", "item")][1] == {"qty": added["item"]}
        assert {k: s for k, (s, _) in edge_rows(b.path).items()} == under_cell(at_hub)


async def test_any_mix_of_bundles_and_network_converges(hub: Any, tmp_path: Path) -> None:
    rng = random.Random(SEED)
    added = 0
    async with AsyncExitStack() as stack:
        token = await hub.add_node("edge-m", CELL)
        e = await stack.enter_async_context(edge(stack, tmp_path, "edge-m", hub.url, token))
        w = await stack.enter_async_context(
            edge(stack, tmp_path, "edge-w", hub.url, await hub.add_node("edge-w", CELL)))
        courier = Courier(hub, e.store, token, tmp_path)
        outboxes: list[Path] = []
        replies: list[Path] = []
        for step in range(120):
            roll = rng.random()
            if roll < 0.4:
                who = rng.choice([e.store, w.store])
                await who.put(STOCK_CELL, "stock", "item", {"qty": 1})
                await who.put(CELL, "visits", f"k{rng.randrange(8)}", {"s": step})
                added += 1
            elif roll < 0.55:
                assert (await e.syncer.sync_once()).errors == ()
            elif roll < 0.65:
                assert (await w.syncer.sync_once()).errors == ()
            elif roll < 0.8:
                out, reply = await courier.to_hub()
                outboxes.append(out)
                replies.append(reply)
            elif roll < 0.9 and replies:
                await courier.to_edge(rng.choice(replies))  # any reply, maybe old, maybe again
            elif outboxes:  # an old outbox bundle arrives at the hub once more
                done = await import_outbox(hub.hub.pool, hub.config, rng.choice(outboxes))
                assert done["refused"] == []
        for _ in range(2):
            assert (await w.syncer.sync_once()).errors == ()
            assert (await e.syncer.sync_once()).errors == ()
        feed = await hub.hub.pool.fetch("SELECT node_id, hlc FROM feed")
        assert len(feed) == len({(r["node_id"], r["hlc"]) for r in feed})  # each change once
        at_hub = await hub_rows(hub)
        assert at_hub[(STOCK_CELL, "stock", "item")][1] == {"qty": added}
        assert {k: s for k, (s, _) in edge_rows(e.store.path).items()} == under_cell(at_hub)
        assert len(outboxes) > 5 and len(replies) > 5


async def test_bad_bundles_change_nothing(hub: Any, tmp_path: Path) -> None:
    async with AsyncExitStack() as stack:
        token = await hub.add_node("edge-x", CELL)
        other_token = await hub.add_node("edge-y", CELL)
        x = await stack.enter_async_context(EdgeStore.open(
            tmp_path / "x.db", node_id="edge-x", region="west", tier_rules=RULES))
        y = await stack.enter_async_context(EdgeStore.open(
            tmp_path / "y.db", node_id="edge-y", region="west", tier_rules=RULES))
        for i in range(5):
            await x.put(CELL, "visits", f"x{i}", {"i": i})
        good = tmp_path / "good.bundle"
        await export_outbox(x, good, token=token)
        raw = good.read_bytes()

        async def feed_size() -> int:
            return int(await hub.hub.pool.fetchval("SELECT count(*) FROM feed"))

        cases = {
            "bundle_tampered": raw[:-40] + bytes([raw[-40] ^ 1]) + raw[-39:],
            "bundle_truncated": raw[: len(raw) // 2],
        }
        for code, data in cases.items():
            bad = tmp_path / f"{code}.bundle"
            bad.write_bytes(data)
            with pytest.raises(BundleError) as info:
                await import_outbox(hub.hub.pool, hub.config, bad)
            assert info.value.code == code, info.value
            assert await feed_size() == 0
        # Another region's bundle, signed with the right key: refused all the same.
        east = await stack.enter_async_context(EdgeStore.open(
            tmp_path / "east.db", node_id="edge-x", region="east"))
        await east.put("east/ke/nairobi", "visits", "e1", {"i": 1})
        foreign = tmp_path / "foreign.bundle"
        await export_outbox(east, foreign, token=token)
        with pytest.raises(BundleError) as info:
            await import_outbox(hub.hub.pool, hub.config, foreign)
        assert info.value.code == "bundle_foreign" and await feed_size() == 0

        # The good one applies once; again, it is a no-op.
        first = await import_outbox(hub.hub.pool, hub.config, good)
        again = await import_outbox(hub.hub.pool, hub.config, good)
        assert (first["applied"], again["applied"]) == (5, 0) and await feed_size() == 5

        # A reply for x cannot be applied by y (another key), nor tampered with.
        reply = tmp_path / "reply.bundle"
        await export_reply(hub.hub.pool, hub.config, "edge-x", reply, since=0)
        with pytest.raises(BundleError) as info:
            await import_reply(y, reply, token=other_token)
        assert info.value.code == "bundle_tampered"
        assert edge_rows(y.path) == {}
        with pytest.raises(BundleError):
            await import_reply(x, good, token=token)  # an outbox bundle is not a reply
        done = await import_reply(x, reply, token=token)
        assert done["acknowledged"] == 5 and await x.outbox.next_batch() is None
