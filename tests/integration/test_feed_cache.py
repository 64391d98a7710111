"""The Redis feed tail serves pulls only when complete; it is never wrong (invariant 6).

Pages served with the cache must equal pages read from PostgreSQL alone, for random tiers,
prefixes, cursors and limits — also when a batch never reached the cache (the crash
between PostgreSQL commit and Redis write) and after Redis was flushed.

Redis pub/sub wakes long-polls across hubs; losing it (killed connections, a stopped or
restarted Redis) must cost a long-poll about a second, not the healthy re-read interval.
"""

from __future__ import annotations

import asyncio
import random
import time

import aiohttp
import msgpack
import pytest

from syncengine.cells import covers_any
from syncengine.codec import encode
from syncengine.hub import cache as cache_module
from syncengine.hub import feed
from syncengine.hub.cache import Cache
from syncengine.merge import Change
from syncengine.protocol import PushBatch, encode_push

pytestmark = pytest.mark.integration

CELLS = [
    "west/ng/lagos/clinic-12",
    "west/ng/lagos/clinic-12/alerts",
    "west/ng/lagos/clinic-1",
    "west/ng/kano/school-7",
]
PREFIXES = [
    ["west/ng/lagos/clinic-12"],
    ["west/ng/lagos"],
    ["west"],
    ["west/ng/kano", "west/ng/lagos/clinic-1"],
]


