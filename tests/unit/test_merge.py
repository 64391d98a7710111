"""Merge laws (RELIABILITY T1): order, grouping and duplication never change the result.

Each property folds random changes from several nodes into one record and compares the
canonical bytes of the results. A small reference model, written without the merge module,
computes the expected document independently.
"""

from __future__ import annotations

import functools
import random
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from syncengine.errors import LimitExceededError, ValidationError
from syncengine.merge import (
    RESOLVERS,
    Change,
    RecordState,
    apply_change,
    document_json,
    validate_fields,
    validate_key,
)

#: Fast feedback: the plan's 2,000 examples per law (100,000 in long mode) are T1's,
#: tests/fault/test_t01_merge_laws.py; these properties run a tenth of that.
EXAMPLES = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
NODES = ["a", "b", "c", "hub:west"]
FIELDS = ["x", "y", "z"]


@functools.cache  # built once: a strategy built per draw is validated anew each time
def _value(resolver: str) -> st.SearchStrategy[Any]:
    if resolver == "counter":
        return st.integers(-5, 5)
    if resolver in ("max", "min"):
        return st.one_of(st.integers(-5, 5), st.sampled_from([1.0, 2.5, -0.5]))
    return st.one_of(
        st.integers(0, 3), st.text(max_size=2), st.none(), st.lists(st.integers(0, 2), max_size=2)
    )


@st.composite
def histories(draw: st.DrawFn, resolver: str) -> list[Change]:
    """Changes to one record: unique (node, seq), small hlcs so ties and overlaps happen."""
    n = draw(st.integers(1, 12))
    seqs = dict.fromkeys(NODES, 0)
    out = []
    for _ in range(n):
        node = draw(st.sampled_from(NODES))
        seqs[node] += 1
        hlc = draw(st.integers(1, 40))
        if draw(st.integers(0, 4)) == 0:
            fields = None
        else:
            names = draw(st.lists(st.sampled_from(FIELDS), min_size=1, max_size=3, unique=True))
            fields = {f: draw(_value(resolver)) for f in names}
        out.append(
            Change(
                cell="west/ng/a",
                collection="c",
                key="k",
                hlc=hlc,
                node=node,
                fields=fields,
                seq=seqs[node],
            )
        )
    # (hlc, node) is unique per write in real life: a node's clock never repeats a stamp.
    seen: set[tuple[int, str]] = set()
    unique = []
    for c in out:
        if c.stamp not in seen:
            seen.add(c.stamp)
            unique.append(c)
    return unique


def fold(changes: list[Change], resolver: str) -> RecordState | None:
    state = None
    for c in changes:
        state = apply_change(state, c, resolver).state
    return state


def as_bytes(state: RecordState | None) -> bytes:
    return state.to_bytes() if state is not None else b""


def model_document(changes: list[Change], resolver: str) -> dict[str, Any]:
    """Reference semantics, straight from DESIGN.md, without the merge module."""
    deletes = [c.stamp for c in changes if c.fields is None]
    tomb = max(deletes) if deletes else None
    doc: dict[str, Any] = {}
    for f in FIELDS:
        writes = [(c.stamp, c.fields[f], c.node) for c in changes if c.fields and f in c.fields]
        if not writes:
            continue
        if resolver in ("lww", "hub-wins"):
            alive = [w for w in writes if tomb is None or w[0] > tomb]
            if resolver == "hub-wins" and any(w[2].startswith("hub:") for w in alive):
                alive = [w for w in alive if w[2].startswith("hub:")]
            if alive:
                doc[f] = max(alive, key=lambda w: w[0])[1]
            continue
        newest = max(w[0] for w in writes)
        if tomb is not None and newest <= tomb:
            continue
        values = [w[1] for w in writes]
        if resolver == "counter":
            doc[f] = sum(values)
        else:
            pick = max if resolver == "max" else min
            doc[f] = pick(values, key=lambda v: (v, isinstance(v, float)))
    return doc


@pytest.mark.parametrize("resolver", sorted(RESOLVERS))
@EXAMPLES
@given(data=st.data())
def test_order_does_not_matter(resolver: str, data: st.DataObject) -> None:
    changes = data.draw(histories(resolver))
    shuffled = data.draw(st.permutations(changes))
    assert as_bytes(fold(changes, resolver)) == as_bytes(fold(list(shuffled), resolver))


