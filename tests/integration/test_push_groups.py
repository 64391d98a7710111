"""Group commit on the hub: pushes that queue together apply in one PostgreSQL transaction,
and each batch of a group is still decided on its own (real PostgreSQL and Redis)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import pytest

from syncengine.errors import ForbiddenError, HubUnavailableError, SequenceError
from syncengine.hub import push
from syncengine.hub.nodes import Node, authenticate
from syncengine.merge import DEFAULT_RESOLVER, Change, RecordState, apply_change
from syncengine.protocol import PushBatch

CELL = "west/ng/lagos/clinic-12/visits"
STANDARD = 2


def _batch(node: str, first: int, last: int, *, key: str = "k", cell: str = CELL) -> PushBatch:
    now = (time.time_ns() // 1_000_000) << 16
    return PushBatch(
        node=node,
        lane=STANDARD,
        first_seq=first,
        last_seq=last,
        changes=[
            Change(
                cell=cell,
                collection="visits",
                key=f"{key}-{seq}",
                hlc=now + seq,
                node=node,
                fields={"n": seq},
                lane=STANDARD,
                seq=seq,
            )
            for seq in range(first, last + 1)
        ],
    )


async def _nodes(hub: Any, *names: str, grants: tuple[str, ...] = ()) -> dict[str, Node]:
    out = {}
    for name in names:
        token = await hub.add_node(name, *grants)
        out[name] = await authenticate(hub.hub.pool, token)
    return out


def _applier(
    hub: Any,
    groups: list[int],
    after_commit: Callable[[list[push.AppliedBatch]], Awaitable[None]] | None = None,
) -> push.Applier:
    return push.Applier(
        hub.hub.pool,
        region=hub.config.region,
        clock=hub.hub.clock,
        tier_rules=hub.config.tier_rules,
        resolvers=hub.hub.resolvers,
        after_commit=after_commit,
        on_group=groups.append,
    )


async def _feed(pool: asyncpg.Pool) -> list[asyncpg.Record]:
    return await pool.fetch("SELECT id, node_id, seq FROM feed ORDER BY id")


async def test_pushes_queued_together_commit_as_one_group_with_contiguous_feed_ids(
    hub: Any,
) -> None:
    nodes = await _nodes(hub, *(f"n{i}" for i in range(20)))
    groups: list[int] = []
    async with _applier(hub, groups) as applier:
        results = await asyncio.gather(
            *(
                push.apply_push(applier, node, _batch(name, 1, 5, key=name))
                for name, node in nodes.items()
            )
        )
    assert groups == [20]
    assert [(r.answer.acked, r.answer.applied) for r in results] == [(5, 5)] * 20
    feed = await _feed(hub.hub.pool)
    assert [r["id"] for r in feed] == list(range(1, 101))
    # Each batch's feed ids are its own contiguous run, and its answer names them.
    for name, result in zip(nodes, results, strict=True):
        mine = [r for r in feed if r["node_id"] == name]
        assert [r["id"] for r in mine] == list(range(result.first_id, result.last_id + 1))
        assert [r["seq"] for r in mine] == [1, 2, 3, 4, 5]
        assert [row[0] for row in result.feed_rows] == [r["id"] for r in mine]
    acked = await hub.hub.pool.fetch("SELECT acked_seq FROM node_lanes")
    assert sorted(r["acked_seq"] for r in acked) == [5] * 20
    assert await hub.hub.pool.fetchval("SELECT count(*) FROM records") == 100


async def test_a_refused_batch_fails_alone_and_the_rest_of_its_group_commits(
    hub: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(push, "GAP_WAIT_S", 0.1)
    nodes = await _nodes(hub, "good-1", "good-2", "gappy")
    nodes |= await _nodes(hub, "narrow", grants=("west/ng/abuja",))
    groups: list[int] = []
    async with _applier(hub, groups) as applier:
        results = await asyncio.gather(
            push.apply_push(applier, nodes["good-1"], _batch("good-1", 1, 3)),
            push.apply_push(applier, nodes["narrow"], _batch("narrow", 1, 3)),
            push.apply_push(applier, nodes["gappy"], _batch("gappy", 4, 6)),
            push.apply_push(applier, nodes["good-2"], _batch("good-2", 1, 3)),
            return_exceptions=True,
        )
    good_1, narrow, gappy, good_2 = results
    assert isinstance(narrow, ForbiddenError) and narrow.detail["seq"] == 1
    assert isinstance(gappy, SequenceError) and gappy.detail["acked"] == 0
    assert isinstance(good_1, push.AppliedBatch) and good_1.answer.applied == 3
    assert isinstance(good_2, push.AppliedBatch) and good_2.answer.applied == 3
    assert groups[0] == 4  # all four went in one transaction
    feed = await _feed(hub.hub.pool)
    assert sorted({r["node_id"] for r in feed}) == ["good-1", "good-2"]
    assert [r["id"] for r in feed] == list(range(1, 7))  # no hole where the refused were
    # A refused batch changes nothing, not even its lane's row.
    lanes = await hub.hub.pool.fetch("SELECT node_id, acked_seq FROM node_lanes ORDER BY 1")
    assert [(r["node_id"], r["acked_seq"]) for r in lanes] == [("good-1", 3), ("good-2", 3)]


async def test_pipelined_batches_of_a_lane_queued_out_of_order_apply_in_one_group(
    hub: Any,
) -> None:
    nodes = await _nodes(hub, "edge")
    groups: list[int] = []
    second = _batch("edge", 6, 10)
    announced: list[list[push.AppliedBatch]] = []

    async def after_commit(applied: list[push.AppliedBatch]) -> None:
        announced.append(applied)

    async with _applier(hub, groups) as applier:
        applier.after_commit = after_commit
        later, earlier = await asyncio.gather(
            push.apply_push(applier, nodes["edge"], second),
            push.apply_push(applier, nodes["edge"], _batch("edge", 1, 5)),
        )
    assert groups == [2]  # the later batch did not wait out a gap for a second group
    assert (earlier.answer.acked, later.answer.acked) == (5, 10)
    assert [r["seq"] for r in await _feed(hub.hub.pool)] == list(range(1, 11))
    # Announced (cached) in feed order, not in the order they queued: the cache keeps a
    # group's rows as one ascending run, and a reader skips ids that come out of order.
    (applied,) = announced
    assert [row[0] for batch in applied for row in batch.feed_rows] == list(range(1, 11))
    # The lane's acknowledged seq is the later batch's end, whatever order they went in.
    assert await hub.hub.pool.fetchval("SELECT acked_seq FROM node_lanes") == 10
    again = await push.apply_push(_applier(hub, []), nodes["edge"], second)
    assert (again.answer.applied, again.answer.acked) == (0, 10)  # a replay, not re-applied


async def test_a_replay_in_the_same_group_applies_once_and_a_reused_seq_is_refused(
    hub: Any,
) -> None:
    nodes = await _nodes(hub, "edge")
    batch = _batch("edge", 1, 5)
    groups: list[int] = []
    async with _applier(hub, groups) as applier:
        first, again = await asyncio.gather(
            push.apply_push(applier, nodes["edge"], batch),
            push.apply_push(applier, nodes["edge"], batch),
        )
        # Same seqs, other changes (another hlc): an older copy of the store, not a replay.
        await asyncio.sleep(0.002)
        with pytest.raises(SequenceError) as refused:
            await push.apply_push(applier, nodes["edge"], _batch("edge", 1, 5, key="other"))
    assert groups[0] == 2
    assert sorted([first.answer.applied, again.answer.applied]) == [0, 5]
    assert first.answer.acked == again.answer.acked == 5
    assert refused.value.code == "seq_reused"
    assert len(await _feed(hub.hub.pool)) == 5


async def test_a_group_that_fails_is_applied_again_batch_by_batch(
    hub: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failure the batches cannot be told apart by (a bug, a value PostgreSQL refuses)
    costs only the batch at fault."""
    real_append = push._append_feed

    async def append(conn: asyncpg.Connection, rows: list[list[Any]]) -> None:
        if any(str(row[4]).startswith("poison") for row in rows):
            raise RuntimeError("injected: PostgreSQL refused a value")
        await real_append(conn, rows)

    monkeypatch.setattr(push, "_append_feed", append)
    nodes = await _nodes(hub, *(f"n{i}" for i in range(5)))
    groups: list[int] = []
    async with _applier(hub, groups) as applier:
        results = await asyncio.gather(
            *(
                push.apply_push(
                    applier, node, _batch(name, 1, 2, key="poison" if name == "n2" else "k")
                )
                for name, node in nodes.items()
            ),
            return_exceptions=True,
        )
    assert groups == [5]
    assert isinstance(results[2], RuntimeError)
    assert all(isinstance(r, push.AppliedBatch) for i, r in enumerate(results) if i != 2)
    feed = await _feed(hub.hub.pool)
    assert sorted({r["node_id"] for r in feed}) == ["n0", "n1", "n3", "n4"]
    assert len(feed) == 8


