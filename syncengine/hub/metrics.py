"""Prometheus metrics of one hub process. Each hub has its own registry, so several hubs in
one process (tests, the demo) do not collide."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["HubMetrics"]


class HubMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Histogram(
            "syncengine_hub_request_seconds",
            "HTTP request latency",
            ["route", "status"],
            registry=r,
        )
        self.pushes = Counter("syncengine_hub_pushes", "Push batches applied", ["tier"], registry=r)
        self.pulls = Counter("syncengine_hub_pulls", "Pull pages served", ["tier"], registry=r)
        self.changes_applied = Counter(
            "syncengine_hub_changes_applied", "Changes applied (after dedup)", registry=r
        )
        self.batch_size = Histogram(
            "syncengine_hub_push_batch_changes",
            "Changes per push batch",
            buckets=(1, 10, 50, 100, 250, 500, 1000, 2500, 5000),
            registry=r,
        )
        self.push_group = Histogram(
            "syncengine_hub_push_group_batches",
            "Push batches applied per PostgreSQL transaction (group commit)",
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=r,
        )
        self.pushes_waiting = Gauge(
            "syncengine_hub_pushes_waiting",
            "Large pushes waiting for one of max_large_pushes slots",
            registry=r,
        )
        self.conflicts = Counter("syncengine_hub_conflicts", "Conflicts logged", registry=r)
        self.errors = Counter(
            "syncengine_hub_errors", "Errors answered, by code", ["code"], registry=r
        )
        self.bytes_in = Counter("syncengine_hub_received_bytes", "Request body bytes", registry=r)
        self.bytes_out = Counter(
            "syncengine_hub_sent_bytes", "Sync response body bytes", registry=r
        )
        self.pool_size = Gauge("syncengine_hub_db_pool_connections", "Pool size", registry=r)
        self.pool_idle = Gauge(
            "syncengine_hub_db_pool_idle_connections", "Idle pool connections", registry=r
        )
        self.cache_degraded = Gauge(
            "syncengine_hub_cache_degraded", "1 while Redis is unusable", registry=r
        )
        self.cache_hits = Counter("syncengine_hub_cache_hits", "Cache hits", registry=r)
        self.cache_misses = Counter("syncengine_hub_cache_misses", "Cache misses", registry=r)
        self.cache_sparse = Counter(
            "syncengine_hub_cache_sparse_pages",
            "Pulls left to PostgreSQL's per-cell index: the cached tail held too few of their rows",
            registry=r,
        )

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
