"""Changes, record state and the merge that makes replicas converge.

A record's state keeps, per field, the winning value with its stamp ``(hlc, node)`` and, for
the record, the stamp of the newest delete (the tombstone). Applying a change folds it into
the state; the result does not depend on the order changes arrive in, so every replica that
has applied the same set of changes holds byte-identical state (:meth:`RecordState.to_bytes`).

Resolvers, chosen per collection:

``lww`` (default)
    per field, the write with the greater ``(hlc, node)`` wins. A delete is a record-level
    tombstone: fields stamped at or before it are gone for good, and a field written after it
    revives the record with just the fields written after it.
``hub-wins``
    writes made at the hub (node ids starting with ``hub:``, which edges cannot have) beat
    edge writes whatever their stamps; within each side, ``lww``. Kept as two ``lww``
    registers per field so that tombstones prune both consistently.
``max`` / ``min``
    per field, the greatest / least number ever written (numbers only).
``counter``
    per field, the sum of all increments (integers only). Increments are not idempotent:
    callers apply each change once, deduplicated by ``(node, seq)`` (the hub's push dedup and
    the pull cursor do this).

For ``max``, ``min`` and ``counter`` a delete hides the record but does not reset the
aggregate: a write after the delete shows the aggregate over every write again. Resetting a
replicated aggregate needs coordination, which an offline-first system cannot have; the
pruning rule of ``lww`` would make these resolvers order-dependent.

Conflicts: a write can lose information only under ``lww`` and ``hub-wins``. Each change
carries, per field, the stamp ``(hlc, node)`` of the value its writer replaced (``base``):
the hlc alone cannot name a version, because two nodes can stamp the same hlc. A value that is
overwritten by a write whose writer had not seen it, or a write that arrives already beaten,
is reported as a :class:`Conflict` so the hub can log it (invariant 5).
"""

from __future__ import annotations

import json
import math
import re
import reprlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import msgpack
import orjson

from syncengine.codec import canonical, canonical_packb, encode
from syncengine.errors import DecodeError, LimitExceededError, ValidationError

__all__ = [
    "DEFAULT_RESOLVER",
    "HUB_NODE_PREFIX",
    "MAX_FIELD_NAME_LENGTH",
    "MAX_KEY_LENGTH",
    "MAX_VALUE_DEPTH",
    "RESOLVERS",
    "Applied",
    "BaseStamp",
    "Change",
    "Conflict",
    "RecordState",
    "apply_change",
    "base_stamps",
    "document_json",
    "validate_collection",
    "validate_fields",
    "validate_key",
]

HUB_NODE_PREFIX: Final = "hub:"
DEFAULT_RESOLVER: Final = "lww"
MAX_KEY_LENGTH: Final = 512
MAX_COLLECTION_LENGTH: Final = 64
MAX_FIELD_NAME_LENGTH: Final = 256
MAX_VALUE_DEPTH: Final = 16
_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1

# An entry is (value, hlc, node). Tuples, not objects: this is the hot path of every write.
Entry = tuple[Any, int, str]
Stamp = tuple[int, str]
#: What a base names per field: the stamp of the version replaced, or its bare hlc in changes
#: queued by a store of an older version (compared by hlc alone).
BaseStamp = Stamp | int


@dataclass(frozen=True, kw_only=True, slots=True)
class Change:
    """One write to one record: the fields written, or a delete (``fields is None``).

    ``base`` maps a field to the stamp ``(hlc, node)`` of the version the writer replaced
    (absent when the writer saw none); for a delete, the fields the deleter saw. ``lane``
    (the tier priority at write time, 0 = critical) and ``seq`` (the writing node's
    contiguous sequence number in that lane; 0 when not yet assigned) identify the change
    for exactly-once delivery.
    """

    cell: str
    collection: str
    key: str
    hlc: int
    node: str
    fields: Mapping[str, Any] | None
    base: Mapping[str, BaseStamp] = field(default_factory=dict)
    lane: int = 0
    seq: int = 0

    @property
    def is_delete(self) -> bool:
        return self.fields is None

    @property
    def stamp(self) -> Stamp:
        return (self.hlc, self.node)


