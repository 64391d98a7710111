"""A region's fleet against one hub: N edges writing, pushing and pulling at once.

    .venv/bin/python benchmarks/fleet.py [--edges N] [--rate R] [--seconds S] [--workers W]
                                         [--tick T] [--important-s I] [--json]

N light edges (default 1,000), each with its own SQLite store, share W worker processes
(default 2; one event loop each, one aiohttp session per process) and talk to one hub process
on loopback. Each edge writes R changes/s (default 10) for S seconds with a realistic mix:
5% critical alerts, 60% important stock, 35% standard visits, each in its own clinic's cells.
An edge's writes come in bursts, each tick (``--tick``, default 1 s) together, as a clinic's
app saves a form's records at once: its store commits them in one transaction.
Subscriptions overlap: an edge pulls its own cells and the stock of the ten clinics of its
district.

Each edge follows the edge daemon's schedule under the default tier table (the requests a
daemon makes, without its process around them):

- critical: pushed on write, after the 50 ms debounce;
- important: pushed every ``--important-s`` seconds (default 60, the tier's
  ``push_interval_s``), each edge at its own phase;
- standard: pushed daily in the off-peak window, so not while the benchmark writes;
- pulls: one live long-poll of the critical tier (``long_poll_s`` 25 s) watching the
  important and standard tiers; when the hub says one of them holds changes for the edge,
  that tier is pulled at once, as the daemon does.

When writes stop, every edge runs sync rounds (what ``syncengine edge sync --now`` runs)
until it has converged: its outbox empty and its cursors at the feed head as it stood once
the last push landed. The time from the last write to the last edge converged is
reported. Then every edge holds an idle long-poll for a while: the bytes of one idle
exchange.

Prints the writes the edges achieved against those offered, the hub's throughput, the
hub's own p50/p99 push latency (from its request histogram: the bucket bounds that hold
them; over the whole run, and while the edges wrote, before the burst of held-back pushes
when they stop), p50/p99 push and pull latency as the edges saw them (per request; with a
thousand edges in two processes this includes their own queueing), the time to converge
after writes stop, the hub's peak RSS, the most PostgreSQL connections used, the bytes of one idle
long-poll exchange and what that makes a day at the default ``long_poll_idle_s``, and raw
COPY rows/s into the same PostgreSQL (the physical limit).

On a small machine the simulated edges are the limit, not the hub: each store has two
aiosqlite threads, so a thousand edges are two thousand threads contending for two GILs.
Compare ``written_per_s`` with ``offered_changes_per_s`` before reading the rest.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import multiprocessing
import queue
import random
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
from _harness import fields, make_changes, print_figures, raw_copy_rate, running_hub
from prometheus_client.parser import text_string_to_metric_families

from syncengine.edge.link import HubLink
from syncengine.edge.store import EdgeStore
from syncengine.edge.sync import Syncer
from syncengine.errors import SyncError
from syncengine.hub.nodes import add_node
from syncengine.service import tune_gc
from syncengine.tiers import DEFAULT_LONG_POLL_IDLE_S, Tier

REGION = "west/ng/lagos"
TIER_RULES = [
    {"prefix": f"{REGION}/alerts", "tier": "critical"},
    {"prefix": f"{REGION}/stock", "tier": "important"},
]
DAY_S = 86_400


def cells(i: int) -> tuple[str, str, str]:
    """Clinic ``i``'s alert, stock and visit cells (the tier is in the path)."""
    return (
        f"{REGION}/alerts/c{i:05d}",
        f"{REGION}/stock/d{i // 10:04d}/c{i:05d}",
        f"{REGION}/visits/c{i:05d}",
    )


def subscriptions(i: int) -> list[str]:
    alerts, _, visits = cells(i)
    return [alerts, f"{REGION}/stock/d{i // 10:04d}", visits]


