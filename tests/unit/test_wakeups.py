"""Held long-polls are woken by the pushes that concern them, and only by those."""

from __future__ import annotations

import random

from syncengine.cells import covers_any
from syncengine.hub.cache import read_wakeup, wakeup_message
from syncengine.hub.wakeups import MAX_CELLS_ANNOUNCED, Wakeups, ancestors

CLINIC = "west/ng/lagos/clinic-12"


def test_ancestors_end_on_segment_boundaries() -> None:
    assert list(ancestors(CLINIC)) == ["west", "west/ng", "west/ng/lagos", CLINIC]
    assert list(ancestors("west")) == ["west"]


async def test_a_push_wakes_the_polls_whose_prefixes_and_tiers_it_concerns() -> None:
    wakeups = Wakeups()
    with (
        wakeups.waiting([1], [CLINIC]) as clinic,
        wakeups.waiting([1, 2], ["west/ng"]) as country,
        wakeups.waiting([1], ["west/ng/lagos/clinic-1"]) as sibling,
        wakeups.waiting([2], [CLINIC]) as other_tier,
    ):
        assert len(wakeups) == 4
        assert wakeups.wake({1: frozenset({f"{CLINIC}/visits"})}) == 2
        assert clinic.event.is_set() and country.event.is_set()
        # "clinic-1" is not a prefix of "clinic-12": segments, not characters.
        assert not sibling.event.is_set() and not other_tier.event.is_set()
        # A tier named without cells wakes every poll of that tier.
        assert wakeups.wake({2: None}) == 1  # country's event is set already
        assert other_tier.event.is_set()
    assert len(wakeups) == 0
    assert wakeups.wake(None) == 0


async def test_wake_agrees_with_covers_on_random_prefixes() -> None:
    """The index gives exactly the waiters a scan with ``covers_any`` would."""
    rng = random.Random(7)
    segments = ["west", "ng", "gh", "lagos", "accra", "clinic-1", "clinic-12", "stock"]

    def path() -> str:
        return "/".join(rng.choice(segments) for _ in range(rng.randint(1, 5)))

    for _ in range(200):
        wakeups = Wakeups()
        polls = []
        with_blocks = []
        for _ in range(rng.randint(1, 8)):
            tiers = rng.sample(range(4), rng.randint(1, 4))
            prefixes = [path() for _ in range(rng.randint(1, 3))]
            block = wakeups.waiting(tiers, prefixes)
            polls.append((tiers, prefixes, block.__enter__()))
            with_blocks.append(block)
        tier, cells = rng.randrange(4), {path() for _ in range(rng.randint(1, 4))}
        wakeups.wake({tier: frozenset(cells)})
        for tiers, prefixes, waiter in polls:
            expected = tier in tiers and any(covers_any(prefixes, c) for c in cells)
            assert waiter.event.is_set() == expected, (tiers, prefixes, tier, cells)
        for block in with_blocks:
            block.__exit__(None, None, None)
        assert len(wakeups) == 0


def test_wakeup_messages_round_trip_and_stay_small() -> None:
    changed = {1: frozenset({CLINIC, "west/gh"}), 3: frozenset({"west/gh"})}
    assert read_wakeup(wakeup_message(changed)) == changed
    many = {2: frozenset(f"west/c{i}" for i in range(MAX_CELLS_ANNOUNCED + 1))}
    assert wakeup_message(many) == "2"
    assert read_wakeup("2") == {2: None}
    assert read_wakeup("0,3") == {0: None, 3: None}
    assert read_wakeup("*") is None
    # What another version may send, or garbage: wake every poll rather than miss one.
    assert read_wakeup("{not json") is None
    assert read_wakeup("") is None


async def test_a_push_does_not_wake_its_own_writers_long_poll() -> None:
    """A node's pages leave out its own changes: its push must not wake its own poll."""
    wakeups = Wakeups()
    cell = "west/ng/lagos/clinic-12/visits"
    with (
        wakeups.waiting([1], ["west/ng/lagos/clinic-12"], node="clinic-12") as own,
        wakeups.waiting([1], ["west/ng/lagos"], node="district") as other,
    ):
        assert wakeups.wake({1: frozenset({cell})}, writer="clinic-12") == 1
        assert other.event.is_set() and not own.event.is_set()
        # From another hub process the writer is not known: every concerned poll wakes.
        other.event.clear()
        assert wakeups.wake({1: frozenset({cell})}) == 2
