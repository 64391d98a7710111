"""The sync protocol's messages: what travels between an edge and its hub, and its checks.

Bodies are msgpack maps (zstd-compressed when that pays; see :mod:`syncengine.codec`).
Links are metered, so the encoding is compact without being clever: cell ids and collection
names are sent once per message in a table and referenced by index, a push's seqs are
implicit (``first..last`` minus ``skipped``), and stamps are delta-coded against the previous
change. zstd then removes most of the repetition in field names and values.

Push (``POST /v1/push``)::

    {v: 1, node, lane, first, last, skipped: [seq…], cells: [str…], colls: [str…],
     changes: [[cell_i, coll_i, key, hlc_delta, fields | nil, base | nil], …]}

Answer: ``{acked, lane, applied, conflicts, hub_hlc}``.

Pull page (``GET /v1/pull``)::

    {v: 1, next, head, more, hub_hlc, cells, colls, nodes,
     changes: [[id_delta, node_i, lane, seq, cell_i, coll_i, key, hlc_delta, fields | nil,
                base | nil], …]}

``id`` is the change's position in the hub's feed (delta-coded like stamps). ``base`` maps
each field the writer replaced to the stamp ``[hlc, node]`` of the version it saw (a bare
hlc, as older edges send it, is still accepted).

Decoding validates every field: types, ranges, unknown keys, cell ids, keys, values, and the
seq arithmetic of a push. Anything wrong raises a typed :class:`InvalidInputError` whose
``detail`` names the offending change's seq when there is one, so the edge can dead-letter
exactly that change.
"""

from __future__ import annotations

import re
import reprlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from syncengine import steps
from syncengine.cells import parse_cell
from syncengine.clock import validate_hlc
from syncengine.codec import DEFAULT_LIMITS, Limits, compress, decode, decompress, encode
from syncengine.errors import DecodeError, InvalidInputError, LimitExceededError, SyncError
from syncengine.merge import (
    BaseStamp,
    Change,
    base_stamps,
    validate_collection,
    validate_fields,
    validate_key,
)

__all__ = [
    "CURSOR_BEHIND_HORIZON",
    "DEFAULT_MAX_BATCH_CHANGES",
    "NODE_ID_PATTERN",
    "PROTOCOL_VERSION",
    "PullPage",
    "PushAnswer",
    "PushBatch",
    "SnapshotPage",
    "decode_body",
    "decode_pull_page",
    "decode_push",
    "decode_push_answer",
    "decode_snapshot_page",
    "encode_body",
    "encode_pull_page",
    "encode_push",
    "encode_push_answer",
    "encode_snapshot_page",
    "validate_node_id",
]

PROTOCOL_VERSION: Final = 1
DEFAULT_MAX_BATCH_CHANGES: Final = 5000
#: Most changes one ``GET /v1/pull`` page holds.
MAX_PULL_LIMIT: Final = 5000
#: Most records one ``GET /v1/records`` names.
MAX_RECORD_KEYS: Final = 500
#: The error code of a pull whose cursor is behind the feed's retention horizon: the edge
#: re-bootstraps from a snapshot.
CURSOR_BEHIND_HORIZON: Final = "cursor_behind_horizon"
NODE_ID_PATTERN: Final = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}\Z")
_MAX_SEQ: Final = (1 << 63) - 1
_LANES: Final = 4


@dataclass(frozen=True, kw_only=True, slots=True)
class PushBatch:
    """One lane's run of changes from one node. ``changes`` and ``skipped`` together cover
    ``first_seq..last_seq`` exactly."""

    node: str
    lane: int
    first_seq: int
    last_seq: int
    skipped: list[int] = field(default_factory=list)
    changes: list[Change] = field(default_factory=list)


@dataclass(frozen=True, kw_only=True, slots=True)
class PushAnswer:
    acked: int
    lane: int
    applied: int
    conflicts: int
    hub_hlc: int


@dataclass(frozen=True, kw_only=True, slots=True)
class PullPage:
    """Changes after a cursor. ``ids[i]`` is the feed position of ``changes[i]``."""

    changes: list[Change]
    ids: list[int]
    next_cursor: int
    head: int
    more: bool
    hub_hlc: int
    #: Watched tiers (``watch=`` of a long-poll) with nothing for the node up to the given
    #: cursor: the edge may move its cursor there without a pull.
    watched: dict[int, int] = field(default_factory=dict)
    #: Watched tiers holding changes for the node (or not scanned to the end): pull them.
    due: list[int] = field(default_factory=list)
    #: The hub's config tag (``tag=`` of the request): a new one means the edge should
    #: learn the config again.
    cfg: str | None = None


