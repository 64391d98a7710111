"""A new edge fetches a prefix of N records through the resumable snapshot.

    .venv/bin/python benchmarks/bootstrap.py [--records N] [--json]

The hub is filled with N records (~200 bytes each) by a seeding node over the real push
path (set-up, not measured). A new edge then bootstraps the prefix through the real sync
client, with a progress bar: the rate and this process's peak RSS are printed. A second new
edge is cut mid-way (the bootstrap task is cancelled while a page is in flight, as a dropped
link or a SIGTERM would) and resumed: the records fetched twice are counted (at most one
page is expected). Raw COPY rows/s into the same PostgreSQL is measured in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import resource
import tempfile
import time
from pathlib import Path

from _harness import CELL, make_changes, raw_copy_rate, running_hub, seed, token_for
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from syncengine.edge.link import HubLink
from syncengine.edge.store import EdgeStore
from syncengine.edge.sync import Syncer
from syncengine.protocol import (
    SnapshotPage,
)
from syncengine.service import tune_gc

SEED_BATCH = 5000


def counted(link: HubLink) -> list[int]:
    """Wrap ``link.snapshot`` to list the records of every page received."""
    pages: list[int] = []
    real = link.snapshot

    async def snapshot(*, prefix: str, after: str | None = None, limit: int) -> SnapshotPage:
        page = await real(prefix=prefix, after=after, limit=limit)
        pages.append(len(page.records))
        return page

    link.snapshot = snapshot  # type: ignore[method-assign]
    return pages


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    console = Console(stderr=True, quiet=args.json)
    async with running_hub() as bench:
        started = time.perf_counter()
        await seed(bench.url, await token_for(bench, "seeder"), args.records)
        seed_s = time.perf_counter() - started
        with tempfile.TemporaryDirectory() as tmp:
            # 1. A whole bootstrap.
            token = await token_for(bench, "fresh")
            rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            async with (
                EdgeStore.open(Path(tmp) / "fresh.db", node_id="fresh", region="west") as store,
                HubLink(bench.url, token, node_id="fresh", timeout_s=60) as link,
            ):
                syncer = Syncer(store, link, subscriptions=[CELL])
                await syncer.learn_config()
                tune_gc()  # as `syncengine edge run` does once started
                columns = (
                    TextColumn("bootstrap"),
                    BarColumn(),
                    TextColumn("{task.completed:,}/{task.total:,}"),
                    TimeRemainingColumn(),
                )
                with Progress(*columns, console=console) as bar:
                    task = bar.add_task("bootstrap", total=args.records)
                    start = time.perf_counter()
                    taken = await syncer.bootstrap(
                        progress=lambda n, _p: bar.update(task, completed=n)
                    )
                    boot_s = time.perf_counter() - start
                received = link.bytes_received
            peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            assert taken == args.records, taken

            # 2. Cut mid-way, then resumed.
            token = await token_for(bench, "cut")
            db = Path(tmp) / "cut.db"
            async with (
                EdgeStore.open(db, node_id="cut", region="west") as store,
                HubLink(bench.url, token, node_id="cut", timeout_s=60) as link,
            ):
                pages = counted(link)
                syncer = Syncer(store, link, subscriptions=[CELL])
                await syncer.learn_config()
                run = asyncio.create_task(syncer.bootstrap())
                await asyncio.sleep(boot_s / 2)
                run.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await run
                first_run = sum(pages)
                saved = await store.bootstrap_progress()
                assert saved is not None, "the bootstrap finished before the cut"
                before_resume = len(pages)
                total = await syncer.bootstrap()
                resumed = sum(pages[before_resume:])
            assert total == args.records, total
            refetched = first_run + resumed - args.records
        copy = await raw_copy_rate(bench.dsn, make_changes("copy", 1, min(args.records, 200_000)))
    result = {
        "records": args.records,
        "seed_s": round(seed_s, 1),
        "bootstrap_records_per_s": round(args.records / boot_s),
        "bootstrap_s": round(boot_s, 1),
        "wire_bytes_per_record": round(received / args.records, 1),
        "edge_peak_rss_mb": round(peak_kb / 1024, 1),
        "edge_rss_before_mb": round(rss_before / 1024, 1),
        "cut_at_records": first_run,
        "records_fetched_twice": refetched,
        "largest_page": max(pages),
        "raw_copy_rows_per_s": round(copy),
    }
    if args.json:
        print(json.dumps(result))
        return
    print(f"bootstrapped {args.records:,} records (set-up: {seed_s:.0f} s to fill the hub)")
    print(f"  rate:            {result['bootstrap_records_per_s']:>10,} records/s ({boot_s:.1f} s)")
    print(
        f"  edge peak RSS:   {result['edge_peak_rss_mb']:>10} MB (before {rss_before / 1024:.0f} MB)"
    )
    print(f"  on the wire:     {result['wire_bytes_per_record']:>10} bytes/record")
    print(
        f"  cut after {first_run:,} records, resumed: {refetched:,} records fetched twice "
        f"(one page is at most {result['largest_page']:,})"
    )
    print(f"  raw COPY:        {result['raw_copy_rows_per_s']:>10,} rows/s (same server, same run)")


if __name__ == "__main__":
    asyncio.run(main())
