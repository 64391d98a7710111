"""Prometheus metrics of one edge daemon, served on ``metrics_listen`` at ``/metrics``.

Counters move as work happens (the :class:`~syncengine.edge.sync.Syncer` reports each batch,
page and failure); queue depth, oldest pending age, dead letters, pull lag and the link
state are read from the store when scraped, so they are exact at that moment and cost
nothing in between. Each daemon has its own registry: several in one process (tests,
embedding) do not collide.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from syncengine.tiers import Tier

if TYPE_CHECKING:
    from syncengine.edge.link import HubLink
    from syncengine.edge.store import EdgeStore

__all__ = ["EdgeMetrics"]


class EdgeMetrics:
    """The edge's metrics; also the syncer's observer (``batch_pushed``, ``page_pulled``,
    ``step_failed``)."""

    def __init__(self, node_id: str) -> None:
        self.registry = r = CollectorRegistry()
        self.pushes = Counter(
            "syncengine_edge_pushes", "Push batches the hub acknowledged", ["tier"], registry=r
        )
        self.pulls = Counter("syncengine_edge_pulls", "Pull pages applied", ["tier"], registry=r)
        self.changes_pushed = Counter(
            "syncengine_edge_changes_pushed", "Changes the hub acknowledged", ["tier"], registry=r
        )
        self.changes_pulled = Counter(
            "syncengine_edge_changes_pulled", "Changes of other nodes applied", ["tier"], registry=r
        )
        self.batch_size = Histogram(
            "syncengine_edge_push_batch_changes",
            "Changes per acknowledged push batch",
            buckets=(1, 10, 50, 100, 250, 500, 1000, 2500, 5000),
            registry=r,
        )
        self.errors = Counter(
            "syncengine_edge_errors",
            "Failed push or pull steps, by code",
            ["step", "code"],
            registry=r,
        )
        self.bytes_sent = Counter(
            "syncengine_edge_sent_bytes", "Request bytes sent to the hub", registry=r
        )
        self.bytes_received = Counter(
            "syncengine_edge_received_bytes", "Response bytes received from the hub", registry=r
        )
        self.queue_depth = Gauge(
            "syncengine_edge_queue_depth", "Changes waiting for the hub", ["tier"], registry=r
        )
        self.queue_bytes = Gauge(
            "syncengine_edge_queue_bytes", "Bytes of the changes waiting", ["tier"], registry=r
        )
        self.oldest_age = Gauge(
            "syncengine_edge_oldest_pending_age_seconds",
            "Age of the oldest change waiting (0 when none)",
            ["tier"],
            registry=r,
        )
        self.pull_lag = Gauge(
            "syncengine_edge_pull_lag",
            "Feed entries between the pull cursor and the hub's head at the last pull",
            ["tier"],
            registry=r,
        )
        self.dead_letters = Gauge(
            "syncengine_edge_dead_letters", "Changes the hub refused for good", registry=r
        )
        self.link_up = Gauge("syncengine_edge_link_up", "1 while the hub is reachable", registry=r)
        info = Gauge("syncengine_edge_info", "This node", ["node_id"], registry=r)
        info.labels(node_id).set(1)
        for tier in Tier:
            for family in (self.pushes, self.pulls, self.changes_pushed, self.changes_pulled):
                family.labels(tier.value)  # present at 0 before the first batch
        self._sent = self._received = 0

    # -- the syncer's observer ----------------------------------------------------------------

    def batch_pushed(self, tier: Tier, changes: int) -> None:
        self.pushes.labels(tier.value).inc()
        self.changes_pushed.labels(tier.value).inc(changes)
        self.batch_size.observe(changes)

    def page_pulled(self, tier: Tier, changes: int) -> None:
        self.pulls.labels(tier.value).inc()
        self.changes_pulled.labels(tier.value).inc(changes)

    def step_failed(self, step: str, code: str) -> None:
        self.errors.labels(step, code).inc()

    # -- a scrape -----------------------------------------------------------------------------

    async def render(self, store: EdgeStore, link: HubLink, *, link_up: bool) -> tuple[bytes, str]:
        """Read the store's gauges and return the exposition body and its content type."""
        now_ms = time.time_ns() // 1_000_000
        lanes = await store.outbox.status()
        steps = await store.sync_steps()
        dead = 0
        for lane in lanes:
            tier = lane.tier.value
            self.queue_depth.labels(tier).set(lane.depth)
            self.queue_bytes.labels(tier).set(lane.bytes_pending)
            oldest = lane.oldest_created_at_ms
            self.oldest_age.labels(tier).set(
                0 if oldest is None else max(0, now_ms - oldest) / 1000
            )
            dead += lane.dead_letters
            pulled = steps.get(("pull", lane.tier))
            if pulled is not None and pulled.hub_head is not None:
                cursor = await store.cursor(f"pull:{tier}")
                self.pull_lag.labels(tier).set(max(0, pulled.hub_head - cursor))
        self.dead_letters.set(dead)
        self.link_up.set(1 if link_up else 0)
        # The link counts bytes itself; a new link (after a config reload) starts from 0.
        sent, received = link.bytes_sent, link.bytes_received
        self.bytes_sent.inc(sent - self._sent if sent >= self._sent else sent)
        self.bytes_received.inc(
            received - self._received if received >= self._received else received
        )
        self._sent, self._received = sent, received
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
