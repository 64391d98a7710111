"""Hybrid logical clock: 48 bits of wall-clock milliseconds and 16 bits of counter.

A stamp is one 64-bit integer, ``ms << 16 | counter``, so stamps compare as integers and the
counter carries into the millisecond field when it overflows: 65,536 stamps in one
millisecond borrow the next millisecond instead of wrapping. Ties between nodes are broken
by ``(hlc, node_id)``, which every replica evaluates the same way.

The clock never goes backwards: not when the wall clock is set back, and not across restarts,
because the store persists the high-water mark and hands it back through ``observe_local``.
A remote stamp more than ``max_drift_ms`` ahead of our wall clock is refused, never folded in:
one node with a clock a year ahead must not drag every replica's stamps a year forward.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from syncengine.errors import ClockDriftError, ValidationError

__all__ = [
    "COUNTER_BITS",
    "DEFAULT_MAX_DRIFT_MS",
    "MAX_HLC",
    "HybridClock",
    "hlc_counter",
    "hlc_millis",
    "make_hlc",
    "validate_hlc",
]

COUNTER_BITS = 16
_COUNTER_MASK = (1 << COUNTER_BITS) - 1
#: Stamps must fit PostgreSQL's signed BIGINT.
MAX_HLC = (1 << 63) - 1
DEFAULT_MAX_DRIFT_MS = 5 * 60 * 1000


def make_hlc(millis: int, counter: int = 0) -> int:
    """Build a stamp from wall-clock milliseconds and a counter (0..65535)."""
    if not 0 <= counter <= _COUNTER_MASK:
        raise ValueError(f"counter {counter} out of range 0..{_COUNTER_MASK}")
    return (millis << COUNTER_BITS) | counter


def hlc_millis(hlc: int) -> int:
    """The wall-clock milliseconds part of a stamp."""
    return hlc >> COUNTER_BITS


def hlc_counter(hlc: int) -> int:
    """The counter part of a stamp."""
    return hlc & _COUNTER_MASK


def validate_hlc(value: object) -> int:
    """Check that ``value`` is a usable stamp (an int in 1..MAX_HLC, not a bool)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= MAX_HLC:
        raise ValidationError(
            f"hlc must be an integer in 1..2^63-1, got {value!r:.40}",
            code="invalid_hlc",
        )
    return value


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


class HybridClock:
    """A node's hybrid logical clock.

    ``wall`` returns milliseconds since the Unix epoch; tests inject their own. Thread-safe:
    the edge store issues stamps on its SQLite thread while the sync layer folds the hub's
    stamps in from the event loop, and a lost update would let the clock step back.
    """

    __slots__ = ("_last", "_lock", "max_drift_ms", "wall")

    def __init__(
        self,
        *,
        wall: Callable[[], int] = _wall_ms,
        max_drift_ms: int = DEFAULT_MAX_DRIFT_MS,
        high_water: int = 0,
    ) -> None:
        self.wall = wall
        self.max_drift_ms = max_drift_ms
        self._last = high_water
        self._lock = threading.Lock()

    @property
    def last(self) -> int:
        """The highest stamp issued or observed: the value to persist as the high-water mark."""
        return self._last

    def now(self) -> int:
        """A new stamp, strictly greater than every stamp issued or observed before."""
        candidate = make_hlc(self.wall())
        with self._lock:
            # +1 on the packed integer is the overflow rule: a full counter carries into the ms.
            self._last = candidate if candidate > self._last else self._last + 1
            return self._last

    def observe(self, remote: int) -> None:
        """Fold a stamp received from another node (or the hub) into this clock.

        Raises :class:`ClockDriftError` when ``remote`` is more than ``max_drift_ms`` ahead of
        the local wall clock; the clock is then unchanged.
        """
        ahead_ms = hlc_millis(remote) - self.wall()
        if ahead_ms > self.max_drift_ms:
            raise ClockDriftError(
                f"stamp is {ahead_ms / 1000:.1f} s ahead of this clock "
                f"(allowed {self.max_drift_ms / 1000:.0f} s)",
                detail={"hlc": remote, "ahead_ms": ahead_ms, "max_drift_ms": self.max_drift_ms},
            )
        with self._lock:
            self._last = max(self._last, remote)

    def observe_local(self, high_water: int) -> None:
        """Restore a persisted high-water mark. Never refused: these stamps were our own."""
        with self._lock:
            self._last = max(self._last, high_water)

    def drift_ms(self, remote: int) -> int:
        """How far ``remote`` is ahead (positive) or behind (negative) the wall clock."""
        return hlc_millis(remote) - self.wall()