@dataclass(frozen=True, kw_only=True, slots=True)
class Conflict:
    """A value that lost to a concurrent write. ``winner_deleted``: the winner was a delete."""

    cell: str
    collection: str
    key: str
    field: str
    winner_value: Any
    winner_hlc: int
    winner_node: str
    winner_deleted: bool
    loser_value: Any
    loser_hlc: int
    loser_node: str


class RecordState:
    """The mergeable state of one record. Mutated only by :func:`apply_change`."""

    __slots__ = ("fields", "hub", "tomb")

    def __init__(
        self,
        fields: dict[str, Entry] | None = None,
        tomb: Stamp | None = None,
        hub: dict[str, Entry] | None = None,
    ) -> None:
        self.fields: dict[str, Entry] = fields if fields is not None else {}
        self.tomb: Stamp | None = tomb
        # Only hub-wins collections use this: the hub-origin register of each field.
        self.hub: dict[str, Entry] = hub if hub is not None else {}

    def copy(self) -> RecordState:
        return RecordState(dict(self.fields), self.tomb, dict(self.hub))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RecordState) and self.to_bytes() == other.to_bytes()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"RecordState(fields={self.fields!r}, tomb={self.tomb!r}, hub={self.hub!r})"

    # -- views ----------------------------------------------------------------------------

    def _visible(self, entry: Entry) -> bool:
        return self.tomb is None or (entry[1], entry[2]) > self.tomb

    def document(self) -> dict[str, Any]:
        """The record as readers see it: visible fields only, hub-origin values first."""
        if self.tomb is None:
            doc = {name: e[0] for name, e in self.fields.items()}
        else:
            doc = {name: e[0] for name, e in self.fields.items() if self._visible(e)}
        for name, e in self.hub.items():
            if self._visible(e):
                doc[name] = e[0]
        return doc

    @property
    def deleted(self) -> bool:
        """True when the record has a tombstone and no field visible past it."""
        return self.tomb is not None and not self.document()

    @property
    def max_hlc(self) -> int:
        """The newest stamp in the state (fields or tombstone)."""
        newest = max([e[1] for e in self.fields.values()], default=0)
        if self.hub:
            newest = max(newest, *(e[1] for e in self.hub.values()))
        if self.tomb is not None:
            newest = max(newest, self.tomb[0])
        return newest

    # -- encoding -------------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        """Canonical msgpack: equal states give equal bytes on every replica."""
        # Keys in sorted order ("f" < "h" < "t"), built directly: this runs on every write.
        body: dict[str, Any] = {"f": _canonical_entries(self.fields)}
        if self.hub:
            body["h"] = _canonical_entries(self.hub)
        body["t"] = list(self.tomb) if self.tomb is not None else None
        return encode(body)

    @classmethod
    def view(cls, data: bytes) -> tuple[dict[str, Any], int]:
        """The :meth:`document` and :attr:`max_hlc` of the encoded state ``data``, built
        straight from the msgpack when it has no tombstone and no hub-origin field (most
        records): a bootstrap needs no more of a record than these."""
        try:
            raw = msgpack.unpackb(data, raw=False)
            if raw["t"] is None and not raw.get("h"):
                entries = raw["f"].values()
                doc = {name: e[0] for name, e in raw["f"].items()}
                return doc, max((e[1] for e in entries), default=0)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
            raise DecodeError(f"stored record state is unreadable: {exc}") from None
        state = cls.from_bytes(data)
        return state.document(), state.max_hlc

    @classmethod
    def from_bytes(cls, data: bytes) -> RecordState:
        try:
            raw = msgpack.unpackb(data, raw=False)
            fields = {k: (v[0], v[1], v[2]) for k, v in raw["f"].items()}
            tomb = (raw["t"][0], raw["t"][1]) if raw["t"] is not None else None
            hub = {k: (v[0], v[1], v[2]) for k, v in raw.get("h", {}).items()}
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            raise DecodeError(f"stored record state is unreadable: {exc}") from None
        return cls(fields, tomb, hub)


def _canonical_entries(entries: Mapping[str, Entry]) -> dict[str, Entry]:
    # An entry tuple packs as the array [value, hlc, node]; only a container value is
    # rebuilt (its maps ordered by key). Names are unique: sorting the items compares names.
    return {
        name: (canonical(e[0]), e[1], e[2]) if isinstance(e[0], _CONTAINERS) else e
        for name, e in sorted(entries.items())
    }


