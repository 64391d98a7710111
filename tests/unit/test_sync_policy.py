"""The sync layer's policies: backoff, adaptive batch size, which errors are retried or
dead-lettered — and how a push round applies them, against a fake link (in-memory hub
semantics: dedup by seq, gaps refused) over a real SQLite edge store."""

from __future__ import annotations

import logging
import random
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from syncengine import crashpoints
from syncengine.clock import make_hlc
from syncengine.edge.link import INVALID_RESPONSE
from syncengine.edge.outbox import OutboxBatch
from syncengine.edge.store import EdgeStore
from syncengine.edge.sync import (
    Backoff,
    BatchSizer,
    Syncer,
    is_transient,
    rejects_node,
)
from syncengine.errors import (
    AuthenticationError,
    ClockDriftError,
    DecodeError,
    ForbiddenError,
    HubUnavailableError,
    InvalidInputError,
    LimitExceededError,
    LinkError,
    SequenceError,
    SyncError,
    ValidationError,
)
from syncengine.protocol import PullPage, PushAnswer
from syncengine.tiers import Tier, TierRule, TierRules

CELL = "west/ng/lagos/clinic-12"
URGENT = f"{CELL}/alerts"
RULES = TierRules([TierRule(prefix=URGENT, tier=Tier.CRITICAL)])

# ----------------------------------------------------------------------------------- Backoff


def test_backoff_ceilings_double_from_base_up_to_cap() -> None:
    b = Backoff()
    assert [b.ceiling(n) for n in range(9)] == [0.5, 1, 2, 4, 8, 16, 32, 60, 60]
    assert b.ceiling(10_000) == 60


def test_backoff_is_full_jitter_within_the_ceiling() -> None:
    b = Backoff(rng=random.Random(7))
    samples = [b.delay(3) for _ in range(4000)]
    assert all(0 <= s <= 4 for s in samples)
    assert min(samples) < 0.1 and max(samples) > 3.9  # the whole range, not a band
    assert statistics.mean(samples) == pytest.approx(2.0, abs=0.15)


def test_backoff_is_reproducible_with_a_seed_and_resets() -> None:
    a, b = Backoff(rng=random.Random(1)), Backoff(rng=random.Random(1))
    assert [a.next_delay() for _ in range(6)] == [b.next_delay() for _ in range(6)]
    assert a.attempt == 6
    a.reset()
    assert a.attempt == 0
    assert a.next_delay() <= 0.5


