"""Snapshots: a new or rebuilt edge bootstraps a cell prefix page by page.

Pages are keyset-paginated on ``(cell, collection, key)``, so an interrupted bootstrap
resumes where it stopped (the edge keeps the ``next`` token) and no page costs more than
its size, however large the prefix. The first page records the feed head as the cursor to
pull from after the last page. Pages are read at different moments, so a record may
already include feed entries after that cursor; each record carries its ``feed_id`` so the
edge can skip exactly those when it pulls (which keeps ``counter`` collections exact).
Tombstones are included: replicas hold byte-identical state, deleted records too.
"""

from __future__ import annotations

import base64
import binascii

import asyncpg
import msgpack

from syncengine import crashpoints
from syncengine.errors import InvalidInputError
from syncengine.hub.db import translated
from syncengine.protocol import SnapshotPage

__all__ = ["read_snapshot_page"]

_PAGE_SQL = (
    "SELECT cell, collection, key, state, feed_id FROM records "
    "WHERE (cell = $1 OR (cell >= $1 || '/' AND cell < $1 || '0')) "
    "AND (cell, collection, key) > ($2, $3, $4) "
    "ORDER BY cell, collection, key LIMIT $5"
)


def _token(cursor: int, last: tuple[str, str, str]) -> str:
    raw = msgpack.packb([cursor, *last])
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _untoken(token: str) -> tuple[int, tuple[str, str, str]]:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        cursor, cell, coll, key = msgpack.unpackb(raw, raw=False)
        if not (isinstance(cursor, int) and all(isinstance(v, str) for v in (cell, coll, key))):
            raise ValueError("wrong types")
    except (ValueError, TypeError, binascii.Error, msgpack.UnpackException):
        raise InvalidInputError(
            "the snapshot 'after' token is not one this hub issued",
            hint="Start the snapshot again without 'after'.",
            code="invalid_snapshot_token",
        ) from None
    return cursor, (cell, coll, key)


async def read_snapshot_page(
    pool: asyncpg.Pool, *, prefix: str, after: str | None, limit: int
) -> SnapshotPage:
    """One page of ``prefix`` (already authorized) after the ``after`` token."""
    async with translated("snapshot"):
        if after is None:
            cursor: int = await pool.fetchval("SELECT id FROM feed_head")
            last = ("", "", "")
        else:
            cursor, last = _untoken(after)
        rows = await pool.fetch(_PAGE_SQL, prefix, *last, limit)
    crashpoints.crashpoint("snapshot.mid_stream")
    records = [
        (r["cell"], r["collection"], r["key"], bytes(r["state"]), r["feed_id"]) for r in rows
    ]
    nxt = _token(cursor, records[-1][:3]) if len(records) == limit else None
    return SnapshotPage(records=records, cursor=cursor, next=nxt)
