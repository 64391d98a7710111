"""T11: Redis is only a cache (invariant 6).

Two hub processes-in-test share one PostgreSQL and one Redis, as a region's hubs do behind a
load balancer. Writers push to hub A; tailers long-poll hub B (so their wake-ups travel
through Redis pub/sub); catch-up readers pull pages from random cursors on both hubs (the
reads the feed-tail cache serves). Meanwhile a nemesis cycles Redis through: ``FLUSHALL``;
pub/sub loss during long-polls (``CLIENT KILL TYPE pubsub``, repeatedly); stop (connection
refused) and a restart empty; ``SIGSTOP`` (a black hole) and ``SIGCONT``; and a restart from
an RDB saved at the start of the cycle (a stale cache that lacks the batches pushed since).

The checker decodes every pull response with plain msgpack and compares it with the feed
rows PostgreSQL holds for the id range the page covers (read back with asyncpg; feed rows
never change once committed, so one read after the run is the truth for every page). It
counts: wrong reads; 5xx (PostgreSQL never fails here, so every one is Redis's); requests
that hit their client timeout (hung); changes a hub-B tailer received later than the hub's
longest re-read interval after their commit (missed wake-ups); outages that ``/readyz`` and
``/v1/status`` of both hubs did not call *degraded* within 5 s, or *ok* again within 10 s.

The negative control serves pulls from Redis without the check against PostgreSQL's id
range (a stale tail is trusted as complete) and must show wrong reads after the stale-RDB
restart. A last test keeps the PostgreSQL half of the former hub-outage test: the hub says
503 while PostgreSQL is down and loses nothing across its crash.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import json
import random
import shutil
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import msgpack
import pytest

from fault.harness import SEED, Summary, pick
from support.servers import PostgresServer, RedisServer
from syncengine.codec import encode
from syncengine.hub import push
from syncengine.hub.cache import MAX_BATCH_IDS, Cache
from syncengine.merge import Change
from syncengine.protocol import PushBatch, encode_push

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CYCLES = pick(5, 100)
#: Lane (= tier priority) → the cells its changes go to, under the default tier rules.
CELLS = {
    0: ["west/ng/lagos/clinic-12/alerts"],  # critical
    2: ["west/ng/lagos/clinic-12", "west/ng/lagos/clinic-1"],  # standard
}
TIERS = {"critical": 0, "standard": 2}
#: Pull prefixes; ``clinic-1`` must not match ``clinic-12`` (a prefix boundary).
PREFIXES = ["west/ng/lagos", "west/ng/lagos/clinic-12", "west/ng/lagos/clinic-1"]
LONG_POLL_S = 10
#: While Redis or a hub's pub/sub subscription is down, its long-polls re-read PostgreSQL
#: every second, and they all re-read at once when the subscription is back or another
#: hub's breaker closes (it announces the wake-ups it skipped): a change reaches a hub-B
#: tailer within about 1 s, plus slack for a loaded 2-core machine (the healthy re-read
#: interval, 5 s, bounds only a wake-up lost while everything looks healthy).
WAKEUP_BOUND_S = 2.5
DEGRADED_BOUND_S = 5.0
RECOVERED_BOUND_S = 10.0
PUSH_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 10.0
STATUS_TIMEOUT_S = 5.0

#: One feed entry: id, node, lane, seq, cell, collection, key, hlc, fields.
Row = tuple[int, str, int, int, str, str, str, int, Any]


def decode_page(body: bytes) -> tuple[int, list[Row]]:
    """A pull page decoded by hand from its msgpack wire form (ids and HLCs are delta-coded
    against the previous row): ``(next_cursor, rows)``."""
    msg = msgpack.unpackb(body, raw=False)
    rows: list[Row] = []
    feed_id = hlc = 0
    for id_delta, node_i, lane, seq, cell_i, coll_i, key, hlc_delta, fields, _ in msg["changes"]:
        feed_id += id_delta
        hlc += hlc_delta
        rows.append(
            (
                feed_id,
                msg["nodes"][node_i],
                lane,
                seq,
                msg["cells"][cell_i],
                msg["colls"][coll_i],
                key,
                hlc,
                fields,
            )
        )
    return msg["next"], rows


@dataclass
class Read:
    """One pull response to check: what was asked and what came back."""

    node: str
    tier: int
    prefix: str
    after: int
    limit: int
    next: int
    rows: list[Row]
    after_stale_restart: bool


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class Load:
    """Writers, catch-up readers and tailers against the hubs, and what they observed."""

    urls: dict[str, str]  # hub name → base URL
    tokens: dict[str, str]  # node → token
    rng: random.Random
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    reads: list[Read] = field(default_factory=list)
    acked: list[tuple[str, int, int]] = field(default_factory=list)  # node, lane, seq
    deliveries: list[tuple[str, int, float]] = field(default_factory=list)  # tailer, id, t
    committed_at: dict[int, float] = field(default_factory=dict)  # feed id → commit time
    outages: list[list[float]] = field(default_factory=list)  # [start, end] (end inf: open)
    latencies: list[tuple[float, float]] = field(default_factory=list)  # start, seconds
    statuses: Counter[str] = field(default_factory=Counter)
    server_errors: list[tuple[float, str]] = field(default_factory=list)  # started, what
    hung: list[str] = field(default_factory=list)
    stale_restarts: int = 0
    cursors: dict[str, int] = field(default_factory=dict)  # tailer → its cursor
    final_head: int = 0
    http: aiohttp.ClientSession | None = None

    def in_outage(self, t: float) -> bool:
        return any(start <= t <= end for start, end in self.outages)

    async def call(
        self,
        what: str,
        method: str,
        url: str,
        *,
        timeout: float,
        measure: bool = False,
        node: str | None = None,
        **kw: Any,
    ) -> tuple[int, bytes] | None:
        """One HTTP request; 5xx, transport errors and timeouts are recorded (None)."""
        assert self.http is not None
        headers = {"Authorization": f"Bearer {self.tokens[node]}"} if node else {}
        started = time.monotonic()
        try:
            async with self.http.request(
                method, url, headers=headers, timeout=aiohttp.ClientTimeout(total=timeout), **kw
            ) as resp:
                body = await resp.read()
        except TimeoutError:
            self.hung.append(f"{what} took over {timeout} s")
            return None
        except aiohttp.ClientError as exc:
            self.server_errors.append((started, f"{what}: {type(exc).__name__}: {exc}"))
            return None
        if measure:
            self.latencies.append((started, time.monotonic() - started))
        self.statuses[f"{what} {resp.status}"] += 1
        if resp.status >= 500:
            self.server_errors.append((started, f"{what} answered {resp.status}: {body[:200]!r}"))
            return None
        return resp.status, body

    async def writer(self, node: str, hub: str) -> None:
        seqs = dict.fromkeys(CELLS, 0)
        while not self.stop.is_set():
            lane = self.rng.choice(list(CELLS))
            n = self.rng.randint(1, 10)
            first = seqs[lane] + 1
            now = (time.time_ns() // 1_000_000) << 16
            batch = PushBatch(
                node=node,
                lane=lane,
                first_seq=first,
                last_seq=first + n - 1,
                changes=[
                    Change(
                        cell=self.rng.choice(CELLS[lane]),
                        collection="c",
                        key=f"k{self.rng.randint(0, 99)}",
                        hlc=now + i,
                        node=node,
                        fields={"v": f"{node}/{lane}/{first + i}"},
                        lane=lane,
                        seq=first + i,
                    )
                    for i in range(n)
                ],
            )
            body = encode(encode_push(batch))
            while True:  # an edge retries until the batch lands (a replay changes nothing)
                got = await self.call(
                    "push",
                    "POST",
                    f"{self.urls[hub]}/v1/push",
                    data=body,
                    node=node,
                    timeout=PUSH_TIMEOUT_S,
                    measure=True,
                )
                if got is not None:
                    status, answer = got
                    assert status == 200, f"push answered {status}: {answer[:300]!r}"
                    break
                await asyncio.sleep(0.1)
            seqs[lane] += n
            self.acked.extend((node, lane, first + i) for i in range(n))
            await asyncio.sleep(0.05)

    async def read_page(
        self,
        node: str,
        hub: str,
        *,
        tier: int,
        prefix: str,
        after: int,
        limit: int,
        wait: float,
        timeout: float,
        measure: bool,
    ) -> tuple[int, list[Row]] | None:
        name = next(k for k, v in TIERS.items() if v == tier)
        got = await self.call(
            "pull",
            "GET",
            f"{self.urls[hub]}/v1/pull",
            node=node,
            timeout=timeout,
            measure=measure,
            params={"tier": name, "prefix": prefix, "after": after, "limit": limit, "wait": wait},
        )
        if got is None:
            return None
        status, body = got
        assert status == 200, f"pull answered {status}: {body[:300]!r}"
        cursor, rows = decode_page(body)
        self.reads.append(
            Read(node, tier, prefix, after, limit, cursor, rows, self.stale_restarts > 0)
        )
        return cursor, rows

    async def reader(self, node: str, hub: str) -> None:
        """Pages from random cursors, like catch-up edges: half near the head (what the
        cached tail serves), half anywhere (across whatever the cache lacks)."""
        head = 0
        while not self.stop.is_set():
            tier = self.rng.choice(list(TIERS.values()))
            low = self.rng.choice([0, max(0, head - 300)])
            page = await self.read_page(
                node,
                hub,
                tier=tier,
                prefix=self.rng.choice(PREFIXES),
                after=self.rng.randint(low, head),
                limit=self.rng.randint(1, 300),
                wait=0,
                timeout=READ_TIMEOUT_S,
                measure=True,
            )
            if page is not None:
                head = max(head, page[0])
            await asyncio.sleep(0.02)

    async def tailer(self, node: str, hub: str, tier: int) -> None:
        """Long-polls from its cursor, like a live edge, until cancelled (:meth:`drain`)."""
        self.cursors[node] = 0
        while True:
            page = await self.read_page(
                node,
                hub,
                tier=tier,
                prefix=PREFIXES[0],
                after=self.cursors[node],
                limit=500,
                wait=LONG_POLL_S,
                timeout=LONG_POLL_S + 5,
                measure=False,
            )
            if page is None:
                await asyncio.sleep(0.1)
                continue
            received = time.monotonic()
            self.cursors[node] = page[0]
            self.deliveries.extend((node, row[0], received) for row in page[1])

    async def drain(
        self, pg_dsn: str, workers: list[asyncio.Task[None]], tailers: list[asyncio.Task[None]]
    ) -> None:
        """Stop writing and reading, note the feed's final head, let the tailers reach it
        (30 s at most: one that does not shows as skipped changes), then stop them."""
        self.stop.set()
        await asyncio.wait_for(asyncio.gather(*workers), timeout=60)
        self.final_head = await _head(pg_dsn)
        deadline = time.monotonic() + 30
        while (
            min(self.cursors.values(), default=self.final_head) < self.final_head
            and time.monotonic() < deadline
            and not any(t.done() for t in tailers)
        ):
            await asyncio.sleep(0.05)
        for task in tailers:
            task.cancel()
        for result in await asyncio.gather(*tailers, return_exceptions=True):
            if not isinstance(result, asyncio.CancelledError):
                raise AssertionError(f"a tailer failed: {result!r}") from result

    async def cache_states(self) -> list[str]:
        """What ``/v1/status`` and ``/readyz`` of every hub say of the cache. Status goes
        first: it only reports what the hub's own traffic found, while readyz probes."""
        states = []
        for hub, url in self.urls.items():
            status = await self.call(
                f"status {hub}", "GET", f"{url}/v1/status", timeout=STATUS_TIMEOUT_S
            )
            ready = await self.call(
                f"readyz {hub}", "GET", f"{url}/readyz", timeout=STATUS_TIMEOUT_S
            )
            states.append(json_field(status, "cache", "state"))
            states.append(json_field(ready, "cache"))
        return states

    async def wait_state(self, want: str, bound: float) -> float | None:
        """Seconds until every hub's ``/readyz`` and ``/v1/status`` say ``want``, or None
        when they did not within ``bound`` s."""
        start = time.monotonic()
        while time.monotonic() - start < bound:
            if all(s == want for s in await self.cache_states()):
                return time.monotonic() - start
            await asyncio.sleep(0.05)
        return None


