"""The outbox: the edge's durable queue of changes the hub has not acknowledged yet.

Changes wait in four lanes, one per tier (0 critical … 3 archive), each numbered by its own
contiguous ``seq``. The sync layer takes batches most important lane first, in seq order;
the hub answers with the highest seq it applied, and only then are the rows deleted, so a
lost answer means the same batch is sent again and the hub's dedup makes it a no-op.

A change the hub refuses for good is moved to ``dead_letters`` with the hub's reason. Its seq
is then declared ``skipped`` in the next batch of its lane, so the hub can tell a skipped seq
from a lost one and the changes behind it are never blocked.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aiosqlite
import msgpack

from syncengine.codec import encode
from syncengine.edge import sqlite as db
from syncengine.errors import SequenceError, ValidationError
from syncengine.merge import BaseStamp, Change, base_stamps
from syncengine.tiers import Tier

if TYPE_CHECKING:
    from syncengine.edge.store import EdgeStore

__all__ = [
    "DeadLetter",
    "LaneStatus",
    "Outbox",
    "OutboxBatch",
    "decode_payload",
    "encode_payload",
    "queued_change",
]

DEFAULT_BATCH = 1000


def encode_payload(change: Change) -> bytes:
    """The outbox payload of a change: its fields (nil for a delete) and its base stamps."""
    body: dict[str, Any] = {"f": change.fields}
    if change.base:
        body["b"] = dict(change.base)
    return encode(body)


def decode_payload(blob: bytes) -> tuple[dict[str, Any] | None, dict[str, BaseStamp]]:
    raw = msgpack.unpackb(blob, raw=False)
    return raw["f"], base_stamps(raw.get("b", {}))


def queued_change(node: str, lane: int, row: Sequence[Any]) -> Change:
    """The change an outbox row ``(seq, cell, collection, key, hlc, payload)`` holds, as
    this node wrote it."""
    seq, cell, collection, key, hlc, payload = row
    fields, base = decode_payload(payload)
    return Change(
        cell=cell,
        collection=collection,
        key=key,
        hlc=hlc,
        node=node,
        fields=fields,
        base=base,
        lane=lane,
        seq=seq,
    )


@dataclass(frozen=True, kw_only=True, slots=True)
class OutboxBatch:
    """A run of one lane's changes to push. ``changes`` plus ``skipped`` (dead-lettered
    seqs) cover ``first_seq..last_seq`` exactly, with no gap."""

    lane: int
    first_seq: int
    last_seq: int
    changes: list[Change]
    skipped: list[int]

    @property
    def tier(self) -> Tier:
        return Tier.from_priority(self.lane)


@dataclass(frozen=True, kw_only=True, slots=True)
class DeadLetter:
    lane: int
    seq: int
    cell: str
    collection: str
    key: str
    hlc: int
    fields: Mapping[str, Any] | None
    code: str
    message: str
    detail: Mapping[str, Any]
    created_at_ms: int
    dead_at_ms: int


@dataclass(frozen=True, kw_only=True, slots=True)
class LaneStatus:
    """What is waiting in one lane, for status and scheduling."""

    tier: Tier
    depth: int
    bytes_pending: int
    oldest_created_at_ms: int | None
    acked_seq: int
    next_seq: int
    dead_letters: int


class Outbox:
    """The outbox of one :class:`EdgeStore`. Reached as ``store.outbox``."""

    def __init__(self, store: EdgeStore) -> None:
        self._store = store

    async def next_batch(
        self,
        *,
        limit: int = DEFAULT_BATCH,
        lanes: Sequence[int] | None = None,
        after: Mapping[int, int] | None = None,
    ) -> OutboxBatch | None:
        """The next batch of the most important lane with work, or None when all is pushed.

        ``lanes`` restricts the lanes considered (e.g. only critical for a live push);
        ``after`` starts a lane past that seq instead of its acknowledged one (to read the
        whole queue batch by batch, as a bundle export does). Reads one consistent snapshot.
        """
        wanted = sorted(lanes) if lanes is not None else [0, 1, 2, 3]
        store = self._store
        return await db.read_snapshot(
            store._reader, store.path, self._scan_lanes, store.node_id, wanted, limit, after or {}
        )

    @staticmethod
    def _scan_lanes(
        conn: sqlite3.Connection,
        node_id: str,
        wanted: Sequence[int],
        limit: int,
        start: Mapping[int, int],
    ) -> OutboxBatch | None:
        """On the read connection's thread, inside its snapshot."""
        acked: dict[int, int] = {
            lane: max(seq, start.get(lane, 0))
            for lane, seq in conn.execute("SELECT lane, acked_seq FROM lanes")
        }
        for lane in wanted:
            after = acked[lane]
            rows = conn.execute(
                "SELECT seq, cell, collection, key, hlc, payload FROM outbox "
                "WHERE lane = ? AND seq > ? ORDER BY seq LIMIT ?",
                (lane, after, limit),
            ).fetchall()
            top = rows[-1][0] if len(rows) == limit else None
            skipped = [
                seq
                for (seq,) in conn.execute(
                    "SELECT seq FROM dead_letters WHERE lane = ? AND seq > ? "
                    "AND (? IS NULL OR seq < ?) ORDER BY seq",
                    (lane, after, top, top),
                )
            ]
            if not rows and not skipped:
                continue
            changes = [queued_change(node_id, lane, row) for row in rows]
            last = max([c.seq for c in changes] + skipped)
            return OutboxBatch(
                lane=lane, first_seq=after + 1, last_seq=last, changes=changes, skipped=skipped
            )
        return None

    async def ack(self, lane: int, through_seq: int) -> int:
        """The hub applied everything of ``lane`` up to ``through_seq``: drop those rows.

        Returns how many rows were deleted. Raises :class:`SequenceError` when the hub claims
        seqs this store never issued (the hub and this file disagree: wrong file or node).
        """

        async def body(conn: aiosqlite.Connection) -> int:
            rows = list(
                await conn.execute_fetchall(
                    "SELECT next_seq, acked_seq FROM lanes WHERE lane = ?", (lane,)
                )
            )
            next_seq, acked = rows[0]
            if through_seq >= next_seq:
                raise SequenceError(
                    f"hub acknowledged seq {through_seq} in lane {lane}, "
                    f"but this store issued only up to {next_seq - 1}",
                    hint="This store file does not match the hub's record of this node; "
                    "see the recovery section of the operations guide.",
                    detail={"lane": lane, "acked": through_seq, "issued": next_seq - 1},
                )
            if through_seq <= acked:
                return 0
            # Archive records are evicted a while after the hub holds them: start the clock
            # of each record whose change was just acknowledged. Every lane does it, not
            # only archive's: a cell's tier can change after its records were pushed.
            await conn.execute(
                "UPDATE records SET synced_at_ms = ? FROM (SELECT cell, collection, key "
                "FROM outbox WHERE lane = ? AND seq > ? AND seq <= ?) AS o "
                "WHERE records.cell = o.cell AND records.collection = o.collection "
                "AND records.key = o.key",
                (int(time.time() * 1000), lane, acked, through_seq),
            )
            cur = await conn.execute(
                "DELETE FROM outbox WHERE lane = ? AND seq <= ?", (lane, through_seq)
            )
            await conn.execute("UPDATE lanes SET acked_seq = ? WHERE lane = ?", (through_seq, lane))
            return int(cur.rowcount)

        return await self._store.run_exclusive(body)

    async def dead_letter(
        self,
        lane: int,
        seq: int,
        *,
        code: str,
        message: str,
        detail: Mapping[str, Any] | None = None,
    ) -> bool:
        """Move one change from the outbox to ``dead_letters`` with the hub's reason.

        Idempotent: returns False when the change is no longer in the outbox.
        """

        async def body(conn: aiosqlite.Connection) -> bool:
            cur = await conn.execute(
                "INSERT INTO dead_letters (lane, seq, cell, collection, key, hlc, payload, "
                "created_at_ms, code, message, detail, dead_at_ms) "
                "SELECT lane, seq, cell, collection, key, hlc, payload, created_at_ms, ?, ?, ?, ? "
                "FROM outbox WHERE lane = ? AND seq = ?",
                (
                    code,
                    message,
                    json.dumps(dict(detail or {}), default=str),
                    time.time_ns() // 1_000_000,
                    lane,
                    seq,
                ),
            )
            if cur.rowcount == 0:
                return False
            await conn.execute("DELETE FROM outbox WHERE lane = ? AND seq = ?", (lane, seq))
            return True

        return await self._store.run_exclusive(body)

    async def dead_letters(self) -> list[DeadLetter]:
        """Every dead letter, oldest first."""
        rows = await self._store._read(
            "SELECT lane, seq, cell, collection, key, hlc, payload, code, message, detail, "
            "created_at_ms, dead_at_ms FROM dead_letters ORDER BY dead_at_ms, lane, seq"
        )
        out = []
        for (
            lane,
            seq,
            cell,
            collection,
            key,
            hlc,
            payload,
            code,
            message,
            detail,
            c_ms,
            d_ms,
        ) in rows:
            fields, _ = decode_payload(payload)
            out.append(
                DeadLetter(
                    lane=lane,
                    seq=seq,
                    cell=cell,
                    collection=collection,
                    key=key,
                    hlc=hlc,
                    fields=fields,
                    code=code,
                    message=message,
                    detail=json.loads(detail),
                    created_at_ms=c_ms,
                    dead_at_ms=d_ms,
                )
            )
        return out

    async def retry_dead_letters(self, which: Sequence[tuple[int, int]] | None = None) -> int:
        """Queue dead letters again — ``which`` as ``(lane, seq)`` pairs, None for all — and
        return how many. Each goes to the end of the lane its cell belongs to now (the tier
        rules may have changed), under a new seq, with its original stamp and fields."""
        store = self._store

        async def body(conn: aiosqlite.Connection) -> int:
            rows = await _selected_dead_letters(conn, which)
            next_seq = {
                lane: seq
                for lane, seq in await conn.execute_fetchall("SELECT lane, next_seq FROM lanes")
            }
            now_ms = time.time_ns() // 1_000_000
            queued = []
            for lane, seq, cell, collection, key, hlc, payload in rows:
                target = store._lane_of(cell)
                queued.append(
                    (target, next_seq[target], cell, collection, key, hlc, payload, now_ms)
                )
                next_seq[target] += 1
                await conn.execute(
                    "DELETE FROM dead_letters WHERE lane = ? AND seq = ?", (lane, seq)
                )
            await conn.executemany(
                "INSERT INTO outbox (lane, seq, cell, collection, key, hlc, payload, "
                "created_at_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                queued,
            )
            await conn.executemany(
                "UPDATE lanes SET next_seq = ? WHERE lane = ?",
                [(seq, lane) for lane, seq in next_seq.items()],
            )
            return len(queued)

        return await store.run_exclusive(body)

    async def discard_dead_letters(
        self, which: Sequence[tuple[int, int]] | None = None
    ) -> list[tuple[str, str, str]]:
        """Delete dead letters — ``which`` as ``(lane, seq)`` pairs, None for all — and return
        the records they touched. Their effect stays in the local copies of those records
        until the hub's state is fetched again (``Syncer.refresh``)."""

        async def body(conn: aiosqlite.Connection) -> list[tuple[str, str, str]]:
            rows = await _selected_dead_letters(conn, which)
            await conn.executemany(
                "DELETE FROM dead_letters WHERE lane = ? AND seq = ?",
                [(lane, seq) for lane, seq, *_ in rows],
            )
            return list(dict.fromkeys((cell, coll, key) for _, _, cell, coll, key, _, _ in rows))

        return await self._store.run_exclusive(body)

    async def last_issued(self, lane: int) -> int:
        """The highest seq ``lane`` has handed out (0 before its first change): one row read,
        cheap enough to call before every push."""
        rows = await self._store._read("SELECT next_seq FROM lanes WHERE lane = ?", (lane,))
        return int(rows[0][0]) - 1

    async def pending(self, lane: int) -> bool:
        """Whether ``lane`` has a change the hub has not acknowledged (an index probe)."""
        rows = await self._store._read(
            "SELECT EXISTS (SELECT 1 FROM outbox WHERE lane = ? "
            "AND seq > (SELECT acked_seq FROM lanes WHERE lane = ?))",
            (lane, lane),
        )
        return bool(rows[0][0])

    async def status(self) -> list[LaneStatus]:
        """Depth, bytes and oldest pending change per lane, most important first."""
        rows = await self._store._read(
            "SELECT l.lane, l.acked_seq, l.next_seq, "
            "(SELECT count(*) FROM outbox o WHERE o.lane = l.lane), "
            "(SELECT coalesce(sum(length(payload)), 0) FROM outbox o WHERE o.lane = l.lane), "
            "(SELECT min(created_at_ms) FROM outbox o WHERE o.lane = l.lane), "
            "(SELECT count(*) FROM dead_letters d WHERE d.lane = l.lane) "
            "FROM lanes l ORDER BY l.lane"
        )
        return [
            LaneStatus(
                tier=Tier.from_priority(lane),
                depth=depth,
                bytes_pending=size,
                oldest_created_at_ms=oldest,
                acked_seq=acked,
                next_seq=nxt,
                dead_letters=dead,
            )
            for lane, acked, nxt, depth, size, oldest, dead in rows
        ]


async def _selected_dead_letters(
    conn: aiosqlite.Connection, which: Sequence[tuple[int, int]] | None
) -> list[Any]:
    """Dead letters ``(lane, seq, cell, collection, key, hlc, payload)``, oldest first: all
    of them, or those ``which`` names. Raises :class:`ValidationError` for a pair that is not
    a dead letter, before anything changes."""
    rows = list(
        await conn.execute_fetchall(
            "SELECT lane, seq, cell, collection, key, hlc, payload FROM dead_letters "
            "ORDER BY dead_at_ms, lane, seq"
        )
    )
    if which is None:
        return rows
    wanted = set(which)
    missing = wanted - {(r[0], r[1]) for r in rows}
    if missing:
        shown = ", ".join(f"{Tier.from_priority(lane)}:{seq}" for lane, seq in sorted(missing))
        raise ValidationError(
            f"no dead letter {shown}",
            hint="List them with `syncengine edge dead-letters`.",
            code="no_dead_letter",
        )
    return [r for r in rows if (r[0], r[1]) in wanted]
