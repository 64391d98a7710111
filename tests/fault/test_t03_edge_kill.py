"""T3: kill -9 of a syncing, writing edge loses no acknowledged write (invariant 1).

A child process runs the real edge daemon against a live hub plus a writer using the public
``put`` (group commit on); it prints a key only after ``put`` returned, and only printed keys
count as acknowledged. The parent SIGKILLs it at a random moment (20 ms to 2 s) or arms one
crash point of the edge (put, group commit, push, pull) and lets the child kill itself there,
half the time each. Meanwhile another node writes to the same cells, so the child always has
pages to pull. Every tenth cycle is a bootstrap round instead: a new node bootstraps a cell
of 3,000 records with a bootstrap crash point armed, and is killed and restarted until done.

After every kill, the files are read with plain sqlite3 and the hub with plain SQL:
``integrity_check`` ok; every acknowledged write is in ``records``; every one the hub does
not hold yet is in the ``outbox``; every record the node wrote is at the hub or in the outbox.
At the end the child runs without faults until its outbox is empty: every acknowledged write
is at the hub exactly once, and the node holds every record of its cell that the hub holds.

The negative control runs the same loop against a store that acknowledges a group before its
transaction commits: the checks must find lost writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import sqlite3
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from fault.edge_proc import Child
from fault.harness import SEED, Summary, crashpoint_env, crashpoint_hits, pick
from syncengine.edge.link import HubLink
from syncengine.edge.store import EdgeStore
from syncengine.edge.sync import Syncer
from syncengine.tiers import TierRules

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CELL = "west/ng/lagos/clinic-12"
ALERTS, STOCK = f"{CELL}/alerts", f"{CELL}/stock"
KANO = "west/ng/kano/clinic-7"
RULES = [{"prefix": ALERTS, "tier": "critical"}, {"prefix": STOCK, "tier": "important"}]
POLICIES = {
    "important": {"push_interval_s": 1, "pull_interval_s": 1, "retry_interval_s": 1},
    "standard": {
        "offpeak_only": False,
        "push_interval_s": 2,
        "pull_interval_s": 2,
        "retry_interval_s": 1,
    },
    "critical": {"retry_interval_s": 1},
}
RATE = 100  # writes/s of the child
BOOTSTRAP_RECORDS = 3_000

#: The points a syncing, writing edge passes, each with the probability it fires per pass.
WRITE_POINTS = {
    "edge.put.before_commit": 0.05,
    "edge.put.after_commit_before_ack": 0.05,
    "edge.groupcommit.mid": 0.05,
    "push.after_send_before_response": 0.2,
    "push.after_ack_before_outbox_delete": 0.2,
    "pull.after_apply_before_commit": 0.3,
    "pull.after_commit_before_next_page": 0.3,
}
BOOTSTRAP_POINTS = {
    "bootstrap.after_page_before_commit": 0.4,
    "bootstrap.after_page_commit": 0.4,
}


def edge_config(tmp_path: Path, url: str, token: str, node: str, cell: str) -> dict[str, Any]:
    return {
        "node_id": node,
        "region": "west",
        "db": str(tmp_path / f"{node}.db"),
        "hub_url": url,
        "token": token,
        "subscriptions": [cell],
        "tier_rules": RULES,
        "resolvers": {"stock": "counter"},
        "tier_policies": POLICIES,
    }


def edge_state(db: Path) -> tuple[str, set[str], Counter[str]]:
    """(integrity, keys in records, keys in the outbox), read with plain sqlite3."""
    conn = sqlite3.connect(db)
    try:
        integrity = conn.execute("PRAGMA integrity_check").fetchone()[0]
        records = {k for (k,) in conn.execute("SELECT key FROM records")}
        outbox = Counter(k for (k,) in conn.execute("SELECT key FROM outbox"))
    finally:
        conn.close()
    return integrity, records, outbox


async def hub_keys(pool: Any, node: str) -> Counter[str]:
    """How often each key of ``node`` is in the hub's feed."""
    rows = await pool.fetch("SELECT key FROM feed WHERE node_id = $1", node)
    return Counter(r["key"] for r in rows)