def json_field(got: tuple[int, bytes] | None, *path: str) -> str:
    """A field of a JSON answer as text ("error" when the request failed)."""
    if got is None:
        return "error"
    value: Any = json.loads(got[1])
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    return str(value)


class RedisNemesis:
    """Redis faults through its pid (``RedisServer``) and its RDB file.

    The server runs with ``--dir`` its own directory and no save points, so it writes
    ``dump.rdb`` only on ``SAVE`` and loads it on start: removing the file makes a restart
    empty, putting an old copy back makes it stale.
    """

    def __init__(self, server: RedisServer, spare: Path) -> None:
        self.server = server
        self.rdb = server.log_path.parent / "dump.rdb"
        self.old_rdb = spare / "old.rdb"

    async def run(self, fn: Callable[[], Any]) -> Any:
        return await asyncio.to_thread(fn)  # the hubs share this event loop: never block it

    async def save(self) -> None:
        reply = await self.run(lambda: self.server.command("SAVE", timeout_s=10))
        assert reply == b"+OK", f"Redis SAVE answered {reply!r}"
        await self.run(lambda: shutil.copyfile(self.rdb, self.old_rdb))

    async def stop(self) -> None:
        await self.run(self.server.stop)

    async def start_empty(self) -> None:
        self.rdb.unlink(missing_ok=True)
        await self.run(self.server.start)

    async def start_stale(self) -> None:
        await self.run(lambda: shutil.copyfile(self.old_rdb, self.rdb))
        await self.run(self.server.start)

    async def kill_pubsub(self) -> None:
        await self.run(lambda: self.server.command("CLIENT", "KILL", "TYPE", "pubsub"))

    async def flushall(self) -> None:
        await self.run(self.server.flushall)

    async def pause(self) -> None:
        await self.run(self.server.pause)

    async def resume(self) -> None:
        await self.run(self.server.resume)

    async def restore(self) -> None:
        """Leave the session's Redis as the next test expects: running, empty, no RDB."""
        self.rdb.unlink(missing_ok=True)
        await self.run(self.server.ensure_running)
        await self.flushall()


