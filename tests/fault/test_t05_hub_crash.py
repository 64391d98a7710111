"""T5: hub kill -9 and PostgreSQL crash loop: an acknowledged push survives, and retrying
any push changes nothing after its first success (invariant 2, exactly once).

K=20 simulated edges (asyncio clients speaking the real push protocol, each node with its own
lane and seqs and globally unique values) push batches through 2 hub **processes** (each
runs ``syncengine hub run --config hub.toml``; see ``cluster.py``) against the private
PostgreSQL and Redis, a random hub first and the other one on each retry. A third of the
collections use the ``counter`` resolver, the one a double apply shows in. Two readers pull
the feed by cursor and walk ``/v1/snapshot`` page by page meanwhile.

The nemesis, seeded:

- SIGKILLs a random ready hub at random times (quick: every 1 to 3 s; long: the plan's 2 to
  10 s);
- arms, in half the hub (re)starts, one crash point of the hub, in turn
  ``hub.push.before_commit``, ``hub.push.after_commit_before_response`` (twice as often:
  the lost answer of a committed push is what retries must survive),
  ``hub.feed.after_append_before_commit``, ``hub.cache.after_pg_commit_before_redis_set``
  and ``snapshot.mid_stream``, so that hub dies at that instant after a few passes;
- a supervisor restarts every dead hub on its port (hubs are forked from a fork server that
  imported the hub once: see ``cluster.py``);
- crashes PostgreSQL (``pg_ctl stop -m immediate``, then a start with WAL recovery), and now
  and then freezes it with SIGSTOP for a few seconds instead.

Clients retry the very same batch after a 5xx, a timeout or a broken connection (the outcome
is unknown: ``info`` in the history) until it is acknowledged; at the end a batch still
unacknowledged stays ``info``. The run ends when the targets (kills, PostgreSQL crashes,
crash-point hits) are reached, or at the time cap; the history, nemesis included, is in
``history.jsonl`` of the test's directory.

The checker reads PostgreSQL with asyncpg and compares it with the history (no syncengine
code): every acknowledged change is in the feed exactly once with its own stamp and value
and is reflected in ``records``; every ``info`` batch is applied 0 or 1 times, whole; per
node lane ``node_lanes.acked_seq`` is the highest seq applied; every ``counter`` total is the
model's sum over distinct ``(node, lane, seq)``; nothing is in the feed or ``records`` that
no client sent. Each reader's pulls hold no change twice and, after a final drain, miss none.

The negative control runs a smaller scenario against ``broken_hub.py`` (the push dedup
switched off): the checker must find double applies.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import signal
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import msgpack
import pytest

from fault.cluster import HubCluster, HubProcess
from fault.harness import SEED, History, Summary, crashpoint_hits, pick
from support.servers import PostgresServer
from syncengine.codec import decode, encode
from syncengine.merge import Change
from syncengine.protocol import (
    PushBatch,
    decode_pull_page,
    decode_push_answer,
    decode_snapshot_page,
    encode_push,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BROKEN_HUB = Path(__file__).with_name("broken_hub.py")

PREFIX = "west/ng/lagos"
#: The cell every client's counter changes go to: counters are shared across nodes.
DEPOT = f"{PREFIX}/depot"
LWW_COLLECTIONS = ("visits", "notes", "labs", "referrals")
COUNTER_COLLECTIONS = ("stock", "doses")
COUNTER_KEYS = 6
HUB_SETTINGS: dict[str, Any] = {
    "tier_rules": [{"prefix": DEPOT, "tier": "critical"}],
    "resolvers": dict.fromkeys(COUNTER_COLLECTIONS, "counter"),
}
PULL_TIERS = ("critical", "standard")

AFTER_COMMIT = "hub.push.after_commit_before_response"
#: Every crash point a hub passes under this load (each must fire).
POINTS = (
    "hub.push.before_commit",
    AFTER_COMMIT,
    "hub.feed.after_append_before_commit",
    "hub.cache.after_pg_commit_before_redis_set",
    "snapshot.mid_stream",
)
#: The order armed (re)starts take them in.
ROTATION = (*POINTS, AFTER_COMMIT)
#: Hits each point needs, and the plan's figure for the lost answer of a committed push.
MIN_HITS = pick(1, 20)
AFTER_COMMIT_HITS = pick(5, 50)

PUSH_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 10.0
DRAIN_TIMEOUT_S = 90.0


@dataclass(frozen=True, kw_only=True)
class Plan:
    """How big a run is and how hard the nemesis hits."""

    clients: int
    #: Targets: the run ends once both are reached (or after ``max_s``).
    hub_kills: int
    pg_crashes: int
    #: Seconds between two nemesis kills of a hub, and between two PostgreSQL faults.
    kill_every_s: tuple[float, float]
    pg_every_s: tuple[float, float]
    #: Every ``pause_every``-th PostgreSQL fault is a SIGSTOP of this many seconds.
    pause_s: tuple[float, float]
    pause_every: int
    max_s: float
    #: Share of hub (re)starts that arm the next point of ``rotation``, and its probability
    #: per pass.
    armed_share: float = 0.5
    rotation: tuple[str, ...] = ROTATION
    point_p: float = 0.3
    #: ``FILE:FUNCTION`` that patches a broken build into the hubs (see cluster.py).
    prepare: str | None = None
    readers: int = 2


QUICK = Plan(
    clients=20,
    hub_kills=100,
    pg_crashes=10,
    kill_every_s=(1.0, 3.0),
    pg_every_s=(4.0, 7.0),
    pause_s=(1.5, 3.0),
    pause_every=4,
    max_s=125.0,
)
LONG = Plan(
    clients=20,
    hub_kills=1_000,
    pg_crashes=100,
    # Means of 3 s and 30 s: both targets are reached in about 50 minutes.
    kill_every_s=(1.0, 5.0),
    pg_every_s=(20.0, 40.0),
    pause_s=(5.0, 5.0),
    pause_every=4,
    max_s=4 * 3600.0,
    point_p=0.05,
)
#: The negative control: small, and the point that makes edges retry applied batches hot.
CONTROL = Plan(
    clients=6,
    hub_kills=6,
    pg_crashes=0,
    kill_every_s=(1e9, 1e9),  # no timed kills: hubs die at the crash point only
    pg_every_s=(1e9, 1e9),
    pause_s=(0.0, 0.0),
    pause_every=1,
    max_s=10.0,
    armed_share=1.0,
    rotation=(AFTER_COMMIT,),
    point_p=0.1,
    prepare=f"{BROKEN_HUB}:disable_dedup",
    readers=0,
)


# ============================================================================ the workload


@dataclass
class Sent:
    """One change a client sent: its identity, where it goes and its unique value."""

    node: str
    lane: int
    seq: int
    hlc: int
    cell: str
    collection: str
    key: str
    fields: dict[str, Any]


@dataclass
class Batch:
    node: str
    lane: int
    first: int
    last: int
    changes: list[Sent]
    #: invoke → ok (acknowledged) | info (outcome unknown at the end) | fail (refused: 4xx)
    status: str = "invoke"
    attempts: int = 0


@dataclass
class Stats:
    statuses: Counter[str] = field(default_factory=Counter)
    attempts: int = 0
    unknown: int = 0
    retried_batches: int = 0
    #: Retries answered as replays: batches, and changes the hub did not apply again.
    replays: int = 0
    suppressed: int = 0
    rejected: int = 0
    bad_answers: int = 0
    pulls: int = 0
    snapshot_pages: int = 0
    snapshots_done: int = 0
    reader_errors: int = 0
    pull_duplicates: int = 0


@dataclass
class Faults:
    nemesis_kills: int = 0
    deaths: int = 0  # hub processes that died by SIGKILL (nemesis or crash point)
    start_failures: int = 0  # a (re)start that exited by itself (PostgreSQL down or frozen)
    pg_crashes: int = 0
    pg_pauses: int = 0
    #: Per hub, since when it has been answering (None while it is down or starting).
    up_since: dict[str, float | None] = field(default_factory=dict)
    #: Seconds from a hub's (re)start to its first answer on /healthz.
    restart_s: list[float] = field(default_factory=list)


def _hlc(prev: int) -> int:
    return max(prev + 1, (time.time_ns() // 1_000_000) << 16)


class Edge:
    """A simulated edge: one node, one lane, batches in seq order, each retried as is."""

    def __init__(self, i: int, token: str, hubs: list[str], history: History, stats: Stats):
        self.node = f"t5-edge-{i:02d}"
        self.lane = i % 4
        self.cell = f"{PREFIX}/clinic-{i}"
        self.token = token
        self.hubs = hubs
        self.history = history
        self.stats = stats
        self.rng = random.Random(SEED * 1_000 + i)
        self.batches: list[Batch] = []
        self._seq = 0
        self._hlc = 0

    def _change(self) -> Sent:
        self._seq += 1
        self._hlc = _hlc(self._hlc)
        coll = self.rng.choice(LWW_COLLECTIONS + COUNTER_COLLECTIONS)
        if coll in COUNTER_COLLECTIONS:
            cell, key = DEPOT, f"item-{self.rng.randrange(COUNTER_KEYS)}"
            fields: dict[str, Any] = {"qty": self.rng.randint(1, 9)}
        else:
            cell, key = self.cell, f"{self.node}-{self._seq}"
            fields = {"v": f"{self.node}/{self._seq}"}
        return Sent(self.node, self.lane, self._seq, self._hlc, cell, coll, key, fields)

    async def run(self, http: aiohttp.ClientSession, stop: asyncio.Event) -> None:
        while not stop.is_set():
            changes = [self._change() for _ in range(self.rng.randint(1, 8))]
            batch = Batch(self.node, self.lane, changes[0].seq, changes[-1].seq, changes)
            self.batches.append(batch)
            span = {"lane": batch.lane, "first": batch.first, "last": batch.last}
            self.history.log(self.node, "push", "invoke", span)
            if not await self._push(http, batch, stop):
                return
            await asyncio.sleep(self.rng.uniform(0, 0.03))

    async def _push(self, http: aiohttp.ClientSession, batch: Batch, stop: asyncio.Event) -> bool:
        """Push ``batch`` until acknowledged (True), refused (False) or ``stop`` (False)."""
        body = encode(
            encode_push(
                PushBatch(
                    node=batch.node,
                    lane=batch.lane,
                    first_seq=batch.first,
                    last_seq=batch.last,
                    changes=[
                        Change(
                            cell=c.cell,
                            collection=c.collection,
                            key=c.key,
                            hlc=c.hlc,
                            node=c.node,
                            fields=c.fields,
                            lane=c.lane,
                            seq=c.seq,
                        )
                        for c in batch.changes
                    ],
                )
            )
        )
        headers = {
            "Authorization": f"Bearer {self.token}",
            "Content-Type": "application/msgpack",
            "Accept-Encoding": "identity",
        }
        span = {"lane": batch.lane, "first": batch.first, "last": batch.last}
        backoff = 0.05
        hub = self.rng.randrange(len(self.hubs))
        refused = 0  # attempts refused in a row (the hub asked was down)
        while True:
            batch.attempts += 1
            self.stats.attempts += 1
            if batch.attempts == 2:
                self.stats.retried_batches += 1
            url = self.hubs[hub] + "/v1/push"
            try:
                async with http.post(
                    url,
                    data=body,
                    headers=headers,
                    timeout=aiohttp.ClientTimeout(total=PUSH_TIMEOUT_S),
                ) as resp:
                    status, raw = resp.status, await resp.read()
            except (aiohttp.ClientError, TimeoutError) as exc:
                # Refused: that hub is down (the request never left); any other error
                # leaves the outcome unknown.
                refused = refused + 1 if isinstance(exc, aiohttp.ClientConnectorError) else 0
                self.stats.statuses[type(exc).__name__] += 1
                self.history.log(self.node, "push", "info", {**span, "error": type(exc).__name__})
            else:
                refused = 0
                self.stats.statuses[str(status)] += 1
                if status == 200:
                    return self._acked(batch, raw, span)
                if status < 500:
                    # Nothing a correct hub refuses here: each batch follows the last one
                    # acknowledged, and a retry is the same batch.
                    self.stats.rejected += 1
                    batch.status = "fail"
                    self.history.log(
                        self.node,
                        "push",
                        "fail",
                        {**span, "status": status, "body": raw[:300].decode(errors="replace")},
                    )
                    return False
                self.history.log(self.node, "push", "info", {**span, "status": status})
            self.stats.unknown += 1
            batch.status = "info"
            if stop.is_set():
                return False
            # The next attempt goes to the other hub; a hub that refused is being restarted,
            # so try the other one at once (and back off once every hub refused).
            hub = (hub + 1) % len(self.hubs)
            if 0 < refused < len(self.hubs):
                continue
            await asyncio.sleep(self.rng.uniform(0.5, 1.0) * backoff)
            backoff = min(backoff * 2, 1.0)

    def _acked(self, batch: Batch, raw: bytes, span: dict[str, int]) -> bool:
        answer = decode_push_answer(decode(raw))
        batch.status = "ok"
        if answer.acked != batch.last:
            self.stats.bad_answers += 1
        if batch.attempts > 1 and answer.applied < len(batch.changes):
            self.stats.replays += 1
            self.stats.suppressed += len(batch.changes) - answer.applied
        self.history.log(
            self.node, "push", "ok", {**span, "applied": answer.applied, "acked": answer.acked}
        )
        return True


class Reader:
    """Pulls the feed of two tiers by cursor and walks snapshots, page by page."""

    def __init__(self, j: int, token: str, hubs: list[str], stats: Stats):
        self.node = f"t5-reader-{j}"
        self.token = token
        self.hubs = hubs
        self.stats = stats
        self.rng = random.Random(SEED * 1_000 + 900 + j)
        self.cursors = dict.fromkeys(PULL_TIERS, 0)
        #: (node, lane, seq) of every change pulled, with how often.
        self.seen: Counter[tuple[str, int, int]] = Counter()
        self.heads: dict[str, int] = {}
        self._snapshot_after: str | None = None

    async def _get(self, http: aiohttp.ClientSession, path: str, params: dict[str, Any]) -> Any:
        url = self.rng.choice(self.hubs) + path
        async with http.get(
            url,
            params=params,
            headers={"Authorization": f"Bearer {self.token}", "Accept-Encoding": "identity"},
            timeout=aiohttp.ClientTimeout(total=READ_TIMEOUT_S),
        ) as resp:
            raw = await resp.read()
            if resp.status != 200:
                raise aiohttp.ClientResponseError(
                    resp.request_info, (), status=resp.status, message=raw[:200].decode()
                )
        return decode(raw)

    async def pull(self, http: aiohttp.ClientSession, tier: str) -> bool:
        """One page of ``tier``; True when the cursor reached the head it saw."""
        params = {"tier": tier, "prefix": PREFIX, "after": self.cursors[tier], "limit": 500}
        page = decode_pull_page(await self._get(http, "/v1/pull", params))
        for c in page.changes:
            self.seen[(c.node, c.lane, c.seq)] += 1
            if self.seen[(c.node, c.lane, c.seq)] == 2:
                self.stats.pull_duplicates += 1
        self.cursors[tier] = page.next_cursor
        self.heads[tier] = page.head
        self.stats.pulls += 1
        return not page.more

    async def snapshot_page(self, http: aiohttp.ClientSession) -> None:
        params: dict[str, Any] = {"prefix": PREFIX, "limit": 25}
        if self._snapshot_after:
            params["after"] = self._snapshot_after
        page = decode_snapshot_page(await self._get(http, "/v1/snapshot", params))
        self.stats.snapshot_pages += 1
        self._snapshot_after = page.next
        if page.next is None:
            self.stats.snapshots_done += 1

    async def run(self, http: aiohttp.ClientSession, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.pull(http, self.rng.choice(PULL_TIERS))
                for _ in range(3):
                    await self.snapshot_page(http)
            except (aiohttp.ClientError, TimeoutError):
                self.stats.reader_errors += 1
                await asyncio.sleep(0.1)
            await asyncio.sleep(self.rng.uniform(0, 0.05))

    async def drain(self, http: aiohttp.ClientSession) -> None:
        """Pull every tier to its head, with no faults running any more."""
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        for tier in PULL_TIERS:
            while True:
                try:
                    if await self.pull(http, tier):
                        break
                except (aiohttp.ClientError, TimeoutError):
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.2)


# ============================================================================ the nemesis


class Nemesis:
    """Kills hubs, restarts them (armed or not), crashes and freezes PostgreSQL."""

    def __init__(
        self,
        plan: Plan,
        hubs: list[HubProcess],
        postgres: PostgresServer,
        crash_log: Path,
        history: History,
    ) -> None:
        self.plan = plan
        self.history = history
        self.hubs = hubs
        self.crash_log = crash_log
        self.postgres = postgres
        self.rng = random.Random(SEED)
        self.faults = Faults(up_since={h.name: time.monotonic() for h in hubs})
        self.done = asyncio.Event()
        #: Once set, hubs restart with no crash point armed.
        self.calm = False
        self._turn = -1
        self.started = time.monotonic()

    def log(self, op: str, value: Any = None) -> None:
        self.history.log("nemesis", op, "info", value)

    def points(self) -> dict[str, float]:
        """The crash point to arm in the next (re)start of a hub: none, or the next in turn."""
        if self.calm or self.rng.random() >= self.plan.armed_share:
            return {}
        self._turn += 1
        return {self.plan.rotation[self._turn % len(self.plan.rotation)]: self.plan.point_p}

    def reached(self) -> bool:
        """The run is done: the targets of kills and crashes are reached and every point of
        the rotation fired often enough (or the time is up)."""
        if time.monotonic() - self.started > self.plan.max_s:
            return True
        f = self.faults
        if f.deaths < self.plan.hub_kills or f.pg_crashes < self.plan.pg_crashes:
            return False
        hits = crashpoint_hits(self.crash_log)
        return all(hits[p] >= MIN_HITS for p in self.plan.rotation) and (
            AFTER_COMMIT not in self.plan.rotation or hits[AFTER_COMMIT] >= AFTER_COMMIT_HITS
        )

    async def supervise(self, hub: HubProcess) -> None:
        """Restart ``hub`` whenever it dies, on its port, until cancelled."""
        backoff = 0.1
        while True:
            code = await hub.wait_exit()
            self.faults.up_since[hub.name] = None
            self.log("exited", {"hub": hub.name, "code": code, "armed": hub.armed})
            if code == -signal.SIGKILL:
                self.faults.deaths += 1
            else:
                self.faults.start_failures += 1
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 1.0)
            began = time.monotonic()
            hub.start(self.points())
            try:
                up = await hub.wait_ready(timeout_s=60.0)
            except TimeoutError:
                hub.kill()
                continue
            if up:
                backoff = 0.1
                self.faults.restart_s.append(time.monotonic() - began)
                self.faults.up_since[hub.name] = time.monotonic()
                self.log("up", {"hub": hub.name, "armed": hub.armed})

    async def _pause(self, span: tuple[float, float]) -> bool:
        """Sleep a random time in ``span``; False once the run is done."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.done.wait(), timeout=self.rng.uniform(*span))
        return not self.done.is_set()

    async def kill_hubs(self) -> None:
        """SIGKILL a random hub that is up, at random times. A hub armed with a crash point
        is left to die there, unless it outlived three kill intervals (its point may be
        out of reach: no snapshot traffic, PostgreSQL down)."""
        grace = 3 * self.plan.kill_every_s[1]
        while await self._pause(self.plan.kill_every_s):
            now = time.monotonic()
            victims = [
                h
                for h in self.hubs
                if (since := self.faults.up_since[h.name]) is not None
                and (not h.armed or now - since > grace)
            ]
            victim = self.rng.choice(victims) if victims else None
            if victim is not None and victim.kill():
                self.log("kill", {"hub": victim.name})
                self.faults.nemesis_kills += 1

    async def hit_postgres(self) -> None:
        """Crash PostgreSQL, or freeze it a few seconds, at random times, until the target
        of crashes is reached (hub kills may need longer)."""
        events = 0
        try:
            while self.faults.pg_crashes < self.plan.pg_crashes and await self._pause(
                self.plan.pg_every_s
            ):
                events += 1
                if events % self.plan.pause_every == 0:
                    await asyncio.to_thread(self.postgres.pause)
                    self.log("pg_pause")
                    self.faults.pg_pauses += 1
                    await asyncio.sleep(self.rng.uniform(*self.plan.pause_s))
                    await asyncio.to_thread(self.postgres.resume)
                    self.log("pg_resume")
                else:
                    await asyncio.to_thread(self.postgres.crash)
                    self.log("pg_crash")
                    self.faults.pg_crashes += 1
                    await asyncio.sleep(self.rng.uniform(0.0, 1.0))
                    await asyncio.to_thread(self.postgres.start)
                    self.log("pg_start")
        finally:
            await asyncio.to_thread(self.postgres.ensure_running)

    async def watch(self) -> None:
        while not self.reached():
            await asyncio.sleep(0.2)
        self.done.set()


