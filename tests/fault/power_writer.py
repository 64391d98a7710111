"""The writer of the power-cut test (T4): ``python power_writer.py DB PREFIX``.

Writes through the public ``put`` as fast as it can (group commit, 8 at a time) and prints
each key once ``put`` returned. ``SYNCENGINE_T4_BROKEN=synchronous_normal`` is the negative
control's broken build: the store's connections commit with ``synchronous=NORMAL``, which
does not fsync the WAL at each commit.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Any

from syncengine.edge import sqlite as db
from syncengine.edge.store import EdgeStore

CELL = "west/ng/lagos/clinic-12"


def _break_synchronous() -> None:
    connect = db.connect

    async def normal(path: Path, **kw: Any) -> Any:
        conn = await connect(path, **kw)
        await conn.execute("PRAGMA synchronous = NORMAL")
        return conn

    db.connect = normal  # type: ignore[assignment]


async def main(path: str, prefix: str) -> None:
    out = sys.stdout
    async with EdgeStore.open(path, node_id="n1", region="west") as store:
        out.write("ready\n")
        out.flush()
        counter = iter(range(1 << 62))

        async def worker() -> None:
            for i in counter:
                key = f"{prefix}-{i}"
                await store.put(CELL, "visits", key, {"n": i, "note": "x" * 200})
                out.write(key + "\n")
                out.flush()

        await asyncio.gather(*(worker() for _ in range(8)))


if __name__ == "__main__":
    if os.environ.get("SYNCENGINE_T4_BROKEN") == "synchronous_normal":
        _break_synchronous()
    asyncio.run(main(sys.argv[1], sys.argv[2]))
