"""Redis is only a cache; PostgreSQL restarts lose nothing (invariants 2 and 6).

Under continuous pushes and long-polling pulls through real HTTP:
1. Redis frozen with SIGSTOP (the black hole a client without timeouts hangs on), then
   resumed; 2. Redis stopped (connection refused), then restarted empty; 3. PostgreSQL
   crashed (``pg_ctl stop -m immediate``), then restarted.
Checks: no 5xx while only Redis is down; ``/readyz`` says degraded within 5 s and recovers;
503 while PostgreSQL is down; afterwards every acknowledged change is in the feed exactly
once and every puller saw every change once.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter

import aiohttp
import pytest

from syncengine.codec import decode, encode
from syncengine.merge import Change
from syncengine.protocol import PushBatch, decode_pull_page, decode_push_answer, encode_push

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CELL = "west/ng/lagos/clinic-12"


async def wait_for(check, timeout: float) -> float:  # type: ignore[no-untyped-def]
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if await check():
            return time.monotonic() - start
        await asyncio.sleep(0.1)
    raise AssertionError(f"condition not reached within {timeout} s")


async def test_redis_and_postgres_outages_under_load(hub, postgres, redis_server) -> None:  # type: ignore[no-untyped-def]
    token = await hub.add_node("pusher", "west/ng/lagos")
    reader = await hub.add_node("reader", "west/ng/lagos")
    statuses: Counter[int] = Counter()
    phase = {"name": "warmup"}
    by_phase: dict[str, Counter[int]] = {}
    acked_through = 0
    stop = asyncio.Event()

    async def pusher(http: aiohttp.ClientSession) -> None:
        nonlocal acked_through
        seq = 1
        while not stop.is_set():
            now = (time.time_ns() // 1_000_000) << 16
            batch = PushBatch(node="pusher", lane=2, first_seq=seq, last_seq=seq + 9, changes=[
                Change(cell=CELL, collection="c", key=f"k{seq + i}", hlc=now + i, node="pusher",
                       fields={"i": seq + i}, lane=2, seq=seq + i) for i in range(10)])
            try:
                async with http.post(f"{hub.url}/v1/push", data=encode(encode_push(batch)),
                                     headers={"Authorization": f"Bearer {token}"},
                                     timeout=aiohttp.ClientTimeout(total=10)) as resp:
                    statuses[resp.status] += 1
                    by_phase.setdefault(phase["name"], Counter())[resp.status] += 1
                    if resp.status == 200:
                        acked_through = decode_push_answer(decode(await resp.read())).acked
                        seq = acked_through + 1
                    else:
                        body = await resp.json()
                        assert resp.status in (500, 503), body
                        await asyncio.sleep(0.1)
            except (aiohttp.ClientError, TimeoutError):
                by_phase.setdefault(phase["name"], Counter())[0] += 1
                await asyncio.sleep(0.1)
            await asyncio.sleep(0.01)

    seen: list[int] = []

    async def puller(http: aiohttp.ClientSession) -> None:
        cursor = 0
        while True:
            try:
                async with http.get(f"{hub.url}/v1/pull", params={
                        "tier": "standard", "prefix": CELL, "after": cursor, "wait": 2},
                        headers={"Authorization": f"Bearer {reader}"},
                        timeout=aiohttp.ClientTimeout(total=10)) as resp:
                    if resp.status != 200:
                        await asyncio.sleep(0.2)
                        continue
                    page = decode_pull_page(decode(await resp.read()))
            except (aiohttp.ClientError, TimeoutError):
                await asyncio.sleep(0.2)
                continue
            seen.extend(page.ids)
            cursor = page.next_cursor
            if stop.is_set() and not page.changes and not page.more:
                return

    async def ready(http: aiohttp.ClientSession) -> dict[str, str]:
        async with http.get(f"{hub.url}/readyz", timeout=aiohttp.ClientTimeout(total=5)) as resp:
            return dict(await resp.json(), http=str(resp.status))

    timings: dict[str, float] = {}
    async with aiohttp.ClientSession() as http:
        tasks = [asyncio.create_task(pusher(http)), asyncio.create_task(puller(http))]
        await asyncio.sleep(1)

        phase["name"] = "redis_frozen"
        await asyncio.to_thread(redis_server.pause)

        async def degraded() -> bool:
            return (await ready(http))["cache"] == "degraded"

        async def healthy() -> bool:
            return (await ready(http)).get("cache") == "ok"

        timings["time_to_degraded_frozen_s"] = await wait_for(degraded, 5)
        await asyncio.sleep(2)
        await asyncio.to_thread(redis_server.resume)
        timings["time_to_recovered_s"] = await wait_for(healthy, 10)

        phase["name"] = "redis_stopped"
        await asyncio.to_thread(redis_server.stop)
        timings["time_to_degraded_stopped_s"] = await wait_for(degraded, 5)
        await asyncio.sleep(2)
        await asyncio.to_thread(redis_server.start)
        await wait_for(healthy, 10)

        phase["name"] = "postgres_down"
        await asyncio.to_thread(postgres.crash)

        async def pg_down() -> bool:
            return (await ready(http))["http"] == "503"

        await wait_for(pg_down, 5)
        await asyncio.sleep(2)
        await asyncio.to_thread(postgres.start)
        phase["name"] = "recovered"
        await wait_for(lambda: _ok(http, hub.url), 20)
        await asyncio.sleep(2)
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=30)

    feed = [r["seq"] for r in await hub.hub.pool.fetch(
        "SELECT seq FROM feed WHERE node_id = 'pusher' ORDER BY id")]
    summary = {"test": "hub_outages", "statuses": {str(k): v for k, v in statuses.items()},
               "by_phase": {p: dict(c) for p, c in by_phase.items()}, **timings,
               "acked": acked_through, "feed_rows": len(feed), "pulled": len(seen)}
    print(json.dumps(summary))
    for name in ("warmup", "redis_frozen", "redis_stopped"):
        assert set(by_phase.get(name, {})) <= {200}, f"non-200 while only Redis was down: {name}"
    assert by_phase["redis_frozen"][200] > 0 and by_phase["redis_stopped"][200] > 0
    assert 503 in by_phase.get("postgres_down", {}), "no 503 while PostgreSQL was down"
    assert feed == list(range(1, len(feed) + 1)), "each change exactly once, none missing"
    assert len(feed) >= acked_through
    assert sorted(seen) == list(range(1, len(feed) + 1)), "the puller missed or repeated changes"


async def _ok(http: aiohttp.ClientSession, url: str) -> bool:
    try:
        async with http.get(f"{url}/readyz", timeout=aiohttp.ClientTimeout(total=3)) as resp:
            return resp.status == 200
    except (aiohttp.ClientError, TimeoutError):
        return False