@pytest.mark.parametrize("resolver", sorted(RESOLVERS))
@EXAMPLES
@given(data=st.data())
def test_grouping_does_not_matter(resolver: str, data: st.DataObject) -> None:
    """Associativity: applying two halves on two replicas and then exchanging them equals
    applying everything on one replica."""
    changes = data.draw(histories(resolver))
    cut = data.draw(st.integers(0, len(changes)))
    left, right = changes[:cut], changes[cut:]
    a = fold(left + right, resolver)
    b = fold(right + left, resolver)
    assert as_bytes(a) == as_bytes(b)


@pytest.mark.parametrize("resolver", sorted(RESOLVERS - {"counter"}))
@EXAMPLES
@given(data=st.data())
def test_duplicates_do_not_matter(resolver: str, data: st.DataObject) -> None:
    changes = data.draw(histories(resolver))
    dups = data.draw(st.lists(st.sampled_from(changes), max_size=6)) if changes else []
    mixed = data.draw(st.permutations(changes + dups))
    assert as_bytes(fold(changes, resolver)) == as_bytes(fold(list(mixed), resolver))


@EXAMPLES
@given(data=st.data())
def test_counter_is_exactly_once_with_node_seq_dedup(data: st.DataObject) -> None:
    """counter is op-based: duplicate delivery is removed by (node, seq) dedup, as the hub
    and the pull cursor do; with it, the result equals single delivery."""
    changes = data.draw(histories("counter"))
    dups = data.draw(st.lists(st.sampled_from(changes), max_size=6)) if changes else []
    mixed = data.draw(st.permutations(changes + dups))
    seen: set[tuple[str, int]] = set()
    state = None
    for c in mixed:
        if (c.node, c.seq) in seen:
            continue
        seen.add((c.node, c.seq))
        state = apply_change(state, c, "counter").state
    assert as_bytes(state) == as_bytes(fold(changes, "counter"))


@pytest.mark.parametrize("resolver", sorted(RESOLVERS))
@EXAMPLES
@given(data=st.data())
def test_matches_reference_model(resolver: str, data: st.DataObject) -> None:
    changes = data.draw(histories(resolver))
    state = fold(list(data.draw(st.permutations(changes))), resolver)
    doc = state.document() if state is not None else {}
    assert document_json(doc) == document_json(model_document(changes, resolver))
    if state is not None:  # the shortcut a bootstrap takes reads the same off the bytes
        assert RecordState.view(state.to_bytes()) == (doc, state.max_hlc)


@EXAMPLES
@given(data=st.data())
def test_no_silent_loss_under_lww(data: st.DataObject) -> None:
    """Invariant 5: every lww value that is not the final one was either seen by the write
    that replaced it (its base) or is reported as a conflict's loser."""
    changes = data.draw(histories("lww"))
    # Give writes random bases: either nothing seen, or another write of the same field.
    based = []
    for c in changes:
        if c.fields is None:
            based.append(c)
            continue
        base = {}
        for f in c.fields:
            candidates = [o.hlc for o in changes if o.fields and f in o.fields and o is not c]
            if candidates and data.draw(st.booleans()):
                base[f] = data.draw(st.sampled_from(candidates))
        based.append(
            Change(
                cell=c.cell,
                collection=c.collection,
                key=c.key,
                hlc=c.hlc,
                node=c.node,
                fields=c.fields,
                base=base,
                seq=c.seq,
            )
        )
    order = list(data.draw(st.permutations(based)))
    state, losers = None, set()
    for c in order:
        applied = apply_change(state, c, "lww", detect_conflicts=True)
        state = applied.state
        losers |= {
            (k.field, k.loser_hlc, k.loser_node, document_json({"v": k.loser_value}))
            for k in applied.conflicts
        }
    final = state.document() if state is not None else {}

    def text(v: Any) -> str:
        return document_json({"v": v})

    # A value is kept if it is final, was logged as a loser, or was seen by the write that
    # replaced it. Equal values are interchangeable: losing to an equal value loses nothing.
    kept = {(f, text(v)) for f, v in final.items()}
    kept |= {(f, v) for f, _, _, v in losers}
    for o in based:
        for f, h in o.base.items():
            kept |= {
                (f, text(w.fields[f])) for w in based if w.fields and f in w.fields and w.hlc == h
            }
    for c in based:
        for f, v in (c.fields or {}).items():
            assert (f, text(v)) in kept, (f, c)


