"""T9: skewed clocks never poison the region, never lose a write silently, never run backwards
(invariants 3, 5 and 8).

Edge processes run the real daemon with the wall clock shifted (``skewed.py``; the monotonic
clock is left alone) at -3 days, -2 h, +4 min (inside the hub's 300 s drift), +6 min and
+1 year (outside it), each writing stamped values. Each is killed with SIGKILL mid-run and
restarted with its clock set back two hours, and writes again. An honest node (no skew) wrote
the same keys first, so the slow nodes' writes meet newer values.

Checks, reading the edge files with sqlite3 and the hub with SQL:
- **rejects exact**: every change stamped beyond the drift (by the stamps ``put`` returned)
  is refused by the hub (``clock_drift``) and sits in the node's dead letters; every change
  inside it is at the hub. Stamps within 30 s of the limit may go either way.
- **no regression**: each node's stamps after the restart exceed every stamp before it,
  although its wall clock was set back.
- **no poisoning**: no stamp in the feed, nor the hub's clock, nor the honest node's clock
  is beyond real time plus the drift.
- **no silent loss**: every acknowledged write is at the hub, or in the dead letters; a slow
  node's accepted write either won or is in the conflict log.

The negative control runs a hub without the drift check: its feed must be poisoned.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from fault.common import sqlite_rows
from fault.edge_proc import Child
from fault.harness import SEED, Summary, pick

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
]

SKEWED = Path(__file__).with_name("skewed.py")
CELL = "west/ng/lagos/clinic-12"
ALERTS, STOCK = f"{CELL}/alerts", f"{CELL}/stock"
RULES = [{"prefix": ALERTS, "tier": "critical"}, {"prefix": STOCK, "tier": "important"}]
POLICIES = {
    "important": {"push_interval_s": 1, "pull_interval_s": 1, "retry_interval_s": 1},
    "standard": {"offpeak_only": False, "push_interval_s": 1, "pull_interval_s": 1},
    "critical": {"retry_interval_s": 1},
}
DRIFT_S = 300
MARGIN_S = 30
SKEWS = {
    "minus3d": -3 * 86400,
    "minus2h": -7200,
    "plus4m": 240,
    "plus6m": 360,
    "plus1y": 365 * 86400,
}
SET_BACK_S = 7200
T9_VIOLATIONS = (
    "silent_losses",
    "unexpected_accepts",
    "unexpected_rejects",
    "wrong_reject_code",
    "regressions",
    "stamps_not_unique",
    "poisoned",
    "unlogged_losers",
)
RATE = 40


def ms_of(hlc: int) -> int:
    return hlc >> 16


def edge_config(tmp_path: Path, url: str, token: str, node: str) -> dict[str, Any]:
    return {
        "node_id": node,
        "region": "west",
        "db": str(tmp_path / f"{node}.db"),
        "hub_url": url,
        "token": token,
        "subscriptions": [CELL],
        "tier_rules": RULES,
        "resolvers": {"stock": "counter"},
        "tier_policies": POLICIES,
    }


def faketime(offset_s: int) -> tuple[str, ...]:
    """The command prefix that runs a child with its wall clock ``offset_s`` off."""
    return (sys.executable, str(SKEWED), str(offset_s))


class Skewed:
    """One skewed node: every stamp ``put`` returned, per run, and the real time it ran."""

    def __init__(self, name: str, offset_s: int) -> None:
        self.name = name
        self.offset_s = offset_s
        self.runs: list[dict[str, int]] = []  # per run: key -> stamp
        self.started_ms = 0
        self.ended_ms = 0

    def stamps(self) -> dict[str, int]:
        return {k: v for run in self.runs for k, v in run.items()}


def _child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SYNCENGINE_CRASHPOINT")}
    return {**env, "EDGE_CHILD_STAMPS": "1", **extra}


async def run_node(
    node: Skewed, config: dict[str, Any], rng: random.Random, seconds: float, shared: int
) -> None:
    """A run killed mid-write; a run after the clock was set back two hours, killed too; a
    run (still set back) writing the ``shared-*`` keys the honest node wrote; a drain."""
    node.started_ms = int(time.time() * 1000)
    back = node.offset_s - SET_BACK_S
    children: list[Child] = []
    try:
        for run, offset in enumerate((node.offset_s, back)):
            child = await Child.start(
                config, f"{node.name}-r{run}", RATE, _child_env(), wrapper=faketime(offset)
            )
            children.append(child)
            await asyncio.wait_for(child.ready.wait(), 60)
            await asyncio.sleep(rng.uniform(0.5, seconds))
            await child.kill()
            node.runs.append(dict(child.stamps))
        env = _child_env(EDGE_CHILD_LIMIT=str(shared))
        child = await Child.start(config, "shared", RATE, env, wrapper=faketime(back))
        children.append(child)
        await asyncio.wait_for(child.done.wait(), 60)
        db = Path(config["db"])
        deadline = time.monotonic() + 60
        while sqlite_rows(db, "SELECT 1 FROM outbox LIMIT 1") and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        await child.kill()
        node.runs.append(dict(child.stamps))
        node.ended_ms = int(time.time() * 1000)
    finally:
        for child in children:
            await child.kill()


async def honest_writes(hub: Any, tmp_path: Path, shared: int) -> dict[str, Any]:
    """The unskewed node writes the ``shared-*`` keys first, so slow nodes meet newer values."""
    token = await hub.add_node("honest")
    config = edge_config(tmp_path, hub.url, token, "honest")
    child = await Child.start(config, "shared", 200, _child_env(EDGE_CHILD_LIMIT=str(shared)))
    await asyncio.wait_for(child.done.wait(), 60)
    deadline = time.monotonic() + 60
    while sqlite_rows(Path(config["db"]), "SELECT 1 FROM outbox LIMIT 1"):
        assert time.monotonic() < deadline, "the honest node did not push within 60 s"
        await asyncio.sleep(0.1)
    await child.kill()
    return config


async def run_scenario(
    tmp_path: Path, hub: Any, summary: Summary, seconds: float, skews: dict[str, int]
) -> None:
    rng = random.Random(SEED)
    pool = hub.hub.pool
    shared = 30
    honest = await honest_writes(hub, tmp_path, shared)
    nodes = [Skewed(name, offset) for name, offset in skews.items()]
    configs = {}
    for node in nodes:
        token = await hub.add_node(node.name)
        configs[node.name] = edge_config(tmp_path, hub.url, token, node.name)
    await asyncio.gather(*(run_node(n, configs[n.name], rng, seconds, shared) for n in nodes))

    counts: Counter[str] = Counter()
    acked = 0
    for node in nodes:
        db = Path(configs[node.name]["db"])
        stamps = node.stamps()
        acked += len(stamps)
        at_hub = {
            r["key"] for r in await pool.fetch("SELECT key FROM feed WHERE node_id = $1", node.name)
        }
        dead = dict(sqlite_rows(db, "SELECT key, code FROM dead_letters"))
        for key, hlc in stamps.items():
            # The hub judged the stamp between the node's start and end (real time).
            least_ahead_s = (ms_of(hlc) - node.ended_ms) / 1000
            most_ahead_s = (ms_of(hlc) - node.started_ms) / 1000
            must_reject = least_ahead_s > DRIFT_S + MARGIN_S
            must_accept = most_ahead_s < DRIFT_S - MARGIN_S
            counts["expected_rejects"] += must_reject
            counts["rejected"] += key in dead
            if key in at_hub and key in dead:
                counts["duplicated"] += 1
            elif key not in at_hub and key not in dead:
                counts["silent_losses"] += 1
            elif must_reject and key in at_hub:
                counts["unexpected_accepts"] += 1
            elif must_accept and key in dead:
                counts["unexpected_rejects"] += 1
            elif key in dead and dead[key] != "clock_drift":
                counts["wrong_reject_code"] += 1
        # The clock never runs backwards, across a kill and a clock set back.
        for before, after in itertools.pairwise(node.runs):
            if before and after:
                counts["regressions"] += sum(s <= max(before.values()) for s in after.values())
        counts["stamps_not_unique"] += len(stamps) - len(set(stamps.values()))
    # Nothing beyond real time + drift got into the region.
    limit_ms = int(time.time() * 1000) + DRIFT_S * 1000
    feed_max = await pool.fetchval("SELECT coalesce(max(hlc), 0) FROM feed")
    honest_clock = int(
        sqlite_rows(Path(honest["db"]), "SELECT value FROM meta WHERE key = 'hlc'")[0][0]
    )
    counts["poisoned"] = sum(ms_of(s) > limit_ms for s in (feed_max, honest_clock))
    # A slow node's accepted shared write either won or is in the conflict log as the loser.
    for node in nodes:
        rows = await pool.fetch(
            "SELECT f.key, r.doc->>'by' AS winner FROM feed f JOIN records r "
            "ON r.cell = f.cell AND r.collection = f.collection AND r.key = f.key "
            "WHERE f.node_id = $1 AND f.key LIKE 'shared-%'",
            node.name,
        )
        for row in rows:
            if row["winner"] == node.name:
                counts["slow_writes_won"] += 1
                continue
            logged = await pool.fetchval(
                "SELECT count(*) FROM conflicts WHERE key = $1 AND loser_node = $2",
                row["key"],
                node.name,
            )
            counts["slow_writes_lost_logged"] += logged > 0
            counts["unlogged_losers"] += logged == 0
    summary.cases = len(nodes)
    summary.acknowledged = acked
    summary.counts.update(counts)
    summary.counts["lost"] = counts["silent_losses"]
    summary.figures.update(
        skews_s=skews, feed_max_ahead_s=round((ms_of(feed_max) - limit_ms) / 1000 + DRIFT_S, 1)
    )


async def test_t9_skewed_clocks_are_refused_and_never_poison(tmp_path: Path, hub: Any) -> None:
    summary = Summary(
        "T9",
        "clock skew: -3d, -2h, +4m, +6m, +1y, set back 2 h after a kill",
        extra_violations=T9_VIOLATIONS,
    )
    await run_scenario(tmp_path, hub, summary, pick(3.0, 20.0), SKEWS)
    assert summary.counts["expected_rejects"] > 0, "no write beyond the drift: nothing tested"
    assert summary.counts["slow_writes_lost_logged"] > 0, "no slow write met a newer value"
    summary.finish()


async def test_t9_negative_control_a_hub_without_the_drift_check_is_poisoned(
    tmp_path: Path, hub: Any
) -> None:
    summary = Summary(
        "T9", "clock skew: hub without its drift check", extra_violations=T9_VIOLATIONS
    )
    hub.hub.clock.max_drift_ms = 10 * 365 * 86400 * 1000  # the broken build: no limit
    await run_scenario(tmp_path, hub, summary, 1.0, {"plus1y": SKEWS["plus1y"]})
    summary.control("poisoned")
