"""The reference merge model: what every replica must hold, recomputed from DESIGN.md's merge
rules without any of syncengine's code (RELIABILITY.md §1: the checker shares no code with
what it checks).

Where syncengine folds changes one at a time as they arrive, the model folds the *set* of
changes of a record at once, so the order of delivery cannot enter into it:

- **lww** (and each of **hub-wins**' two registers: writes by ``hub:`` nodes, and the rest):
  per field the write with the greatest ``(hlc, node)`` wins; the record's tombstone is its
  newest delete, and a field survives only when its winning write is stamped after it (a
  write after the tombstone revives just the fields written after it; earlier writes never
  come back). On reads, a visible ``hub:`` value beats the edge value of the field.
- **max** / **min** / **counter**: per field the greatest / least value / the sum of every
  write, stamped with the field's newest write; a delete hides the record until a write is
  stamped after it, and never resets the aggregate. Among equal numbers the order is
  ``int < -0.0 < +0.0`` (the same value must be picked on every replica, so the pick cannot
  depend on which arrived first).

The state's canonical bytes are msgpack of ``{"f": {field: [value, hlc, node]}, "h": {…} (only
when a ``hub:`` value exists), "t": [hlc, node] or nil}`` with every map's keys sorted: the
``state`` column that replicas must hold byte for byte.

Conflicts (invariant 5): under lww and hub-wins, a write that is not its field's surviving
value was *overwritten*. That is deliberate when a change stamped after it had seen it (the
writer's ``seen`` stamps, taken from its replica when it wrote); otherwise the value lost to a
concurrent write and must be in the hub's conflict log: :func:`lost_values`.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgpack

Stamp = tuple[int, str]
RecordKey = tuple[str, str, str]
Entry = tuple[Any, int, str]

HUB_PREFIX = "hub:"
AGGREGATES = frozenset({"max", "min", "counter"})
RESOLVERS = frozenset({"lww", "hub-wins", *AGGREGATES})


@dataclass(frozen=True, kw_only=True)
class Write:
    """One change: the fields written (``None`` for a delete) and, per field it replaced (for
    a delete: per field it hid), the stamp of the version its writer saw."""

    cell: str
    collection: str
    key: str
    hlc: int
    node: str
    fields: Mapping[str, Any] | None
    seen: Mapping[str, Stamp] = field(default_factory=dict)

    @property
    def stamp(self) -> Stamp:
        return (self.hlc, self.node)

    @property
    def record(self) -> RecordKey:
        return (self.cell, self.collection, self.key)


@dataclass(frozen=True)
class Loser:
    """A value that must be in the conflict log (``value`` as canonical JSON text)."""

    cell: str
    collection: str
    key: str
    field: str
    node: str
    hlc: int
    value: str


def canonical(value: Any) -> Any:
    """``value`` with every map's keys sorted, recursively (tuples become lists)."""
    if isinstance(value, dict):
        return {k: canonical(value[k]) for k in sorted(value)}
    if isinstance(value, list | tuple):
        return [canonical(v) for v in value]
    return value


def canonical_json(value: Any) -> str:
    """The canonical JSON text of a value or document (how the edge stores ``doc``)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _number_order(value: float) -> tuple[float, bool, float]:
    return (value, isinstance(value, float), math.copysign(1.0, value))


@dataclass
class Record:
    """The state of one record every replica must hold."""

    fields: dict[str, Entry] = field(default_factory=dict)
    hub: dict[str, Entry] = field(default_factory=dict)
    tomb: Stamp | None = None

    def _visible(self, entry: Entry) -> bool:
        return self.tomb is None or (entry[1], entry[2]) > self.tomb

    def document(self) -> dict[str, Any]:
        doc = {n: e[0] for n, e in self.fields.items() if self._visible(e)}
        doc.update({n: e[0] for n, e in self.hub.items() if self._visible(e)})
        return doc

    @property
    def deleted(self) -> bool:
        return not self.document()

    def to_bytes(self) -> bytes:
        def entries(register: dict[str, Entry]) -> dict[str, list[Any]]:
            return {n: [canonical(register[n][0]), *register[n][1:]] for n in sorted(register)}

        body: dict[str, Any] = {"f": entries(self.fields)}
        if self.hub:
            body["h"] = entries(self.hub)
        body["t"] = list(self.tomb) if self.tomb is not None else None
        return msgpack.packb(body, use_bin_type=True)  # type: ignore[no-any-return]


def _by_record(changes: Iterable[Write]) -> dict[RecordKey, list[Write]]:
    out: dict[RecordKey, list[Write]] = defaultdict(list)
    for c in changes:
        out[c.record].append(c)
    return out


def fold(changes: Iterable[Write], resolver: str = "lww") -> Record:
    """The state of one record after all of ``changes`` (any order, each counted once)."""
    if resolver not in RESOLVERS:
        raise ValueError(f"unknown resolver {resolver!r}")
    changes = list(changes)
    deletes = [c.stamp for c in changes if c.fields is None]
    record = Record(tomb=max(deletes, default=None))
    written: dict[tuple[bool, str], list[Entry]] = defaultdict(list)
    for c in changes:
        to_hub = resolver == "hub-wins" and c.node.startswith(HUB_PREFIX)
        for name, value in (c.fields or {}).items():
            written[(to_hub, name)].append((value, c.hlc, c.node))
    for (to_hub, name), entries in sorted(written.items()):
        stamp = max((e[1], e[2]) for e in entries)
        values = [e[0] for e in entries]
        if resolver == "max":
            entry: Entry = (max(values, key=_number_order), *stamp)
        elif resolver == "min":
            entry = (min(values, key=_number_order), *stamp)
        elif resolver == "counter":
            entry = (sum(values), *stamp)
        else:
            entry = max(entries, key=lambda e: (e[1], e[2]))
            if record.tomb is not None and stamp <= record.tomb:
                continue  # deleted after its last write: gone for good
        (record.hub if to_hub else record.fields)[name] = entry
    return record


def fold_all(changes: Iterable[Write], resolvers: Mapping[str, str]) -> dict[RecordKey, Record]:
    """Every record's state; ``resolvers`` maps collections to resolvers (default lww)."""
    return {rk: fold(cs, resolvers.get(rk[1], "lww")) for rk, cs in _by_record(changes).items()}


def lost_values(changes: Iterable[Write], resolvers: Mapping[str, str]) -> set[Loser]:
    """The overwritten concurrent values the hub's conflict log must hold."""
    lost: set[Loser] = set()
    for (cell, coll, key), cs in _by_record(changes).items():
        resolver = resolvers.get(coll, "lww")
        if resolver in AGGREGATES:
            continue  # nothing is lost: every write stays in the aggregate
        state = fold(cs, resolver)
        for w in cs:
            to_hub = resolver == "hub-wins" and w.node.startswith(HUB_PREFIX)
            for name, value in (w.fields or {}).items():
                kept = (state.hub if to_hub else state.fields).get(name)
                if kept is not None and (kept[1], kept[2]) == w.stamp:
                    continue  # the surviving value
                if any(c.seen.get(name) == w.stamp and c.stamp > w.stamp for c in cs):
                    continue  # replaced by a writer who had seen it: deliberate
                lost.add(Loser(cell, coll, key, name, w.node, w.hlc, canonical_json(value)))
    return lost
