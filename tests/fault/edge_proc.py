"""Edge child processes (``edge_child.py``) as the fault tests drive them."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
from pathlib import Path
from typing import Any

CHILD = Path(__file__).with_name("edge_child.py")


class Child:
    """One edge child process; its acknowledged keys arrive on stdout."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.acked: list[str] = []
        self.stamps: dict[str, int] = {}  # key -> HLC, when the child prints stamps
        self.ready = asyncio.Event()
        self.bootstrapped = asyncio.Event()
        self.done = asyncio.Event()
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def start(
        cls,
        config: dict[str, Any],
        prefix: str,
        rate: float,
        env: dict[str, str] | None,
        *,
        wrapper: tuple[str, ...] = (),
    ) -> Child:
        proc = await asyncio.create_subprocess_exec(
            *wrapper,
            sys.executable,
            str(CHILD),
            json.dumps(config),
            prefix,
            str(rate),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
            env=env,
        )
        return cls(proc)

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
            elif text == "done":
                self.done.set()
            else:
                key, _, stamp = text.partition(" ")
                self.acked.append(key)
                if stamp:
                    self.stamps[key] = int(stamp)

    async def dead_within(self, seconds: float) -> bool:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.proc.wait(), seconds)
            return True
        return False

    async def kill(self) -> int:
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGKILL)
        code = await self.proc.wait()
        await self._reader
        return code
