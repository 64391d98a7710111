"""Snapshots: a new or rebuilt edge bootstraps a cell prefix page by page, and reads back
records it evicted.

Pages are keyset-paginated on ``(cell, collection, key)``, so an interrupted bootstrap
resumes where it stopped (the edge keeps the ``next`` token) and no page costs more than
its size, however large the prefix. The first page records the feed head as the cursor to
pull from after the last page. Pages are read at different moments, so a record may
already include feed entries after that cursor; each record carries its ``feed_id`` so the
edge can skip exactly those when it pulls (which keeps ``counter`` collections exact).
Tombstones are included: replicas hold byte-identical state, deleted records too.

Every page also carries the asking node's acknowledged seq per lane, read in the same
database snapshot as the records: the records hold exactly the node's changes up to those
seqs, so the edge re-applies on top only its queued changes above them (never one twice).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence

import asyncpg
import msgpack

from syncengine import crashpoints
from syncengine.errors import InvalidInputError
from syncengine.hub.db import translated
from syncengine.protocol import SnapshotPage
from syncengine.tiers import Tier

__all__ = ["acked_seqs", "read_records", "read_snapshot_page"]

#: A prefix's records are two primary-key ranges, read in key order: the prefix's own cell,
#: then the cells under it (``prefix/`` up to ``prefix0``: ``/`` sorts just before ``0``).
#: Each is an index range scan that stops at the page's end (the own cell is done once the
#: page's start is past it); one query with an OR of the two made PostgreSQL fetch and sort
#: every record after the page's start, for every page.
_PAGE_SQL = tuple(
    "SELECT cell, collection, key, state, feed_id FROM records "
    f"WHERE {cells} ORDER BY cell, collection, key LIMIT $5"
    for cells in (
        'cell = $1 AND (collection, key) > ($3, $4) AND $2 <= $1 COLLATE "C"',
        "cell >= $1 || '/' AND cell < $1 || '0' AND (cell, collection, key) > ($2, $3, $4)",
    )
)
_RECORDS_SQL = (
    "SELECT cell, collection, key, state, feed_id FROM records "
    "WHERE cell = $1 AND collection = $2 AND key = ANY($3::text[]) ORDER BY key"
)
_ACKED_SQL = "SELECT lane, acked_seq FROM node_lanes WHERE node_id = $1"

Row = tuple[str, str, str, bytes, int]


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


async def acked_seqs(conn: asyncpg.Connection | asyncpg.Pool, node_id: str) -> list[int]:
    """The highest seq of each lane the hub holds from ``node_id`` (0 for none)."""
    acked = [0] * len(Tier)
    for r in await conn.fetch(_ACKED_SQL, node_id):
        acked[r["lane"]] = r["acked_seq"]
    return acked


def _rows(rows: Sequence[asyncpg.Record]) -> list[Row]:
    return [(r["cell"], r["collection"], r["key"], bytes(r["state"]), r["feed_id"]) for r in rows]


async def read_snapshot_page(
    pool: asyncpg.Pool, *, node_id: str, prefix: str, after: str | None, limit: int
) -> SnapshotPage:
    """One page of ``prefix`` (already authorized) after the ``after`` token."""
    async with (
        translated("snapshot"),
        pool.acquire() as conn,
        conn.transaction(isolation="repeatable_read", readonly=True),
    ):
        if after is None:
            cursor: int = await conn.fetchval("SELECT id FROM feed_head")
            last = ("", "", "")
        else:
            cursor, last = _untoken(after)
        # A freshly loaded table has no statistics yet: the planner then guesses a few
        # hundred rows in the range and sorts all of them. The index gives the order.
        await conn.execute("SET LOCAL enable_sort = off")
        records: list[Row] = []
        for sql in _PAGE_SQL:
            records += _rows(await conn.fetch(sql, prefix, *last, limit - len(records)))
            if len(records) == limit:
                break
        acked = await acked_seqs(conn, node_id)
    crashpoints.crashpoint("snapshot.mid_stream")
    nxt = _token(cursor, records[-1][:3]) if len(records) == limit else None
    return SnapshotPage(records=records, cursor=cursor, next=nxt, acked=acked)


async def read_records(
    pool: asyncpg.Pool, *, node_id: str, cell: str, collection: str, keys: Sequence[str]
) -> SnapshotPage:
    """The named records of one cell and collection (already authorized), as a one-page
    snapshot whose cursor is the feed head: how an edge reads back what it evicted."""
    async with (
        translated("records"),
        pool.acquire() as conn,
        conn.transaction(isolation="repeatable_read", readonly=True),
    ):
        cursor = await conn.fetchval("SELECT id FROM feed_head")
        records = _rows(await conn.fetch(_RECORDS_SQL, cell, collection, list(keys)))
        acked = await acked_seqs(conn, node_id)
    return SnapshotPage(records=records, cursor=cursor, next=None, acked=acked)