@contextlib.asynccontextmanager
async def other_writer(hub: Any, tmp_path: Path) -> AsyncIterator[None]:
    """Node n2 fills the bootstrap cell, then keeps writing to the child's cells."""
    token = await hub.add_node("n2")
    rules = TierRules.from_config(RULES, source="test", region="west")
    async with (
        EdgeStore.open(tmp_path / "n2.db", node_id="n2", region="west", tier_rules=rules) as store,
        HubLink(hub.url, token, node_id="n2") as link,
    ):
        syncer = Syncer(store, link, subscriptions=[])
        await syncer.learn_config()
        await asyncio.gather(
            *(store.put(KANO, "beds", f"bed-{i}", {"n": i}) for i in range(BOOTSTRAP_RECORDS))
        )
        report = await syncer.sync_once()
        assert report.caught_up, report.errors
        stop = asyncio.Event()

        async def loop() -> None:
            i = 0
            while not stop.is_set():
                await store.put(ALERTS, "alarms", f"n2-a-{i}", {"n": i})
                await store.put(STOCK, "items", f"n2-i-{i}", {"n": i})
                with contextlib.suppress(Exception):
                    await syncer.sync_once()
                i += 1
                await asyncio.sleep(0.3)

        task = asyncio.create_task(loop())
        try:
            yield
        finally:
            stop.set()
            await task
            await syncer.sync_once()


class Loop:
    """The kill loop's state and checks, shared by the test and its negative control."""

    def __init__(self, tmp_path: Path, hub: Any, summary: Summary, env: dict[str, str]) -> None:
        self.tmp_path = tmp_path
        self.hub = hub
        self.summary = summary
        self.env = env
        self.rng = random.Random(SEED)
        self.log = tmp_path / "crashpoints.log"
        self.acked: set[str] = set()
        self.kills: Counter[str] = Counter()
        self.lost: set[str] = set()
        self.orphans: set[str] = set()
        self.integrity_failures = 0
        self.config: dict[str, Any] = {}

    async def setup(self) -> None:
        token = await self.hub.add_node("n1", "west")
        self.config = edge_config(self.tmp_path, self.hub.url, token, "n1", CELL)

    def _least_hit(self, points: dict[str, float]) -> str:
        hits = crashpoint_hits(self.log)
        low = min(hits.get(p, 0) for p in points)
        return self.rng.choice(sorted(p for p in points if hits.get(p, 0) == low))

    async def cycle(self, n: int, points: dict[str, float]) -> None:
        use_point = self.rng.random() < 0.5
        env = dict(self.env)
        if use_point:
            point = self._least_hit(points)
            env = crashpoint_env({point: points[point]}, self.log, env)
        child = await Child.start(self.config, f"c{n}", RATE, env)
        await asyncio.wait_for(child.ready.wait(), 30)
        if use_point and await child.dead_within(4.0):
            self.kills["crashpoint"] += 1
        else:
            await asyncio.sleep(self.rng.uniform(0.02, 2.0))
            self.kills["timer"] += 1
        code = await child.kill()
        assert code == -signal.SIGKILL, f"the edge child exited with {code}, not by SIGKILL"
        self.acked.update(child.acked)
        await self.check()

    async def check(self) -> None:
        """After a kill: nothing acknowledged lost, no record change without its outbox row."""
        integrity, records, outbox = edge_state(self.tmp_path / "n1.db")
        self.integrity_failures += integrity != "ok"
        at_hub = await hub_keys(self.hub.hub.pool, "n1")
        own = {k for k in records if k.startswith("c")}
        self.lost |= self.acked - records
        self.lost |= {k for k in self.acked - set(at_hub) if k not in outbox}
        self.orphans |= {k for k in own if k not in outbox and k not in at_hub}
        self.summary.counts["duplicated"] = sum(1 for n in outbox.values() if n > 1) + sum(
            1 for n in at_hub.values() if n > 1
        )

    async def bootstrap_round(self, n: int) -> None:
        """A new node bootstraps the Kano cell, killed at a bootstrap crash point."""
        node = f"b{n}"
        token = await self.hub.add_node(node, "west")
        config = edge_config(self.tmp_path, self.hub.url, token, node, KANO)
        for attempt in range(20):
            env = dict(self.env)
            if attempt < 3:
                point = self._least_hit(BOOTSTRAP_POINTS)
                env = crashpoint_env({point: BOOTSTRAP_POINTS[point]}, self.log, env)
            child = await Child.start(config, node, 0, env)
            done = asyncio.create_task(child.bootstrapped.wait())
            died = asyncio.create_task(child.proc.wait())
            await asyncio.wait({done, died}, timeout=60, return_when=asyncio.FIRST_COMPLETED)
            finished = done.done()
            done.cancel()
            died.cancel()
            self.kills["bootstrap"] += not finished
            await child.kill()
            integrity, records, _ = edge_state(self.tmp_path / f"{node}.db")
            self.integrity_failures += integrity != "ok"
            if finished:
                expected = {f"bed-{i}" for i in range(BOOTSTRAP_RECORDS)}
                self.summary.counts["divergent"] += len(expected ^ records)
                return
        raise AssertionError(f"node {node} did not finish its bootstrap in 20 starts")

    async def drain(self) -> float:
        """Run the child without faults until its outbox is empty; seconds it took."""
        child = await Child.start(self.config, "drain", 0, self.env)
        started = time.monotonic()
        try:
            while time.monotonic() - started < 120:
                _, _, outbox = edge_state(self.tmp_path / "n1.db")
                if not outbox:
                    break
                await asyncio.sleep(0.2)
            else:
                raise AssertionError(f"the outbox still holds {len(outbox)} changes after 120 s")
            # Pull until the node holds every record of its cell the hub holds.
            while time.monotonic() - started < 120:
                if not await self.missing_here():
                    break
                await asyncio.sleep(0.2)
        finally:
            await child.kill()
        return time.monotonic() - started

    async def missing_here(self) -> set[str]:
        rows = await self.hub.hub.pool.fetch(
            "SELECT key FROM records WHERE cell = $1 OR cell LIKE $2", CELL, CELL + "/%"
        )
        _, records, _ = edge_state(self.tmp_path / "n1.db")
        return {r["key"] for r in rows} - records

    async def final_check(self) -> None:
        at_hub = await hub_keys(self.hub.hub.pool, "n1")
        self.lost |= self.acked - set(at_hub)
        self.summary.counts["duplicated"] = sum(1 for n in at_hub.values() if n > 1)
        self.summary.counts["divergent"] += len(await self.missing_here())


