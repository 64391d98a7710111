"""Long CPU work in steps, so that one event loop stays responsive while it runs.

Such work is written once, as a generator that yields (``None``) between slices and returns
its result: :func:`run` drives it to the end at once, for a caller with nothing else to do
(a client, a test); :func:`run_between` lets the event loop's other work run between slices
(the hub decoding and preparing a push while its push applier waits for PostgreSQL).
"""

from __future__ import annotations

import asyncio
from collections.abc import Generator
from typing import TypeVar

__all__ = ["Steps", "run", "run_between"]

_T = TypeVar("_T")

#: Work in steps that returns a ``_T``.
Steps = Generator[None, None, _T]


def run(steps: Steps[_T]) -> _T:
    """Run ``steps`` to its end without pausing; return its result."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]


async def run_between(steps: Steps[_T]) -> _T:
    """Run ``steps`` to its end, letting the event loop run other work between steps."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]
        await asyncio.sleep(0)