def check(load: Load, feed: list[Row], tiers: dict[int, int]) -> dict[str, int]:
    """Compare every pull response with PostgreSQL's feed; classify deliveries and acks."""
    by_id = {r[0]: r for r in feed}
    ids = sorted(by_id)
    wrong = wrong_after_stale = 0
    for read in load.reads:
        lo = bisect.bisect_right(ids, read.after)
        hi = bisect.bisect_right(ids, read.next)
        want = [
            by_id[i]
            for i in ids[lo:hi]
            if tiers[i] == read.tier
            and by_id[i][1] != read.node
            and (by_id[i][4] == read.prefix or by_id[i][4].startswith(read.prefix + "/"))
        ]
        bad = (
            read.rows != want
            or len(read.rows) > read.limit
            or read.next < read.after
            or read.next > load.final_head
        )
        wrong += bad
        wrong_after_stale += bad and read.after_stale_restart
    in_feed = Counter((r[1], r[2], r[3]) for r in feed)
    per_tailer: dict[str, list[int]] = {}
    for node, feed_id, _ in load.deliveries:
        per_tailer.setdefault(node, []).append(feed_id)
    skipped = duplicated = 0
    for node, got in per_tailer.items():
        tier = 0 if node.endswith("critical") else 2
        expected = {i for i in ids if tiers[i] == tier}
        skipped += len(expected - set(got))
        duplicated += len(got) - len(set(got))
    return {
        "wrong_reads": wrong,
        "wrong_reads_after_stale_restart": wrong_after_stale,
        "lost": len(set(load.acked) - set(in_feed)),
        "duplicated": duplicated + sum(n - 1 for n in in_feed.values()),
        "skipped": skipped,
    }


