"""The hub answers the sync protocol over real HTTP against real PostgreSQL and Redis."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest

from syncengine.codec import decode, encode
from syncengine.hub import app, push
from syncengine.hub.nodes import revoke_node
from syncengine.hub.push import COPY_RECORDS_FROM
from syncengine.merge import Change
from syncengine.protocol import PushBatch, decode_pull_page, decode_push_answer, encode_push

pytestmark = pytest.mark.integration

CELL = "west/ng/lagos/clinic-12"


def change(node: str, seq: int, key: str, fields: dict[str, object] | None, hlc: int) -> Change:
    return Change(cell=CELL, collection="visits", key=key, hlc=hlc, node=node, fields=fields,
                  lane=2, seq=seq)


async def test_push_then_pull_round_trip(hub) -> None:  # type: ignore[no-untyped-def]
    token_a = await hub.add_node("node-a", "west/ng/lagos")
    token_b = await hub.add_node("node-b", "west/ng/lagos")
    now = (time.time_ns() // 1_000_000) << 16
    batch = PushBatch(node="node-a", lane=2, first_seq=1, last_seq=2, changes=[
        change("node-a", 1, "k1", {"x": 1}, now + 1), change("node-a", 2, "k2", {"y": "é"}, now + 2)])
    async with aiohttp.ClientSession() as http:
        headers = {"Authorization": f"Bearer {token_a}", "Content-Type": "application/msgpack",
                   "Accept": "application/msgpack"}
        for _ in range(2):  # the second is a replay: same answer, no new effect
            async with http.post(f"{hub.url}/v1/push", data=encode(encode_push(batch)),
                                 headers=headers) as resp:
                assert resp.status == 200, await resp.read()
                answer = decode_push_answer(decode(await resp.read()))
                assert answer.acked == 2
        async with http.get(f"{hub.url}/v1/pull", params={"tier": "standard", "prefix": CELL},
                            headers={"Authorization": f"Bearer {token_b}"}) as resp:
            assert resp.status == 200, await resp.read()
            page = decode_pull_page(decode(await resp.read()))
        assert [c.key for c in page.changes] == ["k1", "k2"]
        assert page.ids == [1, 2] and page.next_cursor == 2 and not page.more
        async with http.get(f"{hub.url}/v1/pull", params={"tier": "standard", "prefix": "east/ke"},
                            headers={"Authorization": f"Bearer {token_b}"}) as resp:
            assert resp.status == 403
            body = await resp.json()
            assert body["error"] == "foreign_region" and "east/ke" in body["message"]
        async with http.get(f"{hub.url}/readyz") as resp:
            assert resp.status == 200 and (await resp.json())["cache"] == "ok"
    rows = await hub.hub.pool.fetch("SELECT key, doc->>'y' AS y FROM records ORDER BY key")
    assert [(r["key"], r["y"]) for r in rows] == [("k1", None), ("k2", "é")]
    assert await hub.hub.pool.fetchval("SELECT count(*) FROM feed") == 2


async def test_large_and_small_pushes_write_the_same_records(hub) -> None:  # type: ignore[no-untyped-def]
    """A push of many records stages them with COPY, a small one binds arrays: both must
    insert new records and merge into existing ones alike (here: 150 changes over keys a
    small push wrote before, then a small push over keys the large one wrote)."""
    token = await hub.add_node("node-a", "west/ng/lagos")
    now = (time.time_ns() // 1_000_000) << 16
    large = 150
    assert large >= COPY_RECORDS_FROM > 3
    batches = [
        [change("node-a", s, f"k{s}", {"small": s}, now + s) for s in (1, 2, 3)],
        [
            change("node-a", s, f"k{s - 3}", {"large": s}, now + s)
            for s in range(4, 4 + large)
        ],
        [change("node-a", 4 + large + i, f"k{i + 1}", None, now + 4 + large + i) for i in (0, 1)],
    ]
    async with aiohttp.ClientSession() as http:
        for changes in batches:
            batch = PushBatch(node="node-a", lane=2, first_seq=changes[0].seq,
                              last_seq=changes[-1].seq, changes=changes)
            async with http.post(
                f"{hub.url}/v1/push", data=encode(encode_push(batch)),
                headers={"Authorization": f"Bearer {token}"},
            ) as resp:
                assert resp.status == 200, await resp.text()
    rows = {
        r["key"]: (r["doc"], r["deleted"], r["feed_id"])
        for r in await hub.hub.pool.fetch("SELECT key, doc::text, deleted, feed_id FROM records")
    }
    assert len(rows) == large
    assert rows["k3"] == ('{"large": 6, "small": 3}', False, 6)  # merged by the COPY path
    assert rows["k4"] == ('{"large": 7}', False, 7)
    assert rows["k1"] == (None, True, 4 + large)  # deleted by the small path
    assert rows["k2"] == (None, True, 5 + large)
    assert await hub.hub.pool.fetchval("SELECT count(*) FROM feed") == 5 + large


async def test_a_revoked_token_is_refused_at_once_or_after_token_cache_s(  # type: ignore[no-untyped-def]
    hub_factory,
) -> None:
    """Without ``token_cache_s`` a revoked token is refused on its next request; with it,
    each hub process trusts a token it looked up for that long, then looks it up again."""
    cached = await hub_factory(token_cache_s=1)
    uncached = await hub_factory()
    token = await cached.add_node("revokee")

    async def status(hub) -> int:  # type: ignore[no-untyped-def]
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"{hub.url}/v1/config", headers={"Authorization": f"Bearer {token}"}) as resp,
        ):
            return resp.status

    assert await status(cached) == 200 and await status(uncached) == 200
    await revoke_node(cached.hub.pool, "revokee")
    assert await status(uncached) == 401
    assert await status(cached) == 200  # looked up less than a second ago: still trusted
    started = time.monotonic()
    while await status(cached) == 200:
        assert time.monotonic() - started < 1.5, "the cached token outlived token_cache_s"
        await asyncio.sleep(0.05)
    assert await status(uncached) == 401 and await status(cached) == 401


async def test_large_pushes_wait_for_a_slot_and_small_ones_do_not(  # type: ignore[no-untyped-def]
    hub_factory, monkeypatch
) -> None:
    """``max_large_pushes`` bounds the large pushes a hub process decodes and applies at
    once: with one slot, a second large push waits (holding only its body) until the first
    is answered, while a small push goes through meanwhile."""
    hub = await hub_factory(max_large_pushes=1)
    tokens = {n: await hub.add_node(n, "west/ng/lagos") for n in ("big-1", "big-2", "small")}
    now = (time.time_ns() // 1_000_000) << 16
    inside = asyncio.Event()
    release = asyncio.Event()
    real_apply = push.apply_push

    async def held_apply(applier, node, batch):  # type: ignore[no-untyped-def]
        if node.node_id == "big-1":
            inside.set()
            await release.wait()
        return await real_apply(applier, node, batch)

    monkeypatch.setattr(push, "apply_push", held_apply)

    def body(node: str, count: int) -> bytes:
        changes = [
            change(node, seq, f"{node}-{seq}", {"note": f"visit {seq} of {node}"}, now + seq)
            for seq in range(1, count + 1)
        ]
        data = encode(encode_push(PushBatch(node=node, lane=2, first_seq=1, last_seq=count,
                                            changes=changes)))
        assert (len(data) >= app.LARGE_PUSH_BYTES) == (count > 1)
        return data

    async def post(http: aiohttp.ClientSession, node: str, count: int) -> int:
        headers = {"Authorization": f"Bearer {tokens[node]}", "Content-Type": "application/msgpack"}
        async with http.post(f"{hub.url}/v1/push", data=body(node, count), headers=headers) as r:
            assert r.status == 200, await r.read()
            return decode_push_answer(decode(await r.read())).applied

    waiting = hub.hub.metrics.pushes_waiting
    async with aiohttp.ClientSession() as http:
        first = asyncio.create_task(post(http, "big-1", 500))
        await asyncio.wait_for(inside.wait(), 10)
        second = asyncio.create_task(post(http, "big-2", 500))
        async with asyncio.timeout(10):
            while waiting._value.get() != 1:
                await asyncio.sleep(0.01)
        assert await asyncio.wait_for(post(http, "small", 1), 10) == 1  # never waits
        assert not second.done()
        assert waiting._value.get() == 1
        release.set()
        assert await asyncio.wait_for(asyncio.gather(first, second), 20) == [500, 500]
    assert waiting._value.get() == 0
    assert await hub.hub.pool.fetchval("SELECT count(*) FROM feed") == 1001
