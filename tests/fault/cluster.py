"""A small cluster runner: region hub **processes** against the private PostgreSQL and Redis.

Each hub runs the hub's command line, ``syncengine hub run --config FILE``, as a process of
its own on its own free loopback port, with stdout/stderr appended to its own log file. It
is started, SIGKILLed, stopped and restarted **by the pid it was started with** (never by
name), keeps its port across restarts (clients hold its URL), and can be restarted with
crash points armed (:func:`harness.crashpoint_env`; every hit is appended to one log the
test counts).

Two ways to start one, same command line and same process control:

- ``exec`` (:class:`ExecSpawner`): ``python -m syncengine hub run --config FILE`` (or
  another ``launcher`` taking the same arguments), a child of the test process.
- ``fork`` (:class:`ForkServer`, the default): a fork server (``hub_forkserver.py``) that
  imported the hub once forks a fresh process per start and runs the same ``main`` in it.
  Importing ``syncengine.cli`` costs about a second of CPU; the kill loops restart hubs a
  hundred times a run on a two-core machine, which the fork server makes affordable.
  ``prepare="FILE:FUNCTION"`` patches a broken build into the server before it forks.

::

    async with HubCluster(tmp_path, database_url=dsn, redis_url=url, count=2) as cluster:
        token = await cluster.add_node("e1", "west/ng/lagos")
        hub = cluster.hubs[0]
        hub.kill()                                  # SIGKILL by pid, reaped
        hub.start({"hub.push.before_commit": 0.01})
        await hub.wait_ready()                      # /healthz answers, or False if it died

Exit statuses are polled without blocking (``waitpid`` with ``WNOHANG``, here or in the fork
server), so nothing depends on the event loop's child watcher.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Protocol, Self

import aiohttp
import asyncpg

from fault.harness import crashpoint_env
from support.servers import free_port
from syncengine.hub.nodes import add_node

__all__ = [
    "HUB_CLI",
    "ExecSpawner",
    "ForkServer",
    "HubCluster",
    "HubProcess",
    "child_env",
]

#: The production hub command (argv before ``hub run --config FILE``).
HUB_CLI: Final = (sys.executable, "-m", "syncengine")
FORK_SERVER: Final = Path(__file__).with_name("hub_forkserver.py")
READY_TIMEOUT_S: Final = 30.0
STOP_TIMEOUT_S: Final = 10.0
FORK_SERVER_START_TIMEOUT_S: Final = 120.0
POLL_S: Final = 0.05
#: Variables that would override the hub.toml this runner writes.
_OVERRIDES: Final = ("DATABASE_URL", "REDIS_URL")


def child_env(points: Mapping[str, float] | None, crash_log: Path) -> dict[str, str]:
    """The environment of a hub: the test's, without config overrides (``DATABASE_URL``,
    ``REDIS_URL``, ``SYNCENGINE_*``), with ``points`` armed (none when empty) and hits
    appended to ``crash_log``."""
    base = {
        k: v
        for k, v in os.environ.items()
        if k not in _OVERRIDES and not k.startswith("SYNCENGINE_")
    }
    base["PYTHONUNBUFFERED"] = "1"
    if not points:
        return base
    return crashpoint_env(points, crash_log, base=base)


def _toml_value(value: Any) -> str:
    """A TOML literal for the plain values a hub.toml holds (JSON strings are TOML strings)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"no TOML literal for {type(value).__name__}")


def write_hub_toml(path: Path, settings: Mapping[str, Any]) -> Path:
    """Write ``settings`` (hub.toml keys) to ``path``."""
    path.write_text("".join(f"{k} = {_toml_value(v)}\n" for k, v in settings.items()))
    return path


# ============================================================================ spawners


class Child(Protocol):
    """One started hub process."""

    pid: int

    def poll(self) -> int | None:
        """None while it runs, else its exit status (``-9`` after SIGKILL)."""

    def kill(self) -> bool:
        """SIGKILL it by its pid and reap it; True if it was running."""

    def terminate(self) -> None:
        """SIGTERM it (a clean shutdown) if it runs."""


class Spawner(Protocol):
    def spawn(self, argv: Sequence[str], env: Mapping[str, str], log: Path) -> Child: ...


class _ExecChild:
    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self.pid = proc.pid

    def poll(self) -> int | None:
        return self.proc.poll()

    def kill(self) -> bool:
        if self.proc.poll() is not None:
            return False
        self.proc.send_signal(signal.SIGKILL)  # (not reaped yet: the pid is still ours)
        self.proc.wait()
        return True

    def terminate(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)


class ExecSpawner:
    """Each hub a fresh interpreter: ``[*launcher, *argv]``, a child of this process."""

    def __init__(self, launcher: Sequence[str] = HUB_CLI) -> None:
        self.launcher = tuple(launcher)

    def spawn(self, argv: Sequence[str], env: Mapping[str, str], log: Path) -> Child:
        with log.open("ab") as out:
            proc = subprocess.Popen(
                [*self.launcher, *argv],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=dict(env),
            )
        return _ExecChild(proc)


