"""Feed retention: the change feed stays small by dropping whole day partitions.

The feed is partitioned by day of ``applied_at`` (``migrations/hub/0003_feed_partitions.sql``).
:func:`maintain_feed`, run by every hub process at start and then every
:data:`MAINTAIN_EVERY_S` (one at a time: an advisory lock), does two things:

- it creates the day partitions of the next :data:`DAYS_AHEAD` days before they begin, so a
  push never lands in the default partition;
- it drops, oldest first, each partition that ended before the retention horizon (now minus
  ``feed_retention_days``) and that every *subscriber* has pulled past: for each tier in it,
  every node that pulled that tier within the horizon (and is not revoked) has a cursor at or
  above the partition's highest id of that tier. A node silent for longer than the horizon
  holds nothing back. It stops at the first partition it keeps, so what remains is always a
  suffix of the feed.

The highest id dropped becomes ``feed_head.horizon``, in the same transaction as the drop. A
pull from a cursor below it is answered ``cursor_behind_horizon`` (see
:func:`syncengine.hub.feed.read_page`) and the edge re-bootstraps from a snapshot: ``records``
keeps every record and every tombstone, so nothing deleted comes back.

The DDL waits at most :data:`LOCK_TIMEOUT_MS` for its table locks: behind a long query it
gives up and tries again at the next run, never stalling pushes and pulls queued behind it.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass, field
from typing import Any, Final

import asyncpg

from syncengine.hub.db import translated
from syncengine.tiers import Tier

__all__ = [
    "DAYS_AHEAD",
    "MAINTAIN_EVERY_S",
    "FeedReport",
    "Partition",
    "feed_partitions",
    "maintain_feed",
]

log = logging.getLogger(__name__)

#: Day partitions made ahead of time.
DAYS_AHEAD: Final = 7
MAINTAIN_EVERY_S: Final = 3600.0
LOCK_TIMEOUT_MS: Final = 2000
#: Advisory lock: one maintenance at a time per database ("feedkeep").
_MAINTAIN_LOCK_KEY: Final = 0x666565646B656570

_DAY: Final = dt.timedelta(days=1)


@dataclass(frozen=True, slots=True)
class Partition:
    name: str
    starts_at: dt.datetime | None
    ends_at: dt.datetime
    #: The planner's row estimate (exact counts would read the whole feed).
    rows: int


@dataclass(slots=True)
class FeedReport:
    """What one maintenance run did, and the feed as it left it."""

    horizon: int
    head: int
    retention_days: int
    created: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    #: The oldest partition past the horizon that was kept, and the nodes holding it.
    held_by: dict[str, list[str]] = field(default_factory=dict)
    #: Why the run did nothing (another process was running it, a lock was busy), or "".
    skipped: str = ""
    #: Nothing was changed: ``dropped`` names what would have been.
    dry_run: bool = False
    partitions: list[Partition] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "horizon": self.horizon,
            "head": self.head,
            "retention_days": self.retention_days,
            "created": self.created,
            "dropped": self.dropped,
            "held_by": self.held_by,
            "skipped": self.skipped,
            "dry_run": self.dry_run,
            "partitions": [
                {
                    "name": p.name,
                    "starts_at": p.starts_at.isoformat() if p.starts_at else None,
                    "ends_at": p.ends_at.isoformat(),
                    "rows": p.rows,
                }
                for p in self.partitions
            ],
        }


def _day(at: dt.datetime) -> dt.datetime:
    at = at.astimezone(dt.UTC)
    return dt.datetime(at.year, at.month, at.day, tzinfo=dt.UTC)


def _name(starts_at: dt.datetime) -> str:
    return f"feed_p{starts_at:%Y%m%d}"


async def feed_partitions(conn: asyncpg.Connection | asyncpg.Pool) -> list[Partition]:
    """The feed's partitions, oldest first, as the maintenance recorded them."""
    rows = await conn.fetch(
        "SELECT p.name, p.starts_at, p.ends_at, greatest(c.reltuples, 0)::bigint AS rows "
        "FROM feed_partitions p LEFT JOIN pg_class c ON c.oid = to_regclass(p.name) "
        "ORDER BY p.ends_at"
    )
    return [Partition(r["name"], r["starts_at"], r["ends_at"], r["rows"]) for r in rows]


