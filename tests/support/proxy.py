"""An asyncio TCP proxy that injects network faults between a client and its server.

Modelled on asyncpg's ``_testbase/fuzzer.py`` (``TCPFuzzingProxy``) and on Toxiproxy's
toxics. It sits between edge and hub, hub and PostgreSQL, hub and Redis::

    client --up--> FaultProxy --up--> server
    client <-down- FaultProxy <-down- server

Faults are switched at run time with plain (non-async) method calls, take effect from the
next chunk of data, and stay until changed or :meth:`FaultProxy.clear` is called. Methods
that take a ``direction`` accept ``"up"`` (client to server), ``"down"`` (server to client)
or ``"both"``.

Every connection runs in one task owned by the proxy, which holds four stage tasks in a
``TaskGroup`` (a reader and a delayed writer per direction); :meth:`FaultProxy.close`
aborts every socket, cancels those tasks and awaits them, so nothing outlives the proxy.
Randomness (jitter, slice sizes) comes from one ``random.Random(seed)``; the seed is kept
in :attr:`FaultProxy.seed` so a failing run can be replayed.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import itertools
import logging
import math
import random
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Final, Literal, Protocol, Self

__all__ = ["Direction", "FaultProxy", "ProxyFactory", "ProxyStats"]

logger = logging.getLogger(__name__)

Direction = Literal["up", "down", "both"]
_Way = Literal["up", "down"]
_CloseHow = Literal["close", "abort", "reset"]

READ_SIZE: Final = 65536
# Chunks held per direction between reader and writer: bounds memory while a black hole or
# a bandwidth cap holds data back (the kernel buffers then fill and the sender blocks).
QUEUE_DEPTH: Final = 16
# A bandwidth cap is enforced in pieces worth this much time, so throughput stays smooth.
PACE_QUANTUM_S: Final = 0.05
# How long a closing connection may take to flush before its sockets are aborted.
FLUSH_TIMEOUT_S: Final = 2.0
_ACCEPT_BATCH: Final = 64
_LINGER_RST: Final = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST


@dataclass(slots=True)
class ProxyStats:
    """Live counters of one proxy (mutated in place; copy what you want to compare)."""

    connections: int = 0  # client connections accepted
    bytes_up: int = 0  # forwarded client -> server
    bytes_down: int = 0  # forwarded server -> client
    upstream_failures: int = 0  # connections to the target that failed
    # Faults that fired, by method name: data-driven ones (drop_response, limit_data,
    # reset_after) once per connection they cut; switches (blackhole, refuse, reset_peer,
    # cut) once per activation.
    faults: collections.Counter[str] = field(default_factory=collections.Counter)


@dataclass(slots=True, eq=False)
class _Budget:
    """A byte budget (``limit_data``/``reset_after``) counted from the moment it was set."""

    n_bytes: int


@dataclass(slots=True)
class _WayFaults:
    """The faults of one direction."""

    latency_s: float = 0.0
    jitter_s: float = 0.0
    rate_bps: float | None = None
    slice_avg: int | None = None
    slice_delay_s: float = 0.0
    limit: _Budget | None = None
    reset: _Budget | None = None


class ProxyFactory(Protocol):
    """The ``fault_proxy`` fixture: starts a proxy in front of a target; closed after the
    test."""

    async def __call__(
        self, target_host: str, target_port: int, *, seed: int | None = None
    ) -> FaultProxy: ...


def _ways(direction: Direction) -> tuple[_Way, ...]:
    if direction == "both":
        return ("up", "down")
    if direction in ("up", "down"):
        return (direction,)
    raise ValueError(f"direction must be 'up', 'down' or 'both', not {direction!r}")


def _non_negative(name: str, value: float) -> None:
    if not value >= 0:  # also rejects NaN
        raise ValueError(f"{name} must be >= 0, not {value!r}")


class FaultProxy:
    """A TCP proxy from ``listen_host:listen_port`` to ``target_host:target_port`` that
    injects faults on demand. Use as ``async with FaultProxy(...) as proxy:``.

    Not thread-safe: call every method from the event loop that started it.
    """

    def __init__(
        self,
        *,
        target_host: str,
        target_port: int,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
        seed: int | None = None,
    ) -> None:
        """Args:
            target_host, target_port: the server to forward to.
            listen_host, listen_port: where clients connect; port 0 picks a free one
                (read it from :attr:`port` after :meth:`start`).
            seed: seeds jitter and slicing; a random seed is drawn (and kept in
                :attr:`seed`) when omitted.
        """
        self.target_host = target_host
        self.target_port = target_port
        self.listen_host = listen_host
        self._port = listen_port
        self.seed: int = seed if seed is not None else random.SystemRandom().randrange(2**32)
        self.rng = random.Random(self.seed)
        self.stats = ProxyStats()
        # Exceptions that escaped a connection task (bugs, not faults); close() raises them.
        self.errors: list[BaseException] = []
        self._faults: dict[_Way, _WayFaults] = {"up": _WayFaults(), "down": _WayFaults()}
        self._flowing = asyncio.Event()  # cleared while black-holed
        self._flowing.set()
        self._drop_left: float = 0  # responses still to drop; math.inf = until switched off
        self._refusing = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._listener: socket.socket | None = None
        self._links: set[_Link] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._ids = itertools.count(1)
        self._closed = False

    def __repr__(self) -> str:
        return (f"<FaultProxy :{self._port} -> {self.target_host}:{self.target_port} "
                f"seed={self.seed} links={len(self._links)}>")

    @property
    def port(self) -> int:
        """The listening port (known after :meth:`start`)."""
        return self._port

    @property
    def active_connections(self) -> int:
        return len(self._links)

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Start listening.

        Raises:
            RuntimeError: started twice, or after :meth:`close`.
            OSError: the listening port cannot be bound.
        """
        if self._loop is not None or self._closed:
            raise RuntimeError("a FaultProxy starts once")
        self._loop = asyncio.get_running_loop()
        self._listen()  # binds even when refusing, so that port 0 becomes a real port
        if self._refusing:
            self._stop_listening()
        logger.debug("%r started", self)

    async def close(self) -> None:
        """Stop listening, abort every connection, cancel and await every task. Idempotent.

        Raises:
            BaseExceptionGroup: a connection task failed with an unexpected exception (a bug in
                the proxy, reported here so it cannot pass unnoticed).
        """
        if self._closed:
            return
        self._closed = True
        self._stop_listening()
        for link in list(self._links):
            link.shut("abort")
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        # abort() closes sockets from a callback on the next loop iteration.
        await asyncio.sleep(0)
        if self.errors:
            raise BaseExceptionGroup("fault proxy connection tasks failed", self.errors)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # ------------------------------------------------------------------ faults

    def latency(self, ms: float, jitter_ms: float = 0.0, direction: Direction = "both") -> None:
        """Delay every chunk by ``ms`` ± uniform ``jitter_ms`` milliseconds. Bytes are never
        reordered (a chunk is not delivered before the one read before it), and throughput
        is kept: it is a delay line, not a pause per chunk. ``latency(0)`` removes it."""
        _non_negative("ms", ms)
        _non_negative("jitter_ms", jitter_ms)
        for way in _ways(direction):
            self._faults[way].latency_s = ms / 1000
            self._faults[way].jitter_s = jitter_ms / 1000

    def bandwidth(self, bytes_per_s: float | None, direction: Direction = "both") -> None:
        """Cap throughput per connection and direction; ``None`` removes the cap."""
        if bytes_per_s is not None and not bytes_per_s > 0:
            raise ValueError(f"bytes_per_s must be > 0, not {bytes_per_s!r}")
        for way in _ways(direction):
            self._faults[way].rate_bps = bytes_per_s

    def slicer(self, avg_size: int | None, direction: Direction = "both", *,
               delay_ms: float = 0.0) -> None:
        """Split every chunk into writes of ``avg_size`` ± 50 % bytes (seeded), with
        ``delay_ms`` between them so the receiver really sees them apart. ``None`` removes
        it. Exercises the framing code of the receiver."""
        if avg_size is not None and avg_size < 1:
            raise ValueError(f"avg_size must be >= 1, not {avg_size!r}")
        _non_negative("delay_ms", delay_ms)
        for way in _ways(direction):
            self._faults[way].slice_avg = avg_size
            self._faults[way].slice_delay_s = delay_ms / 1000

    def limit_data(self, n_bytes: int | None, direction: Direction = "both") -> None:
        """Close each connection (FIN to both peers) once ``n_bytes`` more have passed in
        ``direction``, counted per connection from this call (from its start for newer
        connections). Exactly ``n_bytes`` are delivered. ``None`` removes it."""
        self._set_budget("limit", n_bytes, direction)

    def reset_after(self, n_bytes: int | None, direction: Direction = "both") -> None:
        """Like :meth:`limit_data`, but the connection is reset (RST to both peers) after at
        most ``n_bytes``: data still in flight may be lost, as with a real reset."""
        self._set_budget("reset", n_bytes, direction)

    def reset_peer(self) -> int:
        """Reset every current connection now: SO_LINGER 0, then close, so both the client
        and the server get an RST. Returns how many connections were reset."""
        return self._shut_all("reset", "reset_peer")

    def cut(self) -> int:
        """Drop every current connection now: buffered data is discarded and the sockets
        closed, so the peers see EOF (or RST if they had sent unread data). Returns how many
        connections were cut."""
        return self._shut_all("abort", "cut")

    def blackhole(self, on: bool = True) -> None:
        """Stop forwarding in both directions while keeping every socket open, like a
        network partition without RST. New connections are accepted but not forwarded (the
        server does not see them until the hole closes). Held data is delivered, in order,
        once it is switched off, as TCP retransmission would."""
        if on:
            if self._flowing.is_set():
                self.stats.faults["blackhole"] += 1
            self._flowing.clear()
        else:
            self._flowing.set()

    def drop_response(self, on: bool = True, *, times: int | None = None) -> None:
        """Let requests reach the server, then reset the connection as soon as the server's
        answer arrives, before its first byte reaches the client: the "it landed but the
        client never knew" window. With ``times=n`` it switches itself off after cutting
        ``n`` responses (so a client's retry can succeed); otherwise it stays on."""
        if not on:
            self._drop_left = 0
        elif times is None:
            self._drop_left = math.inf
        elif times < 1:
            raise ValueError(f"times must be >= 1, not {times!r}")
        else:
            self._drop_left = times

    def refuse(self, on: bool = True) -> None:
        """Close the listening socket, so new connections get ECONNREFUSED, as from a host
        whose server is down; current connections are untouched. ``refuse(False)`` listens
        on the same port again.

        Raises:
            OSError: the port was taken by someone else meanwhile (on ``refuse(False)``).
        """
        if on and not self._refusing:
            self.stats.faults["refuse"] += 1
            self._stop_listening()
        elif not on and self._refusing and self._loop is not None and not self._closed:
            self._listen()
        self._refusing = on

    def clear(self) -> None:
        """Remove every fault: forwarding resumes, the proxy listens again."""
        self._faults = {"up": _WayFaults(), "down": _WayFaults()}
        self._drop_left = 0
        self.blackhole(False)
        self.refuse(False)

    # ------------------------------------------------------------------ internals

    def _set_budget(self, kind: Literal["limit", "reset"], n_bytes: int | None,
                    direction: Direction) -> None:
        if n_bytes is not None and n_bytes < 0:
            raise ValueError(f"n_bytes must be >= 0, not {n_bytes!r}")
        for way in _ways(direction):
            budget = None if n_bytes is None else _Budget(n_bytes)
            setattr(self._faults[way], kind, budget)
            if budget is not None:
                for link in self._links:
                    link.budget_base[budget] = link.sent[way]

    def _shut_all(self, how: _CloseHow, fault: str) -> int:
        links = [link for link in self._links if not link.closing]
        for link in links:
            link.shut(how)
        if links:
            self.stats.faults[fault] += 1
        return len(links)

    def _take_drop(self) -> bool:
        if self._drop_left <= 0:
            return False
        self._drop_left -= 1
        return True

    def _listen(self) -> None:
        assert self._loop is not None
        family = socket.AF_INET6 if ":" in self.listen_host else socket.AF_INET
        # SO_REUSEADDR (set by create_server): re-listening after refuse() must not trip
        # over the connections still open on the port.
        sock = socket.create_server((self.listen_host, self._port), family=family, backlog=128)
        sock.setblocking(False)
        self._port = sock.getsockname()[1]
        self._listener = sock
        self._loop.add_reader(sock.fileno(), self._on_acceptable)

    def _stop_listening(self) -> None:
        sock, self._listener = self._listener, None
        if sock is not None:
            assert self._loop is not None
            self._loop.remove_reader(sock.fileno())
            sock.close()

    def _on_acceptable(self) -> None:
        # A plain reader callback rather than asyncio.start_server: listening can then be
        # switched off and on synchronously (refuse), and every task is created here, owned.
        assert self._loop is not None
        for _ in range(_ACCEPT_BATCH):
            if self._listener is None:
                return
            try:
                client, _addr = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                logger.warning("%r: accept failed", self, exc_info=True)
                return
            client.setblocking(False)
            self.stats.connections += 1
            link = _Link(self, client)
            task = self._loop.create_task(link.run(), name=f"fault-proxy-{next(self._ids)}")
            link.task = task
            self._links.add(link)
            self._tasks.add(task)
            task.add_done_callback(functools.partial(self._on_link_done, link))

    def _on_link_done(self, link: _Link, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._links.discard(link)
        if not link.handed_over:
            link.client_sock.close()  # cancelled before a transport took the socket
        if not task.cancelled() and (exc := task.exception()) is not None:
            logger.error("%r: connection task failed", self, exc_info=exc)
            self.errors.append(exc)


class _Link:
    """One proxied connection: the client's socket, the server's, and their stages."""

    def __init__(self, proxy: FaultProxy, client_sock: socket.socket) -> None:
        self.proxy = proxy
        self.client_sock = client_sock
        self.handed_over = False  # client_sock belongs to a transport from then on
        self.task: asyncio.Task[None] | None = None
        self.client: asyncio.StreamWriter | None = None
        self.server: asyncio.StreamWriter | None = None
        self.closing = False
        self.sent: dict[_Way, int] = {"up": 0, "down": 0}
        self.budget_base: dict[_Budget, int] = {}  # bytes already sent when a budget was set
        self._due: dict[_Way, float] = {"up": 0.0, "down": 0.0}  # last delivery time
        self._next_free: dict[_Way, float] = {"up": 0.0, "down": 0.0}  # bandwidth pacing
        self._eof: dict[_Way, bool] = {"up": False, "down": False}

    async def run(self) -> None:
        """Connect both ends, then pump both directions until a side closes or a fault
        cuts the link (which cancels this task)."""
        proxy = self.proxy
        try:
            self.handed_over = True
            client_reader, self.client = await asyncio.open_connection(sock=self.client_sock)
            # In a black hole the server never hears of the connection.
            await proxy._flowing.wait()
            try:
                server_reader, self.server = await asyncio.open_connection(
                    proxy.target_host, proxy.target_port)
            except OSError:
                proxy.stats.upstream_failures += 1
                self.shut("reset")  # what the client would see from a dead server
                return
            pipes: tuple[tuple[_Way, asyncio.StreamReader, asyncio.StreamWriter], ...] = (
                ("up", client_reader, self.server), ("down", server_reader, self.client))
            async with asyncio.TaskGroup() as group:
                for way, reader, writer in pipes:
                    queue: asyncio.Queue[tuple[float, bytes | None]] = asyncio.Queue(QUEUE_DEPTH)
                    group.create_task(self._read_stage(reader, queue))
                    group.create_task(self._write_stage(way, queue, writer))
        finally:
            await self._settle()

    def shut(self, how: _CloseHow) -> None:
        """End the link: ``close`` flushes then sends FIN, ``abort`` drops buffers,
        ``reset`` sends RST. Cancels :meth:`run` (unless it is the caller). Idempotent."""
        if self.closing:
            return
        self.closing = True
        if how == "reset":
            server_sock = self.server.get_extra_info("socket") if self.server else None
            for sock in (self.client_sock, server_sock):
                if sock is not None and sock.fileno() != -1:
                    with contextlib.suppress(OSError):
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
        for writer in (self.client, self.server):
            if writer is not None:
                if how == "close":
                    writer.close()
                else:
                    writer.transport.abort()
        if self.task is not None and self.task is not asyncio.current_task():
            self.task.cancel()

    async def _settle(self) -> None:
        """Wait (bounded) until both sockets are really closed, so none is left for the
        garbage collector to warn about; abort whatever has not flushed in time."""
        writers = [w for w in (self.client, self.server) if w is not None]
        for writer in writers:
            if not writer.transport.is_closing():
                writer.transport.abort()
        try:
            async with asyncio.timeout(FLUSH_TIMEOUT_S):
                for writer in writers:
                    with contextlib.suppress(OSError):
                        await writer.wait_closed()
        except TimeoutError:
            for writer in writers:
                writer.transport.abort()
            await asyncio.sleep(0)

    async def _read_stage(self, reader: asyncio.StreamReader,
                          queue: asyncio.Queue[tuple[float, bytes | None]]) -> None:
        loop = asyncio.get_running_loop()
        try:
            while data := await reader.read(READ_SIZE):
                await queue.put((loop.time(), data))
        except OSError:
            # The peer reset us: pass the reset on to the other side.
            self.shut("reset")
            return
        await queue.put((loop.time(), None))

    async def _write_stage(self, way: _Way, queue: asyncio.Queue[tuple[float, bytes | None]],
                           writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                stamp, data = await queue.get()
                await self._delay(way, stamp)
                await self.proxy._flowing.wait()
                if data is None:
                    self._forward_eof(way, writer)
                    return
                if not await self._forward(way, data, writer):
                    return
        except OSError:
            self.shut("reset")

    def _forward_eof(self, way: _Way, writer: asyncio.StreamWriter) -> None:
        # Half-close: the other direction may still carry the answer.
        self._eof[way] = True
        if all(self._eof.values()):
            self.shut("close")
        elif writer.can_write_eof():
            writer.write_eof()

    async def _delay(self, way: _Way, stamp: float) -> None:
        faults = self.proxy._faults[way]
        if faults.latency_s <= 0 and faults.jitter_s <= 0:
            return
        delay = faults.latency_s
        if faults.jitter_s:
            delay += self.proxy.rng.uniform(-faults.jitter_s, faults.jitter_s)
        # TCP never reorders: a chunk is not due before the one read before it.
        due = max(stamp + max(delay, 0.0), self._due[way])
        self._due[way] = due
        wait = due - asyncio.get_running_loop().time()
        if wait > 0:
            await asyncio.sleep(wait)

    async def _forward(self, way: _Way, data: bytes, writer: asyncio.StreamWriter) -> bool:
        """Write one chunk under the current faults; False once a fault ended the link."""
        proxy = self.proxy
        if way == "down" and proxy._take_drop():
            proxy.stats.faults["drop_response"] += 1
            self.shut("reset")
            return False
        faults = proxy._faults[way]
        data, after = self._apply_budgets(way, data, faults)
        for piece in self._pieces(data, faults):
            await proxy._flowing.wait()
            await self._pace(way, len(piece), faults)
            writer.write(piece)
            await writer.drain()
            self.sent[way] += len(piece)
            if way == "up":
                proxy.stats.bytes_up += len(piece)
            else:
                proxy.stats.bytes_down += len(piece)
            if faults.slice_avg and faults.slice_delay_s:
                await asyncio.sleep(faults.slice_delay_s)
        if after is not None:
            proxy.stats.faults[after] += 1
            self.shut("close" if after == "limit_data" else "reset")
            return False
        return True

    def _apply_budgets(self, way: _Way, data: bytes,
                       faults: _WayFaults) -> tuple[bytes, str | None]:
        """Trim ``data`` to the tightest byte budget; name the fault that then fires."""
        cut_at, after = len(data) + 1, None
        for budget, name in ((faults.limit, "limit_data"), (faults.reset, "reset_after")):
            if budget is None:
                continue
            left = budget.n_bytes - (self.sent[way] - self.budget_base.get(budget, 0))
            if left <= len(data) and left < cut_at:
                cut_at, after = max(left, 0), name
        return (data[:cut_at], after) if after else (data, None)

    def _pieces(self, data: bytes, faults: _WayFaults) -> Iterator[bytes]:
        pos = 0
        while pos < len(data):
            size = len(data) - pos
            if faults.slice_avg:
                avg = faults.slice_avg
                size = min(size, max(1, round(self.proxy.rng.uniform(avg * 0.5, avg * 1.5))))
            if faults.rate_bps:
                size = min(size, max(1, int(faults.rate_bps * PACE_QUANTUM_S)))
            yield data[pos:pos + size]
            pos += size

    async def _pace(self, way: _Way, n_bytes: int, faults: _WayFaults) -> None:
        if not faults.rate_bps:
            self._next_free[way] = 0.0
            return
        now = asyncio.get_running_loop().time()
        start = max(now, self._next_free[way])
        if start > now:
            await asyncio.sleep(start - now)
        self._next_free[way] = start + n_bytes / faults.rate_bps
