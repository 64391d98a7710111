"""T10: a deleted record never comes back, except for the fields written after its delete
(invariant 3).

DESIGN.md: a delete is a record-level tombstone with its own HLC; a field written after the
tombstone (by HLC) revives the record with just the fields written after it; earlier writes
never revive. Hypothesis generates the scenarios, run at two levels:

1. **In process** (many, cheap): the changes of one record — writes by several nodes stamped
   before and after one or more deletes, under every resolver — are folded by
   ``syncengine.merge`` in several delivery orders, with re-deliveries, and compared with the
   reference model (:mod:`fault.model`) byte for byte.
2. **End to end** (fewer, each a record with its own script, run in batches against a real
   hub on a fresh database): A writes the record and every edge syncs; B goes offline and
   edits fields, some stamped before A's delete and some after (its clock seam runs ahead);
   A deletes the record (and may revive fields, and delete again) while a new edge N
   bootstraps from the hub's snapshot, A's push landing *between two snapshot pages*; a stale
   edge S whose clock is ten minutes slow pushes its pre-tombstone edits; B returns; then the
   feed's retention drops everything (``maintain_feed`` with its ``now`` seam, forty days on)
   while an edge H with pre-tombstone edits is still away: H is told
   ``cursor_behind_horizon``, re-bootstraps by itself, and pushes its edits.

After all is exchanged, the checker reads the hub's ``records`` (asyncpg) and every edge's
``records`` (sqlite3). Per replica and record, decoding the stored state itself: the tombstone
is the newest delete; every visible value was written after it (else: a resurrection); the
visible fields are exactly those written after it; and the bytes equal the model's.

Negative control: a merge in which any write after a tombstone revives the whole record
(patched into the hub and the edge store, and used for the in-process fold) must show
resurrections at both levels.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import random
import sqlite3
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import msgpack
import pytest
from aiohttp import web
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from fault.harness import SEED, Summary, pick
from fault.model import Record, RecordKey, Stamp, Write, canonical_json, fold
from support.edges import edge
from support.servers import PostgresServer, RedisServer, free_port
from syncengine.config import HubConfig
from syncengine.edge import store as edge_store
from syncengine.edge.sync import BatchSizer
from syncengine.hub import push as hub_push
from syncengine.hub.app import Hub
from syncengine.hub.nodes import add_node
from syncengine.hub.retention import maintain_feed
from syncengine.merge import Applied, Change, RecordState
from syncengine.merge import apply_change as real_apply_change

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CELL = "west/ng/lagos/clinic-12"
RESOLVERS = {"visits": "lww", "prices": "hub-wins", "peak": "max", "low": "min", "stock": "counter"}
FIELDS = ("f0", "f1", "f2", "f3")
RETENTION_DAYS = 30
MINUTE_MS = 60_000

ApplyChange = Callable[..., Applied]
_NO_WRITE = object()


# ------------------------------------------------------------------ the tombstone checker


@dataclass
class Findings:
    """What the checker found over many replicas of many records."""

    counts: Counter[str] = field(default_factory=Counter)
    resurrected: set[Any] = field(default_factory=set)
    examples: list[str] = field(default_factory=list)

    def add(self, kind: str, text: str) -> None:
        self.counts[kind] += 1
        if len(self.examples) < 6:
            self.examples.append(f"{kind}: {text}")


def check_replica(
    where: str, rk: Any, state: bytes, writes: Sequence[Write], resolver: str, found: Findings
) -> None:
    """Judge one replica's stored state of a record against the changes written to it.

    Reads the state bytes itself (msgpack), so it shares nothing with syncengine. A
    resurrection: a visible value written at or before the newest delete, or a tombstone older
    than the newest delete. ``revival_mismatches``: the visible fields are not exactly those
    written after the newest delete. ``divergent``: the bytes differ from the model's.
    """
    raw = msgpack.unpackb(state, raw=False)
    tomb: Stamp | None = tuple(raw["t"]) if raw["t"] is not None else None
    newest = max((w.stamp for w in writes if w.fields is None), default=None)
    after = {
        (name, w.stamp): value
        for w in writes
        if newest is None or w.stamp > newest
        for name, value in (w.fields or {}).items()
    }
    visible: set[str] = set()
    revived_wrongly = []
    for register in (raw["f"], raw.get("h", {})):
        for name, (value, hlc, node) in register.items():
            if tomb is not None and (hlc, node) <= tomb:
                continue
            visible.add(name)
            written = after.get((name, (hlc, node)), _NO_WRITE)
            if written is _NO_WRITE or (
                resolver in ("lww", "hub-wins") and canonical_json(written) != canonical_json(value)
            ):
                revived_wrongly.append(name)
    if tomb != newest or revived_wrongly:
        found.resurrected.add(rk)
        found.add(
            "resurrected",
            f"{where} {rk}: tomb {tomb} (newest delete {newest}), fields {revived_wrongly}",
        )
    if visible != {name for name, _ in after}:
        found.add(
            "revival_mismatches",
            f"{where} {rk}: visible {sorted(visible)}, written after the delete {sorted({n for n, _ in after})}",
        )
    model: Record = fold(writes, resolver)
    if state != model.to_bytes():
        found.add("divergent", f"{where} {rk}: {state!r} != model {model.to_bytes()!r}")


# -------------------------------------------------------- part 1: in process, many scenarios


@st.composite
def record_histories(draw: st.DrawFn) -> tuple[str, list[Write]]:
    """One record's changes: writes by three nodes (and a ``hub:`` node under hub-wins) at
    stamps around one or more deletes; ties of hlc between nodes are common."""
    resolver = draw(st.sampled_from(["lww", "lww", "hub-wins", "max", "min", "counter"]))
    nodes = ["a", "b", "s", *(["hub:x"] if resolver == "hub-wins" else [])]
    ops = draw(
        st.lists(
            st.tuples(
                st.sampled_from(nodes),
                st.integers(1, 12),
                st.booleans() if resolver != "counter" else st.just(False),
                st.sets(st.sampled_from(FIELDS), min_size=1, max_size=3),
            ),
            min_size=1,
            max_size=10,
        )
    )
    ops.append(("a", draw(st.integers(1, 12)), True, set()))  # at least one delete
    writes, stamps = [], set()
    for i, (node, hlc, is_delete, names) in enumerate(ops):
        if (hlc, node) in stamps:
            continue  # a node's stamps are unique
        stamps.add((hlc, node))
        fields = (
            None
            if is_delete
            else {n: number_or_value(resolver, f"{node}{i}{n}", draw) for n in sorted(names)}
        )
        writes.append(Write(cell=CELL, collection="c", key="k", hlc=hlc, node=node, fields=fields))
    return resolver, writes


def number_or_value(resolver: str, unique: str, draw: st.DrawFn) -> Any:
    if resolver == "counter":
        return draw(st.integers(-3, 5))
    if resolver in ("max", "min"):
        return draw(st.sampled_from([0, 0.0, -0.0, 1, 1.0, -2, 2.5]))
    return draw(st.sampled_from([unique, [unique], {"v": unique}]))


def as_change(w: Write) -> Change:
    return Change(
        cell=w.cell, collection=w.collection, key=w.key, hlc=w.hlc, node=w.node, fields=w.fields
    )


def run_in_process(
    examples: int, apply: ApplyChange, found: Findings, orders: int = 3
) -> tuple[int, int]:
    """Fold each generated history in ``orders`` delivery orders (after the first, some
    changes delivered twice, except under counter, whose dedup is the hub's) with ``apply``;
    judge every result. Returns (scenarios, replicas judged)."""
    ran = judged = 0

    @seed(SEED)
    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(record_histories(), st.integers(0, 2**32))
    def scenario(history: tuple[str, list[Write]], order_seed: int) -> None:
        nonlocal ran, judged
        resolver, writes = history
        rng = random.Random(order_seed)
        for n in range(orders):
            delivery = [as_change(w) for w in writes]
            rng.shuffle(delivery)
            if n and resolver != "counter":
                delivery += delivery[: rng.randrange(len(delivery) + 1)]  # duplicates
            state: RecordState | None = None
            for c in delivery:
                state = apply(state, c, resolver).state
            assert state is not None
            judged += 1
            check_replica(f"order{n}", (ran, resolver), state.to_bytes(), writes, resolver, found)
        ran += 1

    scenario()
    return ran, judged


# ----------------------------------------------------- part 2: end to end, scripted records


@dataclass(frozen=True)
class Script:
    """What happens to one record (names are the fields each edit writes)."""

    collection: str
    initial: frozenset[str]
    b_before: tuple[frozenset[str], ...]  # B offline, stamped before A's delete
    b_after: tuple[frozenset[str], ...]  # B offline, stamped after A's delete (revivals)
    stale: tuple[frozenset[str], ...]  # S, a slow clock: stamped before the delete
    late: tuple[frozenset[str], ...]  # H, away past the feed horizon: before the delete
    revive: frozenset[str]  # A writes these after its delete (may be empty)
    delete_again: bool  # ...and then deletes once more


_names = st.frozensets(st.sampled_from(FIELDS), min_size=1, max_size=3)
_edits = st.lists(_names, max_size=3).map(tuple)
SCRIPTS = st.builds(
    Script,
    collection=st.sampled_from(["visits", "visits", "prices", "peak", "low", "stock"]),
    initial=_names,
    b_before=_edits,
    b_after=_edits,
    stale=_edits,
    late=_edits,
    revive=st.frozensets(st.sampled_from(FIELDS), max_size=2),
    delete_again=st.booleans(),
)


def draw_scripts(count: int, salt: int) -> list[Script]:
    """``count`` scripts drawn by Hypothesis from :data:`SCRIPTS` (seeded by the run's seed)."""
    drawn: list[Script] = []

    @seed(SEED + salt)
    @settings(
        max_examples=count,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(SCRIPTS)
    def collect(script: Script) -> None:
        drawn.append(script)

    collect()
    return drawn


class SeamClock:
    """An edge's wall clock: real time shifted by ``offset_ms`` (the HLC seam of the store)."""

    def __init__(self) -> None:
        self.offset_ms = 0

    def __call__(self) -> int:
        return time.time_ns() // 1_000_000 + self.offset_ms


@dataclass
class Actor:
    name: str
    edge: Any
    clock: SeamClock


@dataclass
class Batch:
    writes: list[Write] = field(default_factory=list)
    #: Stamps of the edits the scripts place before A's first delete / after A's last one.
    meant_before: set[tuple[RecordKey, Stamp]] = field(default_factory=set)
    meant_after: set[tuple[RecordKey, Stamp]] = field(default_factory=set)
    figures: Counter[str] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)


def value_for(collection: str, unique: str, i: int) -> Any:
    resolver = RESOLVERS[collection]
    if resolver == "counter":
        return i % 7 - 2
    if resolver in ("max", "min"):
        return [0, -0.0, 0.0, 2, 2.5, -1][i % 6]
    return {"v": unique} if i % 2 else unique


async def put(
    actor: Actor, batch: Batch, rk: RecordKey, names: frozenset[str], meant: set[Any] | None = None
) -> None:
    n = len(batch.writes)
    fields = {
        f: value_for(rk[1], f"{actor.name}#{n}.{f}", n + i) for i, f in enumerate(sorted(names))
    }
    hlc = await actor.edge.store.put(*rk, fields)
    batch.writes.append(
        Write(cell=rk[0], collection=rk[1], key=rk[2], hlc=hlc, node=actor.name, fields=fields)
    )
    if meant is not None:
        meant.add((rk, (hlc, actor.name)))


async def delete(actor: Actor, batch: Batch, rk: RecordKey) -> None:
    hlc = await actor.edge.store.delete(*rk)
    batch.writes.append(
        Write(cell=rk[0], collection=rk[1], key=rk[2], hlc=hlc, node=actor.name, fields=None)
    )


async def sync(actor: Actor, batch: Batch) -> tuple[int, bool]:
    """One sync round; returns (changes moved, caught up without errors). Transient failures
    are counted and left to the next round; others are violations."""
    report = await actor.edge.syncer.sync_once()
    for e in report.errors:
        if e.retryable:
            batch.figures["transient_sync_errors"] += 1
        else:
            batch.errors.append(f"{actor.name}: {e.step} {e.tier}: {e.code}: {e.message}")
    moved = sum(report.pushed.values()) + sum(report.pulled.values())
    return moved, report.caught_up and not report.errors


async def sync_clean(actor: Actor, batch: Batch) -> None:
    """Sync ``actor`` until a round has no error (a phase must not be skipped by a timeout)."""
    for _ in range(5):
        if (await sync(actor, batch))[1]:
            return
    batch.errors.append(f"{actor.name}: no clean sync round in 5")


async def sync_until_quiet(actors: list[Actor], batch: Batch) -> None:
    for _ in range(10):
        results = [await sync(a, batch) for a in actors]
        if all(moved == 0 and clean for moved, clean in results):
            return
    batch.errors.append("the edges were still exchanging changes after 10 rounds")


@contextlib.asynccontextmanager
async def fresh_hub(postgres: PostgresServer, redis: RedisServer) -> AsyncIterator[Any]:
    """A hub on a database of its own (a feed horizon moves once per database)."""
    name = f"t10_{uuid.uuid4().hex[:12]}"
    dsn = await asyncio.to_thread(postgres.create_database, name)
    await asyncio.to_thread(redis.flushall)
    config = HubConfig.from_mapping(
        {
            "region": "west",
            "database_url": dsn,
            "redis_url": redis.url(),
            "listen": f"127.0.0.1:{free_port()}",
            "resolvers": RESOLVERS,
            "feed_retention_days": RETENTION_DAYS,
        }
    )
    try:
        async with Hub.running(config) as hub:
            runner = web.AppRunner(hub.app, access_log=None)
            await runner.setup()
            try:
                await web.TCPSite(runner, config.listen_host, config.listen_port).start()
                yield hub, f"http://{config.listen}", dsn
            finally:
                await runner.cleanup()
    finally:
        await asyncio.to_thread(postgres.drop_database, name)


async def run_batch(
    postgres: PostgresServer, redis: RedisServer, tmp_path: Path, scripts: list[Script], tag: str
) -> tuple[Batch, dict[str, dict[RecordKey, bytes]]]:
    """Play ``scripts`` (one record each) through the phases described in the module
    docstring; return what was written and every replica's stored states."""
    batch = Batch()
    records = [(CELL, s.collection, f"{tag}-r{i}") for i, s in enumerate(scripts)]
    async with AsyncExitStack() as stack:
        hub, url, dsn = await stack.enter_async_context(fresh_hub(postgres, redis))
        actors: dict[str, Actor] = {}
        for role in ("a", "b", "s", "h", "n"):
            name = f"{tag}-{role}"
            token = await add_node(hub.pool, "west", name, [CELL])
            clock = SeamClock()
            e = await stack.enter_async_context(
                edge(stack, tmp_path, name, url, token, wall=clock, subscriptions=[CELL])
            )
            actors[role] = Actor(name, e, clock)
        a, b, s, h, n = (actors[role] for role in ("a", "b", "s", "h", "n"))

        # Everyone holds every record.
        for rk, script in zip(records, scripts, strict=True):
            await put(a, batch, rk, script.initial)
        for actor in (a, b, s, h):
            await sync_clean(actor, batch)

        # Offline edits stamped before the delete: B runs 1 min ahead, H 30 s, S 10 min slow.
        b.clock.offset_ms, h.clock.offset_ms, s.clock.offset_ms = (
            MINUTE_MS,
            MINUTE_MS // 2,
            -10 * MINUTE_MS,
        )
        for rk, script in zip(records, scripts, strict=True):
            for names in script.b_before:
                await put(b, batch, rk, names, batch.meant_before)
            for names in script.stale:
                await put(s, batch, rk, names, batch.meant_before)
            for names in script.late:
                await put(h, batch, rk, names, batch.meant_before)

        # A (2 min ahead) deletes, may revive and delete again; its push lands while N is
        # between two pages of its bootstrap.
        a.clock.offset_ms = 2 * MINUTE_MS
        for rk, script in zip(records, scripts, strict=True):
            await delete(a, batch, rk)
            if script.revive:
                await put(a, batch, rk, script.revive)
            if script.delete_again:
                await delete(a, batch, rk)
        page_size = max(1, len(records) // 3)
        n.edge.syncer.snapshot_sizer = BatchSizer(start=page_size, ceiling=page_size)
        real_snapshot = n.edge.link.snapshot
        pages = 0

        async def snapshot_with_a_delete_between_pages(**kw: Any) -> Any:
            nonlocal pages
            page = await real_snapshot(**kw)
            pages += 1
            if pages == 1:
                await sync_clean(a, batch)
            return page

        n.edge.link.snapshot = snapshot_with_a_delete_between_pages
        await n.edge.syncer.bootstrap()
        batch.figures["snapshot_pages"] += pages
        await sync_clean(a, batch)

        # B (3 min ahead: after the delete) edits on, then comes back; S pushes stale edits.
        b.clock.offset_ms = 3 * MINUTE_MS
        for rk, script in zip(records, scripts, strict=True):
            for names in script.b_after:
                await put(b, batch, rk, names, batch.meant_after)
        await sync_until_quiet([b, s, a, n], batch)

        # Forty days on, the feed is dropped up to its head while H is still away.
        later = dt.datetime.now(dt.UTC) + dt.timedelta(days=RETENTION_DAYS + 10)
        report = await maintain_feed(hub.pool, retention_days=RETENTION_DAYS, now=later)
        h_cursor = max(cursors(h.edge.store.path).values(), default=0)
        batch.figures["behind_horizon"] += int(report.horizon > h_cursor)
        await sync_clean(h, batch)
        batch.figures["rebootstrapped"] += int(CELL in bootstrapped(h.edge.store.path))
        await sync_until_quiet([h, a, b, s, n], batch)

        replicas = {actor.name: edge_states(actor.edge.store.path) for actor in (a, b, s, h, n)}
        replicas["hub"] = await hub_states(dsn)
    return batch, replicas


def cursors(path: Path) -> dict[str, int]:
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
        return dict(conn.execute("SELECT name, value FROM cursors"))


def bootstrapped(path: Path) -> list[str]:
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
        row = conn.execute("SELECT value FROM meta WHERE key = 'bootstrapped'").fetchone()
    return json.loads(row[0]) if row else []


def edge_states(path: Path) -> dict[RecordKey, bytes]:
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
        return {
            (c, coll, k): bytes(state)
            for c, coll, k, state in conn.execute(
                "SELECT cell, collection, key, state FROM records"
            )
        }


async def hub_states(dsn: str) -> dict[RecordKey, bytes]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT cell, collection, key, state FROM records")
    finally:
        await conn.close()
    return {(r["cell"], r["collection"], r["key"]): bytes(r["state"]) for r in rows}


def judge_batch(batch: Batch, replicas: dict[str, dict[RecordKey, bytes]], found: Findings) -> int:
    """Judge every replica's copy of every record; returns the replica-record checks."""
    by_record: dict[RecordKey, list[Write]] = {}
    for w in batch.writes:
        by_record.setdefault(w.record, []).append(w)
    judged = 0
    for rk, writes in by_record.items():
        resolver = RESOLVERS[rk[1]]
        deletes = sorted(w.stamp for w in writes if w.fields is None)
        # The time seams must have put every edit where its script says.
        for w in writes:
            if (rk, w.stamp) in batch.meant_before:
                batch.figures["pre_tombstone_edits"] += 1
                if w.stamp > deletes[0]:
                    found.add("seam_failures", f"{rk}: {w.stamp} is after the delete {deletes[0]}")
            if (rk, w.stamp) in batch.meant_after:
                batch.figures["post_tombstone_edits"] += 1
                if w.stamp < deletes[-1]:
                    found.add(
                        "seam_failures", f"{rk}: {w.stamp} is before the delete {deletes[-1]}"
                    )
        for where, states in replicas.items():
            judged += 1
            if rk not in states:
                found.add("divergent", f"{where} lacks {rk}")
                continue
            check_replica(where, rk, states[rk], writes, resolver, found)
    return judged


# ---------------------------------------------------------------------------------- tests


def summary_of(summary: Summary, found: Findings, figures: dict[str, Any]) -> None:
    summary.counts = {
        "divergent": found.counts["divergent"],
        "resurrected": len(found.resurrected),
        "resurrected_replicas": found.counts["resurrected"],
        "revival_mismatches": found.counts["revival_mismatches"],
        "seam_failures": found.counts["seam_failures"],
        "sync_errors": figures.pop("sync_errors", 0),
    }
    summary.figures = {**figures, "examples": found.examples}


VIOLATIONS = (
    "resurrected",
    "resurrected_replicas",
    "revival_mismatches",
    "seam_failures",
    "sync_errors",
)


async def test_t10_tombstones_resurrect_nothing(
    postgres: PostgresServer, redis_server: RedisServer, tmp_path: Path
) -> None:
    """Generated delete/offline-edit/stale-push/bootstrap/horizon scenarios: fields written
    after a tombstone revive alone, earlier writes never, at every replica and in the model."""
    in_process, e2e_batches, per_batch = pick((500, 1, 500), (20_000, 20, 1_000))
    summary = Summary(test="T10", name="tombstones and resurrection", extra_violations=VIOLATIONS)
    found = Findings()
    scenarios, folds = run_in_process(in_process, real_apply_change, found)
    figures: dict[str, Any] = {"in_process_scenarios": scenarios, "in_process_folds": folds}
    e2e = Counter[str]()
    errors: list[str] = []
    for i in range(e2e_batches):
        scripts = draw_scripts(per_batch, salt=i)
        batch, replicas = await run_batch(postgres, redis_server, tmp_path, scripts, f"t{i}")
        e2e["e2e_scenarios"] += len(scripts)
        e2e["replica_record_checks"] += judge_batch(batch, replicas, found)
        e2e["e2e_writes"] += len(batch.writes)
        e2e.update(batch.figures)
        errors += batch.errors
    figures.update(e2e, sync_errors=len(errors))
    summary.cases = scenarios + e2e["e2e_scenarios"]
    summary_of(summary, found, figures)
    summary.figures["examples"] += errors[:3]
    summary.finish()
    assert e2e["behind_horizon"] == e2e_batches and e2e["rebootstrapped"] == e2e_batches, (
        f"the away edge was not behind the feed horizon or did not re-bootstrap: {dict(e2e)}"
    )
    assert e2e["snapshot_pages"] >= 2 * e2e_batches, (
        "the bootstrap had one page: no delete between pages"
    )
    assert e2e["pre_tombstone_edits"] > 0, "no edit was stamped before a delete it arrived after"


# --------------------------------------------------------------------------- negative control


def revive_whole_record(real: ApplyChange) -> ApplyChange:
    """A broken merge: a delete hides the record but keeps its values, and any write stamped
    after the tombstone lifts it, bringing every old value back."""

    def apply_change(
        state: RecordState | None, change: Change, resolver: str = "lww", **kw: Any
    ) -> Applied:
        if change.fields is None:
            new = state.copy() if state is not None else RecordState()
            if new.tomb is None or change.stamp > new.tomb:
                new.tomb = change.stamp
            return Applied(new, [])
        if state is not None and state.tomb is not None and change.stamp > state.tomb:
            state = RecordState(dict(state.fields), None, dict(state.hub))
        return real(state, change, resolver, **kw)

    return apply_change


@pytest.fixture
def whole_record_revival(monkeypatch: pytest.MonkeyPatch) -> Iterator[ApplyChange]:
    broken = revive_whole_record(real_apply_change)
    monkeypatch.setattr(hub_push, "apply_change", broken)
    monkeypatch.setattr(edge_store, "apply_change", broken)
    yield broken


async def test_t10_control_a_write_reviving_the_whole_record_is_caught(
    whole_record_revival: ApplyChange,
    postgres: PostgresServer,
    redis_server: RedisServer,
    tmp_path: Path,
) -> None:
    """Negative control: with a merge where a later write revives the whole record, both the
    in-process fold and a small end-to-end batch must show resurrections."""
    summary = Summary(test="T10", name="control: a write revives the whole record")
    in_process = Findings()
    scenarios, _ = run_in_process(200, whole_record_revival, in_process)
    found = Findings()
    batch, replicas = await run_batch(postgres, redis_server, tmp_path, draw_scripts(20, 0), "c")
    judge_batch(batch, replicas, found)
    summary.cases = scenarios + 20
    summary_of(summary, found, {"in_process_resurrected": len(in_process.resurrected)})
    summary.counts["resurrected"] += len(in_process.resurrected)
    summary.control("resurrected")
    assert in_process.resurrected, (
        "the in-process fold did not see the broken merge's resurrections"
    )
    assert found.resurrected, "the end-to-end batch did not see the broken merge's resurrections"
