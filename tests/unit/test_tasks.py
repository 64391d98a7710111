"""syncengine.tasks.stop: a task that loses a cancellation is still stopped."""

from __future__ import annotations

import asyncio

from syncengine import tasks


async def test_stop_asks_again_when_a_cancellation_is_swallowed() -> None:
    """The loop swallows its first two cancellations, as a loop over redis-py can on
    Python 3.11 (a cancel that races ``wait_for``'s inner completion is lost)."""
    swallowed = 0

    async def stubborn() -> None:
        nonlocal swallowed
        while True:
            try:
                await asyncio.sleep(1)
            except asyncio.CancelledError:
                if swallowed == 2:
                    raise
                swallowed += 1
                asyncio.current_task().uncancel()  # type: ignore[union-attr]

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    assert await tasks.stop(task, timeout_s=5)
    assert task.cancelled()
    assert swallowed == 2


async def test_stop_gives_up_after_its_bound() -> None:
    deaf = True

    async def deaf_while_told() -> None:
        while True:
            try:
                await asyncio.sleep(1)
            except asyncio.CancelledError:
                if not deaf:
                    raise
                asyncio.current_task().uncancel()  # type: ignore[union-attr]

    task = asyncio.create_task(deaf_while_told())
    await asyncio.sleep(0)
    assert not await tasks.stop(task, timeout_s=0.3)
    assert not task.done()
    deaf = False
    assert await tasks.stop(task, timeout_s=5)


async def test_stop_keeps_the_exception_of_a_task_that_failed() -> None:
    async def fails() -> None:
        raise ValueError("broken")

    task = asyncio.create_task(fails())
    await asyncio.sleep(0)
    assert await tasks.stop(task)
    assert isinstance(task.exception(), ValueError)