# ============================================================================ the checker
# Reads PostgreSQL with asyncpg and msgpack only: no syncengine code checks syncengine.


@dataclass
class Verdict:
    counts: dict[str, int]
    figures: dict[str, int]
    examples: list[str]


async def check(dsn: str, batches: list[Batch]) -> Verdict:
    """Compare the hub's tables with what the clients sent and were told."""
    conn = await asyncpg.connect(dsn)
    try:
        feed = await conn.fetch("SELECT node_id, lane, seq, hlc, fields FROM feed")
        records = {
            (r["cell"], r["collection"], r["key"]): (
                None if r["doc"] is None else json.loads(r["doc"])
            )
            for r in await conn.fetch("SELECT cell, collection, key, doc::text AS doc FROM records")
        }
        lanes = {
            (r["node_id"], r["lane"]): r["acked_seq"]
            for r in await conn.fetch("SELECT node_id, lane, acked_seq FROM node_lanes")
        }
    finally:
        await conn.close()

    in_feed: dict[tuple[str, int, int], list[Any]] = {}
    for r in feed:
        in_feed.setdefault((r["node_id"], r["lane"], r["seq"]), []).append(r)
    counts = Counter[str]()
    examples: list[str] = []

    def flag(name: str, what: str) -> None:
        counts[name] += 1
        if len(examples) < 10:
            examples.append(f"{name}: {what}")

    sent: dict[tuple[str, int, int], Sent] = {}
    lost: set[tuple[str, int, int]] = set()
    applied: list[Sent] = []
    top: dict[tuple[str, int], int] = {}
    figures = Counter[str]()
    for b in batches:
        present = []
        for c in b.changes:
            ident = (c.node, c.lane, c.seq)
            sent[ident] = c
            rows = in_feed.get(ident, [])
            present.append(bool(rows))
            if len(rows) > 1:
                flag("duplicated", f"{ident} is in the feed {len(rows)} times")
                counts["double_applied"] += len(rows) - 1
            for r in rows[:1]:
                if r["hlc"] != c.hlc or msgpack.unpackb(r["fields"], raw=False) != c.fields:
                    flag("mismatched", f"{ident}: the feed holds another change under this seq")
        if b.status == "ok" and not all(present):
            for c, p in zip(b.changes, present, strict=True):
                if not p:
                    lost.add((c.node, c.lane, c.seq))
                    flag("lost", f"acknowledged {(c.node, c.lane, c.seq)} is not in the feed")
        elif any(present) and not all(present):
            flag("partial_batches", f"{b.node} lane {b.lane} {b.first}..{b.last} applied in part")
        if b.status != "ok":
            figures[f"{b.status}_batches"] += 1
            figures[f"{b.status}_applied"] += all(present)
        if all(present):
            applied.extend(b.changes)
            top[(b.node, b.lane)] = max(top.get((b.node, b.lane), 0), b.last)

    for ident in in_feed.keys() - sent.keys():
        if ident[0].startswith("t5-"):
            flag("phantoms", f"{ident} is in the feed but no client sent it")

    # records: every applied LWW change holds its own value; counters are the distinct sum.
    expected_totals: Counter[tuple[str, str, str]] = Counter()
    lww_keys = set()
    for c in applied:
        rk = (c.cell, c.collection, c.key)
        if c.collection in COUNTER_COLLECTIONS:
            expected_totals[rk] += c.fields["qty"]
            continue
        lww_keys.add(rk)
        if records.get(rk) != c.fields and (c.node, c.lane, c.seq) not in lost:
            lost.add((c.node, c.lane, c.seq))
            flag("lost", f"{rk}: records holds {records.get(rk)!r}, not {c.fields!r}")
    for rk, total in expected_totals.items():
        got = (records.get(rk) or {}).get("qty")
        if got != total:
            flag("counter_off", f"{rk}: total {got}, the model's sum over distinct seqs {total}")
            counts["double_applied"] += 1
    for rk in records.keys() - lww_keys - expected_totals.keys():
        flag("phantoms", f"{rk} is in records but no applied change wrote it")

    for (node, lane), acked in lanes.items():
        if node.startswith("t5-edge") and acked != top.get((node, lane), 0):
            flag(
                "acked_seq_wrong",
                f"{node} lane {lane}: acked_seq {acked}, applied up to {top.get((node, lane), 0)}",
            )
    figures["feed_rows"] = len(feed)
    figures["records"] = len(records)
    return Verdict(counts=dict(counts), figures=dict(figures), examples=examples)


