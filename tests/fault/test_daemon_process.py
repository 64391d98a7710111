"""``syncengine edge run`` as a real process against a real hub: systemd readiness, a clean
SIGTERM, critical writes of another process reaching the hub within a second, kill -9 and
SIGTERM in the middle of a large pull and of a bootstrap (it resumes and converges), and a
soak behind a link cut every five seconds (bounded memory, idle CPU offline, nothing lost).

The soak runs ``SYNCENGINE_SOAK_S`` seconds (default 120 in CI; the issue's figure is 600).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sqlite3
import statistics
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import psutil
import pytest

from fault.common import Daemon, write_edge_config
from support.proxy import ProxyFactory
from syncengine.edge.link import HubLink
from syncengine.edge.store import EdgeStore
from syncengine.edge.sync import Syncer
from syncengine.tiers import TierRules

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CELL = "west/ng/lagos/clinic-12"
ALERTS = f"{CELL}/alerts"  # critical
STOCK = f"{CELL}/stock"  # important
RULES = [
    {"prefix": ALERTS, "tier": "critical"},
    {"prefix": STOCK, "tier": "important"},
    {"prefix": f"{CELL}/2019", "tier": "archive"},
]
TIER_RULES = TierRules.from_config(RULES, source="test", region="west")
SOAK_S = float(os.environ.get("SYNCENGINE_SOAK_S", "120"))


def write_config(tmp_path: Path, url: str, token: str, node: str = "n1", **extra: str) -> Path:
    return write_edge_config(
        tmp_path / f"{node}.toml",
        node=node,
        db=tmp_path / (node + ".db"),
        url=url,
        token=token,
        subscriptions=[CELL],
        rules=RULES,
        more=[
            'resolvers = { stock = "counter" }',
            "",
            "[tier_policies.important]",
            "push_interval_s = 2",
            "pull_interval_s = 2",
            "[tier_policies.critical]",
            "retry_interval_s = 2",
            *(f"{k} = {v}" for k, v in extra.items()),
        ],
    )


@asynccontextmanager
async def daemon(config: Path, env: dict[str, str] | None = None) -> AsyncIterator[Daemon]:
    d = await Daemon(config, env).start()
    try:
        yield d
    finally:
        if d.proc is not None and d.proc.returncode is None:
            await d.stop(signal.SIGKILL)


def edge_rows(db: Path) -> dict[tuple[str, str, str], bytes]:
    with sqlite3.connect(db) as conn:
        return {
            (c, col, k): bytes(s)
            for c, col, k, s in conn.execute("SELECT cell, collection, key, state FROM records")
        }


async def hub_rows(hub: Any) -> dict[tuple[str, str, str], bytes]:
    rows = await hub.hub.pool.fetch("SELECT cell, collection, key, state FROM records")
    return {(r["cell"], r["collection"], r["key"]): bytes(r["state"]) for r in rows}


def scalar(db: Path, sql: str) -> Any:
    """One value read straight from the file; None while the daemon has not created the
    table yet (the file exists a moment before its migrations ran)."""
    with sqlite3.connect(db) as conn:
        try:
            row = conn.execute(sql).fetchone()
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):
                return None
            raise
    return row[0] if row else None


async def until(
    check: Callable[[], Any], *, timeout: float, what: str, every_s: float = 0.05
) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(every_s)


async def converged(hub: Any, db: Path) -> bool:
    """Whether the edge file holds exactly the hub's records. Counts first: reading 20,000
    rows of both sides on every poll would take the CPU the daemon under test needs."""
    if scalar(db, "SELECT count(*) FROM records") != await hub.hub.pool.fetchval(
        "SELECT count(*) FROM records"
    ):
        return False
    return edge_rows(db) == await hub_rows(hub)


async def fill_hub(hub: Any, tmp_path: Path, count: int) -> None:
    """Another node writes ``count`` important records (and a few critical) to the hub."""
    token = await hub.add_node("n2")
    async with AsyncExitStack() as stack:
        store = await stack.enter_async_context(
            EdgeStore.open(tmp_path / "n2.db", node_id="n2", region="west", tier_rules=TIER_RULES)
        )
        link = await stack.enter_async_context(HubLink(hub.url, token, node_id="n2"))
        syncer = Syncer(store, link, subscriptions=[])
        await syncer.learn_config()  # the hub's resolvers before the first write
        await asyncio.gather(
            *(
                store.put(STOCK, "items", f"item-{i}", {"count": i % 7, "note": "x" * 60})
                for i in range(count)
            )
        )
        await asyncio.gather(*(store.put(ALERTS, "alarms", f"a-{i}", {"l": i}) for i in range(50)))
        report = await syncer.sync_once()
        assert report.caught_up, report.errors
        assert await store.outbox.dead_letters() == []


# ----------------------------------------------------------------------------- lifecycle


async def test_ready_sigterm_and_json_logs(tmp_path: Path, hub: Any) -> None:
    token = await hub.add_node("n1")
    config = write_config(tmp_path, hub.url, token)
    notify_path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(notify_path))
        sock.setblocking(False)
        env = {"NOTIFY_SOCKET": str(notify_path), "WATCHDOG_USEC": "1000000"}
        async with daemon(config, env) as d:
            loop = asyncio.get_running_loop()
            got: list[bytes] = []
            while b"READY=1" not in got:
                got.append(await asyncio.wait_for(loop.sock_recv(sock, 256), 15))
            await d.wait_said("reachable")
            while b"WATCHDOG=1" not in got:  # the store answers: keep-alives flow
                got.append(await asyncio.wait_for(loop.sock_recv(sock, 256), 5))
            started = time.monotonic()
            assert await d.stop(signal.SIGTERM) == 0
            assert time.monotonic() - started < 10
            while b"STOPPING=1" not in got:
                got.append(await asyncio.wait_for(loop.sock_recv(sock, 256), 5))
    events = d.events()
    assert events, d.lines
    assert all({"ts", "level", "logger", "message"} <= e.keys() for e in events)
    assert any("edge daemon stopped" in e["message"] for e in events)
    assert all("Bearer" not in line and token not in line for line in d.lines)


async def test_a_bad_config_exits_1_with_a_hint(tmp_path: Path) -> None:
    config = tmp_path / "edge.toml"
    config.write_text('node_id = "n1"\nregion = "west"\ndb = "x.db"\n')
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "syncengine",
        "edge",
        "run",
        "--config",
        str(config),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 1
    assert b"no token configured" in err and b"hint:" in err


# ------------------------------------------------------------------- critical latency


async def test_critical_writes_of_another_process_reach_the_hub_within_a_second(
    tmp_path: Path, hub: Any
) -> None:
    token = await hub.add_node("n1")
    config_path = write_config(tmp_path, hub.url, token)
    pool = hub.hub.pool
    async with daemon(config_path) as d:
        await d.wait_said("reachable")
        latencies = []
        async with EdgeStore.open(
            tmp_path / "n1.db", node_id="n1", region="west", tier_rules=TIER_RULES
        ) as app:  # this test process is "the application"
            for i in range(100):
                await app.put(ALERTS, "alarms", f"lat-{i}", {"i": i})
                written = time.monotonic()
                while not await pool.fetchval(
                    "SELECT count(*) FROM records WHERE cell = $1 AND key = $2", ALERTS, f"lat-{i}"
                ):
                    if time.monotonic() - written > 5:
                        raise AssertionError(f"lat-{i} not at the hub after 5 s")
                    await asyncio.sleep(0.002)
                latencies.append(time.monotonic() - written)
                await asyncio.sleep(0.02)
        assert await d.stop() == 0
    p50 = statistics.median(latencies)
    p95 = statistics.quantiles(latencies, n=20)[-1]
    print(
        f"\ncritical write -> hub, other process: p50 {p50 * 1000:.0f} ms, "
        f"p95 {p95 * 1000:.0f} ms, max {max(latencies) * 1000:.0f} ms (100 writes)"
    )
    assert p95 < 1.0, (p50, p95)


# --------------------------------------------------------- kills during a large pull


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["kill-9", "sigterm"])
async def test_a_stop_during_a_large_pull_resumes_and_converges(
    tmp_path: Path, hub: Any, sig: int
) -> None:
    token = await hub.add_node("n1")
    config = write_config(tmp_path, hub.url, token)
    db = tmp_path / "n1.db"
    async with daemon(config) as d:  # bootstrap an empty region, then stop
        await d.wait_said("reachable")
        await until(
            lambda: _aw(scalar(db, "SELECT count(*) FROM cursors") > 0),
            timeout=15,
            what="the first pull",
        )
        assert await d.stop() == 0
    await fill_hub(hub, tmp_path, 20_000)
    head = await hub.hub.pool.fetchval("SELECT max(id) FROM feed")
    async with daemon(config) as d:
        await until(
            lambda: _aw(
                0
                < (scalar(db, "SELECT value FROM cursors WHERE name = 'pull:important'") or 0)
                < head
            ),
            timeout=30,
            what="a pull under way",
        )
        code = await d.stop(sig)
        assert code == (0 if sig == signal.SIGTERM else -signal.SIGKILL)
    stopped_at = scalar(db, "SELECT value FROM cursors WHERE name = 'pull:important'")
    assert stopped_at < head, "the pull finished before the stop: the test proved nothing"
    async with daemon(config) as d:
        await until(
            lambda: converged(hub, db), timeout=60, what="convergence after restart", every_s=0.5
        )
        assert await d.stop() == 0
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


async def _aw(value: bool) -> bool:
    return value


# --------------------------------------------------------- kills during a bootstrap


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["kill-9", "sigterm"])
async def test_a_stop_during_a_bootstrap_resumes_and_converges(
    tmp_path: Path, hub: Any, sig: int
) -> None:
    await fill_hub(hub, tmp_path, 20_000)
    token = await hub.add_node("n1")
    config = write_config(tmp_path, hub.url, token)
    db = tmp_path / "n1.db"
    async with daemon(config) as d:
        await until(
            lambda: _aw(
                db.exists() and 0 < (scalar(db, "SELECT count(*) FROM records") or 0) < 20_000
            ),
            timeout=30,
            what="a bootstrap under way",
        )
        await d.stop(sig)
    had = scalar(db, "SELECT count(*) FROM records")
    assert had < 20_050, "the bootstrap finished before the stop: the test proved nothing"
    async with daemon(config) as d:
        await until(
            lambda: converged(hub, db), timeout=60, what="convergence after restart", every_s=0.5
        )
        assert await d.stop() == 0
        assert d.said("bootstrap done")


# -------------------------------------------------------------------- flaky-link soak


async def test_soak_behind_a_link_cut_every_five_seconds(
    tmp_path: Path, hub: Any, fault_proxy: ProxyFactory
) -> None:
    host, port = hub.url.removeprefix("http://").split(":")
    proxy = await fault_proxy(host, int(port))
    token = await hub.add_node("n1")
    config = write_config(tmp_path, f"http://127.0.0.1:{proxy.port}", token)
    db = tmp_path / "n1.db"
    written: list[tuple[str, str]] = []
    async with daemon(config) as d:
        await d.wait_said("reachable")
        assert d.proc is not None
        ps = psutil.Process(d.proc.pid)
        async with EdgeStore.open(
            db,
            node_id="n1",
            region="west",
            tier_rules=TIER_RULES,
        ) as app:
            rss: list[int] = []
            offline_cpu = offline_wall = 0.0
            started = time.monotonic()
            i = 0
            while time.monotonic() - started < SOAK_S:
                link_up = int((time.monotonic() - started) // 5) % 2 == 0
                proxy.refuse(not link_up)
                if not link_up:
                    proxy.cut()
                cpu0, t0 = sum(ps.cpu_times()[:2]), time.monotonic()
                for _ in range(10):  # 5 s of writes: two a second
                    cell, coll = (ALERTS, "alarms") if i % 2 else (STOCK, "stock")
                    await app.put(cell, coll, f"soak-{i}", {"i": i})
                    written.append((cell, f"soak-{i}"))
                    i += 1
                    await asyncio.sleep(0.5)
                if not link_up:
                    offline_cpu += sum(ps.cpu_times()[:2]) - cpu0
                    offline_wall += time.monotonic() - t0
                rss.append(ps.memory_info().rss)
            proxy.refuse(False)
        await until(
            lambda: converged(hub, db), timeout=90, what="convergence after healing", every_s=0.5
        )
        at_hub = await hub_rows(hub)
        assert all(any(k[0] == c and k[2] == key for k in at_hub) for c, key in written)
        assert scalar(db, "SELECT count(*) FROM outbox") == 0
        offline_lines = d.said("unreachable")
        assert await d.stop() == 0
    warm = rss[min(3, len(rss) - 1)]  # after imports, pools and caches settled
    growth_mb = (max(rss) - warm) / 1e6
    cpu_pct = 100 * offline_cpu / offline_wall if offline_wall else 0.0
    print(
        f"\nsoak {SOAK_S:.0f} s, link cut every 5 s: {len(written)} writes, all at the hub; "
        f"RSS {warm / 1e6:.1f} -> {rss[-1] / 1e6:.1f} MB (max growth {growth_mb:.1f} MB); "
        f"CPU while offline {cpu_pct:.2f} %; 'unreachable' lines {offline_lines}"
    )
    assert growth_mb < 20, growth_mb
    assert cpu_pct < 5, cpu_pct
    # One line per outage, not one per attempt.
    assert offline_lines <= SOAK_S / 10 + 1, offline_lines
