"""Edges sync with a real hub over real HTTP, PostgreSQL and Redis: replicas converge, replays
change nothing, long-polls wake on a push, refused changes are dead-lettered without blocking
the rest, a kill between the hub's ack and the outbox delete is repaired, a dead or lossy link
loses nothing, and a wrong token dead-letters nothing."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections import Counter
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from support.edges import (
    ALERTS,
    ARCHIVE,
    CELL,
    RESOLVERS,
    SEED,
    STOCK_CELL,
    Edge,
    edge,
    edge_rows,
    feed_count,
    hub_rows,
)
from support.servers import free_port
from syncengine import crashpoints
from syncengine.codec import encode
from syncengine.edge.link import INVALID_RESPONSE, HubLink
from syncengine.edge.outbox import OutboxBatch
from syncengine.edge.sync import BatchSizer, Syncer
from syncengine.errors import (
    AuthenticationError,
    DecodeError,
    InvalidInputError,
    LinkError,
    SequenceError,
)
from syncengine.hub.feed import rows_to_changes
from syncengine.merge import RecordState, apply_change, document_json
from syncengine.tiers import Tier

pytestmark = pytest.mark.integration


# ------------------------------------------------------------------------------ convergence


async def test_three_edges_converge_through_the_hub(hub: Any, tmp_path: Path) -> None:
    rng = random.Random(SEED)
    names = ["edge-a", "edge-b", "edge-c"]
    increments: Counter[tuple[str, str, str]] = Counter()
    writes: Counter[str] = Counter()
    async with AsyncExitStack() as stack:
        edges: dict[str, Edge] = {}
        for name in names:
            token = await hub.add_node(name, CELL)
            edges[name] = await stack.enter_async_context(
                edge(stack, tmp_path, name, hub.url, token)
            )
            assert edges[name].store.resolvers == RESOLVERS

        # A sure conflict: a and b write the same field while neither has seen the other.
        await edges["edge-a"].store.put(CELL, "visits", "shared", {"f0": "from-a"})
        await edges["edge-b"].store.put(CELL, "visits", "shared", {"f0": "from-b"})
        writes.update(["edge-a", "edge-b"])

        online = dict.fromkeys(names, True)
        rounds = 0
        for _ in range(300):
            name = rng.choice(names)
            e = edges[name]
            roll = rng.random()
            if roll < 0.08:
                online[name] = not online[name]  # an offline period starts or ends
            elif roll < 0.22:
                if online[name]:
                    report = await e.syncer.sync_once()
                    assert report.errors == (), report
                    rounds += 1
            elif roll < 0.62:
                fields = {
                    f"f{i}": rng.choice(
                        [
                            rng.randint(-5, 5),
                            f"{name}-{rng.randint(0, 99)}",
                            [1, {"x": name}],
                            None,
                            1.5,
                        ]
                    )
                    for i in sorted(rng.sample(range(5), rng.randint(1, 3)))
                }
                cell = rng.choice([CELL, CELL, ALERTS, STOCK_CELL])
                await e.store.put(cell, "visits", f"k{rng.randrange(10)}", fields)
                writes[name] += 1
            elif roll < 0.72:
                cell = rng.choice([CELL, ALERTS])
                await e.store.delete(cell, "visits", f"k{rng.randrange(10)}")
                writes[name] += 1
            else:
                cell = rng.choice([CELL, STOCK_CELL])
                key, fld, by = (
                    f"item{rng.randrange(4)}",
                    rng.choice(["qty", "used"]),
                    rng.randint(-3, 9),
                )
                await e.store.put(cell, "stock", key, {fld: by})
                increments[(cell, key, fld)] += by
                writes[name] += 1
        assert rounds > 10

        # Everyone back online: two full rounds each bring every change everywhere.
        for _ in range(2):
            for name in names:
                report = await edges[name].syncer.sync_once()
                assert report.errors == (), report
                assert report.caught_up
        for e in edges.values():
            assert await e.store.outbox.next_batch() is None
            assert await e.store.outbox.dead_letters() == []

        # The feed holds every change once.
        feed = await hub.hub.pool.fetch(
            "SELECT id, cell, collection, key, node_id, lane, seq, hlc, fields, base "
            "FROM feed ORDER BY id"
        )
        assert Counter(r["node_id"] for r in feed) == writes
        assert len({(r["node_id"], r["lane"], r["seq"]) for r in feed}) == len(feed)

        # The reference model: fold the whole feed, in the hub's order, with the merge.
        _, changes = rows_to_changes(list(feed))
        model: dict[tuple[str, str, str], RecordState] = {}
        model_conflicts = []
        for c in changes:
            rk = (c.cell, c.collection, c.key)
            applied = apply_change(
                model.get(rk), c, RESOLVERS.get(c.collection, "lww"), detect_conflicts=True
            )
            model[rk] = applied.state
            model_conflicts.extend(applied.conflicts)

        at_hub = await hub_rows(hub)
        assert set(at_hub) == set(model)
        for rk, state in model.items():
            assert at_hub[rk][0] == state.to_bytes(), rk
            doc = state.document()
            assert at_hub[rk][1] == (doc or None), rk
        for name, e in edges.items():
            local = edge_rows(e.store.path)
            assert set(local) == set(model), name
            for rk, state in model.items():
                blob, doc_text = local[rk]
                assert blob == at_hub[rk][0], (name, rk)  # byte-identical replicas
                doc = state.document()
                assert doc_text == (document_json(doc) if doc else None), (name, rk)

        # Counters: the sum of every increment made anywhere.
        for (cell, key, fld), total in increments.items():
            assert at_hub[(cell, "stock", key)][1][fld] == total
            for e in edges.values():
                assert (await e.store.get(cell, "stock", key) or {})[fld] == total

        # No silent loss: the hub's conflict log is exactly what the merge reports, and
        # every loser value was really written by its loser node.
        rows = await hub.hub.pool.fetch("SELECT * FROM conflicts ORDER BY id")
        assert rows, "concurrent offline edits must leave conflicts"

        def as_key(
            cell: str, coll: str, key: str, fld: str, wn: str, wh: int, ln: str, lh: int, lv: Any
        ) -> tuple[Any, ...]:
            return (cell, coll, key, fld, wn, wh, ln, lh, json.dumps(lv, sort_keys=True))

        logged = Counter(
            as_key(
                r["cell"],
                r["collection"],
                r["key"],
                r["field"],
                r["winner_node"],
                r["winner_hlc"],
                r["loser_node"],
                r["loser_hlc"],
                None if r["loser_value"] is None else json.loads(r["loser_value"]),
            )
            for r in rows
        )
        expected = Counter(
            as_key(
                k.cell,
                k.collection,
                k.key,
                k.field,
                k.winner_node,
                k.winner_hlc,
                k.loser_node,
                k.loser_hlc,
                k.loser_value,
            )
            for k in model_conflicts
        )
        assert logged == expected
        written = {(c.node, c.hlc): c for c in changes}
        for r in rows:
            source = written[(r["loser_node"], r["loser_hlc"])]
            assert source.fields is not None
            loser_value = None if r["loser_value"] is None else json.loads(r["loser_value"])
            assert json.dumps(source.fields[r["field"]], sort_keys=True) == json.dumps(
                loser_value, sort_keys=True
            )
        shared = [
            r
            for r in rows
            if r["key"] == "shared"
            and r["field"] == "f0"
            and r["cell"] == CELL
            and r["collection"] == "visits"
        ]
        assert shared and {shared[0]["loser_node"], shared[0]["winner_node"]} <= set(names)


# ---------------------------------------------------------------------------------- replay


async def test_replayed_and_reordered_batches_apply_once(hub: Any, tmp_path: Path) -> None:
    token = await hub.add_node("edge-r", CELL)
    async with AsyncExitStack() as stack:
        e = await stack.enter_async_context(edge(stack, tmp_path, "edge-r", hub.url, token))
        for i in range(6):
            await e.store.put(CELL, "visits", f"k{i}", {"f0": i})
        for i in range(4):
            await e.store.put(CELL, "stock", "item", {"qty": i + 1})
        whole = await e.store.outbox.next_batch(limit=100, lanes=[2])
        head = await e.store.outbox.next_batch(limit=4, lanes=[2])
        assert whole is not None and head is not None
        assert (whole.first_seq, whole.last_seq, head.last_seq) == (1, 10, 4)

        # The tail before the head: the hub refuses the gap and applies nothing.
        tail = OutboxBatch(lane=2, first_seq=5, last_seq=10, changes=whole.changes[4:], skipped=[])
        with pytest.raises(SequenceError) as gap:
            await e.link.push(tail)
        assert gap.value.code == "seq_gap"
        assert await feed_count(hub) == 0

        answers = [await e.link.push(b) for b in (head, whole, head, whole, whole)]
        assert [a.acked for a in answers] == [4, 10, 10, 10, 10]
        assert [a.applied for a in answers] == [4, 6, 0, 0, 0]
        assert e.link.hub_hlc is not None and e.link.hub_hlc >= answers[0].hub_hlc

        # Acked only now; a push_lane re-sending nothing new changes nothing either.
        assert await e.store.outbox.ack(2, answers[-1].acked) == 10
        assert await e.syncer.push_lane(2) == 0
        assert await feed_count(hub) == 10
        assert (
            await hub.hub.pool.fetchval("SELECT count(DISTINCT (node_id, lane, seq)) FROM feed")
            == 10
        )
        assert (await hub_rows(hub))[(CELL, "stock", "item")][1] == {"qty": 10}


# -------------------------------------------------------------------------------- long-poll


async def test_long_poll_returns_as_soon_as_a_change_lands(hub: Any, tmp_path: Path) -> None:
    tokens = {n: await hub.add_node(n, CELL) for n in ("edge-l1", "edge-l2")}
    async with AsyncExitStack() as stack:
        writer, waiter = [
            await stack.enter_async_context(edge(stack, tmp_path, n, hub.url, t))
            for n, t in tokens.items()
        ]
        started = time.monotonic()
        async with asyncio.TaskGroup() as group:
            polled = group.create_task(waiter.syncer.pull_tier(Tier.CRITICAL, wait_s=20))
            await asyncio.sleep(0.3)
            await writer.store.put(ALERTS, "visits", "a1", {"f0": "fire"})
            assert await writer.syncer.push_lane(Tier.CRITICAL.priority) == 1
        assert polled.result() == 1
        assert time.monotonic() - started < 10
        assert await waiter.store.get(ALERTS, "visits", "a1") == {"f0": "fire"}
        assert await waiter.store.cursor("pull:critical") == 1


async def test_a_long_poll_sleeps_through_pushes_to_cells_it_does_not_read(
    hub_factory: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A region's thousand edges each hold a long-poll: a push wakes only the polls whose
    prefixes cover a cell it wrote, not every poll of its tier (each woken poll re-reads the
    feed). Pushes to another clinic leave the poll asleep; one to its own cell wakes it."""
    other = "west/ng/lagos/clinic-7"
    hub = await hub_factory(
        tier_rules=[
            {"prefix": f"{CELL}/alerts", "tier": "critical"},
            {"prefix": f"{other}/alerts", "tier": "critical"},
        ]
    )
    tokens = {"edge-w1": await hub.add_node("edge-w1", CELL)}
    tokens["edge-w2"] = await hub.add_node("edge-w2", "west/ng/lagos")
    reads: list[str] = []
    real_read = hub.hub._read_page

    async def counted(node_id: str, *args: Any) -> Any:
        reads.append(node_id)
        return await real_read(node_id, *args)

    monkeypatch.setattr(hub.hub, "_read_page", counted)
    async with AsyncExitStack() as stack:
        waiter = await stack.enter_async_context(
            edge(stack, tmp_path, "edge-w1", hub.url, tokens["edge-w1"])
        )
        writer = await stack.enter_async_context(
            edge(
                stack,
                tmp_path,
                "edge-w2",
                hub.url,
                tokens["edge-w2"],
                subscriptions=["west/ng/lagos"],
            )
        )
        async with asyncio.TaskGroup() as group:
            polled = group.create_task(waiter.syncer.pull_tier(Tier.CRITICAL, wait_s=20))
            await asyncio.sleep(0.3)
            for i in range(10):
                await writer.store.put(f"{other}/alerts", "visits", f"o{i}", {"f0": i})
                assert await writer.syncer.push_lane(Tier.CRITICAL.priority) == 1
            await asyncio.sleep(0.3)
            asleep_reads = reads.count("edge-w1")
            started = time.monotonic()
            await writer.store.put(ALERTS, "visits", "mine", {"f0": "fire"})
            assert await writer.syncer.push_lane(Tier.CRITICAL.priority) == 1
        assert polled.result() == 1
        assert time.monotonic() - started < 5
        # One read when the poll arrived, none for the ten pushes elsewhere (a periodic
        # re-read may fall in: RECHECK_S), one when its own cell changed.
        assert asleep_reads <= 2, reads
        assert await waiter.store.get(ALERTS, "visits", "mine") == {"f0": "fire"}