class TimedLink(HubLink):
    """Keeps the duration of every push and pull request."""

    def __init__(self, *args: Any, timings: dict[str, list[float]], **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.timings = timings

    async def _call(self, method: str, path: str, **kw: Any) -> Any:
        started = time.perf_counter()
        result = await super()._call(method, path, **kw)
        if path in self.timings and (path != "v1/pull" or dict(kw["params"])["wait"] == "0"):
            self.timings[path].append(time.perf_counter() - started)
        return result


#: The default tier table's figures the schedule follows (tiers/*.toml).
DEBOUNCE_S = 0.05
LONG_POLL_S = 25.0
#: After a failed request, an edge waits this long before its next one of that kind.
RETRY_S = 1.0


class Schedule:
    """One edge's requests, as its daemon would make them (module docstring)."""

    def __init__(self, syncer: Syncer, *, important_s: float, rng: random.Random) -> None:
        self.syncer = syncer
        self.important_s = important_s
        self.rng = rng
        self.critical_written = asyncio.Event()
        self.errors: dict[str, int] = {}

    def run(self) -> list[asyncio.Task[None]]:
        return [
            asyncio.create_task(self._critical_pushes()),
            asyncio.create_task(self._important_pushes()),
            asyncio.create_task(self._live_pull()),
        ]

    async def _attempt(self, what: Callable[[], Awaitable[object]]) -> None:
        try:
            await what()
        except SyncError as exc:
            if exc.code not in self.errors:
                print(f"{self.syncer.store.node_id}: {exc.code}: {exc.message}", file=sys.stderr)
            self.errors[exc.code] = self.errors.get(exc.code, 0) + 1
            await asyncio.sleep(RETRY_S)

    async def _critical_pushes(self) -> None:
        while True:
            await self.critical_written.wait()
            await asyncio.sleep(DEBOUNCE_S)
            self.critical_written.clear()
            await self._attempt(lambda: self.syncer.push_lane(Tier.CRITICAL.priority))

    async def _important_pushes(self) -> None:
        await asyncio.sleep(self.rng.uniform(0, self.important_s))  # each edge its own phase
        while True:
            began = time.monotonic()
            await self._attempt(lambda: self.syncer.push_lane(Tier.IMPORTANT.priority))
            await asyncio.sleep(max(0.0, self.important_s - (time.monotonic() - began)))

    async def _live_pull(self) -> None:
        watch = (Tier.IMPORTANT, Tier.STANDARD)
        while True:
            due: frozenset[Tier] = frozenset()

            async def poll() -> None:
                nonlocal due
                result = await self.syncer.live_pull(Tier.CRITICAL, wait_s=LONG_POLL_S, watch=watch)
                due = result.due

            await self._attempt(poll)
            for tier in sorted(due, key=lambda t: t.priority):
                await self._attempt(lambda t=tier: self.syncer.pull_tier(t))


async def _drained(syncer: Syncer) -> bool:
    return sum(s.depth for s in await syncer.store.outbox.status()) == 0


async def _converged(syncer: Syncer, head: int) -> bool:
    cursors = [await syncer.store.cursor(f"pull:{t.value}") for t in Tier if t is not Tier.ARCHIVE]
    return await _drained(syncer) and min(cursors) >= head


async def _sync_until(syncer: Syncer, done: Callable[[], Awaitable[bool]]) -> None:
    """Sync rounds (``edge sync --now``) until ``done``."""
    while not await done():
        report = await syncer.sync_once(tiers=[Tier.CRITICAL, Tier.IMPORTANT, Tier.STANDARD])
        if report.errors:
            await asyncio.sleep(RETRY_S)


async def _until(check: Callable[[], bool | Awaitable[bool]], every: float = 0.05) -> None:
    """Poll ``check`` (state shared with other processes: nothing to await on)."""
    while True:
        done = check()
        if done if isinstance(done, bool) else await done:
            return
        await asyncio.sleep(every)


def _dump_tasks() -> None:
    """SIGUSR1 in a worker: print where each of its tasks waits (a stuck run's diagnosis)."""
    waiting: dict[str, int] = {}
    for task in asyncio.all_tasks():
        frames = task.get_stack()
        where = " <- ".join(f"{f.f_code.co_name}:{f.f_lineno}" for f in reversed(frames))
        waiting[where] = waiting.get(where, 0) + 1
    for where, n in sorted(waiting.items(), key=lambda kv: -kv[1]):
        print(f"{n:6} {where}", file=sys.stderr, flush=True)


async def _worker_main(job: dict[str, Any], shared: dict[str, Any]) -> dict[str, Any]:
    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, _dump_tasks)
    timings: dict[str, list[float]] = {"v1/push": [], "v1/pull": []}
    rng = random.Random(job["seed"])
    edges: list[tuple[int, Syncer]] = []
    writes = 0
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as http:
        stores = []
        for i, token in job["nodes"]:
            store = await EdgeStore.open(
                Path(job["dir"]) / f"e{i}.db", node_id=f"e{i:05d}", region="west"
            )
            stores.append(store)
            link = TimedLink(
                job["url"], token, node_id=store.node_id, session=http, timings=timings
            )
            syncer = Syncer(store, link, subscriptions=subscriptions(i), log_link_state=False)
            await syncer.learn_config()
            await syncer.bootstrap()
            edges.append((i, syncer))
        tune_gc()  # as `syncengine edge run` does once started
        shared["ready"].release()
        await _until(lambda: shared["start"].value > 0)
        stop_at = shared["start"].value + job["seconds"]
        schedules = {
            i: Schedule(s, important_s=job["important_s"], rng=random.Random(i)) for i, s in edges
        }
        tasks = [t for sch in schedules.values() for t in sch.run()]
        tick = job["tick"]
        per_tick = job["rate"] * tick
        carry = 0.0
        n = 0
        while time.time() < stop_at:
            began = time.monotonic()
            carry += per_tick
            count, carry = int(carry), carry - int(carry)
            puts = []
            for i, syncer in edges:
                alerts, stock, visits = cells(i)
                for _ in range(count):
                    n += 1
                    roll = rng.random()
                    if roll < 0.05:
                        puts.append(syncer.store.put(alerts, "alerts", f"a{n % 50}", {"level": n}))
                        schedules[i].critical_written.set()
                    elif roll < 0.65:
                        puts.append(syncer.store.put(stock, "stock", f"i{n % 200}", {"qty": n}))
                    else:
                        puts.append(syncer.store.put(visits, "visits", f"v{n}", fields(n)))
            await asyncio.gather(*puts)
            writes += len(puts)
            await asyncio.sleep(max(0.0, tick - (time.monotonic() - began)))
        # Writes stopped: every edge syncs now (all tiers, the standard one included) until
        # its outbox is empty, then until its cursors reach the head once all have pushed.
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(_sync_until(s, lambda s=s: _drained(s)) for _, s in edges))
        shared["drained"].release()
        await _until(lambda: shared["head"].value >= 0)
        head = shared["head"].value
        await asyncio.gather(*(_sync_until(s, lambda s=s: _converged(s, head)) for _, s in edges))
        converged_at = time.time()
        errors: dict[str, int] = {}
        for sch in schedules.values():
            for code, n in sch.errors.items():
                errors[code] = errors.get(code, 0) + n
        # Idle: every edge holds a long-poll watching the interval tiers.
        sent0 = sum(s.link.bytes_sent + s.link.bytes_received for _, s in edges)
        polls = await asyncio.gather(
            *(
                s.live_pull(Tier.CRITICAL, wait_s=job["idle_wait_s"], watch=[Tier.IMPORTANT])
                for _, s in edges
            )
        )
        idle_bytes = sum(s.link.bytes_sent + s.link.bytes_received for _, s in edges) - sent0
        for store in stores:
            await store.close()
    return {
        "writes": writes,
        "push_s": timings["v1/push"],
        "pull_s": timings["v1/pull"],
        "converged_at": converged_at,
        "idle_exchanges": len(polls),
        "idle_bytes": idle_bytes,
        "errors": errors,
    }


