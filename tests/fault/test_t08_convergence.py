"""T8: many edges editing the same records concurrently converge, and no concurrent value is
lost without a trace (invariants 3 and 5).

Edges (real SQLite stores, links and syncers, as asyncio tasks of this process) run against
one real hub. They share hot cells and write the same and different fields of the same few
records, under every resolver (``lww``, ``hub-wins``, ``max``, ``min``, ``counter``), with
deletes and revivals, while going offline for random stretches (an offline edge writes but
does not sync). Subscriptions overlap: some edges take a whole city, some one clinic, some a
clinic and its sub-cell, one the region. The edges share a coarse clock (250 ms steps, a little
ahead of the hub's), so equal stamps from different nodes are common: ties must be broken by
``(hlc, node)`` the same way everywhere. To end, a tie round: offline, with the clock stepped
into a window none of them has seen, every edge writes the same field of one record per
collection, so the last writes of those fields all carry one hlc. Before each write the
edge's file is read (plain sqlite3) for the stamps its writer sees, which is what tells a
deliberate overwrite from a concurrent one.

After every change is exchanged (sync rounds until one moves nothing), the checker reads the
hub's ``records``, ``feed`` and ``conflicts`` with asyncpg and every edge's ``records`` with
sqlite3 and compares them with :mod:`fault.model`'s fold of the written changes: every edge
subscribed to a cell and the hub hold byte-identical ``state`` equal to the model's, and the
documents match it; the feed holds every acknowledged change once; the conflict log holds
every overwritten concurrent value the model computes, and nothing that did not lose.

The edges draw their changes from one budget: quick mode writes 2,000 changes in all across
10 edges, long mode 10,000 across 50; ``SYNCENGINE_T8_CHANGES`` sets another total (most edges
receive most changes, so a run's cost grows with edges x changes).

The negative control runs a smaller workload against a build whose merge breaks stamp ties
by arrival order (patched into the hub and the edge store): it must show divergence. A last,
in-process test replays the two merge bugs this test found (``max``/``min`` over signed zeros;
a base naming a version by hlc alone) in every delivery order.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import random
import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import msgpack
import pytest

from fault.harness import SEED, History, Summary, pick
from fault.model import Loser, Record, RecordKey, Stamp, Write, canonical_json, fold_all
from fault.model import lost_values as model_lost_values
from support.edges import edge
from syncengine.edge import store as edge_store
from syncengine.hub import push as hub_push
from syncengine.merge import Change
from syncengine.merge import apply_change as real_apply_change

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REGION = "west"
LAGOS = "west/ng/lagos"
CLINIC = f"{LAGOS}/clinic-12"
#: The cells written, with the tier the hub fixture's rules give them (one of each lane).
CELLS = [
    CLINIC,  # standard: the hottest
    f"{CLINIC}/alerts",  # critical
    f"{CLINIC}/stock",  # important
    f"{CLINIC}/2019",  # archive
    f"{LAGOS}/clinic-7",  # standard
    "west/gh/accra/shop-1",  # standard, another country
]
#: Subscriptions (and grants) of the edges, round-robin; they overlap on purpose.
SUBSCRIPTIONS = [
    [LAGOS],
    [CLINIC],
    [f"{CLINIC}/alerts", f"{LAGOS}/clinic-7"],
    [CLINIC, f"{CLINIC}/alerts"],
    [REGION],
    ["west/gh", f"{LAGOS}/clinic-7", f"{CLINIC}/alerts"],
]
#: Covered by every subscription above: its "hot" records take 30% of the writes.
HOT_CELL = f"{CLINIC}/alerts"
RESOLVERS = {"visits": "lww", "prices": "hub-wins", "peak": "max", "low": "min", "stock": "counter"}
FIELDS = ["f0", "f1", "f2", "f3"]
KEYS = 5
DELETE_P = 0.08


def covers(prefix: str, cell: str) -> bool:
    return cell == prefix or cell.startswith(prefix + "/")


class CoarseWall:
    """The edges' shared wall clock: milliseconds in 250 ms steps, 2 s ahead of the hub's, so
    writes of different edges often carry equal stamps. :meth:`step` moves it on by a step
    at once (the time seam of the tie round)."""

    STEP_MS = 250
    AHEAD_MS = 2_000

    def __init__(self) -> None:
        self.extra_ms = 0

    def __call__(self) -> int:
        now = time.time_ns() // 1_000_000
        return now - now % self.STEP_MS + self.AHEAD_MS + self.extra_ms

    def step(self) -> None:
        self.extra_ms += self.STEP_MS


@dataclass
class Node:
    name: str
    subscriptions: list[str]
    cells: list[str]
    edge: Any
    reader: sqlite3.Connection
    online: bool = True


@dataclass
class Run:
    """What the workload did: every acknowledged change and the figures of the run."""

    writes: list[Write] = field(default_factory=list)
    figures: Counter[str] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)


def seen_by(reader: sqlite3.Connection, rk: RecordKey, names: list[str] | None) -> dict[str, Stamp]:
    """The stamp of each named field's visible version in the edge's file (every visible
    field for a delete, ``names=None``): what a write made now replaces."""
    row = reader.execute(
        "SELECT state FROM records WHERE cell = ? AND collection = ? AND key = ?", rk
    ).fetchone()
    if row is None:
        return {}
    raw = msgpack.unpackb(row[0], raw=False)
    tomb = tuple(raw["t"]) if raw["t"] is not None else None
    registers = [raw.get("h", {}), raw["f"]]
    seen: dict[str, Stamp] = {}
    for name in names if names is not None else {n for r in registers for n in r}:
        for register in registers:
            entry = register.get(name)
            if entry is not None and (tomb is None or (entry[1], entry[2]) > tomb):
                seen[name] = (entry[1], entry[2])
                break
    return seen


def value_for(collection: str, rng: random.Random, unique: str) -> Any:
    """A value to write: unique for lww collections (so each loser can be traced), numbers
    for max/min (with the equal-looking ``0``, ``0.0`` and ``-0.0``), increments for counters."""
    resolver = RESOLVERS[collection]
    if resolver == "counter":
        return rng.randint(-5, 9)
    if resolver in ("max", "min"):
        return rng.choice(
            [
                rng.randint(-40, 40),
                rng.randint(-40, 40) + 0.5,
                0,
                0.0,
                -0.0,
                float(rng.randint(-3, 3)),
            ]
        )
    return rng.choice(
        [unique, {"by": unique, "n": [1, 2]}, [unique, 3], {"z": unique, "a": {"y": 1, "b": None}}]
    )


async def write_one(node: Node, rng: random.Random, run: Run, history: History) -> None:
    # Skewed towards one record per collection and two of its fields (where stamps tie and
    # values collide), and towards the first keys elsewhere.
    hot = rng.random() < 0.3
    cell = HOT_CELL if hot else rng.choice(node.cells)
    collection = rng.choice(list(RESOLVERS))
    key = "hot" if hot else f"k{min(rng.randrange(KEYS), rng.randrange(KEYS))}"
    fields = None
    if rng.random() >= DELETE_P:
        unique = f"{node.name}#{len(run.writes)}"
        names = sorted(rng.sample(FIELDS[:2] if hot else FIELDS, rng.randint(1, 2 if hot else 3)))
        fields = {n: value_for(collection, rng, f"{unique}.{n}") for n in names}
    await write(node, (cell, collection, key), fields, run, history)


async def write(
    node: Node, rk: RecordKey, fields: dict[str, Any] | None, run: Run, history: History
) -> None:
    """Put ``fields`` (delete for None) on ``node``, noting the stamps its writer sees."""
    store = node.edge.store
    seen = seen_by(node.reader, rk, None if fields is None else sorted(fields))
    if fields is None:
        hlc = await store.delete(*rk)
    else:
        hlc = await store.put(*rk, fields)
    cell, collection, key = rk
    run.writes.append(
        Write(
            cell=cell,
            collection=collection,
            key=key,
            hlc=hlc,
            node=node.name,
            fields=fields,
            seen=seen,
        )
    )
    history.log(
        node.name,
        "delete" if fields is None else "put",
        "ok",
        {"record": list(rk), "hlc": hlc, "fields": fields, "seen": seen},
    )


async def sync(node: Node, run: Run) -> tuple[int, bool]:
    """One sync round of ``node``; returns (changes moved, caught up without errors).

    A transient failure (a link timeout on this crowded loop) is counted and left to the
    next round, as the daemon does; any other is a violation."""
    report = await node.edge.syncer.sync_once()
    run.figures["sync_rounds"] += 1
    for e in report.errors:
        if e.retryable:
            run.figures["transient_sync_errors"] += 1
        else:
            run.errors.append(f"{node.name}: {e.step} {e.tier}: {e.code}: {e.message}")
    moved = sum(report.pushed.values()) + sum(report.pulled.values())
    return moved, report.caught_up and not report.errors


async def drive(
    node: Node, rng: random.Random, budget: list[int], run: Run, history: History
) -> None:
    """One edge's life: mostly writes, a sync now and then while online, random offline
    stretches (5 to 60 of its own steps) during which it only writes."""
    offline_for = 0
    while budget[0] > 0:
        roll = rng.random()
        if offline_for > 0:
            offline_for -= 1
            node.online = offline_for == 0
        if node.online and roll < 0.03:
            offline_for, node.online = rng.randint(5, 60), False
            run.figures["offline_periods"] += 1
        elif node.online and roll < 0.15:
            await sync(node, run)
        else:
            budget[0] -= 1
            await write_one(node, rng, run, history)
        await asyncio.sleep(0)


async def sync_until_quiet(nodes: list[Node], run: Run, max_rounds: int = 12) -> int:
    """Sync every edge, round after round, until a whole round moves nothing."""
    for node in nodes:
        node.online = True
    for rounds in range(1, max_rounds + 1):
        results = [await sync(node, run) for node in nodes]
        if all(moved == 0 and caught_up for moved, caught_up in results):
            return rounds
    return 0


async def start_nodes(
    stack: AsyncExitStack, hub: Any, tmp_path: Path, count: int, wall: Callable[[], int]
) -> list[Node]:
    nodes = []
    for i in range(count):
        name = f"edge-{i:02d}"
        subs = SUBSCRIPTIONS[i % len(SUBSCRIPTIONS)]
        token = await hub.add_node(name, *subs)
        e = await stack.enter_async_context(
            edge(stack, tmp_path, name, hub.url, token, wall=wall, subscriptions=subs)
        )
        assert e.store.resolvers == RESOLVERS, f"{name} did not learn the hub's resolvers"
        reader = sqlite3.connect(f"file:{e.store.path}?mode=ro", uri=True)
        stack.callback(reader.close)
        cells = [c for c in CELLS if any(covers(p, c) for p in subs)]
        nodes.append(Node(name, subs, cells, e, reader))
    return nodes


async def workload(
    stack: AsyncExitStack, hub: Any, tmp_path: Path, edges: int, changes: int, seed: int
) -> tuple[Run, list[Node]]:
    """Run the concurrent workload, then sync until quiet (the edges close with ``stack``)."""
    run = Run()
    wall = CoarseWall()
    nodes = await start_nodes(stack, hub, tmp_path, edges, wall)
    history = stack.enter_context(History(tmp_path / "t08-history.jsonl"))
    budget = [changes]
    async with asyncio.TaskGroup() as group:
        for i, node in enumerate(nodes):
            group.create_task(drive(node, random.Random(seed * 1000 + i), budget, run, history))
    # The tie round: offline, in a clock step none of them has seen yet, every edge writes
    # field f0 of one record per collection, in the same order: equal stamps, last writes.
    wall.step()
    rng = random.Random(seed)
    for node in nodes:
        for collection in RESOLVERS:
            value = value_for(collection, rng, f"{node.name}#{len(run.writes)}.tie")
            await write(node, (HOT_CELL, collection, "tie"), {"f0": value}, run, history)
    run.figures["quiet_after_rounds"] = await sync_until_quiet(nodes, run)
    return run, nodes


# ------------------------------------------------------------------------------- the checker


@dataclass
class Verdict:
    counts: dict[str, int]
    figures: dict[str, Any]
    examples: list[str]


def edge_records(path: Path) -> dict[RecordKey, tuple[bytes, str | None, int]]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return {
            (c, coll, k): (bytes(state), doc, deleted)
            for c, coll, k, state, doc, deleted in conn.execute(
                "SELECT cell, collection, key, state, doc, deleted FROM records"
            )
        }
    finally:
        conn.close()


def ties(writes: list[Write]) -> int:
    """Pairs of writes of one record field by different nodes with equal hlc."""
    by: Counter[tuple[RecordKey, str, int]] = Counter()
    for w in writes:
        for name in w.fields or {}:
            by[(w.record, name, w.hlc)] += 1
    return sum(n * (n - 1) // 2 for n in by.values())


async def check(pg_dsn: str, nodes: list[Node], run: Run) -> Verdict:
    """Compare the hub and every edge with the model; read only through asyncpg and sqlite3."""
    model = fold_all(run.writes, RESOLVERS)
    must_log = model_lost_values(run.writes, RESOLVERS)
    examples: list[str] = []
    counts: Counter[str] = Counter()

    def mismatch(kind: str, text: str) -> None:
        counts[kind] += 1
        if len(examples) < 8:
            examples.append(f"{kind}: {text}")

    conn = await asyncpg.connect(pg_dsn)
    try:
        hub_rows = {
            (r["cell"], r["collection"], r["key"]): (bytes(r["state"]), r["doc"], r["deleted"])
            for r in await conn.fetch(
                "SELECT cell, collection, key, state, doc::text AS doc, deleted FROM records"
            )
        }
        feed = Counter(
            (r["node_id"], r["hlc"]) for r in await conn.fetch("SELECT node_id, hlc FROM feed")
        )
        logged = await conn.fetch(
            "SELECT cell, collection, key, field, loser_node, loser_hlc, "
            "loser_value::text AS loser_value FROM conflicts"
        )
    finally:
        await conn.close()

    # Every acknowledged change is in the feed exactly once, and nothing else is.
    written = Counter((w.node, w.hlc) for w in run.writes)
    counts["lost"] = sum(1 for k in written if k not in feed)
    counts["duplicated"] = sum(n - 1 for n in feed.values() if n > 1)
    counts["unknown_in_feed"] = sum(1 for k in feed if k not in written)

    def compare(replica: str, rk: RecordKey, got: tuple[bytes, Any, Any] | None) -> None:
        want: Record | None = model.get(rk)
        if want is None or got is None:
            mismatch(
                "divergent", f"{replica} {rk}: held {got is not None}, model {want is not None}"
            )
            return
        if got[0] != want.to_bytes():
            mismatch("divergent", f"{replica} {rk}: state {got[0]!r} != model {want.to_bytes()!r}")
            return
        doc = want.document()
        text = got[1]
        held = None if text is None else json.loads(text)
        if (
            held != (doc or None)
            or bool(got[2]) != want.deleted
            or (replica != "hub" and text is not None and text != canonical_json(doc))
        ):
            mismatch("doc_mismatches", f"{replica} {rk}: doc {text} != model {doc}")

    comparisons = record_comparisons = 0
    for cell in CELLS:
        in_cell = {rk for rk in model if rk[0] == cell} | {rk for rk in hub_rows if rk[0] == cell}
        comparisons += 1
        for rk in sorted(in_cell):
            compare("hub", rk, hub_rows.get(rk))
            record_comparisons += 1
    for node in nodes:
        rows = edge_records(node.edge.store.path)
        for cell in node.cells:
            in_cell = {rk for rk in model if rk[0] == cell} | {rk for rk in rows if rk[0] == cell}
            comparisons += 1
            for rk in sorted(in_cell):
                compare(node.name, rk, rows.get(rk))
                record_comparisons += 1

    # Invariant 5: every value lost to a concurrent write is in the log, with its value.
    in_log = {
        Loser(
            r["cell"],
            r["collection"],
            r["key"],
            r["field"],
            r["loser_node"],
            r["loser_hlc"],
            canonical_json(json.loads(r["loser_value"])),
        )
        for r in logged
    }
    for loser in sorted(must_log - in_log, key=repr):
        mismatch("missing_conflicts", repr(loser))
    # A logged loser must be a value really written, and not the one that survived.
    values = {
        (w.record, n, w.node, w.hlc): canonical_json(v)
        for w in run.writes
        for n, v in (w.fields or {}).items()
    }
    for loser in in_log:
        rk = (loser.cell, loser.collection, loser.key)
        kept = model[rk].fields.get(loser.field) if rk in model else None
        if values.get((rk, loser.field, loser.node, loser.hlc)) != loser.value or (
            kept is not None and (kept[1], kept[2]) == (loser.hlc, loser.node)
        ):
            mismatch("false_conflicts", repr(loser))

    dead = 0
    for node in nodes:
        dead += node.reader.execute("SELECT count(*) FROM dead_letters").fetchone()[0]
    counts["dead_letters"] = dead
    counts["sync_errors"] = len(run.errors)
    counts["not_quiet"] = int(run.figures["quiet_after_rounds"] == 0)
    deletes = sum(1 for w in run.writes if w.fields is None)
    figures = {
        "edges": len(nodes),
        "replica_cell_comparisons": comparisons,
        "record_comparisons": record_comparisons,
        "records": len(model),
        "conflicts_expected": len(must_log),
        "conflicts_logged": len(logged),
        "stamp_ties": ties(run.writes),
        "deletes": deletes,
        "revived_records": sum(1 for r in model.values() if r.tomb is not None and not r.deleted),
        **dict(run.figures),
    }
    return Verdict(dict(counts), figures, examples + run.errors[:4])


VIOLATIONS = (
    "missing_conflicts",
    "false_conflicts",
    "doc_mismatches",
    "unknown_in_feed",
    "dead_letters",
    "sync_errors",
    "not_quiet",
)


async def test_t08_many_edges_converge_and_log_every_lost_value(
    hub_factory: Any, pg_dsn: str, tmp_path: Path
) -> None:
    """Edges editing the same records offline and online, under every resolver, with deletes,
    revivals and overlapping subscriptions, end byte-identical to each other, to the hub and
    to the model; the conflict log holds every concurrent value that lost."""
    edges, changes = pick((10, 2_000), (50, 10_000))
    changes = int(os.environ.get("SYNCENGINE_T8_CHANGES") or changes)
    summary = Summary(test="T8", name="multi-edge convergence", extra_violations=VIOLATIONS)
    hub = await hub_factory(resolvers=RESOLVERS)
    async with AsyncExitStack() as stack:
        run, nodes = await workload(stack, hub, tmp_path, edges, changes, SEED)
        verdict = await check(pg_dsn, nodes, run)
    summary.cases = summary.acknowledged = len(run.writes)
    summary.counts = verdict.counts
    summary.figures = {**verdict.figures, "examples": verdict.examples}
    summary.finish()
    assert verdict.figures["stamp_ties"] > 0, (
        "no two nodes wrote one field with equal stamps: the run did not test tie-breaking"
    )
    assert verdict.figures["conflicts_expected"] > 0 and verdict.figures["revived_records"] > 0, (
        f"the run made no concurrent overwrite or no revival: {verdict.figures}"
    )


# --------------------------------------------------------------------------- negative control


def ties_by_arrival(real: Callable[..., Any]) -> Callable[..., Any]:
    """A broken merge: a write whose hlc equals the current value's wins because it arrived
    later, whatever the node ids say (lww and hub-wins)."""

    def apply_change(state: Any, change: Any, resolver: str = "lww", **kw: Any) -> Any:
        applied = real(state, change, resolver, **kw)
        if state is None or change.fields is None or resolver not in ("lww", "hub-wins"):
            return applied
        for name, value in change.fields.items():
            cur = state.fields.get(name)
            if cur is not None and cur[1] == change.hlc and cur[2] != change.node:
                applied.state.fields[name] = (value, change.hlc, change.node)
        return applied

    return apply_change


@pytest.fixture
def broken_tie_break(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    broken = ties_by_arrival(real_apply_change)
    monkeypatch.setattr(hub_push, "apply_change", broken)
    monkeypatch.setattr(edge_store, "apply_change", broken)
    yield


async def test_t08_control_ties_broken_by_arrival_order_diverge(
    broken_tie_break: None, hub_factory: Any, pg_dsn: str, tmp_path: Path
) -> None:
    """Negative control: with ties broken by arrival order the same workload must diverge."""
    summary = Summary(test="T8", name="control: ties by arrival order")
    hub = await hub_factory(resolvers=RESOLVERS)
    async with AsyncExitStack() as stack:
        run, nodes = await workload(stack, hub, tmp_path, 5, 500, SEED)
        verdict = await check(pg_dsn, nodes, run)
    summary.cases = summary.acknowledged = len(run.writes)
    summary.counts = verdict.counts
    summary.figures = {**verdict.figures, "examples": verdict.examples[:3]}
    summary.control("divergent")


# ------------------------------------------------------------------- regressions, in process


def test_t08_regressions_found_by_this_test() -> None:
    """The two bugs T8 found, replayed deterministically through ``syncengine.merge`` in
    every delivery order: (1) ``max``/``min`` over ``0``, ``0.0`` and ``-0.0`` kept whichever
    arrived first, so replicas diverged; (2) a writer that had seen ``(H, a)`` overwrote the
    tied, winning ``(H, c)`` it had never seen, and the hub took the base ``H`` for "seen" and
    logged no conflict: ``c``'s value was lost without a trace."""
    summary = Summary(test="T8", name="regressions", extra_violations=("missing_conflicts",))
    cases = 0
    divergent = missing = 0
    h = 1 << 40
    zeros = [
        Write(cell=CLINIC, collection="peak", key="z", hlc=h + i, node=node, fields={"f": v})
        for i, (node, v) in enumerate([("a", 0.0), ("b", -0.0), ("c", 0)])
    ]
    tie = [
        Write(cell=CLINIC, collection="visits", key="t", hlc=h, node="a", fields={"f": "a"}),
        Write(cell=CLINIC, collection="visits", key="t", hlc=h, node="c", fields={"f": "c"}),
        Write(
            cell=CLINIC,
            collection="visits",
            key="t",
            hlc=h + 1,
            node="b",
            fields={"f": "b"},
            seen={"f": (h, "a")},
        ),
    ]
    for writes in (zeros, tie):
        model = fold_all(writes, RESOLVERS)
        must_log = model_lost_values(writes, RESOLVERS)
        for order in itertools.permutations(writes):
            cases += 1
            state, logged = None, set()
            for w in order:
                change = Change(
                    cell=w.cell,
                    collection=w.collection,
                    key=w.key,
                    hlc=w.hlc,
                    node=w.node,
                    fields=w.fields,
                    base=dict(w.seen),
                )
                applied = real_apply_change(
                    state, change, RESOLVERS[w.collection], detect_conflicts=True
                )
                state = applied.state
                logged |= {(c.field, c.loser_node, c.loser_hlc) for c in applied.conflicts}
            assert state is not None
            divergent += state.to_bytes() != model[order[0].record].to_bytes()
            missing += len({(x.field, x.node, x.hlc) for x in must_log} - logged)
    summary.cases = cases
    summary.counts = {"divergent": divergent, "missing_conflicts": missing}
    summary.finish()
