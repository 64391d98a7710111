"""What each node does, kept for `syncengine status`: its pull cursors and last error.

Written at once when something changes meaning (a new error code, a node's first pull of a
tier) and otherwise at most every :data:`EVERY_S` seconds per node and tier, so a thousand
long-polling edges cost a few small writes a second. A failed write is logged and dropped:
this is reporting, never worth failing a request for.
"""

from __future__ import annotations

import logging
import time
from typing import Final

import asyncpg

from syncengine.errors import SyncError
from syncengine.hub.db import translated

__all__ = ["NodeActivity"]

log = logging.getLogger(__name__)

#: An unchanged fact is written again at most this often (seconds).
EVERY_S: Final = 15.0


class NodeActivity:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self._pulls: dict[tuple[str, int], tuple[float, int]] = {}  # -> (written, cursor)
        self._errors: dict[str, tuple[float, str]] = {}  # node -> (written, code)

    async def pulled(self, node_id: str, tier: int, cursor: int) -> None:
        key = (node_id, tier)
        now = time.monotonic()
        last = self._pulls.get(key)
        if last is not None and now - last[0] < EVERY_S:
            return
        self._pulls[key] = (now, cursor)
        await self._write(
            "WITH p AS (INSERT INTO node_pulls (node_id, tier, cursor) VALUES ($1, $2, $3) "
            "ON CONFLICT (node_id, tier) DO UPDATE SET cursor = excluded.cursor, "
            "pulled_at = now()) UPDATE nodes SET last_seen = now() WHERE node_id = $1",
            node_id,
            tier,
            cursor,
        )

    async def failed(self, node_id: str, code: str, message: str) -> None:
        now = time.monotonic()
        last = self._errors.get(node_id)
        if last is not None and last[1] == code and now - last[0] < EVERY_S:
            return
        self._errors[node_id] = (now, code)
        await self._write(
            "UPDATE nodes SET last_error_code = $2, last_error = $3, last_error_at = now() "
            "WHERE node_id = $1",
            node_id,
            code,
            message[:1000],
        )

    async def _write(self, sql: str, *args: object) -> None:
        try:
            async with (
                translated("node activity"),
                self._pool.acquire(timeout=2.0) as conn,
                conn.transaction(),
            ):
                # Reporting: a crash may lose the last moment of it, so it does not wait for
                # the disk. Hundreds of edges' pulls would otherwise queue on fsyncs.
                await conn.execute("SET LOCAL synchronous_commit TO off")
                await conn.execute(sql, *args, timeout=2.0)
        except SyncError as exc:
            log.debug("node activity not recorded: %s", exc.message)