@pytest.mark.parametrize("kw", [{"base_s": 0}, {"base_s": 2, "cap_s": 1}, {"base_s": -1}])
def test_backoff_refuses_nonsense(kw: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        Backoff(**kw)
    with pytest.raises(ValueError):
        Backoff().ceiling(-1)


# ---------------------------------------------------------------------------------- BatchSizer


def test_sizer_halves_on_failure_down_to_one() -> None:
    s = BatchSizer()
    assert s.size == 250
    assert [s.failure() for _ in range(9)] == [125, 62, 31, 15, 7, 3, 1, 1, 1]


def test_sizer_doubles_on_success_up_to_the_ceiling() -> None:
    s = BatchSizer(start=1, ceiling=20)
    assert [s.success() for _ in range(7)] == [2, 4, 8, 16, 20, 20, 20]


def test_sizer_grows_only_on_batches_that_filled_it() -> None:
    s = BatchSizer(start=100)
    assert s.success(used=3) == 100  # a short batch says nothing about the link
    assert s.success(used=100) == 200


def test_sizer_ceiling_is_learnt_and_clamps() -> None:
    s = BatchSizer(start=250)
    s.ceiling = 40
    assert s.size == 40
    assert s.success() == 40
    assert BatchSizer(start=9000, ceiling=5000).size == 5000
    with pytest.raises(ValueError):
        s.ceiling = 0
    with pytest.raises(ValueError):
        BatchSizer(start=0)


# ------------------------------------------------------------------------- error classes


@pytest.mark.parametrize(
    ("exc", "transient"),
    [
        (LinkError("down"), True),
        (HubUnavailableError("503"), True),
        (DecodeError("garbled answer", code=INVALID_RESPONSE), True),
        (DecodeError("our body was bad"), False),
        (ClockDriftError("ahead"), False),
        (ForbiddenError("no grant"), False),
    ],
)
def test_which_errors_are_retried(exc: SyncError, transient: bool) -> None:
    assert is_transient(exc) is transient


@pytest.mark.parametrize(
    ("exc", "node_level"),
    [
        (AuthenticationError("bad token", code="invalid_token"), True),
        (SequenceError("gap"), True),
        (ForbiddenError("not mine", code="node_mismatch"), True),
        (InvalidInputError("v9", code="unsupported_version"), True),
        (ForbiddenError("no grant", code="not_granted", detail={"seq": 3}), False),
        (ClockDriftError("ahead", detail={"seq": 3}), False),
        (LimitExceededError("too big", code="body_too_large"), False),
    ],
)
def test_which_rejections_are_never_dead_lettered(exc: SyncError, node_level: bool) -> None:
    assert rejects_node(exc) is node_level


# ---------------------------------------------------------------- a push round, fake link

Rule = Callable[[OutboxBatch], SyncError | None]


class FakeLink:
    """The :class:`HubLink` interface over an in-memory hub: per-lane dedup by seq, gaps
    refused with 409, and ``rule`` deciding which batches are refused."""

    origin = "http://fake-hub"

    def __init__(self, rule: Rule | None = None) -> None:
        self.rule = rule
        self.acked = dict.fromkeys(range(4), 0)
        self.applied: list[tuple[int, int]] = []  # (lane, seq), in apply order
        self.pushes: list[OutboxBatch] = []
        self.pulls = 0
        self.hub_hlc: int | None = None
        self.bytes_sent = self.bytes_received = 0
        self.fail_next: list[SyncError] = []

    async def push(self, batch: OutboxBatch) -> PushAnswer:
        self.pushes.append(batch)
        if self.fail_next:
            raise self.fail_next.pop(0)
        refusal = self.rule(batch) if self.rule else None
        if refusal is not None:
            raise refusal
        acked = self.acked[batch.lane]
        if batch.first_seq > acked + 1:
            raise SequenceError("gap", detail={"lane": batch.lane})
        new = [c for c in batch.changes if c.seq > acked]
        self.applied.extend((batch.lane, c.seq) for c in new)
        self.acked[batch.lane] = max(acked, batch.last_seq)
        return PushAnswer(
            acked=self.acked[batch.lane], lane=batch.lane, applied=len(new), conflicts=0, hub_hlc=1
        )

    async def pull(
        self,
        *,
        tier: Tier,
        prefixes: Sequence[str],
        after: int,
        limit: int,
        wait_s: float = 0.0,
        watch: Mapping[Tier, int] | None = None,
        tag: str | None = None,
    ) -> PullPage:
        self.pulls += 1
        if self.fail_next:
            raise self.fail_next.pop(0)
        return PullPage(changes=[], ids=[], next_cursor=after, head=after, more=False, hub_hlc=1)

    async def config(self) -> dict[str, Any]:
        return {
            "tier_rules": RULES.to_wire(),
            "resolvers": {},
            "max_batch_changes": 5000,
            "max_clock_drift_ms": 300_000,
            "hub_hlc": make_hlc(time.time_ns() // 1_000_000),
            "acked": [self.acked[lane] for lane in range(4)],
        }


def refuse_containing(seq: int, exc: Callable[[], SyncError]) -> Rule:
    return lambda b: exc() if any(c.seq == seq for c in b.changes) else None


@pytest.fixture
async def store(tmp_path: Path) -> Any:
    async with EdgeStore.open(
        tmp_path / "edge.db", node_id="edge-u", region="west", tier_rules=RULES
    ) as s:
        yield s


async def fill(store: EdgeStore, n: int) -> None:
    for i in range(n):
        await store.put(CELL, "visits", f"k{i}", {"f0": i})  # lane 2 (standard)


def syncer(
    store: EdgeStore, link: FakeLink, sleeps: list[float] | None = None, **kw: Any
) -> Syncer:
    async def sleep(s: float) -> None:
        if sleeps is not None:
            sleeps.append(s)

    return Syncer(
        store,
        link,  # type: ignore[arg-type]
        subscriptions=[CELL],
        sleep=sleep,
        backoff=Backoff(rng=random.Random(3)),
        **kw,
    )


async def test_refusal_naming_no_change_is_bisected_to_the_culprit(store: EdgeStore) -> None:
    await fill(store, 40)
    link = FakeLink(
        refuse_containing(
            23, lambda: InvalidInputError("something in there is wrong", code="mystery")
        )
    )
    s = syncer(store, link)
    assert await s.push_lane(2) == 39
    (dead,) = await store.outbox.dead_letters()
    assert (dead.seq, dead.code) == (23, "mystery")
    assert sorted(seq for _, seq in link.applied) == [i for i in range(1, 41) if i != 23]
    assert link.acked[2] == 40  # the skipped seq was declared, not left as a gap
    assert len(link.pushes) <= 2 * 6 + 4  # log2(40) halvings, not one request per change
    assert await store.outbox.next_batch() is None


async def test_refusal_naming_a_change_dead_letters_only_that_one(store: EdgeStore) -> None:
    await fill(store, 10)
    link = FakeLink(
        refuse_containing(4, lambda: ClockDriftError("ahead", detail={"seq": 4, "lane": 2}))
    )
    s = syncer(store, link)
    assert await s.push_lane(2) == 9
    assert [(d.seq, d.code, d.detail["seq"]) for d in await store.outbox.dead_letters()] == [
        (4, "clock_drift", 4)
    ]
    assert len(link.pushes) == 2
    assert link.pushes[1].skipped == [4]


async def test_a_lone_change_refused_without_a_name_is_dead_lettered(store: EdgeStore) -> None:
    await fill(store, 1)
    link = FakeLink(refuse_containing(1, lambda: LimitExceededError("big", code="body_too_large")))
    assert await syncer(store, link).push_lane(2) == 0
    assert [d.code for d in await store.outbox.dead_letters()] == ["body_too_large"]
    assert link.acked[2] == 1


@pytest.mark.parametrize(
    "refusal",
    [
        lambda: SequenceError("seqs missing", detail={"lane": 2, "acked": 0, "first": 1}),
        lambda: AuthenticationError("unknown token", code="invalid_token"),
        lambda: ForbiddenError("token of another node", code="node_mismatch"),
    ],
)
async def test_node_level_refusals_dead_letter_nothing(
    store: EdgeStore, refusal: Callable[[], SyncError]
) -> None:
    await fill(store, 5)
    link = FakeLink(lambda b: refusal())
    with pytest.raises(type(refusal())):
        await syncer(store, link).push_lane(2)
    assert len(link.pushes) == 1
    assert await store.outbox.dead_letters() == []
    assert (await store.outbox.status())[2].depth == 5


async def test_transient_failures_back_off_shrink_and_give_up(store: EdgeStore) -> None:
    await fill(store, 300)
    link = FakeLink()
    link.fail_next = [LinkError("reset by peer") for _ in range(10)]
    sleeps: list[float] = []
    s = syncer(store, link, sleeps, attempts=4)
    with pytest.raises(LinkError):
        await s.push_lane(2)
    assert len(link.pushes) == 4 and len(sleeps) == 3
    assert all(0 <= p <= s.backoff.ceiling(i) for i, p in enumerate(sleeps))
    assert [len(b.changes) for b in link.pushes] == [250, 125, 62, 31]
    assert (await store.outbox.status())[2].depth == 300


async def test_recovery_after_transient_failures(store: EdgeStore) -> None:
    await fill(store, 20)
    link = FakeLink()
    link.fail_next = [HubUnavailableError("503"), DecodeError("garbled", code=INVALID_RESPONSE)]
    sleeps: list[float] = []
    s = syncer(store, link, sleeps)
    assert await s.push_lane(2) == 20
    assert len(sleeps) == 2 and s.backoff.attempt == 0
    assert sorted(seq for _, seq in link.applied) == list(range(1, 21))


async def test_sync_round_stops_at_a_dead_link_and_reports(store: EdgeStore) -> None:
    await store.put(URGENT, "visits", "a", {"f0": 1})
    link = FakeLink()
    link.fail_next = [LinkError("down") for _ in range(50)]
    report = await syncer(store, link, attempts=2).sync_once()
    assert [(e.step, e.code) for e in report.errors] == [("push", "link_error")]
    assert link.pulls == 0 and not report.caught_up


async def test_sync_round_reports_a_stopped_lane_and_goes_on(store: EdgeStore) -> None:
    await fill(store, 3)
    await store.put(URGENT, "visits", "a", {"f0": 1})
    link = FakeLink(lambda b: SequenceError("gap") if b.lane == 2 else None)
    report = await syncer(store, link).sync_once(tiers=[Tier.STANDARD, Tier.CRITICAL])
    assert list(report.pushed) == [Tier.CRITICAL, Tier.STANDARD]
    assert [(e.step, e.tier, e.code) for e in report.errors] == [("push", Tier.STANDARD, "seq_gap")]
    assert link.pulls == 2  # pulls still ran
    assert await store.outbox.dead_letters() == []


async def test_a_failing_step_is_logged_when_it_starts_and_when_it_recovers(
    store: EdgeStore, caplog: pytest.LogCaptureFixture
) -> None:
    await fill(store, 3)
    link = FakeLink(lambda b: SequenceError("gap"))
    s = syncer(store, link)
    caplog.set_level(logging.INFO, logger="syncengine.edge.sync")
    for _ in range(3):
        report = await s.sync_once()
        assert [(e.code, e.retryable) for e in report.errors] == [("seq_gap", False)]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "seq_gap" in warnings[0].getMessage()
    link.rule = None
    assert (await s.sync_once()).caught_up
    assert sum("works again" in r.getMessage() for r in caplog.records) == 1


async def test_crash_points_fire_before_each_durable_step(
    store: EdgeStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    fired: list[str] = []
    ours = {
        "deadletter.after_reject_before_record",
        "push.after_ack_before_outbox_delete",
        "pull.after_commit_before_next_page",
    }
    monkeypatch.setattr(crashpoints, "crashpoint", lambda n: fired.append(n) if n in ours else None)
    await fill(store, 3)
    link = FakeLink(refuse_containing(2, lambda: ClockDriftError("ahead", detail={"seq": 2})))
    await syncer(store, link).sync_once(tiers=[Tier.STANDARD])
    assert fired == [
        "deadletter.after_reject_before_record",
        "push.after_ack_before_outbox_delete",
        "pull.after_commit_before_next_page",
    ]


async def test_clock_far_ahead_of_the_hub_is_said_once(
    store: EdgeStore, caplog: pytest.LogCaptureFixture
) -> None:
    class Behind(FakeLink):
        async def config(self) -> dict[str, Any]:
            return {**await super().config(), "hub_hlc": make_hlc(1_000_000_000_000)}

    s = syncer(store, Behind())
    await s.learn_config()
    await s.learn_config()
    ahead = [r for r in caplog.records if "ahead of the hub" in r.getMessage()]
    assert len(ahead) == 1 and ahead[0].levelno == logging.WARNING


async def test_a_hub_claiming_success_without_progress_stops_the_lane(store: EdgeStore) -> None:
    await fill(store, 2)

    class Stuck(FakeLink):
        async def push(self, batch: OutboxBatch) -> PushAnswer:
            return PushAnswer(acked=0, lane=batch.lane, applied=0, conflicts=0, hub_hlc=1)

    with pytest.raises(SequenceError) as info:
        await syncer(store, Stuck()).push_lane(2)
    assert info.value.code == "ack_behind"


def test_subscriptions_are_validated() -> None:
    with pytest.raises(ValidationError):
        Syncer(object(), object(), subscriptions=["Not A Prefix"])  # type: ignore[arg-type]
