"""The private PostgreSQL and Redis servers behave like real ones under the faults the
fault suite will inject: crash, kill -9, pause (SIGSTOP) and resume."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from support.proxy import ProxyFactory
from support.servers import RESERVED_PORTS, PostgresServer, RedisServer

pytestmark = pytest.mark.integration

# Short enough to keep the file fast, long enough that a live server always answers.
TIMEOUT_S = 1.0


def no_retry_client(url: str) -> aioredis.Redis:
    """A client that reports the first failure instead of retrying it away."""
    return aioredis.Redis.from_url(url, socket_timeout=TIMEOUT_S,
                                   socket_connect_timeout=TIMEOUT_S,
                                   retry=Retry(NoBackoff(), 0))


# ---------------------------------------------------------------- PostgreSQL


async def test_postgres_answers_on_a_private_port(postgres: PostgresServer, pg_dsn: str) -> None:
    assert postgres.port not in RESERVED_PORTS
    assert pg_dsn.startswith(f"postgresql://postgres@127.0.0.1:{postgres.port}/test_")
    conn = await asyncpg.connect(pg_dsn)
    try:
        assert await conn.fetchval("SELECT 1") == 1
        assert await conn.fetchval("SHOW fsync") == "on"
    finally:
        await conn.close()


async def test_committed_rows_survive_a_crash(postgres: PostgresServer, pg_dsn: str) -> None:
    conn = await asyncpg.connect(pg_dsn)
    try:
        await conn.execute("CREATE TABLE t (v TEXT)")
        await conn.execute("INSERT INTO t VALUES ('committed')")
    finally:
        await conn.close()
    await asyncio.to_thread(postgres.crash)  # pg_ctl stop -m immediate: no checkpoint
    assert not postgres.running
    await asyncio.to_thread(postgres.start)  # WAL recovery
    conn = await asyncpg.connect(pg_dsn)
    try:
        assert await conn.fetch("SELECT v FROM t") == [("committed",)]
    finally:
        await conn.close()


async def test_kill_9_then_start(postgres: PostgresServer, pg_dsn: str) -> None:
    conn = await asyncpg.connect(pg_dsn)
    await conn.execute("CREATE TABLE t AS SELECT 7 AS v")
    await asyncio.to_thread(postgres.kill)
    assert not postgres.running
    # The backend exits with its postmaster: asyncpg sees the close before or during the query.
    with pytest.raises((asyncpg.InterfaceError, asyncpg.ConnectionDoesNotExistError)):
        await conn.fetchval("SELECT v FROM t", timeout=TIMEOUT_S * 4)
    conn.terminate()
    await asyncio.to_thread(postgres.start)
    conn = await asyncpg.connect(pg_dsn)
    try:
        assert await conn.fetchval("SELECT v FROM t") == 7
    finally:
        await conn.close()


async def test_pause_hangs_queries_until_resume(postgres: PostgresServer, pg_dsn: str) -> None:
    conn = await asyncpg.connect(pg_dsn)
    try:
        postgres.pause()
        try:
            with pytest.raises(TimeoutError):
                await conn.fetchval("SELECT 1", timeout=TIMEOUT_S)
        finally:
            postgres.resume()
        assert await conn.fetchval("SELECT 2", timeout=5) == 2
    finally:
        await conn.close()


async def test_postgres_through_the_fault_proxy(pg_dsn: str, postgres: PostgresServer,
                                                fault_proxy: ProxyFactory) -> None:
    proxy = await fault_proxy(postgres.host, postgres.port)
    dsn = pg_dsn.replace(f":{postgres.port}/", f":{proxy.port}/")
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("CREATE TABLE t (v INT)")
        proxy.drop_response(times=1)
        # The commit lands, but the client never hears back: it cannot know the outcome.
        with pytest.raises(asyncpg.ConnectionDoesNotExistError):
            await conn.execute("INSERT INTO t VALUES (1)", timeout=5)
    finally:
        conn.terminate()
    direct = await asyncpg.connect(pg_dsn)
    try:
        assert await direct.fetchval("SELECT count(*) FROM t") == 1
    finally:
        await direct.close()


# ---------------------------------------------------------------- Redis


async def test_redis_set_get(redis_server: RedisServer, redis_url: str) -> None:
    assert redis_server.port not in RESERVED_PORTS
    client = no_retry_client(redis_url)
    try:
        await client.set("k", "v")
        assert await client.get("k") == b"v"
    finally:
        await client.aclose()


async def test_redis_url_starts_empty(redis_url: str) -> None:
    client = no_retry_client(redis_url)
    try:
        assert await client.dbsize() == 0  # the previous test's key was flushed
    finally:
        await client.aclose()


async def test_redis_kill_then_start(redis_server: RedisServer, redis_url: str) -> None:
    client = no_retry_client(redis_url)
    try:
        await client.set("k", "v")
        await asyncio.to_thread(redis_server.kill)
        with pytest.raises(RedisConnectionError):
            await client.get("k")
        await asyncio.to_thread(redis_server.start)
        assert await client.ping()
        assert await client.get("k") is None  # it keeps nothing on disk
    finally:
        await client.aclose()


async def test_redis_pause_times_out_until_resume(redis_server: RedisServer,
                                                  redis_url: str) -> None:
    client = no_retry_client(redis_url)
    try:
        await client.set("k", "v")
        redis_server.pause()
        try:
            with pytest.raises(RedisTimeoutError):
                await client.get("k")
        finally:
            redis_server.resume()
        assert await client.get("k") == b"v"
    finally:
        await client.aclose()


def test_fixtures_heal_a_server_a_test_left_down(postgres: PostgresServer,
                                                 redis_server: RedisServer) -> None:
    # Runs last in this file: leave both servers down; the next test's fixtures revive them.
    postgres.pause()
    redis_server.kill()
    postgres.ensure_running()
    redis_server.ensure_running()
    assert postgres.psql("SELECT 1").strip() == "1"
    assert redis_server.ping()
