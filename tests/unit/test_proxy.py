"""FaultProxy against a tiny asyncio echo server: every fault does what it says, and the
proxy leaves no task or socket behind."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import AsyncIterator

import pytest

from support.proxy import FaultProxy, ProxyFactory, _Link, _WayFaults

# Generous bound for "this should not block": loopback answers in well under a millisecond.
PROMPT_S = 2.0
# How long a stalled read is given before we call it stalled.
STALL_S = 0.3


class EchoServer:
    """Echoes every byte back and records what it received. Owns its handler tasks."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.connections = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        assert self._server is not None
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()
        for writer in self._writers:
            writer.transport.abort()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.sleep(0)

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(writer)
        task = asyncio.get_running_loop().create_task(self._echo(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _echo(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                self.received += data
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
            self._writers.discard(writer)


@pytest.fixture
async def echo() -> AsyncIterator[EchoServer]:
    server = EchoServer()
    await server.start()
    yield server
    await server.close()


@pytest.fixture
async def proxy(fault_proxy: ProxyFactory, echo: EchoServer) -> FaultProxy:
    return await fault_proxy("127.0.0.1", echo.port, seed=1234)


@contextlib.asynccontextmanager
async def connect(port: int) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """A client connection that is closed (quietly, even after a reset) on exit."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def read_exactly(reader: asyncio.StreamReader, n: int, timeout_s: float = PROMPT_S) -> bytes:
    return await asyncio.wait_for(reader.readexactly(n), timeout_s)


async def read_to_end(reader: asyncio.StreamReader, timeout_s: float = PROMPT_S) -> bytes:
    """Everything until EOF. A reset after some bytes counts as the end as well."""
    got = bytearray()
    async with asyncio.timeout(timeout_s):
        while True:
            try:
                chunk = await reader.read(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            got += chunk
    return bytes(got)


async def round_trip(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     payload: bytes) -> float:
    loop = asyncio.get_running_loop()
    started = loop.time()
    writer.write(payload)
    await writer.drain()
    assert await read_exactly(reader, len(payload)) == payload
    return loop.time() - started


async def test_passthrough_is_byte_exact(proxy: FaultProxy, echo: EchoServer) -> None:
    payload = os.urandom(300_000)
    async with connect(proxy.port) as (reader, writer):
        writer.write(payload)
        await writer.drain()
        assert await read_exactly(reader, len(payload)) == payload
    assert echo.received == payload
    assert proxy.stats.connections == 1
    assert proxy.stats.bytes_up == proxy.stats.bytes_down == len(payload)
    assert not proxy.stats.faults


async def test_latency_delays_each_direction(proxy: FaultProxy) -> None:
    async with connect(proxy.port) as (reader, writer):
        proxy.latency(200, direction="up")
        assert await round_trip(reader, writer, b"ping") >= 0.199
        proxy.latency(200)  # both ways: paid twice per round trip
        assert await round_trip(reader, writer, b"ping") >= 0.399
        proxy.latency(0)
        assert await round_trip(reader, writer, b"ping") < 0.15


async def test_jitter_never_reorders_bytes(proxy: FaultProxy) -> None:
    proxy.latency(5, jitter_ms=5)
    messages = [b"%04d|" % i for i in range(200)]
    async with connect(proxy.port) as (reader, writer):
        for message in messages:
            writer.write(message)
            await writer.drain()
            await asyncio.sleep(0.001)  # separate chunks, each with its own delay
        expected = b"".join(messages)
        assert await read_exactly(reader, len(expected)) == expected


async def test_bandwidth_caps_throughput(proxy: FaultProxy) -> None:
    payload = os.urandom(10_000)
    async with connect(proxy.port) as (reader, writer):
        assert await round_trip(reader, writer, payload) < 0.3  # uncapped
        proxy.bandwidth(20_000, direction="down")
        elapsed = await round_trip(reader, writer, payload)
    # 10 kB at 20 kB/s is 0.5 s; the first 50 ms quantum goes out at once.
    assert 0.44 <= elapsed < 2.0


async def test_slicer_splits_writes_and_keeps_the_bytes(proxy: FaultProxy) -> None:
    proxy.slicer(10, direction="down", delay_ms=2)
    payload = os.urandom(1000)
    reads = 0
    async with connect(proxy.port) as (reader, writer):
        writer.write(payload)
        await writer.drain()
        got = bytearray()
        async with asyncio.timeout(PROMPT_S * 2):
            while len(got) < len(payload):
                got += await reader.read(65536)
                reads += 1
    assert bytes(got) == payload
    assert reads >= 10  # one unsliced write would arrive in one or two reads


async def test_blackhole_stalls_both_old_and_new_connections(proxy: FaultProxy,
                                                             echo: EchoServer) -> None:
    async with connect(proxy.port) as (reader, writer):
        await round_trip(reader, writer, b"before")
        proxy.blackhole()
        writer.write(b"held")
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reader.read(1), STALL_S)
        async with connect(proxy.port) as (reader2, writer2):  # accepted, but nothing flows
            writer2.write(b"new")
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(reader2.read(1), STALL_S)
            assert echo.received == b"before"
            assert echo.connections == 1  # the server never heard of the new connection
            proxy.clear()
            assert await read_exactly(reader, 4) == b"held"
            assert await read_exactly(reader2, 3) == b"new"
    assert proxy.stats.faults["blackhole"] == 1


async def test_drop_response_delivers_the_request_but_not_the_answer(
        proxy: FaultProxy, echo: EchoServer) -> None:
    proxy.drop_response(times=1)
    async with connect(proxy.port) as (reader, writer):
        writer.write(b"commit")
        await writer.drain()
        assert await read_to_end(reader) == b""  # EOF or reset, and no byte of the answer
    assert echo.received == b"commit"
    assert proxy.stats.bytes_down == 0
    assert proxy.stats.faults["drop_response"] == 1
    # times=1: it switched itself off, so the retry gets its answer.
    async with connect(proxy.port) as (reader, writer):
        await round_trip(reader, writer, b"retry")


async def test_reset_peer_resets_the_client(proxy: FaultProxy) -> None:
    async with connect(proxy.port) as (reader, writer):
        await round_trip(reader, writer, b"hello")
        assert proxy.reset_peer() == 1
        with contextlib.suppress(ConnectionResetError):
            assert await asyncio.wait_for(reader.read(1), PROMPT_S) == b""
    assert proxy.stats.faults["reset_peer"] == 1


async def test_reset_after_cuts_the_request_short(proxy: FaultProxy, echo: EchoServer) -> None:
    proxy.reset_after(10, direction="up")
    async with connect(proxy.port) as (reader, writer):
        writer.write(b"x" * 100)
        await writer.drain()
        got = await read_to_end(reader)
    assert len(echo.received) <= 10
    assert len(got) <= 10
    assert proxy.stats.faults["reset_after"] == 1


async def test_limit_data_closes_after_exactly_n_bytes(proxy: FaultProxy) -> None:
    async with connect(proxy.port) as (reader, writer):
        await round_trip(reader, writer, b"warm-up")  # counted from the call, not the start
        proxy.limit_data(10, direction="down")
        writer.write(b"0123456789abcdefghij")
        await writer.drain()
        assert await read_to_end(reader) == b"0123456789"
    assert proxy.stats.faults["limit_data"] == 1


async def test_cut_closes_every_connection(proxy: FaultProxy) -> None:
    async with connect(proxy.port) as (r1, w1), connect(proxy.port) as (r2, w2):
        await round_trip(r1, w1, b"a")
        await round_trip(r2, w2, b"b")
        assert proxy.cut() == 2
        assert await read_to_end(r1) == b""
        assert await read_to_end(r2) == b""


async def test_refuse_closes_the_port_and_reopens_it(proxy: FaultProxy) -> None:
    async with connect(proxy.port) as (reader, writer):
        proxy.refuse()
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection("127.0.0.1", proxy.port)
        await round_trip(reader, writer, b"still here")  # open connections keep working
        proxy.refuse(False)
        async with connect(proxy.port) as (reader2, writer2):
            await round_trip(reader2, writer2, b"back")


async def test_dead_target_resets_the_client(fault_proxy: ProxyFactory,
                                             echo: EchoServer) -> None:
    port = echo.port
    await echo.close()
    proxy = await fault_proxy("127.0.0.1", port)
    async with connect(proxy.port) as (reader, _writer):
        assert await read_to_end(reader) == b""
    assert proxy.stats.upstream_failures == 1


async def test_close_is_idempotent_and_leaves_no_tasks(echo: EchoServer) -> None:
    proxy = FaultProxy(target_host="127.0.0.1", target_port=echo.port)
    async with proxy:
        proxy.latency(1000)  # keep a chunk in flight while closing
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"in flight")
        await asyncio.sleep(0.05)
        assert proxy.active_connections == 1
        await proxy.close()
        assert await read_to_end(reader) == b""
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    await proxy.close()
    assert proxy.active_connections == 0
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("fault-proxy")]


async def test_same_seed_same_slices(echo: EchoServer) -> None:
    def sizes(seed: int) -> list[int]:
        proxy = FaultProxy(target_host="127.0.0.1", target_port=echo.port, seed=seed)
        a, b = socket.socketpair()
        b.close()
        link = _Link(proxy, a)
        try:
            return [len(piece) for piece in link._pieces(b"x" * 500, _WayFaults(slice_avg=10))]
        finally:
            a.close()

    assert sizes(7) == sizes(7)
    assert sizes(7) != sizes(8)
    assert all(5 <= n <= 15 for n in sizes(7)[:-1])