# -- helpers ----------------------------------------------------------------------------------


def _bad(message: str, *, code: str = "invalid_value", **detail: Any) -> InvalidInputError:
    return InvalidInputError(message, code=code, detail=detail)


def _int(obj: Mapping[str, Any], name: str, lo: int, hi: int) -> int:
    value = obj.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        # reprlib: a hostile value may be nested a thousand deep, past repr's recursion limit.
        raise _bad(
            f"{name!r} must be an integer in {lo}..{hi}, got {reprlib.repr(value)}", field=name
        )
    return value


def _str_table(obj: Mapping[str, Any], name: str, check: Any) -> list[str]:
    table = obj.get(name)
    if not isinstance(table, list):
        raise _bad(f"{name!r} must be a list of strings", field=name)
    return [check(v) for v in table]


def _check_version(version: object, speaks: str) -> None:
    if type(version) is not int or version != PROTOCOL_VERSION:  # not true, not 1.0
        raise InvalidInputError(
            f"protocol version {reprlib.repr(version)} is not supported ({speaks})",
            hint="Run the same syncengine release on the hub and the edges (hubs first).",
            code="unsupported_version",
        )


def _only_keys(
    obj: object, allowed: frozenset[str], what: str, *, optional: frozenset[str] = frozenset()
) -> Mapping[str, Any]:
    if not isinstance(obj, dict):
        raise DecodeError(f"{what} must be a msgpack map, got {type(obj).__name__}")
    unknown = set(obj) - allowed
    if unknown:
        raise _bad(
            f"{what} has unknown fields: {', '.join(sorted(map(str, unknown)))[:200]}",
            code="unknown_field",
            fields=sorted(map(str, unknown))[:20],
        )
    missing = allowed - set(obj) - optional - {"skipped"}
    if missing:
        raise _bad(f"{what} lacks fields: {', '.join(sorted(missing))}", code="missing_field")
    return obj


def validate_node_id(value: object) -> str:
    if not isinstance(value, str) or not NODE_ID_PATTERN.match(value):
        shown = repr(value[:80]) if isinstance(value, str) else reprlib.repr(value)
        raise _bad(
            f"node id {shown} is invalid: use 1..64 of [a-z0-9_.-], "
            "starting with a letter or digit",
            code="invalid_node_id",
        )
    return value


def _index(table: Sequence[str], i: object, what: str, seq: int) -> str:
    if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(table):
        raise _bad(f"change {seq}: {what} index {reprlib.repr(i)} out of range", seq=seq)
    return table[i]


def _base_stamp(value: object) -> bool:
    """``[hlc, node]``, or a bare hlc (sent by edges from before bases named the node)."""
    if isinstance(value, list) and len(value) == 2:
        hlc, node = value
        return _base_hlc(hlc) and isinstance(node, str) and 0 < len(node) <= 128
    return _base_hlc(value)


def _base_hlc(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= _MAX_SEQ


def _base(value: object, seq: int) -> dict[str, BaseStamp]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and _base_stamp(v) for k, v in value.items()
    ):
        raise _bad(f"change {seq}: base must map field names to stamps", seq=seq)
    return base_stamps(value)


def _hlc_chain(prev: int, delta: object, seq: int) -> int:
    if isinstance(delta, bool) or not isinstance(delta, int):
        raise _bad(f"change {seq}: hlc must be an integer", code="invalid_hlc", seq=seq)
    try:
        return validate_hlc(prev + delta)
    except SyncError as exc:
        exc.detail["seq"] = seq
        raise


def _tables(changes: Sequence[Change]) -> tuple[dict[str, int], dict[str, int]]:
    cells: dict[str, int] = {}
    colls: dict[str, int] = {}
    for c in changes:
        cells.setdefault(c.cell, len(cells))
        colls.setdefault(c.collection, len(colls))
    return cells, colls


# -- push -------------------------------------------------------------------------------------

_PUSH_KEYS: Final = frozenset(
    {"v", "node", "lane", "first", "last", "skipped", "cells", "colls", "changes"}
)


