"""The edge daemon, embedded in the test's event loop, against a real hub: critical writes
leave at once, important ones on their interval, standard ones only in the off-peak window;
a critical write overtakes a large archive backlog; a dead link is waited out quietly and
critical goes first when it returns."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from support.proxy import ProxyFactory
from support.servers import free_port
from syncengine.config import EdgeConfig
from syncengine.edge.daemon import EdgeDaemon, LinkState
from syncengine.edge.link import HubLink
from syncengine.edge.store import EdgeStore
from syncengine.edge.sync import Syncer
from syncengine.regions import load_regions
from syncengine.tiers import Tier

pytestmark = pytest.mark.integration

CELL = "west/ng/lagos/clinic-12"
ALERTS = f"{CELL}/alerts"  # critical by the hub fixture's rules
STOCK = f"{CELL}/stock"  # important
ARCHIVE = f"{CELL}/2019"  # archive
VISITS = f"{CELL}/visits"  # standard (no rule)
WEST = load_regions()["west"]


def edge_config(
    tmp_path: Path,
    url: str,
    token: str,
    *,
    metrics_listen: str | None = None,
    **policies: dict[str, Any],
) -> EdgeConfig:
    """An edge config for node ``n1`` with the hub's tier rules (so the store lanes match
    before the first sync) and ``policies`` as ``[tier_policies.<tier>]`` overrides."""
    extra = {"metrics_listen": metrics_listen} if metrics_listen else {}
    return EdgeConfig.from_mapping(
        {
            **extra,
            "node_id": "n1",
            "region": "west",
            "db": str(tmp_path / "n1.db"),
            "hub_url": url,
            "token": token,
            "subscriptions": [CELL],
            "tier_rules": [
                {"prefix": ALERTS, "tier": "critical"},
                {"prefix": STOCK, "tier": "important"},
                {"prefix": ARCHIVE, "tier": "archive"},
            ],
            "resolvers": {"stock": "counter"},
            "tier_policies": policies,
        }
    )


def clock_at(local: dt.time, *, day_offset: int = 0) -> Callable[[], dt.datetime]:
    """A clock that reads ``local`` (region time) now and runs at real speed."""
    real = dt.datetime.now(WEST.timezone)
    target = dt.datetime.combine(real.date() + dt.timedelta(days=day_offset), local, WEST.timezone)
    offset = target - real
    return lambda: dt.datetime.now(dt.UTC) + offset


#: Inside the west window (00:00-05:00 Lagos), and well outside it.
IN_WINDOW = clock_at(dt.time(1, 0))
OUT_OF_WINDOW = clock_at(dt.time(12, 0))


async def until(
    check: Callable[[], Any], *, timeout: float, what: str, every: float = 0.01
) -> float:
    """Poll ``await check()`` until truthy; return the seconds it took."""
    start = time.monotonic()
    while True:
        if await check():
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(every)


@asynccontextmanager
async def running(config: EdgeConfig, **kw: Any) -> AsyncIterator[EdgeDaemon]:
    kw.setdefault("now", OUT_OF_WINDOW)
    async with EdgeDaemon(config, region=WEST, **kw) as daemon:
        await until(
            lambda: _true(daemon.link_state is LinkState.ONLINE), timeout=10, what="the link"
        )
        yield daemon


async def _true(value: bool) -> bool:
    return value


def at_hub(hub: Any, cell: str, key: str) -> Callable[[], Any]:
    async def check() -> bool:
        found = await hub.hub.pool.fetchval(
            "SELECT count(*) FROM records WHERE cell = $1 AND key = $2", cell, key
        )
        return bool(found)

    return check


async def test_a_critical_write_leaves_at_once(tmp_path: Path, hub: Any) -> None:
    token = await hub.add_node("n1")
    async with running(edge_config(tmp_path, hub.url, token)) as daemon:
        latencies = []
        for i in range(20):
            await daemon.store.put(ALERTS, "alarms", f"a{i}", {"level": i})
            latencies.append(
                await until(at_hub(hub, ALERTS, f"a{i}"), timeout=5, what=f"alarm a{i}")
            )
        latencies.sort()
        # Debounce (50 ms) plus one push on loopback; generous for a loaded CI machine.
        assert latencies[len(latencies) // 2] < 1.0, latencies


async def test_a_critical_write_of_another_process_is_noticed(tmp_path: Path, hub: Any) -> None:
    token = await hub.add_node("n1")
    config = edge_config(tmp_path, hub.url, token)
    # A second store on the same file stands for the application's process: its commits
    # reach the daemon only through the file (PRAGMA data_version).
    async with (
        running(config),
        EdgeStore.open(config.db, node_id="n1", region="west", tier_rules=config.tier_rules) as app,
    ):
        await app.put(ALERTS, "alarms", "from-app", {"level": "high"})
        took = await until(at_hub(hub, ALERTS, "from-app"), timeout=5, what="the alarm")
    assert took < 2.0


async def test_an_important_write_waits_for_its_interval(tmp_path: Path, hub: Any) -> None:
    token = await hub.add_node("n1")
    config = edge_config(
        tmp_path, hub.url, token, important={"push_interval_s": 3, "pull_interval_s": 3}
    )
    async with running(config) as daemon:
        await until(
            lambda: _true("push:important" in daemon.health().last_success),
            timeout=5,
            what="the start-up round",
        )
        written = time.monotonic()
        await daemon.store.put(STOCK, "stock", "gloves", {"count": 5})
        await asyncio.sleep(1.0)
        assert not await at_hub(hub, STOCK, "gloves")(), "pushed before its interval"
        await until(at_hub(hub, STOCK, "gloves"), timeout=8, what="the interval push")
        assert time.monotonic() - written >= 1.0


async def test_a_standard_write_waits_for_the_offpeak_window(tmp_path: Path, hub: Any) -> None:
    token = await hub.add_node("n1")
    config = edge_config(tmp_path, hub.url, token)
    async with EdgeStore.open(
        config.db, node_id="n1", region="west", tier_rules=config.tier_rules
    ) as store:
        await store.put(VISITS, "visits", "v1", {"reason": "fever"})
    # The window (00:00 Lagos) opens three seconds after the daemon starts.
    opens_soon = clock_at(dt.time(23, 59, 57))
    async with running(config, now=opens_soon) as daemon:
        assert "push:standard" in daemon.health().deferred
        await asyncio.sleep(1.5)
        assert not await at_hub(hub, VISITS, "v1")(), "pushed outside the window"
        await until(at_hub(hub, VISITS, "v1"), timeout=10, what="the window push")
        assert opens_soon().astimezone(WEST.timezone).time() < dt.time(0, 1)


async def test_sync_now_forces_a_tier_outside_its_window(tmp_path: Path, hub: Any) -> None:
    token = await hub.add_node("n1")
    async with running(edge_config(tmp_path, hub.url, token)) as daemon:
        await daemon.store.put(VISITS, "visits", "v2", {"reason": "cough"})
        await asyncio.sleep(0.5)
        assert not await at_hub(hub, VISITS, "v2")()
        daemon.sync_now([Tier.STANDARD])
        await until(at_hub(hub, VISITS, "v2"), timeout=5, what="the forced push")


async def test_a_critical_write_overtakes_an_archive_backlog(tmp_path: Path, hub: Any) -> None:
    token = await hub.add_node("n1")
    config = edge_config(tmp_path, hub.url, token)
    async with EdgeStore.open(
        config.db, node_id="n1", region="west", tier_rules=config.tier_rules
    ) as store:
        await asyncio.gather(
            *(store.put(ARCHIVE, "visits", f"old-{i}", {"n": i}) for i in range(50_000))
        )
    pool = hub.hub.pool
    archive_lane = Tier.ARCHIVE.priority

    async def archive_at_hub() -> int:
        return int(await pool.fetchval("SELECT count(*) FROM feed WHERE lane = $1", archive_lane))

    async with running(config, now=IN_WINDOW) as daemon:
        await until(lambda: _gt(archive_at_hub(), 2000), timeout=30, what="the archive push")
        await daemon.store.put(ALERTS, "alarms", "urgent", {"level": "high"})
        # The feed's head once the write is acknowledged: archive changes after it and
        # before the alarm overtook it (the batches already in flight may be among them).
        head_at_write = await pool.fetchval("SELECT coalesce(max(id), 0) FROM feed")
        await until(at_hub(hub, ALERTS, "urgent"), timeout=10, what="the alarm")
        critical_id = await pool.fetchval("SELECT id FROM feed WHERE lane = 0 AND key = 'urgent'")
        overtaken_by = await pool.fetchval(
            "SELECT count(*) FROM feed WHERE lane = $1 AND id > $2 AND id < $3",
            archive_lane,
            head_at_write,
            critical_id,
        )
        remaining = 50_000 - await archive_at_hub()
        logging.getLogger(__name__).info(
            "archive changes landed between the critical write and its arrival: %d",
            overtaken_by,
        )
        # At most the batches in flight when the alarm was written: a push keeps one batch
        # ahead of the one it waits on, and batches are capped by the hub's max_batch_changes.
        assert overtaken_by <= 2 * hub.config.max_batch_changes, overtaken_by
        assert remaining > 0, "the backlog was gone before the alarm: the test proved nothing"


async def _gt(value: Any, floor: int) -> bool:
    return bool(await value > floor)


async def test_offline_is_waited_out_quietly_and_critical_goes_first(
    tmp_path: Path, hub: Any, fault_proxy: ProxyFactory, caplog: pytest.LogCaptureFixture
) -> None:
    host, port = hub.url.removeprefix("http://").split(":")
    proxy = await fault_proxy(host, int(port))
    token = await hub.add_node("n1")
    config = edge_config(
        tmp_path,
        f"http://127.0.0.1:{proxy.port}",
        token,
        critical={"retry_interval_s": 1},
        important={"push_interval_s": 1, "pull_interval_s": 1},
    )
    caplog.set_level(logging.INFO, logger="syncengine")
    async with running(config) as daemon:
        proxy.refuse()
        proxy.cut()
        await daemon.store.put(ALERTS, "alarms", "offline-1", {"level": "high"})
        await until(
            lambda: _true(daemon.link_state is LinkState.OFFLINE), timeout=10, what="offline"
        )
        for i in range(20):  # writes keep landing locally while offline
            await daemon.store.put(STOCK, "stock", f"item-{i}", {"count": 1})
            await daemon.store.put(ALERTS, "alarms", f"offline-{i + 2}", {"level": "low"})
            await asyncio.sleep(0.2)
        offline_lines = [r for r in caplog.records if "unreachable" in r.getMessage()]
        assert len(offline_lines) == 1, [r.getMessage() for r in offline_lines]
        assert not await at_hub(hub, ALERTS, "offline-1")()
        proxy.refuse(False)
        await until(at_hub(hub, ALERTS, "offline-21"), timeout=15, what="the critical backlog")
        await until(at_hub(hub, STOCK, "item-19"), timeout=15, what="the important backlog")
        first_critical, first_important = await hub.hub.pool.fetchrow(
            "SELECT (SELECT min(id) FROM feed WHERE lane = 0 AND key LIKE 'offline-%'), "
            "(SELECT min(id) FROM feed WHERE lane = 1 AND key LIKE 'item-%')"
        )
        assert first_critical < first_important, "important went before critical"
        back = [r for r in caplog.records if "reachable again" in r.getMessage()]
        assert len(back) == 1


async def test_close_is_prompt_and_leaves_the_store_consistent(tmp_path: Path, hub: Any) -> None:
    token = await hub.add_node("n1")
    config = edge_config(tmp_path, hub.url, token)
    daemon = EdgeDaemon(config, region=WEST, now=OUT_OF_WINDOW)
    await daemon.start()
    writes = [daemon.store.put(ALERTS, "alarms", f"c{i}", {"i": i}) for i in range(500)]
    await asyncio.gather(*writes)
    started = time.monotonic()
    await daemon.close()
    await daemon.close()  # idempotent
    assert time.monotonic() - started < 5
    async with EdgeStore.open(config.db, node_id="n1", region="west") as store:
        assert await store.integrity_check() == "ok"
        pending = (await store.outbox.status())[0]
        landed = await hub.hub.pool.fetchval("SELECT count(*) FROM feed WHERE lane = 0")
        # Every write is either at the hub or still queued; nothing is in between.
        assert pending.depth + landed == 500


# ------------------------------------------------------------------------------- metrics


async def scrape(http: aiohttp.ClientSession, url: str) -> dict[tuple[str, frozenset[Any]], float]:
    """Every sample of a /metrics page, parsed by prometheus-client's own parser."""
    async with http.get(url) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = await resp.text()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def moved(
    before: dict[tuple[str, frozenset[Any]], float],
    after: dict[tuple[str, frozenset[Any]], float],
    name: str,
    **labels: str,
) -> float:
    key = (name, frozenset(labels.items()))
    assert key in after, f"{name}{labels} is not exported"
    return after[key] - before.get(key, 0.0)