async def test_a_long_poll_watches_other_tiers_and_carries_the_config_tag(
    hub: Any, tmp_path: Path
) -> None:
    tokens = {n: await hub.add_node(n, CELL) for n in ("edge-w1", "edge-w2")}
    async with AsyncExitStack() as stack:
        writer, waiter = [
            await stack.enter_async_context(edge(stack, tmp_path, n, hub.url, t))
            for n, t in tokens.items()
        ]
        # A change of another node's cell in the watched tier moves its cursor, no pull.
        other = await hub.add_node("edge-w3", "west/ng/lagos/clinic-7")
        async with edge(stack, tmp_path, "edge-w3", hub.url, other) as e3:
            await e3.store.put("west/ng/lagos/clinic-7/stock", "stock", "x", {"qty": 1})
            await e3.syncer.push_lane(Tier.STANDARD.priority)
        idle = await waiter.syncer.live_pull(Tier.CRITICAL, wait_s=0.5, watch=[Tier.STANDARD])
        assert idle.applied == 0 and idle.due == frozenset()
        assert idle.covered == {Tier.STANDARD}
        head = await hub.hub.pool.fetchval("SELECT id FROM feed_head")
        assert await waiter.store.cursor("pull:standard") == head

        # A change for it ends the long-poll early and names the tier due.
        started = time.monotonic()
        async with asyncio.TaskGroup() as group:
            polled = group.create_task(
                waiter.syncer.live_pull(Tier.CRITICAL, wait_s=20, watch=[Tier.STANDARD])
            )
            await asyncio.sleep(0.3)
            await writer.store.put(CELL, "visits", "v1", {"f0": 1})
            assert await writer.syncer.push_lane(Tier.STANDARD.priority) == 1
        assert polled.result().due == {Tier.STANDARD} and polled.result().covered == set()
        assert time.monotonic() - started < 10
        assert await waiter.store.cursor("pull:standard") == head  # the pull is the daemon's

        # The page carries the hub's config tag; a page with another makes the edge relearn.
        page = await waiter.link.pull(
            tier=Tier.CRITICAL, prefixes=[CELL], after=0, limit=10, tag="old"
        )
        assert page.cfg == hub.hub.config_tag and page.watched == {} and page.due == []
        with pytest.raises(InvalidInputError) as bad:
            await waiter.link._call(
                "GET",
                "v1/pull",
                timeout_s=5,
                params=[("tier", "critical"), ("watch", "important"), ("prefix", CELL)],
            )
        assert bad.value.code == "invalid_param" and "TIER:CURSOR" in bad.value.message