_CONTAINERS: Final = (dict, list, tuple)


@dataclass(frozen=True, slots=True)
class Applied:
    """What :func:`apply_change` did: the new state and the conflicts it found."""

    state: RecordState
    conflicts: list[Conflict]


# -- resolvers: pure functions combining the current entry with an incoming one -----------


def _number_order(v: Any) -> tuple[Any, bool, float]:
    # Equal numbers of different types or signs (1, 1.0; 0.0, -0.0) must pick the same one
    # everywhere, whatever arrived first: a total order int < -0.0 < +0.0.
    return (v, isinstance(v, float), math.copysign(1.0, v))


def _combine_max(cur: Entry, new: Entry) -> Entry:
    value = max(cur[0], new[0], key=_number_order)
    return (value, *max(cur[1:], new[1:]))


def _combine_min(cur: Entry, new: Entry) -> Entry:
    value = min(cur[0], new[0], key=_number_order)
    return (value, *max(cur[1:], new[1:]))


def _combine_sum(cur: Entry, new: Entry) -> Entry:
    return (cur[0] + new[0], *max(cur[1:], new[1:]))


#: Aggregating resolvers: name -> combine(current, incoming). ``lww`` and ``hub-wins`` are
#: not here because they keep one winner and prune under tombstones (see module docstring).
_AGGREGATES: Final[dict[str, Callable[[Entry, Entry], Entry]]] = {
    "max": _combine_max,
    "min": _combine_min,
    "counter": _combine_sum,
}

RESOLVERS: Final = frozenset({"lww", "hub-wins", *_AGGREGATES})


def _saw(change: Change, name: str, entry: Entry) -> bool:
    """Whether the writer of ``change`` had seen ``entry``, the version it replaces."""
    seen = change.base.get(name)
    if seen is None:
        return False
    if isinstance(seen, int):
        return seen == entry[1]
    return seen[0] == entry[1] and seen[1] == entry[2]


def base_stamps(raw: Mapping[str, Any]) -> dict[str, BaseStamp]:
    """A base as msgpack gives it back (stamps as lists), with stamps as tuples."""
    return {k: v if isinstance(v, int) else (v[0], v[1]) for k, v in raw.items()}


def _same_value(a: Any, b: Any) -> bool:
    if type(a) is type(b) and not isinstance(a, dict | list):
        return bool(a == b)
    return canonical_packb(a) == canonical_packb(b)


