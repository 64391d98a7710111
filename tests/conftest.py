"""Fixtures shared by every test layer.

Sections, each under its own banner; add new fixtures in a new section at the end:

1. Private servers: ``postgres``, ``pg_dsn``, ``redis_server``, ``redis_url``.
2. Network faults: ``fault_proxy``.
3. Hub: ``hub_factory``, ``hub`` (a real hub process-in-test on loopback).

The helpers live in ``tests/support`` (imported as ``support``: pytest puts ``tests/`` on
``sys.path`` for this rootdir conftest).
"""

from __future__ import annotations

import contextlib
import logging
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from aiohttp import web

from support.proxy import FaultProxy, ProxyFactory
from support.servers import PostgresServer, RedisServer, ServerError, free_port
from syncengine.config import HubConfig
from syncengine.hub.app import Hub
from syncengine.hub.nodes import add_node

logger = logging.getLogger(__name__)


# =========================================================================== 1. Private servers
# One PostgreSQL and one Redis per test session, on their own loopback ports (never the
# machine's 5432/6379). Function-scoped fixtures hand each test a clean database and put
# back a server a test left paused, stopped, crashed or killed.


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A running private PostgreSQL for the whole session; removed at the end.

    Tests may ``pause()``, ``crash()``, ``kill()`` or ``stop()`` it: the next ``pg_dsn``
    brings it back."""
    with PostgresServer() as server:
        yield server


@pytest.fixture
def pg_dsn(postgres: PostgresServer) -> Iterator[str]:
    """The DSN of a fresh, empty database on ``postgres``, dropped after the test."""
    postgres.ensure_running()
    name = f"test_{uuid.uuid4().hex[:16]}"
    dsn = postgres.create_database(name)
    yield dsn
    try:
        postgres.ensure_running()
        postgres.drop_database(name)
    except ServerError:
        # The next test starts from a fresh database anyway; say why this one lingers.
        logger.warning("could not drop test database %s", name, exc_info=True)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A running private Redis for the whole session; removed at the end."""
    with RedisServer() as server:
        yield server


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The URL of ``redis_server`` (db 0), running and emptied (FLUSHALL) for this test."""
    redis_server.ensure_running()
    redis_server.flushall()
    return redis_server.url()


# =========================================================================== 2. Network faults


@pytest.fixture
async def fault_proxy() -> AsyncIterator[ProxyFactory]:
    """A factory: ``await fault_proxy(target_host, target_port, seed=None) -> FaultProxy``,
    started on a free loopback port. Every proxy made is closed after the test."""
    async with contextlib.AsyncExitStack() as stack:

        async def factory(target_host: str, target_port: int, *,
                          seed: int | None = None) -> FaultProxy:
            proxy = FaultProxy(target_host=target_host, target_port=target_port, seed=seed)
            return await stack.enter_async_context(proxy)

        yield factory


# ================================================================================= 3. Hub
# A real region hub (aiohttp on a free loopback port) against the private PostgreSQL and
# Redis. ``hub_factory`` builds more than one (several hub processes per region) or one
# with a different config; ``hub`` is the common case.


@dataclass
class RunningHub:
    """A hub served on loopback. ``url`` for clients; ``hub`` for its internals."""

    hub: Hub
    url: str
    config: HubConfig

    async def add_node(self, node_id: str, *grants: str) -> str:
        """Register ``node_id`` with ``grants`` (default: the whole west region)."""
        return await add_node(self.hub.pool, self.config.region, node_id, list(grants) or ["west"])


HubFactory = Callable[..., Awaitable[RunningHub]]

DEFAULT_TIER_RULES = [
    {"prefix": "west/ng/lagos/clinic-12/alerts", "tier": "critical"},
    {"prefix": "west/ng/lagos/clinic-12/stock", "tier": "important"},
    {"prefix": "west/ng/lagos/clinic-12/2019", "tier": "archive"},
]


@pytest.fixture
async def hub_factory(pg_dsn: str, redis_url: str) -> AsyncIterator[HubFactory]:
    """``await hub_factory(**overrides)`` starts a hub on the test's database; all are
    stopped at the end. Overrides are hub.toml keys (e.g. ``redis_url=None``)."""
    async with contextlib.AsyncExitStack() as stack:

        async def factory(**overrides: Any) -> RunningHub:
            data: dict[str, Any] = {
                "region": "west",
                "database_url": pg_dsn,
                "redis_url": redis_url,
                "listen": f"127.0.0.1:{free_port()}",
                "tier_rules": DEFAULT_TIER_RULES,
                "resolvers": {"stock": "counter"},
            }
            data.update(overrides)
            if data["redis_url"] is None:
                del data["redis_url"]
            config = HubConfig.from_mapping(data)
            hub = await stack.enter_async_context(Hub.running(config))
            runner = web.AppRunner(hub.app, access_log=None)
            await runner.setup()
            stack.push_async_callback(runner.cleanup)
            await web.TCPSite(runner, config.listen_host, config.listen_port).start()
            return RunningHub(hub=hub, url=f"http://{config.listen}", config=config)

        yield factory


@pytest.fixture
async def hub(hub_factory: HubFactory) -> RunningHub:
    """One running west hub with the default tier rules and a counter collection 'stock'."""
    return await hub_factory()


# =========================================================================== 4. Fault mode
# ``pytest --long`` runs the fault tests (tests/fault) at their release figures, as
# ``make chaos`` does; without it they run at the quick figures CI enforces. The mode is
# passed through the environment, which tests/fault/harness.py reads when first imported.


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--long",
        action="store_true",
        default=False,
        help="run the fault tests at their release (long) figures, as make chaos does",
    )


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("--long"):
        os.environ["SYNCENGINE_FAULT_MODE"] = "long"


#: A quick-mode test that runs this long is hung, not slow (the slowest, T17, takes about
#: 3 minutes): pytest-timeout fails it with every thread's stack, and the run goes on.
#: Long mode (``--long``) runs for hours and has no such bound.
QUICK_TEST_TIMEOUT_S = 600


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--long"):
        return
    for item in items:
        if item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(QUICK_TEST_TIMEOUT_S))