async def _head(pg_dsn: str) -> int:
    """The feed head PostgreSQL holds now."""
    conn = await asyncpg.connect(pg_dsn)
    try:
        head: int = await conn.fetchval("SELECT id FROM feed_head")
    finally:
        await conn.close()
    return head


async def read_feed(pg_dsn: str) -> tuple[list[Row], dict[int, int]]:
    """The feed as PostgreSQL holds it: its rows, and the tier of each id."""
    conn = await asyncpg.connect(pg_dsn)
    try:
        rows = await conn.fetch(
            "SELECT id, node_id, lane, seq, cell, collection, key, hlc, "
            "fields, tier FROM feed ORDER BY id"
        )
    finally:
        await conn.close()
    feed: list[Row] = [
        (
            r["id"],
            r["node_id"],
            r["lane"],
            r["seq"],
            r["cell"],
            r["collection"],
            r["key"],
            r["hlc"],
            None if r["fields"] is None else msgpack.unpackb(r["fields"], raw=False),
        )
        for r in rows
    ]
    return feed, {r["id"]: r["tier"] for r in rows}


async def start_load(
    hub_factory: Any, monkeypatch: pytest.MonkeyPatch, *, hubs: int, rng: random.Random
) -> tuple[Load, list[Any]]:
    """``hubs`` hubs on the test's database and Redis, nodes registered, commit times
    recorded per feed id (after the hub's COMMIT, before its answer)."""
    running = [await hub_factory() for _ in range(hubs)]
    names = "AB"[:hubs]
    tokens = {}
    for node in ("w0", "w1", "c0", "c1", "t-standard", "t-critical"):
        tokens[node] = await running[0].add_node(node, "west/ng/lagos")
    load = Load(
        urls={n: h.url for n, h in zip(names, running, strict=True)}, tokens=tokens, rng=rng
    )
    real_apply = push.apply_push

    async def timed_apply(*args: Any, **kwargs: Any) -> Any:
        applied = await real_apply(*args, **kwargs)
        now = time.monotonic()
        for feed_id in range(applied.first_id, applied.last_id + 1 if applied.last_id else 0):
            load.committed_at[feed_id] = now
        return applied

    monkeypatch.setattr(push, "apply_push", timed_apply)
    return load, running