async def test_a_closed_applier_refuses_batches_with_a_retryable_error(hub: Any) -> None:
    nodes = await _nodes(hub, "edge")
    applier = _applier(hub, [])
    await applier.close()
    with pytest.raises(HubUnavailableError) as refused:
        await push.apply_push(applier, nodes["edge"], _batch("edge", 1, 1))
    assert refused.value.http_status == 503  # the edge keeps the batch and retries
    assert await hub.hub.pool.fetchval("SELECT count(*) FROM feed") == 0


async def test_critical_batches_go_in_the_next_group_before_earlier_standard_ones(
    hub: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(push, "MAX_GROUP_BATCHES", 2)
    nodes = await _nodes(hub, *(f"n{i}" for i in range(4)))
    critical = _batch("n3", 1, 1, cell="west/ng/lagos/clinic-12/alerts")
    critical = PushBatch(
        node="n3",
        lane=0,
        first_seq=1,
        last_seq=1,
        changes=[Change(**{**_fields(critical.changes[0]), "lane": 0})],
    )
    groups: list[int] = []
    async with _applier(hub, groups) as applier:
        await asyncio.gather(
            *(push.apply_push(applier, nodes[f"n{i}"], _batch(f"n{i}", 1, 1)) for i in range(3)),
            push.apply_push(applier, nodes["n3"], critical),
        )
    feed = await _feed(hub.hub.pool)
    assert groups == [2, 2]
    assert feed[0]["node_id"] == "n3"  # queued last, applied in the first group


def _fields(change: Change) -> dict[str, Any]:
    return {name: getattr(change, name) for name in Change.__dataclass_fields__}


async def test_a_large_batch_writes_new_and_held_records_alike(hub: Any) -> None:
    """A batch of at least ``COPY_RECORDS_FROM`` records COPYs the new ones straight into
    ``records`` and upserts the ones the hub had: both must read back as the merge made them."""
    nodes = await _nodes(hub, "big")
    size = push.COPY_RECORDS_FROM
    async with _applier(hub, []) as applier:
        await push.apply_push(applier, nodes["big"], _batch("big", 1, size))
        # Half rewrite records the first batch made ("k-1".."k-50" take n = 101..150),
        # half are new: "k" keys are per seq, so reuse the first batch's key numbers.
        second = _batch("big", size + 1, 2 * size)
        rekeyed = [
            dataclasses.replace(c, key=f"k-{c.seq - size}") if c.seq <= size + size // 2 else c
            for c in second.changes
        ]
        second = PushBatch(
            node="big", lane=STANDARD, first_seq=size + 1, last_seq=2 * size, changes=rekeyed
        )
        result = await push.apply_push(applier, nodes["big"], second)
    assert result.answer.applied == size
    rows = await hub.hub.pool.fetch(
        "SELECT key, doc, feed_id, deleted FROM records WHERE cell = $1", CELL
    )
    by_key = {r["key"]: r for r in rows}
    assert len(by_key) == size + size // 2  # 100 from the first batch, 50 new
    feed_of = {
        (r["key"], r["seq"]): r["id"]
        for r in await hub.hub.pool.fetch("SELECT id, key, seq FROM feed WHERE node_id = 'big'")
    }
    for n in range(1, size + 1):
        rewritten = n <= size // 2
        seq = n + size if rewritten else n
        row = by_key[f"k-{n}"]
        assert row["doc"] == f'{{"n": {seq}}}', (n, row["doc"])
        assert row["feed_id"] == feed_of[(f"k-{n}", seq)]
        assert row["deleted"] is False
    for seq in range(size + size // 2 + 1, 2 * size + 1):
        row = by_key[f"k-{seq}"]
        assert row["doc"] == f'{{"n": {seq}}}'
        assert row["feed_id"] == feed_of[(f"k-{seq}", seq)]


@pytest.mark.parametrize(
    ("large_from", "budget"),
    [(1, push.GUESS_BUDGET), (1, 0), (push.LARGE_FROM, push.GUESS_BUDGET)],
    ids=["guesses", "over-budget", "small-batches"],
)
async def test_a_group_writes_records_as_its_changes_merged_one_by_one(
    hub: Any, monkeypatch: pytest.MonkeyPatch, large_from: int, budget: int
) -> None:
    """The applier takes what ``prepare`` made of a change with no ``base`` (most likely a
    new record) only when the record is absent; a record that exists, or that an earlier
    change of the same group created, is merged as always (and every change is, once the
    guesses held exceed their budget, or in a batch too small to guess for). Every record
    must read back as folding the feed's changes one by one makes it, and the conflicts log
    must hold as many rows as that fold finds."""
    monkeypatch.setattr(push, "LARGE_FROM", large_from)
    monkeypatch.setattr(push, "GUESS_BUDGET", budget)
    nodes = await _nodes(hub, "a", "b")
    now = (time.time_ns() // 1_000_000) << 16

    def change(node: str, seq: int, key: str, fields: dict[str, Any] | None, **kw: Any) -> Change:
        return Change(
            cell=CELL,
            collection="visits",
            key=key,
            hlc=now + seq * 10 + (node == "b"),
            node=node,
            fields=fields,
            lane=STANDARD,
            seq=seq,
            **kw,
        )

    def batch(node: str, changes: list[Change]) -> PushBatch:
        first, last = changes[0].seq, changes[-1].seq
        return PushBatch(node=node, lane=STANDARD, first_seq=first, last_seq=last, changes=changes)

    held = batch("a", [change("a", 1, "held", {"v": "a1", "w": 1})])
    in_group = {
        "a": batch(
            "a",
            [
                change("a", 2, "both", {"v": "a"}),  # created here: the prepared guess
                change("a", 3, "held", {"v": "a2"}),  # no base, but the hub holds it
                change("a", 4, "gone", None),  # a delete of a record never seen
            ],
        ),
        "b": batch(
            "b",
            [
                change("b", 1, "both", {"v": "b", "x": 1}),  # after a's, same group: merged
                change("b", 2, "seen", {"v": "b"}, base={"v": (now, "c")}),  # no guess
            ],
        ),
    }
    groups: list[int] = []
    async with _applier(hub, groups) as applier:
        await push.apply_push(applier, nodes["a"], held)
        await asyncio.gather(*(push.apply_push(applier, nodes[n], b) for n, b in in_group.items()))
    assert groups == [1, 2]
    by_seq = {(c.node, c.seq): c for b in (held, *in_group.values()) for c in b.changes}
    feed = await hub.hub.pool.fetch("SELECT node_id, seq FROM feed ORDER BY id")
    expected: dict[str, RecordState] = {}
    conflicts = 0
    for row in feed:
        c = by_seq[(row["node_id"], row["seq"])]
        resolver = hub.hub.resolvers.get(c.collection, DEFAULT_RESOLVER)
        result = apply_change(expected.get(c.key), c, resolver, detect_conflicts=True)
        expected[c.key] = result.state
        conflicts += len(result.conflicts)
    rows = await hub.hub.pool.fetch("SELECT key, doc, state, hlc, deleted FROM records")
    assert sorted(r["key"] for r in rows) == sorted(expected)
    for r in rows:
        want = expected[r["key"]]
        assert r["state"] == want.to_bytes(), r["key"]
        assert (json.loads(r["doc"]) if r["doc"] else {}) == want.document(), r["key"]
        assert (r["hlc"], r["deleted"]) == (want.max_hlc, not want.document()), r["key"]
    assert conflicts > 0  # "held" and "both" each lose a value
    assert await hub.hub.pool.fetchval("SELECT count(*) FROM conflicts") == conflicts
    assert applier._guessing == 0  # every batch gave its guesses' budget back


async def test_the_next_group_commits_while_the_last_one_is_announced_in_order(
    hub: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Announcing a large group (Redis) goes on beside the next group's transaction; its
    pushers are answered only once it is done, announcements keep commit order, and a
    failed one still answers the pushers: their batches are committed."""
    monkeypatch.setattr(push, "LARGE_FROM", 3)  # the first group is large, the second not
    nodes = await _nodes(hub, "a", "b")
    announced: list[tuple[int, int]] = []
    release = asyncio.Event()

    async def after_commit(applied: list[push.AppliedBatch]) -> None:
        if not announced:  # the first group's announcement hangs until released
            await release.wait()
        announced.append((applied[0].first_id, applied[-1].last_id))
        if len(announced) == 2:
            raise RuntimeError("injected: Redis refused the rows")

    applier = _applier(hub, [], after_commit)
    async with applier:
        first = asyncio.create_task(push.apply_push(applier, nodes["a"], _batch("a", 1, 3)))
        # The second group commits although the first one's announcement hangs.
        async with asyncio.timeout(10):
            while await hub.hub.pool.fetchval("SELECT count(*) FROM feed") < 3:
                await asyncio.sleep(0.01)
            second = asyncio.create_task(push.apply_push(applier, nodes["b"], _batch("b", 1, 2)))
            while await hub.hub.pool.fetchval("SELECT count(*) FROM feed") < 5:
                await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        assert not first.done() and not second.done()  # both wait for the announcement
        assert announced == []
        release.set()
        results = await asyncio.gather(first, second)
    assert announced == [(1, 3), (4, 5)]  # commit order, though the second was ready first
    assert [r.answer.applied for r in results] == [3, 2]  # the failed announcement too


async def test_a_small_group_is_announced_before_the_next_group_commits(hub: Any) -> None:
    """A group under ``LARGE_FROM`` changes, with nothing else being announced, is announced
    (and its pushers answered) before the next group begins: no task, no turn of the event
    loop between its commit and its answer."""
    nodes = await _nodes(hub, "a", "b")
    release = asyncio.Event()
    announced: list[tuple[int, int]] = []

    async def after_commit(applied: list[push.AppliedBatch]) -> None:
        if not announced:
            await release.wait()
        announced.append((applied[0].first_id, applied[-1].last_id))

    applier = _applier(hub, [], after_commit)
    async with applier:
        first = asyncio.create_task(push.apply_push(applier, nodes["a"], _batch("a", 1, 3)))
        async with asyncio.timeout(10):
            while await hub.hub.pool.fetchval("SELECT count(*) FROM feed") < 3:
                await asyncio.sleep(0.01)
        second = asyncio.create_task(push.apply_push(applier, nodes["b"], _batch("b", 1, 2)))
        await asyncio.sleep(0.2)
        assert await hub.hub.pool.fetchval("SELECT count(*) FROM feed") == 3  # it waits
        assert applier._answering is None
        release.set()
        results = await asyncio.gather(first, second)
    assert announced == [(1, 3), (4, 5)]
    assert [r.answer.applied for r in results] == [3, 2]