def apply_change(
    state: RecordState | None,
    change: Change,
    resolver: str = DEFAULT_RESOLVER,
    *,
    detect_conflicts: bool = False,
) -> Applied:
    """Fold ``change`` into ``state`` (which is not modified) and return the new state.

    With ``detect_conflicts``, also report every value that a concurrent write made lose
    (the hub sets it; edges leave conflict logging to the hub).
    """
    combine = _AGGREGATES.get(resolver)
    if combine is None and resolver not in RESOLVERS:
        raise ValidationError(
            f"unknown resolver {resolver!r}",
            hint=f"Use one of: {', '.join(sorted(RESOLVERS))}.",
            code="unknown_resolver",
        )
    if (
        state is None
        and change.fields is not None
        and not (resolver == "hub-wins" and change.node.startswith(HUB_NODE_PREFIX))
    ):
        # A record's first write (most writes a hub applies, all of a new edge's backlog):
        # under every resolver each field simply takes the incoming entry, and nothing lost.
        hlc, node = change.hlc, change.node
        return Applied(RecordState({n: (v, hlc, node) for n, v in change.fields.items()}), [])
    new = state.copy() if state is not None else RecordState()
    conflicts: list[Conflict] = []

    def conflict(name: str, winner: Entry, loser: Entry, winner_deleted: bool) -> None:
        conflicts.append(
            Conflict(
                cell=change.cell,
                collection=change.collection,
                key=change.key,
                field=name,
                winner_value=None if winner_deleted else winner[0],
                winner_hlc=winner[1],
                winner_node=winner[2],
                winner_deleted=winner_deleted,
                loser_value=loser[0],
                loser_hlc=loser[1],
                loser_node=loser[2],
            )
        )

    stamp = change.stamp
    if change.fields is None:
        if new.tomb is not None and stamp <= new.tomb:
            return Applied(new, conflicts)  # an older delete: the newer one already covers it
        new.tomb = stamp
        if combine is None:  # lww / hub-wins: entries at or before the tombstone are gone
            for register in (new.fields, new.hub):
                for name in [n for n, e in register.items() if (e[1], e[2]) <= stamp]:
                    entry = register.pop(name)
                    if detect_conflicts and not _saw(change, name, entry):
                        conflict(name, (None, *stamp), entry, True)
        return Applied(new, conflicts)

    for name, value in change.fields.items():
        incoming: Entry = (value, change.hlc, change.node)
        if combine is not None:
            cur = new.fields.get(name)
            new.fields[name] = incoming if cur is None else combine(cur, incoming)
            continue
        register = (
            new.hub
            if resolver == "hub-wins" and change.node.startswith(HUB_NODE_PREFIX)
            else new.fields
        )
        if new.tomb is not None and stamp <= new.tomb:
            if detect_conflicts:  # arrived already deleted: its value is lost
                conflict(name, (None, *new.tomb), incoming, True)
            continue
        cur = register.get(name)
        if cur is None:
            register[name] = incoming
            continue
        cur_stamp = (cur[1], cur[2])
        if stamp > cur_stamp:
            register[name] = incoming
            if detect_conflicts and not _saw(change, name, cur) and not _same_value(cur[0], value):
                conflict(name, incoming, cur, False)
        elif stamp < cur_stamp and detect_conflicts and not _same_value(cur[0], value):
            conflict(name, cur, incoming, False)
        # stamp == cur_stamp: the same write delivered again; nothing to do.
    return Applied(new, conflicts)


_JSON_TEXT: Final = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
)


def document_json(doc: Mapping[str, Any]) -> str:
    """The canonical JSON text of a document (sorted keys at every level, no spaces, UTF-8
    kept).

    orjson, a tenth of the standard encoder's cost (a bootstrap writes a document per
    record); the standard encoder for what orjson refuses (integers beyond 64 bits)."""
    try:
        return orjson.dumps(doc, option=orjson.OPT_SORT_KEYS).decode()
    except orjson.JSONEncodeError:
        return _JSON_TEXT.encode(doc)


# -- validation of what callers write --------------------------------------------------------


_COLLECTION = re.compile(rf"[A-Za-z0-9_.-]{{1,{MAX_COLLECTION_LENGTH}}}\Z")
_BAD_KEY_CHAR = re.compile("[\x00-\x1f\ud800-\udfff]")


def validate_collection(value: object) -> str:
    if not isinstance(value, str) or not _COLLECTION.match(value):
        # reprlib: a hostile value may be nested a thousand deep, past repr's recursion limit.
        shown = repr(value[:80]) if isinstance(value, str) else reprlib.repr(value)
        raise ValidationError(
            f"collection name {shown} is invalid",
            hint=f"Use 1..{MAX_COLLECTION_LENGTH} ASCII letters, digits, '_', '.', '-'.",
            code="invalid_collection",
        )
    return value


