"""The region hub's HTTP service (aiohttp): the sync protocol in front of PostgreSQL.

Routes::

    POST /v1/push      apply a batch of one node lane (msgpack, zstd optional)
    GET  /v1/pull      changes after a cursor for one tier and the node's prefixes; long-poll
    GET  /v1/snapshot  a granted cell prefix's records, page by page (resumable)
    GET  /v1/records   named records of one cell and collection (an edge reading back evicted ones)
    GET  /v1/config    tier rules, resolvers and limits for edges
    GET  /v1/conflicts the conflicts the calling node took part in (last day)
    GET  /v1/status    what `syncengine status` shows (JSON)
    GET  /healthz      the process is up
    GET  /readyz       PostgreSQL answers (503 if not); says "degraded" when Redis is down
                       or its wake-up subscription is (``wakeups``: long-polls poll)
    GET  /metrics      Prometheus

Every error leaves as ``{error, message, detail}`` (msgpack for sync routes when the client
accepts it, JSON otherwise) with a stable code; 4xx are final for the request, 5xx are
retried by edges. The process holds no state another hub process needs: several run
behind a load balancer against the same PostgreSQL and Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any, Final

import asyncpg
from aiohttp import web

from syncengine import steps
from syncengine.cells import parse_cell
from syncengine.clock import HybridClock
from syncengine.codec import Limits, encode
from syncengine.config import HubConfig
from syncengine.errors import (
    DecodeError,
    InvalidInputError,
    LimitExceededError,
    SyncError,
)
from syncengine.hub import db, feed, nodes, push, retention, snapshot
from syncengine.hub.activity import NodeActivity
from syncengine.hub.cache import Cache
from syncengine.hub.metrics import HubMetrics
from syncengine.hub.wakeups import Changed, Wakeups
from syncengine.merge import validate_collection, validate_key
from syncengine.protocol import (
    MAX_PULL_LIMIT,
    MAX_RECORD_KEYS,
    PROTOCOL_VERSION,
    PullPage,
    decode_body,
    decode_push_steps,
    encode_body,
    encode_pull_page,
    encode_push_answer,
    encode_snapshot_page,
)
from syncengine.tiers import MAX_LONG_POLL_S, Tier

__all__ = ["MSGPACK", "Hub", "run_hub"]

log = logging.getLogger(__name__)

MSGPACK: Final = "application/msgpack"
#: A push body this large or larger (about 400 changes compressed) waits for one of
#: ``max_large_pushes`` slots before it is decoded.
LARGE_PUSH_BYTES: Final = 4096
#: The longest long-poll: an idle edge holds one this long (tiers' ``long_poll_idle_s``).
MAX_WAIT_S: Final = float(MAX_LONG_POLL_S)
#: The authenticated node of a request.
_NODE_ID: Final = web.RequestKey("node_id", str)
#: With Redis down or the wake-up subscription not confirmed, a long-poll re-reads
#: PostgreSQL this often instead of waiting for pub/sub.
POLL_FALLBACK_S: Final = 1.0
#: Even with pub/sub healthy, a long-poll re-reads this often, bounding a lost wake-up.
RECHECK_S: Final = 5.0


class Hub:
    """One hub process: config, database pool, cache, clock and the aiohttp application."""

    def __init__(self, config: HubConfig, pool: asyncpg.Pool, cache: Cache) -> None:
        self.config = config
        self.pool = pool
        self.cache = cache
        self.clock = HybridClock(max_drift_ms=config.max_clock_drift_s * 1000)
        self.resolvers: dict[str, str] = dict(getattr(config, "resolvers", {}) or {})
        self.limits = Limits(max_body_bytes=config.max_body_bytes)
        self.metrics = HubMetrics()
        self.activity = NodeActivity(pool)
        # None with token_cache_s = 0: every request looks its token up.
        self.tokens = nodes.TokenCache(config.token_cache_s) if config.token_cache_s else None
        # Large pushes decoded and applied at once (each holds its decoded batch).
        self.large_pushes = asyncio.Semaphore(config.max_large_pushes)
        # Pushes apply in groups, one transaction each (group commit).
        self.pushes = push.Applier(
            pool,
            region=config.region,
            clock=self.clock,
            tier_rules=config.tier_rules,
            resolvers=self.resolvers,
            after_commit=self._announce,
            on_group=self.metrics.push_group.observe,
        )
        self._exported = (0, 0, 0)  # cache hits, misses and sparse pages already exported
        self.started = time.time()
        # Held long-polls, woken by the pushes that concern them; Redis pub/sub carries the
        # wake-ups across processes.
        self.wakeups = Wakeups()
        # Set when the server shuts down: held long-polls answer at once instead of making
        # the shutdown wait out their `wait`.
        self._closing = False
        # What every edge learns (GET /v1/config), and a tag that changes with it: long-polls
        # carry the tag, so edges learn a new config without asking every few minutes.
        self._edge_config: dict[str, Any] = {
            "v": PROTOCOL_VERSION,
            "region": config.region,
            "tier_rules": config.tier_rules.to_wire(),
            "resolvers": self.resolvers,
            "max_clock_drift_ms": config.max_clock_drift_s * 1000,
            "max_batch_changes": config.max_batch_changes,
            "max_body_bytes": config.max_body_bytes,
        }
        self.config_tag = hashlib.sha256(encode(self._edge_config)).hexdigest()[:12]
        self.app = self._build_app()

    @classmethod
    @asynccontextmanager
    async def running(cls, config: HubConfig, *, migrate: bool = True) -> AsyncIterator[Hub]:
        """Connect to PostgreSQL (migrating) and Redis; yield the hub; close both."""
        async with AsyncExitStack() as stack:
            pool = await db.connect_pool(config.database_url, migrate=migrate)
            stack.push_async_callback(pool.close)
            cache = Cache(config.redis_url, namespace=f"syncengine:{config.region}")
            await cache.start()
            stack.push_async_callback(cache.close)
            hub = cls(config, pool, cache)
            stack.push_async_callback(hub.pushes.close)
            cache.on_wakeup = hub._local_wake
            await hub.maintain_feed()  # the coming days' partitions exist before any push
            keeper = asyncio.create_task(hub._keep_feed(), name="feed maintenance")
            stack.callback(keeper.cancel)
            yield hub

    async def maintain_feed(self) -> retention.FeedReport | None:
        """Run the feed's maintenance now (see :mod:`syncengine.hub.retention`); a failure
        is logged and returned as None: the next run tries again."""
        try:
            return await retention.maintain_feed(
                self.pool, retention_days=self.config.feed_retention_days
            )
        except SyncError as exc:
            log.warning("feed maintenance failed (retried in an hour): %s", exc.message)
            return None

    async def _keep_feed(self) -> None:
        while True:
            await asyncio.sleep(retention.MAINTAIN_EVERY_S)
            await self.maintain_feed()

    # -- plumbing ---------------------------------------------------------------------------

    def _build_app(self) -> web.Application:
        app = web.Application(
            middlewares=[self._errors],
            client_max_size=self.config.max_body_bytes,
            # aiohttp would inflate Content-Encoding bodies itself, with no cap on the
            # inflated size: a compression bomb. The codec decompresses, within its limits.
            handler_args={"auto_decompress": False},
        )
        app.on_shutdown.append(self._release_long_polls)
        app.add_routes(
            [
                web.post("/v1/push", self._push),
                web.get("/v1/pull", self._pull),
                web.get("/v1/snapshot", self._snapshot),
                web.get("/v1/records", self._records),
                web.get("/v1/conflicts", self._conflicts),
                web.get("/v1/config", self._config),
                web.get("/v1/status", self._status),
                web.get("/healthz", self._healthz),
                web.get("/readyz", self._readyz),
                web.get("/metrics", self._metrics),
            ]
        )
        return app

    @web.middleware
    async def _errors(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        started = time.perf_counter()
        try:
            response = await handler(request)
        except SyncError as exc:
            self.metrics.errors.labels(code=exc.code).inc()
            if exc.http_status >= 500:
                log.warning("%s %s: %s", request.method, request.path, exc.message)
            node_id = request.get(_NODE_ID)
            if node_id is not None:
                await self.activity.failed(node_id, exc.code, exc.message)
            response = self._error_response(request, exc.http_status, exc.to_wire())
        except web.HTTPException as exc:
            if exc.status == 413:
                err = LimitExceededError(
                    f"body exceeds the limit of {self.config.max_body_bytes} bytes",
                    code="body_too_large",
                )
                response = self._error_response(request, 413, err.to_wire())
            else:
                raise
        except asyncio.CancelledError:
            raise
        except ConnectionResetError:
            # The client went away mid-request (a link that dropped, a request it timed out):
            # nothing was applied that it will not replay. The answer goes nowhere (aiohttp
            # drops a response to a closed connection quietly); its status, 499 as proxies
            # log it, keeps the drop apart from the hub's own failures in the metrics.
            self.metrics.errors.labels(code="client_disconnected").inc()
            log.debug("%s %s: the client disconnected mid-request", request.method, request.path)
            response = self._error_response(
                request,
                499,
                {
                    "error": "client_disconnected",
                    "message": "the client closed the connection before its request was read",
                    "detail": {},
                },
            )
        except Exception:
            log.exception("unhandled error on %s %s", request.method, request.path)
            self.metrics.errors.labels(code="internal_error").inc()
            response = self._error_response(
                request,
                500,
                {
                    "error": "internal_error",
                    "message": "the hub failed unexpectedly; the request can be retried",
                    "detail": {},
                },
            )
        self.metrics.requests.labels(route=request.path, status=str(response.status)).observe(
            time.perf_counter() - started
        )
        response.headers["X-Hub-HLC"] = str(self.clock.now())
        response.headers["Server"] = "syncengine"  # idle edges pay for every header byte
        return response

    def _error_response(
        self, request: web.Request, status: int, body: dict[str, Any]
    ) -> web.Response:
        if MSGPACK in request.headers.get("Accept", ""):
            data, _ = encode_body(body, allow_zstd=False)
            return web.Response(status=status, body=data, content_type=MSGPACK)
        return web.json_response(body, status=status)

    def _msgpack_response(self, request: web.Request, obj: Any) -> web.Response:
        accepts_zstd = "zstd" in request.headers.get("Accept-Encoding", "")
        data, encoding = encode_body(obj, allow_zstd=accepts_zstd)
        self.metrics.bytes_out.inc(len(data))
        response = web.Response(body=data, content_type=MSGPACK)
        if encoding:
            response.headers["Content-Encoding"] = encoding
        return response

    async def _node(self, request: web.Request) -> nodes.Node:
        auth = request.headers.get("Authorization", "")
        token = auth[7:].strip() if auth.lower().startswith("bearer ") else None
        node = await nodes.authenticate(self.pool, token, self.tokens)
        request[_NODE_ID] = node.node_id  # for the activity record of an error
        return node

    async def _release_long_polls(self, _app: web.Application) -> None:
        self._closing = True
        self._local_wake(None)

    def _local_wake(self, changed: Changed | None) -> None:
        """Release the long-polls ``changed`` concerns (None: every one)."""
        self.wakeups.wake(changed)

    # -- sync routes ------------------------------------------------------------------------

    async def _push(self, request: web.Request) -> web.Response:
        node = await self._node(request)
        length = request.content_length
        if length is not None and length > self.config.max_body_bytes:
            raise LimitExceededError(
                f"body of {length} bytes exceeds the limit of {self.config.max_body_bytes}",
                code="body_too_large",
            )
        raw = await request.read()
        self.metrics.bytes_in.inc(len(raw))
        if len(raw) < LARGE_PUSH_BYTES:
            return await self._apply_push_body(request, node, raw)
        # A large push (an edge working through a backlog) waits its turn, holding only
        # its body: max_large_pushes bounds the decoded batches a process holds at once.
        self.metrics.pushes_waiting.inc()
        try:
            await self.large_pushes.acquire()
        finally:
            self.metrics.pushes_waiting.dec()
        try:
            return await self._apply_push_body(request, node, raw)
        finally:
            self.large_pushes.release()

    async def _apply_push_body(
        self, request: web.Request, node: nodes.Node, raw: bytes
    ) -> web.Response:
        encoding = request.headers.get("Content-Encoding")
        obj = decode_body(raw, encoding, self.limits)
        # In steps: the push applier, whose PostgreSQL reply may come meanwhile, waits for no
        # long stretch of decoding (the other pushes of the region wait on its transaction).
        batch = await steps.run_between(
            decode_push_steps(
                obj,
                max_changes=self.config.max_batch_changes,
                max_record_bytes=self.config.max_record_bytes,
            )
        )
        push.check_batch(
            node, batch, region=self.config.region, clock=self.clock, resolvers=self.resolvers
        )
        result = await push.apply_push(self.pushes, node, batch)
        self.metrics.pushes.labels(tier=Tier.from_priority(batch.lane).value).inc()
        self.metrics.changes_applied.inc(result.answer.applied)
        self.metrics.batch_size.observe(len(batch.changes))
        self.metrics.conflicts.inc(result.answer.conflicts)
        return self._msgpack_response(request, encode_push_answer(result.answer))

    async def _announce(self, applied: list[push.AppliedBatch]) -> None:
        """After a group of pushes commits: cache its feed rows (one contiguous run of ids)
        and wake the long-polls reading its cells, here and in the other hub processes."""
        rows = [row for batch in applied for row in batch.feed_rows]
        await self.cache.put_feed_batch(applied[0].epoch, rows)
        everything: dict[int, frozenset[str]] = {}
        for batch in applied:  # the pusher's own long-polls sleep through its batch
            changed = _changed_cells(batch.feed_rows)
            self.wakeups.wake(changed, writer=batch.feed_rows[0][5])
            for tier, cells in changed.items():
                everything[tier] = everything.get(tier, frozenset()) | cells
        await self.cache.publish_wakeup(everything)

    async def _pull(self, request: web.Request) -> web.Response:
        node = await self._node(request)
        q = request.query
        tier = _tier_param(q.get("tier", "standard"))
        after = _int_param(q, "after", 0, 0, (1 << 63) - 1)
        limit = _int_param(q, "limit", 1000, 1, MAX_PULL_LIMIT)
        wait = _float_param(q, "wait", 0.0, 0.0, MAX_WAIT_S)
        watch = _watch_params(q.getall("watch", []), tier)
        prefixes = nodes.check_readable(node, self.config.region, q.getall("prefix", []))
        if not prefixes:
            raise InvalidInputError("give at least one prefix=…", code="missing_prefix")
        deadline = time.monotonic() + wait
        asked = after
        due: list[int] = []
        checked = False  # the watched tiers were looked at (not when the page had changes)
        # Registered before the first read: a push landing after a read still wakes us.
        with self.wakeups.waiting((tier, *watch), prefixes, node=node.node_id) as waiter:
            while True:
                waiter.event.clear()
                page = await self._read_page(node.node_id, tier, prefixes, after, limit)
                remaining = deadline - time.monotonic()
                gone = request.transport is None or request.transport.is_closing()
                if not page.changes and watch:
                    due, checked = await self._watch(node.node_id, prefixes, watch), True
                if page.changes or due or remaining <= 0 or self._closing or gone:
                    break  # (an edge that hung up gets nothing: no reason to hold its slot)
                after = page.next_cursor
                # Wake on a push under our prefixes (local, or from another process via
                # Redis pub/sub); re-read PostgreSQL anyway every few seconds, and every
                # second while Redis or the subscription is down (the cache wakes us when
                # either changes).
                polling = self.cache.degraded or not self.cache.subscribed
                recheck = POLL_FALLBACK_S if polling else RECHECK_S
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(remaining, recheck)):
                        await waiter.event.wait()
        if watch or "tag" in q:
            page = dataclasses.replace(
                page,
                watched={t: c for t, c in watch.items() if t not in due} if checked else {},
                due=due,
                cfg=self.config_tag if "tag" in q else None,
            )
        self.metrics.pulls.labels(tier=Tier.from_priority(tier).value).inc()
        # The cursor the node asked from is what it has applied: its lag is the head minus it.
        await self.activity.pulled(node.node_id, tier, asked)
        return self._msgpack_response(request, encode_pull_page(page))

    async def _read_page(
        self, node_id: str, tier: int, prefixes: list[str], after: int, limit: int
    ) -> PullPage:
        return await feed.read_page(
            self.pool,
            node_id=node_id,
            tier=tier,
            prefixes=prefixes,
            after=after,
            limit=limit,
            clock=self.clock,
            cache=self.cache,
        )

    async def _watch(self, node_id: str, prefixes: list[str], watch: dict[int, int]) -> list[int]:
        """The watched tiers holding a change for the node after their cursor; the others'
        cursors move (in ``watch``) to where the hub looked, so each check scans only what
        is new."""
        due = []
        for t, cursor in watch.items():
            page = await self._read_page(node_id, t, prefixes, cursor, 1)
            if page.changes or page.more:
                due.append(t)
            else:
                watch[t] = page.next_cursor
        return due

    async def _snapshot(self, request: web.Request) -> web.Response:
        node = await self._node(request)
        q = request.query
        (prefix,) = nodes.check_readable(node, self.config.region, [q.get("prefix", "")])
        page = await snapshot.read_snapshot_page(
            self.pool,
            node_id=node.node_id,
            prefix=prefix,
            after=q.get("after") or None,
            limit=_int_param(q, "limit", 1000, 1, MAX_PULL_LIMIT),
        )
        return self._msgpack_response(request, encode_snapshot_page(page))

    async def _records(self, request: web.Request) -> web.Response:
        node = await self._node(request)
        q = request.query
        (cell,) = nodes.check_readable(node, self.config.region, [parse_cell(q.get("cell", ""))])
        collection = validate_collection(q.get("collection", ""))
        keys = [validate_key(k) for k in q.getall("key", [])]
        if not 1 <= len(keys) <= MAX_RECORD_KEYS:
            raise InvalidInputError(
                f"ask for 1 to {MAX_RECORD_KEYS} records ('key' parameters), not {len(keys)}",
                code="invalid_value",
                detail={"field": "key"},
            )
        page = await snapshot.read_records(
            self.pool, node_id=node.node_id, cell=cell, collection=collection, keys=keys
        )
        return self._msgpack_response(request, encode_snapshot_page(page))

    async def _conflicts(self, request: web.Request) -> web.Response:
        """The conflicts the calling node took part in: how many in the last day, and the
        newest few (for the edge's `status`)."""
        node = await self._node(request)
        limit = _int_param(request.query, "limit", 5, 1, 100)
        async with db.translated("conflicts"):
            count = await self.pool.fetchval(
                "SELECT count(*) FROM conflicts WHERE logged_at > now() - interval '1 day' "
                "AND (winner_node = $1 OR loser_node = $1)",
                node.node_id,
            )
            rows = await self.pool.fetch(
                "SELECT logged_at, cell, collection, key, field, winner_node, loser_node, "
                "loser_value FROM conflicts WHERE logged_at > now() - interval '1 day' "
                "AND (winner_node = $1 OR loser_node = $1) ORDER BY logged_at DESC, id DESC "
                "LIMIT $2",
                node.node_id,
                limit,
            )
        body = {
            "count_24h": count,
            "latest": [
                {
                    "at": r["logged_at"].isoformat(timespec="seconds"),
                    "cell": r["cell"],
                    "collection": r["collection"],
                    "key": r["key"],
                    "field": r["field"],
                    "won": r["winner_node"] == node.node_id,
                    "other_node": r["loser_node"]
                    if r["winner_node"] == node.node_id
                    else r["winner_node"],
                    "lost_value": None
                    if r["loser_value"] is None
                    else json.loads(r["loser_value"]),
                }
                for r in rows
            ],
        }
        if MSGPACK in request.headers.get("Accept", ""):
            return self._msgpack_response(request, body)
        return web.json_response(body)

    async def _config(self, request: web.Request) -> web.Response:
        node = await self._node(request)
        async with db.translated("config"):
            acked = await snapshot.acked_seqs(self.pool, node.node_id)
            head = await self.pool.fetchval("SELECT id FROM feed_head")
        body = {
            **self._edge_config,
            "tag": self.config_tag,
            "hub_hlc": self.clock.now(),
            # What the hub holds of the caller, per lane: a new store of a node that lost
            # its file numbers its queued changes after it (they are not replays).
            "acked": acked,
            "feed_head": head,  # for the edge's `status`: its pull lag
        }
        if MSGPACK in request.headers.get("Accept", ""):
            return self._msgpack_response(request, body)
        return web.json_response(body)

    # -- operations routes ------------------------------------------------------------------

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _readyz(self, request: web.Request) -> web.Response:
        try:
            async with db.translated("readiness"):
                await self.pool.fetchval("SELECT 1", timeout=2.0)
        except SyncError as exc:
            return web.json_response(
                {"status": "unavailable", "database": "down", "message": exc.message}, status=503
            )
        if self.cache.configured:
            await self.cache.ping()  # through the breaker: at most one probe per cooldown
        cache = "degraded" if self.cache.degraded else "ok"
        wakeups = "ok" if self.cache.subscribed else "degraded"
        return web.json_response(
            {
                "status": "ok" if cache == wakeups == "ok" else "degraded",
                "database": "ok",
                "cache": cache,
                "wakeups": wakeups,  # degraded: long-polls poll PostgreSQL every second
            }
        )

    async def _status(self, request: web.Request) -> web.Response:
        return web.json_response(await self.status())

    async def status(self) -> dict[str, Any]:
        """What `syncengine status --config hub.toml` shows."""
        async with db.translated("status"):
            head = await self.pool.fetchval("SELECT id FROM feed_head")
            node_rows = await self.pool.fetch(
                "SELECT n.node_id, n.last_seen, n.revoked_at IS NOT NULL AS revoked, "
                "coalesce(jsonb_object_agg(l.lane, l.acked_seq) FILTER (WHERE l.lane IS NOT NULL), "
                "'{}') AS acked FROM nodes n LEFT JOIN node_lanes l USING (node_id) "
                "GROUP BY n.node_id ORDER BY n.node_id"
            )
            conflicts = await self.pool.fetchval("SELECT count(*) FROM conflicts")
        return {
            "schema": 1,
            "region": self.config.region,
            "feed_head": head,
            "conflicts": conflicts,
            "cache": {
                "state": "degraded" if self.cache.degraded else "ok",
                "wakeups": "ok" if self.cache.subscribed else "degraded",
                "configured": self.cache.configured,
                "hits": self.cache.hits,
                "misses": self.cache.misses,
                "sparse": self.cache.sparse,
            },
            "database_pool": {"size": self.pool.get_size(), "idle": self.pool.get_idle_size()},
            "uptime_s": round(time.time() - self.started, 1),
            "nodes": [
                {
                    "node_id": r["node_id"],
                    "last_seen": r["last_seen"].isoformat() if r["last_seen"] else None,
                    "revoked": r["revoked"],
                    "acked_seq": {
                        Tier.from_priority(int(k)).value: v
                        for k, v in json.loads(r["acked"]).items()
                    },
                }
                for r in node_rows
            ],
        }

    async def _metrics(self, request: web.Request) -> web.Response:
        self.metrics.pool_size.set(self.pool.get_size())
        self.metrics.pool_idle.set(self.pool.get_idle_size())
        self.metrics.cache_degraded.set(1 if self.cache.degraded else 0)
        # The cache counts plainly; advance the Prometheus counters by what is new.
        self.metrics.cache_hits.inc(self.cache.hits - self._exported[0])
        self.metrics.cache_misses.inc(self.cache.misses - self._exported[1])
        self.metrics.cache_sparse.inc(self.cache.sparse - self._exported[2])
        self._exported = (self.cache.hits, self.cache.misses, self.cache.sparse)
        body, content_type = self.metrics.render()
        return web.Response(body=body, headers={"Content-Type": content_type})


def _watch_params(values: list[str], tier: int) -> dict[int, int]:
    """``watch=TIER:CURSOR`` (repeatable): tiers a long-poll also watches for the node."""
    watch: dict[int, int] = {}
    for value in values:
        name, _, cursor = value.partition(":")
        t = _tier_param(name)
        try:
            at = int(cursor)
        except ValueError:
            at = -1
        if not 0 <= at < 1 << 63:
            raise InvalidInputError(
                f"watch={value!r:.60}: give TIER:CURSOR, e.g. watch=important:1234",
                code="invalid_param",
            )
        if t != tier:
            watch[t] = at
    return watch


def _changed_cells(feed_rows: list[list[Any]]) -> dict[int, frozenset[str]]:
    """Per tier, the cells a push wrote (feed rows are ``[id, tier, cell, …]``)."""
    changed: dict[int, set[str]] = {}
    for row in feed_rows:
        changed.setdefault(row[1], set()).add(row[2])
    return {t: frozenset(cells) for t, cells in changed.items()}


def _tier_param(value: str) -> int:
    try:
        return Tier(value).priority
    except ValueError:
        raise InvalidInputError(
            f"unknown tier {value!r}",
            hint=f"Use one of: {', '.join(t.value for t in Tier)}.",
            code="invalid_tier",
        ) from None


def _int_param(q: Any, name: str, default: int, lo: int, hi: int) -> int:
    return int(_number_param(q, name, default, lo, hi, kind=int))


def _float_param(q: Any, name: str, default: float, lo: float, hi: float) -> float:
    return _number_param(q, name, default, lo, hi, kind=float)


def _number_param(
    q: Any, name: str, default: float, lo: float, hi: float, *, kind: type[int] | type[float]
) -> float:
    """A numeric query parameter within ``lo..hi``; a clear 400 otherwise."""
    raw = q.get(name)
    if raw is None:
        return default
    try:
        value = kind(raw)
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise DecodeError(f"{name}={raw[:40]!r} is not {what}", code="invalid_param") from None
    if not lo <= value <= hi:
        raise InvalidInputError(f"{name}={value} is outside {lo}..{hi}", code="invalid_param")
    return value


async def run_hub(config: HubConfig, *, ready: Callable[[], None] | None = None) -> None:
    """Serve until cancelled (SIGTERM/SIGINT are turned into cancellation by the caller)."""
    async with Hub.running(config) as hub:
        runner = web.AppRunner(hub.app, access_log=None, shutdown_timeout=10.0)
        await runner.setup()
        try:
            site = web.TCPSite(runner, config.listen_host, config.listen_port, reuse_address=True)
            await site.start()
            log.info("hub for region %s listening on %s", config.region, config.listen)
            if ready is not None:
                ready()
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()