class _ForkedChild:
    def __init__(self, server: ForkServer, pid: int) -> None:
        self.server = server
        self.pid = pid
        self._status: int | None = None

    def poll(self) -> int | None:
        if self._status is None:
            self._status = self.server.request({"op": "status", "pid": self.pid})["status"]
        return self._status

    def kill(self) -> bool:
        killed = bool(self.server.request({"op": "kill", "pid": self.pid})["killed"])
        self.poll()
        return killed

    def terminate(self) -> None:
        self.server.request({"op": "term", "pid": self.pid})


class ForkServer:
    """``hub_forkserver.py``, a child of this process that forks the hubs (see there).

    Requests are one JSON line each way over its stdin/stdout; each takes well under a
    millisecond, so they are made synchronously. Closing its stdin makes it kill and reap
    every hub it still runs, then exit.
    """

    def __init__(self, log: Path, *, prepare: str | None = None) -> None:
        self.log = log
        self.prepare = prepare
        self._proc: subprocess.Popen[str] | None = None

    def start(self) -> None:
        """Start the server and wait until it has imported the hub (blocking; killed by
        its pid if it is not ready within :data:`FORK_SERVER_START_TIMEOUT_S`)."""
        cmd = [sys.executable, str(FORK_SERVER)]
        if self.prepare:
            cmd += ["--prepare", self.prepare]
        with self.log.open("ab") as err:
            self._proc = subprocess.Popen(
                cmd,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                env=child_env(None, self.log),
                text=True,
            )
        assert self._proc.stdout is not None
        watchdog = threading.Timer(FORK_SERVER_START_TIMEOUT_S, self._proc.kill)
        watchdog.start()
        try:
            line = self._proc.stdout.readline()
        finally:
            watchdog.cancel()
        if not line:
            self._proc.wait(timeout=FORK_SERVER_START_TIMEOUT_S)
            raise RuntimeError(
                f"the hub fork server exited ({self._proc.returncode}) before it was ready; "
                f"see {self.log}"
            )

    def request(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        proc = self._proc
        if proc is None or proc.stdin is None or proc.stdout is None:
            raise RuntimeError("the hub fork server is not running")
        proc.stdin.write(json.dumps(obj) + "\n")
        proc.stdin.flush()
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the hub fork server died; see {self.log}")
        answer: dict[str, Any] = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"hub fork server: {answer['error']}")
        return answer

    def spawn(self, argv: Sequence[str], env: Mapping[str, str], log: Path) -> Child:
        pid = self.request({"op": "spawn", "argv": list(argv), "env": dict(env), "log": str(log)})
        return _ForkedChild(self, int(pid["pid"]))

    def close(self) -> None:
        """Make the server kill its hubs and exit; reap it. Idempotent."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        assert proc.stdin is not None and proc.stdout is not None
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.close()
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()


# ============================================================================ hubs


class HubProcess:
    """One hub, restartable on the same port. Not thread-safe."""

    def __init__(
        self,
        name: str,
        config_path: Path,
        port: int,
        *,
        log_path: Path,
        crash_log: Path,
        spawner: Spawner,
    ) -> None:
        self.name = name
        self.config_path = config_path
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        self.crash_log = crash_log
        self.spawner = spawner
        #: The crash points the current process was started with.
        self.armed: dict[str, float] = {}
        self.starts = 0
        self._child: Child | None = None

    def __repr__(self) -> str:
        return f"<HubProcess {self.name} {self.url} pid={self.pid} armed={self.armed}>"

    @property
    def pid(self) -> int | None:
        """The pid of the running process, else None."""
        return self._child.pid if self.running and self._child is not None else None

    @property
    def running(self) -> bool:
        """True until the process exited."""
        return self._child is not None and self._child.poll() is None

    @property
    def returncode(self) -> int | None:
        """The exit status of the last process (``-9`` after SIGKILL); None while it runs
        or before the first start."""
        return None if self._child is None else self._child.poll()

    def start(self, crashpoints: Mapping[str, float] | None = None) -> None:
        """Start the hub (no-op while one runs); :meth:`wait_ready` waits for it."""
        if self.running:
            return
        self.armed = dict(crashpoints or {})
        with self.log_path.open("a") as log:
            log.write(f"--- start {self.starts} armed={self.armed}\n")
        self._child = self.spawner.spawn(
            ["hub", "run", "--config", str(self.config_path)],
            child_env(self.armed, self.crash_log),
            self.log_path,
        )
        self.starts += 1

    async def wait_ready(self, timeout_s: float = READY_TIMEOUT_S, path: str = "/healthz") -> bool:
        """Wait until ``path`` answers 200: True; False if the process exited first.

        Raises:
            TimeoutError: it neither answered nor exited within ``timeout_s``.
        """
        deadline = time.monotonic() + timeout_s
        probe = aiohttp.ClientTimeout(total=1.0)
        async with aiohttp.ClientSession(timeout=probe) as http:
            while True:
                if not self.running:
                    return False
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    async with http.get(self.url + path) as resp:
                        if resp.status == 200:
                            return True
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"hub {self.name} did not answer {path} within {timeout_s} s; "
                        f"log tail:\n{self.log_tail()}"
                    )
                await asyncio.sleep(POLL_S)

    async def wait_exit(self) -> int:
        """Wait until the process exits; its status (``-9`` for SIGKILL)."""
        while True:
            code = self.returncode
            if code is not None or self._child is None:
                return code if code is not None else 0
            await asyncio.sleep(POLL_S)

    def kill(self) -> bool:
        """SIGKILL the process by its pid and reap it; True if it was running."""
        return self._child is not None and self._child.kill()

    async def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM (a clean shutdown), then SIGKILL after ``timeout_s``."""
        if not self.running or self._child is None:
            return
        self._child.terminate()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.wait_exit(), timeout=timeout_s)
        self.kill()

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


