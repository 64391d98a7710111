"""Helpers several fault tests share: an edge's config file, the ``syncengine`` CLI and
``syncengine edge run`` as child processes, a small tmpfs and a filler file that fills it
(disk full, T12 and T17), plain-sqlite3 reads of an edge file, a percentile, and a tally of
violations that keeps a few examples of each.

The checker side here uses no syncengine code: the edge file is read with ``sqlite3``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

# ------------------------------------------------------------------------- edge config


def toml_rules(rules: Sequence[Mapping[str, str]]) -> str:
    """``tier_rules`` as a TOML array of inline tables."""
    tables = ", ".join(f'{{ prefix = "{r["prefix"]}", tier = "{r["tier"]}" }}' for r in rules)
    return f"[{tables}]"


def write_edge_config(
    path: Path,
    *,
    node: str,
    db: Path,
    url: str,
    token: str,
    subscriptions: Sequence[str],
    rules: Sequence[Mapping[str, str]],
    more: Sequence[str] = (),
    region: str = "west",
) -> Path:
    """Write the edge.toml ``path`` (and the node's token beside it, ``<stem>.token``);
    ``more`` are further TOML lines (settings, then any ``[tables]``)."""
    token_file = path.with_suffix(".token")
    token_file.write_text(token + "\n")
    subs = ", ".join(f'"{s}"' for s in subscriptions)
    lines = [
        f'node_id = "{node}"',
        f'region = "{region}"',
        f'db = "{db}"',
        f'hub_url = "{url}"',
        f'token_file = "{token_file}"',
        f"subscriptions = [{subs}]",
        f"tier_rules = {toml_rules(rules)}",
        *more,
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


# ------------------------------------------------------------------------ child processes


def syncengine_argv(*args: str, head: Sequence[str] = ("-m", "syncengine")) -> list[str]:
    """The command line of ``syncengine ARGS`` (``head``: how the interpreter starts it)."""
    return [sys.executable, *head, *args]


async def run_cli(config: Path, *args: str, timeout: float = 60) -> tuple[int, bytes, bytes]:
    """Run ``syncengine ARGS --config CONFIG --json`` as an operator would: (exit code,
    stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        *syncengine_argv(*args, "--config", str(config), "--json"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out, err


class Daemon:
    """One ``syncengine edge run`` child; its stderr is kept (JSON log lines)."""

    def __init__(self, config: Path, env: dict[str, str] | None = None) -> None:
        self.config = config
        self.env = {**os.environ, **(env or {})}
        self.proc: asyncio.subprocess.Process | None = None
        self.lines: list[str] = []
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> Daemon:
        self.proc = await asyncio.create_subprocess_exec(
            *syncengine_argv("edge", "run", "--config", str(self.config), "--log-format", "json"),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            env=self.env,
        )
        self._reader = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        async for raw in self.proc.stderr:
            self.lines.append(raw.decode(errors="replace").rstrip("\n"))

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.lines if line.startswith("{")]

    def said(self, text: str) -> int:
        """How many log messages contain ``text``."""
        return sum(text in e.get("message", "") for e in self.events())

    def printed(self, text: str) -> bool:
        """Whether any stderr line (a log line, a traceback) contains ``text``."""
        return any(text in line for line in self.lines)

    async def wait_said(self, text: str, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while not self.said(text):
            if self.exited() is not None:
                raise AssertionError(f"daemon exited {self.exited()}: {self.lines[-20:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"daemon never said {text!r}: {self.lines[-20:]}")
            await asyncio.sleep(0.05)

    def exited(self) -> int | None:
        """The exit code, or None while it runs (or before it started)."""
        return None if self.proc is None else self.proc.returncode

    async def wait_exit(self, timeout: float) -> int | None:
        """The exit code once it exited within ``timeout`` (its output read), else None."""
        assert self.proc is not None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.proc.wait(), timeout)
        if self.proc.returncode is not None and self._reader is not None:
            await self._reader
        return self.proc.returncode

    async def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int:
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(sig)
        code = await asyncio.wait_for(self.proc.wait(), timeout)
        if self._reader is not None:
            await self._reader
        return code


# ---------------------------------------------------------------------------- disk full


def require_root(what: str) -> None:
    if os.geteuid() != 0:
        pytest.skip(f"{what} needs root (mount); CI runs as root")


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``path`` for the block; unmounted after."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(path)], check=False, capture_output=True)
        if subprocess.run(["umount", str(path)], check=False, capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(path)], check=True)


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


#: :func:`place_filler` first allocates all but this much of the free space, then the rest.
FILLER_SLACK_BYTES = 8 << 20


def place_filler(folder: Path, leave: int) -> int:
    """Allocate a filler file so that only about ``leave`` bytes stay free; its size.

    Allocating hundreds of MB takes a while, and a process writing on the same disk meanwhile
    (a WAL growing again after a checkpoint: hundreds of KB a second) would take space the
    measure counted on, failing the allocation. So all but :data:`FILLER_SLACK_BYTES` goes
    first; the rest, measured again, goes in a moment. Raises ``OSError(ENOSPC)`` when even
    that was outrun (the caller may try again)."""
    fd = os.open(folder / "filler", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    size = 0
    try:
        for keep in (leave + FILLER_SLACK_BYTES, leave):
            grow = free_bytes(folder) - keep
            if grow > 0:
                os.posix_fallocate(fd, size, grow)
                size += grow
    finally:
        os.close(fd)
    return size


# ------------------------------------------------------------------------------ checks


def sqlite_rows(
    db: Path, query: str, params: Sequence[Any] = (), timeout: float = 30
) -> list[tuple[Any, ...]]:
    """The rows of ``query`` on the edge file ``db``, read with plain sqlite3."""
    with contextlib.closing(sqlite3.connect(db, timeout=timeout)) as conn:
        return conn.execute(query, params).fetchall()


def outbox_depth(db: Path, timeout: float = 30) -> int:
    """How many changes the edge file ``db`` still has queued."""
    return int(sqlite_rows(db, "SELECT count(*) FROM outbox", timeout=timeout)[0][0])


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values`` by the nearest rank; 0.0 when empty."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class Violations:
    """Violation counts by name, with the first few examples of each."""

    counts: Counter[str] = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def bad(self, name: str, what: str, n: int = 1) -> None:
        self.counts[name] += n
        shown = self.examples.setdefault(name, [])
        if len(shown) < 5:
            shown.append(what)


def write_alerts_config(path: Path, *, db: Path, url: str, token: str) -> Path:
    """edge.toml for node n1 subscribed to clinic-12, whose alerts collection is critical
    (retried every second)."""
    return write_edge_config(
        path,
        node="n1",
        db=db,
        url=url,
        token=token,
        subscriptions=["west/ng/lagos/clinic-12"],
        rules=[{"prefix": "west/ng/lagos/clinic-12/alerts", "tier": "critical"}],
        more=["[tier_policies.critical]", "retry_interval_s = 1"],
    )
