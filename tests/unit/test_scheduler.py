"""The daemon's clock (APScheduler behind scheduler.py) and the priority gate between lanes."""

from __future__ import annotations

import asyncio
import time
from zoneinfo import ZoneInfo

import pytest

from syncengine.edge.sync import PriorityGate
from syncengine.errors import LinkError, ValidationError
from syncengine.scheduler import Scheduler

LAGOS = ZoneInfo("Africa/Lagos")


async def test_once_fires_and_replaces_a_pending_run_of_the_same_id() -> None:
    fired: list[str] = []

    def job(name: str):  # type: ignore[no-untyped-def]
        async def run() -> None:
            fired.append(name)

        return run

    async with Scheduler(LAGOS) as s:
        s.once("open:push:standard", 30, job("late"))
        s.once("open:push:standard", 0.05, job("soon"))  # replaces, does not pile up
        assert s.job_ids() == ["open:push:standard"]
        await asyncio.sleep(0.3)
    assert fired == ["soon"]


async def test_every_repeats_until_cancelled() -> None:
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        ticks += 1

    async with Scheduler(LAGOS) as s:
        s.every("push:important", 0.05, tick)
        assert s.next_run("push:important") is not None
        await asyncio.sleep(0.4)
        assert s.cancel("push:important")
        assert not s.cancel("push:important")
        seen = ticks
        await asyncio.sleep(0.15)
    assert seen >= 3
    assert ticks <= seen + 1  # a run fired just before the cancel may still finish


async def test_cron_reads_the_region_clock_and_refuses_nonsense() -> None:
    async def nothing() -> None:
        return None

    async with Scheduler(LAGOS) as s:
        s.cron("push:archive", "0 2 * * sun", nothing)
        when = s.next_run("push:archive")
        assert when is not None
        local = when.astimezone(LAGOS)
        assert (local.hour, local.minute, local.strftime("%a")) == (2, 0, "Sun")
        with pytest.raises(ValueError):
            s.cron("bad", "61 * * * *", nothing)
        with pytest.raises(ValueError):
            s.every("bad", 0, nothing)


async def test_shutdown_is_idempotent() -> None:
    s = Scheduler(LAGOS)
    s.start()
    assert s.running
    s.shutdown()
    s.shutdown()
    assert not s.running


async def test_a_lower_lane_waits_while_a_higher_one_pushes() -> None:
    gate = PriorityGate()
    order: list[str] = []

    async def critical() -> None:
        async with gate.claim(0):
            order.append("critical starts")
            await asyncio.sleep(0.1)
            order.append("critical ends")

    async def archive() -> None:
        await asyncio.sleep(0.01)
        await gate.turn(3)
        order.append("archive batch")

    await asyncio.gather(critical(), archive())
    assert order == ["critical starts", "critical ends", "archive batch"]
    # A lane never waits for less important ones.
    async with gate.claim(3):
        await asyncio.wait_for(gate.turn(0), 0.1)


async def test_an_announcement_holds_lower_lanes_briefly_and_expires() -> None:
    gate = PriorityGate()
    gate.announce(0, for_s=0.2)
    assert gate.blocked(1) > 0 and gate.blocked(0) == 0
    started = time.monotonic()
    await gate.turn(2)  # nobody claims lane 0: the hold runs out by itself
    assert 0.15 < time.monotonic() - started < 1.0
    gate.announce(0, for_s=5)
    async with gate.claim(0):  # the push came: the claim replaces the announcement
        assert gate.blocked(1) == float("inf")
    assert gate.blocked(1) == 0


async def test_owed_lanes_hold_lower_lanes_until_their_next_push() -> None:
    """No timer lets a lower lane through: the hold lasts until the owing lane's next push
    claims it, however late that is (a link that came back, a busy loop)."""
    gate = PriorityGate()
    with pytest.raises(LinkError):
        async with gate.claim(0):
            raise LinkError("the link dropped", code="link_error")
    gate.owe(0)  # the daemon will retry it
    assert gate.owed(0) and gate.blocked(1) == float("inf") and gate.blocked(0) == 0
    waiter = asyncio.ensure_future(gate.turn(1))
    await asyncio.sleep(1.2)  # longer than any announcement
    assert not waiter.done()
    async with gate.claim(0):  # the retry
        await asyncio.sleep(0.01)
        assert not waiter.done()
    await asyncio.wait_for(waiter, 1.0)
    assert not gate.owed(0)


async def test_a_failed_push_nobody_owes_holds_lower_lanes_only_briefly() -> None:
    """A caller of push_lane that will not retry does not stop the other lanes for good."""
    gate = PriorityGate()
    with pytest.raises(ValidationError):
        async with gate.claim(0):
            raise ValidationError("bad change", code="invalid_change")
    assert not gate.owed(0)
    assert 0 < gate.blocked(1) <= 1.0


async def test_owed_changes_hold_lower_lanes_until_claimed_or_forgiven() -> None:
    gate = PriorityGate()
    gate.owe(0)
    assert gate.blocked(2) == float("inf")
    waiter = asyncio.ensure_future(gate.turn(2))
    await asyncio.sleep(0.05)
    assert not waiter.done()
    await gate.forgive(0)  # a round of other tiers: it does not wait for lane 0
    await asyncio.wait_for(waiter, 1.0)
    gate.owe(1)
    async with gate.claim(1):
        assert not gate.owed(1)
    gate.owe(1)  # written while the push ran: owed again after it
    async with gate.claim(1):
        gate.owe(1)
    assert gate.owed(1)