async def test_both_metrics_endpoints_move_when_work_happens(tmp_path: Path, hub: Any) -> None:
    token = await hub.add_node("n1")
    port = free_port()
    config = edge_config(tmp_path, hub.url, token, metrics_listen=f"127.0.0.1:{port}")
    other_token = await hub.add_node("n2")
    async with AsyncExitStack() as stack:
        daemon = await stack.enter_async_context(running(config))
        http = await stack.enter_async_context(aiohttp.ClientSession())
        edge_url, hub_url = f"http://127.0.0.1:{port}/metrics", f"{hub.url}/metrics"
        await until(lambda: _true(daemon.health().bootstrapped), timeout=10, what="bootstrap")
        edge0, hub0 = await scrape(http, edge_url), await scrape(http, hub_url)
        assert edge0[("syncengine_edge_link_up", frozenset())] == 1

        # A critical write leaves at once; another node's write is pulled live.
        await daemon.store.put(ALERTS, "alarms", "m1", {"level": 1})
        await until(at_hub(hub, ALERTS, "m1"), timeout=10, what="the push")
        other = await stack.enter_async_context(
            EdgeStore.open(
                tmp_path / "n2.db", node_id="n2", region="west", tier_rules=config.tier_rules
            )
        )
        link = await stack.enter_async_context(HubLink(hub.url, other_token, node_id="n2"))
        await other.put(ALERTS, "alarms", "m2", {"level": 2})
        assert (await Syncer(other, link, subscriptions=[]).sync_once()).caught_up

        async def pulled() -> bool:
            return await daemon.store.get(ALERTS, "alarms", "m2") is not None

        await until(pulled, timeout=10, what="the live pull")
        await daemon.store.put(VISITS, "visits", "v1", {"x": 1})  # standard: waits off-peak
        edge1, hub1 = await scrape(http, edge_url), await scrape(http, hub_url)

    assert moved(edge0, edge1, "syncengine_edge_pushes_total", tier="critical") >= 1
    assert moved(edge0, edge1, "syncengine_edge_changes_pushed_total", tier="critical") == 1
    assert moved(edge0, edge1, "syncengine_edge_changes_pulled_total", tier="critical") == 1
    assert moved(edge0, edge1, "syncengine_edge_pulls_total", tier="critical") >= 1
    assert moved(edge0, edge1, "syncengine_edge_push_batch_changes_count") >= 1
    assert moved(edge0, edge1, "syncengine_edge_sent_bytes_total") > 0
    assert moved(edge0, edge1, "syncengine_edge_received_bytes_total") > 0
    assert edge1[("syncengine_edge_queue_depth", frozenset({("tier", "standard")}))] == 1
    assert edge1[("syncengine_edge_queue_depth", frozenset({("tier", "critical")}))] == 0
    assert (
        edge1[("syncengine_edge_oldest_pending_age_seconds", frozenset({("tier", "standard")}))]
        >= 0
    )
    assert ("syncengine_edge_pull_lag", frozenset({("tier", "critical")})) in edge1
    assert edge1[("syncengine_edge_dead_letters", frozenset())] == 0
    assert moved(hub0, hub1, "syncengine_hub_pushes_total", tier="critical") >= 2
    assert moved(hub0, hub1, "syncengine_hub_changes_applied_total") == 2
    assert moved(hub0, hub1, "syncengine_hub_received_bytes_total") > 0
    assert moved(hub0, hub1, "syncengine_hub_pulls_total", tier="critical") >= 1


