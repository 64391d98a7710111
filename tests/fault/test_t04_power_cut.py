"""T4: a simulated power cut loses no acknowledged write (invariant 1, power loss).

The edge store lives on ``lazyfs.py``, a FUSE layer that keeps every write not yet fsynced
in memory. A power cut is: SIGKILL the writer, then SIGKILL the filesystem (what it held
unsynced is gone), unmount, mount again. Half the cuts are *torn*: a random 512-byte-aligned
prefix of the last unsynced write reaches the disk first, as SQLite's crash tests do.

Before the loop the layer is shown to drop: a file written without fsync is empty after a cut,
one fsynced is whole. After every cut the backing file is read with plain sqlite3:
``integrity_check`` ok; every acknowledged write is in ``records``, each with its outbox row.

The negative control commits with ``synchronous=NORMAL`` (no fsync of the WAL per commit):
it must lose acknowledged writes, which shows the layer works and why FULL gates the ack.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fault.harness import SEED, Summary, pick

pytestmark = [pytest.mark.slow]

HERE = Path(__file__).parent
LAZYFS = HERE / "lazyfs.py"
WRITER = HERE / "power_writer.py"


def _fuse_problem() -> str | None:
    if os.geteuid() != 0:
        return "mounting FUSE needs root here"
    if not Path("/dev/fuse").exists() or shutil.which("fusermount") is None:
        return "needs /dev/fuse and fusermount (Debian fuse3, libfuse2)"
    try:
        importlib.import_module("fuse")
    except (ImportError, OSError) as exc:
        return f"fusepy cannot load libfuse: {exc}"
    return None


class Mount:
    """lazyfs over ``backing`` at ``point``; :meth:`cut` is the power cut."""

    def __init__(self, backing: Path, point: Path) -> None:
        self.backing = backing
        self.point = point
        self.proc: subprocess.Popen[bytes] | None = None

    def up(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(LAZYFS), str(self.backing), str(self.point)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 20
        while not os.path.ismount(self.point):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise AssertionError(f"lazyfs did not mount {self.point}: {err[-2000:]}")
            time.sleep(0.02)

    def control(self, command: str) -> str:
        ctl = self.point / ".lazyfs-ctl"
        ctl.write_text(command)
        return ctl.read_text()

    def cut(self, *, torn_seed: int | None = None) -> str:
        """Power off: optionally tear the last unsynced write, then lose the rest."""
        answer = self.control(f"torn {torn_seed}") if torn_seed is not None else ""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        if self.proc.stderr:
            self.proc.stderr.close()
        subprocess.run(["fusermount", "-u", "-z", str(self.point)], check=False)
        self.proc = None
        return answer

    @contextlib.contextmanager
    def mounted(self) -> Iterator[Mount]:
        self.up()
        try:
            yield self
        finally:
            if self.proc is not None:
                self.cut()


def check(db: Path, acked: set[str]) -> tuple[int, int, bool]:
    """(lost, orphans, integrity ok) of the backing file, read with plain sqlite3."""
    conn = sqlite3.connect(db)
    try:
        ok = conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        tables = {t for (t,) in conn.execute("SELECT name FROM sqlite_master")}
        if not {"records", "outbox"} <= tables:  # the cut took the schema: nothing committed
            return len(acked), 0, ok
        records = {k for (k,) in conn.execute("SELECT key FROM records")}
        outbox = {k for (k,) in conn.execute("SELECT key FROM outbox")}
    finally:
        conn.close()
    return len(acked - records), len(records ^ outbox), ok


async def write_then_kill(
    point: Path, prefix: str, seconds: float, env: dict[str, str]
) -> list[str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(WRITER),
        str(point / "edge.db"),
        prefix,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        env=env,
    )
    assert proc.stdout is not None
    acked: list[str] = []
    ready = asyncio.Event()

    async def read() -> None:
        assert proc.stdout is not None
        while line := await proc.stdout.readline():
            if line == b"ready\n":
                ready.set()
            elif line.endswith(b"\n"):  # a torn last line was never acknowledged
                acked.append(line.decode().strip())

    reader = asyncio.create_task(read())
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(ready.wait(), 30)  # (then the cut comes anyway)
    await asyncio.sleep(seconds)
    proc.send_signal(signal.SIGKILL)
    await proc.wait()
    await reader
    return acked


async def cut_loop(
    tmp_path: Path,
    summary: Summary,
    cuts: int,
    env: dict[str, str],
    *,
    stop_at_first_loss: bool = False,
) -> None:
    rng = random.Random(SEED)
    backing, point = tmp_path / "disk", tmp_path / "mnt"
    backing.mkdir()
    point.mkdir()
    mount = Mount(backing, point)
    acked: set[str] = set()
    lost = orphans = integrity_failures = torn = 0
    done = 0
    for n in range(cuts):
        mount.up()
        try:
            keys = await write_then_kill(point, f"c{n}", rng.uniform(0.3, 1.5), env)
        finally:
            tear = rng.random() < 0.5
            torn += tear
            mount.cut(torn_seed=rng.randrange(1 << 30) if tear else None)
        acked.update(keys)
        lost, orphans, ok = check(backing / "edge.db", acked)
        integrity_failures += not ok
        done = n + 1
        if stop_at_first_loss and lost:
            break
    summary.cases = done
    summary.acknowledged = len(acked)
    summary.counts.update(lost=lost, orphan_records=orphans, integrity_failures=integrity_failures)
    summary.figures["torn_cuts"] = torn


def test_t4_the_layer_drops_what_was_not_fsynced(tmp_path: Path) -> None:
    if problem := _fuse_problem():
        pytest.skip(problem)
    backing, point = tmp_path / "disk", tmp_path / "mnt"
    backing.mkdir()
    point.mkdir()
    with Mount(backing, point).mounted() as mount:
        (point / "lazy").write_bytes(b"x" * 4096)
        with (point / "synced").open("wb") as f:
            f.write(b"y" * 4096)
            f.flush()
            os.fsync(f.fileno())
        assert (point / "lazy").read_bytes() == b"x" * 4096, "reads must see unsynced writes"
        mount.cut()
    assert (backing / "lazy").read_bytes() == b"", "an unsynced write survived the cut"
    assert (backing / "synced").read_bytes() == b"y" * 4096, "an fsynced write was lost"


async def test_t4_power_cuts_lose_no_acknowledged_write(tmp_path: Path) -> None:
    if problem := _fuse_problem():
        pytest.skip(problem)
    summary = Summary(
        "T4",
        "power cut (FUSE lazy layer, half torn)",
        extra_violations=("orphan_records", "integrity_failures"),
    )
    await cut_loop(tmp_path, summary, pick(50, 500), _env())
    assert summary.acknowledged > 500, "the writer barely wrote: the cuts tested nothing"
    summary.finish()


async def test_t4_negative_control_synchronous_normal_loses_writes(tmp_path: Path) -> None:
    if problem := _fuse_problem():
        pytest.skip(problem)
    summary = Summary("T4", "power cut with synchronous=NORMAL")
    env = {**_env(), "SYNCENGINE_T4_BROKEN": "synchronous_normal"}
    await cut_loop(tmp_path, summary, pick(20, 100), env, stop_at_first_loss=True)
    summary.control("lost")


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("SYNCENGINE_CRASHPOINT")}