def encode_push(batch: PushBatch) -> dict[str, Any]:
    cells, colls = _tables(batch.changes)
    rows = []
    prev = 0
    for c in batch.changes:
        rows.append(
            [
                cells[c.cell],
                colls[c.collection],
                c.key,
                c.hlc - prev,
                c.fields,
                dict(c.base) or None,
            ]
        )
        prev = c.hlc
    return {
        "v": PROTOCOL_VERSION,
        "node": batch.node,
        "lane": batch.lane,
        "first": batch.first_seq,
        "last": batch.last_seq,
        "skipped": batch.skipped,
        "cells": list(cells),
        "colls": list(colls),
        "changes": rows,
    }


def decode_push(
    obj: object,
    *,
    max_changes: int = DEFAULT_MAX_BATCH_CHANGES,
    max_record_bytes: int | None = None,
) -> PushBatch:
    """Validate a decoded push body and rebuild the batch.

    Raises :class:`InvalidInputError` (a subclass names the problem) with the offending seq in
    ``detail["seq"]`` when one change is at fault, :class:`LimitExceededError` for batches over
    ``max_changes``.
    """
    return steps.run(
        decode_push_steps(obj, max_changes=max_changes, max_record_bytes=max_record_bytes)
    )


#: :func:`decode_push_steps` pauses after this many changes.
DECODE_STEP: Final = 64


def decode_push_steps(
    obj: object,
    *,
    max_changes: int = DEFAULT_MAX_BATCH_CHANGES,
    max_record_bytes: int | None = None,
) -> steps.Steps[PushBatch]:
    """:func:`decode_push` in steps (:mod:`syncengine.steps`) of :data:`DECODE_STEP`
    changes, so that a server can decode a large batch between other work (the hub's
    event loop)."""
    msg = _only_keys(obj, _PUSH_KEYS, "push")
    _check_version(msg["v"], f"this hub speaks {PROTOCOL_VERSION}")
    node = validate_node_id(msg["node"])
    lane = _int(msg, "lane", 0, 3)
    first = _int(msg, "first", 1, _MAX_SEQ)
    last = _int(msg, "last", first, _MAX_SEQ)
    rows = msg["changes"]
    skipped = msg.get("skipped", [])
    if not isinstance(rows, list) or not isinstance(skipped, list):
        raise _bad("'changes' and 'skipped' must be lists")
    if len(rows) > max_changes:
        raise LimitExceededError(
            f"batch of {len(rows)} changes exceeds the limit of {max_changes}",
            code="batch_too_large",
            detail={"changes": len(rows), "max": max_changes},
        )
    if any(isinstance(s, bool) or not isinstance(s, int) for s in skipped) or skipped != sorted(
        set(skipped)
    ):
        raise _bad("'skipped' must be strictly increasing seqs", code="invalid_seq")
    if skipped and not (first <= skipped[0] and skipped[-1] <= last):
        raise _bad("'skipped' seqs must lie within first..last", code="invalid_seq")
    if last - first + 1 != len(rows) + len(skipped):
        raise _bad(
            f"seq range {first}..{last} holds {last - first + 1} seqs, but the batch has "
            f"{len(rows)} changes and {len(skipped)} skipped",
            code="invalid_seq",
            first=first,
            last=last,
        )
    cells = _str_table(msg, "cells", parse_cell)
    colls = _str_table(msg, "colls", validate_collection)
    skip = set(skipped)
    changes: list[Change] = []
    seq = first
    prev = 0
    for row in rows:
        while seq in skip:
            seq += 1
        if not isinstance(row, list) or len(row) != 6:
            raise _bad(f"change {seq} must be a list of 6 items", seq=seq)
        cell_i, coll_i, key, delta, fields, base = row
        try:
            hlc = _hlc_chain(prev, delta, seq)
            change = Change(
                cell=_index(cells, cell_i, "cell", seq),
                collection=_index(colls, coll_i, "collection", seq),
                key=validate_key(key),
                hlc=hlc,
                node=node,
                fields=None
                if fields is None
                else validate_fields(fields, max_bytes=max_record_bytes),
                base=_base(base, seq),
                lane=lane,
                seq=seq,
            )
        except SyncError as exc:
            exc.detail.setdefault("seq", seq)
            raise
        changes.append(change)
        prev = hlc
        seq += 1
        if len(changes) % DECODE_STEP == 0:
            yield
    return PushBatch(
        node=node, lane=lane, first_seq=first, last_seq=last, skipped=skipped, changes=changes
    )


def encode_push_answer(answer: PushAnswer) -> dict[str, Any]:
    return {
        "acked": answer.acked,
        "lane": answer.lane,
        "applied": answer.applied,
        "conflicts": answer.conflicts,
        "hub_hlc": answer.hub_hlc,
    }