# ============================================================================ the scenario


@dataclass
class Outcome:
    verdict: Verdict
    faults: Faults
    stats: Stats
    batches: list[Batch]
    readers: list[Reader]
    hits: Counter[str]
    faulting_s: float


async def run_scenario(
    plan: Plan, *, postgres: PostgresServer, dsn: str, redis_url: str, workdir: Path
) -> Outcome:
    stats = Stats()
    async with (
        HubCluster(
            workdir,
            database_url=dsn,
            redis_url=redis_url,
            count=2,
            settings=HUB_SETTINGS,
            prepare=plan.prepare,
            points={plan.rotation[0]: plan.point_p} if plan.armed_share >= 1 else None,
        ) as cluster,
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http,
    ):
        with History(workdir / "history.jsonl") as history:
            edges = [
                Edge(
                    i,
                    await cluster.add_node(f"t5-edge-{i:02d}", PREFIX),
                    cluster.urls,
                    history,
                    stats,
                )
                for i in range(plan.clients)
            ]
            readers = [
                Reader(j, await cluster.add_node(f"t5-reader-{j}", PREFIX), cluster.urls, stats)
                for j in range(plan.readers)
            ]
            nemesis = Nemesis(plan, cluster.hubs, postgres, cluster.crash_log, history)
            stop_clients, stop_readers = asyncio.Event(), asyncio.Event()
            async with asyncio.TaskGroup() as tg:
                supervisors = [tg.create_task(nemesis.supervise(h)) for h in cluster.hubs]
                clients = [tg.create_task(e.run(http, stop_clients)) for e in edges]
                reading = [tg.create_task(r.run(http, stop_readers)) for r in readers]
                faults = [
                    tg.create_task(nemesis.kill_hubs()),
                    tg.create_task(nemesis.hit_postgres()),
                    tg.create_task(nemesis.watch()),
                ]
                await asyncio.gather(*faults)
                faulting_s = time.monotonic() - nemesis.started
                nemesis.calm = True
                stop_clients.set()
                await asyncio.gather(*clients)
                stop_readers.set()
                await asyncio.gather(*reading)
                for r in readers:
                    await r.drain(http)
                for s in supervisors:
                    s.cancel()
    hits = crashpoint_hits(cluster.crash_log)
    batches = [b for e in edges for b in e.batches]
    verdict = await check(dsn, batches)
    return Outcome(verdict, nemesis.faults, stats, batches, readers, hits, faulting_s)


