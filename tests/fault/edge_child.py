"""An edge process for the kill loops: the real daemon plus a writer using the public ``put``.

Usage: ``python edge_child.py CONFIG_JSON PREFIX RATE``

CONFIG_JSON is an edge config mapping (as edge.toml would hold it). Prints ``ready`` once the
daemon runs, then one line per acknowledged write (``<key>``, only after ``put`` returned) at
about RATE writes/s across the critical, important and standard cells of ``CELLS``; with RATE
0 it writes nothing. Prints ``bootstrapped`` once the daemon holds its subscriptions.
With ``EDGE_CHILD_STAMPS=1`` each line is ``<key> <hlc>``: the stamp ``put`` returned. With
``EDGE_CHILD_LIMIT=N`` it stops after N writes, prints ``done`` and keeps syncing.

``SYNCENGINE_T3_BROKEN=ack_before_commit`` is the negative control's broken build: the store
acknowledges a group of writes before its transaction commits.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys

from syncengine.config import EdgeConfig
from syncengine.edge.daemon import EdgeDaemon
from syncengine.edge.store import EdgeStore

CELL = "west/ng/lagos/clinic-12"


def cells_under(cell: str) -> tuple[tuple[str, str], ...]:
    """The (cell, collection) a writer under ``cell`` cycles through: critical, important,
    standard."""
    return ((f"{cell}/alerts", "alarms"), (f"{cell}/stock", "items"), (cell, "visits"))


CELLS = cells_under(CELL)
CONCURRENCY = 4
#: The broken build's pause between acknowledging a group and committing it.
ACK_SEEN_S = 0.01


def _break_ack_before_commit() -> None:
    commit_group = EdgeStore._commit_group

    async def early(self: EdgeStore, group: list) -> None:  # type: ignore[type-arg]
        for w in group:
            if not w.future.done():
                w.future.set_result(0)
        # Let the writers see their acks (and print them) before the commit begins: the
        # crash point then always falls after an acknowledgement. Without this pause the
        # commit's thread often reached it first, the printing lost the race, and a run
        # could end with nothing lost to show (T17's control, seed 171919223).
        await asyncio.sleep(ACK_SEEN_S)
        await commit_group(self, group)

    EdgeStore._commit_group = early  # type: ignore[method-assign]


async def main(config_json: str, prefix: str, rate: float) -> None:
    config = EdgeConfig.from_mapping(json.loads(config_json))
    out = sys.stdout
    stamps = os.environ.get("EDGE_CHILD_STAMPS") == "1"
    async with EdgeDaemon(config, notify=lambda _msg: None) as daemon:
        out.write("ready\n")
        out.flush()

        async def bootstrapped() -> None:
            while not daemon.health().bootstrapped:
                await asyncio.sleep(0.05)
            out.write("bootstrapped\n")
            out.flush()

        watcher = asyncio.create_task(bootstrapped())
        if rate <= 0:
            await asyncio.Event().wait()
        limit = int(os.environ.get("EDGE_CHILD_LIMIT") or 0)
        counter = iter(range(limit or 1 << 62))
        pause = CONCURRENCY / rate

        async def writer() -> None:
            for i in counter:
                cell, collection = CELLS[i % len(CELLS)]
                key = f"{prefix}-{i}"
                hlc = await daemon.store.put(cell, collection, key, {"n": i, "by": config.node_id})
                out.write(f"{key} {hlc}\n" if stamps else key + "\n")
                out.flush()
                await asyncio.sleep(pause)

        await asyncio.gather(*(writer() for _ in range(CONCURRENCY)))
        out.write("done\n")
        out.flush()
        await asyncio.gather(watcher, asyncio.Event().wait())


if __name__ == "__main__":
    if os.environ.get("SYNCENGINE_T3_BROKEN") == "ack_before_commit":
        _break_ack_before_commit()
    asyncio.run(main(sys.argv[1], sys.argv[2], float(sys.argv[3])))
