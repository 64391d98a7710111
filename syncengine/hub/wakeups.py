"""Which held long-polls a push concerns.

A long-poll waits for changes of some tiers under some cell prefixes. A push that lands
wakes only the long-polls whose prefixes cover one of the cells it wrote, in one of its
tiers: each woken poll re-reads the feed, and a region's thousand edges re-reading the
feed for every push (about a hundred a second) is more work than the pushes themselves.

Waiters are indexed by prefix. A cell ``a/b/c`` is covered by the prefixes ``a``, ``a/b`` and
``a/b/c`` only (prefixes end on segment boundaries), so a push costs one dictionary look-up
per segment of each distinct cell it wrote, whatever the number of waiters.

What a push wrote is a :data:`Changed`: per tier, the cells, or ``None`` for "any cell" (a
wake-up from another hub process that named no cells, or more than it could carry).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Final

__all__ = ["MAX_CELLS_ANNOUNCED", "Changed", "Waiter", "Wakeups", "ancestors"]

#: Per tier, the cells a push wrote (``None``: any cell of that tier).
Changed = Mapping[int, frozenset[str] | None]

#: A push naming more cells than this is announced to other hub processes by its tiers
#: alone (every long-poll of those tiers re-reads): the message stays small.
MAX_CELLS_ANNOUNCED: Final = 64


def ancestors(cell: str) -> Iterator[str]:
    """``cell`` and every prefix of it that ends on a segment boundary, shortest first."""
    at = cell.find("/")
    while at != -1:
        yield cell[:at]
        at = cell.find("/", at + 1)
    yield cell


class Waiter:
    """One held long-poll: its node, tiers and prefixes, and the event a concerning push
    sets."""

    __slots__ = ("event", "node", "prefixes", "tiers")

    def __init__(
        self, tiers: frozenset[int], prefixes: frozenset[str], node: str | None = None
    ) -> None:
        self.tiers = tiers
        self.prefixes = prefixes
        self.node = node
        self.event = asyncio.Event()


class Wakeups:
    """The held long-polls of one hub process, indexed by prefix."""

    def __init__(self) -> None:
        self._by_prefix: dict[str, set[Waiter]] = {}
        self._all: set[Waiter] = set()

    def __len__(self) -> int:
        return len(self._all)

    @contextmanager
    def waiting(
        self, tiers: Iterable[int], prefixes: Iterable[str], *, node: str | None = None
    ) -> Iterator[Waiter]:
        """Register a long-poll of ``node`` for as long as the block runs. Register before
        the first read: a push that lands between the read and the wait still sets the
        event."""
        waiter = Waiter(frozenset(tiers), frozenset(prefixes), node)
        self._all.add(waiter)
        for prefix in waiter.prefixes:
            self._by_prefix.setdefault(prefix, set()).add(waiter)
        try:
            yield waiter
        finally:
            self._all.discard(waiter)
            for prefix in waiter.prefixes:
                held = self._by_prefix.get(prefix)
                if held is not None:
                    held.discard(waiter)
                    if not held:
                        del self._by_prefix[prefix]

    def wake(self, changed: Changed | None, *, writer: str | None = None) -> int:
        """Set the event of every waiter ``changed`` concerns (``None``: every waiter);
        return how many were woken. The long-polls of ``writer``, the node whose push
        ``changed`` is, sleep on: a node's pages leave out its own changes, and every push
        would otherwise wake its own poll for nothing."""
        if changed is None:
            for waiter in self._all:
                waiter.event.set()
            return len(self._all)
        woken = 0
        for tier, cells in changed.items():
            if cells is None:
                candidates: Iterable[Waiter] = self._all
            else:
                candidates = {
                    w
                    for cell in cells
                    for prefix in ancestors(cell)
                    for w in self._by_prefix.get(prefix, ())
                }
            for waiter in candidates:
                if tier not in waiter.tiers or waiter.event.is_set():
                    continue
                if writer is not None and waiter.node == writer:
                    continue
                waiter.event.set()
                woken += 1
        return woken
