"""Counterexamples T1 found and Hypothesis shrank, kept as plain regression tests.

Each test replays one shrunk counterexample through the same law it broke, so the bug cannot
come back unnoticed even when the random search happens not to draw it again.
"""

from __future__ import annotations

import msgpack
import pytest

from syncengine import merge

pytestmark = pytest.mark.slow

CELL, COLLECTION, KEY = "west/ng/lagos/clinic-12", "c", "k"


def _change(hlc: int, node: str, seq: int, fields: dict[str, object]) -> merge.Change:
    return merge.Change(
        cell=CELL, collection=COLLECTION, key=KEY, hlc=hlc, node=node, fields=fields, seq=seq
    )


def _fold(changes: list[merge.Change], resolver: str) -> bytes:
    state = None
    for c in changes:
        state = merge.apply_change(state, c, resolver).state
    assert state is not None
    return state.to_bytes()


@pytest.mark.parametrize("resolver", ["max", "min"])
def test_signed_zeros_merge_the_same_in_any_order(resolver: str) -> None:
    """T1 ``merge:max`` counterexample (seed 1, shrunk): ``0.0`` and ``-0.0`` compare equal,
    so a max/min that keeps "the first of equals" held ``0.0`` on one replica and ``-0.0``
    (different msgpack bytes, different JSON) on the other. Replicas must pick one of them
    whatever the order of delivery."""
    a = _change(1, "a", 1, {"x": 0, "z": 0.0})
    b = _change(2, "a", 2, {"x": 0, "z": -0.0})
    ab, ba = _fold([a, b], resolver), _fold([b, a], resolver)
    assert ab == ba, (
        f"{resolver}: delivery order changed the state: "
        f"{msgpack.unpackb(ab)} vs {msgpack.unpackb(ba)}"
    )
