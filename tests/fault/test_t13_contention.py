"""T13: multi-process SQLite contention on one edge file (invariant 1, liveness of local
writes; RELIABILITY.md §2 T13).

Four processes share one edge database, with bursts:

1. a writer (``t13_child.py writer``): bursts of 1 to 128 concurrent ``put``s through the
   public API, each timed from call to return (the *write wait*);
2. ``syncengine edge put`` run again and again from the shell (a new process each time);
3. the edge daemon (``syncengine edge run``): pushes the writes to a real hub and deletes
   the acknowledged outbox rows, and applies the pages it pulls (another node writes to the
   hub in bursts meanwhile);
4. a reader (``t13_child.py reader``): ``get`` and ``scan`` through the public API.

Checks: no "database is locked" / SQLITE_BUSY (or any other error) reaches a caller, the
daemon stays up, the WAL stays bounded (checkpoints happen), and afterwards every
acknowledged write is in the file and at the hub exactly once and every change of the other
node was pulled. The write wait (p99 and max) is reported next to the raw SQLite
``synchronous=FULL`` commit time measured on the same disk in the same run.

A lint test checks that no code in ``syncengine/`` touches a database file with a plain
filesystem call (which would bypass SQLite's locking; closing such a descriptor even drops
the process's POSIX locks on the file).

The negative control adds a writer with ``busy_timeout=0`` (a raw ``sqlite3`` connection):
contention must reach it as "database is locked", or the test could not see the error.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import json
import random
import re
import signal
import sqlite3
import statistics
import sys
import time
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from fault.common import (
    outbox_depth,
    percentile,
    sqlite_rows,
    syncengine_argv,
    write_alerts_config,
)
from fault.harness import SEED, Summary, pick
from syncengine.edge.link import HubLink
from syncengine.edge.store import EdgeStore
from syncengine.edge.sync import Syncer

pytestmark = [pytest.mark.slow]

CHILD = Path(__file__).parent / "t13_child.py"
PACKAGE = Path(__file__).resolve().parents[2] / "syncengine"
CELL = "west/ng/lagos/clinic-12/alerts"
#: The WAL autocheckpoints at 1,000 pages (4 MB); four times that means checkpoints stall.
WAL_BOUND_BYTES = 16 * 1024 * 1024
BUSY_WORDS = re.compile(r"database is locked|SQLITE_BUSY|\bbusy\b|\blocked\b", re.IGNORECASE)


# ---------------------------------------------------------------------------- processes


@dataclass
class Proc:
    """A child whose stdout (``ok KEY`` lines and a ``stats`` line) and stderr are read
    while it runs, so a full pipe never blocks it."""

    name: str
    proc: asyncio.subprocess.Process
    acked: set[str] = field(default_factory=set)
    stats: dict[str, Any] = field(default_factory=dict)
    stderr: list[str] = field(default_factory=list)
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    readers: list[asyncio.Task[None]] = field(default_factory=list)

    @classmethod
    async def start(cls, name: str, *argv: str) -> Proc:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        self = cls(name, proc)
        self.readers = [asyncio.create_task(self._out()), asyncio.create_task(self._err())]
        return self

    async def _out(self) -> None:
        assert self.proc.stdout is not None
        async for raw in self.proc.stdout:
            word, _, rest = raw.decode().rstrip("\n").partition(" ")
            if word == "ok":
                self.acked.add(rest)
            elif word == "stats":
                self.stats = json.loads(rest)
            elif word == "ready":
                self.ready.set()

    async def _err(self) -> None:
        assert self.proc.stderr is not None
        async for raw in self.proc.stderr:
            self.stderr.append(raw.decode(errors="replace").rstrip("\n"))

    async def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not self.ready.is_set():
            if self.proc.returncode is not None or time.monotonic() > deadline:
                raise AssertionError(f"{self.name} never got ready: {self.stderr[-10:]}")
            await asyncio.sleep(0.05)

    async def finish(self, timeout: float) -> int:
        """Wait for the child to exit by itself and for its output to be read; its code."""
        code = await asyncio.wait_for(self.proc.wait(), timeout)
        await asyncio.gather(*self.readers)
        return code

    async def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        if self.proc.returncode is None:
            self.proc.send_signal(sig)
        return await self.finish(timeout)

    async def kill(self) -> None:
        """Stop the child by its pid if it still runs, and its readers. Idempotent."""
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        for task in self.readers:
            task.cancel()
        await asyncio.gather(*self.readers, return_exceptions=True)


def child_argv(mode: str, db: Path, prefix: str, seconds: float) -> list[str]:
    return [sys.executable, str(CHILD), mode, str(db), prefix, str(seconds), "--seed", str(SEED)]


# ------------------------------------------------------------------------ measurements


def raw_full_commit_ms(folder: Path, commits: int = 300) -> list[float]:
    """The time of one ``synchronous=FULL`` WAL commit of one row on this disk, plain
    sqlite3 and no contention: the physical floor the write wait is reported against."""
    path = folder / "raw-full.db"
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("CREATE TABLE t (k INTEGER PRIMARY KEY, v BLOB)")
        times = []
        for i in range(commits):
            started = time.perf_counter()
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("INSERT INTO t VALUES (?, ?)", (i, b"x" * 200))
            conn.execute("COMMIT")
            times.append((time.perf_counter() - started) * 1000)
        return times
    finally:
        conn.close()
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)


async def sample_wal(wal: Path, peak: list[int], stop: asyncio.Event) -> None:
    """Keep ``peak[0]`` at the largest size the WAL file reached (a stat, not an open)."""
    while not stop.is_set():
        with contextlib.suppress(FileNotFoundError):
            peak[0] = max(peak[0], wal.stat().st_size)
        await asyncio.sleep(0.02)


def quantile(values: list[float], p: float) -> float | None:
    return round(percentile(values, p), 2) if values else None


@dataclass
class CliLoop:
    """``syncengine edge put`` again and again, each a new process."""

    acked: set[str] = field(default_factory=set)
    busy: int = 0
    other: int = 0
    samples: list[str] = field(default_factory=list)
    runs: int = 0

    async def run(self, config: Path, stop: asyncio.Event) -> None:
        i = 0
        while not stop.is_set():
            key = f"cli-{i}"
            i += 1
            proc = await asyncio.create_subprocess_exec(
                *syncengine_argv(
                    "edge", "put", "--config", str(config), CELL, "events", key, '{"by": "cli"}'
                ),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            try:
                _, err = await proc.communicate()
            finally:
                if proc.returncode is None:  # cancelled: stop it by its pid
                    proc.kill()
                    await proc.wait()
            self.runs += 1
            text = err.decode(errors="replace")
            if proc.returncode == 0:
                self.acked.add(key)
            else:
                if BUSY_WORDS.search(text):
                    self.busy += 1
                else:
                    self.other += 1
                if len(self.samples) < 5:
                    self.samples.append(text[-300:])


async def other_node(hub: Any, tmp_path: Path, stop: asyncio.Event, rng: random.Random) -> set[str]:
    """Node n2 writes bursts to the hub: the pages n1's daemon pulls and applies."""
    token = await hub.add_node("n2")
    written: set[str] = set()
    async with AsyncExitStack() as stack:
        store = await stack.enter_async_context(
            EdgeStore.open(tmp_path / "n2.db", node_id="n2", region="west")
        )
        link = await stack.enter_async_context(HubLink(hub.url, token, node_id="n2"))
        syncer = Syncer(store, link, subscriptions=[])
        await syncer.learn_config()
        n = 0
        while not stop.is_set():
            burst = rng.choice((10, 50, 200))
            keys = [f"n2-{n + i}" for i in range(burst)]
            n += burst
            await asyncio.gather(*(store.put(CELL, "events", k, {"by": "n2"}) for k in keys))
            written.update(keys)
            await syncer.sync_once()
            await asyncio.sleep(rng.uniform(0.2, 1.0))
        report = await syncer.sync_once()
        assert report.caught_up, f"n2 could not push its writes: {report.errors}"
    return written


