"""The Redis feed tail serves pulls only when complete; it is never wrong (invariant 6).

Pages served with the cache must equal pages read from PostgreSQL alone, for random tiers,
prefixes, cursors and limits — also when a batch never reached the cache (the crash
between PostgreSQL commit and Redis write) and after Redis was flushed.
"""

from __future__ import annotations

import random
import time

import aiohttp
import pytest

from syncengine.codec import encode
from syncengine.hub import feed
from syncengine.hub.cache import Cache
from syncengine.merge import Change
from syncengine.protocol import PushBatch, encode_push

pytestmark = pytest.mark.integration

CELLS = ["west/ng/lagos/clinic-12", "west/ng/lagos/clinic-12/alerts",
         "west/ng/lagos/clinic-1", "west/ng/kano/school-7"]
PREFIXES = [["west/ng/lagos/clinic-12"], ["west/ng/lagos"], ["west"], ["west/ng/kano", "west/ng/lagos/clinic-1"]]


async def push_random(hub, rng: random.Random, tokens: dict[str, str], seqs: dict[str, int]) -> None:  # type: ignore[no-untyped-def]
    async with aiohttp.ClientSession() as http:
        for _ in range(40):
            node = rng.choice(list(tokens))
            n = rng.randint(1, 30)
            first = seqs[node] + 1
            seqs[node] += n
            now = (time.time_ns() // 1_000_000) << 16
            batch = PushBatch(node=node, lane=2, first_seq=first, last_seq=first + n - 1, changes=[
                Change(cell=rng.choice(CELLS), collection="c", key=f"k{rng.randint(0, 50)}",
                       hlc=now + i, node=node, fields={"v": rng.random()}, lane=2, seq=first + i)
                for i in range(n)])
            async with http.post(f"{hub.url}/v1/push", data=encode(encode_push(batch)),
                                 headers={"Authorization": f"Bearer {tokens[node]}"}) as resp:
                assert resp.status == 200, await resp.text()


async def compare_pages(hub, cache: Cache, rng: random.Random, rounds: int = 200) -> None:  # type: ignore[no-untyped-def]
    head = await hub.hub.pool.fetchval("SELECT id FROM feed_head")
    for _ in range(rounds):
        args = {"node_id": rng.choice(["a", "b", "c", "x"]), "tier": rng.choice([0, 2]),
                "prefixes": rng.choice(PREFIXES), "after": rng.randint(0, head),
                "limit": rng.randint(1, 80), "clock": hub.hub.clock}
        with_cache = await feed.read_page(hub.hub.pool, cache=cache, **args)
        plain = await feed.read_page(hub.hub.pool, cache=None, **args)
        assert (with_cache.ids, with_cache.next_cursor, with_cache.more) == (
            plain.ids, plain.next_cursor, plain.more), args
        assert with_cache.changes == plain.changes


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
    # A flushed cache (or one restarted empty) is only slower.
    redis_server.flushall()
    await compare_pages(hub, cache, rng, rounds=50)