class CountingLink(HubLink):
    """A link that lists the route and ``wait`` of every request it sends."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.sent: list[tuple[str, str]] = []

    async def _call(self, method: str, path: str, **kw: Any) -> Any:
        params = dict(kw.get("params") or ())
        self.sent.append((path, f"{params.get('tier', '')}:{params.get('wait', '')}"))
        return await super()._call(method, path, **kw)


async def test_an_idle_edge_holds_one_long_poll_that_stands_in_for_interval_pulls(
    tmp_path: Path, hub: Any
) -> None:
    token = await hub.add_node("n1")
    writer_token = await hub.add_node("w1")
    config = edge_config(
        tmp_path,
        hub.url,
        token,
        critical={"long_poll_s": 1, "long_poll_idle_s": 4},
        important={"pull_interval_s": 1, "push_interval_s": 1},
    )
    link = CountingLink(hub.url, token, node_id="n1")
    async with link, running(config, link=link) as daemon:
        await asyncio.sleep(9)
        polls = [w for path, w in link.sent if path == "v1/pull" and w.startswith("critical")]
        others = [(p, w) for p, w in link.sent if p == "v1/pull" and not w.startswith("critical")]
        # The waits double while nothing comes: 1, 2, 4, 4 ... (not nine 1 s polls).
        assert polls[:4] == ["critical:1", "critical:2", "critical:4", "critical:4"], polls
        # Important is pulled at start (and maybe once before the first long-poll has
        # reported on it), then only through the watch: not every second.
        assert len(others) <= 3, others
        assert len([p for p, _ in link.sent if p == "v1/config"]) == 1, link.sent

        # A change for this node in the watched tier ends the long-poll: pulled at once.
        async with HubLink(hub.url, writer_token, node_id="w1") as wlink:
            store = await EdgeStore.open(tmp_path / "w1.db", node_id="w1", region="west")
            async with store:
                writer = Syncer(store, wlink, subscriptions=[])
                await writer.learn_config()
                await store.put(STOCK, "stock", "soap", {"qty": 3})
                await writer.push_lane(Tier.IMPORTANT.priority)
        took = await until(
            lambda: daemon.store.get(STOCK, "stock", "soap"), timeout=5, what="the stock change"
        )
        assert took < 2.0
        # Its cursor moved with the watch, so status shows the tier as pulled.
        assert "pull:important" in daemon.health().last_success