def edge_keys(db: Path, node_prefix: str = "") -> set[str]:
    query = "SELECT key FROM records WHERE cell = ? AND key LIKE ? || '%'"
    return {k for (k,) in sqlite_rows(db, query, (CELL, node_prefix), timeout=60)}


def integrity(db: Path) -> str:
    return str(sqlite_rows(db, "PRAGMA integrity_check", timeout=60)[0][0])


async def until(check: Any, timeout: float) -> float | None:
    """Seconds until ``await check()`` is true, or None after ``timeout``."""
    started = time.monotonic()
    while not await check():
        if time.monotonic() - started > timeout:
            return None
        await asyncio.sleep(0.1)
    return time.monotonic() - started


# --------------------------------------------------------------------------- the test


@pytest.mark.integration
async def test_t13_four_processes_on_one_edge_file(tmp_path: Path, hub: Any) -> None:
    """Writer bursts, shell ``edge put``s, the daemon's pushes and pulls and a reader on
    one file: no busy error or any other error reaches a caller, the daemon stays up, the
    WAL stays bounded, and every acknowledged write ends in the file and at the hub once."""
    started = time.monotonic()
    seconds = pick(30.0, 3600.0)
    rng = random.Random(SEED)
    token = await hub.add_node("n1")
    config = write_alerts_config(
        tmp_path / "n1.toml", db=tmp_path / "edge.db", url=hub.url, token=token
    )
    db = tmp_path / "edge.db"
    raw_ms = await asyncio.to_thread(raw_full_commit_ms, tmp_path)
    stop = asyncio.Event()
    wal_peak = [0]
    cli = CliLoop()
    procs: list[Proc] = []
    tasks: list[asyncio.Task[Any]] = []
    try:
        daemon = await Proc.start(
            "daemon",
            *syncengine_argv("edge", "run", "--config", str(config), "--log-format", "json"),
        )
        procs.append(daemon)

        async def reachable() -> bool:
            return any("reachable" in line for line in daemon.stderr)

        assert await until(reachable, 60) is not None, (
            f"the daemon never reached the hub: {daemon.stderr[-10:]}"
        )
        writer = await Proc.start("writer", *child_argv("writer", db, "w", seconds))
        reader = await Proc.start("reader", *child_argv("reader", db, "w", seconds))
        procs += [writer, reader]
        await writer.wait_ready()
        await reader.wait_ready()
        sampler = asyncio.create_task(sample_wal(Path(f"{db}-wal"), wal_peak, stop))
        cli_task = asyncio.create_task(cli.run(config, stop))
        n2_task = asyncio.create_task(other_node(hub, tmp_path, stop, rng))
        tasks += [sampler, cli_task, n2_task]
        for p in (writer, reader):
            code = await p.finish(seconds + 120)
            assert code == 0, f"{p.name} exited {code}: {p.stderr[-10:]}"
        stop.set()
        await cli_task
        n2_written = await n2_task
        # Quiesce: the daemon pushes what is left and pulls what n2 wrote.
        acked = writer.acked | cli.acked
        drained = await until(lambda: _drained(db, n2_written), pick(60, 300))
        daemon_alive = daemon.proc.returncode is None
        daemon_exit = await daemon.stop()
        stop_ok = daemon_alive and daemon_exit == 0
        await sampler
    finally:
        stop.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for p in procs:
            await p.kill()
    at_edge = await asyncio.to_thread(edge_keys, db)
    rows = await hub.hub.pool.fetch(
        "SELECT key, count(*) AS n FROM feed WHERE node_id = 'n1' GROUP BY key"
    )
    at_hub = {r["key"]: r["n"] for r in rows}
    daemon_busy = daemon_busy_lines(daemon.stderr)
    w, r = writer.stats, reader.stats
    busy = w["busy"] + r["busy"] + cli.busy + len(daemon_busy)
    lost = len(acked - at_edge) + len(acked - set(at_hub))
    s = Summary(
        test="T13",
        name="four processes on one edge file",
        started=started,
        cases=w["ops"] + r["ops"] + cli.runs,
        acknowledged=len(acked),
        counts={
            "busy_errors": busy,
            "other_errors": w["other"] + r["other"] + cli.other,
            "lost": lost,
            "duplicated": sum(1 for n in at_hub.values() if n > 1),
            "not_pulled": len(n2_written - at_edge),
            "daemon_failures": int(not stop_ok),
            "not_drained": int(drained is None),
            "integrity_failures": int(await asyncio.to_thread(integrity, db) != "ok"),
            "wal_over_bound": int(wal_peak[0] > WAL_BOUND_BYTES),
        },
        extra_violations=(
            "busy_errors",
            "other_errors",
            "not_pulled",
            "daemon_failures",
            "not_drained",
            "integrity_failures",
            "wal_over_bound",
        ),
        figures={
            "seconds_contended": seconds,
            "ops": {
                "writer_puts": w["ops"],
                "reader_reads": r["ops"],
                "cli_puts": len(cli.acked),
                "n2_changes_pulled": len(n2_written & at_edge),
            },
            "write_wait_ms": {"p50": w["p50_ms"], "p99": w["p99_ms"], "max": w["max_ms"]},
            "read_wait_ms": {"p99": r["p99_ms"], "max": r["max_ms"]},
            "raw_full_commit_ms": {
                "median": round(statistics.median(raw_ms), 3),
                "p99": quantile(raw_ms, 0.99),
                "commits_per_s": round(1000 / statistics.mean(raw_ms)),
            },
            "max_wal_bytes": wal_peak[0],
            "drain_s": None if drained is None else round(drained, 1),
            "error_samples": (w["samples"] + r["samples"] + cli.samples + daemon_busy)[:5],
        },
    )
    s.finish()