async def push_random(
    hub, rng: random.Random, tokens: dict[str, str], seqs: dict[str, int]
) -> None:  # type: ignore[no-untyped-def]
    async with aiohttp.ClientSession() as http:
        for _ in range(40):
            node = rng.choice(list(tokens))
            n = rng.randint(1, 30)
            first = seqs[node] + 1
            seqs[node] += n
            now = (time.time_ns() // 1_000_000) << 16
            batch = PushBatch(
                node=node,
                lane=2,
                first_seq=first,
                last_seq=first + n - 1,
                changes=[
                    Change(
                        cell=rng.choice(CELLS),
                        collection="c",
                        key=f"k{rng.randint(0, 50)}",
                        hlc=now + i,
                        node=node,
                        fields={"v": rng.random()},
                        lane=2,
                        seq=first + i,
                    )
                    for i in range(n)
                ],
            )
            async with http.post(
                f"{hub.url}/v1/push",
                data=encode(encode_push(batch)),
                headers={"Authorization": f"Bearer {tokens[node]}"},
            ) as resp:
                assert resp.status == 200, await resp.text()


async def compare_pages(hub, cache: Cache, rng: random.Random, rounds: int = 200) -> None:  # type: ignore[no-untyped-def]
    """Pages with the cache, pages from PostgreSQL alone, and a model page filtered here from
    every feed row must all agree (the per-cell SQL, the cached scan and the rule)."""
    head = await hub.hub.pool.fetchval("SELECT id FROM feed_head")
    every = await hub.hub.pool.fetch("SELECT id, tier, cell, node_id FROM feed ORDER BY id")
    for _ in range(rounds):
        args = {
            "node_id": rng.choice(["a", "b", "c", "x"]),
            "tier": rng.choice([0, 2]),
            "prefixes": rng.choice(PREFIXES),
            "after": rng.randint(0, head),
            "limit": rng.randint(1, 80),
            "clock": hub.hub.clock,
        }
        with_cache = await feed.read_page(hub.hub.pool, cache=cache, **args)
        plain = await feed.read_page(hub.hub.pool, cache=None, **args)
        assert (with_cache.ids, with_cache.next_cursor, with_cache.more) == (
            plain.ids,
            plain.next_cursor,
            plain.more,
        ), args
        assert with_cache.changes == plain.changes
        end = min(head, args["after"] + feed.SCAN_WINDOW)
        model = [
            r["id"]
            for r in every
            if args["after"] < r["id"] <= end
            and r["tier"] == args["tier"]
            and r["node_id"] != args["node_id"]
            and covers_any(args["prefixes"], r["cell"])
        ][: args["limit"]]
        assert plain.ids == model, args


async def test_cached_pages_equal_postgres_pages(hub, redis_server, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    rng = random.Random(11)
    tokens = {n: await hub.add_node(n, "west") for n in ("a", "b", "c")}
    seqs = dict.fromkeys(tokens, 0)
    cache = hub.hub.cache
    # One batch in ten never reaches the cache: the commit happened, the Redis write did not.
    real_put = cache.put_feed_batch

    async def lossy_put(epoch: str, rows: list[list[object]]) -> None:
        if rng.random() < 0.1:
            return
        await real_put(epoch, rows)

    monkeypatch.setattr(cache, "put_feed_batch", lossy_put)
    await push_random(hub, rng, tokens, seqs)
    hits, misses = cache.hits, cache.misses
    await compare_pages(hub, cache, rng)
    assert cache.hits > hits, "the cache served nothing; the test saw no cached path"
    assert cache.misses > misses, "no page crossed a hole; the test saw no fallback"
    # A reader whose prefixes match few of the cached rows is left to PostgreSQL's index.
    monkeypatch.setattr(cache_module, "MIN_MATCH_SHARE", 1.0)
    monkeypatch.setattr(cache_module, "_CHUNK", 2)
    sparse = cache.sparse
    await compare_pages(hub, cache, rng, rounds=100)
    assert cache.sparse > sparse, "no page gave up on the cache: the test saw no sparse path"
    monkeypatch.undo()
    # A flushed cache (or one restarted empty) is only slower.
    redis_server.flushall()
    await compare_pages(hub, cache, rng, rounds=50)


#: How soon a long-poll on hub B must answer a push to hub A: the 1 s polling interval
#: used while pub/sub is down, plus slack for a loaded machine.
WAKE_BOUND_S = 1.5


async def test_cross_hub_long_poll_wakes_soon_after_pubsub_loss(hub_factory, redis_server) -> None:  # type: ignore[no-untyped-def]
    """A long-poll on hub B answers a push to hub A within ~1 s when B's pub/sub
    connection was just killed (the wake-up is published while B resubscribes), while Redis
    is stopped (the long-poll was waiting at the healthy 5 s interval when it stopped), and
    after a restart (B resubscribes at once: no long backoff). B's ``/readyz`` says its
    wake-ups are degraded while Redis is down and ok within 2 s of its return; and when
    Redis is frozen (SIGSTOP) with no traffic at all, degraded within about 4 s (a ping on
    the quiet subscription goes unanswered), ok again soon after SIGCONT."""
    a, b = await hub_factory(), await hub_factory()
    tokens = {n: await a.add_node(n, "west") for n in ("w", "t")}
    seq = 0

    async def command(*args: str) -> None:
        await asyncio.to_thread(redis_server.command, *args)

    async with aiohttp.ClientSession() as http:

        async def wakeups(hub) -> str:  # type: ignore[no-untyped-def]
            async with http.get(f"{hub.url}/readyz") as resp:
                return str((await resp.json()).get("wakeups"))

        async def until_wakeups(hub, want: str, bound_s: float) -> float:  # type: ignore[no-untyped-def]
            start = time.monotonic()
            while (state := await wakeups(hub)) != want:
                assert time.monotonic() - start < bound_s, (
                    f"hub B's /readyz says wakeups={state!r}, not {want!r}, {bound_s} s on"
                )
                await asyncio.sleep(0.05)
            return time.monotonic() - start

        async def push() -> float:
            nonlocal seq
            seq += 1
            now = (time.time_ns() // 1_000_000) << 16
            batch = PushBatch(
                node="w",
                lane=2,
                first_seq=seq,
                last_seq=seq,
                changes=[
                    Change(
                        cell=CELLS[0],
                        collection="c",
                        key=f"k{seq}",
                        hlc=now,
                        node="w",
                        fields={"v": seq},
                        lane=2,
                        seq=seq,
                    )
                ],
            )
            async with http.post(
                f"{a.url}/v1/push",
                data=encode(encode_push(batch)),
                headers={"Authorization": f"Bearer {tokens['w']}"},
            ) as resp:
                assert resp.status == 200, await resp.text()
            return time.monotonic()

        async def long_poll(after: int) -> tuple[float, int]:
            params: dict[str, str | int] = {
                "tier": "standard",
                "prefix": "west",
                "after": after,
                "wait": 20,
            }
            async with http.get(
                f"{b.url}/v1/pull",
                params=params,
                headers={"Authorization": f"Bearer {tokens['t']}"},
            ) as resp:
                assert resp.status == 200, await resp.text()
                body = msgpack.unpackb(await resp.read(), raw=False)
            return time.monotonic(), len(body["changes"])

        async def wake_delay(what: str) -> float:
            """Seconds from a push to hub A until hub B's waiting long-poll answered."""
            head = await b.hub.pool.fetchval("SELECT id FROM feed_head")
            poll = asyncio.create_task(long_poll(head))
            await asyncio.sleep(0.5)  # the long-poll is waiting on hub B
            assert not poll.done(), f"{what}: the long-poll answered before any push"
            if what == "pubsub killed":
                await command("CLIENT", "KILL", "TYPE", "pubsub")
            elif what == "redis stopped":
                await asyncio.to_thread(redis_server.stop)
            pushed = await push()
            answered, changes = await asyncio.wait_for(poll, timeout=20)
            assert changes == 1, f"{what}: the long-poll answered {changes} changes, not 1"
            delay = answered - pushed
            assert delay < WAKE_BOUND_S, (
                f"{what}: hub B's long-poll answered {delay:.2f} s after the push to hub A "
                f"(bound {WAKE_BOUND_S} s)"
            )
            return delay

        try:
            await until_wakeups(b, "ok", 2)
            await wake_delay("healthy")
            for _ in range(3):
                await wake_delay("pubsub killed")
            await wake_delay("redis stopped")
            await until_wakeups(b, "degraded", 2)
            await asyncio.sleep(3)  # long enough for a growing backoff to reach seconds
            await asyncio.to_thread(redis_server.start)
            await until_wakeups(b, "ok", 2)
            await wake_delay("redis restarted")
            # A frozen Redis keeps its connections open and says nothing: with no traffic
            # at all, hub B's listener must notice by itself (ping, then silence).
            redis_server.pause()
            froze = await until_wakeups(b, "degraded", 6)
            redis_server.resume()
            await until_wakeups(b, "ok", 4)
            await wake_delay("redis thawed")
            assert froze > 1, f"degraded {froze:.1f} s after SIGSTOP: before any silence?"
        finally:
            redis_server.ensure_running()


async def test_a_busy_connection_pool_waits_its_turn_not_the_breaker(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """More concurrent calls than pooled connections (a thousand edges pulling at once) wait
    for a free connection; none fails with "Too many connections" and opens the breaker."""
    monkeypatch.setattr(cache_module, "MAX_CONNECTIONS", 3)
    cache = Cache(redis_url, namespace="syncengine:busy-pool")
    await cache.start()
    try:
        answers = await asyncio.gather(*(cache.ping() for _ in range(300)))
        assert all(answers) and not cache.degraded
    finally:
        await cache.close()
