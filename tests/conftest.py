"""Fixtures shared by every test layer.

Sections, each under its own banner; add new fixtures in a new section at the end:

1. Private servers: ``postgres``, ``pg_dsn``, ``redis_server``, ``redis_url``.
2. Network faults: ``fault_proxy``.

The helpers live in ``tests/support`` (imported as ``support``: pytest puts ``tests/`` on
``sys.path`` for this rootdir conftest).
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
from support.proxy import FaultProxy, ProxyFactory
from support.servers import PostgresServer, RedisServer, ServerError

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