def daemon_busy_lines(lines: list[str]) -> list[str]:
    """The daemon's warnings, errors and tracebacks that speak of a locked database."""
    found = []
    for line in lines:
        try:
            event = json.loads(line)
        except ValueError:
            event = {"level": "ERROR", "message": line}  # a traceback or a bare print
        if not isinstance(event, dict) or event.get("level") in ("DEBUG", "INFO"):
            continue
        if BUSY_WORDS.search(str(event.get("message", ""))):
            found.append(line[:300])
    return found


async def _drained(db: Path, n2_written: set[str]) -> bool:
    if await asyncio.to_thread(outbox_depth, db, 60):
        return False
    return n2_written <= await asyncio.to_thread(edge_keys, db, "n2-")


# ---------------------------------------------------------------------- negative control


async def test_t13_control_busy_timeout_zero_surfaces_busy(tmp_path: Path) -> None:
    """Negative control: the same bursty writer plus a raw sqlite3 writer with
    ``busy_timeout=0``. Contention must reach that writer as "database is locked": if it
    did not, the main test's zero busy errors would prove nothing."""
    started = time.monotonic()
    db = tmp_path / "edge.db"
    seconds = 4.0
    writer = await Proc.start("writer", *child_argv("writer", db, "w", seconds))
    procs = [writer]
    try:
        await writer.wait_ready()
        broken = await Proc.start("raw", *child_argv("raw", db, "raw", seconds))
        procs.append(broken)
        for p in procs:
            code = await p.finish(seconds + 60)
            assert code == 0, f"{p.name} exited {code}: {p.stderr[-10:]}"
    finally:
        for p in procs:
            await p.kill()
    s = Summary(
        test="T13",
        name="control: busy_timeout=0 writer",
        started=started,
        cases=writer.stats["ops"] + broken.stats["ops"],
        counts={"busy_errors": broken.stats["busy"] + writer.stats["busy"]},
        extra_violations=("busy_errors",),
        figures={"raw_writer": broken.stats, "writer_busy": writer.stats["busy"]},
    )
    s.control("busy_errors")


