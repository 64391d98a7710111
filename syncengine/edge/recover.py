"""Recovering an edge whose SQLite file is damaged.

Three steps, in an order that never loses what can still be read:

1. **Salvage**: read every change of the damaged file's outbox that can still be read. Range
   scans go page by page; where one fails, each seq of the stretch is read on its own, so a
   damaged page costs only the rows stored on it.
2. **Rebuild**: ask the hub which seqs of this node it holds (a salvaged change at or below
   them is there already and is dropped), move the damaged file aside (never deleted), and
   make a new store: the salvaged changes the hub lacks are queued again, numbered right
   after the hub's, and every subscribed record is taken from the hub's snapshot with them
   on top.
3. The records the salvaged changes touched outside the snapshot are taken from the hub
   too (or built from the changes alone when the hub has none).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import aiosqlite

from syncengine.edge.backup import move_aside
from syncengine.edge.link import HubLink
from syncengine.edge.store import EdgeStore
from syncengine.edge.sync import Syncer
from syncengine.errors import StorageError
from syncengine.tiers import Tier

__all__ = ["RecoveryReport", "recover_store", "salvage_outbox"]

log = logging.getLogger(__name__)

#: Rows per range read while salvaging; a failed range is re-read seq by seq.
_CHUNK: Final = 256
#: With the lane's seq range unreadable, how far past the last readable seq to probe.
_PROBE_AHEAD: Final = 10_000

Row = tuple[
    int, int, str, str, str, int, bytes, int
]  # lane, seq, cell, coll, key, hlc, payload, created


@dataclass
class Salvage:
    """What could be read of a damaged outbox."""

    rows: list[Row] = field(default_factory=list)
    unreadable: int = 0  # seqs in the lanes' ranges that could not be read
    lanes_readable: bool = True


@dataclass(frozen=True, slots=True)
class RecoveryReport:
    salvaged: int  # readable changes found in the damaged file's outbox
    unreadable: int  # seqs that could not be read (lost with the damaged pages)
    held_by_hub: int  # salvaged changes the hub had already: dropped
    requeued: int  # salvaged changes queued again in the new store
    records: int  # records taken from the hub's snapshot
    damaged_moved_to: Path


def salvage_outbox(path: Path) -> Salvage:
    """Every outbox row of the (damaged) store at ``path`` that can still be read."""
    out = Salvage()
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise StorageError(
            f"{path} cannot be opened at all: {exc}",
            hint="Nothing can be salvaged from it; rebuild with `syncengine edge bootstrap` "
            "on a new file.",
            code="unrecoverable",
        ) from None
    with contextlib.closing(conn):
        ranges: dict[int, tuple[int, int | None]] = {}
        try:
            for lane, next_seq, acked in conn.execute(
                "SELECT lane, next_seq, acked_seq FROM lanes"
            ):
                ranges[int(lane)] = (int(acked), int(next_seq) - 1)
        except sqlite3.DatabaseError:
            out.lanes_readable = False
        for tier in Tier:
            after, last = ranges.get(tier.priority, (0, None))
            for row in _read_lane(conn, tier.priority, after, last, out):
                out.rows.append(row)
    return out


def _read_lane(
    conn: sqlite3.Connection, lane: int, after: int, last: int | None, out: Salvage
) -> Iterator[Row]:
    sql = (
        "SELECT lane, seq, cell, collection, key, hlc, payload, created_at_ms FROM outbox "
        "WHERE lane = ? AND seq > ? ORDER BY seq LIMIT ?"
    )
    while last is None or after < last:
        try:
            rows = conn.execute(sql, (lane, after, _CHUNK)).fetchall()
        except sqlite3.DatabaseError:
            # Read the stretch seq by seq: only the rows on the damaged pages are lost.
            end = after + _CHUNK if last is not None else after + _PROBE_AHEAD
            if last is not None:
                end = min(end, last)
            found_any = False
            for seq in range(after + 1, end + 1):
                try:
                    row = conn.execute(
                        "SELECT lane, seq, cell, collection, key, hlc, payload, created_at_ms "
                        "FROM outbox WHERE lane = ? AND seq = ?",
                        (lane, seq),
                    ).fetchone()
                except sqlite3.DatabaseError:
                    out.unreadable += 1
                    continue
                if row is not None:
                    found_any = True
                    yield _row(row)
            after = end
            if last is None and not found_any:
                return
            continue
        if not rows:
            return
        for row in rows:
            yield _row(row)
        after = int(rows[-1][1])


def _row(raw: Any) -> Row:
    lane, seq, cell, coll, key, hlc, payload, created = raw
    return (
        int(lane),
        int(seq),
        str(cell),
        str(coll),
        str(key),
        int(hlc),
        bytes(payload),
        int(created),
    )


async def recover_store(
    db_path: Path,
    *,
    open_new: Callable[[], AbstractAsyncContextManager[EdgeStore]],
    link: HubLink,
    subscriptions: Sequence[str],
    progress: Callable[[int, str], None] | None = None,
) -> RecoveryReport:
    """Salvage, rebuild and re-queue (see the module docstring). ``open_new()`` opens this
    node's store at ``db_path`` (a new file by then). The hub must be reachable: nothing is
    moved or written before it answered. Raises the link's errors and :class:`StorageError`.
    """
    salvage = await asyncio.to_thread(salvage_outbox, db_path)
    # The hub first: if it cannot be asked, the damaged file stays exactly where it was.
    cfg = await link.config()
    acked = cfg.get("acked")
    if not isinstance(acked, list) or len(acked) != len(Tier):
        raise StorageError(
            "the hub did not say which changes of this node it holds",
            hint="Upgrade the hub; recovery needs it.",
            code="unrecoverable",
        )
    aside = await asyncio.to_thread(move_aside, db_path, "damaged")
    keep = sorted((r for r in salvage.rows if r[1] > int(acked[r[0]])), key=lambda r: (r[0], r[1]))
    async with open_new() as store:
        syncer = Syncer(store, link, subscriptions=subscriptions)
        await syncer.learn_config()  # tier rules and resolvers, before anything is queued

        async def requeue(conn: aiosqlite.Connection) -> None:
            # Numbered right after what the hub holds, with no gap (lost rows leave none).
            by_lane: dict[int, int] = {}
            rows = []
            for lane, _seq, cell, coll, key, hlc, payload, created in keep:
                seq = int(acked[lane]) + 1 + by_lane.get(lane, 0)
                by_lane[lane] = by_lane.get(lane, 0) + 1
                rows.append((lane, seq, cell, coll, key, hlc, payload, created))
            await conn.executemany(
                "INSERT INTO outbox (lane, seq, cell, collection, key, hlc, payload, "
                "created_at_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
            for tier in Tier:
                hub = int(acked[tier.priority])
                await conn.execute(
                    "UPDATE lanes SET next_seq = ?, acked_seq = ?, first_seq = ? WHERE lane = ?",
                    (hub + 1 + by_lane.get(tier.priority, 0), hub, hub + 1, tier.priority),
                )

        await store.run_exclusive(requeue)
        records = await syncer.bootstrap(progress=progress)
        await syncer.refresh({(cell, coll, key) for _, _, cell, coll, key, *_ in keep})
    report = RecoveryReport(
        salvaged=len(salvage.rows),
        unreadable=salvage.unreadable,
        held_by_hub=len(salvage.rows) - len(keep),
        requeued=len(keep),
        records=records,
        damaged_moved_to=aside,
    )
    log.warning(
        "node store %s recovered: %d changes salvaged (%d the hub had, %d queued again), "
        "%d seqs unreadable; %d records from the hub; the damaged file is %s",
        db_path,
        report.salvaged,
        report.held_by_hub,
        report.requeued,
        report.unreadable,
        report.records,
        aside,
    )
    return report
