"""Shared set-up for the sync benchmarks: private PostgreSQL and Redis, an in-process hub,
realistic ~200-byte changes, and the raw ``COPY`` rate measured on the same server."""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import msgpack
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from support.servers import PostgresServer, RedisServer, free_port
from syncengine.codec import decode
from syncengine.config import HubConfig
from syncengine.hub.app import run_hub
from syncengine.hub.nodes import add_node
from syncengine.merge import Change
from syncengine.protocol import PushBatch, decode_push_answer, encode_body, encode_push
from syncengine.service import tune_gc

CELL = "west/ng/lagos/clinic-12"


@dataclass
class Bench:
    url: str
    dsn: str
    pool: asyncpg.Pool
    #: The hub process's pid (for its RSS and CPU time).
    hub_pid: int = 0
    #: The private PostgreSQL's postmaster pid (its backends are its children).
    pg_pid: int = 0

    def cpu_seconds(self) -> dict[str, float]:
        """CPU time used so far (user + system) by the hub process and by PostgreSQL (the
        postmaster and every process it started, living now): take it before and after a
        run to learn what each change cost each side."""
        try:
            backends = [p.pid for p in psutil.Process(self.pg_pid).children()]
        except psutil.Error:
            backends = []
        postgres = cpu_seconds(self.pg_pid) + sum(map(cpu_seconds, backends))
        return {"hub": cpu_seconds(self.hub_pid), "postgres": postgres}


def _serve(settings: dict[str, Any]) -> None:
    """The hub process: a real hub on its own core, as in production (`syncengine hub run`
    tunes the garbage collector once it is ready)."""
    asyncio.run(run_hub(HubConfig.from_mapping(settings), ready=tune_gc))


@asynccontextmanager
async def running_hub(**overrides: Any) -> AsyncIterator[Bench]:
    """Private PostgreSQL + Redis + one hub in its own process, on loopback; ``overrides``
    are hub.toml keys."""
    with PostgresServer() as pg, RedisServer() as redis:
        dsn = pg.create_database("bench")
        settings = {
            "region": "west",
            "database_url": dsn,
            "redis_url": redis.url(),
            "listen": f"127.0.0.1:{free_port()}",
            "max_batch_changes": 5000,
            **overrides,
        }
        proc = multiprocessing.get_context("spawn").Process(target=_serve, args=(settings,))
        proc.start()
        url = f"http://{settings['listen']}"
        pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
        assert pool is not None
        try:
            async with aiohttp.ClientSession() as http:
                for _ in range(200):
                    try:
                        async with http.get(f"{url}/readyz") as resp:
                            if resp.status == 200:
                                break
                    except aiohttp.ClientError:
                        pass
                    await asyncio.sleep(0.05)
                else:
                    raise RuntimeError("hub did not become ready")
            yield Bench(url=url, dsn=dsn, pool=pool, hub_pid=proc.pid or 0, pg_pid=pg.pid or 0)
        finally:
            await pool.close()
            proc.terminate()
            proc.join(10)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` (0 once it is gone)."""
    try:
        times = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return 0.0
    return float(times.user + times.system)


async def token_for(bench: Bench, node: str) -> str:
    return await add_node(bench.pool, "west", node, ["west/ng/lagos"])


def fields(i: int) -> dict[str, Any]:
    """About 200 bytes as JSON, like a clinic visit record."""
    return {
        "patient": f"p-{i % 5000:06d}",
        "temp_c": 36.5 + (i % 30) / 10,
        "bp": f"{110 + i % 40}/{70 + i % 20}",
        "notes": "routine visit; no complaints; follow up in two weeks",
        "visit_type": ("antenatal", "vaccination", "malaria", "general")[i % 4],
        "n": i,
    }


def make_changes(
    node: str, first_seq: int, count: int, lane: int = 2, *, keys: str = "v"
) -> list[Change]:
    """``count`` new visits of ``node`` from ``first_seq`` on, keyed ``{keys}-{seq}``: nodes
    given the same ``keys`` write the same records."""
    base = (time.time_ns() // 1_000_000) << 16
    return [
        Change(
            cell=f"{CELL}/ward-{(first_seq + i) % 7}",
            collection="visits",
            key=f"{keys}-{first_seq + i:08d}",
            hlc=base + i,
            node=node,
            fields=fields(first_seq + i),
            lane=lane,
            seq=first_seq + i,
        )
        for i in range(count)
    ]


async def seed(url: str, token: str, count: int, *, batch: int = 5000) -> None:
    """Node "seeder" pushes ``count`` changes to the hub over the real push path (set-up),
    a batch at a time: never all of them in memory."""
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/msgpack"}
    async with aiohttp.ClientSession() as http:
        for first in range(1, count + 1, batch):
            part = make_changes("seeder", first, min(batch, count - first + 1))
            message = PushBatch(
                node="seeder", lane=2, first_seq=first, last_seq=part[-1].seq, changes=part
            )
            body, encoding = encode_body(encode_push(message))
            h = dict(headers)
            if encoding:
                h["Content-Encoding"] = encoding
            async with http.post(f"{url}/v1/push", data=body, headers=h) as resp:
                assert resp.status == 200, await resp.text()
                assert decode_push_answer(decode(await resp.read())).acked == part[-1].seq


async def raw_copy_rate(dsn: str, changes: list[Change]) -> float:
    """Rows/s of asyncpg ``COPY`` into a table shaped like the hub's feed: the physical
    limit of getting these rows into this PostgreSQL."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            "CREATE TEMP TABLE copy_probe (id BIGINT PRIMARY KEY, cell TEXT, collection TEXT, "
            "key TEXT, node_id TEXT, lane SMALLINT, seq BIGINT, hlc BIGINT, fields BYTEA)"
        )
        rows = [
            (
                i + 1,
                c.cell,
                c.collection,
                c.key,
                c.node,
                c.lane,
                c.seq,
                c.hlc,
                msgpack.packb(c.fields),
            )
            for i, c in enumerate(changes)
        ]
        start = time.perf_counter()
        for i in range(0, len(rows), 10_000):
            await conn.copy_records_to_table("copy_probe", records=rows[i : i + 10_000])
        return len(rows) / (time.perf_counter() - start)
    finally:
        await conn.close()


def print_figures(result: dict[str, Any], *, as_json: bool) -> None:
    """A benchmark's figures: one JSON line, or one aligned line each."""
    if as_json:
        print(json.dumps(result))
        return
    width = max(map(len, result))
    for k, v in result.items():
        counted = isinstance(v, int) and not isinstance(v, bool)
        print(f"  {k:<{width}} {v:>12,}" if counted else f"  {k:<{width}} {v!s:>12}")
