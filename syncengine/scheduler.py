"""The clock of the edge daemon: APScheduler 3.x behind the few calls the daemon needs.

APScheduler decides *when*; it never does the work. Every job here is a tiny coroutine that
sets a flag for a worker the daemon owns (see :mod:`syncengine.edge.daemon`), so a slow sync
round never holds a scheduler thread, a job can never run twice at once, and stopping the
daemon cancels work it owns rather than tasks the scheduler made.

Every job is coalesced (a backlog of missed runs fires once), runs one instance at a time,
and has a misfire grace: after the machine slept or the loop stalled, a run that is late by
less than the grace still fires, a later one is dropped for the next (the daemon also runs
every tier once at start, so nothing waits a whole interval for a missed run).

Triggers take their time zone from the region: a cron push such as ``0 2 * * sun`` means
2 a.m. on the region's clock, whatever the edge machine's own zone says.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Coroutine
from types import TracebackType
from typing import Any, Final
from zoneinfo import ZoneInfo

from apscheduler.jobstores.base import JobLookupError
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.date import DateTrigger
from apscheduler.triggers.interval import IntervalTrigger

__all__ = ["DEFAULT_MISFIRE_GRACE_S", "Job", "Scheduler"]

#: A run late by less than this still fires (then coalesced into one).
DEFAULT_MISFIRE_GRACE_S: Final = 3600

#: A job: a coroutine function with no arguments, quick (it only signals a worker).
Job = Callable[[], Coroutine[Any, Any, None]]

# APScheduler logs every run at INFO ("Running job ...", "executed successfully"): a line
# a minute per tier on a quiet edge. Its warnings (missed runs) and errors still show.
logging.getLogger("apscheduler").setLevel(logging.WARNING)


class Scheduler:
    """Named jobs on the running event loop, in the zone ``timezone``.

    Use ``async with Scheduler(tz) as s`` (or :meth:`start` / :meth:`shutdown`) from within
    the loop. Adding a job under an id that exists replaces it, so "run this at window
    open" can be said again and again without piling up jobs.
    """

    def __init__(
        self, timezone: ZoneInfo, *, misfire_grace_s: int = DEFAULT_MISFIRE_GRACE_S
    ) -> None:
        self.timezone = timezone
        self._stopping = False
        self._scheduler = AsyncIOScheduler(
            timezone=timezone,
            job_defaults={
                "coalesce": True,
                "max_instances": 1,
                "misfire_grace_time": misfire_grace_s,
            },
        )

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Start firing jobs (must be called with the event loop running)."""
        if self._stopping:
            raise RuntimeError("a scheduler cannot be started again after shutdown")
        if not self._scheduler.running:
            self._scheduler.start()

    def shutdown(self) -> None:
        """Stop firing jobs; jobs already fired finish on their own (they only signal).
        Idempotent."""
        # APScheduler's asyncio shutdown runs later, on the loop: until it has, `running`
        # stays true and a second shutdown would raise from inside the loop.
        if self._scheduler.running and not self._stopping:
            self._stopping = True
            self._scheduler.shutdown(wait=False)

    @property
    def running(self) -> bool:
        return bool(self._scheduler.running) and not self._stopping

    async def __aenter__(self) -> Scheduler:
        self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.shutdown()

    # -- jobs ---------------------------------------------------------------------------------

    def every(self, job_id: str, seconds: float, job: Job, *, jitter_s: int | None = None) -> None:
        """Run ``job`` every ``seconds``, first one interval from now. ``jitter_s`` spreads
        the runs of many edges started at the same moment (e.g. after a power cut)."""
        if seconds <= 0:
            raise ValueError(f"{job_id}: the interval must be > 0 s, not {seconds!r}")
        self._add(job_id, job, IntervalTrigger(seconds=seconds, jitter=jitter_s))

    def cron(self, job_id: str, crontab: str, job: Job) -> None:
        """Run ``job`` on a crontab expression (minute hour day month weekday) read on the
        scheduler's clock. Raises :class:`ValueError` for an expression APScheduler refuses."""
        self._add(job_id, job, CronTrigger.from_crontab(crontab, timezone=self.timezone))

    def once(self, job_id: str, delay_s: float, job: Job) -> dt.datetime:
        """Run ``job`` once, ``delay_s`` seconds from now (replacing a pending one of that
        id); return when, in UTC."""
        when = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=max(0.0, delay_s))
        self._add(job_id, job, DateTrigger(run_date=when))
        return when

    def cancel(self, job_id: str) -> bool:
        """Remove a job; False when there was none of that id (ran, or never added)."""
        try:
            self._scheduler.remove_job(job_id)
        except JobLookupError:
            return False
        return True

    def next_run(self, job_id: str) -> dt.datetime | None:
        """When ``job_id`` fires next (aware), or ``None`` when no such job is pending."""
        job = self._scheduler.get_job(job_id)
        when = getattr(job, "next_run_time", None) if job is not None else None
        return when if isinstance(when, dt.datetime) else None

    def job_ids(self) -> list[str]:
        return sorted(j.id for j in self._scheduler.get_jobs())

    def _add(self, job_id: str, job: Job, trigger: Any) -> None:
        self._scheduler.add_job(job, trigger, id=job_id, name=job_id, replace_existing=True)
