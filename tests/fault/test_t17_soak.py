"""T17: the combined-nemesis soak: every invariant holds under a seeded mix of every fault
kind, checked at a quiescence every period; no resource grows without bound (RELIABILITY.md
T17, the release gate).

The cluster: the private PostgreSQL and Redis, two hub processes sharing them
(:class:`fault.cluster.HubCluster`), and :data:`EDGES` edge processes (``t17_child.py``: the
real edge daemon plus a writer at :data:`RATE` writes/s across the critical, important and
standard cells of its group's clinic, printing a key only after ``put`` returned). Edges are
split across the two hubs and each reaches its hub through a fault proxy of its own. Edges
are also split in :data:`GROUPS` groups, one clinic each (quick mode: one, clinic-12); an
edge writes and subscribes to its group's clinic, so every edge must end up holding what
every other edge of its group wrote. (Groups keep the long mode's 500 writes/s within what
one edge's disk holds in 2 h.)

The schedule, seeded from ``SYNCENGINE_SEED``: each period plans every fault kind once plus
random extras at random times in its fault window (:data:`FAULT_S`), and runs them as
overlapping tasks (one fault at a time per resource: a process and its disk, PostgreSQL,
Redis, a link; and one full disk at a time):

- ``edge_kill``: SIGKILL an edge and restart it after 0.2-2 s (T3);
- ``clock_skew``: restart an edge with its wall clock shifted inside the hub's drift
  (``skewed.py``), run it for a while, then restart it unskewed (T9, inside the drift only);
- ``hub_kill``: SIGKILL a hub; a supervisor restarts it on its port after 0.2-3 s (T5);
- ``pg_crash``: ``pg_ctl stop -m immediate``, then a start with WAL recovery (T5);
- ``pg_freeze``: SIGSTOP PostgreSQL for 1-4 s (T5);
- ``redis_stop``: stop Redis (connection refused) and start it empty (T11);
- ``redis_freeze``: SIGSTOP/SIGCONT Redis (a black hole, T11);
- ``redis_flushall``: FLUSHALL (T11);
- ``link_blackhole``: an edge's link forwards nothing for 3-15 s (T7);
- ``link_rst``: an RST in the middle of a request or of a response, a dropped response
  (the request landed, the answer never came), or an RST of every open connection (T7);
- ``link_flaky``: the link becomes a 3g link with RSTs now and then for 8-20 s (T7);
- ``disk_full``: a filler file takes (almost) all the free space of an edge's tmpfs for
  2-8 s, then is deleted (T12). Meanwhile the edge's ``put`` calls that need new space fail
  with a ``disk_full`` :class:`StorageError` and are never acknowledged (the writer goes on
  with its next key), and the daemon's own writes fail too: the daemon stops on that store
  failure, as it is built to (``syncengine edge run`` exits 1 for systemd to restart it), and
  ``t17_child.py`` starts a new one on the same store after 0.5 s; the process stays up.

Each edge's store lives on a tmpfs of its own (:data:`DISK_SIZE`), so the soak needs root
(the test is skipped otherwise; the negative control, which has no disk fault, does not).
SQLite keeps writing into the space its WAL file already holds, so the fault truncates the WAL
(``PRAGMA wal_checkpoint(TRUNCATE)``) before it places the filler: the next commit that grows
the WAL fails. The summary counts the refused puts (``disk_full_refused``, a coverage cell:
at least one per run) and the daemon's restarts (``daemon_disk_full_restarts``).

I/O errors (EIO: T12's libfiu ``pwrite``/``fsync`` faults) are not composed yet (libfiu wraps
a whole process from its start, so it cannot come and go as a fault of a running edge), nor
skews beyond the drift (their writes are meant to dead-letter, which the no-dead-letters
check here forbids).

At the end of each period (a quiescence): the nemesis stops and undoes every fault (what is
down restarts, links clear), the writers pause (each child says ``paused`` once no ``put`` is
in flight), and the test waits (at most :data:`SETTLE_S`) until every edge's outbox is empty
and every edge holds byte-identical ``state`` for exactly the hub's records of its clinic.
Each pass of that wait compares cheap tallies first (:func:`tally_edge`, :func:`tally_hub`)
and digests every record only once they agree, so the convergence time it notes is not the
time to read a long run's stores.
Then the checker, reading PostgreSQL with asyncpg and each edge file with sqlite3:

- every acknowledged write is in the hub's feed exactly once, with its value in ``records``
  (``lost``, ``duplicated``), and in its own edge's file (``lost_locally``);
- no dead letters, every edge file passes ``integrity_check``, no edge process died by itself
  (``edge_crashes``; a daemon stop on anything but a full disk ends its process);
- a put refused with ``disk_full`` is neither in the hub's feed nor in its edge's file
  (``refused_visible``), and no put was refused for another reason (``other_refusals``);
- convergence: ``divergent`` records, and edges ``not_converged`` within the bound;
- ``syncengine hub verify --deep`` passes (``verify_failures``).

Resources are sampled at every checkpoint: RSS and open fds of each hub and edge process,
each edge's file and WAL sizes and outbox depth, and PostgreSQL's connection count. Hub
``hub1`` and edge ``e0`` are never killed (every other fault still hits them), so their
figures span the run: a process whose RSS or fd count grew at every one of at least
:data:`LEAK_MIN_POINTS` checkpoints by more than the slack is a leak (a violation in long
mode; reported in quick mode, whose two checkpoints cannot show a trend).

Quick mode runs two periods of 45 s of faults on four edges at 3 writes/s each; long mode
runs the plan's 2 h in 15 min periods on eight edges in four groups offering 67.5 writes/s
each, so that the plan's 500 writes/s are acknowledged (Litestream's soak figure). The
negative control runs a short soak of edge kills against edges that acknowledge a write
before it commits: it must find lost writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import itertools
import json
import os
import random
import signal
import sqlite3
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import asyncpg
import msgpack
import pytest

from fault.cluster import HubCluster, HubProcess
from fault.common import (
    Violations,
    free_bytes,
    percentile,
    place_filler,
    require_root,
    run_cli,
    tmpfs,
)
from fault.harness import MODE, SEED, History, Summary, crashpoint_env, crashpoint_hits, pick
from fault.profiles import PROFILES, ShapedLink
from support.proxy import ProxyFactory
from support.servers import PostgresServer, RedisServer

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CHILD: Final = Path(__file__).with_name("t17_child.py")
SKEWED: Final = Path(__file__).with_name("skewed.py")

EDGES: Final = pick(4, 8)
#: Edges are split in this many groups (``e{i}`` is in group ``i % GROUPS``), one clinic each.
GROUPS: Final = pick(1, 4)
#: Each group's clinic (group 0's is clinic-12).
CLINICS: Final = tuple(f"west/ng/lagos/clinic-{12 + g}" for g in range(GROUPS))
CELL: Final = CLINICS[0]
RULES: Final = [
    rule
    for clinic in CLINICS
    for rule in (
        {"prefix": f"{clinic}/alerts", "tier": "critical"},
        {"prefix": f"{clinic}/stock", "tier": "important"},
    )
]
#: Short tier intervals, so that a quiescence settles in seconds.
POLICIES: Final = {
    "critical": {"retry_interval_s": 1},
    "important": {"push_interval_s": 1, "pull_interval_s": 1, "retry_interval_s": 1},
    "standard": {
        "offpeak_only": False,
        "push_interval_s": 2,
        "pull_interval_s": 2,
        "retry_interval_s": 1,
    },
}
HUB_SETTINGS: Final = {"tier_rules": RULES, "resolvers": {"stock": "counter"}}

#: Writes per second one edge offers. Long mode's 8 x 67.5 = 540/s is offered so that the
#: plan's 500/s are acknowledged: an edge writes nothing while it restarts after a kill, and
#: full disks refuse writes (8 x 62.5 offered gave 467/s acknowledged).
RATE: Final = pick(3.0, 67.5)
PERIODS: Final = pick(2, 8)
#: Seconds of faults per period (long: 15 min periods minus the quiescence).
FAULT_S: Final = pick(45.0, 780.0)
#: One fault every this many seconds on average (at least every kind once per period).
FAULT_EVERY_S: Final = pick(3.0, 8.0)
#: How long a quiescence may take to converge before what is left counts as not converged.
SETTLE_S: Final = 90.0
READY_S: Final = 60.0
#: ``hub verify --deep`` replays the whole feed: minutes on a long run's feed.
VERIFY_TIMEOUT_S: Final = pick(120.0, 900.0)
#: Processes never killed by the nemesis: their resource figures span the whole run.
SENTINEL_HUB: Final = "hub1"
SENTINEL_EDGE: Final = "e0"
#: A leak: growth at every one of at least this many checkpoints, beyond the slack.
LEAK_MIN_POINTS: Final = 4
LEAK_SLACK: Final = {"rss_kb": 32 * 1024, "fds": 16}
#: Wall-clock skews of the clock_skew fault, inside the hub's 300 s drift.
SKEW_S: Final = (-1800.0, 120.0)
#: The negative control's crash point probability, per group commit.
CONTROL_POINT_P: Final = 0.2
#: Each edge's tmpfs. It must hold the store's normal growth over a long run, so that the
#: disk is full only while the filler is there: every edge holds every record of its group,
#: and 2 h at the long mode's 2 edges a group x 67.5 writes/s is 972,000 records. A record
#: takes 205 B of the file (its row and its key's index entry, measured with ``dbstat`` over
#: 30,000 puts of these keys and documents), 307 B with its outbox row (freed once pushed);
#: counting 400 B for half-full pages, that is 390 MB. The WAL stays at up to
#: ``journal_size_limit`` (64 MB) when checkpoints lag, and the -shm is far smaller: about
#: 460 MB in all, so 768 MB leaves about 300 MB of headroom (quick mode writes a few
#: thousand records). tmpfs takes memory only for what is written (8 x 460 MB at most), but
#: the filler allocates all the free space: one disk is full at a time
#: (:attr:`Soak.disk_lock`).
DISK_SIZE: Final = pick("512m", "768m")
#: Free space the filler leaves: a few pages, so the next commit that grows a file fails.
DISK_LEAVE_BYTES: Final = 16 * 1024
#: How long a disk stays full.
DISK_FULL_S: Final = (2.0, 8.0)

PROCESS_KINDS: Final = ("edge_kill", "clock_skew", "hub_kill")
PG_KINDS: Final = ("pg_crash", "pg_freeze")
REDIS_KINDS: Final = ("redis_stop", "redis_freeze", "redis_flushall")
LINK_KINDS: Final = ("link_blackhole", "link_rst", "link_flaky")
DISK_KINDS: Final = ("disk_full",)
KINDS: Final = (*PROCESS_KINDS, *PG_KINDS, *REDIS_KINDS, *LINK_KINDS, *DISK_KINDS)

VIOLATIONS: Final = (
    "lost_locally",
    "dead_letters",
    "not_converged",
    "verify_failures",
    "integrity_failures",
    "edge_crashes",
    "refused_visible",
    "other_refusals",
    "leaks",
)


# ============================================================================ processes


class EdgeProc:
    """One ``t17_child.py`` process; what it says (acknowledged keys, refused puts, daemon
    restarts) goes to its :class:`Edge` as it arrives."""

    def __init__(self, proc: asyncio.subprocess.Process, edge: Edge) -> None:
        self.proc = proc
        self.edge = edge
        self.ready = asyncio.Event()
        self.bootstrapped = asyncio.Event()
        self.paused = asyncio.Event()
        self.resumed = asyncio.Event()
        self.killed = False  # by this test
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def start(cls, edge: Edge, prefix: str, wrapper: tuple[str, ...] = ()) -> EdgeProc:
        proc = await asyncio.create_subprocess_exec(
            *wrapper,
            sys.executable,
            str(CHILD),
            json.dumps(edge.config),
            prefix,
            str(RATE),
            edge.cell,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
            env=edge.env,
        )
        return cls(proc, edge)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def exited(self) -> int | None:
        return self.proc.returncode

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        # Only complete lines count: a torn last line was never acknowledged.
        while line := await self.proc.stdout.readline():
            if not line.endswith(b"\n"):
                break
            text = line.decode().strip()
            if text == "ready":
                self.ready.set()
            elif text == "bootstrapped":
                self.bootstrapped.set()
            elif text == "paused":
                self.paused.set()
            elif text == "resumed":
                self.resumed.set()
            elif text.startswith("refused "):
                _, key, code = text.split(" ", 2)
                self.edge.refused[key] = code
            elif text.startswith("daemon-restart "):
                self.edge.daemon_restarts[text.split(" ", 1)[1]] += 1
            elif text:
                self.edge.acked.add(text)

    async def command(self, command: str, answer: asyncio.Event, timeout: float) -> bool:
        """Send ``command``; True once the child answered within ``timeout``."""
        answer.clear()
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(command.encode() + b"\n")
            await self.proc.stdin.drain()
            await asyncio.wait_for(answer.wait(), timeout)
        except (TimeoutError, ConnectionError):
            return False
        return True

    async def kill(self) -> int:
        self.killed = True
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGKILL)
        code = await self.proc.wait()
        await self._reader
        return code


@dataclass
class Edge:
    """One edge: its config, link, current process, every key it acknowledged and every put
    refused."""

    name: str
    hub: HubProcess
    db: Path
    config: dict[str, Any]
    link: ShapedLink
    env: dict[str, str]
    #: The tmpfs holding its store (None when the soak has no disk fault).
    disk: Path | None = None
    #: Its group's clinic: what it writes and subscribes to.
    cell: str = CELL
    proc: EdgeProc | None = None
    starts: int = 0
    acked: set[str] = field(default_factory=set)
    #: Key -> error code of each put that failed (never acknowledged).
    refused: dict[str, str] = field(default_factory=dict)
    #: Daemon stops on a store failure that the process restarted, by error code.
    daemon_restarts: Counter[str] = field(default_factory=Counter)
    #: Held by a fault that stops or restarts the process (the supervisor keeps off).
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    link_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    paused: bool = False

    async def start(self, wrapper: tuple[str, ...] = ()) -> None:
        prefix = f"{self.name}-s{self.starts}"
        self.starts += 1
        self.proc = await EdgeProc.start(self, prefix, wrapper)
        await self.wait_ready()
        if self.paused:
            await self.proc.command("pause", self.proc.paused, 30)

    async def wait_ready(self) -> None:
        assert self.proc is not None
        ready = asyncio.create_task(self.proc.ready.wait())
        died = asyncio.create_task(self.proc.proc.wait())
        try:
            await asyncio.wait({ready, died}, timeout=READY_S, return_when=asyncio.FIRST_COMPLETED)
        finally:
            ready.cancel()
            died.cancel()

    async def kill(self) -> None:
        if self.proc is not None:
            await self.proc.kill()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.exited() is None

    @property
    def wal(self) -> Path:
        return Path(f"{self.db}-wal")


# ============================================================================ the nemesis


@dataclass
class Stats:
    planned: Counter[str] = field(default_factory=Counter)
    applied: Counter[str] = field(default_factory=Counter)
    skipped: Counter[str] = field(default_factory=Counter)
    variants: Counter[str] = field(default_factory=Counter)
    hub_restarts: int = 0
    hub_self_exits: int = 0
    hub_start_failures: int = 0
    edge_self_exits: int = 0
    edge_exit_codes: Counter[int] = field(default_factory=Counter)


class Soak:
    """The cluster under the nemesis, its quiescences and its checks."""

    def __init__(
        self,
        *,
        cluster: HubCluster,
        edges: list[Edge],
        postgres: PostgresServer,
        redis: RedisServer,
        dsn: str,
        history: History,
        kinds: tuple[str, ...],
        expect_self_exits: bool = False,
    ) -> None:
        self.cluster = cluster
        self.edges = edges
        self.postgres = postgres
        self.redis = redis
        self.dsn = dsn
        self.history = history
        self.kinds = kinds
        self.expect_self_exits = expect_self_exits
        self.rng = random.Random(SEED)
        self.stats = Stats()
        self.heal = asyncio.Event()
        self.pg_lock = asyncio.Lock()
        self.redis_lock = asyncio.Lock()
        #: One disk full at a time: each filler takes up to a whole tmpfs of memory.
        self.disk_lock = asyncio.Lock()
        self.hub_locks = {h.name: asyncio.Lock() for h in cluster.hubs}
        #: Hubs a fault holds down (the supervisor does not restart them meanwhile).
        self.held: set[str] = set()
        self.violations = Violations()
        self.samples: list[dict[str, Any]] = []
        self.converge_s: list[float | None] = []
        self.checks: list[dict[str, Any]] = []

    @property
    def clinics(self) -> list[str]:
        """The clinics of the edges' groups."""
        return sorted({e.cell for e in self.edges})

    def log(self, op: str, value: Any = None) -> None:
        self.history.log("nemesis", op, "info", value)

    # -- supervisors ----------------------------------------------------------------------

    async def supervise_hub(self, hub: HubProcess) -> None:
        """Restart ``hub`` whenever it is down and no fault holds it down. A hub that had
        answered and then exited by itself (not by SIGKILL) is counted as a self exit; a
        start that exits before answering (PostgreSQL down or frozen) as a start failure."""
        backoff = 0.2
        up_pid: int | None = hub.pid
        while True:
            await asyncio.sleep(0.1)
            if hub.running or hub.name in self.held:
                continue
            if up_pid is not None and hub.returncode != -signal.SIGKILL:
                self.stats.hub_self_exits += 1
                self.log("hub_exited", {"hub": hub.name, "code": hub.returncode})
            up_pid = None
            hub.start()
            self.stats.hub_restarts += 1
            try:
                up = await hub.wait_ready(timeout_s=READY_S)
            except TimeoutError:
                up = False
            if up:
                backoff = 0.2
                up_pid = hub.pid
                self.log("hub_up", {"hub": hub.name})
            else:
                self.stats.hub_start_failures += 1
                hub.kill()
                await asyncio.sleep(backoff)
                backoff = min(2 * backoff, 2.0)

    async def supervise_edge(self, edge: Edge) -> None:
        """Restart ``edge`` if its daemon died by itself (an edge crash, a violation unless
        crash points are armed)."""
        while True:
            await asyncio.sleep(0.2)
            if edge.lock.locked() or edge.proc is None or edge.running or edge.proc.killed:
                continue
            async with edge.lock:
                proc = edge.proc  # (a fault may have replaced it meanwhile)
                if proc.exited() is None or proc.killed:
                    continue
                code = await proc.proc.wait()
                self.stats.edge_self_exits += 1
                self.stats.edge_exit_codes[code] += 1
                self.log("edge_exited", {"edge": edge.name, "code": code})
                if not self.expect_self_exits:
                    self.violations.bad("edge_crashes", f"{edge.name} exited {code} by itself")
                await edge.kill()  # (reaps it and collects its last lines)
                await edge.start()

    # -- the schedule ---------------------------------------------------------------------

    def plan(self, fault_s: float, every_s: float) -> list[tuple[float, str]]:
        """A period's schedule: every kind once plus random extras, at random times in the
        first 80 % of the fault window (so that most faults end before the heal)."""
        count = max(len(self.kinds), int(fault_s / every_s))
        chosen = [
            *self.kinds,
            *(self.rng.choice(self.kinds) for _ in range(count - len(self.kinds))),
        ]
        return sorted((self.rng.uniform(0.5, 0.8 * fault_s), k) for k in chosen)

    async def nemesis(self, fault_s: float, every_s: float) -> None:
        """Run one period's schedule; returns after ``fault_s`` with every fault undone."""
        self.heal.clear()
        self.log("faults_begin")
        started = time.monotonic()
        tasks: list[asyncio.Task[None]] = []
        for at, kind in self.plan(fault_s, every_s):
            await asyncio.sleep(max(0.0, started + at - time.monotonic()))
            self.stats.planned[kind] += 1
            rng = random.Random(self.rng.random())
            tasks.append(asyncio.create_task(self.fault(kind, rng), name=kind))
        await asyncio.sleep(max(0.0, started + fault_s - time.monotonic()))
        self.heal.set()
        self.log("heal")
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for task, result in zip(tasks, results, strict=True):
            if isinstance(result, BaseException):
                raise AssertionError(f"fault {task.get_name()} failed: {result!r}") from result

    async def _outage(
        self, kind: str, start: Callable[[], Any], stop: Callable[[], Any], hold_s: float
    ) -> None:
        """Apply a server fault (``start``), hold it ``hold_s``, then undo it (``stop``)."""
        await asyncio.to_thread(start)
        self._applied(kind)
        try:
            await self.hold(hold_s)
        finally:
            await asyncio.to_thread(stop)

    async def hold(self, seconds: float) -> None:
        """Sleep ``seconds``, or less if the heal comes first."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.heal.wait(), seconds)

    def _applied(self, kind: str, **what: Any) -> None:
        self.stats.applied[kind] += 1
        self.log(kind, what)

    async def fault(self, kind: str, rng: random.Random) -> None:
        if kind in ("edge_kill", "clock_skew"):
            victims = [e for e in self.edges if e.name != SENTINEL_EDGE and not e.lock.locked()]
            if not victims:
                self.stats.skipped[kind] += 1
                return
            edge = rng.choice(victims)
            async with edge.lock:
                if self.heal.is_set():
                    self.stats.skipped[kind] += 1
                    return
                await edge.kill()
                if kind == "edge_kill":
                    self._applied(kind, edge=edge.name)
                    await self.hold(rng.uniform(0.2, 2.0))
                    await edge.start()
                else:
                    offset = round(rng.uniform(*SKEW_S))
                    await edge.start((sys.executable, str(SKEWED), str(offset)))
                    self._applied(kind, edge=edge.name, offset_s=offset)
                    await self.hold(rng.uniform(5, 15))
                    await edge.kill()
                    await edge.start()
        elif kind == "hub_kill":
            hubs = [h for h in self.cluster.hubs if h.name != SENTINEL_HUB]
            hub = rng.choice(hubs)
            async with self.hub_locks[hub.name]:
                if self.heal.is_set():
                    self.stats.skipped[kind] += 1
                    return
                self.held.add(hub.name)
                try:
                    if hub.kill():
                        self._applied(kind, hub=hub.name)
                    else:
                        self.stats.skipped[kind] += 1
                    await self.hold(rng.uniform(0.2, 3.0))
                finally:
                    self.held.discard(hub.name)
        elif kind in PG_KINDS:
            async with self.pg_lock:
                if self.heal.is_set():
                    self.stats.skipped[kind] += 1
                    return
                if kind == "pg_crash":
                    await self._outage(
                        kind, self.postgres.crash, self.postgres.start, rng.uniform(0.5, 3.0)
                    )
                else:
                    await self._outage(
                        kind, self.postgres.pause, self.postgres.resume, rng.uniform(1.0, 4.0)
                    )
        elif kind in REDIS_KINDS:
            async with self.redis_lock:
                if self.heal.is_set():
                    self.stats.skipped[kind] += 1
                    return
                if kind == "redis_stop":
                    await self._outage(
                        kind, self.redis.stop, self.redis.start, rng.uniform(2.0, 8.0)
                    )
                elif kind == "redis_freeze":
                    await self._outage(
                        kind, self.redis.pause, self.redis.resume, rng.uniform(1.0, 5.0)
                    )
                else:
                    await asyncio.to_thread(self.redis.flushall)
                    self._applied(kind)
        elif kind in LINK_KINDS:
            free = [e for e in self.edges if not e.link_lock.locked()]
            if not free:
                self.stats.skipped[kind] += 1
                return
            edge = rng.choice(free)
            async with edge.link_lock:
                if self.heal.is_set():
                    self.stats.skipped[kind] += 1
                    return
                try:
                    await self.link_fault(kind, edge, rng)
                finally:
                    edge.link.proxy.clear()
        elif kind == "disk_full":
            async with self.disk_lock:
                # Not while a fault restarts the process: its store would not open.
                victims = [e for e in self.edges if e.disk is not None and not e.lock.locked()]
                if not victims or self.heal.is_set():
                    self.stats.skipped[kind] += 1
                    return
                edge = rng.choice(victims)
                async with edge.lock:
                    await self.disk_full(edge, rng)
        else:
            raise AssertionError(f"unknown fault kind {kind!r}")

    async def disk_full(self, edge: Edge, rng: random.Random) -> None:
        """Fill ``edge``'s tmpfs for 2-8 s (or until the heal), then free it.

        SQLite writes into the space its WAL file already holds (4 MB here, rewritten from
        its start after each checkpoint), and at the soak's rates a WAL lasts well over a
        minute: a full disk would refuse nothing within a few seconds. So the WAL is first
        truncated through SQLite, as a checkpoint at a restart or an operator's
        ``PRAGMA wal_checkpoint(TRUNCATE)`` does; the filler then takes that space too, and
        the next commit that needs the WAL to grow fails."""
        disk = edge.disk
        assert disk is not None
        try:
            truncated = await asyncio.to_thread(truncate_wal, edge.db)
            self.stats.variants["disk_full_wal_" + ("truncated" if truncated else "busy")] += 1
            size = await self._fill(disk)
            free = await asyncio.to_thread(free_bytes, disk)
            self._applied(
                "disk_full", edge=edge.name, filler_mb=size >> 20, free_b=free, wal=truncated
            )
            await self.hold(rng.uniform(*DISK_FULL_S))
        finally:
            await asyncio.to_thread((disk / "filler").unlink, missing_ok=True)

    @staticmethod
    async def _fill(disk: Path) -> int:
        """Place the filler; its size. The edge writes meanwhile, so the space measured
        before the allocation can be gone when it runs (ENOSPC): measure again."""
        for _ in range(5):
            try:
                return await asyncio.to_thread(place_filler, disk, DISK_LEAVE_BYTES)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
        raise AssertionError(f"no filler fits on {disk}: the edge's writes outran it 5 times")

    async def link_fault(self, kind: str, edge: Edge, rng: random.Random) -> None:
        link = edge.link
        if kind == "link_blackhole":
            with link.hole():
                self._applied(kind, edge=edge.name)
                await self.hold(rng.uniform(3.0, 15.0))
        elif kind == "link_rst":
            variant = rng.choice(("rst_mid_request", "rst_mid_response", "drop_response"))
            if await self._until_heal(self._rst(link, variant, rng)):
                self.stats.variants[variant] += 1
                self._applied(kind, edge=edge.name, variant=variant)
            elif link.proxy.reset_peer():
                self.stats.variants["reset_peer"] += 1
                self._applied(kind, edge=edge.name, variant="reset_peer")
            else:
                self.stats.skipped[kind] += 1
        else:  # link_flaky: 3g with RSTs now and then
            profile = PROFILES["3g"]
            assert profile.rate_bps is not None
            link.proxy.latency(profile.latency_ms, profile.jitter_ms)
            link.proxy.bandwidth(profile.rate_bps)
            self._applied(kind, edge=edge.name)
            until = time.monotonic() + rng.uniform(8.0, 20.0)
            while not self.heal.is_set() and time.monotonic() < until:
                await self.hold(rng.expovariate(1 / 3.0))
                if self.heal.is_set():
                    break
                variant = rng.choice(("rst_mid_request", "rst_mid_response"))
                if await self._until_heal(self._rst(link, variant, rng)):
                    self.stats.variants[f"flaky_{variant}"] += 1

    @staticmethod
    async def _rst(link: ShapedLink, variant: str, rng: random.Random) -> bool:
        if variant == "rst_mid_request":
            return await link.rst_mid_request(rng.randint(64, 2048))
        if variant == "rst_mid_response":
            return await link.rst_mid_response(rng.randint(64, 2048))
        return await link.drop_responses(rng.randint(1, 2))

    async def _until_heal(self, coro: Awaitable[bool]) -> bool:
        """``coro``'s result, or False if the heal came first (it is cancelled then)."""
        task = asyncio.ensure_future(coro)
        healed = asyncio.create_task(self.heal.wait())
        try:
            await asyncio.wait({task, healed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            healed.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            return False
        return bool(task.result())

    # -- quiescence -----------------------------------------------------------------------

    async def quiesce(self, period: int) -> dict[str, Any]:
        """Everything healed and running, writers paused, then wait for convergence; the
        seconds it took (None: not within :data:`SETTLE_S`)."""
        began = time.monotonic()
        await asyncio.to_thread(self.postgres.ensure_running)
        await asyncio.to_thread(self.redis.ensure_running)
        for edge in self.edges:
            edge.link.proxy.clear()
        for hub in self.cluster.hubs:
            deadline = time.monotonic() + READY_S
            while not (hub.running and await hub.wait_ready(timeout_s=READY_S)):
                assert time.monotonic() < deadline, f"{hub.name} not back: {hub.log_tail()}"
                await asyncio.sleep(0.2)
        for edge in self.edges:
            edge.paused = True
            await self._command(edge, "pause")
        healed_s = time.monotonic() - began
        settled = time.monotonic()
        conn = await asyncpg.connect(self.dsn)
        trace: list[list[Any]] = []
        converged: float | None = None
        try:
            while True:
                at = time.monotonic() - settled
                # A pass first compares tallies (a scan each side, nothing sent to Python),
                # and digests every record only once they agree: the full read of a long
                # run's stores takes many seconds, which a pass would add to the time noted.
                wanted = await tally_hub(conn, self.clinics)
                tallies = [
                    await asyncio.to_thread(tally_edge, edge.db, edge.cell) for edge in self.edges
                ]
                queued = sum(depth for _, depth in tallies)
                behind = sum(
                    depth > 0 or tally != wanted[edge.cell]
                    for edge, (tally, depth) in zip(self.edges, tallies, strict=True)
                )
                trace.append([round(at, 1), queued, behind])
                if not behind and await self._same_digests(conn):
                    converged = at
                    break
                if at > SETTLE_S:
                    break
                await asyncio.sleep(0.5)
        finally:
            await conn.close()
        self.converge_s.append(None if converged is None else round(converged, 1))
        self.log("quiescent", {"period": period, "converge_s": converged, "trace": trace[-1:]})
        return {
            "period": period,
            "heal_s": round(healed_s, 1),
            "converge_s": None if converged is None else round(converged, 1),
            "trace": trace[:: max(1, len(trace) // 8)],
        }

    async def _same_digests(self, conn: asyncpg.Connection) -> bool:
        """Every edge holds exactly its clinic's records at the hub, byte for byte, and has
        nothing queued."""
        wanted = {cell: digest(await read_hub(conn, cell)) for cell in self.clinics}
        for edge in self.edges:
            records, depth, _ = await asyncio.to_thread(read_edge, edge.db, edge.cell)
            if depth or digest(records) != wanted[edge.cell]:
                return False
        return True

    async def resume(self) -> None:
        for edge in self.edges:
            edge.paused = False
            await self._command(edge, "resume")

    async def _command(self, edge: Edge, command: str) -> None:
        """``pause`` or ``resume`` ``edge``'s writers (restarting it if it died meanwhile:
        a restarted edge takes :attr:`Edge.paused` from the start)."""
        async with edge.lock:
            for _ in range(3):
                if not edge.running:
                    await edge.kill()
                    await edge.start()
                    continue
                assert edge.proc is not None
                answer = edge.proc.paused if command == "pause" else edge.proc.resumed
                if await edge.proc.command(command, answer, 30):
                    return
            raise AssertionError(f"edge {edge.name} did not {command} within 3 tries")

    # -- the checks -----------------------------------------------------------------------

    async def check(self, period: int, converged: bool) -> dict[str, int]:
        """Every invariant against the stores themselves; violations of this checkpoint."""
        v = Violations()
        conn = await asyncpg.connect(self.dsn)
        try:
            feed = await conn.fetch("SELECT node_id, key FROM feed")
            # Keys are unique across edges (each edge's prefix).
            docs = {
                r["key"]: r["doc"]
                for r in await conn.fetch("SELECT key, doc::text AS doc FROM records")
            }
            hub_of = {cell: await read_hub(conn, cell) for cell in self.clinics}
        finally:
            await conn.close()
        in_feed = Counter((r["node_id"], r["key"]) for r in feed)
        unacked = 0
        for edge in self.edges:
            for key in edge.acked:
                n = in_feed.get((edge.name, key), 0)
                if n == 0:
                    v.bad("lost", f"{edge.name} {key} is not in the feed")
                elif n > 1:
                    v.bad("duplicated", f"{edge.name} {key} is in the feed {n} times", n - 1)
                else:
                    doc = docs.get(key)
                    n_want = int(key.rsplit("-", 1)[1])
                    if doc is None or json.loads(doc).get("n") != n_want:
                        v.bad("lost", f"{edge.name} {key}: the hub's records hold {doc!r}")
            unacked += sum(
                1 for (node, key) in in_feed if node == edge.name and key not in edge.acked
            )
            records, depth, dead = await asyncio.to_thread(read_edge, edge.db, edge.cell)
            hub_records = hub_of[edge.cell]
            local = {rk[2] for rk in records}
            missing = edge.acked - local
            if missing:
                v.bad("lost_locally", f"{edge.name}: {sorted(missing)[:3]}", len(missing))
            # SQLite refuses a write short of space before its commit frame: nothing stored.
            stored = sorted(
                key
                for key, code in edge.refused.items()
                if code == "disk_full" and (key in local or (edge.name, key) in in_feed)
            )
            if stored:
                v.bad("refused_visible", f"{edge.name}: {stored[:3]}", len(stored))
            other = Counter(code for code in edge.refused.values() if code != "disk_full")
            if other:
                v.bad("other_refusals", f"{edge.name}: {dict(other)}", other.total())
            if dead:
                v.bad("dead_letters", f"{edge.name}: {dead} dead letters", dead)
            differ = sorted(
                rk
                for rk in hub_records.keys() | records.keys()
                if records.get(rk) != hub_records.get(rk)
            )
            if differ:
                v.bad("divergent", f"{edge.name}: {differ[:3]} (outbox {depth})", len(differ))
            integrity = await asyncio.to_thread(integrity_of, edge.db)
            if integrity != "ok":
                v.bad("integrity_failures", f"{edge.name}: {integrity}")
        if not converged:
            v.bad("not_converged", f"period {period}: not converged within {SETTLE_S} s")
        code, out, err = await run_cli(
            self.cluster.hubs[0].config_path, "hub", "verify", "--deep", timeout=VERIFY_TIMEOUT_S
        )
        verify_ok = False
        with contextlib.suppress(ValueError):
            verify_ok = code == 0 and json.loads(out).get("ok") is True
        if not verify_ok:
            v.bad("verify_failures", f"period {period}: exit {code}: {(out or err)[:400]!r}")
        for name, n in v.counts.items():
            self.violations.bad(name, "; ".join(v.examples.get(name, [])), n)
        self.checks.append(
            {
                "period": period,
                "acknowledged": sum(len(e.acked) for e in self.edges),
                "hub_records": sum(len(held) for held in hub_of.values()),
                "feed_rows": len(feed),
                "unacknowledged_at_hub": unacked,
                "violations": dict(v.counts),
            }
        )
        return dict(v.counts)

    async def sample(self, period: int) -> None:
        """RSS and fds of every process, WAL size and outbox depth of every edge, and
        PostgreSQL's connections, at this checkpoint."""
        procs: dict[str, dict[str, Any]] = {}
        for hub in self.cluster.hubs:
            if hub.pid is not None:
                procs[hub.name] = {"pid": hub.pid, **proc_figures(hub.pid)}
        edges: dict[str, dict[str, Any]] = {}
        for edge in self.edges:
            if edge.proc is not None and edge.running:
                procs[edge.name] = {"pid": edge.proc.pid, **proc_figures(edge.proc.pid)}
            _, depth, _ = await asyncio.to_thread(read_edge, edge.db, edge.cell)
            edges[edge.name] = {
                "db_kb": edge.db.stat().st_size // 1024,
                "wal_kb": edge.wal.stat().st_size // 1024 if edge.wal.exists() else 0,
                "outbox": depth,
            }
        conn = await asyncpg.connect(self.dsn)
        try:
            pg_conns = await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            )
        finally:
            await conn.close()
        self.samples.append(
            {"period": period, "procs": procs, "edges": edges, "pg_connections": int(pg_conns)}
        )

    def leaks(self) -> dict[str, Any]:
        """Per process instance (name and pid) and figure: the growth across checkpoints,
        and whether it grew at every one of at least LEAK_MIN_POINTS beyond the slack."""
        series: dict[tuple[str, int], dict[str, list[int]]] = {}
        for s in self.samples:
            for name, figs in s["procs"].items():
                per = series.setdefault((name, figs["pid"]), {k: [] for k in LEAK_SLACK})
                for k in LEAK_SLACK:
                    if figs.get(k) is not None:
                        per[k].append(int(figs[k]))
        report: dict[str, Any] = {}
        for (name, pid), per in sorted(series.items()):
            for k, values in per.items():
                if len(values) < 2:
                    continue
                growth = values[-1] - values[0]
                monotone = all(b > a for a, b in itertools.pairwise(values))
                leak = len(values) >= LEAK_MIN_POINTS and monotone and growth > LEAK_SLACK[k]
                report[f"{name}:{pid}:{k}"] = {
                    "points": len(values),
                    "first": values[0],
                    "last": values[-1],
                    "per_period": round(growth / (len(values) - 1), 1),
                    "monotone": monotone,
                    "leak": leak,
                }
        pg = [s["pg_connections"] for s in self.samples]
        report["pg_connections"] = {"values": pg}
        return report


# ============================================================================ reading stores


def read_edge(db: Path, clinic: str) -> tuple[dict[tuple[str, str, str], bytes], int, int]:
    """An edge's records of ``clinic`` (key -> state), outbox depth and dead letters, read
    with sqlite3 as an operator would."""
    with read_only(db) as conn:
        records = {
            (c, coll, k): bytes(state)
            for c, coll, k, state in conn.execute(
                "SELECT cell, collection, key, state FROM records WHERE cell >= ? AND cell < ?",
                (clinic, clinic + "0"),
            )
        }
        (depth,) = conn.execute("SELECT count(*) FROM outbox").fetchone()
        (dead,) = conn.execute("SELECT count(*) FROM dead_letters").fetchone()
    return records, int(depth), int(dead)


def read_only(db: Path) -> contextlib.closing[sqlite3.Connection]:
    """A read-only connection to an edge file, closed on leaving the ``with`` block."""
    return contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30))


#: A record's ``hlc`` folded into 32 bits, so that a sum over a clinic fits 64-bit integers
#: in both SQLite and PostgreSQL.
_TALLY: Final = "count(*), coalesce(sum(length(state)), 0), coalesce(sum(hlc & 4294967295), 0)"


def tally_edge(db: Path, clinic: str) -> tuple[tuple[int, int, int], int]:
    """A cheap fingerprint of an edge's records of ``clinic`` (count, bytes of state, folded
    hlc sum: any write changes it in all but freak cases) and its outbox depth."""
    with read_only(db) as conn:
        count, size, stamps = conn.execute(
            f"SELECT {_TALLY} FROM records WHERE cell >= ? AND cell < ?", (clinic, clinic + "0")
        ).fetchone()
        (depth,) = conn.execute("SELECT count(*) FROM outbox").fetchone()
    return (int(count), int(size), int(stamps)), int(depth)


async def tally_hub(
    conn: asyncpg.Connection, clinics: list[str]
) -> dict[str, tuple[int, int, int]]:
    """:func:`tally_edge`'s fingerprint of the hub's records of each of ``clinics``."""
    tallies = {}
    for clinic in clinics:
        row = await conn.fetchrow(
            f"SELECT {_TALLY} FROM records WHERE cell >= $1 AND cell < $2", clinic, clinic + "0"
        )
        assert row is not None
        tallies[clinic] = (int(row[0]), int(row[1]), int(row[2]))
    return tallies


def truncate_wal(db: Path) -> bool:
    """``PRAGMA wal_checkpoint(TRUNCATE)`` on the edge file: True once the WAL is empty,
    False when readers or a writer kept the checkpoint busy."""
    conn = sqlite3.connect(db, timeout=2)
    try:
        busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    finally:
        conn.close()
    return int(busy) == 0


def integrity_of(db: Path) -> str:
    with read_only(db) as conn:
        return str(conn.execute("PRAGMA integrity_check").fetchone()[0])


async def read_hub(conn: asyncpg.Connection, clinic: str) -> dict[tuple[str, str, str], bytes]:
    """The hub's records of ``clinic`` (the cell and those under it)."""
    rows = await conn.fetch(
        "SELECT cell, collection, key, state FROM records WHERE cell >= $1 AND cell < $2",
        clinic,
        clinic + "0",
    )
    return {(r["cell"], r["collection"], r["key"]): bytes(r["state"]) for r in rows}


def digest(records: dict[tuple[str, str, str], bytes]) -> str:
    h = hashlib.sha256()
    for key in sorted(records):
        h.update(msgpack.packb([*key, records[key]]))
    return h.hexdigest()


def proc_figures(pid: int) -> dict[str, int | None]:
    """RSS (kB) and open fds of ``pid`` from /proc (None when it is gone)."""
    rss: int | None = None
    fds: int | None = None
    with contextlib.suppress(OSError, ValueError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
    with contextlib.suppress(OSError):
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    return {"rss_kb": rss, "fds": fds}


# ============================================================================ the scenario


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("SYNCENGINE_CRASHPOINT") and k not in ("DATABASE_URL", "REDIS_URL")
    }
    env["PYTHONUNBUFFERED"] = "1"
    return {**env, **(extra or {})}


@contextlib.asynccontextmanager
async def soak_cluster(
    *,
    tmp_path: Path,
    postgres: PostgresServer,
    redis_server: RedisServer,
    pg_dsn: str,
    redis_url: str,
    fault_proxy: ProxyFactory,
    n_edges: int,
    kinds: tuple[str, ...],
    env: dict[str, str],
    expect_self_exits: bool = False,
) -> AsyncIterator[Soak]:
    """Hubs, edges behind their proxies (every edge ready and bootstrapped, each store on a
    tmpfs of its own when ``kinds`` has ``disk_full``), supervisors."""
    rng = random.Random(SEED + 17)
    # ``disks`` unmounts the tmpfs mounts once the edges on them were killed (below).
    async with (
        HubCluster(
            tmp_path, database_url=pg_dsn, redis_url=redis_url, count=2, settings=HUB_SETTINGS
        ) as cluster,
        contextlib.AsyncExitStack() as disks,
    ):
        with History(tmp_path / "history.jsonl") as history:
            edges: list[Edge] = []
            for i in range(n_edges):
                name = f"e{i}"
                hub = cluster.hubs[i % 2]
                cell = CLINICS[i % GROUPS]
                token = await cluster.add_node(name, cell)
                proxy = await fault_proxy("127.0.0.1", hub.port, seed=rng.randrange(1 << 32))
                disk: Path | None = None
                if "disk_full" in kinds:
                    disk = disks.enter_context(tmpfs(tmp_path / f"{name}-disk", DISK_SIZE))
                db = (disk or tmp_path) / f"{name}.db"
                config = {
                    "node_id": name,
                    "region": "west",
                    "db": str(db),
                    "hub_url": f"http://127.0.0.1:{proxy.port}",
                    "token": token,
                    "subscriptions": [cell],
                    "tier_rules": RULES,
                    "resolvers": {"stock": "counter"},
                    "tier_policies": POLICIES,
                }
                link = ShapedLink(proxy, PROFILES["3g"], random.Random(rng.randrange(1 << 32)))
                edges.append(Edge(name, hub, db, config, link, env, disk=disk, cell=cell))
            soak = Soak(
                cluster=cluster,
                edges=edges,
                postgres=postgres,
                redis=redis_server,
                dsn=pg_dsn,
                history=history,
                kinds=kinds,
                expect_self_exits=expect_self_exits,
            )
            await asyncio.gather(*(e.start() for e in edges))
            for e in edges:
                # The control's edges may die at a crash point right after they started.
                assert e.proc is not None and (e.running or expect_self_exits), (
                    f"edge {e.name} did not start"
                )
                await asyncio.wait_for(e.proc.bootstrapped.wait(), READY_S)
            supervisors = [asyncio.create_task(soak.supervise_hub(h)) for h in cluster.hubs]
            supervisors += [asyncio.create_task(soak.supervise_edge(e)) for e in edges]
            try:
                yield soak
            finally:
                for task in supervisors:
                    task.cancel()
                await asyncio.gather(*supervisors, return_exceptions=True)
                for e in edges:
                    await e.kill()
                await asyncio.to_thread(postgres.ensure_running)
                await asyncio.to_thread(redis_server.ensure_running)


async def run_periods(
    soak: Soak, periods: int, fault_s: float, every_s: float, summary: Summary
) -> None:
    for period in range(periods):
        t0 = time.monotonic()
        acked_before = sum(len(e.acked) for e in soak.edges)
        await soak.nemesis(fault_s, every_s)
        acked = sum(len(e.acked) for e in soak.edges) - acked_before
        settle = await soak.quiesce(period)
        settle["writes_per_s"] = round(acked / fault_s, 1)
        await soak.check(period, settle["converge_s"] is not None)
        await soak.sample(period)
        settle["period_s"] = round(time.monotonic() - t0, 1)
        summary.figures.setdefault("periods_detail", []).append(settle)
        if period < periods - 1:
            await soak.resume()


def fill_summary(soak: Soak, summary: Summary, fault_s: float) -> None:
    s = soak.stats
    summary.cases = sum(s.applied.values())
    summary.acknowledged = sum(len(e.acked) for e in soak.edges)
    summary.counts = {"lost": 0, "duplicated": 0, "divergent": 0, **dict(soak.violations.counts)}
    for name in VIOLATIONS:
        summary.counts.setdefault(name, 0)
    refused = Counter(code for e in soak.edges for code in e.refused.values())
    summary.counts["disk_full_refused"] = refused["disk_full"]
    summary.counts["daemon_disk_full_restarts"] = sum(
        e.daemon_restarts["disk_full"] for e in soak.edges
    )
    leaks = soak.leaks()
    n_leaks = sum(1 for k, r in leaks.items() if k != "pg_connections" and r["leak"])
    summary.counts["leaks"] = n_leaks if MODE == "long" else 0
    converge = [c for c in soak.converge_s if c is not None]
    periods = len(soak.converge_s)
    summary.cover(soak.kinds, s.applied)
    if "disk_full" in soak.kinds:
        # A full disk that refused no put proved nothing about puts.
        summary.cover(["disk_full_refused"], summary.counts)
    summary.figures.update(
        {
            "periods": periods,
            "fault_s_per_period": fault_s,
            "edges": len(soak.edges),
            "writes_per_s": round(summary.acknowledged / max(1.0, periods * fault_s), 1),
            "faults_planned": dict(sorted(s.planned.items())),
            "faults_skipped": dict(sorted(s.skipped.items())),
            "link_variants": dict(sorted(s.variants.items())),
            "refused_by_code": dict(refused),
            "refused_by_edge": {e.name: len(e.refused) for e in soak.edges},
            "daemon_restarts_by_edge": {e.name: e.daemon_restarts.total() for e in soak.edges},
            "hub_restarts": s.hub_restarts,
            "hub_self_exits": s.hub_self_exits,
            "hub_start_failures": s.hub_start_failures,
            "edge_self_exits": s.edge_self_exits,
            "edge_starts": {e.name: e.starts for e in soak.edges},
            "converge_s": soak.converge_s,
            "converge_s_p50": percentile(converge, 0.5) if converge else None,
            "converge_s_max": max(converge) if converge else None,
            "checks": soak.checks,
            "samples": soak.samples,
            "leaks": leaks,
            "leaks_seen": n_leaks,
            "examples": soak.violations.examples,
        }
    )


# ============================================================================ the tests


async def test_t17_combined_nemesis_soak(
    tmp_path: Path,
    postgres: PostgresServer,
    redis_server: RedisServer,
    pg_dsn: str,
    redis_url: str,
    fault_proxy: ProxyFactory,
) -> None:
    """Under a seeded mix of edge kills, skewed restarts, hub kills, PostgreSQL crashes and
    freezes, Redis outages, freezes and flushes, link faults and full edge disks, every
    period ends converged with nothing lost or duplicated, no dead letter, a clean ``hub
    verify`` and no leak; no put refused for lack of space is stored anywhere."""
    require_root("the T17 soak (a tmpfs per edge for disk_full)")
    summary = Summary("T17", "combined-nemesis soak", extra_violations=VIOLATIONS)
    async with soak_cluster(
        tmp_path=tmp_path,
        postgres=postgres,
        redis_server=redis_server,
        pg_dsn=pg_dsn,
        redis_url=redis_url,
        fault_proxy=fault_proxy,
        n_edges=EDGES,
        kinds=KINDS,
        env=child_env(),
    ) as soak:
        await run_periods(soak, PERIODS, FAULT_S, FAULT_EVERY_S, summary)
    fill_summary(soak, summary, FAULT_S)
    assert summary.acknowledged > 100, "the edges barely wrote anything: the soak saw nothing"
    summary.finish()


async def test_t17_negative_control_ack_before_commit_loses_writes(
    tmp_path: Path,
    postgres: PostgresServer,
    redis_server: RedisServer,
    pg_dsn: str,
    redis_url: str,
    fault_proxy: ProxyFactory,
) -> None:
    """The same soak, short and with edge kills only, against edges whose store
    acknowledges a write before its transaction commits (and that die between the two, at
    a crash point): the checks must find lost writes."""
    summary = Summary("T17", "control: edge acks before commit")
    env = crashpoint_env(
        {"edge.put.before_commit": CONTROL_POINT_P},
        tmp_path / "crashpoints.log",
        child_env({"SYNCENGINE_T3_BROKEN": "ack_before_commit"}),
    )
    async with soak_cluster(
        tmp_path=tmp_path,
        postgres=postgres,
        redis_server=redis_server,
        pg_dsn=pg_dsn,
        redis_url=redis_url,
        fault_proxy=fault_proxy,
        n_edges=2,
        kinds=("edge_kill",),
        env=env,
        expect_self_exits=True,
    ) as soak:
        await run_periods(soak, 1, 20.0, 2.0, summary)
    fill_summary(soak, summary, 20.0)
    summary.cover(["edge.put.before_commit"], crashpoint_hits(tmp_path / "crashpoints.log"))
    summary.control("lost")
