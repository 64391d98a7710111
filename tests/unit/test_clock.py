"""HLC laws (RELIABILITY T1): monotonic whatever the wall clock does, overflow borrows the
next millisecond, far-future stamps are refused and never folded in."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from syncengine.clock import HybridClock, hlc_counter, hlc_millis, make_hlc, validate_hlc
from syncengine.errors import ClockDriftError, ValidationError


class FakeWall:
    def __init__(self, ms: int) -> None:
        self.ms = ms

    def __call__(self) -> int:
        return self.ms


@settings(max_examples=2000, deadline=None)
@given(
    steps=st.lists(
        st.tuples(st.sampled_from(["tick", "jump", "now", "observe"]), st.integers(-10_000, 10_000)),
        max_size=60,
    )
)
def test_stamps_strictly_increase_whatever_the_wall_clock_does(steps: list[tuple[str, int]]) -> None:
    wall = FakeWall(1_700_000_000_000)
    clock = HybridClock(wall=wall, max_drift_ms=60_000)
    last = 0
    for op, n in steps:
        if op == "tick":
            wall.ms += abs(n) % 5
        elif op == "jump":  # NTP steps, including backwards
            wall.ms += n * 100
        elif op == "observe":
            remote = make_hlc(wall.ms + n, abs(n) % 7)
            try:
                clock.observe(remote)
            except ClockDriftError:
                assert hlc_millis(remote) - wall.ms > 60_000
                continue
            assert clock.last >= remote
        stamp = clock.now()
        assert stamp > last
        last = stamp


def test_counter_overflow_borrows_the_next_millisecond() -> None:
    clock = HybridClock(wall=FakeWall(1000))
    stamps = [clock.now() for _ in range(65_536 + 10)]
    assert all(a < b for a, b in itertools.pairwise(stamps))
    assert hlc_millis(stamps[65_535]) == 1000 and hlc_counter(stamps[65_535]) == 65_535
    assert hlc_millis(stamps[65_536]) == 1001 and hlc_counter(stamps[65_536]) == 0


def test_far_future_stamp_is_refused_and_not_folded() -> None:
    wall = FakeWall(1_000_000)
    clock = HybridClock(wall=wall, max_drift_ms=300_000)
    before = clock.now()
    with pytest.raises(ClockDriftError) as info:
        clock.observe(make_hlc(1_000_000 + 400_000))
    assert info.value.code == "clock_drift"
    assert info.value.detail["ahead_ms"] == 400_000
    assert clock.last == before
    clock.observe(make_hlc(1_000_000 + 200_000))  # inside the bound: folded
    assert hlc_millis(clock.now()) == 1_200_000


def test_high_water_survives_restart_with_clock_set_back() -> None:
    wall = FakeWall(5_000_000)
    first = HybridClock(wall=wall)
    issued = [first.now() for _ in range(5)]
    wall.ms -= 3_600_000  # the machine rebooted with its clock an hour behind
    second = HybridClock(wall=wall, high_water=first.last)
    assert second.now() > issued[-1]


def test_ties_are_broken_by_node_everywhere() -> None:
    assert sorted([(5, "b"), (5, "a"), (4, "z")]) == [(4, "z"), (5, "a"), (5, "b")]


@pytest.mark.parametrize("bad", [0, -1, 1 << 63, True, 1.5, "7", None])
def test_validate_hlc_refuses_bad_stamps(bad: object) -> None:
    with pytest.raises(ValidationError):
        validate_hlc(bad)
