"""Stopping a background task for certain.

``task.cancel()`` asks once, and on Python 3.11 a request can be lost: ``asyncio.wait_for``
returns its inner result when the cancellation of the awaiting task races with the inner
future's completion (CPython gh-86296, fixed in 3.12). redis-py wraps every socket write
in ``wait_for``, so a loop that talks to Redis can swallow the one cancellation it gets and
run on, and whoever awaits it then waits forever (a hub that never exits on SIGTERM).

:func:`stop` asks again until the task has stopped, within a bound. Our own code uses
``asyncio.timeout``, which counts cancellation requests and does not lose them.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Final

__all__ = ["stop"]

log = logging.getLogger(__name__)

#: How long to wait for a cancelled task before asking again.
_ASK_EVERY_S: Final = 0.1


async def stop(task: asyncio.Task[Any], *, timeout_s: float = 10.0) -> bool:
    """Cancel ``task`` until it is done, for at most ``timeout_s``; return whether it is.
    A task that failed rather than stopped keeps its exception for the caller to read."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not task.done():
        left = deadline - loop.time()
        if left <= 0:
            log.warning(
                "task %r did not stop within %.0f s of being cancelled", task.get_name(), timeout_s
            )
            return False
        task.cancel()
        await asyncio.wait({task}, timeout=min(_ASK_EVERY_S, left))
    return True
