"""GET /v1/snapshot: a granted prefix's records, resumable, on segment boundaries."""

from __future__ import annotations

import time

import aiohttp
import pytest

from syncengine.codec import decode, encode
from syncengine.merge import Change
from syncengine.protocol import PushBatch, decode_snapshot_page, encode_push

pytestmark = pytest.mark.integration


async def push(http: aiohttp.ClientSession, url: str, token: str, node: str,
               changes: list[tuple[str, str, dict[str, object] | None]]) -> None:
    now = (time.time_ns() // 1_000_000) << 16
    batch = PushBatch(node=node, lane=2, first_seq=1, last_seq=len(changes), changes=[
        Change(cell=cell, collection="c", key=key, hlc=now + i, node=node, fields=fields,
               lane=2, seq=i + 1) for i, (cell, key, fields) in enumerate(changes)])
    async with http.post(f"{url}/v1/push", data=encode(encode_push(batch)),
                         headers={"Authorization": f"Bearer {token}"}) as resp:
        assert resp.status == 200, await resp.text()


async def test_snapshot_pages_resume_and_respect_boundaries(hub) -> None:  # type: ignore[no-untyped-def]
    writer = await hub.add_node("writer", "west/ng/lagos")
    reader = await hub.add_node("reader", "west/ng/lagos/clinic-1")
    inside = [("west/ng/lagos/clinic-1", f"k{i}", {"i": i}) for i in range(7)]
    inside += [("west/ng/lagos/clinic-1/ward-a", "w1", {"w": 1}),
               ("west/ng/lagos/clinic-1", "k3", None)]  # a tombstone: included
    outside = [("west/ng/lagos/clinic-12", "x", {"x": 1}), ("west/ng/lagos", "y", {"y": 1}),
               ("west/ng/lagos/clinic-1-annex", "z", {"z": 1})]  # sorts before clinic-1/
    headers = {"Authorization": f"Bearer {reader}"}
    async with aiohttp.ClientSession() as http:
        await push(http, hub.url, writer, "writer", inside + outside)
        head = await hub.hub.pool.fetchval("SELECT id FROM feed_head")
        seen, token, pages = [], None, 0
        while True:
            params = {"prefix": "west/ng/lagos/clinic-1", "limit": "3"}
            if token:
                params["after"] = token
            async with http.get(f"{hub.url}/v1/snapshot", params=params, headers=headers) as resp:
                assert resp.status == 200, await resp.text()
                page = decode_snapshot_page(decode(await resp.read()))
            assert page.cursor == head
            seen.extend(page.records)
            pages += 1
            if pages == 2:  # the link drops: resume from the token we kept
                resumed_from = page.next
            token = page.next
            if token is None:
                break
        keys = [(c, k) for c, _, k, _, _ in seen]
        assert keys == sorted(keys) and len(keys) == len(set(keys)) == 8
        assert all((c, k) not in keys for c, k, _ in outside)
        for limit in ("1", "7", "100"):  # a page per record, one ending with the own cell, one
            token, again_keys = None, []
            while True:
                params = {"prefix": "west/ng/lagos/clinic-1", "limit": limit}
                if token:
                    params["after"] = token
                async with http.get(f"{hub.url}/v1/snapshot", params=params,
                                    headers=headers) as resp:
                    page = decode_snapshot_page(decode(await resp.read()))
                again_keys += [(c, k) for c, _, k, _, _ in page.records]
                if (token := page.next) is None:
                    break
            assert again_keys == keys, limit
        hub_states = {(r["cell"], r["key"]): bytes(r["state"]) for r in
                      await hub.hub.pool.fetch("SELECT cell, key, state FROM records")}
        assert all(hub_states[(c, k)] == state for c, _, k, state, _ in seen)
        async with http.get(f"{hub.url}/v1/snapshot", headers=headers, params={
                "prefix": "west/ng/lagos/clinic-1", "limit": "3", "after": resumed_from}) as resp:
            again = decode_snapshot_page(decode(await resp.read()))
        assert again.records == seen[6:9]
        async with http.get(f"{hub.url}/v1/snapshot", params={"prefix": "west/ng/lagos"},
                            headers=headers) as resp:
            assert resp.status == 403 and (await resp.json())["error"] == "not_granted"
        async with http.get(f"{hub.url}/v1/snapshot", headers=headers, params={
                "prefix": "west/ng/lagos/clinic-1", "after": "!!not-a-token"}) as resp:
            assert resp.status == 400
            assert (await resp.json())["error"] == "invalid_snapshot_token"