async def test_a_batch_that_overtakes_the_one_before_it_waits_for_it(
    hub: Any, tmp_path: Path
) -> None:
    token = await hub.add_node("edge-p", CELL)
    async with AsyncExitStack() as stack:
        e = await stack.enter_async_context(edge(stack, tmp_path, "edge-p", hub.url, token))
        for i in range(4):
            await e.store.put(CELL, "visits", f"k{i}", {"n": i})
        first = await e.store.outbox.next_batch(limit=2)
        assert first is not None
        second = await e.store.outbox.next_batch(limit=2, after={first.lane: first.last_seq})
        assert second is not None and second.first_seq == first.last_seq + 1
        # The second arrives first: the hub holds it until the first has been applied.
        later = asyncio.ensure_future(e.link.push(second))
        await asyncio.sleep(0.3)
        assert not later.done()
        assert (await e.link.push(first)).acked == first.last_seq
        assert (await later).acked == second.last_seq
        assert await feed_count(hub) == 4
        # The feed holds them in seq order.
        seqs = await hub.hub.pool.fetch("SELECT seq FROM feed ORDER BY id")
        assert [r["seq"] for r in seqs] == [1, 2, 3, 4]


# ----------------------------------------------------------------------------- dead letters


async def test_refused_changes_are_dead_lettered_and_block_nothing(
    hub: Any, tmp_path: Path
) -> None:
    token = await hub.add_node("edge-d", CELL)  # clinic-12 only
    skew = [0]

    def wall() -> int:
        return time.time_ns() // 1_000_000 + skew[0]

    async with AsyncExitStack() as stack:
        e = await stack.enter_async_context(
            edge(stack, tmp_path, "edge-d", hub.url, token, wall=wall)
        )
        store = e.store
        await store.put(CELL, "visits", "ok1", {"f0": 1})
        await store.put("west/ng/lagos/clinic-13", "visits", "stray", {"f0": 1})  # no grant
        await store.put(CELL, "visits", "ok2", {"f0": 2})
        await store.put(ALERTS, "visits", "alert1", {"f0": 3})
        await store.put(ARCHIVE, "visits", "old1", {"f0": 4})
        await store.put(CELL, "visits", "ok3", {"f0": 5})
        # The clock jumps an hour ahead: the hub refuses these (and, HLC being monotonic,
        # would refuse anything written after them too).
        skew[0] = 3_600_000
        await store.put(CELL, "visits", "fut1", {"f0": 6})
        await store.put(ALERTS, "visits", "fut2", {"f0": 7})
        await store.put(CELL, "visits", "fut3", {"f0": 8})

        report = await e.syncer.sync_once()
        assert report.errors == ()
        assert report.dead_lettered == 4
        assert report.caught_up
        assert report.pushed[Tier.CRITICAL] == 1 and report.pushed[Tier.STANDARD] == 3
        assert report.pushed[Tier.ARCHIVE] == 1
        dead = {d.key: d for d in await store.outbox.dead_letters()}
        assert {k: d.code for k, d in dead.items()} == {
            "stray": "not_granted",
            "fut1": "clock_drift",
            "fut2": "clock_drift",
            "fut3": "clock_drift",
        }
        assert dead["fut1"].detail["seq"] == dead["fut1"].seq
        assert dead["stray"].fields == {"f0": 1}

        at_hub = await hub_rows(hub)
        assert {k for (_, _, k) in at_hub} == {"ok1", "ok2", "ok3", "alert1", "old1"}
        # The hub knows the dead-lettered seqs were skipped, not lost: every lane is acked
        # through the last seq the store issued.
        acked = {
            r["lane"]: r["acked_seq"]
            for r in await hub.hub.pool.fetch(
                "SELECT lane, acked_seq FROM node_lanes WHERE node_id = 'edge-d'"
            )
        }
        issued = {
            s.tier.priority: s.next_seq - 1 for s in await store.outbox.status() if s.next_seq > 1
        }
        assert acked == issued
        again = await e.syncer.sync_once()
        assert again.dead_lettered == 0 and again.caught_up


