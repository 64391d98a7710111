"""Crash points: places in production code where fault tests may kill the process.

``SYNCENGINE_CRASHPOINTS="edge.put.before_commit:0.05,hub.push.before_commit:0.1"`` makes
``crashpoint("edge.put.before_commit")`` SIGKILL its own process with probability 0.05. When
the variable is unset (production) a crash point is one dict lookup. Before dying, the point
appends its name to ``SYNCENGINE_CRASHPOINT_LOG`` (when set) so the test harness can report
how often each point fired: a point that never fires tested nothing.
"""

from __future__ import annotations

import os
import random
import signal
from typing import Final

__all__ = ["CATALOG", "crashpoint", "reload"]

#: Every crash point in the code base. Tests check each one is reachable.
CATALOG: Final = frozenset(
    {
        "edge.put.before_commit",
        "edge.put.after_commit_before_ack",
        "edge.groupcommit.mid",
        "push.after_send_before_response",
        "push.after_ack_before_outbox_delete",
        "pull.after_apply_before_commit",
        "pull.after_commit_before_next_page",
        "hub.push.before_commit",
        "hub.push.after_commit_before_response",
        "hub.feed.after_append_before_commit",
        "hub.cache.after_pg_commit_before_redis_set",
        "snapshot.mid_stream",
        "bootstrap.after_page_before_commit",
        "bootstrap.after_page_commit",
        "deadletter.after_reject_before_record",
    }
)

_active: dict[str, float] = {}
_log_path: str | None = None


def reload(spec: str | None = None, log_path: str | None = None) -> None:
    """(Re)read the configuration, from the arguments or else the environment."""
    global _log_path
    spec = os.environ.get("SYNCENGINE_CRASHPOINTS", "") if spec is None else spec
    _log_path = log_path or os.environ.get("SYNCENGINE_CRASHPOINT_LOG") or None
    _active.clear()
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, prob = item.partition(":")
        if name not in CATALOG:
            raise ValueError(f"SYNCENGINE_CRASHPOINTS names unknown crash point {name!r}")
        _active[name] = float(prob) if prob else 1.0


def crashpoint(name: str) -> None:
    """Kill this process here when the named point is armed and its dice say so."""
    prob = _active.get(name)
    if prob is None or random.random() >= prob:
        return
    if _log_path:
        fd = os.open(_log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, f"{name}\n".encode())
        finally:
            os.close(fd)
    os.kill(os.getpid(), signal.SIGKILL)


reload()
