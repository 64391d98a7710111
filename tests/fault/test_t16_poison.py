"""T16, a poison change does not block the queue (RELIABILITY.md §2, invariant 9).

An edge's outbox holds 10,000 changes (two lanes: critical and important) with changes the
hub refuses for good at random positions, of three kinds the edge itself accepts:

- ``not_granted`` (403): a cell of ``west/ng/lagos/clinic-12`` from a node granted
  ``west/ng/lagos/clinic-1`` (the segment-boundary trick);
- ``body_too_large`` (413): a value the edge's ``max_record_bytes`` allows but whose push
  the hub's ``max_body_bytes`` does not; the hub names no change, the edge must bisect;
- ``invalid_value`` (400): a string in a ``counter`` collection, written before the edge
  learnt the hub's resolvers.

The real daemon (``python -m syncengine edge run``) pushes them while it is killed -9 again
and again: at random moments, and by the crash point ``deadletter.after_reject_before_record``
(between the hub's refusal and the dead-letter record). Then it runs to the end.

The checks read the edge file with plain sqlite3 and the hub with asyncpg: every refused
change is in ``dead_letters`` exactly once, with the code its kind must get and a message
the hub really sent (tapped as the hub recorded it); ``syncengine status --json`` and
``syncengine edge dead-letters --json`` show them; every good change reached the hub exactly
once — ``blocked`` counts good changes behind a poison one that did not; no refused change
is stored at the hub; the outbox ends empty.

The negative control runs the daemon with the syncer patched (in the child) to stop the
lane on a rejection instead of dead-lettering: it must show blocked changes.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import random
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from fault.common import Violations, run_cli, sqlite_rows, syncengine_argv, write_edge_config
from fault.harness import SEED, Summary, crashpoint_env, crashpoint_hits, pick
from syncengine.edge.store import EdgeStore
from syncengine.tiers import TierRules

pytestmark = [pytest.mark.integration, pytest.mark.slow]

NODE = "lagos-clinic-1"
GRANT = "west/ng/lagos/clinic-1"
OTHER = "west/ng/lagos/clinic-12"  # GRANT is a string prefix of it, not a segment one
#: lane → (granted cell, refused cell); the tier rules put them in that lane.
CELLS = {
    0: (f"{GRANT}/alerts", f"{OTHER}/alerts"),
    1: (f"{GRANT}/visits", f"{OTHER}/visits"),
}
RULES = [
    {"prefix": f"{GRANT}/visits", "tier": "important"},
    {"prefix": f"{OTHER}/visits", "tier": "important"},
    {"prefix": "west/ng/lagos", "tier": "critical"},
]
HUB_MAX_BODY = 256 * 1024
EDGE_MAX_RECORD = 2 * 1024 * 1024
CRASHPOINT = "deadletter.after_reject_before_record"
#: The code each kind of poison must be dead-lettered with.
#: The counts, besides lost and duplicated, that must be 0.
VIOLATIONS = (
    "blocked",
    "missing_dead_letters",
    "duplicated_dead_letters",
    "wrongly_dead_lettered",
    "wrong_reason",
    "poison_stored",
    "outbox_left",
    "status_mismatch",
)
KIND_CODES = {
    "not_granted": "not_granted",
    "body_too_large": "body_too_large",
    "invalid_value": "invalid_value",
}
#: The syncer of a broken build: a rejection stops the lane (raised to the daemon, retried
#: forever) instead of moving the change to the dead letters. Run as ``python -c``.
BROKEN_LAUNCHER = """
import sys
from syncengine.edge import sync

async def _stop_the_lane(self, batch, exc, cap, tally):
    raise exc