async def pulled_missing(dsn: str, readers: list[Reader]) -> int:
    """Changes in the feed that a reader, drained to the head, never pulled."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT node_id, lane, seq FROM feed")
    finally:
        await conn.close()
    feed = {(r["node_id"], r["lane"], r["seq"]) for r in rows}
    return sum(len(feed - set(r.seen)) for r in readers)


def summarise(name: str, plan: Plan, out: Outcome, started: float) -> Summary:
    """The run's summary line: violations from the checker, figures from the run."""
    v, f, s = out.verdict, out.faults, out.stats
    acked = [b for b in out.batches if b.status == "ok"]
    restarts = sorted(f.restart_s) or [0.0]
    return Summary(
        test="T5",
        name=name,
        started=started,
        cases=f.deaths,
        acknowledged=sum(len(b.changes) for b in acked),
        counts={
            "lost": v.counts.get("lost", 0),
            # An error that escaped the hub's translation (PostgreSQL and kill faults must
            # be 503s the edge retries, never 500 internal_error).
            "server_errors": s.statuses["500"],
            "duplicated": v.counts.get("duplicated", 0),
            "double_applied": v.counts.get("double_applied", 0),
            "counter_off": v.counts.get("counter_off", 0),
            "partial_batches": v.counts.get("partial_batches", 0),
            "mismatched": v.counts.get("mismatched", 0),
            "phantoms": v.counts.get("phantoms", 0),
            "acked_seq_wrong": v.counts.get("acked_seq_wrong", 0),
            "rejected": s.rejected,
            "bad_answers": s.bad_answers,
            "pull_duplicates": s.pull_duplicates,
        },
        extra_violations=(
            "double_applied",
            "counter_off",
            "partial_batches",
            "mismatched",
            "phantoms",
            "acked_seq_wrong",
            "rejected",
            "bad_answers",
            "pull_duplicates",
            "pull_missed",
        ),
        min_hits=MIN_HITS,
        needs={AFTER_COMMIT: AFTER_COMMIT_HITS},
        figures={
            "hub_kills": f.deaths,
            "nemesis_kills": f.nemesis_kills,
            "crashpoint_kills": sum(out.hits.values()),
            "hub_start_failures": f.start_failures,
            "hub_restart_s": {
                "p50": round(restarts[len(restarts) // 2], 2),
                "max": round(restarts[-1], 2),
            },
            "pg_crashes": f.pg_crashes,
            "pg_pauses": f.pg_pauses,
            "targets": {"hub_kills": plan.hub_kills, "pg_crashes": plan.pg_crashes},
            "faulting_s": round(out.faulting_s, 1),
            "ended_by": "time" if out.faulting_s > plan.max_s else "targets",
            "clients": plan.clients,
            "pushes_acked": len(acked),
            "attempts": s.attempts,
            "retried_batches": s.retried_batches,
            "unknown_outcomes": s.unknown,
            "replays_answered": s.replays,
            "duplicates_suppressed": s.suppressed,
            "statuses": dict(s.statuses),
            "pulls": s.pulls,
            "snapshot_pages": s.snapshot_pages,
            "snapshots_done": s.snapshots_done,
            "reader_errors": s.reader_errors,
            **v.figures,
            "examples": v.examples,
        },
    )


# ============================================================================ the tests


async def test_t05_hub_kill_and_postgres_crash_loop_apply_every_push_exactly_once(
    postgres: PostgresServer, pg_dsn: str, redis_url: str, tmp_path: Path
) -> None:
    """Under hub SIGKILLs (timed and at crash points), PostgreSQL crash-restarts and
    freezes, every acknowledged push is applied exactly once, retries apply nothing again,
    unknown outcomes apply whole or not at all, and counters equal the model's sum."""
    started = time.monotonic()
    plan = pick(QUICK, LONG)
    out = await run_scenario(
        plan, postgres=postgres, dsn=pg_dsn, redis_url=redis_url, workdir=tmp_path
    )
    summary = summarise("hub kill -9 and PostgreSQL crash loop", plan, out, started)
    summary.counts["pull_missed"] = await pulled_missing(pg_dsn, out.readers)
    summary.cover(POINTS, out.hits)
    summary.cover(
        ["hub_kill_timer", "pg_crash", "pg_pause", "replay_suppressed"],
        {
            "hub_kill_timer": out.faults.nemesis_kills,
            "pg_crash": out.faults.pg_crashes,
            "pg_pause": out.faults.pg_pauses,
            "replay_suppressed": out.stats.replays,
        },
    )
    summary.finish()


async def test_t05_negative_control_without_push_dedup_double_applies(
    postgres: PostgresServer, pg_dsn: str, redis_url: str, tmp_path: Path
) -> None:
    """The same loop against a hub whose push dedup is switched off (``broken_hub.py``):
    retried batches are applied again, and the checker must see it."""
    started = time.monotonic()
    out = await run_scenario(
        CONTROL, postgres=postgres, dsn=pg_dsn, redis_url=redis_url, workdir=tmp_path
    )
    summary = summarise("negative control: push dedup disabled", CONTROL, out, started)
    summary.cover([AFTER_COMMIT], out.hits)
    summary.control("double_applied")