def _worker(job: dict[str, Any], shared: dict[str, Any], out: Any) -> None:
    out.put(asyncio.run(_worker_main(job, shared)))


def _check_alive(workers: list[Any]) -> None:
    """Stop the run when a worker process died: its edges would neither write nor sync,
    and every figure after it would be wrong."""
    for w, p in enumerate(workers):
        if p.exitcode not in (None, 0):
            raise SystemExit(
                f"fleet: worker process {w} exited with code {p.exitcode} (its traceback is "
                "above); no figures are printed for a run that lost part of its fleet"
            )


def _results(workers: list[Any], out: Any) -> list[dict[str, Any]]:
    results = []
    while len(results) < len(workers):
        try:
            results.append(out.get(timeout=1.0))
        except queue.Empty:
            _check_alive(workers)
    return results


async def _hub_push_figures(url: str) -> tuple[float, float, float, float]:
    """The hub's own p50 and p99 of POST /v1/push (s), as the upper bounds of the buckets
    of its request histogram that hold them (what the hub took, without the queueing of the
    benchmark's own crowded worker processes), the push batches it applied and the
    transactions it applied them in (group commit)."""
    async with aiohttp.ClientSession() as http, http.get(f"{url}/metrics") as resp:
        text = await resp.text()
    buckets: dict[float, float] = {}
    pushes = 0.0
    groups = 0.0
    for family in text_string_to_metric_families(text):
        if family.name == "syncengine_hub_pushes":
            pushes += sum(s.value for s in family.samples if s.name.endswith("_total"))
        if family.name == "syncengine_hub_push_group_batches":
            groups += sum(s.value for s in family.samples if s.name.endswith("_count"))
        if family.name != "syncengine_hub_request_seconds":
            continue
        for sample in family.samples:
            if sample.name.endswith("_bucket") and sample.labels.get("route") == "/v1/push":
                le = float(sample.labels["le"])
                buckets[le] = buckets.get(le, 0.0) + sample.value
    bounds = sorted(buckets)
    total = buckets[bounds[-1]] if bounds else 0.0

    def bound(q: float) -> float:
        return next((le for le in bounds if buckets[le] >= q * total), float("nan"))

    return bound(0.5), bound(0.99), pushes, groups