def decode_push_answer(obj: object) -> PushAnswer:
    msg = _only_keys(obj, frozenset({"acked", "lane", "applied", "conflicts", "hub_hlc"}), "answer")
    return PushAnswer(
        acked=_int(msg, "acked", 0, _MAX_SEQ),
        lane=_int(msg, "lane", 0, 3),
        applied=_int(msg, "applied", 0, _MAX_SEQ),
        conflicts=_int(msg, "conflicts", 0, _MAX_SEQ),
        hub_hlc=_int(msg, "hub_hlc", 0, _MAX_SEQ),
    )


# -- pull -------------------------------------------------------------------------------------

_PULL_KEYS: Final = frozenset(
    {"v", "next", "head", "more", "hub_hlc", "cells", "colls", "nodes", "changes"}
)
_PULL_OPTIONAL: Final = frozenset({"watched", "due", "cfg"})


def encode_pull_page(page: PullPage) -> dict[str, Any]:
    cells, colls = _tables(page.changes)
    nodes: dict[str, int] = {}
    rows = []
    prev = prev_id = 0
    for feed_id, c in zip(page.ids, page.changes, strict=True):
        node_i = nodes.setdefault(c.node, len(nodes))
        rows.append(
            [
                feed_id - prev_id,
                node_i,
                c.lane,
                c.seq,
                cells[c.cell],
                colls[c.collection],
                c.key,
                c.hlc - prev,
                c.fields,
                dict(c.base) or None,
            ]
        )
        prev = c.hlc
        prev_id = feed_id
    out: dict[str, Any] = {
        "v": PROTOCOL_VERSION,
        "next": page.next_cursor,
        "head": page.head,
        "more": page.more,
        "hub_hlc": page.hub_hlc,
        "cells": list(cells),
        "colls": list(colls),
        "nodes": list(nodes),
        "changes": rows,
    }
    # Only for requests that asked (watch=, tag=): older edges refuse unknown fields.
    if page.watched:
        out["watched"] = [[t, c] for t, c in sorted(page.watched.items())]
    if page.due:
        out["due"] = page.due
    if page.cfg is not None:
        out["cfg"] = page.cfg
    return out


def decode_pull_page(obj: object) -> PullPage:
    """Validate a pull page from the hub. The hub is trusted less than fully: a page that
    does not parse is refused whole, so the cursor never moves past unapplied changes."""
    msg = _only_keys(obj, _PULL_KEYS | _PULL_OPTIONAL, "pull page", optional=_PULL_OPTIONAL)
    _check_version(msg["v"], f"this edge speaks {PROTOCOL_VERSION}")
    cells = _str_table(msg, "cells", parse_cell)
    colls = _str_table(msg, "colls", validate_collection)
    nodes = _str_table(msg, "nodes", validate_node_id)
    rows = msg["changes"]
    if not isinstance(rows, list):
        raise _bad("'changes' must be a list")
    changes = []
    ids = []
    prev = prev_id = 0
    for row in rows:
        if not isinstance(row, list) or len(row) != 10:
            raise _bad("pull change must be a list of 10 items")
        id_delta, node_i, lane, seq, cell_i, coll_i, key, delta, fields, base = row
        if isinstance(id_delta, bool) or not isinstance(id_delta, int) or id_delta <= 0:
            raise _bad("pull change ids must increase")
        prev_id += id_delta
        ids.append(prev_id)
        hlc = _hlc_chain(prev, delta, seq if isinstance(seq, int) else 0)
        changes.append(
            Change(
                cell=_index(cells, cell_i, "cell", seq),
                collection=_index(colls, coll_i, "collection", seq),
                key=validate_key(key),
                hlc=hlc,
                node=_index(nodes, node_i, "node", seq),
                fields=None if fields is None else validate_fields(fields),
                base=_base(base, seq),
                lane=_int({"lane": lane}, "lane", 0, 3),
                seq=_int({"seq": seq}, "seq", 0, _MAX_SEQ),
            )
        )
        prev = hlc
    more = msg["more"]
    if not isinstance(more, bool):
        raise _bad("'more' must be a boolean")
    watched: dict[int, int] = {}
    for pair in msg.get("watched", []):
        if not (isinstance(pair, list) and len(pair) == 2):
            raise _bad("'watched' must be a list of [tier, cursor] pairs")
        watched[_int({"tier": pair[0]}, "tier", 0, 3)] = _int({"c": pair[1]}, "c", 0, _MAX_SEQ)
    due = msg.get("due", [])
    if not isinstance(due, list):
        raise _bad("'due' must be a list of tiers")
    cfg = msg.get("cfg")
    if cfg is not None and not (isinstance(cfg, str) and 0 < len(cfg) <= 64):
        raise _bad("'cfg' must be a short string")
    return PullPage(
        changes=changes,
        ids=ids,
        next_cursor=_int(msg, "next", 0, _MAX_SEQ),
        head=_int(msg, "head", 0, _MAX_SEQ),
        more=more,
        hub_hlc=_int(msg, "hub_hlc", 0, _MAX_SEQ),
        watched=watched,
        due=[_int({"tier": t}, "tier", 0, 3) for t in due],
        cfg=cfg,
    )