sync.Syncer._reject = _stop_the_lane
from syncengine.cli import main
main(sys.argv[1:])
"""


@dataclass(frozen=True)
class Planned:
    """One change of the outbox: its key, lane and (for a poison) kind."""

    key: str
    lane: int
    kind: str | None  # None: a good change


def plan(rng: random.Random, total: int, poisons: int, oversized: int) -> list[Planned]:
    """``total`` changes; ``poisons`` of them (``oversized`` of those too big) at random
    positions, the rest of the poisons split between not_granted and invalid_value."""
    at = rng.sample(range(total), poisons)
    kinds = ["body_too_large"] * oversized + [
        ("not_granted", "invalid_value")[i % 2] for i in range(poisons - oversized)
    ]
    rng.shuffle(kinds)
    kind_at = dict(zip(at, kinds, strict=True))
    return [
        Planned(key=f"c-{i}", lane=0 if rng.random() < 0.7 else 1, kind=kind_at.get(i))
        for i in range(total)
    ]


async def write_outbox(db: Path, changes: list[Planned], rng: random.Random) -> None:
    """Queue every change through the edge's public ``put`` (group commit), before the edge
    ever talked to the hub (so it knows nothing of the hub's counter collections)."""
    rules = TierRules.from_config(RULES, source="t16", region="west")
    async with EdgeStore.open(
        db, node_id=NODE, region="west", tier_rules=rules, max_record_bytes=EDGE_MAX_RECORD
    ) as store:
        for start in range(0, len(changes), 500):
            puts = []
            for i, c in enumerate(changes[start : start + 500], start):
                good_cell, refused_cell = CELLS[c.lane]
                if c.kind == "not_granted":
                    puts.append(store.put(refused_cell, "visits", c.key, {"i": i}))
                elif c.kind == "body_too_large":
                    blob = base64.b64encode(rng.randbytes(450_000)).decode()
                    puts.append(store.put(good_cell, "visits", c.key, {"blob": blob}))
                elif c.kind == "invalid_value":
                    puts.append(store.put(good_cell, "stock", c.key, {"n": "many"}))
                else:
                    puts.append(store.put(good_cell, "visits", c.key, {"i": i}))
            await asyncio.gather(*puts)


def write_config(tmp_path: Path, url: str, token: str) -> Path:
    return write_edge_config(
        tmp_path / "edge.toml",
        node=NODE,
        db=tmp_path / "edge.db",
        url=url,
        token=token,
        subscriptions=[GRANT],
        rules=RULES,
        more=[
            f"max_record_bytes = {EDGE_MAX_RECORD}",
            "",
            "[tier_policies.critical]",
            "retry_interval_s = 1",
            "[tier_policies.important]",
            "push_interval_s = 1",
            "retry_interval_s = 1",
            "pull_interval_s = 60",
        ],
    )


class Daemon:
    """One ``syncengine edge run`` child (or the broken build's), stopped by its pid."""

    def __init__(self, config: Path, log: Path, env: dict[str, str], broken: bool = False) -> None:
        self.config, self.log, self.env, self.broken = config, log, env, broken
        self.proc: asyncio.subprocess.Process | None = None
        self._runs = 0

    async def start(self) -> Daemon:
        head = ["-c", BROKEN_LAUNCHER] if self.broken else ["-m", "syncengine"]
        self._runs = self._count_runs()
        with self.log.open("ab") as err:
            self.proc = await asyncio.create_subprocess_exec(
                *syncengine_argv(
                    "edge", "run", "--config", str(self.config), "--log-format", "json", head=head
                ),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=err,
                env=self.env,
            )
        return self

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def wait_running(self, timeout: float) -> None:
        """Until this child says it runs (each start appends one such line to the log),
        or it died first."""
        before = self._runs

        async def up() -> bool:
            return not self.running or self._count_runs() > before

        assert await until(up, timeout, every_s=0.05), (
            f"the daemon did not start within {timeout:.0f} s: see {self.log}"
        )

    def _count_runs(self) -> int:
        if not self.log.exists():
            return 0
        return self.log.read_text(errors="replace").count("edge daemon running")

    async def wait(self, timeout: float) -> int | None:
        assert self.proc is not None
        try:
            return await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            return None

    async def stop(self, sig: int) -> int:
        assert self.proc is not None
        if self.proc.returncode is None:
            os.kill(self.proc.pid, sig)
        return await asyncio.wait_for(self.proc.wait(), 30)


Spawn = Callable[..., Awaitable[Daemon]]


@pytest.fixture
async def spawn() -> AsyncIterator[Spawn]:
    """``await spawn(config, log, env, broken=False)`` starts a daemon child; any still
    running when the test ends (a failed check) is killed by its pid."""
    started: list[Daemon] = []

    async def start(config: Path, log: Path, env: dict[str, str], broken: bool = False) -> Daemon:
        d = await Daemon(config, log, env, broken).start()
        started.append(d)
        return d

    yield start
    for d in started:
        if d.running:
            await d.stop(signal.SIGKILL)


async def until(check: Any, timeout: float, every_s: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await check():
            return True
        await asyncio.sleep(every_s)
    return False


async def cli_json(config: Path, *args: str) -> dict[str, Any]:
    """Run a ``syncengine`` command (as an operator would) and parse its JSON output."""
    code, out, err = await run_cli(config, *args)
    try:
        return dict(json.loads(out))
    except ValueError:
        raise AssertionError(
            f"syncengine {' '.join(args)} printed no JSON (exit {code}): "
            f"{out[:300]!r} {err[-500:]!r}"
        ) from None


def tap_hub_errors(hub: Any) -> set[tuple[str, str]]:
    """The (code, message) of every refusal the hub answers a node with, as it records
    them for `status` (an observation tap: the hub's behaviour is unchanged)."""
    said: set[tuple[str, str]] = set()
    activity = hub.hub.activity
    record = activity.failed

    async def failed(node_id: str, code: str, message: str) -> None:
        said.add((code, message))
        await record(node_id, code, message)

    activity.failed = failed
    return said


async def judge(
    changes: list[Planned],
    queued: dict[str, tuple[int, int]],
    db: Path,
    pg_dsn: str,
    said: set[tuple[str, str]] | None,
) -> Violations:
    """Compare the edge file and the hub's feed with the plan."""
    out = Violations()
    dead: dict[str, list[tuple[str, str, int, int]]] = {}
    for key, code, message, lane, seq in sqlite_rows(
        db, "SELECT key, code, message, lane, seq FROM dead_letters"
    ):
        dead.setdefault(key, []).append((code, message, lane, seq))
    outbox_left = sqlite_rows(db, "SELECT count(*) FROM outbox")[0][0]
    conn = await asyncpg.connect(pg_dsn)
    try:
        feed = Counter(
            r["key"] for r in await conn.fetch("SELECT key FROM feed WHERE node_id = $1", NODE)
        )
        stored = {r["key"] for r in await conn.fetch("SELECT key FROM records")}
    finally:
        await conn.close()
    # Per lane, the lowest seq of a poison: every good change above it is "behind" one.
    first_poison: dict[int, int] = {}
    for c in changes:
        if c.kind is not None:
            lane, seq = queued[c.key]
            first_poison[lane] = min(first_poison.get(lane, seq), seq)
    for c in changes:
        lane, seq = queued[c.key]
        letters = dead.get(c.key, [])
        if c.kind is None:
            if letters:
                out.bad("wrongly_dead_lettered", f"{c.key}: {letters[0][:2]}")
            if feed[c.key] == 0 or c.key not in stored:
                out.bad("lost", f"{c.key} (lane {lane} seq {seq}) never reached the hub")
                if seq > first_poison.get(lane, seq):
                    out.bad("blocked", f"{c.key} (lane {lane} seq {seq}) stuck behind a poison")
            elif feed[c.key] > 1:
                out.bad("duplicated", f"{c.key} is in the hub's feed {feed[c.key]} times")
            continue
        if feed[c.key] or c.key in stored:
            out.bad("poison_stored", f"{c.key} ({c.kind}) is at the hub")
        if not letters:
            out.bad("missing_dead_letters", f"{c.key} ({c.kind}, lane {lane} seq {seq})")
            continue
        if len(letters) > 1:
            out.bad("duplicated_dead_letters", f"{c.key} is dead-lettered {len(letters)} times")
        code, message, d_lane, d_seq = letters[0]
        if (
            code != KIND_CODES[c.kind]
            or (d_lane, d_seq) != (lane, seq)
            or (said is not None and (code, message) not in said)
        ):
            out.bad("wrong_reason", f"{c.key} ({c.kind}): {code} {message[:120]!r}")
    if outbox_left:
        out.bad("outbox_left", f"{outbox_left} changes still queued", outbox_left)
    return out


async def check_cli(
    config: Path, changes: list[Planned], queued: dict[str, tuple[int, int]], out: Violations
) -> None:
    """What an operator sees: the status count and the dead-letter listing."""
    poison = {c.key: c for c in changes if c.kind is not None}
    status = await cli_json(config, "status")
    shown = status["dead_letters"]["count"]
    per_tier = sum(t["dead_letters"] for t in status["tiers"])
    if shown != len(poison) or per_tier != len(poison):
        out.bad(
            "status_mismatch",
            f"status shows {shown} dead letters ({per_tier} by tier), {len(poison)} expected",
            abs(len(poison) - shown) or 1,
        )
    listing = (await cli_json(config, "edge", "dead-letters"))["dead_letters"]
    listed = {d["key"]: d for d in listing}
    tiers = {0: "critical", 1: "important"}
    for key, c in poison.items():
        d = listed.get(key)
        lane, seq = queued[key]
        if (
            d is None
            or d["id"] != f"{tiers[lane]}:{seq}"
            or d["code"] != KIND_CODES[str(c.kind)]
            or not d["message"]
        ):
            out.bad("status_mismatch", f"edge dead-letters shows {key} as {d}")


async def prepare(
    tmp_path: Path, hub: Any, changes: list[Planned], rng: random.Random
) -> tuple[Path, Path, dict[str, tuple[int, int]]]:
    token = await hub.add_node(NODE, GRANT)
    config = write_config(tmp_path, hub.url, token)
    db = tmp_path / "edge.db"
    await write_outbox(db, changes, rng)
    queued = {
        k: (lane, seq) for k, lane, seq in sqlite_rows(db, "SELECT key, lane, seq FROM outbox")
    }
    assert len(queued) == len(changes), f"{len(queued)} queued of {len(changes)} written"
    return config, db, queued


async def test_t16_poison_changes_do_not_block_the_queue(
    tmp_path: Path, hub_factory: Any, pg_dsn: str, spawn: Spawn
) -> None:
    """Poison changes at random positions of a 10,000-change outbox, pushed by the daemon
    while it is killed -9 (at random and between a refusal and its dead-letter record): each
    is dead-lettered once with the hub's reason and shown by status, every good change
    reaches the hub once, the outbox ends empty."""
    started = time.monotonic()
    rng = random.Random(SEED)
    total = pick(10_000, 100_000)
    changes = plan(rng, total, poisons=pick(40, 600), oversized=pick(4, 30))
    hub = await hub_factory(tier_rules=RULES, max_body_bytes=HUB_MAX_BODY)
    said = tap_hub_errors(hub)
    mark = time.monotonic()
    config, db, queued = await prepare(tmp_path, hub, changes, rng)
    timings = {"write_s": time.monotonic() - mark}
    mark = time.monotonic()
    hits_log = tmp_path / "crashpoints.log"
    log = tmp_path / "daemon.log"
    kills = Counter[str]()
    queued_at_kill: list[int] = []

    def outbox_depth() -> int:
        return int(sqlite_rows(db, "SELECT count(*) FROM outbox")[0][0])

    async def drained() -> bool:
        return outbox_depth() == 0

    # Kill points spread over the whole queue: each run is killed once the outbox is down
    # to its mark (plus a random moment), unless the crash point got it first.
    marks = sorted((rng.randrange(total) for _ in range(pick(5, 60))), reverse=True)
    for cycle, left in enumerate(marks):
        if cycle and await drained():
            break
        # Cycle 0 dies at its first refusal for sure; odd cycles may die at one.
        prob = 1.0 if cycle == 0 else (0.3 if cycle % 2 else 0.0)
        env = crashpoint_env({CRASHPOINT: prob}, hits_log) if prob else dict(os.environ)
        d = await spawn(config, log, env)
        await d.wait_running(timeout=60)

        async def down_to_mark(d: Daemon = d, left: int = left) -> bool:
            return not d.running or outbox_depth() <= left

        if cycle:
            await until(down_to_mark, timeout=pick(60, 600), every_s=0.05)
        code = await d.wait(30.0 if cycle == 0 else rng.uniform(0.0, 0.3))
        if code is None:
            await d.stop(signal.SIGKILL)
            kills["sigkill"] += 1
        else:
            assert code == -signal.SIGKILL, f"daemon exited {code}: see {log}"
            kills["crashpoint"] += 1
        # Where each kill struck: changes still queued (the kills must land mid-queue).
        queued_at_kill.append(outbox_depth())
    timings["kills_s"] = time.monotonic() - mark
    mark = time.monotonic()
    d = await spawn(config, log, dict(os.environ))
    await d.wait_running(timeout=60)  # (a SIGTERM before its handler is set would kill it)
    finished = await until(drained, timeout=pick(120, 1200), every_s=0.5)
    code = await d.stop(signal.SIGTERM)
    assert code == 0, f"the daemon did not stop cleanly on SIGTERM (exit {code}): see {log}"
    timings["drain_s"] = time.monotonic() - mark
    outcome = await judge(changes, queued, db, pg_dsn, said)
    await check_cli(config, changes, queued, outcome)
    poisons = sum(c.kind is not None for c in changes)
    summary = Summary(
        test="T16",
        name="poison changes under kill -9",
        cases=total,
        acknowledged=total,
        counts={name: outcome.counts[name] for name in ("lost", "duplicated", *VIOLATIONS)},
        extra_violations=VIOLATIONS,
        figures={
            "poisons": poisons,
            "by_kind": dict(Counter(str(c.kind) for c in changes if c.kind)),
            "kills": dict(kills),
            "queued_at_kill": queued_at_kill,
            "drained": finished,
            **{k: round(v, 1) for k, v in timings.items()},
            "examples": outcome.examples,
        },
        started=started,
    )
    summary.cover([CRASHPOINT], crashpoint_hits(hits_log))
    summary.finish()


async def test_t16_control_stopping_the_lane_blocks(
    tmp_path: Path, hub_factory: Any, pg_dsn: str, spawn: Spawn
) -> None:
    """Negative control: a daemon whose syncer stops the lane at a rejection (instead of
    dead-lettering) must leave good changes blocked behind the poison."""
    started = time.monotonic()
    rng = random.Random(SEED)
    changes = plan(rng, 400, poisons=4, oversized=0)
    hub = await hub_factory(tier_rules=RULES, max_body_bytes=HUB_MAX_BODY)
    config, db, queued = await prepare(tmp_path, hub, changes, rng)
    conn = await asyncpg.connect(pg_dsn)
    seen: list[int] = []

    async def refused() -> bool:
        return bool(
            await conn.fetchval(
                "SELECT last_error_code IS NOT NULL FROM nodes WHERE node_id = $1", NODE
            )
        )

    async def settled() -> bool:
        # The hub's feed stopped growing for a while: the lanes went as far as they go.
        seen.append(await conn.fetchval("SELECT count(*) FROM feed WHERE node_id = $1", NODE))
        return len(seen) > 6 and seen[-1] == seen[-6]

    d = await spawn(config, tmp_path / "daemon.log", dict(os.environ), broken=True)
    try:
        assert await until(refused, timeout=60), "the broken daemon never met a refusal"
        await until(settled, timeout=30, every_s=0.25)
    finally:
        await d.stop(signal.SIGKILL)
        await conn.close()
    outcome = await judge(changes, queued, db, pg_dsn, None)
    Summary(
        test="T16",
        name="control: a rejection stops the lane",
        cases=len(changes),
        counts={"blocked": outcome.counts["blocked"], "lost": outcome.counts["lost"]},
        extra_violations=("blocked",),
        figures={"examples": outcome.examples},
        started=started,
    ).control("blocked")
