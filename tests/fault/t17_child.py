"""An edge process for the T17 soak: ``edge_child.py``'s daemon and writer, which the test can
pause and resume over stdin.

Usage: ``python t17_child.py CONFIG_JSON PREFIX RATE CELL``

Prints ``ready`` once the daemon runs, ``bootstrapped`` once it holds its subscriptions (the
writers start then), and one line per acknowledged write (``<key>``, only after ``put``
returned) at about RATE writes/s across the critical, important and standard cells under
CELL (``edge_child.cells_under``). A ``put`` that fails with a :class:`StorageError` (the disk is full)
prints ``refused <key> <code>`` instead: never acknowledged, and the writer goes on with its
next key. Commands on stdin, one a line: ``pause`` stops the writers and prints ``paused``
once no ``put`` is in flight (so every acknowledged key was printed before it); ``resume``
starts them again and prints ``resumed``. The daemon keeps syncing throughout. End of stdin
(the test is gone) ends the process.

The process owns the store, as an application does, and lends it to the daemon. A failure of
the store stops the daemon (``EdgeDaemon.wait`` raises it; ``syncengine edge run`` exits 1
and systemd restarts it): on ``disk_full`` this process plays that supervisor, prints
``daemon-restart disk_full`` and starts a new daemon on the same store after
:data:`DAEMON_RESTART_S`, while the writers go on. Any other failure of the daemon ends the
process with an error (the test counts an edge crash).

``SYNCENGINE_T3_BROKEN=ack_before_commit`` is the negative control's broken build (see
``edge_child.py``).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys

from edge_child import CONCURRENCY, _break_ack_before_commit, cells_under

from syncengine.config import EdgeConfig
from syncengine.edge.daemon import EdgeDaemon, open_store
from syncengine.errors import StorageError

#: How long the daemon stays stopped after a disk-full stop (systemd's ``RestartSec``).
DAEMON_RESTART_S = 0.5


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def main(config_json: str, prefix: str, rate: float, cell: str) -> None:
    config = EdgeConfig.from_mapping(json.loads(config_json))
    running = asyncio.Event()
    running.set()
    # Writers start once the subscriptions are held: the test waits for ``bootstrapped``
    # before anything else, and the control's edge, which dies at a crash point in one put
    # of five, would otherwise die before it ever said so.
    holding = asyncio.Event()
    in_flight = 0
    async with open_store(config) as store:
        started = asyncio.Event()
        daemon: EdgeDaemon | None = None

        async def supervise() -> None:
            """Run the daemon; start a new one after each stop on a full disk."""
            nonlocal daemon
            while True:
                try:
                    async with EdgeDaemon(config, store=store, notify=lambda _msg: None) as daemon:
                        if not started.is_set():
                            say("ready")
                            started.set()
                        await daemon.wait()
                except StorageError as exc:
                    if exc.code != "disk_full":
                        raise
                    say(f"daemon-restart {exc.code}")
                await asyncio.sleep(DAEMON_RESTART_S)

        async def bootstrapped() -> None:
            await started.wait()
            while daemon is None or not daemon.health().bootstrapped:
                await asyncio.sleep(0.05)
            say("bootstrapped")
            holding.set()

        async def commands() -> None:
            while True:
                line = await asyncio.to_thread(sys.stdin.readline)
                if not line:
                    os._exit(0)  # the test closed the pipe, or died
                command = line.strip()
                if command == "pause":
                    running.clear()
                    while in_flight:
                        await asyncio.sleep(0.01)
                    say("paused")
                elif command == "resume":
                    running.set()
                    say("resumed")

        cells = cells_under(cell)
        counter = iter(range(1 << 62))
        pause = CONCURRENCY / rate

        async def writer() -> None:
            nonlocal in_flight
            await holding.wait()
            for i in counter:
                await running.wait()
                where, collection = cells[i % len(cells)]
                key = f"{prefix}-{i}"
                in_flight += 1
                try:
                    await store.put(where, collection, key, {"n": i, "by": config.node_id})
                except StorageError as exc:
                    say(f"refused {key} {exc.code}")
                else:
                    say(key)
                finally:
                    in_flight -= 1
                await asyncio.sleep(pause)

        await asyncio.gather(
            supervise(), bootstrapped(), commands(), *(writer() for _ in range(CONCURRENCY))
        )


if __name__ == "__main__":
    if os.environ.get("SYNCENGINE_T3_BROKEN") == "ack_before_commit":
        _break_ack_before_commit()
    asyncio.run(main(sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]))
