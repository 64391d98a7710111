"""Cell ids: the hierarchical partition keys of replication, tiering and access.

A cell id is ``region/segment/...``, e.g. ``west/ng/lagos/clinic-12``. Its first segment is the
home region. Prefixes match on whole segments only: ``west/ng/lagos/clinic-1`` covers
``west/ng/lagos/clinic-1/alerts`` but not ``west/ng/lagos/clinic-12``.
"""

from __future__ import annotations

import re
import reprlib
from collections.abc import Iterable

from syncengine.errors import ValidationError

__all__ = [
    "MAX_CELL_DEPTH",
    "MAX_CELL_LENGTH",
    "MAX_SEGMENT_LENGTH",
    "REGION_CODES",
    "covers",
    "covers_any",
    "home_region",
    "parse_cell",
    "parse_prefix",
]

#: The five hub regions. ``regions/*.toml`` describes each one; this set is what cell ids
#: are checked against, so the pure core needs no file I/O.
REGION_CODES = frozenset({"west", "east", "southern", "north", "central"})

MAX_CELL_LENGTH = 255
MAX_SEGMENT_LENGTH = 64
MAX_CELL_DEPTH = 16

_SEGMENT = re.compile(r"[a-z0-9_-]+\Z")


def _check(value: object, *, what: str, min_depth: int) -> str:
    if not isinstance(value, str):
        raise ValidationError(
            f"{what} must be a string, got {type(value).__name__}",
            detail={"cell": reprlib.repr(value)},  # bounded: may be nested 1,000 deep
        )
    hint = "Use lowercase segments of [a-z0-9_-] separated by '/', e.g. west/ng/lagos/clinic-12."
    if not value or len(value) > MAX_CELL_LENGTH:
        raise ValidationError(
            f"{what} must be 1..{MAX_CELL_LENGTH} characters, got {len(value)}",
            hint=hint,
            detail={"cell": value[:80]},
            code="invalid_cell",
        )
    segments = value.split("/")
    if len(segments) > MAX_CELL_DEPTH or len(segments) < min_depth:
        raise ValidationError(
            f"{what} {value!r} has {len(segments)} segments; allowed {min_depth}..{MAX_CELL_DEPTH}",
            hint=hint,
            detail={"cell": value},
            code="invalid_cell",
        )
    for seg in segments:
        if (
            not seg
            or seg in (".", "..")
            or len(seg) > MAX_SEGMENT_LENGTH
            or not _SEGMENT.match(seg)
        ):
            raise ValidationError(
                f"{what} {value!r} has an invalid segment {seg!r}",
                hint=hint,
                detail={"cell": value, "segment": seg},
                code="invalid_cell",
            )
    if segments[0] not in REGION_CODES:
        raise ValidationError(
            f"{what} {value!r} does not start with a region code",
            hint=f"The first segment is the home region: one of {', '.join(sorted(REGION_CODES))}.",
            detail={"cell": value, "region": segments[0]},
            code="invalid_cell",
        )
    return value


def parse_cell(value: object) -> str:
    """Validate a cell id and return it. Raises :class:`ValidationError` (code ``invalid_cell``).

    A cell has at least two segments: the home region and one below it.
    """
    if isinstance(value, str) and value in _VALID_CELLS:
        return value
    _check(value, what="cell id", min_depth=2)
    assert isinstance(value, str)
    if len(_VALID_CELLS) >= _VALID_CELLS_MAX:
        _VALID_CELLS.clear()  # bounded; cells repeat, so it refills with the hot ones
    _VALID_CELLS.add(value)
    return value


# Every write validates its cell; a process sees few distinct cells, so remember valid ones.
_VALID_CELLS: set[str] = set()
_VALID_CELLS_MAX = 65_536


def parse_prefix(value: object) -> str:
    """Validate a cell prefix (a grant or subscription); a bare region code is allowed."""
    return _check(value, what="cell prefix", min_depth=1)


def home_region(cell: str) -> str:
    """The region code a cell belongs to: its first segment."""
    return cell.split("/", 1)[0]


def covers(prefix: str, cell: str) -> bool:
    """True when ``cell`` is ``prefix`` or below it, on segment boundaries."""
    return cell == prefix or (cell.startswith(prefix) and cell[len(prefix)] == "/")


def covers_any(prefixes: Iterable[str], cell: str) -> bool:
    """True when any of ``prefixes`` covers ``cell``."""
    return any(covers(p, cell) for p in prefixes)
