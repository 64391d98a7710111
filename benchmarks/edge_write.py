"""Edge write throughput through the public ``put`` API, beside the raw SQLite limit.

    .venv/bin/python benchmarks/edge_write.py [--dir DIR] [--seconds S] [--json]

For 1, 16 and 256 concurrent writers it prints puts/s and p50/p99 latency of ``put`` (each an
acknowledged, FULL-synchronous, group-committed write), and, measured in the same run on the
same file system, raw SQLite inserts/s of the same row shape in transactions of 1,000 rows
with ``synchronous=FULL`` — the physical limit the store is compared against.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

from syncengine.edge.store import EdgeStore

CELL = "west/ng/lagos/clinic-12"
FIELDS = {"patient": "p-000123", "temp_c": 37.2, "notes": "routine visit; no complaints", "n": 0}


def raw_sqlite_rate(folder: Path, rows: int = 100_000) -> float:
    """Inserts/s of the store's row shape (a records row and an outbox row per write) in
    transactions of 1,000, synchronous=FULL, WAL: what SQLite itself can do here."""
    path = folder / "raw.db"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute(
        "CREATE TABLE records (cell TEXT, collection TEXT, key TEXT, doc TEXT, state BLOB, "
        "hlc INTEGER, deleted INTEGER, updated_at_ms INTEGER, PRIMARY KEY (cell, collection, key))"
    )
    conn.execute(
        "CREATE TABLE outbox (lane INTEGER, seq INTEGER, cell TEXT, collection TEXT, key TEXT, "
        "hlc INTEGER, payload BLOB, created_at_ms INTEGER, PRIMARY KEY (lane, seq)) WITHOUT ROWID"
    )
    doc = json.dumps(FIELDS)
    state = b"\x82" + doc.encode() * 2
    payload = doc.encode()
    start = time.perf_counter()
    for base in range(0, rows, 1000):
        conn.execute("BEGIN")
        conn.executemany(
            "INSERT INTO records VALUES (?, ?, ?, ?, ?, ?, 0, 0)",
            ((CELL, "visits", f"k{i}", doc, state, i) for i in range(base, base + 1000)),
        )
        conn.executemany(
            "INSERT INTO outbox VALUES (2, ?, ?, ?, ?, ?, ?, 0)",
            ((i + 1, CELL, "visits", f"k{i}", i, payload) for i in range(base, base + 1000)),
        )
        conn.execute("COMMIT")
    elapsed = time.perf_counter() - start
    conn.close()
    return rows / elapsed


async def store_rate(folder: Path, writers: int, seconds: float) -> dict[str, float]:
    path = folder / f"store-{writers}.db"
    latencies: list[float] = []
    async with EdgeStore.open(path, node_id="bench", region="west") as store:
        stop = time.perf_counter() + seconds
        counter = 0

        async def writer(w: int) -> None:
            nonlocal counter
            i = 0
            while time.perf_counter() < stop:
                t0 = time.perf_counter()
                await store.put(CELL, "visits", f"w{w}-{i}", {**FIELDS, "n": i})
                latencies.append(time.perf_counter() - t0)
                i += 1
            counter += i

        start = time.perf_counter()
        await asyncio.gather(*(writer(w) for w in range(writers)))
        elapsed = time.perf_counter() - start
        commits = store.commits
    latencies.sort()
    return {
        "writers": writers,
        "puts": counter,
        "puts_per_s": counter / elapsed,
        "p50_ms": statistics.median(latencies) * 1000,
        "p99_ms": latencies[int(len(latencies) * 0.99) - 1] * 1000,
        "writes_per_commit": counter / max(commits, 1),
    }


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dir", type=Path, default=None, help="folder on the disk to measure")
    parser.add_argument("--seconds", type=float, default=5.0, help="seconds per writer count")
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        folder = Path(tmp)
        raw = raw_sqlite_rate(folder)
        results = [await store_rate(folder, w, args.seconds) for w in (1, 16, 256)]
    if args.json:
        print(json.dumps({"raw_sqlite_inserts_per_s": raw, "results": results}))
        return
    print(
        f"file system: {args.dir or tempfile.gettempdir()}   cpus: {os.cpu_count()}   python {sys.version.split()[0]}"
    )
    print(f"raw SQLite, 1,000 rows per FULL commit: {raw:,.0f} inserts/s (the limit)")
    print(
        f"{'writers':>8} {'puts/s':>10} {'% of raw':>9} {'p50 ms':>8} {'p99 ms':>8} {'writes/commit':>14}"
    )
    for r in results:
        print(
            f"{r['writers']:>8} {r['puts_per_s']:>10,.0f} {100 * r['puts_per_s'] / raw:>8.1f}% "
            f"{r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} {r['writes_per_commit']:>14.1f}"
        )


if __name__ == "__main__":
    asyncio.run(main())