def test_revival_after_tombstone_keeps_only_later_fields() -> None:
    put1 = Change(
        cell="west/ng/a", collection="c", key="k", hlc=10, node="a", fields={"x": 1, "y": 2}
    )
    delete = Change(cell="west/ng/a", collection="c", key="k", hlc=20, node="b", fields=None)
    put2 = Change(cell="west/ng/a", collection="c", key="k", hlc=30, node="a", fields={"y": 3})
    late = Change(cell="west/ng/a", collection="c", key="k", hlc=15, node="c", fields={"z": 9})
    for order in (
        [put1, delete, put2, late],
        [late, put2, delete, put1],
        [delete, late, put1, put2],
    ):
        state = fold(order, "lww")
        assert state is not None
        assert state.document() == {"y": 3}
    deleted = fold([put1, delete], "lww")
    assert deleted is not None and deleted.deleted and deleted.document() == {}


def test_concurrent_edits_of_different_fields_both_survive() -> None:
    base = Change(
        cell="west/ng/a", collection="c", key="k", hlc=1, node="a", fields={"x": 0, "y": 0}
    )
    a = Change(
        cell="west/ng/a", collection="c", key="k", hlc=5, node="a", fields={"x": 1}, base={"x": 1}
    )
    b = Change(
        cell="west/ng/a", collection="c", key="k", hlc=6, node="b", fields={"y": 2}, base={"y": 1}
    )
    for order in ([base, a, b], [b, a, base]):
        assert fold(order, "lww").document() == {"x": 1, "y": 2}  # type: ignore[union-attr]


def test_hub_wins_beats_newer_edge_write() -> None:
    hub = Change(
        cell="west/ng/a", collection="c", key="k", hlc=5, node="hub:west", fields={"p": "hub"}
    )
    edge = Change(cell="west/ng/a", collection="c", key="k", hlc=9, node="a", fields={"p": "edge"})
    assert fold([hub, edge], "hub-wins").document() == {"p": "hub"}  # type: ignore[union-attr]
    assert fold([edge, hub], "lww").document() == {"p": "edge"}  # type: ignore[union-attr]


def test_int_and_float_ties_pick_the_same_value_everywhere() -> None:
    a = Change(cell="west/ng/a", collection="c", key="k", hlc=1, node="a", fields={"m": 1})
    b = Change(cell="west/ng/a", collection="c", key="k", hlc=2, node="b", fields={"m": 1.0})
    assert fold([a, b], "max").to_bytes() == fold([b, a], "max").to_bytes()  # type: ignore[union-attr]


def test_state_bytes_round_trip() -> None:
    rng = random.Random(7)
    changes = [
        Change(
            cell="west/ng/a",
            collection="c",
            key="k",
            hlc=rng.randint(1, 99),
            node=n,
            fields={"x": rng.random(), "n": {"b": [1, "two"], "a": None}},
        )
        for n in "abc"
    ]
    state = fold(changes, "lww")
    assert state is not None
    assert RecordState.from_bytes(state.to_bytes()) == state


@pytest.mark.parametrize(
    ("fields", "resolver", "code"),
    [
        ({"x": object()}, "lww", "unencodable_value"),
        ({"x": b"\x00"}, "lww", "unencodable_value"),
        ({"x": float("nan")}, "lww", "invalid_value"),
        ({"x": 1 << 70}, "lww", "invalid_value"),
        ({"x": "\ud800"}, "lww", "invalid_value"),
        ({1: "x"}, "lww", "invalid_field_name"),
        ({}, "lww", "empty_put"),
        ({"x": "1"}, "counter", "invalid_value"),
        ({"x": 1.5}, "counter", "invalid_value"),
        ({"x": True}, "max", "invalid_value"),
        ("not a map", "lww", "invalid_value"),
    ],
)
def test_bad_fields_are_refused_with_a_code(fields: Any, resolver: str, code: str) -> None:
    with pytest.raises(ValidationError) as info:
        validate_fields(fields, resolver=resolver)
    assert info.value.code == code
    assert info.value.message


def test_record_size_limit() -> None:
    with pytest.raises(LimitExceededError) as info:
        validate_fields({"blob": "x" * 2000}, max_bytes=1000)
    assert info.value.code == "record_too_large"
    assert "max_record_bytes" in info.value.hint


def test_long_key_is_refused() -> None:
    with pytest.raises(ValidationError) as info:
        validate_key("k" * 10_000)
    assert info.value.code == "key_too_long"
