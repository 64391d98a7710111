"""Link profiles and fault primitives for the network fault tests (RELIABILITY.md §1, T7).

A **profile** is what a link is like most of the time, built from
:class:`~support.proxy.FaultProxy` settings (the userspace proxy stands in for ``netem``,
which this machine lacks):

==========  =================================================================================
``2g``      about 50 kbit/s per connection and direction, RTT 600 ± 300 ms, every connection
            cut (RST) every 30-120 s
``3g``      about 384 kbit/s, RTT 200 ± 100 ms
``flaky``   3g plus an RST in the middle of a body now and then (armed on a Poisson clock,
            mean :data:`FLAKY_MEAN_S`: about one request in twenty at the rate an edge talks)
``offline`` 3g with black holes (no RST, nothing forwarded) of ``offline_s`` seconds,
            ``online_s`` apart
==========  =================================================================================

The caps are per connection (a proxy cannot share one cap between connections); a kernel
cap shared by every connection of an edge (``tc tbf`` on a veth pair in a netns) is not
used here: edges run in the test's event loop, so their traffic cannot be put in a netns.

:class:`ShapedLink` runs a profile on one proxy and offers the fault primitives a nemesis
applies on top (RST mid-request and mid-response, dropped responses, black holes, slicing).
Black holes are reference counted, so a profile's outage and a nemesis' partition can
overlap; byte-budget faults (the RSTs) take turns, one armed at a time per link. Each
primitive reports whether the fault really fired, and :attr:`ShapedLink.fired` tallies the
faults that did, by kind: a fault that was armed but never met traffic is not counted.

:class:`PgFaultProxy` is a proxy for the hub's PostgreSQL that can also cut a connection at
its next ``COMMIT``: before the statement reaches the server (the transaction is lost) or
once the server answered it (committed, but the hub never knows: the COMMIT-retry footgun).

:class:`ThreadedPgProxy` runs a :class:`PgFaultProxy` on an event loop of its own, in a
thread, so that the hub's many round trips to PostgreSQL do not queue behind everything
else the test's event loop runs.

This module drives the network only; it imports nothing from ``syncengine``.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import random
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Final, Literal, Self, TypeVar

from support import proxy as proxy_module
from support.proxy import FaultProxy

__all__ = [
    "FLAKY_MEAN_S",
    "PROFILES",
    "CommitCut",
    "LinkProfile",
    "PgFaultProxy",
    "ShapedLink",
    "ThreadedPgProxy",
    "offline_profile",
]

T = TypeVar("T")

#: How often, on average, a ``flaky`` link arms an RST in the middle of a body.
FLAKY_MEAN_S: Final = 10.0
#: How long an armed byte-budget fault waits for traffic before it is given up.
ARM_TIMEOUT_S: Final = 20.0
_POLL_S: Final = 0.02


@dataclass(frozen=True, kw_only=True, slots=True)
class LinkProfile:
    """What a link is like between faults. Rates are bytes per second per connection and
    direction; latencies are one way (the RTT is twice them)."""

    name: str
    rate_bps: float | None
    latency_ms: float
    jitter_ms: float
    #: Every connection is reset at intervals uniform in this range (s).
    cut_every_s: tuple[float, float] | None = None
    #: Mean seconds between RSTs in the middle of a body.
    rst_mean_s: float | None = None
    #: Black holes of a length uniform in ``offline_s``, ``online_s`` apart.
    offline_s: tuple[float, float] | None = None
    online_s: tuple[float, float] | None = None


def _kbit(kbit_per_s: float) -> float:
    return kbit_per_s * 1000 / 8


_2G = LinkProfile(
    name="2g", rate_bps=_kbit(50), latency_ms=300, jitter_ms=150, cut_every_s=(30, 120)
)
_3G = LinkProfile(name="3g", rate_bps=_kbit(384), latency_ms=100, jitter_ms=50)
_FLAKY = LinkProfile(
    name="flaky", rate_bps=_kbit(384), latency_ms=100, jitter_ms=50, rst_mean_s=FLAKY_MEAN_S
)


def _offline(offline_s: tuple[float, float], online_s: tuple[float, float]) -> LinkProfile:
    return LinkProfile(
        name="offline",
        rate_bps=_kbit(384),
        latency_ms=100,
        jitter_ms=50,
        offline_s=offline_s,
        online_s=online_s,
    )


#: The profiles by name; ``offline`` is the quick mode's (holes of 20-45 s, 10-25 s apart).
#: Long runs make one with holes of minutes with :func:`offline_profile`.
PROFILES: Final = {
    "2g": _2G,
    "3g": _3G,
    "flaky": _FLAKY,
    "offline": _offline((20, 45), (10, 25)),
}


def offline_profile(offline_s: tuple[float, float], online_s: tuple[float, float]) -> LinkProfile:
    """An ``offline`` profile with other hole and gap lengths (long mode: minutes)."""
    return _offline(offline_s, online_s)


class ShapedLink:
    """One edge's link to the hub: a :class:`FaultProxy` running a :class:`LinkProfile`,
    plus fault primitives. Call every method from the proxy's event loop."""

    def __init__(self, proxy: FaultProxy, profile: LinkProfile, rng: random.Random) -> None:
        self.proxy = proxy
        self.profile = profile
        self.rng = rng
        #: Faults that fired on this link, by kind.
        self.fired: collections.Counter[str] = collections.Counter()
        self._holes = 0
        self._slicers = 0
        self._budget = asyncio.Lock()  # one byte-budget fault armed at a time
        self._healed = False

    @property
    def holed(self) -> bool:
        """Whether a black hole is on now."""
        return self._holes > 0

    def shape(self) -> None:
        """Apply the profile's steady settings (bandwidth, latency)."""
        p = self.profile
        self.proxy.latency(p.latency_ms, p.jitter_ms)
        self.proxy.bandwidth(p.rate_bps)

    async def run_profile(self) -> None:
        """Run the profile's recurring faults until cancelled (the caller heals)."""
        p = self.profile
        async with asyncio.TaskGroup() as group:
            if p.cut_every_s is not None:
                group.create_task(self._cuts(p.cut_every_s))
            if p.rst_mean_s is not None:
                group.create_task(self._flaky(p.rst_mean_s))
            if p.offline_s is not None and p.online_s is not None:
                group.create_task(self._outages(p.offline_s, p.online_s))

    async def _cuts(self, every_s: tuple[float, float]) -> None:
        while True:
            await asyncio.sleep(self.rng.uniform(*every_s))
            if self.proxy.reset_peer():
                self.fired["cut"] += 1

    async def _flaky(self, mean_s: float) -> None:
        while True:
            await asyncio.sleep(self.rng.expovariate(1 / mean_s))
            if self.rng.random() < 0.5:
                await self.rst_mid_request(self.rng.randint(64, 2048), kind="flaky_rst")
            else:
                await self.rst_mid_response(self.rng.randint(64, 2048), kind="flaky_rst")

    async def _outages(self, off_s: tuple[float, float], on_s: tuple[float, float]) -> None:
        while True:
            await asyncio.sleep(self.rng.uniform(*on_s))
            await self.black_hole(self.rng.uniform(*off_s), kind="offline")

    # -- primitives -----------------------------------------------------------------------

    @contextlib.contextmanager
    def hole(self) -> Iterator[None]:
        """A black hole while inside (reference counted: overlapping holes nest)."""
        self._holes += 1
        self.proxy.blackhole(True)
        try:
            yield
        finally:
            self._holes -= 1
            if self._holes == 0 and not self._healed:
                self.proxy.blackhole(False)

    async def black_hole(self, seconds: float, *, kind: str = "blackhole") -> None:
        """Forward nothing for ``seconds`` (sockets stay open: no RST, no FIN)."""
        self.fired[kind] += 1
        with self.hole():
            await asyncio.sleep(seconds)

    async def slice(self, seconds: float, avg_size: int, delay_ms: float) -> None:
        """Deliver data in pieces of about ``avg_size`` bytes, ``delay_ms`` apart, both ways."""
        self.fired["slicer"] += 1
        self._slicers += 1
        self.proxy.slicer(avg_size, "both", delay_ms=delay_ms)
        try:
            await asyncio.sleep(seconds)
        finally:
            self._slicers -= 1
            if self._slicers == 0 and not self._healed:
                self.proxy.slicer(None)

    async def rst_mid_request(self, n_bytes: int, *, kind: str = "rst_mid_request") -> bool:
        """Reset the next connection that sends more than ``n_bytes`` towards the hub: an
        upload torn in the middle. True once it fired."""
        return await self._budget_fault("up", n_bytes, kind)

    async def rst_mid_response(self, n_bytes: int, *, kind: str = "rst_mid_response") -> bool:
        """Reset the next connection that receives more than ``n_bytes`` from the hub: an
        answer torn in the middle. True once it fired."""
        return await self._budget_fault("down", n_bytes, kind)

    async def _budget_fault(self, way: Literal["up", "down"], n_bytes: int, kind: str) -> bool:
        async with self._budget:
            before = self.proxy.stats.faults["reset_after"]
            self.proxy.reset_after(n_bytes, way)
            try:
                fired = await self._until(lambda: self.proxy.stats.faults["reset_after"] > before)
            finally:
                if not self._healed:
                    self.proxy.reset_after(None, way)
            if fired:
                self.fired[kind] += self.proxy.stats.faults["reset_after"] - before
            return fired

    async def drop_responses(self, times: int) -> bool:
        """Let the next ``times`` requests reach the hub and cut their answers before the
        first byte reaches the edge. True once at least one was cut."""
        before = self.proxy.stats.faults["drop_response"]
        self.proxy.drop_response(True, times=times)
        try:
            await self._until(lambda: self.proxy.stats.faults["drop_response"] >= before + times)
        finally:
            if not self._healed:
                self.proxy.drop_response(False)
        cut = self.proxy.stats.faults["drop_response"] - before
        self.fired["drop_response"] += cut
        return cut > 0

    async def _until(self, fired: collections.abc.Callable[[], bool]) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + ARM_TIMEOUT_S
        while not fired():
            if loop.time() > deadline:
                return False
            await asyncio.sleep(_POLL_S)
        return True

    def heal(self) -> None:
        """Remove every fault and the profile's shaping: a clean loopback link from now on."""
        self._healed = True
        self.proxy.clear()