def _bound_ms(seconds: float) -> int | str:
    """A histogram bucket bound in ms; past the last finite bucket, what is known."""
    return round(seconds * 1000) if seconds != float("inf") else "over 10,000"


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] * 1000


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--edges", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=10.0, help="changes/s per edge")
    parser.add_argument(
        "--seconds",
        type=float,
        default=60.0,
        help="how long edges write (default 60: one important push interval)",
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--tick",
        type=float,
        default=1.0,
        help="each edge writes a tick's changes together, as an app saving a form does "
        "(default 1 s: its store commits them in one transaction)",
    )
    parser.add_argument(
        "--important-s",
        dest="important_s",
        type=float,
        default=60.0,
        help="the important tier's push_interval_s (default 60, as tiers/important.toml)",
    )
    parser.add_argument("--idle-wait", dest="idle_wait_s", type=float, default=5.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    # SIGTERM (a timeout, a CI job stopped) unwinds like Ctrl-C: the hub, PostgreSQL and
    # Redis of the run are stopped, not left behind.
    main_task = asyncio.current_task()
    assert main_task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main_task.cancel)
    ctx = multiprocessing.get_context("spawn")
    async with running_hub(tier_rules=TIER_RULES) as bench:
        say = (lambda *_: None) if args.json else functools.partial(print, flush=True)
        say(f"registering {args.edges:,} nodes ...")
        nodes = [
            (i, await add_node(bench.pool, "west", f"e{i:05d}", [REGION]))
            for i in range(args.edges)
        ]
        with tempfile.TemporaryDirectory() as tmp:
            shared = {
                "ready": ctx.Semaphore(0),
                "drained": ctx.Semaphore(0),
                "head": ctx.Value("q", -1),
                "start": ctx.Value("d", 0.0),
            }
            out = ctx.Queue()
            procs = []
            for w in range(args.workers):
                job = {
                    "nodes": nodes[w :: args.workers],
                    "dir": tmp,
                    "url": bench.url,
                    "rate": args.rate,
                    "important_s": args.important_s,
                    "idle_wait_s": args.idle_wait_s,
                    "seed": w,
                    "seconds": args.seconds,
                    "tick": args.tick,
                }
                procs.append(job)
            workers = [ctx.Process(target=_worker, args=(j, shared, out)) for j in procs]
            for p in workers:
                p.start()
            try:
                say(f"opening {args.edges:,} stores in {args.workers} processes ...")
                for _ in workers:
                    await _until(
                        lambda: _check_alive(workers) or shared["ready"].acquire(block=False)
                    )
                say(f"writing for {args.seconds:g} s ...")
                start_at = shared["start"].value = time.time()
                peak_conns = 0
                drained = 0
                while_writing: tuple[float, float, float, float] | None = None
                said_at = time.time()
                while drained < len(workers):
                    _check_alive(workers)
                    if shared["drained"].acquire(block=False):
                        drained += 1
                        continue
                    if while_writing is None and time.time() >= start_at + args.seconds:
                        # The hub's figures as writes stop, before every edge pushes what
                        # its schedule held back (the standard tier) in one burst.
                        while_writing = await _hub_push_figures(bench.url)
                    conns = await bench.pool.fetchval(
                        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                    )
                    peak_conns = max(peak_conns, conns - 1)
                    if time.time() - said_at >= 10:
                        said_at = time.time()
                        landed = await bench.pool.fetchval("SELECT id FROM feed_head")
                        phase = "writing" if said_at < start_at + args.seconds else "draining"
                        say(
                            f"  {said_at - start_at:5.0f} s {phase}: the hub holds {landed:,} changes"
                        )
                    await asyncio.sleep(0.5)
                say("outboxes empty; edges pulling until they reach the feed head ...")
                head = await bench.pool.fetchval("SELECT id FROM feed_head")
                shared["head"].value = head
                results = await asyncio.to_thread(_results, workers, out)
                for p in workers:
                    p.join(60)
            finally:
                for p in workers:
                    if p.is_alive():
                        p.terminate()
        hub_rss = _rss_mb(bench.hub_pid)
        hub_p50, hub_p99, hub_pushes, hub_groups = await _hub_push_figures(bench.url)
        copy = await raw_copy_rate(bench.dsn, make_changes("copy", 1, 100_000))
    writes = sum(r["writes"] for r in results)
    push_s = [t for r in results for t in r["push_s"]]
    pull_s = [t for r in results for t in r["pull_s"]]
    converged = max(r["converged_at"] for r in results) - (start_at + args.seconds)
    idle = sum(r["idle_bytes"] for r in results) / max(1, sum(r["idle_exchanges"] for r in results))
    result = {
        "edges": args.edges,
        "offered_changes_per_s": round(args.edges * args.rate),
        "written": writes,
        "written_per_s": round(writes / args.seconds),
        "hub_changes_per_s": round(head / args.seconds),
        "hub_push_batches": round(hub_pushes),
        "hub_push_transactions": round(hub_groups),
        "hub_push_p50_ms_at_most": _bound_ms(hub_p50),
        "hub_push_p99_ms_at_most": _bound_ms(hub_p99),
        "hub_push_p50_ms_while_writing": _bound_ms(while_writing[0]) if while_writing else "",
        "hub_push_p99_ms_while_writing": _bound_ms(while_writing[1]) if while_writing else "",
        "push_p50_ms": round(_pct(push_s, 50), 1),
        "push_p99_ms": round(_pct(push_s, 99), 1),
        "pull_p50_ms": round(_pct(pull_s, 50), 1),
        "pull_p99_ms": round(_pct(pull_s, 99), 1),
        "converged_after_s": round(converged, 1),
        "hub_peak_rss_mb": round(hub_rss, 1),
        "pg_connections_peak": peak_conns,
        "idle_payload_bytes_per_exchange": round(idle),
        "idle_payload_bytes_per_edge_per_day": round(idle * DAY_S / DEFAULT_LONG_POLL_IDLE_S),
        "raw_copy_rows_per_s": round(copy),
        "failed_requests": sum(n for r in results for n in r["errors"].values()),
    }
    print_figures(result, as_json=args.json)


if __name__ == "__main__":
    asyncio.run(main())
