"""The edge daemon: every tier on its schedule, critical first, the rest off-peak.

:class:`EdgeDaemon` is what ``syncengine edge run`` runs, and what an application can embed
in its own event loop (``async with EdgeDaemon(config) as daemon``). It owns a store, a link
and a :class:`~syncengine.edge.sync.Syncer`, and decides *when* each step runs:

- **critical** pushes leave on every write. A watcher polls ``PRAGMA data_version`` on a
  connection of its own (one page read, no table scan), which changes whenever *any*
  connection commits — this process's store or an application in another process writing
  to the same file — and then probes the critical lane's newest seq through its primary key.
  A new change starts a debounce of ``debounce_ms``; whatever was written by its end travels
  as one batch. Critical cells are pulled live, by long-poll.
- **important** (and any ``interval`` or ``cron`` tier) pushes and pulls on its schedule,
  through APScheduler (:mod:`syncengine.scheduler`); each tier also runs once at start.
- **off-peak** tiers (``offpeak_only``: standard and archive by default) run only inside the
  region's window, read on the region's clock: a run due outside it is deferred to the next
  opening. :meth:`EdgeDaemon.sync_now` forces a tier anyway.
- **priority**: lower lanes yield between batches to a critical push
  (:class:`~syncengine.edge.sync.PriorityGate`), so a huge archive backlog delays a critical
  change by at most the batches already in flight (two, pipelined); after the link returns, the first
  critical push runs before any other step.
- **offline**: the daemon tracks whether the hub is reachable. While it is not, only one
  probe runs, with full-jitter backoff capped at critical's ``retry_interval_s``; steps wait
  instead of failing in a loop, and the log gets one line when the link goes and one when it
  comes back.
- **bootstrap**: a store that never pulled its subscriptions fetches them through the
  resumable snapshot before pulling the feed (pushes do not wait for it).
- **eviction** of archive records runs hourly.

Stopping (:meth:`EdgeDaemon.close`, SIGTERM) cancels the steps in flight: a pull page and
its cursor commit in one transaction and an outbox row leaves only after the hub's answer,
so an abandoned step is simply done again after restart. Then the store finishes its queued
writes and closes, within a bounded time.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import enum
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import MappingProxyType, TracebackType
from typing import Any, Final, Literal

from aiohttp import web

from syncengine import service, tasks
from syncengine.config import EdgeConfig, parse_listen
from syncengine.edge import sqlite as edge_sqlite
from syncengine.edge.link import HubLink
from syncengine.edge.metrics import EdgeMetrics
from syncengine.edge.store import EdgeStore
from syncengine.edge.sync import Backoff, Syncer, is_transient
from syncengine.errors import (
    AuthenticationError,
    ConfigError,
    InvalidInputError,
    PermissionDeniedError,
    RetryableError,
    SyncError,
)
from syncengine.regions import Region, load_regions
from syncengine.scheduler import Job, Scheduler
from syncengine.tiers import PullMode, PushMode, Retention, Tier, TierPolicy

__all__ = [
    "DEFAULT_STOP_TIMEOUT_S",
    "DEFAULT_WATCH_INTERVAL_S",
    "DaemonHealth",
    "EdgeDaemon",
    "LinkState",
    "connect_link",
    "open_store",
]

log = logging.getLogger(__name__)

#: How often the watcher reads ``PRAGMA data_version``: the floor of a critical push's delay.
DEFAULT_WATCH_INTERVAL_S: Final = 0.025
#: Stopping takes at most about this long (cancel the steps, finish queued writes, close).
DEFAULT_STOP_TIMEOUT_S: Final = 10.0
#: How often archive eviction runs.
EVICT_INTERVAL_S: Final = 3600
#: How often the hub's config (tier rules, resolvers, batch cap) is fetched again. Long-polls
#: carry the hub's config tag, so a change is learnt at once; this is the safety net.
CONFIG_INTERVAL_S: Final = 6 * 3600
#: Tries of one request inside a step; past them the link counts as down and the probe
#: takes over, so a dead link costs one request per probe, not a retry loop per tier.
STEP_ATTEMPTS: Final = 2
#: Longest pause between probes of a hub that refuses this node (wrong token).
REFUSED_PROBE_S: Final = 60.0

Step = Literal["push", "pull"]


class LinkState(enum.StrEnum):
    """What the daemon knows of its hub."""

    UNKNOWN = "unknown"  # not tried yet
    ONLINE = "online"
    OFFLINE = "offline"  # not reachable: no link, timeouts, 5xx
    REFUSED = "refused"  # reachable, but it refuses this node (token)


@dataclass(frozen=True, kw_only=True, slots=True)
class DaemonHealth:
    """A snapshot of the daemon for an embedding application or a status page."""

    link: LinkState
    #: When ``link`` last changed (UTC).
    since: dt.datetime
    #: When each step last succeeded (UTC), by ``"push:<tier>"`` / ``"pull:<tier>"``.
    last_success: MappingProxyType[str, dt.datetime]
    #: Steps waiting for the off-peak window, and when it opens (UTC).
    deferred: MappingProxyType[str, dt.datetime]
    bootstrapped: bool


def open_store(config: EdgeConfig) -> contextlib.AbstractAsyncContextManager[EdgeStore]:
    """The node's store, opened (created and migrated if needed) with its config."""
    return EdgeStore.open(
        config.db,
        node_id=config.node_id,
        region=config.region,
        tier_rules=config.tier_rules,
        resolvers=config.resolvers,
        max_record_bytes=config.max_record_bytes,
        busy_timeout_ms=config.busy_timeout_ms,
    )


