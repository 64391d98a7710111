"""T15, the authorization and region isolation matrix (RELIABILITY.md §2, invariant 7).

Nodes with random grants (prefix trees over the five regions of ``regions/*.toml``) try a
push, a pull, a snapshot and a records read (``GET /v1/records``) of every cell prefix of
every region, malformed ids and segment-boundary tricks included (a grant of
``west/ng/lagos/clinic-1`` covers ``…/clinic-1/alerts``, never ``…/clinic-12`` nor
``…/clinic-1-b``). Requests alternate between two west hub processes on one database (one
with the Redis feed cache, one without, so both read paths are scanned) and go to an east
hub on a database of its own; each node's token is also tried at the other region's hub.

Every answer is compared with a small model of DESIGN.md's rules, written here and sharing no
code with the hub: a node reads and writes a cell when the cell's home region is the hub's and
one of its grants is the cell or a whole-segment ancestor of it; anything else is a 403 with
``foreign_region`` or ``not_granted`` (a malformed id is a 400 ``invalid_cell``). Every row of
every page read is checked against the model too (leaked rows; and seeded rows a complete
page lacks, so an always-empty answer cannot pass), and so is every row the hubs hold at the
end, read with asyncpg: none outside its hub's region, none written by a node the model does
not allow. One node's grants are widened to foreign regions behind the hub's back (SQL): its
pushes of those cells must still be refused, the hub stores only its own region.

The negative control runs a small matrix against a hub whose grant check is a plain string
``startswith`` (monkeypatched in): it must show unexpected allows and leaked rows.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import re
import time
import tomllib
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import msgpack
import pytest

from fault.common import Violations
from fault.harness import SEED, Summary, pick
from support.servers import PostgresServer
from syncengine.hub import nodes as hub_nodes
from syncengine.protocol import PROTOCOL_VERSION

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
SEGMENT = re.compile(r"[a-z0-9_-]+\Z")
#: Sites of every city: the boundary tricks are in the names (``clinic-1`` is a string
#: prefix of the others, never a segment prefix).
SITES = ["clinic-1", "clinic-12", "clinic-10", "clinic-1-b", "shop-3"]
SUBCELLS = ["alerts", "visits"]
CITIES = ["lagos", "lag", "kano", "abuja", "port", "harbour", "hill"]
#: Ids the hub must refuse as malformed (400 ``invalid_cell``) whoever asks.
MALFORMED = [
    "west/ng/lagos/clinic-1/",
    "west//ng/lagos",
    "West/ng/lagos",
    "west/ng/../ng/lagos",
    "west/ng/./lagos",
    "westx/ng/lagos",
    "west/ng/lagos/clinic-1*",
    "west/ng/lagos/clinic-1%",
    "west/ng/lagos/clinic 1",
    "/west/ng",
    "west/ng/lagos/CLINIC-1",
]
PULL_LIMIT = 5000


# ------------------------------------------------------------------------- the model


def regions() -> dict[str, list[str]]:
    """Region code → member countries (lower-case), from ``regions/*.toml``."""
    out = {}
    for path in sorted((ROOT / "regions").glob("*.toml")):
        data = tomllib.loads(path.read_text())
        out[data["code"]] = [c.lower() for c in data["countries"]]
    return out


REGIONS = regions()


def well_formed(target: str, *, min_depth: int) -> bool:
    """A cell id (``min_depth`` 2) or prefix (1): lower-case segments, a region first."""
    segments = target.split("/")
    return (
        0 < len(target) <= 255
        and min_depth <= len(segments) <= 16
        and all(SEGMENT.match(s) and len(s) <= 64 for s in segments)
        and segments[0] in REGIONS
    )


def covered(prefix: str, cell: str) -> bool:
    """The prefix is the cell or one of its whole-segment ancestors."""
    return cell == prefix or cell.startswith(prefix + "/")


def expected(
    grants: Sequence[str], hub_region: str, target: str, *, min_depth: int
) -> tuple[int, str]:
    """What the hub must answer a node with ``grants`` asking for ``target``: ``(200, "")``
    or the status and error code of the refusal."""
    if not well_formed(target, min_depth=min_depth):
        return 400, "invalid_cell"
    if target.split("/", 1)[0] != hub_region:
        return 403, "foreign_region"
    if not any(covered(g, target) for g in grants):
        return 403, "not_granted"
    return 200, ""


def readable(grants: Sequence[str], hub_region: str, cell: str) -> bool:
    return expected(grants, hub_region, cell, min_depth=1)[0] == 200


# ------------------------------------------------------------------------- the world


def prefix_tree(rng: random.Random, region: str, countries: int, cities: int) -> list[str]:
    """Every prefix of one region's tree, the region code itself included."""
    chosen = rng.sample(REGIONS[region], countries)
    if region == "west":  # the canonical trick lives here whatever the seed
        chosen = ["ng", *[c for c in chosen if c != "ng"]][:countries]
    out = [region]
    for country in chosen:
        out.append(f"{region}/{country}")
        names = rng.sample(CITIES, cities)
        if (region, country) == ("west", "ng"):
            names = ["lagos", "lag", *[n for n in names if n not in ("lagos", "lag")]][:cities]
        for city in names:
            out.append(f"{region}/{country}/{city}")
            for site in SITES:
                out.append(f"{region}/{country}/{city}/{site}")
                out += [f"{region}/{country}/{city}/{site}/{sub}" for sub in SUBCELLS]
    return out


@dataclass
class Node:
    node_id: str
    region: str
    #: The grants the model judges by (the misgranted node's include foreign regions).
    grants: tuple[str, ...]
    urls: tuple[str, ...]
    token: str = ""
    seq: int = 0
    pushed: list[str] = field(default_factory=list)  # keys the hub acknowledged


@dataclass
class Tally(Violations):
    pairs: int = 0
    requests: int = 0
    allowed: int = 0
    denied: int = 0
    rows_scanned: int = 0


@dataclass
class Hubs:
    """The hubs under test: region → URLs of its processes, and each region's DSN."""

    urls: dict[str, tuple[str, ...]]
    dsns: dict[str, str]


def headers(token: str) -> dict[str, str]:
    # No zstd: pages come back as plain msgpack, which the checker reads on its own.
    return {
        "Authorization": f"Bearer {token}",
        "Content-Type": "application/msgpack",
        "Accept-Encoding": "identity",
    }


def push_body(node: Node, cell: str, key: str, value: int, seq: int) -> bytes:
    """One change as the protocol carries it, built by hand: the client must not refuse to
    send what the hub is there to refuse."""
    hlc = ((time.time_ns() // 1_000_000) << 16) + seq
    return bytes(
        msgpack.packb(
            {
                "v": PROTOCOL_VERSION,
                "node": node.node_id,
                "lane": 2,
                "first": seq,
                "last": seq,
                "skipped": [],
                "cells": [cell],
                "colls": ["visits"],
                "changes": [[0, 0, key, hlc, {"v": value}, None]],
            },
            use_bin_type=True,
        )
    )


async def answer(resp: aiohttp.ClientResponse) -> tuple[int, Any]:
    raw = await resp.read()
    if resp.content_type == "application/msgpack":
        return resp.status, msgpack.unpackb(raw, raw=False)
    try:
        return resp.status, json.loads(raw)
    except ValueError:
        return resp.status, {"raw": raw[:200].decode(errors="replace")}


def judge(
    tally: Tally, op: str, node: Node, target: str, want: tuple[int, str], got: tuple[int, Any]
) -> bool:
    """Count one answer against the model; True when the hub allowed it."""
    status, body = got
    tally.requests += 1
    what = (
        f"{op} {node.node_id} {node.grants} {target!r}: want {want}, got {status} {str(body)[:160]}"
    )
    if status >= 500:
        tally.bad("server_errors", what)
        return False
    if status == 200:
        tally.allowed += 1
        if want[0] != 200:
            tally.bad("unexpected_allows", what)
        return True
    tally.denied += 1
    if want[0] == 200:
        tally.bad("unexpected_denies", what)
    elif (
        status != want[0]
        or not isinstance(body, dict)
        or body.get("error") != want[1]
        or not body.get("message")
        or "detail" not in body
    ):
        tally.bad("unclear_denials", what)
    return False


def scan_rows(
    tally: Tally,
    op: str,
    node: Node,
    region: str,
    prefix: str,
    cells: list[str],
    seeded: dict[str, int],
    complete: bool,
) -> None:
    """Leaked rows: any cell returned that the prefix does not cover or the node may not
    read. Missing rows: a seeded cell under the prefix that a complete answer lacks (an
    answer that always came back empty would otherwise pass every leak check)."""
    tally.rows_scanned += len(cells)
    for cell in cells:
        if not (covered(prefix, cell) and readable(node.grants, region, cell)):
            tally.bad("leaked_rows", f"{op} {node.node_id} {node.grants} {prefix!r} got {cell!r}")
    if complete and readable(node.grants, region, prefix):
        have = set(cells)
        for cell in seeded:
            if covered(prefix, cell) and cell not in have:
                tally.bad("missing_rows", f"{op} {node.node_id} {prefix!r} lacks {cell!r}")


async def try_pair(
    http: aiohttp.ClientSession,
    tally: Tally,
    node: Node,
    url: str,
    target: str,
    seeded: dict[str, int],
) -> None:
    """Push, pull, snapshot and records read of one (node, prefix) pair, each judged and
    scanned."""
    tally.pairs += 1
    h = headers(node.token)
    # push: one change; the node's seq moves only when the hub took it.
    key = f"m-{node.node_id}-{tally.requests}"
    want = expected(node.grants, node.region, target, min_depth=2)
    async with http.post(
        f"{url}/v1/push", data=push_body(node, target, key, 1, node.seq + 1), headers=h
    ) as resp:
        got = await answer(resp)
    if judge(tally, "push", node, target, want, got):
        node.seq += 1
        node.pushed.append(key)
    want = expected(node.grants, node.region, target, min_depth=1)
    params = {"tier": "standard", "after": "0", "limit": str(PULL_LIMIT), "prefix": target}
    async with http.get(f"{url}/v1/pull", params=params, headers=h) as resp:
        got = await answer(resp)
    if judge(tally, "pull", node, target, want, got):
        page = got[1]
        # Rows name their cell by its index in the page's cell table.
        rows = [page["cells"][r[4]] for r in page["changes"]]
        scan_rows(tally, "pull", node, node.region, target, rows, seeded, not page["more"])
    params = {"prefix": target, "limit": str(PULL_LIMIT)}
    async with http.get(f"{url}/v1/snapshot", params=params, headers=h) as resp:
        got = await answer(resp)
    if judge(tally, "snapshot", node, target, want, got):
        page = got[1]
        rows = [r[0] for r in page["records"]]
        scan_rows(tally, "snapshot", node, node.region, target, rows, seeded, page["next"] is None)
    # records: the read-back of named records (what an edge does for evicted ones).
    want = expected(node.grants, node.region, target, min_depth=2)
    params = {"cell": target, "collection": "seed", "key": "s"}
    async with http.get(f"{url}/v1/records", params=params, headers=h) as resp:
        got = await answer(resp)
    if judge(tally, "records", node, target, want, got):
        rows = [r[0] for r in got[1]["records"]]
        for cell in rows:
            if cell != target:
                tally.bad("leaked_rows", f"records {node.node_id} {target!r} got {cell!r}")
        only = {target: 1} if target in seeded else {}
        scan_rows(tally, "records", node, node.region, target, rows, only, True)


async def seed(http: aiohttp.ClientSession, hub_url: str, seeder: Node, cells: list[str]) -> None:
    """The seeder (granted its whole region) writes one record into every cell, in one
    batch: the data every leak check looks for."""
    hlc = (time.time_ns() // 1_000_000) << 16
    body = msgpack.packb(
        {
            "v": PROTOCOL_VERSION,
            "node": seeder.node_id,
            "lane": 2,
            "first": 1,
            "last": len(cells),
            "skipped": [],
            "cells": cells,
            "colls": ["seed"],
            "changes": [[i, 0, "s", 1 if i else hlc, {"c": c}, None] for i, c in enumerate(cells)],
        },
        use_bin_type=True,
    )
    async with http.post(f"{hub_url}/v1/push", data=body, headers=headers(seeder.token)) as resp:
        status, got = await answer(resp)
    assert status == 200, f"seeding {len(cells)} cells failed: {status} {got}"


async def stored_violations(tally: Tally, dsn: str, region: str, nodes: Sequence[Node]) -> None:
    """Read what the hub holds (asyncpg, no hub code) and judge every row."""
    by_id = {n.node_id: n for n in nodes}
    conn = await asyncpg.connect(dsn)
    try:
        records = await conn.fetch("SELECT cell, collection, key FROM records")
        feed = await conn.fetch("SELECT cell, key, node_id FROM feed")
    finally:
        await conn.close()
    for r in records:
        if r["cell"].split("/", 1)[0] != region:
            tally.bad("foreign_rows_stored", f"{region} hub holds record {tuple(r)}")
    held: Counter[str] = Counter()
    for r in feed:
        held[r["key"]] += 1
        node = by_id.get(r["node_id"])
        if node is None or not readable(node.grants, region, r["cell"]):
            tally.bad("foreign_rows_stored", f"{region} hub holds {r['node_id']}'s {r['cell']!r}")
    for node in nodes:
        for key in node.pushed:
            if held[key] != 1:
                tally.bad(
                    "lost" if held[key] == 0 else "duplicated",
                    f"{node.node_id}'s acknowledged {key} is in the feed {held[key]} times",
                )


async def run_matrix(
    hubs: Hubs,
    nodes: Sequence[Node],
    targets: Sequence[str],
    seeded: dict[str, dict[str, int]],
    rng: random.Random,
    concurrency: int = 8,
) -> Tally:
    """Every node tries every target on its region's hub processes (alternating); a few
    tries go to the other region's hub with the node's token (which must be unknown
    there)."""
    tally = Tally()
    gate = asyncio.Semaphore(concurrency)
    timeout = aiohttp.ClientTimeout(total=60)

    async def worker(http: aiohttp.ClientSession, node: Node) -> None:
        order = list(targets)
        rng.shuffle(order)
        async with gate:
            for i, target in enumerate(order):
                url = node.urls[i % len(node.urls)]
                await try_pair(http, tally, node, url, target, seeded[node.region])
            # The token belongs to one region's hub: any other hub does not know it.
            for region, urls in hubs.urls.items():
                if region == node.region:
                    continue
                async with http.get(
                    f"{urls[0]}/v1/pull",
                    params={"prefix": node.grants[0]},
                    headers=headers(node.token),
                ) as resp:
                    got = await answer(resp)
                tally.pairs += 1
                judge(tally, "pull@foreign-hub", node, node.grants[0], (401, "invalid_token"), got)

    connector = aiohttp.TCPConnector(limit=concurrency * 2)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
        await asyncio.gather(*(worker(http, n) for n in nodes))
    for region, dsn in hubs.dsns.items():
        await stored_violations(
            tally, dsn, region, [n for n in nodes if n.region == region] + [seeder_of(region, hubs)]
        )
    return tally


def seeder_of(region: str, hubs: Hubs) -> Node:
    return Node(node_id=f"seeder-{region}", region=region, grants=(region,), urls=hubs.urls[region])


async def build_world(
    hubs: Hubs,
    running: dict[str, Any],
    rng: random.Random,
    *,
    countries: int,
    cities: int,
    west_nodes: int,
    east_nodes: int,
) -> tuple[list[Node], list[str], dict[str, dict[str, int]]]:
    """Trees for all five regions, the nodes (registered at their hub) and the seeded data."""
    trees = {r: prefix_tree(rng, r, countries, cities) for r in REGIONS}
    targets = [*itertools.chain.from_iterable(trees.values()), *MALFORMED]
    nodes: list[Node] = []
    for region, count in (("west", west_nodes), ("east", east_nodes)):
        tree = trees[region]
        for i in range(count):
            if region == "west" and i == 0:
                grants: tuple[str, ...] = ("west/ng/lagos/clinic-1",)
            elif region == "west" and i == 1:
                grants = ("west/ng/lag", "west/ng/lagos/clinic-12/alerts")
            else:
                # A country or a city (a subtree: a fair share of tries is allowed) and up
                # to two prefixes of any depth.
                broad = rng.choice([p for p in tree if p.count("/") in (1, 2)])
                grants = (broad, *rng.sample(tree[1:], rng.randint(0, 2)))
                if rng.random() < 0.05:
                    grants = (region,)
            nodes.append(
                Node(node_id=f"{region}-n{i}", region=region, grants=grants, urls=hubs.urls[region])
            )
    # Granted by SQL to cells of other regions too: still refused, the hub stores its own only.
    misgranted = Node(
        node_id="west-misgranted",
        region="west",
        grants=("west/ng/lagos/clinic-12", "east", "north/eg"),
        urls=hubs.urls["west"],
    )
    nodes.append(misgranted)
    for node in nodes:
        node.token = await running[node.region].add_node(
            node.node_id, *[g for g in node.grants if g.split("/", 1)[0] == node.region]
        )
    conn = await asyncpg.connect(hubs.dsns["west"])
    try:
        await conn.execute(
            "UPDATE nodes SET grants = $2 WHERE node_id = $1",
            misgranted.node_id,
            list(misgranted.grants),
        )
    finally:
        await conn.close()
    seeded: dict[str, dict[str, int]] = {}
    async with aiohttp.ClientSession() as http:
        for region in hubs.urls:
            seeder = seeder_of(region, hubs)
            seeder.token = await running[region].add_node(seeder.node_id, region)
            cells = [c for c in trees[region] if "/" in c]
            await seed(http, hubs.urls[region][0], seeder, cells)
            seeded[region] = dict.fromkeys(cells, 1)
    return nodes, targets, seeded


async def foreign_grant_refused(running: Any, tally: Tally) -> None:
    """Registering a node with a grant of another region is refused outright."""
    try:
        await running.add_node("west-foreign-grant", "east/ke")
    except Exception as exc:
        if getattr(exc, "code", None) != "foreign_grant":
            tally.bad("unclear_denials", f"add-node with east/ke: {exc!r}")
    else:
        tally.bad("unexpected_allows", "add-node accepted a grant of region east at the west hub")
    tally.pairs += 1


@pytest.fixture
def east_dsn(postgres: PostgresServer) -> Any:
    """A database of its own for the east hub (regions never share a store). Requested
    before ``hub_factory`` so it is dropped after the hubs are stopped."""
    postgres.ensure_running()
    name = f"t15_east_{uuid.uuid4().hex[:12]}"
    dsn = postgres.create_database(name)
    yield dsn
    postgres.ensure_running()
    postgres.drop_database(name)


async def start_hubs(hub_factory: Any, west_dsn: str, east_dsn: str) -> tuple[Hubs, dict[str, Any]]:
    west_cached = await hub_factory(tier_rules=[])
    west_plain = await hub_factory(tier_rules=[], redis_url=None)
    east = await hub_factory(region="east", tier_rules=[], database_url=east_dsn)
    hubs = Hubs(
        urls={"west": (west_cached.url, west_plain.url), "east": (east.url,)},
        dsns={"west": west_dsn, "east": east_dsn},
    )
    return hubs, {"west": west_cached, "east": east}


def summarize(name: str, tally: Tally, started: float) -> Summary:
    return Summary(
        test="T15",
        name=name,
        cases=tally.pairs,
        counts={
            "unexpected_allows": tally.counts["unexpected_allows"],
            "unexpected_denies": tally.counts["unexpected_denies"],
            "leaked_rows": tally.counts["leaked_rows"],
            "unclear_denials": tally.counts["unclear_denials"],
            "missing_rows": tally.counts["missing_rows"],
            "foreign_rows_stored": tally.counts["foreign_rows_stored"],
            "lost": tally.counts["lost"],
            "duplicated": tally.counts["duplicated"],
            "server_errors": tally.counts["server_errors"],
        },
        extra_violations=(
            "unexpected_allows",
            "unexpected_denies",
            "leaked_rows",
            "unclear_denials",
            "missing_rows",
            "foreign_rows_stored",
        ),
        figures={
            "requests": tally.requests,
            "allowed": tally.allowed,
            "denied": tally.denied,
            "rows_scanned": tally.rows_scanned,
            "examples": tally.examples,
        },
        started=started,
    )


async def test_t15_isolation_matrix(east_dsn: str, pg_dsn: str, hub_factory: Any) -> None:
    """Every push, pull, snapshot and records read of every (node, prefix) pair is allowed
    or refused exactly as the grant model says, refusals are clear 403s (400 for malformed
    ids), no page carries a row the node may not read, and no hub holds a row of another
    region or one its writer was not granted — also for a node granted foreign regions by
    SQL."""
    started = time.monotonic()
    rng = random.Random(SEED)
    hubs, running = await start_hubs(hub_factory, pg_dsn, east_dsn)
    nodes, targets, seeded = await build_world(
        hubs,
        running,
        rng,
        countries=pick(2, 3),
        cities=pick(2, 3),
        west_nodes=pick(4, 60),
        east_nodes=pick(1, 8),
    )
    tally = await run_matrix(hubs, nodes, targets, seeded, rng)
    await foreign_grant_refused(running["west"], tally)
    summary = summarize("isolation matrix", tally, started)
    summary.figures.update(nodes=len(nodes), targets=len(targets))
    summary.finish()
    assert tally.pairs >= pick(2_000, 50_000), f"only {tally.pairs} pairs: below the plan's figure"
    assert tally.allowed >= tally.requests // 50 and tally.denied >= tally.requests // 2, (
        f"allowed {tally.allowed}, denied {tally.denied} of {tally.requests} requests: the "
        "matrix barely exercised one side"
    )


async def test_t15_control_segment_blind_grant_check(
    east_dsn: str, pg_dsn: str, hub_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Negative control: with the hub's grant check a plain string ``startswith`` (so
    ``west/ng/lagos/clinic-1`` also matches ``clinic-12``), the matrix of the ``lagos`` and
    ``lag`` subtrees must report unexpected allows and leaked rows: the checker sees the bug
    it guards against."""
    monkeypatch.setattr(hub_nodes, "covers", lambda prefix, cell: cell.startswith(prefix))
    started = time.monotonic()
    rng = random.Random(SEED)
    hubs, running = await start_hubs(hub_factory, pg_dsn, east_dsn)
    nodes, targets, seeded = await build_world(
        hubs, running, rng, countries=1, cities=2, west_nodes=2, east_nodes=0
    )
    west_targets = [t for t in targets if t.startswith("west/ng/lag")]
    tally = await run_matrix(hubs, nodes[:2], west_targets, seeded, rng)
    summary = summarize("control: startswith grant check", tally, started)
    summary.control("unexpected_allows")
    assert tally.counts["leaked_rows"] > 0, "the broken build leaked no rows: the scan is blind"
