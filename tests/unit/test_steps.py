"""Work in steps: the same result at once or between the event loop's other work."""

from __future__ import annotations

import asyncio

from syncengine import steps


def _count(n: int, trace: list[str]) -> steps.Steps[int]:
    for i in range(n):
        trace.append(f"step {i}")
        yield
    return n * 10


def test_run_drives_the_steps_to_their_result_without_pausing() -> None:
    trace: list[str] = []
    assert steps.run(_count(3, trace)) == 30
    assert trace == ["step 0", "step 1", "step 2"]


async def test_run_between_lets_other_tasks_run_between_steps() -> None:
    trace: list[str] = []

    async def other() -> None:
        for i in range(3):
            trace.append(f"other {i}")
            await asyncio.sleep(0)

    beside = asyncio.create_task(other())
    assert await steps.run_between(_count(3, trace)) == 30
    await beside
    assert trace == ["step 0", "other 0", "step 1", "other 1", "step 2", "other 2"]