async def test_refusal_naming_no_change_is_bisected(hub_factory: Any, tmp_path: Path) -> None:
    # A 1 KiB body limit: a batch of these records is refused whole (413, no seq).
    hub = await hub_factory(max_body_bytes=1024)
    token = await hub.add_node("edge-s", CELL)
    rng = random.Random(SEED)
    async with AsyncExitStack() as stack:
        e = await stack.enter_async_context(edge(stack, tmp_path, "edge-s", hub.url, token))
        for i in range(10):
            big = 3000 if i == 6 else 300  # the 7th alone cannot fit
            await e.store.put(CELL, "visits", f"k{i}", {"blob": rng.randbytes(big // 2).hex()})
        report = await e.syncer.sync_once(tiers=[Tier.STANDARD])
        assert report.errors == ()
        assert report.pushed[Tier.STANDARD] == 9 and report.dead_lettered == 1
        (dead,) = await e.store.outbox.dead_letters()
        assert (dead.key, dead.code) == ("k6", "body_too_large")
        assert {k for (_, _, k) in await hub_rows(hub)} == {f"k{i}" for i in range(10)} - {"k6"}


async def test_batch_limit_of_the_hub_is_adopted(hub_factory: Any, tmp_path: Path) -> None:
    hub = await hub_factory(max_batch_changes=4)
    token = await hub.add_node("edge-m", CELL)
    async with AsyncExitStack() as stack:
        # Not told the limit by /v1/config: learns it from the 413.
        e = await stack.enter_async_context(
            edge(stack, tmp_path, "edge-m", hub.url, token, learn=False)
        )
        for i in range(10):
            await e.store.put(CELL, "visits", f"k{i}", {"f0": i})
        assert await e.syncer.push_lane(2) == 10
        assert e.syncer.sizer.ceiling == 4
        assert await e.store.outbox.dead_letters() == []
        assert await feed_count(hub) == 10


# ---------------------------------------------------------------------------- crash points


class Killed(BaseException):
    """Stands for SIGKILL at a crash point: nothing after it runs, so what is on disk (and
    at the hub) is what a killed process leaves."""


@pytest.mark.parametrize(
    "point", ["push.after_send_before_response", "push.after_ack_before_outbox_delete"]
)
async def test_killed_between_hub_ack_and_outbox_delete_the_next_run_repairs(
    hub: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, point: str
) -> None:
    fired: list[str] = []

    def crashpoint(name: str) -> None:
        if name.startswith("push."):  # the edge's sync points, not the store's or hub's
            fired.append(name)
        if name == point and fired.count(name) == 1:
            raise Killed(name)

    monkeypatch.setattr(crashpoints, "crashpoint", crashpoint)
    token = await hub.add_node("edge-k", CELL)
    async with AsyncExitStack() as stack:
        e = await stack.enter_async_context(edge(stack, tmp_path, "edge-k", hub.url, token))
        for i in range(4):
            await e.store.put(CELL, "stock", "item", {"qty": i + 1})
        with pytest.raises(Killed):
            await e.syncer.push_lane(2)
        assert await feed_count(hub) == 4  # the hub applied it; the edge never deleted
        assert (await e.store.outbox.status())[2].depth == 4

        # "Restarted": a fresh syncer over the same file re-sends; the hub dedups.
        fresh = Syncer(e.store, e.link, subscriptions=[CELL])
        report = await fresh.sync_once()
        assert report.errors == () and report.caught_up
        assert await feed_count(hub) == 4
        assert (await hub_rows(hub))[(CELL, "stock", "item")][1] == {"qty": 10}
        order = ["push.after_send_before_response", "push.after_ack_before_outbox_delete"]
        upto = order.index(point) + 1
        assert fired[:upto] == order[:upto]


# ------------------------------------------------------------------------------- link faults


async def test_unreachable_hub_is_reported_quickly_and_loses_nothing(tmp_path: Path) -> None:
    async with AsyncExitStack() as stack:
        url = f"http://127.0.0.1:{free_port()}"  # nobody listens
        e = await stack.enter_async_context(
            edge(stack, tmp_path, "edge-x", url, "se1_not-needed", learn=False)
        )
        for i in range(5):
            await e.store.put(CELL, "visits", f"k{i}", {"f0": i})
        started = time.monotonic()
        report = await e.syncer.sync_once()
        elapsed = time.monotonic() - started
        assert elapsed < 10, elapsed  # 4 attempts, backoff <= 0.5 + 1 + 2 s
        assert [(r.step, r.tier, r.code) for r in report.errors] == [
            ("config", None, "link_error"),
            ("push", Tier.STANDARD, "link_error"),
        ]
        assert not report.caught_up and report.pulled == dict.fromkeys(Tier, 0)
        batch = await e.store.outbox.next_batch()
        assert batch is not None and len(batch.changes) == 5
        with pytest.raises(LinkError):
            await e.link.push(batch)


async def test_lost_push_answer_is_retried_and_deduplicated(
    hub: Any, fault_proxy: Any, tmp_path: Path
) -> None:
    token = await hub.add_node("edge-p", CELL)
    proxy = await fault_proxy("127.0.0.1", hub.config.listen_port, seed=SEED)
    async with AsyncExitStack() as stack:
        # attempts=1: the lost answer ends the call; the next round must repair it.
        e = await stack.enter_async_context(
            edge(stack, tmp_path, "edge-p", f"http://127.0.0.1:{proxy.port}", token, attempts=1)
        )
        for i in range(5):
            await e.store.put(CELL, "visits", f"k{i}", {"f0": i})
        await e.store.put(CELL, "stock", "item", {"qty": 7})
        proxy.drop_response(times=1)
        with pytest.raises(LinkError):
            await e.syncer.push_lane(2)
        assert proxy.stats.faults["drop_response"] == 1
        assert await feed_count(hub) == 6  # it landed; the edge does not know
        assert (await e.store.outbox.status())[2].depth == 6

        report = await e.syncer.sync_once()
        assert report.errors == () and report.caught_up
        assert report.pushed[Tier.STANDARD] == 6
        assert await feed_count(hub) == 6
        assert (await hub_rows(hub))[(CELL, "stock", "item")][1] == {"qty": 7}

        # And with retries inside the call (the default), one lost answer is invisible.
        await e.store.put(CELL, "visits", "k9", {"f0": 9})
        e.syncer.attempts = 4
        proxy.drop_response(times=1)
        assert await e.syncer.push_lane(2) == 1
        assert await feed_count(hub) == 7


async def test_wrong_token_dead_letters_nothing(
    hub: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    await hub.add_node("edge-w", CELL)
    wrong = "se1_" + "x" * 43
    caplog.set_level(logging.DEBUG, logger="syncengine")
    async with AsyncExitStack() as stack:
        e = await stack.enter_async_context(
            edge(stack, tmp_path, "edge-w", hub.url, wrong, learn=False)
        )
        for i in range(3):
            await e.store.put(CELL, "visits", f"k{i}", {"f0": i})
        with pytest.raises(AuthenticationError) as info:
            await e.syncer.sync_once()
        assert info.value.code == "invalid_token"
        with pytest.raises(AuthenticationError):
            await e.syncer.push_lane(2)
        with pytest.raises(AuthenticationError):
            await e.syncer.pull_tier(Tier.STANDARD)
        assert await e.store.outbox.dead_letters() == []
        assert (await e.store.outbox.status())[2].depth == 3
        assert await feed_count(hub) == 0
        assert wrong not in str(info.value) and wrong not in repr(e.link)
        assert wrong not in caplog.text


# ----------------------------------------------------------------- answers not from a hub


async def test_answers_that_are_not_the_hubs_are_never_rejections(tmp_path: Path) -> None:
    """A garbled 200 is retried (the push may have landed), a 404 page from something that
    is not a hub is a link problem: neither dead-letters anything."""

    async def garbage(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(
            body=b"\xc1not msgpack",
            content_type="application/msgpack",
            headers={"X-Hub-HLC": str(12345 << 16)},
        )

    async def config(request: web.Request) -> web.Response:  # sound, so pushes go ahead
        body = encode({"tier_rules": [], "resolvers": {}, "acked": [0, 0, 0, 0]})
        return web.Response(body=body, content_type="application/msgpack")

    app = web.Application()
    app.router.add_get("/garbled/v1/config", config)
    app.router.add_post("/garbled/v1/push", garbage)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    sleeps: list[float] = []

    async def no_sleep(s: float) -> None:
        sleeps.append(s)
        await asyncio.sleep(0)

    try:
        async with AsyncExitStack() as stack:
            e = await stack.enter_async_context(
                edge(
                    stack,
                    tmp_path,
                    "edge-g",
                    f"http://127.0.0.1:{port}/garbled",
                    "se1_t",
                    learn=False,
                    sleep=no_sleep,
                )
            )
            await e.store.put(CELL, "visits", "k", {"f0": 1})
            with pytest.raises(DecodeError) as info:
                await e.syncer.push_lane(2)
            assert info.value.code == INVALID_RESPONSE
            assert len(sleeps) == 3  # 4 attempts
            assert e.link.hub_hlc == 12345 << 16
            assert e.link.bytes_sent > 0 and e.link.bytes_received > 0

            # A wrong hub_url: whatever answers there is not a hub.
            elsewhere = await stack.enter_async_context(
                HubLink(f"http://127.0.0.1:{port}/elsewhere", "se1_t", node_id="edge-g")
            )
            syncer = Syncer(e.store, elsewhere, subscriptions=[CELL], sleep=no_sleep)
            with pytest.raises(LinkError) as wrong:
                await syncer.push_lane(2)
            assert wrong.value.code == "unexpected_response"
            assert wrong.value.detail["http_status"] == 404
            assert await e.store.outbox.dead_letters() == []
            assert (await e.store.outbox.status())[2].depth == 1
    finally:
        await runner.cleanup()


async def test_a_push_cancelled_while_reading_the_next_batch_leaves_nothing_running(
    hub: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lane's push is cancelled (its caller timed out, the daemon stops) while it reads the
    batch behind the one in flight. The request in flight is stopped with it, not left to run
    outside the lane's turn with an error no one reads; the next push sends what is left,
    once."""
    token = await hub.add_node("edge-c", CELL)
    async with AsyncExitStack() as stack:
        e = await stack.enter_async_context(
            edge(stack, tmp_path, "edge-c", hub.url, token, sizer=BatchSizer(start=10))
        )
        for i in range(50):
            await e.store.put(CELL, "visits", f"k{i}", {"f0": i})
        reading_ahead = asyncio.Event()
        real_next_batch = e.store.outbox.next_batch

        async def slow_read_ahead(**kw: Any) -> OutboxBatch | None:
            if kw.get("after"):
                reading_ahead.set()
                await asyncio.sleep(30)
            return await real_next_batch(**kw)

        monkeypatch.setattr(e.store.outbox, "next_batch", slow_read_ahead)
        push = asyncio.create_task(e.syncer.push_lane(Tier.STANDARD.priority))
        await asyncio.wait_for(reading_ahead.wait(), 10)
        push.cancel()
        with pytest.raises(asyncio.CancelledError):
            await push
        left = [
            t
            for t in asyncio.all_tasks()
            if getattr(t.get_coro(), "__qualname__", "") == "HubLink.push" and not t.done()
        ]
        assert left == []
        monkeypatch.undo()
        assert await e.syncer.push_lane(Tier.STANDARD.priority) > 0
        assert (await e.store.outbox.status())[Tier.STANDARD.priority].depth == 0
        assert await feed_count(hub) == 50
