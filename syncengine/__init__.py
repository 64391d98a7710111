"""syncengine: an offline-first regional sync engine.

Layers (a module imports only from its own layer or the ones above it in this list; a test
reads the imports and keeps this true):

1. core, no network or database (the config loaders only read their TOML files):
   ``errors``, ``clock``, ``cells``, ``codec``, ``merge``, ``protocol``, ``tiers``,
   ``regions``, ``resources``, ``config``, ``crashpoints``, ``steps`` (CPU work in slices)
2. seams to the machine: ``migrations``, ``devservers``, ``scheduler`` (APScheduler),
   ``service`` (systemd notifications, log formats), ``bundle`` (store-and-forward files),
   ``tasks`` (stopping background tasks for certain)
3. ``edge`` (SQLite store, outbox, sync client) and ``hub`` (PostgreSQL apply and feed,
   nodes, Redis cache, HTTP service) — these two never import each other
4. ``demo``, ``cli``: on top of everything

What users import is re-exported here; everything else is an implementation detail.
"""

from __future__ import annotations

from syncengine.edge.store import EdgeStore
from syncengine.errors import (
    AuthenticationError,
    ClockDriftError,
    ConfigError,
    CorruptStoreError,
    DecodeError,
    ForbiddenError,
    HubUnavailableError,
    InvalidInputError,
    LimitExceededError,
    LinkError,
    MigrationError,
    NotAvailableOffline,
    PermissionDeniedError,
    RetryableError,
    SequenceError,
    StorageError,
    SyncError,
    ValidationError,
)
from syncengine.tiers import Tier

__all__ = [
    "AuthenticationError",
    "ClockDriftError",
    "ConfigError",
    "CorruptStoreError",
    "DecodeError",
    "EdgeStore",
    "ForbiddenError",
    "HubUnavailableError",
    "InvalidInputError",
    "LimitExceededError",
    "LinkError",
    "MigrationError",
    "NotAvailableOffline",
    "PermissionDeniedError",
    "RetryableError",
    "SequenceError",
    "StorageError",
    "SyncError",
    "Tier",
    "ValidationError",
]