CommitCut = Literal["before", "after"]

#: What asyncpg sends to commit (a simple Query message), and the server's CommandComplete.
_COMMIT_QUERY: Final = b"COMMIT;\x00"
_COMMIT_DONE: Final = b"C\x00\x00\x00\x0bCOMMIT\x00"


class PgFaultProxy(FaultProxy):
    """A :class:`FaultProxy` for PostgreSQL that can also reset a connection at its next
    ``COMMIT`` (:meth:`cut_at_commit`): ``"before"`` the statement reaches the server, or
    ``"after"`` the server committed and answered, before the answer reaches the client."""

    def __init__(self, **kw: object) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        self.commit_cut: CommitCut | None = None

    def cut_at_commit(self, when: CommitCut | None) -> None:
        """Arm a one-shot reset at the next COMMIT (``None`` disarms it)."""
        self.commit_cut = when

    def clear(self) -> None:
        self.commit_cut = None
        super().clear()

    def _on_acceptable(self) -> None:
        # The base class builds its connections from the module's ``_Link``: make them
        # COMMIT-aware for this proxy only. Accepting runs no await, so no other proxy can
        # accept while the name is swapped.
        saved = proxy_module._Link
        proxy_module._Link = _CommitAwareLink  # type: ignore[misc]
        try:
            super()._on_acceptable()
        finally:
            proxy_module._Link = saved  # type: ignore[misc]


