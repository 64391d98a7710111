"""A child process that writes through the public ``put`` API as fast as it can.

Usage: ``python edge_writer.py DB NODE_ID KEY_PREFIX COUNT CONCURRENCY``

Prints ``ready`` once the store is open, then one line per acknowledged write (the key),
only after ``put`` returned. Exits 0 when all COUNT writes are acknowledged.
"""

from __future__ import annotations

import asyncio
import sys

from syncengine.edge.store import EdgeStore

CELL = "west/ng/lagos/clinic-12"


async def main(db: str, node: str, prefix: str, count: int, concurrency: int) -> None:
    out = sys.stdout
    async with EdgeStore.open(db, node_id=node, region="west") as store:
        out.write("ready\n")
        out.flush()
        queue = iter(range(count))

        async def worker() -> None:
            for i in queue:
                key = f"{prefix}-{i}"
                await store.put(CELL, "visits", key, {"n": i, "by": node, "note": "x" * 40})
                out.write(key + "\n")
                out.flush()

        await asyncio.gather(*(worker() for _ in range(concurrency)))


if __name__ == "__main__":
    db, node, prefix, count, conc = sys.argv[1:6]
    asyncio.run(main(db, node, prefix, int(count), int(conc)))