# ------------------------------------------------- lint: database files only through SQLite

#: Functions that open, read, write, copy or truncate a file's bytes outside SQLite.
PLAIN_FILE_FUNCS = frozenset(
    {
        "open",
        "io.open",
        "os.open",
        "os.truncate",
        "shutil.copy",
        "shutil.copy2",
        "shutil.copyfile",
        "builtins.open",
    }
)
#: ``pathlib.Path`` methods that do the same.
PLAIN_FILE_METHODS = frozenset({"open", "read_bytes", "read_text", "write_bytes", "write_text"})
#: What a database path looks like in an expression (``config.db``, ``db_path``, ``-wal``).
DB_NAME = re.compile(
    r"(?i)(^|[^a-z])(db|db_path|db_file|database|sqlite\w*)([^a-z]|$)|\.db\b|-wal\b|-shm\b|-journal\b"
)
#: Modules that hold an edge database open: there every plain file call needs a reason here.
DB_MODULES = ("edge/",)
#: Reviewed plain file calls in DB_MODULES: (module, enclosing function) -> why it is safe.
ALLOWED = {
    ("edge/sqlite.py", "_filesystem_type"): "reads /proc/self/mounts, not a database file",
    ("edge/backup.py", "_fsync"): (
        "fsyncs a finished backup copy and its folder; no SQLite connection of this process "
        "has that file open, so closing the descriptor drops no lock"
    ),
}