async def maintain_feed(
    pool: asyncpg.Pool,
    *,
    retention_days: int,
    now: dt.datetime | None = None,
    dry_run: bool = False,
) -> FeedReport:
    """Create the coming days' partitions and drop the expired ones (see the module).

    ``now`` (UTC) is for tests. ``dry_run`` changes nothing: it reports the partitions that
    would be dropped and the nodes holding the rest. Raises :class:`SyncError` when the
    database fails.
    """
    now = now or dt.datetime.now(dt.UTC)
    cutoff = now - retention_days * _DAY
    report = FeedReport(horizon=0, head=0, retention_days=retention_days, dry_run=dry_run)
    async with translated("feed maintenance"), pool.acquire() as conn:
        if dry_run:
            await _drop_expired(conn, cutoff, report)
        elif not await conn.fetchval("SELECT pg_try_advisory_lock($1)", _MAINTAIN_LOCK_KEY):
            report.skipped = "another hub process is maintaining the feed"
        else:
            try:
                await conn.execute(f"SET lock_timeout = {LOCK_TIMEOUT_MS}")
                await _create_ahead(conn, now, report)
                await _drop_expired(conn, cutoff, report)
            except asyncpg.LockNotAvailableError:
                report.skipped = "the feed was busy; the next run tries again"
                log.info("feed maintenance: %s", report.skipped)
            finally:
                await conn.execute("RESET lock_timeout")
                await conn.execute("SELECT pg_advisory_unlock($1)", _MAINTAIN_LOCK_KEY)
        report.head, report.horizon = await conn.fetchrow("SELECT id, horizon FROM feed_head")
        report.partitions = await feed_partitions(conn)
    if not dry_run and (report.created or report.dropped):
        log.info(
            "feed maintenance: created %s, dropped %s; horizon %d",
            ", ".join(report.created) or "none",
            ", ".join(report.dropped) or "none",
            report.horizon,
        )
    return report


async def _create_ahead(conn: asyncpg.Connection, now: dt.datetime, report: FeedReport) -> None:
    last: dt.datetime | None = await conn.fetchval("SELECT max(ends_at) FROM feed_partitions")
    start = _day(now) if last is None else max(_day(last), _day(now) - _DAY)
    until = _day(now) + DAYS_AHEAD * _DAY
    while start < until:
        end, name = start + _DAY, _name(start)
        async with conn.transaction():
            # DDL takes no parameters: the bounds are our own datetimes, never user input.
            # A default partition holding rows of this day refuses it (and says so).
            await conn.execute(
                f"CREATE TABLE {name} PARTITION OF feed "
                f"FOR VALUES FROM ('{start.isoformat()}') TO ('{end.isoformat()}')"
            )
            await conn.execute(
                "INSERT INTO feed_partitions (name, starts_at, ends_at) VALUES ($1, $2, $3)",
                name,
                start,
                end,
            )
        report.created.append(name)
        start = end


async def _drop_expired(conn: asyncpg.Connection, cutoff: dt.datetime, report: FeedReport) -> None:
    for part in await feed_partitions(conn):
        if part.ends_at > cutoff:
            return
        async with conn.transaction():
            tops = await _tier_tops(conn, part.name)
            holders = await conn.fetch(
                "SELECT DISTINCT np.node_id FROM node_pulls np JOIN nodes n USING (node_id) "
                "JOIN unnest($1::smallint[], $2::bigint[]) AS t (tier, top) ON t.tier = np.tier "
                "WHERE n.revoked_at IS NULL AND np.pulled_at >= $3 AND np.cursor < t.top "
                "ORDER BY np.node_id",
                list(tops),
                list(tops.values()),
                cutoff,
            )
            if holders:
                report.held_by[part.name] = [r["node_id"] for r in holders]
                return
            if not report.dry_run:
                if tops:
                    await conn.execute(
                        "UPDATE feed_head SET horizon = greatest(horizon, $1)", max(tops.values())
                    )
                await conn.execute(f"DROP TABLE {part.name}")
                await conn.execute("DELETE FROM feed_partitions WHERE name = $1", part.name)
        report.dropped.append(part.name)


async def _tier_tops(conn: asyncpg.Connection, name: str) -> dict[int, int]:
    """The partition's highest id of each tier it holds (an index probe each)."""
    tops: dict[int, int] = {}
    for tier in Tier:
        top = await conn.fetchval(f"SELECT max(id) FROM {name} WHERE tier = $1", tier.priority)
        if top is not None:
            tops[tier.priority] = top
    return tops