def connect_link(config: EdgeConfig, region: Region, *, timeout_s: float | None = None) -> HubLink:
    """A link to the node's hub (``hub_url``, else the region's) with its token
    (``timeout_s``: the link's request timeout, default the link's own).

    Raises :class:`ConfigError` when no token is configured or the token file is unreadable.
    """
    token = config.token
    if token is None:
        raise ConfigError(
            "no token configured for this node",
            hint="Set token_file (or token) in edge.toml to the token `syncengine hub "
            "add-node` printed.",
            detail={"key": "token_file"},
        )
    url = config.hub_url or region.hub_url
    if timeout_s is None:
        return HubLink(url, token, node_id=config.node_id)
    return HubLink(url, token, node_id=config.node_id, timeout_s=timeout_s)


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class _Reachability:
    """The link's state, its one log line per change, and events to wait on."""

    def __init__(self, node_id: str, origin: str, notify: Callable[[str], object]) -> None:
        self.node_id = node_id
        self.origin = origin
        self.state = LinkState.UNKNOWN
        self.since = _utcnow()
        self._notify = notify
        self._up = asyncio.Event()
        self._not_up = asyncio.Event()
        self._not_up.set()
        #: Set by each transition to ONLINE; the daemon clears it after its critical push.
        self.reconnected = asyncio.Event()

    async def wait_up(self) -> None:
        await self._up.wait()

    async def wait_not_up(self) -> None:
        await self._not_up.wait()

    def up(self) -> None:
        if self.state is LinkState.ONLINE:
            return
        was, for_s = self.state, (_utcnow() - self.since).total_seconds()
        self._set(LinkState.ONLINE)
        if was is LinkState.UNKNOWN:
            log.info("node %s: hub %s reachable", self.node_id, self.origin, extra=self._extra())
        else:
            log.info(
                "node %s: hub %s reachable again after %.0f s %s; syncing, critical first",
                self.node_id,
                self.origin,
                for_s,
                was.value,
                extra=self._extra(),
            )
        self.reconnected.set()

    def down(self, exc: SyncError, *, retry_s: float) -> None:
        if self.state is LinkState.OFFLINE:
            return
        self._set(LinkState.OFFLINE)
        log.warning(
            "node %s: hub %s unreachable (%s: %s); working offline, changes stay queued, "
            "trying again every %.0f s or less",
            self.node_id,
            self.origin,
            exc.code,
            exc.message,
            retry_s,
            extra=self._extra(exc.code),
        )

    def refused(self, exc: SyncError) -> None:
        if self.state is LinkState.REFUSED:
            return
        self._set(LinkState.REFUSED)
        log.error(
            "node %s: hub %s refuses this node (%s): %s%s",
            self.node_id,
            self.origin,
            exc.code,
            exc.message,
            f" (hint: {exc.hint})" if exc.hint else "",
            extra=self._extra(exc.code),
        )

    def _extra(self, code: str | None = None) -> dict[str, str]:
        """Fields of a link-state line for JSON logs (``--log-format json``)."""
        fields = {"node": self.node_id, "event": "link", "link": self.state.value}
        if code is not None:
            fields["code"] = code
        return fields

    def _set(self, state: LinkState) -> None:
        self.state = state
        self.since = _utcnow()
        if state is LinkState.ONLINE:
            self._not_up.clear()
            self._up.set()
        else:
            self._up.clear()
            self._not_up.set()
        self._notify(f"STATUS=hub {state.value}")