# -- bodies -----------------------------------------------------------------------------------


def encode_body(obj: Any, *, allow_zstd: bool = True) -> tuple[bytes, str | None]:
    """msgpack-encode ``obj`` and compress it when that pays and the peer accepts zstd.
    Returns ``(body, content_encoding)``."""
    data = encode(obj)
    return compress(data) if allow_zstd else (data, None)


def decode_body(body: bytes, encoding: str | None, limits: Limits = DEFAULT_LIMITS) -> Any:
    """Undo :func:`encode_body` with every size limit of ``limits`` enforced.

    The result must go through :func:`decode_push` or :func:`decode_pull_page` (or be
    checked as strictly): they validate every key, type and nesting level, which makes the
    codec's generic shape walk redundant here.
    """
    return decode(decompress(body, encoding, limits), limits, check_shape=False)


# -- snapshot ---------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class SnapshotPage:
    """One page of a cell prefix's records, in ``(cell, collection, key)`` order.

    ``records`` are ``(cell, collection, key, state, feed_id)``: the canonical merge state and
    the last feed entry folded into it. ``cursor`` is the feed head when the snapshot began:
    after the last page, pull from it, skipping for each record the feed entries at or
    below its ``feed_id``. ``next`` resumes the snapshot (None after the last page).
    ``acked[lane]`` is the asking node's highest seq applied, read with the records: they
    hold exactly that node's changes up to it.

    ``GET /v1/records`` answers with the same message (one page, ``next`` nil).
    """

    records: list[tuple[str, str, str, bytes, int]]
    cursor: int
    next: str | None
    acked: list[int] = field(default_factory=lambda: [0, 0, 0, 0])


def encode_snapshot_page(page: SnapshotPage) -> dict[str, Any]:
    return {
        "v": PROTOCOL_VERSION,
        "cursor": page.cursor,
        "next": page.next,
        "acked": list(page.acked),
        "records": [list(r) for r in page.records],
    }


def decode_snapshot_page(obj: object) -> SnapshotPage:
    msg = _only_keys(obj, frozenset({"v", "cursor", "next", "acked", "records"}), "snapshot page")
    rows = msg["records"]
    nxt = msg["next"]
    acked = msg["acked"]
    if not isinstance(rows, list) or not (nxt is None or isinstance(nxt, str)):
        raise _bad("snapshot page: 'records' must be a list and 'next' a string or nil")
    if not (
        isinstance(acked, list)
        and len(acked) == _LANES
        and all(type(a) is int and 0 <= a <= _MAX_SEQ for a in acked)
    ):
        raise _bad(f"snapshot page: 'acked' must be {_LANES} seqs, one per lane")
    records = []
    # A page holds a few collections many times over: each is checked once (parse_cell
    # remembers valid cells itself).
    collections: set[str] = set()
    for row in rows:
        if not isinstance(row, list) or len(row) != 5 or not isinstance(row[3], bytes):
            raise _bad("snapshot record must be [cell, collection, key, state, feed_id]")
        cell, coll, key, state, feed_id = row
        if not (type(coll) is str and coll in collections):
            collections.add(validate_collection(coll))
        if type(feed_id) is not int or not 0 <= feed_id <= _MAX_SEQ:
            _int({"feed_id": feed_id}, "feed_id", 0, _MAX_SEQ)  # raises the error
        records.append((parse_cell(cell), coll, validate_key(key), state, feed_id))
    return SnapshotPage(
        records=records, cursor=_int(msg, "cursor", 0, _MAX_SEQ), next=nxt, acked=acked
    )