@dataclass(frozen=True)
class PlainCall:
    module: str
    function: str
    line: int
    text: str


def plain_file_calls(module: str, source: str) -> list[PlainCall]:
    """Every call in ``source`` that touches a file's bytes without SQLite, and either
    names a database file or sits in a module that holds the database open."""
    tree = ast.parse(source)
    found: list[PlainCall] = []
    in_db_module = module.startswith(DB_MODULES)

    def visit(node: ast.AST, function: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                visit(child, child.name)
                continue
            if isinstance(child, ast.Call):
                target = _plain_target(child)
                if target is not None and (in_db_module or DB_NAME.search(target)):
                    found.append(PlainCall(module, function, child.lineno, ast.unparse(child)))
            visit(child, function)

    visit(tree, "<module>")
    return found


def _plain_target(call: ast.Call) -> str | None:
    """The file expression of a plain file call (its source), or None for other calls."""
    func = ast.unparse(call.func)
    if func in PLAIN_FILE_FUNCS:
        return ast.unparse(call.args[0]) if call.args else func
    if isinstance(call.func, ast.Attribute) and call.func.attr in PLAIN_FILE_METHODS:
        # Path.open takes a mode, not a path: EdgeStore.open(path, ...) is not one.
        if (
            call.func.attr == "open"
            and call.args
            and not (isinstance(call.args[0], ast.Constant) and isinstance(call.args[0].value, str))
        ):
            return None
        return ast.unparse(call.func.value)
    return None


def test_t13_no_plain_filesystem_access_to_database_files() -> None:
    """No code in ``syncengine/`` opens, reads, writes, copies or truncates a database file
    (``*.db``, ``-wal``, ``-shm``) with plain filesystem calls: that bypasses SQLite's
    locking, and closing such a descriptor drops the process's POSIX locks on the file (the
    classic way to corrupt SQLite). In the modules that hold the database open every plain
    file call must be listed in ``ALLOWED`` with the reason it is safe."""
    started = time.monotonic()
    modules = sorted(PACKAGE.rglob("*.py"))
    calls = [
        call
        for path in modules
        for call in plain_file_calls(path.relative_to(PACKAGE).as_posix(), path.read_text())
    ]
    bad = [c for c in calls if (c.module, c.function) not in ALLOWED]
    stale = sorted(set(ALLOWED) - {(c.module, c.function) for c in calls})
    s = Summary(
        test="T13",
        name="lint: database files only through SQLite",
        started=started,
        cases=len(modules),
        counts={"plain_opens": len(bad)},
        extra_violations=("plain_opens",),
        figures={
            "modules": len(modules),
            "reviewed_calls": len(calls) - len(bad),
            "offenders": [f"{c.module}:{c.line} in {c.function}: {c.text}" for c in bad][:10],
            "stale_allowances": [f"{m} {f}" for m, f in stale],
        },
    )
    s.finish()


def test_t13_control_lint_sees_plain_opens() -> None:
    """Negative control of the lint: planted plain opens of a database file, in a module
    that holds the database and in one that does not, must all be found."""
    planted = {
        "edge/daemon.py": "def f(store):\n    return open(store.path, 'rb')\n",
        "cli.py": (
            "import os, shutil\n"
            "def g(config, dest):\n"
            "    config.db.read_bytes()\n"
            "    shutil.copy(config.db, dest)\n"
            "    os.open(f'{config.db}-wal', os.O_RDONLY)\n"
        ),
    }
    calls = [c for module, src in planted.items() for c in plain_file_calls(module, src)]
    s = Summary(
        test="T13",
        name="control: lint on planted plain opens",
        cases=len(planted),
        counts={"plain_opens": len(calls)},
        figures={"found": [c.text for c in calls]},
    )
    assert len(calls) == 4, f"the lint missed a planted plain open: found only {calls}"
    s.control("plain_opens")