class _CommitAwareLink(proxy_module._Link):
    """A proxied PostgreSQL connection that resets itself at an armed COMMIT."""

    async def _forward(
        self, way: proxy_module._Way, data: bytes, writer: asyncio.StreamWriter
    ) -> bool:
        proxy = self.proxy
        if isinstance(proxy, PgFaultProxy) and proxy.commit_cut is not None:
            hit = (proxy.commit_cut == "before" and way == "up" and _COMMIT_QUERY in data) or (
                proxy.commit_cut == "after" and way == "down" and _COMMIT_DONE in data
            )
            if hit:
                proxy.stats.faults[f"cut_{proxy.commit_cut}_commit"] += 1
                proxy.commit_cut = None
                self.shut("reset")
                return False
        return await super()._forward(way, data, writer)


class ThreadedPgProxy:
    """A :class:`PgFaultProxy` running on an event loop of its own, in a thread.

    Every round trip of the hub to PostgreSQL passes through this proxy, several per push
    transaction, all under the hub's feed lock. In the test's own event loop each hop would
    wait behind everything else that loop runs (ten edges, the hub), and the hub's pushes
    would crawl for a reason no deployment has. Use as ``async with``; the fault methods are
    coroutines that run the proxy's method on its loop and return its result.
    """

    def __init__(self, *, target_host: str, target_port: int, seed: int | None = None) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="pg-proxy")
        self._proxy = PgFaultProxy(target_host=target_host, target_port=target_port, seed=seed)

    @property
    def port(self) -> int:
        return self._proxy.port

    async def __aenter__(self) -> Self:
        self._thread.start()
        await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self._proxy.start(), self._loop))
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            await asyncio.wrap_future(
                asyncio.run_coroutine_threadsafe(self._proxy.close(), self._loop)
            )
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            await asyncio.to_thread(self._thread.join)
            self._loop.close()

    async def _on_loop(self, fn: Callable[[], T]) -> T:
        done: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            try:
                done.set_result(fn())
            except BaseException as exc:  # handed to the caller
                done.set_exception(exc)

        self._loop.call_soon_threadsafe(run)
        return await asyncio.wrap_future(done)

    async def reset_peer(self) -> int:
        """Reset every connection of the hub to PostgreSQL now; returns how many."""
        return await self._on_loop(self._proxy.reset_peer)

    async def cut_at_commit(self, when: CommitCut | None) -> None:
        """See :meth:`PgFaultProxy.cut_at_commit`."""
        await self._on_loop(lambda: self._proxy.cut_at_commit(when))

    async def clear(self) -> None:
        await self._on_loop(self._proxy.clear)

    async def faults(self) -> collections.Counter[str]:
        """A copy of the faults that fired, by kind (see :class:`ProxyStats`)."""
        return await self._on_loop(lambda: collections.Counter(self._proxy.stats.faults))
