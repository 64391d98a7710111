"""Push throughput edge → hub over loopback, beside raw COPY into the same PostgreSQL.

    .venv/bin/python benchmarks/sync_push.py [--changes N] [--batch B] [--json]

One edge pushes N changes of ~200 bytes (JSON) in batches of B through the real hub
(HTTP, msgpack, zstd, one PostgreSQL transaction per batch). Prints changes/s, bytes on
the wire per change (request bodies as sent), the JSON size of the same changes for
comparison, and raw asyncpg COPY rows/s measured in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import aiohttp
from _harness import make_changes, raw_copy_rate, running_hub, token_for

from syncengine.codec import decode
from syncengine.protocol import PushBatch, decode_push_answer, encode_body, encode_push


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--changes", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    changes = make_changes("bench-edge", 1, args.changes)
    json_bytes = sum(
        len(
            json.dumps(
                {
                    "cell": c.cell,
                    "collection": c.collection,
                    "key": c.key,
                    "hlc": c.hlc,
                    "node": c.node,
                    "seq": c.seq,
                    "fields": c.fields,
                }
            )
        )
        for c in changes
    ) / len(changes)
    async with running_hub() as bench:
        token = await token_for(bench, "bench-edge")
        wire = 0
        headers = {
            "Authorization": f"Bearer {token}",
            "Content-Type": "application/msgpack",
            "Accept": "application/msgpack",
        }
        async with aiohttp.ClientSession() as http:
            start = time.perf_counter()
            for i in range(0, len(changes), args.batch):
                part = changes[i : i + args.batch]
                batch = PushBatch(
                    node="bench-edge",
                    lane=2,
                    first_seq=part[0].seq,
                    last_seq=part[-1].seq,
                    changes=part,
                )
                body, encoding = encode_body(encode_push(batch))
                wire += len(body)
                h = dict(headers)
                if encoding:
                    h["Content-Encoding"] = encoding
                async with http.post(f"{bench.url}/v1/push", data=body, headers=h) as resp:
                    assert resp.status == 200, await resp.text()
                    assert decode_push_answer(decode(await resp.read())).acked == part[-1].seq
            elapsed = time.perf_counter() - start
        rate = len(changes) / elapsed
        copy = await raw_copy_rate(bench.dsn, changes)
    result = {
        "changes": len(changes),
        "batch": args.batch,
        "push_changes_per_s": rate,
        "wire_bytes_per_change": wire / len(changes),
        "json_bytes_per_change": json_bytes,
        "raw_copy_rows_per_s": copy,
        "percent_of_copy": 100 * rate / copy,
    }
    if args.json:
        print(json.dumps(result))
        return
    print(f"pushed {len(changes):,} changes in batches of {args.batch:,}")
    print(f"  push:            {rate:>10,.0f} changes/s  ({100 * rate / copy:.1f}% of raw COPY)")
    print(f"  raw COPY:        {copy:>10,.0f} rows/s     (the limit, same server, same run)")
    print(f"  on the wire:     {wire / len(changes):>10.1f} bytes/change (JSON: {json_bytes:.0f})")


if __name__ == "__main__":
    asyncio.run(main())