async def outage(
    load: Load,
    summary: Summary,
    kind: str,
    begin: Callable[[], Awaitable[None]],
    end: Callable[[], Awaitable[None]],
    *,
    hold_s: float = 0.5,
) -> None:
    """Inject a Redis outage, time how soon every hub says degraded, hold it, end it, and
    time how soon every hub says ok again."""
    window = [time.monotonic(), float("inf")]
    load.outages.append(window)
    await begin()
    degraded = await load.wait_state("degraded", DEGRADED_BOUND_S)
    summary.counts["late_degraded"] += degraded is None
    if degraded is not None:
        summary.figures.setdefault(f"time_to_degraded_{kind}_s", []).append(round(degraded, 2))
    await asyncio.sleep(hold_s)
    await end()
    recovered = await load.wait_state("ok", RECOVERED_BOUND_S)
    summary.counts["unrecovered"] += recovered is None
    if recovered is not None:
        summary.figures.setdefault(f"time_to_recovered_{kind}_s", []).append(round(recovered, 2))
    window[1] = time.monotonic()


async def test_t11_redis_faults_never_change_an_answer(
    hub_factory: Any,
    pg_dsn: str,
    redis_server: RedisServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Through FLUSHALL, pub/sub loss, stop + empty restart, SIGSTOP/SIGCONT and a restart
    from a stale RDB, under pushes, catch-up pulls and long-polls on two hubs: every pull
    page equals PostgreSQL's feed, nothing acknowledged is lost or doubled, no 5xx and no
    request past its timeout, no tailer waits past the re-read interval, and both hubs say
    degraded within 5 s of each outage and ok after it."""
    summary = Summary(
        test="T11",
        name="redis_only_a_cache",
        extra_violations=(
            "wrong_reads",
            "skipped",
            "missed_wakeups",
            "late_degraded",
            "unrecovered",
        ),
    )
    summary.counts.update(late_degraded=0, unrecovered=0)
    rng = random.Random(SEED)
    nemesis = RedisNemesis(redis_server, tmp_path)
    load, _ = await start_load(hub_factory, monkeypatch, hubs=2, rng=rng)
    faults: Counter[str] = Counter()
    try:
        async with aiohttp.ClientSession() as load.http:
            workers = [
                asyncio.create_task(load.writer("w0", "A")),
                asyncio.create_task(load.writer("w1", "A")),
                asyncio.create_task(load.reader("c0", "A")),
                asyncio.create_task(load.reader("c1", "B")),
            ]
            tailers = [
                asyncio.create_task(load.tailer("t-standard", "B", TIERS["standard"])),
                asyncio.create_task(load.tailer("t-critical", "B", TIERS["critical"])),
            ]
            await asyncio.sleep(1)
            for _ in range(CYCLES):
                await nemesis.save()  # the stale cache of this cycle's end
                await asyncio.sleep(0.5)
                await nemesis.flushall()
                faults["flushall"] += 1
                await asyncio.sleep(0.5)
                for _ in range(6):  # pub/sub connections dropped while tailers long-poll
                    await nemesis.kill_pubsub()
                    await asyncio.sleep(0.25)
                faults["pubsub_loss"] += 1
                await outage(load, summary, "stop", nemesis.stop, nemesis.start_empty)
                faults["stop_then_restart_empty"] += 1
                await outage(load, summary, "sigstop", nemesis.pause, nemesis.resume)
                faults["sigstop_then_sigcont"] += 1
                window = [time.monotonic(), float("inf")]
                load.outages.append(window)
                await nemesis.stop()
                await nemesis.start_stale()
                load.stale_restarts += 1
                faults["restart_from_old_rdb"] += 1
                recovered = await load.wait_state("ok", RECOVERED_BOUND_S)
                summary.counts["unrecovered"] += recovered is None
                window[1] = time.monotonic()
                await asyncio.sleep(1)  # catch-up reads across the stale tail's hole
            final_states = await load.cache_states()
            await load.drain(pg_dsn, workers, tailers)
            cache_use: Counter[str] = Counter()
            for hub, url in load.urls.items():
                got = await load.call(f"status {hub}", "GET", f"{url}/v1/status", timeout=5)
                counters = json.loads(got[1])["cache"] if got else {}
                cache_use.update({k: counters.get(k, 0) for k in ("hits", "misses")})
    finally:
        await nemesis.restore()

    feed, tiers = await read_feed(pg_dsn)
    counts = check(load, feed, tiers)
    delays = [
        (t - load.committed_at[i], load.in_outage(load.committed_at[i]))
        for _, i, t in load.deliveries
        if i in load.committed_at
    ]
    missed = sum(1 for d, _ in delays if d > WAKEUP_BOUND_S)
    normal = [s for t, s in load.latencies if not load.in_outage(t)]
    during = [s for t, s in load.latencies if load.in_outage(t)]
    summary.cases = CYCLES
    summary.acknowledged = len(load.acked)
    summary.counts.update(
        wrong_reads=counts["wrong_reads"],
        server_errors=len(load.server_errors),
        hung=len(load.hung),
        missed_wakeups=missed,
        lost=counts["lost"],
        duplicated=counts["duplicated"],
        skipped=counts["skipped"],
    )
    summary.cover(faults, faults)
    summary.cover(
        ["cache_served_pulls", "wakeups_by_polling"],
        {
            "cache_served_pulls": cache_use["hits"],
            "wakeups_by_polling": sum(1 for d, _ in delays if d > 1.0),
        },
    )
    for key, values in list(summary.figures.items()):
        if isinstance(values, list):
            summary.figures[key] = max(values)  # the worst of the cycles
    summary.figures.update(
        requests=sum(load.statuses.values()),
        pulls_checked=len(load.reads),
        requests_in_outage=len(during),
        p99_ms_normal=round(percentile(normal, 0.99) * 1000, 1),
        p99_ms_outage=round(percentile(during, 0.99) * 1000, 1),
        max_ms=round(max((s for _, s in load.latencies), default=0) * 1000, 1),
        deliveries=len(delays),
        wakeup_delay_p99_ms_normal=round(percentile([d for d, o in delays if not o], 0.99) * 1000),
        wakeup_delay_p99_ms_outage=round(percentile([d for d, o in delays if o], 0.99) * 1000),
        wakeup_delay_max_ms=round(max((d for d, _ in delays), default=0) * 1000),
        final_cache_states=sorted(set(final_states)),
        cache_misses=cache_use["misses"],
        errors=([e for _, e in load.server_errors] + load.hung)[:5],
    )
    summary.finish()


async def trusting_feed_page(
    self: Cache,
    epoch: str,
    first: int,
    last: int,
    *,
    wanted: Callable[[list[Any]], bool],
    limit: int,
) -> list[list[Any]] | None:
    """The broken build's cache read: whatever cached batches overlap ``first..last`` are
    taken as the whole range, without checking that they cover every id PostgreSQL's head
    says exists (the hole a stale or partial Redis leaves is skipped)."""
    key = f"{self.namespace}:feed:{epoch}"
    members = await self._call(lambda r: r.zrangebyscore(key, first - MAX_BATCH_IDS, last))
    if not members:
        return None
    rows = [
        row
        for m in members
        for row in msgpack.unpackb(m, raw=False)
        if first <= row[0] <= last and wanted(row)
    ]
    self.hits += 1
    return rows[:limit]


async def test_t11_control_trusting_a_stale_cache_gives_wrong_reads(
    hub_factory: Any,
    pg_dsn: str,
    redis_server: RedisServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Negative control: a hub that serves pulls from Redis without checking the cached
    tail against PostgreSQL's id range must give wrong pages after a restart from an old
    RDB, or this test could not see a cache trusted as the truth."""
    summary = Summary(test="T11", name="trusting_cache_control")
    monkeypatch.setattr(Cache, "feed_page", trusting_feed_page)
    nemesis = RedisNemesis(redis_server, tmp_path)
    load, _ = await start_load(hub_factory, monkeypatch, hubs=1, rng=random.Random(SEED))
    try:
        async with aiohttp.ClientSession() as load.http:
            workers = [asyncio.create_task(load.writer(w, "A")) for w in ("w0", "w1")]
            workers.append(asyncio.create_task(load.reader("c0", "A")))
            await asyncio.sleep(1)
            await nemesis.save()
            saved = await _head(pg_dsn)
            # Batches the old RDB will lack: at least a second's worth, and some however
            # slow the machine (a loaded CI runner once wrote none in that second).
            await asyncio.sleep(1)
            deadline = time.monotonic() + 30
            while await _head(pg_dsn) <= saved and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            await nemesis.stop()
            stopped = await _head(pg_dsn)
            assert stopped > saved, "no batch was written between SAVE and the stop"
            await nemesis.start_stale()
            load.stale_restarts += 1
            recovered = await load.wait_state("ok", RECOVERED_BOUND_S)
            assert recovered is not None, "the hub did not use Redis again after the restart"
            await asyncio.sleep(1)
            head = await _head(pg_dsn)
            # A sweep across the old tail, and reads that start just before and inside the
            # hole the stale RDB left (saved..stopped), which a trusting cache skips.
            hole = [max(0, saved - k) for k in (1, 5, 50, 250)]
            hole += list(range(saved, stopped, max(1, (stopped - saved) // 10)))
            for after in [*range(0, head, max(1, head // 40)), *hole]:
                await load.read_page(
                    "c0",
                    "A",
                    tier=TIERS["standard"],
                    prefix=PREFIXES[0],
                    after=after,
                    limit=300,
                    wait=0,
                    timeout=READ_TIMEOUT_S,
                    measure=False,
                )
            await load.drain(pg_dsn, workers, [])
    finally:
        await nemesis.restore()
    feed, tiers = await read_feed(pg_dsn)
    counts = check(load, feed, tiers)
    summary.cases = len(load.reads)
    summary.acknowledged = len(load.acked)
    summary.counts = {"wrong_reads": counts["wrong_reads_after_stale_restart"]}
    summary.figures = {
        "wrong_reads_before_restart": counts["wrong_reads"]
        - counts["wrong_reads_after_stale_restart"]
    }
    summary.control("wrong_reads")


async def test_t11_postgres_crash_is_503_and_loses_nothing(
    hub_factory: Any,
    pg_dsn: str,
    postgres: PostgresServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The PostgreSQL half of the former hub-outage test (T5 crashes PostgreSQL in a loop;
    this keeps the readiness side): while PostgreSQL is down ``/readyz`` says 503 within
    5 s and every failed request is a 503, never a 500 or a hang; once it is back, every
    acknowledged change is in the feed once and a tailer received each exactly once."""
    summary = Summary(
        test="T11", name="postgres_crash", extra_violations=("skipped", "wrong_reads")
    )
    load, _ = await start_load(hub_factory, monkeypatch, hubs=1, rng=random.Random(SEED))
    url = load.urls["A"]

    async def readyz_until(status: int, bound: float) -> float | None:
        assert load.http is not None
        start = time.monotonic()
        while time.monotonic() - start < bound:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with load.http.get(
                    f"{url}/readyz", timeout=aiohttp.ClientTimeout(total=STATUS_TIMEOUT_S)
                ) as resp:
                    if resp.status == status:
                        return time.monotonic() - start
            await asyncio.sleep(0.05)
        return None

    async with aiohttp.ClientSession() as load.http:
        workers = [asyncio.create_task(load.writer("w0", "A"))]
        tailers = [asyncio.create_task(load.tailer("t-standard", "A", TIERS["standard"]))]
        await asyncio.sleep(1)
        await asyncio.to_thread(postgres.crash)
        said_503 = await readyz_until(503, DEGRADED_BOUND_S)
        await asyncio.sleep(1)
        await asyncio.to_thread(postgres.start)
        said_200 = await readyz_until(200, 30)
        ready_again = time.monotonic()
        await asyncio.sleep(1)
        await load.drain(pg_dsn, workers, tailers)
    feed, tiers = await read_feed(pg_dsn)
    counts = check(load, feed, tiers)
    # Requests started while PostgreSQL was down (until /readyz said 200 again) may get a
    # 503, the right answer; any other failure, or any failure of a later request, is not.
    while_down = [e for t, e in load.server_errors if t < ready_again]
    after = [e for t, e in load.server_errors if t >= ready_again]
    not_503 = [e for e in while_down if "answered 503" not in e]
    summary.cases = 1
    summary.acknowledged = len(load.acked)
    summary.counts = {
        "lost": counts["lost"],
        "duplicated": counts["duplicated"],
        "skipped": counts["skipped"],
        "wrong_reads": counts["wrong_reads"],
        "hung": len(load.hung),
        "server_errors": len(not_503) + len(after),
    }
    summary.figures = {
        "readyz_503_after_s": None if said_503 is None else round(said_503, 2),
        "readyz_200_after_restart_s": None if said_200 is None else round(said_200, 2),
        "503_while_down": len(while_down) - len(not_503),
        "errors": (not_503 + after + load.hung)[:5],
    }
    assert said_503 is not None, f"/readyz did not say 503 within {DEGRADED_BOUND_S} s of the crash"
    assert said_200 is not None, "/readyz did not say 200 within 30 s of PostgreSQL's restart"
    summary.finish()
