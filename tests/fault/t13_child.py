"""The contending processes of T13 (multi-process SQLite contention on one edge file).

Usage: ``python t13_child.py MODE DB PREFIX SECONDS [--seed N]``; modes:

- ``writer``: bursts of concurrent ``put``s through the public API (a burst of 1 to 128 writes,
  then a pause of up to 150 ms), timing each ``put`` from call to return (its write wait).
- ``reader``: ``get`` of recently written keys and a page of ``scan`` through the public API,
  as fast as it can.
- ``raw``: the negative control's writer: a plain ``sqlite3`` connection with
  ``busy_timeout=0`` that takes the write lock (``BEGIN IMMEDIATE``) in a loop.

Each prints ``ok KEY`` per acknowledged write, then one ``stats {json}`` line: operations,
errors split into ``busy`` ("database is locked", SQLITE_BUSY, code ``busy``) and ``other``
(with a few samples), and the wait figures in milliseconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sqlite3
import sys
import time
from typing import Any

from syncengine.edge.store import EdgeStore

CELL = "west/ng/lagos/clinic-12/alerts"  # critical: the daemon pushes it at once
NODE = "n1"


class Tally:
    def __init__(self) -> None:
        self.ops = 0
        self.busy = 0
        self.other = 0
        self.samples: list[str] = []
        self.waits_ms: list[float] = []

    def error(self, exc: BaseException) -> None:
        text = str(exc)
        code = getattr(exc, "code", "")
        if code == "busy" or "locked" in text or "SQLITE_BUSY" in text or "busy" in text:
            self.busy += 1
        else:
            self.other += 1
        if len(self.samples) < 5:
            self.samples.append(f"{type(exc).__name__}: {text}"[:300])

    def stats(self) -> dict[str, Any]:
        waits = sorted(self.waits_ms)

        def q(p: float) -> float | None:
            return round(waits[min(len(waits) - 1, int(p * len(waits)))], 2) if waits else None

        return {
            "ops": self.ops,
            "busy": self.busy,
            "other": self.other,
            "samples": self.samples,
            "p50_ms": q(0.50),
            "p99_ms": q(0.99),
            "max_ms": round(waits[-1], 2) if waits else None,
        }


def emit(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def writer(db: str, prefix: str, seconds: float, rng: random.Random) -> Tally:
    tally = Tally()
    n = 0
    async with EdgeStore.open(db, node_id=NODE, region="west") as store:
        emit("ready")

        async def put(key: str) -> None:
            started = time.perf_counter()
            try:
                await store.put(CELL, "events", key, {"k": key, "pad": "x" * rng.randrange(300)})
            except Exception as exc:  # whatever reaches a caller is counted
                tally.error(exc)
                return
            tally.waits_ms.append((time.perf_counter() - started) * 1000)
            tally.ops += 1
            emit(f"ok {key}")

        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            burst = rng.choice((1, 4, 16, 64, 128))
            keys = [f"{prefix}-{n + i}" for i in range(burst)]
            n += burst
            await asyncio.gather(*(put(k) for k in keys))
            await asyncio.sleep(rng.uniform(0, 0.15))
    return tally


async def reader(db: str, prefix: str, seconds: float, rng: random.Random) -> Tally:
    tally = Tally()
    async with EdgeStore.open(db, node_id=NODE, region="west") as store:
        emit("ready")
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            started = time.perf_counter()
            try:
                if rng.random() < 0.8:
                    await store.get(CELL, "events", f"{prefix}-{rng.randrange(5000)}")
                else:
                    async for _ in store.scan(CELL, "events", page=200):
                        break
            except Exception as exc:  # whatever reaches a caller is counted
                tally.error(exc)
            else:
                tally.ops += 1
                tally.waits_ms.append((time.perf_counter() - started) * 1000)
            await asyncio.sleep(0.002)
    return tally


def raw(db: str, seconds: float, rng: random.Random) -> Tally:
    """The broken writer: no busy timeout, so contention reaches it as an error."""
    tally = Tally()
    conn = sqlite3.connect(db, timeout=0, isolation_level=None)
    try:
        emit("ready")
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            started = time.perf_counter()
            try:
                conn.execute("BEGIN IMMEDIATE")
                conn.execute("UPDATE meta SET value = value WHERE key = 'node_id'")
                conn.execute("COMMIT")
            except sqlite3.OperationalError as exc:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                tally.error(exc)
            else:
                tally.ops += 1
                tally.waits_ms.append((time.perf_counter() - started) * 1000)
            time.sleep(rng.uniform(0, 0.002))
    finally:
        conn.close()
    return tally


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["writer", "reader", "raw"])
    parser.add_argument("db")
    parser.add_argument("prefix")
    parser.add_argument("seconds", type=float)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(f"{args.seed}:{args.mode}:{args.prefix}")
    if args.mode == "writer":
        tally = asyncio.run(writer(args.db, args.prefix, args.seconds, rng))
    elif args.mode == "reader":
        tally = asyncio.run(reader(args.db, args.prefix, args.seconds, rng))
    else:
        tally = raw(args.db, args.seconds, rng)
    emit(f"stats {json.dumps(tally.stats())}")


if __name__ == "__main__":
    main()
