"""Many edges' small pushes against one hub: what the hub alone sustains.

    .venv/bin/python benchmarks/hub_pushes.py [--pushers N] [--batch B] [--seconds S]
        [--interval I] [--token-cache-s T] [--same-keys] [--json]

N nodes (default 200) each push batches of B changes (default 5: a clinic's few writes of a
moment, new records of its own; with --same-keys every node writes the same records, so
that each change merges into one the hub holds) for S seconds (default 20) to a hub in its
own process: each push as soon as the last was answered (closed loop: the hub's ceiling),
or with --interval one every I seconds (open loop, from a random offset: the load a fleet
offers, N / I pushes a second; a push's latency counts from when it was due, so a hub that
falls behind shows it). Every request body is encoded before the clock starts and all N
share one aiohttp session, so the client costs little and the hub is the limit (what
``fleet.py`` cannot show on a small machine, where simulating a thousand SQLite stores
takes the CPU).

Prints pushes and changes applied per second, p50/p99 push latency as the clients saw it,
the PostgreSQL transactions the hub used (group commit), the hub's peak RSS, the CPU time
each push cost the hub and PostgreSQL, and raw COPY rows/s into the same PostgreSQL,
measured in the same run. The CPU per push is the figure to compare two builds by on a
shared machine: the rates move with whatever else runs, it much less.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import statistics
import time

import aiohttp
import psutil
from _harness import make_changes, print_figures, raw_copy_rate, running_hub, token_for
from prometheus_client.parser import text_string_to_metric_families

from syncengine.protocol import PushBatch, encode_body, encode_push


def _bodies(
    node: str, batches: int, size: int, *, same_keys: bool
) -> list[tuple[bytes, str | None]]:
    changes = make_changes(node, 1, batches * size, keys="v" if same_keys else f"v-{node}")
    out = []
    for i in range(0, len(changes), size):
        part = changes[i : i + size]
        batch = PushBatch(
            node=node, lane=2, first_seq=part[0].seq, last_seq=part[-1].seq, changes=part
        )
        out.append(encode_body(encode_push(batch)))
    return out


async def _transactions(http: aiohttp.ClientSession, url: str) -> float | None:
    """Push transactions the hub committed (None: a hub without group commit)."""
    async with http.get(f"{url}/metrics") as resp:
        text = await resp.text()
    for family in text_string_to_metric_families(text):
        if family.name == "syncengine_hub_push_group_batches":
            return sum(s.value for s in family.samples if s.name.endswith("_count"))
    return None


async def _peak_rss(pid: int) -> int:
    """The highest RSS of process ``pid`` seen until cancelled, sampled every 0.1 s."""
    peak = 0
    try:
        while True:
            with contextlib.suppress(psutil.Error):
                peak = max(peak, psutil.Process(pid).memory_info().rss)
            await asyncio.sleep(0.1)
    except asyncio.CancelledError:
        return peak


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pushers", type=int, default=200)
    parser.add_argument("--batch", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument(
        "--interval",
        type=float,
        default=0.0,
        help="seconds between one pusher's pushes (default 0: each as soon as the last was "
        "answered)",
    )
    parser.add_argument(
        "--token-cache-s", type=int, default=0, help="the hub's token_cache_s (default 0: off)"
    )
    parser.add_argument(
        "--same-keys",
        action="store_true",
        help="every pusher writes the same records (default: each its own, as clinics do)",
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    # Enough batches for each pusher to push every 20 ms (or interval) for the whole run.
    per_pusher = int(args.seconds / max(args.interval, 0.02)) + 1
    offsets = random.Random(0)
    async with running_hub(token_cache_s=args.token_cache_s) as bench:
        tokens = [await token_for(bench, f"p{i:04d}") for i in range(args.pushers)]
        bodies = [
            _bodies(f"p{i:04d}", per_pusher, args.batch, same_keys=args.same_keys)
            for i in range(args.pushers)
        ]
        latencies: list[float] = []
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as http:
            before = await _transactions(http, bench.url)
            cpu_before = bench.cpu_seconds()
            stop_at = time.perf_counter() + args.seconds

            async def pusher(token: str, mine: list[tuple[bytes, str | None]]) -> None:
                headers = {"Authorization": f"Bearer {token}", "Accept": "application/msgpack"}
                due = start + offsets.uniform(0, args.interval)
                for body, encoding in mine:
                    await asyncio.sleep(due - time.perf_counter())
                    now = time.perf_counter()
                    if now >= stop_at:
                        return
                    h = {**headers, "Content-Type": "application/msgpack"}
                    if encoding:
                        h["Content-Encoding"] = encoding
                    started = min(due, now) if args.interval else now
                    async with http.post(f"{bench.url}/v1/push", data=body, headers=h) as resp:
                        await resp.read()
                        if resp.status != 200:
                            raise SystemExit(f"push answered {resp.status}: {await resp.text()}")
                    latencies.append(time.perf_counter() - started)
                    due += args.interval

            start = time.perf_counter()
            rss = asyncio.create_task(_peak_rss(bench.hub_pid))
            await asyncio.gather(*(pusher(t, b) for t, b in zip(tokens, bodies, strict=True)))
            elapsed = time.perf_counter() - start
            cpu_after = bench.cpu_seconds()
            rss.cancel()
            peak_rss = await rss
            after = await _transactions(http, bench.url)
        applied = await bench.pool.fetchval("SELECT id FROM feed_head")
        copy = await raw_copy_rate(bench.dsn, make_changes("copy", 1, 100_000))
    cuts = statistics.quantiles(latencies, n=100, method="inclusive")
    result = {
        "pushers": args.pushers,
        "token_cache_s": args.token_cache_s,
        "batch": args.batch,
        "same_keys": args.same_keys,
        "offered_pushes_per_s": round(args.pushers / args.interval) if args.interval else None,
        "pushes_per_s": round(len(latencies) / elapsed),
        "changes_per_s": round(applied / elapsed),
        "push_p50_ms": round(cuts[49] * 1000, 1),
        "push_p99_ms": round(cuts[98] * 1000, 1),
        "transactions": None if after is None else round(after - (before or 0)),
        "hub_peak_rss_mb": round(peak_rss / 2**20, 1),
        "cpu_us_per_push": {
            side: round((cpu_after[side] - cpu_before[side]) / len(latencies) * 1e6, 1)
            for side in ("hub", "postgres")
        },
        "raw_copy_rows_per_s": round(copy),
    }
    print_figures(result, as_json=args.json)


if __name__ == "__main__":
    asyncio.run(main())