class EdgeDaemon:
    """The long-running sync of one edge node.

    ``config`` is the node's config. ``region`` defaults to the config's region from
    ``regions/``; ``store`` and ``link`` may be passed in (then they are borrowed, not
    closed), e.g. by an application that already has the store open. ``now`` is the clock
    the off-peak window is read on (injectable for tests); ``notify`` sends systemd
    notifications; ``progress(records, prefix)`` is told of bootstrap progress.

    Use ``async with EdgeDaemon(config) as daemon`` (or :meth:`start` / :meth:`close`).
    :meth:`start` raises what opening the store or the link raises (:class:`ConfigError`,
    :class:`StorageError`). A failure of the store while running (disk full, corruption)
    stops the daemon: :meth:`wait` raises it.
    """

    def __init__(
        self,
        config: EdgeConfig,
        *,
        region: Region | None = None,
        store: EdgeStore | None = None,
        link: HubLink | None = None,
        now: Callable[[], dt.datetime] = _utcnow,
        watch_interval_s: float = DEFAULT_WATCH_INTERVAL_S,
        stop_timeout_s: float = DEFAULT_STOP_TIMEOUT_S,
        notify: Callable[[str], object] = service.notify,
        progress: Callable[[int, str], object] | None = None,
    ) -> None:
        self.config = config
        self.region = region if region is not None else load_regions()[config.region]
        self.policies = config.tier_policies
        self._store = store
        self._link = link
        self._owns_link = link is None
        self._stack = contextlib.AsyncExitStack()  # what the daemon opened, closed in reverse
        self._now = now
        self._watch_interval_s = watch_interval_s
        self._stop_timeout_s = stop_timeout_s
        self._notify = notify
        self._progress = progress
        self._syncer: Syncer | None = None
        self._reach: _Reachability | None = None
        self._scheduler = Scheduler(self.region.timezone)
        self._main: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        self._bootstrapped = asyncio.Event()
        self._due: dict[tuple[Step, Tier], asyncio.Event] = {}
        self._forced: set[tuple[Step, Tier]] = set()
        self._deferred: dict[str, dt.datetime] = {}
        self._last_success: dict[str, dt.datetime] = {}
        self._final_errors: dict[str, str] = {}
        self._closed = False
        self._metrics = EdgeMetrics(config.node_id) if config.metrics_listen else None
        # The live long-poll in flight: when it began and the tiers it watches for changes
        # (those the previous one confirmed the hub watches). Their interval pulls wait.
        self._watching: tuple[float, frozenset[Tier]] | None = None

    # -- what the application sees ------------------------------------------------------------

    @property
    def store(self) -> EdgeStore:
        """The node's store: write through it while the daemon runs."""
        if self._store is None:
            raise RuntimeError("the daemon is not started")
        return self._store

    @property
    def syncer(self) -> Syncer:
        if self._syncer is None:
            raise RuntimeError("the daemon is not started")
        return self._syncer

    @property
    def link_state(self) -> LinkState:
        return self._reach.state if self._reach is not None else LinkState.UNKNOWN

    def health(self) -> DaemonHealth:
        reach = self._reach
        return DaemonHealth(
            link=self.link_state,
            since=reach.since if reach is not None else _utcnow(),
            last_success=MappingProxyType(dict(self._last_success)),
            deferred=MappingProxyType(dict(self._deferred)),
            bootstrapped=self._bootstrapped.is_set(),
        )

    async def get(self, cell: str, collection: str, key: str) -> dict[str, Any] | None:
        """A record's document, or None. An archive record evicted locally is fetched back
        from the hub; :class:`NotAvailableOffline` when the hub cannot be reached then."""
        return await self.syncer.get(cell, collection, key)

    def in_window(self) -> bool:
        """Whether the region's off-peak window is open now (on the daemon's clock)."""
        return self.region.in_offpeak(self._now())

    def sync_now(self, tiers: Iterable[Tier] | None = None) -> None:
        """Run the push and pull of ``tiers`` (default: all) as soon as the link allows,
        off-peak windows notwithstanding."""
        for tier in Tier if tiers is None else tiers:
            for step in ("push", "pull"):
                key = (step, Tier(tier))
                if key in self._due:
                    self._forced.add(key)
                    self._due[key].set()

    # -- lifecycle ----------------------------------------------------------------------------

    async def __aenter__(self) -> EdgeDaemon:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def start(self) -> None:
        """Open the store and the link, start the scheduler and the workers; return once the
        daemon runs (systemd hears ``READY=1`` then)."""
        if self._main is not None:
            raise RuntimeError("the daemon was started already")
        try:
            if self._store is None:
                self._store = await self._stack.enter_async_context(open_store(self.config))
            if self._link is None:
                self._link = await self._stack.enter_async_context(
                    connect_link(self.config, self.region)
                )
            if self.config.metrics_listen is not None:
                await self._serve_metrics(self.config.metrics_listen)
        except BaseException:
            await self._stack.aclose()
            raise
        self._syncer = Syncer(
            self._store,
            self._link,
            subscriptions=self.config.subscriptions,
            attempts=STEP_ATTEMPTS,
            log_link_state=False,
            observer=self._metrics,
        )
        self._reach = _Reachability(self.config.node_id, self._link.origin, self._notify)
        self._main = asyncio.create_task(
            self._supervise(), name=f"edge-daemon-{self._store.node_id}"
        )
        ready = asyncio.create_task(self._ready.wait())
        try:
            await asyncio.wait({ready, self._main}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            ready.cancel()
        if self._main.done():
            await self.close()  # the workers failed to start: close and raise why
        log.info(
            "node %s: edge daemon running: store %s, hub %s, subscriptions %s",
            self._store.node_id,
            self._store.path,
            self._link.origin,
            ", ".join(self.config.subscriptions) or "none",
        )
        self._notify("READY=1")

    async def _serve_metrics(self, listen: str) -> None:
        """Serve ``/metrics`` (Prometheus) on ``listen`` until the daemon closes."""
        host, port = parse_listen(listen)
        app = web.Application()
        app.router.add_get("/metrics", self._metrics_page)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        self._stack.push_async_callback(runner.cleanup)
        try:
            await web.TCPSite(runner, host, port).start()
        except OSError as exc:
            raise ConfigError(
                f"metrics_listen {listen}: cannot listen there: {exc.strerror or exc}",
                hint="Pick a free port, or an address of this machine, in edge.toml.",
                detail={"key": "metrics_listen"},
            ) from None
        log.info("node %s: metrics on http://%s/metrics", self.config.node_id, listen)

    async def _metrics_page(self, request: web.Request) -> web.Response:
        if self._metrics is None or self._syncer is None:
            raise web.HTTPServiceUnavailable(text="starting")
        body, content_type = await self._metrics.render(
            self.store, self._syncer.link, link_up=self.link_state is LinkState.ONLINE
        )
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def wait(self) -> None:
        """Wait until the daemon stops by itself (only on a failure, which is raised)."""
        if self._main is None:
            raise RuntimeError("the daemon is not started")
        await asyncio.shield(self._main)

    async def close(self) -> None:
        """Stop: cancel the steps in flight, let queued writes commit, close what the daemon
        opened. Idempotent; bounded by ``stop_timeout_s`` (plus the store's own bound)."""
        if self._closed:
            return
        self._closed = True
        self._notify("STOPPING=1")
        self._scheduler.shutdown()
        failure: BaseException | None = None
        main = self._main
        # tasks.stop logs a task (edge-daemon-<node>) that outlives its bound.
        stopped = main is not None and await tasks.stop(main, timeout_s=self._stop_timeout_s)
        if stopped and main is not None and not main.cancelled():
            failure = main.exception()
        await self._stack.aclose()
        log.info("edge daemon stopped")
        if failure is not None:
            raise failure

    # -- the workers --------------------------------------------------------------------------

    async def _supervise(self) -> None:
        """Own every worker; the first one to fail (a store failure) stops them all."""
        for tier in Tier:
            policy = self.policies[tier]
            self._due[("push", tier)] = asyncio.Event()
            if policy.pull_mode is PullMode.INTERVAL:
                self._due[("pull", tier)] = asyncio.Event()
        try:
            await self._run_workers()
        except BaseExceptionGroup as group:
            # One worker's failure cancels the rest; the caller wants that failure itself.
            failures = [e for e in group.exceptions if not isinstance(e, asyncio.CancelledError)]
            if len(failures) == 1:
                raise failures[0] from None
            raise

    async def _run_workers(self) -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(self._probe(), name="probe")
            group.create_task(self._bootstrap(), name="bootstrap")
            group.create_task(self._watch_outbox(), name="watch-outbox")
            for step, tier in self._due:
                group.create_task(self._step_worker(step, tier), name=f"{step}:{tier}")
            if (
                self.config.subscriptions
                and self.policies[Tier.CRITICAL].pull_mode is PullMode.LIVE
            ):
                group.create_task(self._live_pull(Tier.CRITICAL), name="pull:critical:live")
            watchdog_s = service.watchdog_interval_s()
            if watchdog_s is not None:
                group.create_task(self._watchdog(watchdog_s), name="watchdog")
            self._schedule()
            self._scheduler.start()
            for step, tier in self._due:
                self._fire(step, tier)  # every tier once at start
            self._ready.set()

    def _schedule(self) -> None:
        for tier in Tier:
            policy = self.policies[tier]
            push_id = f"push:{tier}"
            if policy.push_mode is PushMode.ON_WRITE:
                # A safety net under the watcher, and the promised retry every few seconds.
                self._scheduler.every(push_id, policy.retry_interval_s, self._job("push", tier))
            elif policy.push_mode is PushMode.INTERVAL:
                assert policy.push_interval_s is not None
                self._scheduler.every(push_id, policy.push_interval_s, self._job("push", tier))
            elif policy.push_mode is PushMode.CRON:
                assert policy.push_cron is not None
                self._scheduler.cron(push_id, policy.push_cron, self._job("push", tier))
            if policy.pull_mode is PullMode.INTERVAL:
                assert policy.pull_interval_s is not None
                self._scheduler.every(
                    f"pull:{tier}", policy.pull_interval_s, self._interval_pull(tier)
                )
        if any(p.retention is Retention.EVICT for p in self.policies.values()):
            self._scheduler.every("evict", EVICT_INTERVAL_S, self._evict)
        self._scheduler.every("config", CONFIG_INTERVAL_S, self._relearn_config)

    def _interval_pull(self, tier: Tier) -> Job:
        async def job() -> None:
            if not self._watched(tier):
                self._fire("pull", tier)

        return job

    def _watched(self, tier: Tier) -> bool:
        """Whether the live long-poll in flight watches ``tier``: the hub ends it as soon as
        the tier has a change for this node, so an interval pull would find nothing. Not
        once it has been held well past its wait (a link that died without a word)."""
        if self._watching is None:
            return False
        began, tiers = self._watching
        limit = max(p.long_poll_idle_s or 0 for p in self.policies.values()) + 60
        return tier in tiers and time.monotonic() - began < limit

    def _job(self, step: Step, tier: Tier) -> Job:
        async def job() -> None:
            self._fire(step, tier)

        return job

    def _fire(self, step: Step, tier: Tier) -> None:
        """A step is due: run it now, or at the next off-peak opening if it must wait."""
        if self._must_wait(step, tier):
            self._defer(step, tier)
        else:
            self._due[(step, tier)].set()

    def _must_wait(self, step: Step, tier: Tier) -> bool:
        return (
            self.policies[tier].offpeak_only
            and (step, tier) not in self._forced
            and not self.in_window()
        )

    def _defer(self, step: Step, tier: Tier) -> None:
        job_id = f"open:{step}:{tier}"
        if self._scheduler.next_run(job_id) is not None:
            return  # already waiting for this opening
        now = self._now()
        opens = self.region.next_offpeak(now)
        delay = max(0.0, (opens - now).total_seconds())
        when = self._scheduler.once(job_id, delay, self._job(step, tier))
        self._deferred[f"{step}:{tier}"] = when
        log.info(
            "node %s: %s of %s waits for the off-peak window %s %s (opens %s, in %s)",
            self.config.node_id,
            step,
            tier,
            self.region.offpeak,
            self.region.timezone.key,
            opens.strftime("%Y-%m-%d %H:%M %Z"),
            _span(delay),
        )

    async def _step_worker(self, step: Step, tier: Tier) -> None:
        """Run one step each time it is due, when the link (and for pulls, the bootstrap)
        allows. A transient failure leaves it due for when the link returns; a final one is
        logged and retried after the tier's ``retry_interval_s``."""
        due = self._due[(step, tier)]
        policy = self.policies[tier]
        reach = self._reach
        assert reach is not None
        while True:
            await due.wait()
            await self._wait_up(step, tier)
            if step == "pull":
                await self._bootstrapped.wait()
            if tier is not Tier.CRITICAL:
                # After the link returns, the first critical push goes before anything else.
                await self._critical_first()
            if policy.push_mode is PushMode.ON_WRITE and step == "push" and policy.debounce_ms:
                await asyncio.sleep(policy.debounce_ms / 1000)
            if not due.is_set():
                continue
            if self._must_wait(step, tier):
                due.clear()
                self._defer(step, tier)
                continue
            due.clear()
            self._forced.discard((step, tier))
            self._deferred.pop(f"{step}:{tier}", None)
            try:
                if step == "push":
                    await self.syncer.push_lane(tier.priority)
                else:
                    await self.syncer.pull_tier(tier)
            except SyncError as exc:
                self._step_failed(step, tier, exc, policy)
                continue
            finally:
                if step == "push" and tier is Tier.CRITICAL:
                    reach.reconnected.clear()
            self._step_succeeded(step, tier)

    def _set_due(self, key: tuple[Step, Tier]) -> None:
        due = self._due.get(key)  # the live pull has no flag: it loops by itself
        if due is not None:
            due.set()

    async def _wait_up(self, step: Step, tier: Tier) -> None:
        """Wait until the link is up. Meanwhile a due critical push holds the lower lanes: a
        lower push already under way (it does not wait for the link between batches) would
        otherwise send its next batch ahead of it. The hold is renewed twice a second, and
        once more when the link returns, so that it spans the wait and the debounce before
        the push claims its lane even on a busy event loop."""
        reach = self._reach
        assert reach is not None
        if step != "push" or tier is not Tier.CRITICAL or reach.state is LinkState.ONLINE:
            await reach.wait_up()
            return
        gate, lane = self.syncer.gate, tier.priority
        while True:
            gate.announce(lane, for_s=2.0)
            try:
                async with asyncio.timeout(0.5):
                    await reach.wait_up()
            except TimeoutError:
                continue
            gate.announce(lane, for_s=2.0)
            return

    async def _critical_first(self) -> None:
        reach = self._reach
        assert reach is not None
        while reach.reconnected.is_set() and reach.state is LinkState.ONLINE:
            self.syncer.gate.announce(Tier.CRITICAL.priority)
            self._due[("push", Tier.CRITICAL)].set()
            await asyncio.sleep(0.05)

    def _step_succeeded(self, step: Step, tier: Tier) -> None:
        key = f"{step}:{tier}"
        self._last_success[key] = _utcnow()
        if self._final_errors.pop(key, None) is not None:
            log.info("node %s: %s of %s works again", self.config.node_id, step, tier)

    def _step_failed(self, step: Step, tier: Tier, exc: SyncError, policy: TierPolicy) -> None:
        """Decide what a failed step does next. Raises what is not a sync outcome (the
        store's own failures), which stops the daemon."""
        reach = self._reach
        assert reach is not None
        key = (step, tier)
        if is_transient(exc):
            reach.down(exc, retry_s=self._probe_cap_s())
            if step == "push" and not policy.offpeak_only:
                # Its retry (once the link is back) goes before any lower lane's next
                # batch, however late it comes. A tier that waits for its window does not
                # hold the others until then.
                self.syncer.gate.owe(tier.priority)
            self._set_due(key)  # again once the link is back
            return
        if isinstance(exc, AuthenticationError):
            reach.refused(exc)
            self._set_due(key)
            return
        if not _is_sync_outcome(exc):
            raise exc
        name = f"{step}:{tier}"
        if self._final_errors.get(name) != exc.code:
            self._final_errors[name] = exc.code
            log.warning(
                "node %s: %s of %s refused by the hub (%s): %s; retrying every %d s",
                self.config.node_id,
                step,
                tier,
                exc.code,
                exc.message,
                policy.retry_interval_s,
            )
        if key in self._due:
            self._scheduler.once(f"retry:{name}", policy.retry_interval_s, self._job(step, tier))

    async def _live_pull(self, tier: Tier) -> None:
        """Hold a long-poll open on ``tier``'s feed whenever the link is up.

        It is held ``long_poll_s`` after activity and twice as long after each one that
        brought nothing, up to ``long_poll_idle_s``: an idle edge costs one request per
        ``long_poll_idle_s``. It also watches the ``interval`` tiers: a change for this node
        there ends it and their pull runs at once; while it is held, their scheduled pulls
        are skipped (the hub would have ended it)."""
        policy = self.policies[tier]
        short_s = float(policy.long_poll_s or 0)
        idle_s = float(policy.long_poll_idle_s or short_s)
        watch = frozenset(
            t for t, p in self.policies.items() if p.pull_mode is PullMode.INTERVAL and t != tier
        )
        confirmed: frozenset[Tier] = frozenset()  # watched tiers the hub reported on last
        reach = self._reach
        assert reach is not None
        wait_s = short_s
        quick_empty = 0
        while True:
            if reach.state is not LinkState.ONLINE:
                wait_s, confirmed = short_s, frozenset()
            await reach.wait_up()
            await self._bootstrapped.wait()
            started = time.monotonic()
            self._watching = (started, confirmed)
            try:
                result = await self.syncer.live_pull(tier, wait_s=wait_s, watch=watch)
            except SyncError as exc:
                self._step_failed("pull", tier, exc, policy)
                if not is_transient(exc):
                    await asyncio.sleep(policy.retry_interval_s)
                continue
            finally:
                self._watching = None
            self._step_succeeded("pull", tier)
            for t in result.due:
                self._fire("pull", t)
            for t in result.covered:
                self._step_succeeded("pull", t)
            confirmed = result.covered | result.due
            busy = result.applied > 0 or bool(result.due)
            wait_s = short_s if busy else min(idle_s, wait_s * 2)
            # A hub that answers at once with nothing (one that does not hold long-polls,
            # or our own change echoed back) must not turn this into a busy loop.
            if not busy and time.monotonic() - started < min(1.0, wait_s / 4):
                quick_empty += 1
                await asyncio.sleep(min(5.0, 0.05 * 2**quick_empty))
            else:
                quick_empty = 0

    def _probe_cap_s(self) -> float:
        return float(self.policies[Tier.CRITICAL].retry_interval_s)

    async def _probe(self) -> None:
        """While the hub is not known reachable, ask for its config (which also adopts its
        tier rules) with full-jitter backoff; the first answer marks the link up."""
        reach = self._reach
        assert reach is not None
        backoff = Backoff(base_s=min(0.5, self._probe_cap_s()), cap_s=self._probe_cap_s())
        while True:
            await reach.wait_not_up()
            try:
                await self.syncer.learn_config()
            except SyncError as exc:
                if isinstance(exc, AuthenticationError):
                    reach.refused(exc)
                    await asyncio.sleep(REFUSED_PROBE_S)
                    await self._reload_token()
                    continue
                if not is_transient(exc) and _is_sync_outcome(exc):
                    # The hub answered, but not with a config we take: still reachable.
                    log.warning(
                        "node %s: hub config not adopted: %s", self.config.node_id, exc.message
                    )
                elif is_transient(exc):
                    reach.down(exc, retry_s=self._probe_cap_s())
                    await asyncio.sleep(backoff.next_delay())
                    continue
                else:
                    raise
            backoff.reset()
            reach.up()

    async def _reload_token(self) -> None:
        """Pick up a rotated token from ``token_file`` (only a link we made ourselves)."""
        if not self._owns_link or self._link is None:
            return
        try:
            link = connect_link(self.config, self.region)
        except ConfigError as exc:
            log.warning("node %s: %s", self.config.node_id, exc.message)
            return
        old, self._link = self._link, link
        self.syncer.link = link
        self._stack.push_async_callback(link.close)
        await old.close()  # idempotent: the stack closing it again later is harmless

    async def _bootstrap(self) -> None:
        """Fetch the subscriptions through the snapshot once, if the store never had them;
        the feed pulls wait for it."""
        store = self.store
        if not self.config.subscriptions or not await store.needs_bootstrap(
            self.syncer.subscriptions
        ):
            self._bootstrapped.set()
            return
        reach = self._reach
        assert reach is not None
        policy = self.policies[Tier.CRITICAL]
        log.info(
            "node %s: bootstrapping %s from the hub's snapshot",
            self.config.node_id,
            ", ".join(self.syncer.subscriptions),
        )
        while True:
            await reach.wait_up()
            try:
                records = await self.syncer.bootstrap(progress=self._bootstrap_progress)
            except SyncError as exc:
                self._step_failed_bootstrap(exc)
                if not is_transient(exc):
                    await asyncio.sleep(policy.retry_interval_s)
                continue
            log.info("node %s: bootstrap done: %d records", self.config.node_id, records)
            self._bootstrapped.set()
            return

    def _step_failed_bootstrap(self, exc: SyncError) -> None:
        reach = self._reach
        assert reach is not None
        if is_transient(exc):
            reach.down(exc, retry_s=self._probe_cap_s())
        elif isinstance(exc, AuthenticationError):
            reach.refused(exc)
        elif _is_sync_outcome(exc):
            log.warning(
                "node %s: bootstrap refused (%s): %s", self.config.node_id, exc.code, exc.message
            )
        else:
            raise exc

    def _bootstrap_progress(self, records: int, prefix: str) -> None:
        log.debug("node %s: bootstrap of %s: %d records", self.config.node_id, prefix, records)
        if self._progress is not None:
            self._progress(records, prefix)

    async def _watch_outbox(self) -> None:
        """Notice new critical changes, from any process, within ``watch_interval_s``."""
        store = self.store
        due = self._due[("push", Tier.CRITICAL)]
        gate = self.syncer.gate
        lane = Tier.CRITICAL.priority
        policy = self.policies[Tier.CRITICAL]
        # A critical write owes its push (holds the lower lanes until it) only where that
        # push comes at once: a tier table that makes critical wait for a window or an
        # interval must not stop the other lanes meanwhile.
        pushed_at_once = policy.push_mode is PushMode.ON_WRITE and not policy.offpeak_only

        def owe() -> None:
            if pushed_at_once:
                gate.owe(lane)
            due.set()

        def local_commit(lanes: frozenset[int]) -> None:
            if lane in lanes:  # a write of this process: no need to wait for the poll
                owe()

        conn = await edge_sqlite.connect(
            store.path, busy_timeout_ms=self.config.busy_timeout_ms, readonly=True
        )
        forget = store.on_commit(local_commit)
        try:
            version = None
            newest = await store.outbox.last_issued(lane)
            if await store.outbox.pending(lane):
                owe()
            while True:
                async with conn.execute("PRAGMA data_version") as cur:
                    row = await cur.fetchone()
                if row is not None and row[0] != version:
                    version = row[0]
                    async with conn.execute(
                        "SELECT next_seq FROM lanes WHERE lane = ?", (lane,)
                    ) as cur:
                        lanes = await cur.fetchone()
                    issued = int(lanes[0]) - 1 if lanes is not None else newest
                    if issued > newest:
                        newest = issued
                        owe()
                await asyncio.sleep(self._watch_interval_s)
        finally:
            forget()
            await asyncio.shield(conn.close())

    async def _watchdog(self, interval_s: float) -> None:
        """Tell systemd we are alive only while the store answers: a wedged disk or loop
        gets the service restarted."""
        while True:
            try:
                async with asyncio.timeout(interval_s):
                    await self.store.outbox.last_issued(0)
            except TimeoutError:
                log.warning("edge daemon: the store did not answer within %.0f s", interval_s)
            else:
                self._notify("WATCHDOG=1")
            await asyncio.sleep(interval_s)

    async def _evict(self) -> None:
        try:
            evicted = await self.store.evict(
                now_ms=int(self._now().timestamp() * 1000), policies=self.policies
            )
        except SyncError as exc:
            log.warning("node %s: eviction failed: %s", self.config.node_id, exc.message)
            return
        if evicted:
            log.info(
                "node %s: evicted %d archive records the hub holds", self.config.node_id, evicted
            )

    async def _relearn_config(self) -> None:
        if self.link_state is not LinkState.ONLINE:
            return
        try:
            await self.syncer.learn_config()
        except SyncError as exc:
            if is_transient(exc) and self._reach is not None:
                self._reach.down(exc, retry_s=self._probe_cap_s())
            elif _is_sync_outcome(exc):
                log.warning("node %s: hub config not adopted: %s", self.config.node_id, exc.message)
            else:
                raise


def _is_sync_outcome(exc: SyncError) -> bool:
    """Whether ``exc`` is an answer of the hub or the link (the round goes on), rather than a
    failure of this machine (the store, the disk), which must stop the daemon."""
    return isinstance(exc, RetryableError | InvalidInputError | PermissionDeniedError)


def _span(seconds: float) -> str:
    minutes = int(seconds // 60)
    if minutes < 1:
        return f"{seconds:.0f} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min"
