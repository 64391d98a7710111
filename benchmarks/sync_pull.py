"""Pull throughput hub → edge over loopback, beside raw COPY into the same PostgreSQL.

    .venv/bin/python benchmarks/sync_pull.py [--changes N] [--page P] [--json]

Seeds the hub's feed with N changes of ~200 bytes (through the real push path), then one
edge pulls them all in pages of P through ``GET /v1/pull`` (zstd). Prints two rates:
pull alone (HTTP + decode + validation) and pull applied into a real edge SQLite store
(merge, records upsert and cursor move, committed per page), bytes on the wire per change,
and raw asyncpg COPY rows/s measured in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

import aiohttp
from _harness import make_changes, raw_copy_rate, running_hub, seed, token_for

from syncengine.edge.store import EdgeStore
from syncengine.protocol import decode_body, decode_pull_page


async def pull_all(
    url: str, token: str, page: int, store: EdgeStore | None
) -> tuple[int, int, float]:
    cursor, count, wire = 0, 0, 0
    headers = {"Authorization": f"Bearer {token}", "Accept-Encoding": "zstd"}
    start = time.perf_counter()
    async with aiohttp.ClientSession(auto_decompress=False) as http:
        while True:
            async with http.get(
                f"{url}/v1/pull",
                headers=headers,
                params={
                    "tier": "standard",
                    "prefix": "west/ng/lagos",
                    "after": cursor,
                    "limit": page,
                },
            ) as resp:
                assert resp.status == 200, await resp.text()
                body = await resp.read()
                wire += len(body)
                data = decode_pull_page(decode_body(body, resp.headers.get("Content-Encoding")))
            if store is not None:
                await store.apply_remote(
                    data.changes, cursor=data.next_cursor, cursor_name="pull:standard"
                )
            count += len(data.changes)
            cursor = data.next_cursor
            if not data.more:
                return count, wire, time.perf_counter() - start


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--changes", type=int, default=100_000)
    parser.add_argument("--page", type=int, default=5000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    async with running_hub() as bench:
        await seed(bench.url, await token_for(bench, "seeder"), args.changes)
        token = await token_for(bench, "bench-edge")
        count, wire, t_pull = await pull_all(bench.url, token, args.page, None)
        assert count == args.changes, count
        with tempfile.TemporaryDirectory() as tmp:
            async with EdgeStore.open(
                Path(tmp) / "edge.db", node_id="bench-edge", region="west"
            ) as store:
                count2, _, t_apply = await pull_all(bench.url, token, args.page, store)
                assert count2 == args.changes
        copy = await raw_copy_rate(bench.dsn, make_changes("copy", 1, args.changes))
    result = {
        "changes": count,
        "page": args.page,
        "pull_changes_per_s": count / t_pull,
        "pull_applied_changes_per_s": count / t_apply,
        "wire_bytes_per_change": wire / count,
        "raw_copy_rows_per_s": copy,
    }
    if args.json:
        print(json.dumps(result))
        return
    print(f"pulled {count:,} changes in pages of {args.page:,}")
    print(f"  pull (HTTP + decode):       {count / t_pull:>10,.0f} changes/s")
    print(f"  pull applied to edge store: {count / t_apply:>10,.0f} changes/s")
    print(f"  raw COPY:                   {copy:>10,.0f} rows/s (same server, same run)")
    print(f"  on the wire:                {wire / count:>10.1f} bytes/change")


if __name__ == "__main__":
    asyncio.run(main())
