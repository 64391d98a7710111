"""What a long-running syncengine process owes its service manager: systemd notifications and
structured log lines.

- :func:`notify` speaks systemd's ``Type=notify`` protocol (``READY=1``, ``STOPPING=1``,
  ``WATCHDOG=1``, ``STATUS=…``) when ``NOTIFY_SOCKET`` is set, and does nothing otherwise;
  a failure to notify is never fatal.
- :func:`watchdog_interval_s` reads ``WATCHDOG_USEC`` (honouring ``WATCHDOG_PID``): how often
  to send ``WATCHDOG=1``, half the period systemd allows.
- :func:`log_formatter` gives the one-line-per-event formats of ``--log-format``: ``text``
  for people, ``json`` (``python-json-logger``) for journald and log shippers, with any
  ``extra=`` fields a call site adds (``node``, ``tier``, ``state`` …) as JSON keys.
- :func:`tune_gc` makes the cyclic garbage collector run less often.
"""

from __future__ import annotations

import gc
import logging
import os
import socket
from collections.abc import Mapping
from typing import Final, Literal

from pythonjsonlogger.json import JsonFormatter

__all__ = [
    "GC_THRESHOLDS",
    "LogFormat",
    "log_formatter",
    "notify",
    "tune_gc",
    "watchdog_interval_s",
]

log = logging.getLogger(__name__)

LogFormat = Literal["text", "json"]
_TEXT_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_TIME_FORMAT: Final = "%Y-%m-%dT%H:%M:%S"


#: The cyclic collector's thresholds in the hub and the edge daemon. CPython's (700, 10, 10)
#: starts a collection every 700 container allocations, a few dozen changes of a push or a
#: snapshot page, and the older generations' passes walk the whole heap: that tripled the
#: cost of decoding a record state under a hub's live heap. Reference counting frees almost
#: everything these processes drop; the collector is there for the rare cycle.
GC_THRESHOLDS: Final = (50_000, 20, 10)


def tune_gc() -> None:
    """For a long-running process, once its start-up is done: move everything alive now
    (modules, config) out of the collector's sight for good (``gc.freeze``) and raise its
    thresholds to :data:`GC_THRESHOLDS`."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def notify(state: str, *, env: Mapping[str, str] | None = None) -> bool:
    """Send ``state`` (e.g. ``"READY=1"``) to systemd if it listens; return whether it was
    sent. ``env`` defaults to ``os.environ``.

    The protocol is one datagram on the unix socket named by ``NOTIFY_SOCKET`` (a leading
    ``@`` names an abstract socket). Written out here rather than taken from ``sdnotify``,
    which leaks its socket when systemd is not there.
    """
    address = (env if env is not None else os.environ).get("NOTIFY_SOCKET")
    if not address:
        return False
    if address[0] == "@":
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as exc:
        log.warning("could not notify systemd (%s): %s", state.split("\n", maxsplit=1)[0], exc)
        return False
    return True


def watchdog_interval_s(env: Mapping[str, str] | None = None) -> float | None:
    """How often to send ``WATCHDOG=1`` (half of ``WATCHDOG_USEC``), or ``None`` when systemd
    expects no keep-alives from this process."""
    env = env if env is not None else os.environ
    usec = env.get("WATCHDOG_USEC", "")
    pid = env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0 or (pid.isdigit() and int(pid) != os.getpid()):
        return None
    return int(usec) / 2_000_000


class _TextFormatter(logging.Formatter):
    """``2024-05-01T10:00:00 INFO syncengine.edge.daemon: message``; tracebacks only if asked.

    One-shot commands already report their error as ``error:``/``hint:``; a traceback logged
    on the way (e.g. by the database seam) is noise unless ``-v`` was given.
    """

    def __init__(self, *, tracebacks: bool) -> None:
        super().__init__(_TEXT_FORMAT, _TIME_FORMAT)
        self._tracebacks = tracebacks

    def format(self, record: logging.LogRecord) -> str:
        if not self._tracebacks and (record.exc_info or record.exc_text):
            record = logging.makeLogRecord(record.__dict__)
            record.exc_info = None
            record.exc_text = None
        return super().format(record)


def log_formatter(fmt: LogFormat, *, tracebacks: bool) -> logging.Formatter:
    """The formatter of one ``--log-format``. JSON lines carry ``level``, ``logger``,
    ``message``, ``ts`` (and ``exc_info`` for a traceback) plus the record's ``extra``
    fields."""
    if fmt == "json":
        return JsonFormatter(
            "{levelname}{name}{message}",
            style="{",
            rename_fields={"levelname": "level", "name": "logger"},
            timestamp="ts",  # ISO 8601 in UTC, milliseconds
            json_ensure_ascii=False,
        )
    return _TextFormatter(tracebacks=tracebacks)
