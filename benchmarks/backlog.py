"""An edge back after a month offline: N queued changes drain to the hub.

    .venv/bin/python benchmarks/backlog.py [--changes N] [--json]

A helper process fills the edge's outbox with N changes of ~200 bytes (written straight
into SQLite in large transactions: the set-up, not what is measured). This process then
drains it through the real sync client (Syncer.push_lane: batches sized by the hub's
max_batch_changes, read from the outbox a batch at a time, never whole) to a hub in its own
process, with a progress bar. Prints the drain rate, this process's peak RSS during the
drain, and raw COPY rows/s into the same PostgreSQL measured afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import multiprocessing
import os
import resource
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

from _harness import cpu_seconds, make_changes, raw_copy_rate, running_hub, token_for
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeRemainingColumn

from syncengine.edge.link import HubLink
from syncengine.edge.outbox import encode_payload
from syncengine.edge.store import EdgeStore
from syncengine.edge.sync import Syncer
from syncengine.service import tune_gc
from syncengine.tiers import Tier

NODE = "bench-edge"
CHUNK = 50_000


def _fill(db: str, count: int) -> None:
    """The helper process: create the store, then write ``count`` queued changes."""

    async def create() -> None:
        async with EdgeStore.open(db, node_id=NODE, region="west"):
            pass

    asyncio.run(create())
    conn = sqlite3.connect(db)
    now_ms = time.time_ns() // 1_000_000
    for first in range(1, count + 1, CHUNK):
        part = make_changes(NODE, first, min(CHUNK, count - first + 1))
        with conn:
            conn.executemany(
                "INSERT INTO outbox (lane, seq, cell, collection, key, hlc, payload, "
                "created_at_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (c.lane, c.seq, c.cell, c.collection, c.key, c.hlc, encode_payload(c), now_ms)
                    for c in part
                ],
            )
    with conn:
        conn.execute("UPDATE lanes SET next_seq = ? WHERE lane = 2", (count + 1,))
    conn.close()


class _Bar:
    """The syncer's observer: moves the progress bar on each acknowledged batch, and notes
    when each tenth of the queue was through (the rate of each tenth: does it hold up as
    the hub's tables grow?)."""

    def __init__(self, progress: Progress, task: TaskID, total: int) -> None:
        self.progress, self.task = progress, task
        self.total, self.done = total, 0
        self.tenths: list[tuple[int, float]] = []  # (changes through, perf_counter)

    def start(self) -> None:
        self.tenths = [(0, time.perf_counter())]

    def batch_pushed(self, tier: Tier, changes: int) -> None:
        self.progress.advance(self.task, changes)
        self.done += changes
        if self.done * 10 >= self.total * len(self.tenths) or self.done == self.total:
            self.tenths.append((self.done, time.perf_counter()))

    def rates(self) -> list[int]:
        """Changes/s over each stretch between two notes."""
        return [
            round((n1 - n0) / (t1 - t0))
            for (n0, t0), (n1, t1) in itertools.pairwise(self.tenths)
            if t1 > t0
        ]

    def page_pulled(self, tier: Tier, changes: int) -> None:
        pass

    def step_failed(self, step: str, code: str) -> None:
        pass


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--changes", type=int, default=1_000_000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        db = str(Path(tmp) / "edge.db")
        filler = multiprocessing.get_context("spawn").Process(target=_fill, args=(db, args.changes))
        started = time.perf_counter()
        filler.start()
        filler.join()
        if filler.exitcode != 0:
            sys.exit(f"filling the outbox failed (exit {filler.exitcode})")
        fill_s = time.perf_counter() - started
        async with running_hub() as bench:
            token = await token_for(bench, NODE)
            rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            async with (
                EdgeStore.open(db, node_id=NODE, region="west") as store,
                HubLink(bench.url, token, node_id=NODE, timeout_s=60) as link,
            ):
                console = Console(stderr=True, quiet=args.json)
                columns = (
                    TextColumn("drain"),
                    BarColumn(),
                    TextColumn("{task.completed:,}/{task.total:,}"),
                    TimeRemainingColumn(),
                )
                with Progress(*columns, console=console) as progress:
                    task = progress.add_task("drain", total=args.changes)
                    bar = _Bar(progress, task, args.changes)
                    syncer = Syncer(store, link, subscriptions=[], observer=bar)
                    await syncer.learn_config()
                    tune_gc()  # as `syncengine edge run` does once started
                    cpu_before = bench.cpu_seconds()
                    edge_before = cpu_seconds(os.getpid())
                    start = time.perf_counter()
                    bar.start()
                    pushed = await syncer.push_lane(Tier.STANDARD.priority)
                    drain_s = time.perf_counter() - start
                    cpu_after = bench.cpu_seconds()
                    edge_cpu = cpu_seconds(os.getpid()) - edge_before
                assert pushed == args.changes, pushed
                assert await store.outbox.next_batch() is None
                sent = link.bytes_sent
            peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            at_hub = await bench.pool.fetchval("SELECT count(*) FROM feed")
            assert at_hub == args.changes, at_hub
            copy = await raw_copy_rate(
                bench.dsn, make_changes("copy", 1, min(args.changes, 200_000))
            )
    result = {
        "changes": args.changes,
        "fill_s": round(fill_s, 1),
        "drain_changes_per_s": round(args.changes / drain_s),
        "drain_s": round(drain_s, 1),
        "wire_bytes_per_change": round(sent / args.changes, 1),
        "edge_peak_rss_mb": round(peak_kb / 1024, 1),
        "edge_rss_before_drain_mb": round(rss_before / 1024, 1),
        "raw_copy_rows_per_s": round(copy),
        "rate_by_tenth": bar.rates(),
        # What each change cost each process, in CPU microseconds: less noisy than the rate
        # on a shared machine, and it says which side a change would have to get cheaper on.
        "cpu_us_per_change": {
            "hub": round((cpu_after["hub"] - cpu_before["hub"]) / args.changes * 1e6, 1),
            "postgres": round(
                (cpu_after["postgres"] - cpu_before["postgres"]) / args.changes * 1e6, 1
            ),
            "edge": round(edge_cpu / args.changes * 1e6, 1),
        },
    }
    if args.json:
        print(json.dumps(result))
        return
    print(f"drained {args.changes:,} queued changes (set-up: {fill_s:.0f} s to fill the outbox)")
    print(f"  drain rate:     {result['drain_changes_per_s']:>10,} changes/s ({drain_s:.1f} s)")
    print(
        f"  edge peak RSS:  {result['edge_peak_rss_mb']:>10} MB (before the drain {rss_before / 1024:.0f} MB)"
    )
    print(f"  on the wire:    {result['wire_bytes_per_change']:>10} bytes/change")
    print(f"  by tenth:       {', '.join(f'{r:,}' for r in result['rate_by_tenth'])} changes/s")
    cpu = result["cpu_us_per_change"]
    print(
        f"  CPU per change: hub {cpu['hub']} µs, PostgreSQL {cpu['postgres']} µs, "
        f"edge {cpu['edge']} µs (a 2-core machine has 2,000,000 µs a second for all three)"
    )
    print(f"  raw COPY:       {result['raw_copy_rows_per_s']:>10,} rows/s (same server, same run)")


if __name__ == "__main__":
    asyncio.run(main())