async def run_loop(
    tmp_path: Path,
    hub: Any,
    summary: Summary,
    cycles: int,
    env: dict[str, str],
    *,
    bootstrap_every: int,
) -> Loop:
    loop = Loop(tmp_path, hub, summary, env)
    summary.counts.update(divergent=0, duplicated=0)
    async with other_writer(hub, tmp_path):
        await loop.setup()
        for n in range(cycles):
            if bootstrap_every and n % bootstrap_every == bootstrap_every - 1:
                await loop.bootstrap_round(n)
            else:
                await loop.cycle(n, WRITE_POINTS)
    summary.figures["drain_s"] = round(await loop.drain(), 1)
    await loop.final_check()
    summary.cases = cycles
    summary.acknowledged = len(loop.acked)
    summary.counts.update(
        lost=len(loop.lost),
        orphan_records=len(loop.orphans),
        integrity_failures=loop.integrity_failures,
    )
    summary.figures["kills"] = dict(loop.kills)
    return loop


async def test_t3_kill_minus_9_of_a_syncing_edge_loses_nothing(tmp_path: Path, hub: Any) -> None:
    summary = Summary(
        "T3",
        "edge kill -9 loop",
        extra_violations=("orphan_records", "integrity_failures"),
        min_hits=pick(1, 20),
    )
    loop = await run_loop(tmp_path, hub, summary, pick(60, 2000), dict(_env()), bootstrap_every=10)
    summary.cover([*WRITE_POINTS, *BOOTSTRAP_POINTS], crashpoint_hits(loop.log))
    assert summary.acknowledged > 1000, "the child barely wrote anything: the test saw nothing"
    summary.finish()


async def test_t3_negative_control_ack_before_commit_is_caught(tmp_path: Path, hub: Any) -> None:
    summary = Summary("T3", "edge kill -9 loop: store acks before commit")
    env = {**_env(), "SYNCENGINE_T3_BROKEN": "ack_before_commit"}
    loop = Loop(tmp_path, hub, summary, env)
    points = {"edge.put.before_commit": 0.05}
    async with other_writer(hub, tmp_path):
        await loop.setup()
        for n in range(pick(15, 60)):
            loop.rng.random()  # (keeps the draw sequence of the main loop)
            await loop.cycle(n, points)
            if loop.lost:
                break
    summary.cases = n + 1
    summary.acknowledged = len(loop.acked)
    summary.counts["lost"] = len(loop.lost)
    summary.control("lost")


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("SYNCENGINE_CRASHPOINT")}