class HubCluster:
    """``count`` hub processes of one region sharing a database and a Redis.

    ``settings`` are extra hub.toml keys (``tier_rules``, ``resolvers``…). Hubs are forked
    by a :class:`ForkServer` (``prepare`` patches it first) unless ``launcher`` is given,
    which makes each hub ``[*launcher, "hub", "run", "--config", FILE]`` (e.g.
    :data:`HUB_CLI`). On enter, every hub is started (with ``points`` armed) and ready; on
    exit, each is stopped by its pid (SIGKILL when ``hard_stop``, the default: the tests
    kill hubs anyway and need no clean shutdown).
    """

    def __init__(
        self,
        workdir: Path,
        *,
        database_url: str,
        redis_url: str | None,
        count: int = 2,
        settings: Mapping[str, Any] | None = None,
        launcher: Sequence[str] | None = None,
        prepare: str | None = None,
        points: Mapping[str, float] | None = None,
        hard_stop: bool = True,
    ) -> None:
        if launcher is not None and prepare is not None:
            raise ValueError("prepare patches the fork server; a launcher does its own setup")
        self.workdir = workdir
        self.database_url = database_url
        self.points = dict(points or {})
        self.crash_log = workdir / "crashpoints.log"
        self.hard_stop = hard_stop
        self._server: ForkServer | None = None
        spawner: Spawner
        if launcher is None:
            self._server = ForkServer(workdir / "forkserver.log", prepare=prepare)
            spawner = self._server
        else:
            spawner = ExecSpawner(launcher)
        self.hubs: list[HubProcess] = []
        for i in range(count):
            port = free_port()
            config = {
                "region": "west",
                "listen": f"127.0.0.1:{port}",
                "database_url": database_url,
                **({"redis_url": redis_url} if redis_url else {}),
                **(settings or {}),
            }
            path = write_hub_toml(workdir / f"hub{i}.toml", config)
            self.hubs.append(
                HubProcess(
                    f"hub{i}",
                    path,
                    port,
                    log_path=workdir / f"hub{i}.log",
                    crash_log=self.crash_log,
                    spawner=spawner,
                )
            )
        self._pool: asyncpg.Pool | None = None

    @property
    def urls(self) -> list[str]:
        return [h.url for h in self.hubs]

    async def add_node(self, node_id: str, *grants: str) -> str:
        """Register ``node_id`` (default grant: the whole west region); its token."""
        if self._pool is None:
            self._pool = await asyncpg.create_pool(self.database_url, min_size=1, max_size=2)
        assert self._pool is not None
        return await add_node(self._pool, "west", node_id, list(grants) or ["west"])

    async def __aenter__(self) -> Self:
        try:
            if self._server is not None:
                await asyncio.to_thread(self._server.start)
            # The first hub migrates the database alone; the others find it ready.
            self.hubs[0].start(self.points)
            await self._ready(self.hubs[0])
            for hub in self.hubs[1:]:
                hub.start(self.points)
            for hub in self.hubs[1:]:
                await self._ready(hub)
        except BaseException:
            await self.close()
            raise
        return self

    async def _ready(self, hub: HubProcess) -> None:
        if not await hub.wait_ready():
            raise RuntimeError(
                f"hub {hub.name} exited ({hub.returncode}) while starting; log tail:\n"
                f"{hub.log_tail()}"
            )

    async def close(self) -> None:
        """Stop every hub by its pid, the fork server, and the admin pool. Idempotent."""
        for hub in self.hubs:
            if self.hard_stop:
                hub.kill()
            else:
                await hub.stop()
        if self._server is not None:
            await asyncio.to_thread(self._server.close)
        if self._pool is not None:
            pool, self._pool = self._pool, None
            pool.terminate()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
