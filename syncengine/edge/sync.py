"""Sync rounds: push the outbox to the hub, pull the change feed back, and their policies.

One round (:meth:`Syncer.sync_once`) learns the hub's config (tier rules and resolvers: the
hub is the authority), pushes every lane most important first, then pulls every tier. The
scheduler decides when rounds run; this module decides what one round does when the link
is bad or the hub says no:

- **Transient failures** (:class:`RetryableError`: no link, timeouts, 5xx; or a garbled 2xx
  answer) shrink the batch (:class:`BatchSizer`) and are retried after a pause
  (:class:`Backoff`: exponential, full jitter), a bounded number of times per round; then
  the error goes to the caller. Nothing is lost: rows leave the outbox only after the hub's
  answer, and the hub's dedup makes a re-sent batch a no-op.
- **Final rejections** (4xx) of data: a change the hub names (``detail["seq"]``) is moved to
  the dead letters and the rest of the lane goes on (invariant 9); a rejection naming no
  change is bisected — the batch is halved until the culprit is alone, then dead-lettered.
- **Rejections of the node, not the data** are never dead-lettered, since every change would
  follow: a wrong token (401), a seq gap (409: the hub misses seqs this store no longer
  has; needs an operator), a token of another node, a protocol version the hub does not
  speak. They stop the lane and go to the caller.

Logging stays calm on a flapping link: the first transient failure of a streak is a warning,
retries are debug, the recovery is one info line. A step the hub refuses for good is a
warning when it starts failing (or fails for a new reason) and an info line when it works
again, not a line every round in between.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final, Literal, Protocol, TypeVar

from syncengine import crashpoints, tasks
from syncengine.cells import covers, covers_any, parse_prefix
from syncengine.clock import hlc_millis
from syncengine.edge.link import INVALID_RESPONSE, HubLink
from syncengine.edge.outbox import OutboxBatch
from syncengine.edge.store import EdgeStore
from syncengine.errors import (
    AuthenticationError,
    ClockDriftError,
    DecodeError,
    InvalidInputError,
    NotAvailableOffline,
    PermissionDeniedError,
    RetryableError,
    SequenceError,
    SyncError,
    ValidationError,
)
from syncengine.merge import RESOLVERS
from syncengine.protocol import (
    CURSOR_BEHIND_HORIZON,
    DEFAULT_MAX_BATCH_CHANGES,
    MAX_PULL_LIMIT,
    MAX_RECORD_KEYS,
    PushAnswer,
    SnapshotPage,
)
from syncengine.tiers import Tier, TierRules

__all__ = [
    "DEFAULT_ATTEMPTS",
    "DEFAULT_BACKOFF_BASE_S",
    "DEFAULT_BACKOFF_CAP_S",
    "DEFAULT_PULL_PAGE",
    "DEFAULT_START_BATCH",
    "MAX_PULL_LIMIT",
    "Backoff",
    "BatchSizer",
    "PriorityGate",
    "RoundError",
    "StepName",
    "SyncObserver",
    "SyncReport",
    "Syncer",
    "is_transient",
    "rejects_node",
]

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_BACKOFF_BASE_S: Final = 0.5
DEFAULT_BACKOFF_CAP_S: Final = 60.0
#: First batch size on a link we know nothing about: small enough for 2G, grows by doubling.
DEFAULT_START_BATCH: Final = 250
#: Tries of one request within a round before its error goes to the caller.
DEFAULT_ATTEMPTS: Final = 4
#: First pull page size; like push batches it halves on failures and doubles on full pages.
DEFAULT_PULL_PAGE: Final = 1000

#: 4xx codes that reject the node or the request as a whole, never one change: dead-lettering
#: for them would empty the outbox into the dead letters.
_NODE_LEVEL_CODES: Final = frozenset({"node_mismatch", "unsupported_version", "invalid_node_id"})


# -- policies (pure) --------------------------------------------------------------------------


class Backoff:
    """The retry policy: exponential backoff with full jitter.

    The pause before retry ``n`` (0-based) is uniform in ``[0, min(cap_s, base_s * 2**n)]``:
    full jitter spreads the retries of many edges that lost the hub at the same moment, so
    they do not come back in lockstep. ``rng`` is injectable (seeded in tests).

    Two ways to use it: :meth:`delay` for a caller that counts its own attempts, or the
    stateful :meth:`next_delay` / :meth:`reset` for consecutive failures across calls.
    """

    __slots__ = ("attempt", "base_s", "cap_s", "rng")

    def __init__(
        self,
        *,
        base_s: float = DEFAULT_BACKOFF_BASE_S,
        cap_s: float = DEFAULT_BACKOFF_CAP_S,
        rng: random.Random | None = None,
    ) -> None:
        if not 0 < base_s <= cap_s:
            raise ValueError(f"need 0 < base_s <= cap_s, got base_s={base_s!r} cap_s={cap_s!r}")
        self.base_s = base_s
        self.cap_s = cap_s
        self.rng = rng if rng is not None else random.Random()
        #: Consecutive failures counted by :meth:`next_delay` since the last :meth:`reset`.
        self.attempt = 0

    def ceiling(self, attempt: int) -> float:
        """The longest pause before retry ``attempt``: ``min(cap_s, base_s * 2**attempt)``."""
        if attempt < 0:
            raise ValueError(f"attempt must be >= 0, not {attempt!r}")
        # Past 2**64 the product only overflows; the cap was reached long before.
        return self.cap_s if attempt >= 64 else min(self.cap_s, self.base_s * 2.0**attempt)

    def delay(self, attempt: int) -> float:
        """A pause before retry ``attempt``, drawn uniformly from ``[0, ceiling(attempt)]``."""
        return self.rng.uniform(0.0, self.ceiling(attempt))

    def next_delay(self) -> float:
        """The pause after one more consecutive failure."""
        pause = self.delay(self.attempt)
        self.attempt += 1
        return pause

    def reset(self) -> None:
        """A success: the next failure starts from the shortest pauses again."""
        self.attempt = 0


class PriorityGate:
    """Lanes yield to more important ones between batches: a tier never starves a higher one.

    A push of lane ``n`` holds :meth:`claim` while it runs; before each batch a push of a
    lower lane (a larger ``n``) waits in :meth:`turn` until no more important lane is
    claimed. So a critical change waits for at most the lower batches already in flight (two:
    a push keeps one batch ahead of the one it waits on), however large the archive backlog.

    Between pushes, two kinds of hold keep the lower lanes back:

    - :meth:`owe`: the lane has changes waiting for its next push, which is sure to come
      (the daemon owes a critical write it noticed, and a push that failed for a reason a
      retry can cure). The hold lasts until that push claims the lane, however long: a
      lower change never leaves while a more important one waits, whatever the timing of
      the event loop, the link or the retries.
    - :meth:`announce`: a push of the lane is coming within a moment (the link is being
      waited for, a push just ended with changes left); it expires by itself.

    A push that fails for good (the hub refused it) owes nothing: its lane retries on its
    own schedule, and the lower lanes are not stopped behind a refusal.
    """

    __slots__ = ("_busy", "_changed", "_held_until", "_owed")

    def __init__(self) -> None:
        self._busy = [0] * len(Tier)
        self._held_until = [0.0] * len(Tier)
        self._owed = [False] * len(Tier)
        self._changed = asyncio.Condition()

    def blocked(self, lane: int) -> float:
        """0 when ``lane`` may send now; otherwise how long (s) to wait at most before
        looking again (``inf``: until a push of a more important lane claims or ends)."""
        if any(self._busy[:lane]) or any(self._owed[:lane]):
            return float("inf")
        now = time.monotonic()
        return max([0.0, *(t - now for t in self._held_until[:lane])])

    def announce(self, lane: int, *, for_s: float = 1.0) -> None:
        """A push of ``lane`` is coming within ``for_s`` seconds: hold the lower lanes."""
        self._held_until[lane] = max(self._held_until[lane], time.monotonic() + for_s)

    def owe(self, lane: int) -> None:
        """Changes of ``lane`` wait for its next push: hold the lower lanes until it claims."""
        self._owed[lane] = True

    def owed(self, lane: int) -> bool:
        return self._owed[lane]

    async def forgive(self, lane: int) -> None:
        """Lift what ``lane`` owes (a caller that will not push it now, e.g. a round of
        other tiers); the next change or failure of the lane owes again."""
        if self._owed[lane]:
            self._owed[lane] = False
            async with self._changed:
                self._changed.notify_all()

    async def turn(self, lane: int) -> None:
        """Wait until ``lane`` may send its next batch."""
        while (wait := self.blocked(lane)) > 0:
            async with self._changed:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(None if wait == float("inf") else wait):
                        await self._changed.wait()

    @contextlib.asynccontextmanager
    async def claim(self, lane: int) -> AsyncIterator[None]:
        """Mark a push of ``lane`` as running (it consumes the lane's announcement and what
        it owed).

        A push that ends with changes of its lane still to send — announced while it ran,
        or left behind by a failure — holds the lower lanes as :meth:`announce` does, and
        what was owed while it ran stays owed: the lane's next push must not find them
        sending again. (Whoever will retry a failed push says so with :meth:`owe`: the
        daemon does; a caller of :meth:`Syncer.push_lane` that will not retry must not
        stop the other lanes for good.)"""
        self._busy[lane] += 1
        self._held_until[lane] = 0.0
        self._owed[lane] = False
        failed = True
        try:
            yield
            failed = False
        finally:
            self._busy[lane] -= 1
            if failed or self._held_until[lane]:
                self.announce(lane)
            async with self._changed:
                self._changed.notify_all()


class BatchSizer:
    """How many changes to put in the next batch: adapts to what the link carries.

    Starts at ``start``; :meth:`failure` halves it (down to 1), :meth:`success` doubles it (up
    to ``ceiling``, the hub's ``max_batch_changes``). Multiplicative both ways: a link that got
    worse is found in a few requests, and one that got better is used again just as fast.
    """

    __slots__ = ("_ceiling", "_size")

    def __init__(
        self, *, start: int = DEFAULT_START_BATCH, ceiling: int = DEFAULT_MAX_BATCH_CHANGES
    ) -> None:
        if ceiling < 1 or start < 1:
            raise ValueError(f"start and ceiling must be >= 1, got {start!r}, {ceiling!r}")
        self._ceiling = ceiling
        self._size = min(start, ceiling)

    @property
    def size(self) -> int:
        """The current batch size, in ``1..ceiling``."""
        return self._size

    @property
    def ceiling(self) -> int:
        return self._ceiling

    @ceiling.setter
    def ceiling(self, value: int) -> None:
        """Learnt from the hub; the size is clamped to it at once."""
        if value < 1:
            raise ValueError(f"ceiling must be >= 1, not {value!r}")
        self._ceiling = value
        self._size = min(self._size, value)

    def success(self, used: int | None = None) -> int:
        """A batch went through: double the size, unless the batch of ``used`` changes did
        not fill the current size (then it proved nothing about a bigger one). Returns the
        new size."""
        if used is None or used >= self._size:
            self._size = min(self._ceiling, self._size * 2)
        return self._size

    def failure(self) -> int:
        """A batch failed or timed out: halve the size (not below 1). Returns the new size."""
        self._size = max(1, self._size // 2)
        return self._size


def is_transient(exc: SyncError) -> bool:
    """Whether retrying the same request later can succeed: :class:`RetryableError`, or a 2xx
    answer that could not be read (the request may have landed; a replay is harmless)."""
    return isinstance(exc, RetryableError) or (
        isinstance(exc, DecodeError) and exc.code == INVALID_RESPONSE
    )


def rejects_node(exc: SyncError) -> bool:
    """Whether a final error refuses the node or the whole request rather than any one
    change: such errors are never dead-lettered (every change would be)."""
    return isinstance(exc, AuthenticationError | SequenceError) or exc.code in _NODE_LEVEL_CODES


def _names_seq(exc: SyncError, batch: OutboxBatch) -> int | None:
    """The seq of a change of ``batch`` the error blames, if it blames one of them."""
    seq = exc.detail.get("seq")
    lane = exc.detail.get("lane", batch.lane)
    if isinstance(seq, bool) or not isinstance(seq, int) or lane != batch.lane:
        return None
    return seq if any(c.seq == seq for c in batch.changes) else None


# -- results ----------------------------------------------------------------------------------


StepName = Literal["config", "bootstrap", "push", "pull"]
#: A step's unchanged outcome is written to the store at most this often (see Syncer._note).
NOTE_EVERY_S: Final = 5.0
_Step = tuple[StepName, Tier | None]


@dataclass(frozen=True, kw_only=True, slots=True)
class RoundError:
    """A step of a round that failed: ``step`` is ``config``, ``push`` or ``pull``; ``tier``
    is ``None`` for ``config``. ``code`` is the error's stable wire code."""

    step: StepName
    tier: Tier | None
    code: str
    message: str
    #: True when the step failed for a transient reason (link down, hub 5xx).
    retryable: bool


@dataclass(frozen=True, kw_only=True, slots=True)
class SyncReport:
    """What one :meth:`Syncer.sync_once` did.

    ``pushed``/``pulled``: changes acknowledged by the hub / applied locally, per tier handled.
    ``dead_lettered``: changes moved to the dead letters in this round. ``caught_up``: no
    errors, and the outbox lanes of the tiers handled were empty at the end.
    """

    pushed: Mapping[Tier, int]
    pulled: Mapping[Tier, int]
    dead_lettered: int
    errors: tuple[RoundError, ...]
    caught_up: bool
    bytes_sent: int
    bytes_received: int
    duration_s: float


@dataclass(frozen=True, kw_only=True, slots=True)
class LivePull:
    """What one :meth:`Syncer.live_pull` did: changes applied of the live tier, the watched
    tiers the hub says hold changes for this node (``due``: pull them), and those it says
    hold none up to where it looked (``covered``: their cursors moved there)."""

    applied: int
    due: frozenset[Tier] = frozenset()
    covered: frozenset[Tier] = frozenset()


@dataclass(slots=True)
class _Watch:
    """The tiers a long-poll watches, and what the hub answered of them."""

    tiers: tuple[Tier, ...]
    answered: bool = False
    watched: dict[int, int] = field(default_factory=dict)
    due: list[int] = field(default_factory=list)


class SyncObserver(Protocol):
    """What a :class:`Syncer` reports as it works (e.g. to Prometheus metrics)."""

    def batch_pushed(self, tier: Tier, changes: int) -> None: ...
    def page_pulled(self, tier: Tier, changes: int) -> None: ...
    def step_failed(self, step: str, code: str) -> None: ...


@dataclass(slots=True)
class _Tally:
    """Counts of one call, kept even when the call ends in an error."""

    pushed: dict[Tier, int] = field(default_factory=lambda: dict.fromkeys(Tier, 0))
    pulled: dict[Tier, int] = field(default_factory=lambda: dict.fromkeys(Tier, 0))
    dead_lettered: int = 0


# -- the syncer -------------------------------------------------------------------------------


class Syncer:
    """Push and pull for one edge store over one link.

    ``subscriptions`` are the cell prefixes pulled (validated here; none means no pulls).
    ``sizer`` sizes push batches, ``pull_sizer`` pull pages; ``backoff`` spaces retries;
    ``attempts`` bounds the tries of one request per call; ``sleep`` is injectable for tests;
    ``log_link_state=False`` leaves the warnings about the link going down and up to the
    caller (the daemon tracks reachability itself).
    Within a call, retries pause ``backoff.delay(n)``; across calls, a scheduler may space
    failed rounds with ``backoff.next_delay()``, which every success resets.

    Calls on one lane (push) or one tier (pull) are serialized by a lock each; different
    lanes and tiers run concurrently. The store and the link belong to the caller.
    """

    def __init__(
        self,
        store: EdgeStore,
        link: HubLink,
        *,
        subscriptions: Sequence[str],
        sizer: BatchSizer | None = None,
        pull_sizer: BatchSizer | None = None,
        backoff: Backoff | None = None,
        attempts: int = DEFAULT_ATTEMPTS,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        log_link_state: bool = True,
        observer: SyncObserver | None = None,
    ) -> None:
        if attempts < 1:
            raise ValueError(f"attempts must be >= 1, not {attempts!r}")
        self.store = store
        self.link = link
        #: Told of every acknowledged batch, applied page and failed step (metrics).
        self.observer = observer
        self.subscriptions = tuple(dict.fromkeys(parse_prefix(p) for p in subscriptions))
        self.sizer = sizer if sizer is not None else BatchSizer()
        self.pull_sizer = (
            pull_sizer
            if pull_sizer is not None
            else BatchSizer(start=DEFAULT_PULL_PAGE, ceiling=MAX_PULL_LIMIT)
        )
        self.snapshot_sizer = BatchSizer(start=DEFAULT_PULL_PAGE, ceiling=MAX_PULL_LIMIT)
        self.backoff = backoff if backoff is not None else Backoff()
        self.attempts = attempts
        self._sleep = sleep
        # False when an owner (the daemon) logs the link's ups and downs itself: then a
        # streak of failures and its end are debug lines here, not a second warning.
        self._link_level = logging.WARNING if log_link_state else logging.DEBUG
        #: Lower lanes wait for more important ones between batches (shared by all calls).
        self.gate = PriorityGate()
        self._push_locks = {t.priority: asyncio.Lock() for t in Tier}
        self._pull_locks = {t: asyncio.Lock() for t in Tier}
        self._failures = 0  # consecutive transient failures: what calms the logs
        self._fold_warned = False
        self._step_errors: dict[_Step, str] = {}  # final error code of each failing step
        self._drift_warned = False
        self._seqs_checked = False  # learn_config checked this file's seqs against the hub's
        self._hub_head: dict[Tier, int] = {}  # the feed head the last pull page reported
        self._noted: dict[_Step, tuple[float, str | None]] = {}  # see _note
        self._config_tag: str | None = None  # the hub's tag of the config learnt last
        self._config_stale = False  # a long-poll brought another tag

    # -- config -------------------------------------------------------------------------------

    async def learn_config(self) -> None:
        """Fetch the hub's config and adopt it: tier rules and resolvers are saved in the
        store (the hub is their authority), ``max_batch_changes`` caps the batch size, the
        hub's clock is folded into ours, and this file's seqs are checked against what the hub
        holds from this node (:meth:`EdgeStore.follow_hub_seqs`); pushes wait for that check.

        Raises the link's errors, :class:`DecodeError` (:data:`INVALID_RESPONSE`) for a
        config that does not parse — nothing is adopted then — and :class:`SequenceError`
        (``store_behind_hub``) for an older copy of this node's store.
        """
        cfg = await self.link.config()
        try:
            rules = TierRules.from_wire(cfg.get("tier_rules"))
            resolvers = _resolvers(cfg.get("resolvers", {}))
        except SyncError as exc:
            raise DecodeError(
                f"hub config is invalid: {exc.message}",
                code=INVALID_RESPONSE,
                detail={"cause": exc.code},
            ) from None
        if rules != self.store.tier_rules or resolvers != self.store.resolvers:
            await self.store.save_learnt_rules(rules, resolvers)
            log.info(
                "node %s: adopted the hub's config: %d tier rules, resolvers %s",
                self.store.node_id,
                len(rules),
                resolvers or "{}",
            )
        max_batch = cfg.get("max_batch_changes")
        if isinstance(max_batch, int) and not isinstance(max_batch, bool) and max_batch >= 1:
            self.sizer.ceiling = max_batch
        hub_hlc = cfg.get("hub_hlc")
        if isinstance(hub_hlc, int) and not isinstance(hub_hlc, bool) and hub_hlc > 0:
            self._fold(hub_hlc)
            self._check_drift(hub_hlc, cfg.get("max_clock_drift_ms"))
        tag = cfg.get("tag")
        self._config_tag = tag if isinstance(tag, str) and tag else None
        self._config_stale = False
        acked = cfg.get("acked")
        if not (
            isinstance(acked, list)
            and len(acked) == len(Tier)
            and all(isinstance(a, int) and not isinstance(a, bool) and a >= 0 for a in acked)
        ):
            raise DecodeError(
                "hub config has no valid 'acked' (one seq per lane)", code=INVALID_RESPONSE
            )
        await self.store.follow_hub_seqs(acked)
        self._seqs_checked = True

    def _check_drift(self, hub_hlc: int, max_drift_ms: object) -> None:
        """Say once, before the rejections pile up, that this node's clock runs ahead."""
        if self._drift_warned or not isinstance(max_drift_ms, int):
            return
        clock = self.store.clock
        ahead_ms = max(clock.wall(), hlc_millis(clock.last)) - hlc_millis(hub_hlc)
        if ahead_ms > max_drift_ms:
            self._drift_warned = True
            log.warning(
                "node %s: this clock is %.0f s ahead of the hub's (allowed %.0f s); the hub "
                "refuses such writes (clock_drift) and they go to the dead letters. "
                "Set the clock (enable NTP).",
                self.store.node_id,
                ahead_ms / 1000,
                max_drift_ms / 1000,
            )

    # -- push ---------------------------------------------------------------------------------

    async def push_lane(self, lane: int) -> int:
        """Push one lane's outbox until it holds nothing that was queued when the call began;
        return how many changes the hub acknowledged.

        Changes the hub rejects for good are dead-lettered and do not stop the lane. Raises
        a transient error once ``attempts`` tries of one batch failed; :class:`SequenceError`
        (the hub misses seqs: needs an operator), :class:`AuthenticationError` and the other
        node-level rejections at once, dead-lettering nothing.
        """
        return await self._push_lane(lane, _Tally())

    async def _push_lane(self, lane: int, tally: _Tally) -> int:
        tier = Tier.from_priority(lane)
        try:
            pushed = await self._push_lane_body(lane, tally)
        except SyncError as exc:
            await self._note("push", tier, exc)
            raise
        await self._note("push", tier)
        return pushed

    async def _push_lane_body(self, lane: int, tally: _Tally) -> int:
        tier = Tier.from_priority(lane)
        outbox = self.store.outbox
        async with self._push_locks[lane], self.gate.claim(lane):
            if not self._seqs_checked and await outbox.pending(lane):
                # Once per syncer, before the first push: a new file of a node whose store
                # was lost must number its changes after what the hub holds (learn_config).
                await self.learn_config()
            # Changes written while we push wait for the next call: a busy lane cannot
            # starve the lanes (and pulls) after it in a round.
            stop_after = await outbox.last_issued(lane)
            pushed = 0
            attempt = 0
            cap: int | None = None  # bisection: the batch size a rejection forced down
            # Pipelining: while a batch is in flight the next one is read, encoded and sent
            # (the hub applies them in seq order), so neither side waits on the other.
            ahead: tuple[OutboxBatch, asyncio.Task[PushAnswer]] | None = None
            sent: asyncio.Task[PushAnswer] | None = None
            try:
                while True:
                    await self.gate.turn(lane)
                    pipelined = ahead is not None
                    if ahead is not None:
                        (batch, sent), ahead = ahead, None
                    else:
                        limit = self.sizer.size if cap is None else min(cap, self.sizer.size)
                        found = await outbox.next_batch(limit=limit, lanes=[lane])
                        if found is None or found.first_seq > stop_after:
                            return pushed
                        batch = found
                        sent = asyncio.ensure_future(self.link.push(batch))
                    if cap is None and attempt == 0 and not self.gate.blocked(lane):
                        nxt = await outbox.next_batch(
                            limit=self.sizer.size, lanes=[lane], after={lane: batch.last_seq}
                        )
                        if nxt is not None and nxt.first_seq <= stop_after:
                            ahead = (nxt, asyncio.ensure_future(self.link.push(nxt)))
                    try:
                        answer = await sent
                    except SyncError as exc:
                        # The batch behind it is sent again, in order, once this one passes.
                        await _drop(ahead)
                        ahead = None
                        if pipelined and exc.code == SequenceError.code:
                            # Sent before the batch ahead of it was acknowledged, it reached
                            # the hub first and waited there longer than the hub waits for a
                            # predecessor (a slow link): send it again, now in order.
                            continue
                        if is_transient(exc):
                            self.sizer.failure()
                            await self._pause(exc, attempt, "push", tier)
                            attempt += 1
                            continue
                        if not isinstance(exc, InvalidInputError | PermissionDeniedError):
                            raise
                        if rejects_node(exc):
                            raise  # never dead-letter these; the caller reports them
                        cap = await self._reject(batch, exc, cap, tally)
                        continue
                    self._recovered()
                    attempt = 0
                    if answer.acked < batch.first_seq:
                        # The hub applied nothing and claims success: retrying would loop.
                        raise SequenceError(
                            f"lane {lane}: the hub acknowledged seq {answer.acked} for a batch "
                            f"starting at {batch.first_seq}",
                            code="ack_behind",
                            detail={"lane": lane, "acked": answer.acked, "first": batch.first_seq},
                        )
                    crashpoints.crashpoint("push.after_ack_before_outbox_delete")
                    done = await outbox.ack(lane, answer.acked)
                    pushed += done
                    tally.pushed[tier] += done
                    if self.observer is not None:
                        self.observer.batch_pushed(tier, done)
                    self._fold(answer.hub_hlc)
                    self.sizer.success(len(batch.changes))
                    if cap is not None:
                        # Grow back after the culprit is behind us, as the sizer would.
                        cap = None if cap * 2 >= self.sizer.size else cap * 2
                    if answer.conflicts:
                        log.debug(
                            "node %s lane %s: %d conflicts logged by the hub",
                            self.store.node_id,
                            tier,
                            answer.conflicts,
                        )
            finally:
                # Cancelled or failed while a push was in flight (reading the batch behind
                # it, say): the push must not run on outside the lane's turn.
                await _drop(ahead)
                if sent is not None:
                    await _abandon(sent)

    async def _reject(
        self, batch: OutboxBatch, exc: SyncError, cap: int | None, tally: _Tally
    ) -> int | None:
        """Handle a final rejection of ``batch`` that may be about one change; return the
        bisection cap for the next batch. Raises ``exc`` when nothing can be singled out."""
        self._fold_link()
        hub_max = exc.detail.get("max")
        if (
            exc.code == "batch_too_large"
            and isinstance(hub_max, int)
            and 1 <= hub_max < len(batch.changes)
        ):
            # The hub said its limit: adopt it rather than discover it by halving.
            self.sizer.ceiling = hub_max
            return cap
        seq = _names_seq(exc, batch)
        if seq is None and len(batch.changes) == 1:
            seq = batch.changes[0].seq  # bisected down to the culprit
        if seq is not None:
            await self._dead_letter(batch.lane, seq, exc, tally)
            return cap
        if len(batch.changes) > 1:
            half = len(batch.changes) // 2
            log.debug(
                "node %s lane %s: hub refused a batch of %d without naming a change (%s); "
                "retrying with %d",
                self.store.node_id,
                batch.tier,
                len(batch.changes),
                exc.code,
                half,
            )
            return half
        # Only skipped seqs, refused: nothing to single out.
        raise exc

    async def _dead_letter(self, lane: int, seq: int, exc: SyncError, tally: _Tally) -> None:
        crashpoints.crashpoint("deadletter.after_reject_before_record")
        moved = await self.store.outbox.dead_letter(
            lane, seq, code=exc.code, message=exc.message, detail=exc.detail
        )
        if moved:
            tally.dead_lettered += 1
            log.warning(
                "node %s lane %s: change %d refused by the hub (%s), moved to dead letters: %s",
                self.store.node_id,
                Tier.from_priority(lane),
                seq,
                exc.code,
                exc.message,
            )

    # -- pull ---------------------------------------------------------------------------------

    async def pull_tier(self, tier: Tier, *, wait_s: float = 0.0) -> int:
        """Pull ``tier``'s feed for the subscriptions until the hub has no more; return how
        many changes were applied. Each page and the cursor ``pull:<tier>`` move together in
        one store transaction, so a crash never skips nor repeats a change.

        ``wait_s`` > 0 makes the first request a long-poll. Raises like :meth:`push_lane`.
        """
        return await self._pull_tier(Tier(tier), wait_s, _Tally())

    async def live_pull(self, tier: Tier, *, wait_s: float, watch: Iterable[Tier] = ()) -> LivePull:
        """Like :meth:`pull_tier` with a long-poll of ``wait_s``, which also watches the
        tiers ``watch``: it ends as soon as any of them has a change for this node (those
        come back in :attr:`LivePull.due`, to be pulled), and the cursors of the others
        move up to where the hub found nothing for this node (:attr:`LivePull.covered`).
        One held request thus stands in for the interval pulls of those tiers while the
        edge is idle: what an idle edge costs on the wire. A config tag change seen on the
        way is learnt before returning."""
        seen = _Watch(tiers=tuple(Tier(t) for t in watch if Tier(t) != tier))
        applied = await self._pull_tier(Tier(tier), wait_s, _Tally(), seen)
        covered = []
        for t, cursor in seen.watched.items():
            if await self._follow_watch(Tier.from_priority(t), cursor):
                covered.append(Tier.from_priority(t))
        if self._config_stale:
            await self.learn_config()
        return LivePull(
            applied=applied,
            due=frozenset(Tier.from_priority(t) for t in seen.due),
            covered=frozenset(covered),
        )

    async def _follow_watch(self, tier: Tier, cursor: int) -> bool:
        """Move ``tier``'s cursor up to ``cursor``, below which the hub holds nothing for
        this node, unless a pull of it runs (it knows better) or a bootstrap is unfinished."""
        lock = self._pull_locks[tier]
        if lock.locked():
            return False
        async with lock:
            if await self.store.bootstrap_progress() is not None:
                return False
            name = f"pull:{tier.value}"
            if cursor > await self.store.cursor(name):
                await self.store.apply_remote([], cursor=cursor, cursor_name=name, ids=[])
        await self._note("pull", tier, hub_head=self._hub_head.get(tier))
        return True

    async def _pull_tier(
        self, tier: Tier, wait_s: float, tally: _Tally, watch: _Watch | None = None
    ) -> int:
        if not self.subscriptions:
            return 0
        try:
            try:
                applied = await self._pull_tier_body(tier, wait_s, tally, watch)
            except SequenceError as exc:
                if exc.code != CURSOR_BEHIND_HORIZON:
                    raise
                await self._rebootstrap(exc)
                applied = await self._pull_tier_body(tier, 0.0, tally)
        except SyncError as exc:
            await self._note("pull", tier, exc)
            raise
        await self._note("pull", tier, hub_head=self._hub_head.get(tier))
        return applied

    async def _pull_tier_body(
        self, tier: Tier, wait_s: float, tally: _Tally, watch: _Watch | None = None
    ) -> int:
        name = f"pull:{tier.value}"
        applied = 0
        attempt = 0
        async with self._pull_locks[tier]:
            if await self.store.bootstrap_progress() is not None:
                raise SequenceError(
                    "a bootstrap of this store is unfinished; the feed is pulled after it",
                    hint="Run `syncengine edge bootstrap` (the daemon finishes it by itself).",
                    code="bootstrap_incomplete",
                )
            if not self._seqs_checked:
                # A restored backup learns from the check which of this node's own changes
                # it lacks; a pull before it would skip them as already applied.
                await self.learn_config()
            while True:
                after = await self.store.cursor(name)
                tiers = watch.tiers if watch is not None and not watch.answered else ()
                watching = {t: await self.store.cursor(f"pull:{t.value}") for t in tiers}
                try:
                    page = await self.link.pull(
                        tier=tier,
                        prefixes=self.subscriptions,
                        after=after,
                        limit=self.pull_sizer.size,
                        wait_s=wait_s,
                        watch=watching,
                        tag=self._config_tag if tiers else None,
                    )
                except SyncError as exc:
                    if not is_transient(exc):
                        raise
                    self.pull_sizer.failure()
                    await self._pause(exc, attempt, "pull", tier)
                    attempt += 1
                    continue
                self._recovered()
                attempt = 0
                if watch is not None and not watch.answered:  # the first page, the long-poll
                    watch.watched, watch.due, watch.answered = page.watched, page.due, True
                if page.cfg is not None and page.cfg != self._config_tag:
                    self._config_stale = True
                if page.more and page.next_cursor <= after:
                    raise DecodeError(
                        f"hub says more follows cursor {after} but moved it to {page.next_cursor}",
                        code=INVALID_RESPONSE,
                        detail={"after": after, "next": page.next_cursor},
                    )
                done = await self.store.apply_remote(
                    page.changes, cursor=page.next_cursor, cursor_name=name, ids=page.ids
                )
                applied += done
                tally.pulled[tier] += done
                if self.observer is not None:
                    self.observer.page_pulled(tier, done)
                crashpoints.crashpoint("pull.after_commit_before_next_page")
                self._fold(page.hub_hlc)
                self._hub_head[tier] = page.head
                self.pull_sizer.success(len(page.changes))
                if not page.more:
                    return applied
                wait_s = 0.0  # the long-poll was for the first page only

    # -- bootstrap and read-back ----------------------------------------------------------------

    async def bootstrap(self, *, progress: Callable[[int, str], None] | None = None) -> int:
        """Fetch every subscribed prefix not fetched before through the hub's snapshot;
        return how many records were taken (0 when there was nothing to do).

        Each page is merged with the store (queued local changes stay on top; see
        :meth:`EdgeStore.adopt`) and saved with the bootstrap's progress in one
        transaction, so an interrupted bootstrap — a crash, a cut link, SIGTERM — resumes
        after the last page it kept, and calling this again when done does nothing. Pages
        adapt in size like pulls; transient errors are retried with backoff ``attempts``
        times per page, then raised (the progress stays). Feed pulls wait until it is done
        and then continue from the snapshot's cursor. ``progress(records, prefix)`` is
        called after every page.
        """
        store = self.store
        async with contextlib.AsyncExitStack() as stack:
            for lock in self._pull_locks.values():
                await stack.enter_async_context(lock)
            saved = await store.bootstrap_progress()
            before = await store.bootstrapped()
            wanted = [p for p in self.subscriptions if not covers_any(before, p)]
            wanted = [p for p in wanted if not any(q != p and covers(q, p) for q in wanted)]
            if saved is None and not wanted:
                return 0
            state: dict[str, Any] = saved or {
                "done": [],
                "prefix": None,
                "after": None,
                "cursor": None,
                "records": 0,
            }
            if saved is None:
                await store.start_bootstrap(state)
            total = taken = int(state["records"])
            for prefix in wanted:
                if prefix in state["done"]:
                    continue
                after = state["after"] if state["prefix"] == prefix else None
                coming = asyncio.ensure_future(self._snapshot_page(prefix, after))
                while True:
                    try:
                        page = await coming
                    finally:
                        coming.cancel()
                    if page.next is not None:
                        # Fetch the next page while this one is written to the store.
                        coming = asyncio.ensure_future(self._snapshot_page(prefix, page.next))
                    total += len(page.records)
                    cursor = state["cursor"]
                    state = {
                        **state,
                        "done": state["done"] + ([prefix] if page.next is None else []),
                        "prefix": prefix,
                        "after": page.next,
                        "cursor": page.cursor if cursor is None else min(cursor, page.cursor),
                        "records": total,
                    }
                    try:
                        await _kept(store.adopt(page.records, page.acked, bootstrap=state))
                        crashpoints.crashpoint("bootstrap.after_page_commit")
                    except BaseException:
                        coming.cancel()
                        raise
                    self.snapshot_sizer.success(len(page.records))
                    if progress is not None:
                        progress(total, prefix)
                    if page.next is None:
                        break
            await store.finish_bootstrap(
                {*state["done"], *wanted}, state["cursor"], rebase=bool(state.get("rebase"))
            )
        log.info(
            "node %s: bootstrapped %s: %d records (%d in this run)",
            store.node_id,
            ", ".join(wanted) or "(resumed)",
            total,
            total - taken,
        )
        return total

    async def _rebootstrap(self, cause: SyncError) -> None:
        """The hub dropped feed entries this store had not pulled (it was away longer than
        the hub keeps its feed): take every subscription anew from the snapshot. Queued
        changes stay on top; tombstones come with the snapshot, so nothing deleted
        meanwhile comes back. Holds until done (resumable, like any bootstrap)."""
        log.warning(
            "node %s: %s; re-bootstrapping every subscription from the hub's snapshot",
            self.store.node_id,
            cause.message,
        )
        if await self.store.bootstrap_progress() is None:
            await self.store.request_rebootstrap()
        await self.bootstrap()

    async def _snapshot_page(self, prefix: str, after: str | None) -> SnapshotPage:
        attempt = 0
        while True:
            try:
                page = await self.link.snapshot(
                    prefix=prefix, after=after, limit=self.snapshot_sizer.size
                )
            except SyncError as exc:
                if not is_transient(exc):
                    raise
                self.snapshot_sizer.failure()
                await self._pause(exc, attempt, "bootstrap", prefix)
                attempt += 1
                continue
            self._recovered()
            self._fold_link()
            return page

    async def get(self, cell: str, collection: str, key: str) -> dict[str, Any] | None:
        """The record's document, read through to the hub when it was evicted locally.

        Like :meth:`EdgeStore.get`, except that an evicted record is fetched back from the
        hub and kept locally again. Raises :class:`NotAvailableOffline` when it was evicted
        and the hub cannot be reached.
        """
        try:
            return await self.store.get(cell, collection, key)
        except NotAvailableOffline as evicted:
            try:
                await self.refresh([(cell, collection, key)])
            except SyncError as exc:
                if not is_transient(exc):
                    raise
                raise NotAvailableOffline(
                    f"{evicted.message}, and the hub cannot be reached: {exc.message}",
                    detail={**evicted.detail, "cause": exc.code},
                ) from None
        return await self.store.get(cell, collection, key)

    async def refresh(self, keys: Iterable[tuple[str, str, str]]) -> int:
        """Take the hub's state of the records ``keys`` (``(cell, collection, key)``) anew,
        with this node's queued changes on top; a record the hub does not hold becomes its
        queued changes alone, or nothing. They are all local again (an evicted one too).
        Returns how many records the hub held.

        For local copies that went astray from the hub's, e.g. after discarding dead
        letters. Raises the link's errors.
        """
        groups: dict[tuple[str, str], list[str]] = {}
        for cell, collection, key in keys:
            groups.setdefault((cell, collection), []).append(key)
        held = 0
        for (cell, collection), names in groups.items():
            for i in range(0, len(names), MAX_RECORD_KEYS):
                chunk = names[i : i + MAX_RECORD_KEYS]
                page = await self.link.records(cell=cell, collection=collection, keys=chunk)
                self._fold_link()
                held += await self.store.adopt(
                    page.records, page.acked, absent=[(cell, collection, k) for k in chunk]
                )
        return held

    # -- a round ------------------------------------------------------------------------------

    async def sync_once(self, *, tiers: Iterable[Tier] | None = None) -> SyncReport:
        """One round: learn the config, finish an unfinished bootstrap, push every lane
        (critical first), pull every tier.

        ``tiers`` restricts the lanes and tiers handled. Failures are reported per step in
        :attr:`SyncReport.errors` and the round goes on, except that a transient push error
        ends it (the link is down: the next steps would only wait out their own retries).
        Raises :class:`AuthenticationError` (no step can succeed with a wrong token) and
        errors of the store itself (:class:`StorageError`).
        """
        started = time.monotonic()
        sent0, received0 = self.link.bytes_sent, self.link.bytes_received
        wanted = sorted({Tier(t) for t in (Tier if tiers is None else tiers)}, key=_priority)
        tally = _Tally()
        errors: list[RoundError] = []
        ok: list[_Step] = []
        try:
            await self.learn_config()
            ok.append(("config", None))
        except SyncError as exc:
            errors.append(self._failed("config", None, exc))
        link_down = False
        if not errors and await self.store.bootstrap_progress() is not None:
            # An interrupted bootstrap (or one a restore asked for): pulls wait for it.
            try:
                await self.bootstrap()
                ok.append(("bootstrap", None))
            except SyncError as exc:
                errors.append(self._failed("bootstrap", None, exc))
                link_down = is_transient(exc)
        for tier in Tier:
            if tier not in wanted:
                # Lanes this round does not push hold nothing back: the caller chose them.
                await self.gate.forgive(tier.priority)
        for tier in wanted if not link_down else ():
            try:
                await self._push_lane(tier.priority, tally)
                ok.append(("push", tier))
            except SyncError as exc:
                errors.append(self._failed("push", tier, exc))
                if is_transient(exc):
                    link_down = True
                    break
        if not link_down:
            for tier in wanted:
                try:
                    await self._pull_tier(tier, 0.0, tally)
                    ok.append(("pull", tier))
                except SyncError as exc:
                    errors.append(self._failed("pull", tier, exc))
                    if is_transient(exc):
                        break
        depth = {s.tier: s.depth for s in await self.store.outbox.status()}
        report = SyncReport(
            pushed=MappingProxyType({t: tally.pushed[t] for t in wanted}),
            pulled=MappingProxyType({t: tally.pulled[t] for t in wanted}),
            dead_lettered=tally.dead_lettered,
            errors=tuple(errors),
            caught_up=not errors and all(depth[t] == 0 for t in wanted),
            bytes_sent=self.link.bytes_sent - sent0,
            bytes_received=self.link.bytes_received - received0,
            duration_s=time.monotonic() - started,
        )
        self._note_steps(ok, report.errors)
        moved = sum(report.pushed.values()) + sum(report.pulled.values()) + report.dead_lettered
        log.log(
            logging.INFO if moved or errors else logging.DEBUG,
            "node %s: sync round: pushed %d, pulled %d, dead-lettered %d, %d errors, %s",
            self.store.node_id,
            sum(report.pushed.values()),
            sum(report.pulled.values()),
            report.dead_lettered,
            len(errors),
            "caught up" if report.caught_up else "not caught up",
        )
        return report

    def _failed(self, step: StepName, tier: Tier | None, exc: SyncError) -> RoundError:
        """Record a failed step, or raise what no later step could survive."""
        if isinstance(exc, AuthenticationError):
            raise exc
        if not isinstance(exc, RetryableError | InvalidInputError | PermissionDeniedError):
            raise exc  # the store's own errors (disk, corruption): not a sync outcome
        return RoundError(
            step=step, tier=tier, code=exc.code, message=exc.message, retryable=is_transient(exc)
        )

    # -- helpers ------------------------------------------------------------------------------

    def _note_steps(self, ok: Iterable[_Step], errors: Sequence[RoundError]) -> None:
        """Log a final error when a step starts failing or changes reason, and its recovery;
        not again every round while it keeps failing the same way. (Transient failures are
        logged by :meth:`_pause`.)"""
        for e in errors:
            key = (e.step, e.tier)
            if not e.retryable and self._step_errors.get(key) != e.code:
                self._step_errors[key] = e.code
                log.warning(
                    "node %s: %s%s refused by the hub (%s): %s",
                    self.store.node_id,
                    e.step,
                    f" of {e.tier}" if e.tier else "",
                    e.code,
                    e.message,
                )
        for step, tier in ok:
            if self._step_errors.pop((step, tier), None) is not None:
                log.info(
                    "node %s: %s%s works again",
                    self.store.node_id,
                    step,
                    f" of {tier}" if tier else "",
                )

    async def _note(
        self,
        step: Literal["push", "pull"],
        tier: Tier,
        error: SyncError | None = None,
        *,
        hub_head: int | None = None,
    ) -> None:
        """Record a step's outcome in the store for ``syncengine status``: at once when it
        changes (success to failure, another error code), else at most every
        :data:`NOTE_EVERY_S` seconds, so a busy lane does not write on every push."""
        key: _Step = (step, tier)
        code = None if error is None else error.code
        if code is not None and self.observer is not None:
            self.observer.step_failed(step, code)
        now = time.monotonic()
        last = self._noted.get(key)
        if last is not None and last[1] == code and now - last[0] < NOTE_EVERY_S:
            return
        self._noted[key] = (now, code)
        try:
            await self.store.note_step(step, tier, error=error, hub_head=hub_head)
        except SyncError as exc:  # the store is closing: not worth failing the step for
            log.debug("node %s: could not record the %s outcome: %s", self.store.node_id, step, exc)

    async def _pause(self, exc: SyncError, attempt: int, step: str, tier: str) -> None:
        """After transient failure number ``attempt`` (0-based) of one request: raise it when
        the attempts are used up, else sleep the backoff."""
        self._fold_link()
        self._failures += 1
        if self._failures == 1:
            log.log(
                self._link_level,
                "node %s: %s of %s failed (%s): %s; retrying with backoff, changes stay queued",
                self.store.node_id,
                step,
                tier,
                exc.code,
                exc.message,
            )
        else:
            log.debug(
                "node %s: %s of %s failed again (%s, %d in a row)",
                self.store.node_id,
                step,
                tier,
                exc.code,
                self._failures,
            )
        if attempt + 1 >= self.attempts:
            raise exc
        await self._sleep(self.backoff.delay(attempt))

    def _recovered(self) -> None:
        if self._failures:
            log.log(
                logging.INFO if self._link_level == logging.WARNING else logging.DEBUG,
                "node %s: hub %s reachable again after %d failed attempts",
                self.store.node_id,
                self.link.origin,
                self._failures,
            )
            self._failures = 0
        self.backoff.reset()

    def _fold_link(self) -> None:
        """Fold the clock the hub sent with its last answer, error answers included."""
        if self.link.hub_hlc is not None:
            self._fold(self.link.hub_hlc)

    def _fold(self, hlc: int) -> None:
        """Fold a hub stamp into the edge clock, so a slow clock catches up; a stamp too far
        ahead of our wall clock is not folded (it would drag every later write with it)."""
        try:
            self.store.clock.observe(hlc)
        except ClockDriftError as exc:
            if not self._fold_warned:
                self._fold_warned = True
                log.warning(
                    "node %s: not folding the hub's clock into ours: %s",
                    self.store.node_id,
                    exc.message,
                )


async def _drop(ahead: tuple[OutboxBatch, asyncio.Task[PushAnswer]] | None) -> None:
    """Give up a pipelined push: whether it reached the hub or not, its batch is still in
    the outbox and is sent again (a replay the hub answers as the first time)."""
    if ahead is not None:
        await _abandon(ahead[1])


async def _abandon(push: asyncio.Task[PushAnswer]) -> None:
    """Stop a push task (done already or not) and take its outcome, so that it neither
    runs on nor leaves an exception no one retrieved. The caller's own cancellation is
    not swallowed (``tasks.stop`` waits without raising the task's outcome). A failure
    other than a :class:`SyncError` is a bug and is raised."""
    await tasks.stop(push)
    if push.done() and not push.cancelled():
        exc = push.exception()
        if exc is not None and not isinstance(exc, SyncError):
            raise exc


async def _kept(write: Awaitable[T]) -> T:
    """Await a local write that holds what came over the link, finishing it even when the
    caller is cancelled (a cut, SIGTERM): what was paid for on the wire is not thrown away
    and fetched again. The cancellation is raised once the write is done."""
    task = asyncio.ensure_future(write)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        if not task.done():
            with contextlib.suppress(Exception):
                await task
        raise


def _priority(tier: Tier) -> int:
    return tier.priority


def _resolvers(raw: object) -> dict[str, str]:
    if not isinstance(raw, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in raw.items()
    ):
        raise ValidationError("resolvers must map collection names to resolver names")
    unknown = sorted({v for v in raw.values() if v not in RESOLVERS})
    if unknown:
        raise ValidationError(
            f"the hub uses resolvers this edge does not know: {', '.join(unknown)}",
            hint="Upgrade syncengine on this edge.",
            code="unknown_resolver",
        )
    return dict(raw)