def validate_key(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ValidationError(
            "record key must be a non-empty string",
            code="invalid_key",
            detail={"key": reprlib.repr(value)},
        )
    if len(value) > MAX_KEY_LENGTH:
        raise ValidationError(
            f"record key is {len(value)} characters; at most {MAX_KEY_LENGTH} are allowed",
            hint="Use a short stable id (a UUID, a code) as the key and keep data in fields.",
            code="key_too_long",
            detail={"length": len(value), "max": MAX_KEY_LENGTH},
        )
    if _BAD_KEY_CHAR.search(value):
        raise ValidationError(
            "record key contains control characters or lone surrogates",
            code="invalid_key",
            detail={"key": value[:80]},
        )
    return value


def _check_value(value: Any, path: str, depth: int) -> int:
    """Check one value; return an upper bound of its msgpack size (cheap: exact sizes are
    computed only when the bound of a whole record exceeds its limit)."""
    # The common exact types first (every field of every pushed change passes here); their
    # subclasses and the containers go the long way below.
    kind = type(value)
    if kind is str and value.isascii():  # no lone surrogate in it; UTF-8 adds no bytes
        return 5 + len(value)
    if kind is int and _INT64_MIN <= value <= _INT64_MAX:
        return 9
    if kind is float and math.isfinite(value):
        return 9
    if value is None or isinstance(value, bool | str):
        if isinstance(value, str):
            try:
                return 5 + len(value.encode("utf-8"))
            except UnicodeEncodeError:
                raise ValidationError(
                    f"field {path!r} holds a string that is not valid Unicode (lone surrogate)",
                    code="invalid_value",
                ) from None
        return 1
    if isinstance(value, int):
        if not _INT64_MIN <= value <= _INT64_MAX:
            raise ValidationError(
                f"field {path!r} holds an integer outside the 64-bit range",
                hint="Store very large numbers as strings.",
                code="invalid_value",
            )
        return 9
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValidationError(
                f"field {path!r} holds {value}, which has no portable encoding",
                hint="Use null or a string for missing or infinite values.",
                code="invalid_value",
            )
        return 9
    if depth >= MAX_VALUE_DEPTH:
        raise ValidationError(
            f"field {path!r} is nested deeper than {MAX_VALUE_DEPTH} levels",
            code="invalid_value",
        )
    if isinstance(value, list | tuple):
        size = 5
        for i, v in enumerate(value):
            size += _check_value(v, f"{path}[{i}]", depth + 1)
        return size
    if isinstance(value, dict):
        size = 5
        for k, v in value.items():
            if not isinstance(k, str):
                raise ValidationError(
                    f"field {path!r} has a map key of type {type(k).__name__}; keys must be strings",
                    code="invalid_value",
                )
            size += 5 + 4 * len(k) + _check_value(v, f"{path}.{k}", depth + 1)
        return size
    raise ValidationError(
        f"field {path!r} holds a {type(value).__name__}, which cannot be stored",
        hint="Values are null, booleans, numbers, strings, lists and maps with string keys;"
        " encode binary data as base64 text.",
        code="unencodable_value",
    )


def validate_fields(
    fields: object, *, resolver: str = DEFAULT_RESOLVER, max_bytes: int | None = None
) -> dict[str, Any]:
    """Check a put's fields; return them as a dict. Raises :class:`ValidationError` or
    :class:`LimitExceededError` (record larger than ``max_bytes`` once encoded)."""
    if type(fields) is not dict and not isinstance(fields, Mapping):  # dict: skip the slow ABC
        raise ValidationError(
            f"fields must be a map of field name to value, got {type(fields).__name__}",
            code="invalid_value",
        )
    if not fields:
        raise ValidationError(
            "a put needs at least one field",
            hint="Use delete to remove a record.",
            code="empty_put",
        )
    bound = 5  # an upper bound of the record's encoded size
    aggregate = resolver in _AGGREGATES
    for name, value in fields.items():
        if not isinstance(name, str) or not 0 < len(name) <= MAX_FIELD_NAME_LENGTH:
            raise ValidationError(
                f"field name {str(name)[:80]!r} must be a string of 1..{MAX_FIELD_NAME_LENGTH} chars",
                code="invalid_field_name",
            )
        bound += 5 + 4 * len(name) + _check_value(value, name, 0)
        if aggregate:
            numeric = isinstance(value, int | float) and not isinstance(value, bool)
            if not numeric or (resolver == "counter" and not isinstance(value, int)):
                kind = "integer increments" if resolver == "counter" else "numbers"
                raise ValidationError(
                    f"field {name!r} of a {resolver!r} collection must hold {kind}, got {value!r:.40}",
                    code="invalid_value",
                )
    out = dict(fields)
    if max_bytes is not None and bound > max_bytes:
        size = len(encode(out))  # the encoded size does not depend on key order
        if size > max_bytes:
            raise LimitExceededError(
                f"record of {size} bytes exceeds the limit of {max_bytes} bytes",
                hint="Split the record, or raise max_record_bytes in the config.",
                code="record_too_large",
                detail={"bytes": size, "max": max_bytes},
            )
    return out
