"""Redis, strictly as a cache and a wake-up bus. Never the source of truth.

Every call has a short timeout. Any failure opens a circuit breaker: for ``cooldown_s`` the
cache is *degraded* — calls are skipped at once and callers serve from PostgreSQL — and then
one call probes Redis again. A frozen Redis (SIGSTOP) therefore costs one timeout, not one
per request, and a restarted Redis is picked up without restarting the hub.

Pub/sub carries long-poll wake-ups between hub processes ("a push wrote these cells of tier
T": :mod:`syncengine.hub.wakeups`; by tiers alone when it wrote too many cells).
Losing one only delays a long-poll until its periodic re-read of PostgreSQL. While the
subscription is not confirmed by Redis (``subscribed`` is False) wake-ups may be missed, so
long-polls re-read often; each time it is lost or confirmed again, every long-poll is woken
(``on_wakeup(None)``) to re-read at once and pick its re-read interval anew. A hub skips
publishing while its breaker is open, so when the breaker closes it publishes a wake-up for
every tier (``*``): the other hubs' long-polls re-read what it did not announce.

The recent tail of the change feed is kept for pulls: one sorted-set member per applied
push batch (score = its first feed id), namespaced by the feed's epoch. Feed entries never
change once committed, so a cached entry can be missing (a crash between the PostgreSQL
commit and the cache write, an eviction, a flushed or restarted Redis) but never wrong;
readers use the cache only when its batches cover the whole id range they need.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final, TypeVar, cast

import msgpack
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from syncengine import tasks
from syncengine.hub.wakeups import MAX_CELLS_ANNOUNCED, Changed

__all__ = ["Cache"]

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_TIMEOUT_S: Final = 0.25
DEFAULT_COOLDOWN_S: Final = 2.0
#: How many feed ids behind the newest the cached tail reaches.
FEED_TAIL_IDS: Final = 200_000
#: Upper bound on one batch's size (the hub refuses larger ones), for range look-ups.
MAX_BATCH_IDS: Final = 10_000
#: Batches fetched per Redis round trip while filling a page.
_CHUNK: Final = 8
#: Connections to Redis per hub process (the wake-up subscription holds one).
MAX_CONNECTIONS: Final = 64
#: A cached page reads on past its first chunk of batches only while at least this share of
#: the rows it looked at were the reader's; below it, PostgreSQL's per-cell index serves the
#: page (see Cache.feed_page).
MIN_MATCH_SHARE: Final = 0.25
#: The wake-up listener's reconnect backoff: from the first, doubling, to the last; back
#: to the first once Redis confirms the subscription.
LISTEN_RETRY_S: Final = (0.1, 1.0)
#: After this long without a message the wake-up listener pings on its subscription, and
#: after LISTEN_SILENCE_S without any answer it calls the subscription lost (long-polls then
#: re-read PostgreSQL every second until it is back).
LISTEN_PING_S: Final = 1.0
LISTEN_SILENCE_S: Final = 3.0
#: The wake-up payload for every tier (others are comma-separated tier priorities).
_EVERY_TIER: Final = "*"

FeedRow = list[Any]  # [id, tier, cell, collection, key, node_id, lane, seq, hlc, fields, base]


async def _zrange_chunk(r: aioredis.Redis, *, key: str, low: int, high: int) -> list[bytes]:
    members = await r.zrangebyscore(key, low, high, start=0, num=_CHUNK)
    return [m for m in members if isinstance(m, bytes)]  # raw members: bytes, never decoded


async def _first_chunk(r: aioredis.Redis, *, key: str, first: int, high: int) -> list[bytes]:
    """The batch holding ``first`` (the last one starting at or before it), then the batches
    starting after it: one round trip, and no batch wholly before ``first`` is fetched (or
    decoded) only to be skipped."""
    async with r.pipeline(transaction=False) as pipe:
        pipe.zrevrangebyscore(key, first, first - MAX_BATCH_IDS, start=0, num=1)
        pipe.zrangebyscore(key, f"({first}", high, start=0, num=_CHUNK)
        holding, after = await pipe.execute()
    return [m for m in (*holding, *after) if isinstance(m, bytes)]


class Cache:
    """A Redis connection with timeouts, a breaker and a wake-up subscriber.

    ``url=None`` means no Redis is configured: the cache is permanently degraded (every
    call skipped), which is correct, only slower.
    """

    def __init__(
        self,
        url: str | None,
        *,
        namespace: str,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        cooldown_s: float = DEFAULT_COOLDOWN_S,
    ) -> None:
        self.url = url
        self.namespace = namespace
        self.timeout_s = timeout_s
        self.cooldown_s = cooldown_s
        self.hits = 0
        self.misses = 0
        #: Pages left to PostgreSQL because the reader's prefixes matched too few rows.
        self.sparse = 0
        #: Called with the tiers of a wake-up from another process, or with None: "wake
        #: every long-poll" (the subscription was lost or confirmed, or Redis failed).
        self.on_wakeup: Callable[[Changed | None], None] | None = None
        self._redis: aioredis.Redis | None = None
        self._open_until = 0.0  # breaker open (degraded) until this monotonic time
        self._failing = url is None
        self._subscribed = False
        self._listener: asyncio.Task[None] | None = None
        self._channel = f"{namespace}:wake"

    @property
    def configured(self) -> bool:
        return self.url is not None

    @property
    def degraded(self) -> bool:
        """True while Redis is unusable (or not configured)."""
        return self._failing

    @property
    def subscribed(self) -> bool:
        """True while Redis has confirmed the wake-up subscription: wake-ups from other
        processes arrive. False otherwise (and without Redis): long-polls must poll."""
        return self._subscribed

    def _wake_all(self) -> None:
        if self.on_wakeup is not None:
            self.on_wakeup(None)

    def _set_subscribed(self, subscribed: bool) -> None:
        if subscribed != self._subscribed:
            self._subscribed = subscribed
            if not subscribed:
                log.warning("Redis wake-up subscription lost; long-polls poll PostgreSQL")
            self._wake_all()

    async def start(self) -> None:
        if self.url is None:
            return
        # A blocking pool: when every connection is busy (a thousand edges pulling at once)
        # a call waits its turn within the timeout. The default pool fails at once with
        # "Too many connections", which opened the breaker on a healthy Redis.
        pool = aioredis.BlockingConnectionPool.from_url(
            self.url,
            max_connections=MAX_CONNECTIONS,
            timeout=self.timeout_s,
            socket_timeout=self.timeout_s,
            socket_connect_timeout=self.timeout_s,
            health_check_interval=0,
            # redis-py retries 3 times by default: that would triple every timeout and hide
            # the first failure from the breaker. The breaker is our retry policy.
            retry=Retry(NoBackoff(), 0),
        )
        self._redis = aioredis.Redis.from_pool(pool)
        await self._call(lambda r: r.ping())
        self._listener = asyncio.get_running_loop().create_task(
            self._listen(), name="syncengine-hub-wakeups"
        )

    async def close(self) -> None:
        if self._listener is not None:
            await tasks.stop(self._listener)  # one cancel() can be lost inside redis-py
            self._listener = None
            self._subscribed = False
        if self._redis is not None:
            with contextlib.suppress(RedisError, OSError):
                await self._redis.aclose()
            self._redis = None

    async def _call(self, op: Callable[[aioredis.Redis], Awaitable[T]]) -> T | None:
        """Run ``op`` unless the breaker is open; ``None`` when skipped or failed."""
        if self._redis is None:
            return None
        now = time.monotonic()
        if now < self._open_until:
            return None
        try:
            async with asyncio.timeout(self.timeout_s * 2):
                result = await op(self._redis)
        except (RedisError, OSError, TimeoutError) as exc:
            # A restarted Redis leaves every idle pooled connection dead: drop them, or each
            # probe would fail on the next one and keep the breaker open a cooldown longer.
            with contextlib.suppress(RedisError, OSError):
                await self._redis.connection_pool.disconnect(inuse_connections=False)
            self._open_until = time.monotonic() + self.cooldown_s
            if not self._failing:
                log.warning(
                    "Redis unusable (%s: %s); serving from PostgreSQL", type(exc).__name__, exc
                )
                self._failing = True
                self._wake_all()  # long-polls waiting at the healthy interval switch to polling
            return None
        if self._failing:
            log.info("Redis is back; cache enabled")
            self._failing = False
            await self._call(lambda r: r.publish(self._channel, _EVERY_TIER))
        return result

    def _feed_key(self, epoch: str) -> str:
        return f"{self.namespace}:feed:{epoch}"

    async def put_feed_batch(self, epoch: str, rows: list[FeedRow]) -> None:
        """Cache one committed batch's feed rows and trim the tail."""
        if not rows or self._redis is None:
            return
        first, last = rows[0][0], rows[-1][0]
        member = msgpack.packb(rows, use_bin_type=True)
        key = self._feed_key(epoch)

        async def op(r: aioredis.Redis) -> Any:
            async with r.pipeline(transaction=False) as pipe:
                pipe.zadd(key, {member: first})
                pipe.zremrangebyscore(key, "-inf", f"({last - FEED_TAIL_IDS}")
                return await pipe.execute()

        await self._call(op)

    async def feed_page(
        self,
        epoch: str,
        first: int,
        last: int,
        *,
        wanted: Callable[[FeedRow], bool],
        limit: int,
    ) -> list[FeedRow] | None:
        """Up to ``limit`` cached feed rows with ids in ``first..last`` that ``wanted``
        accepts, in id order — or ``None`` unless the cache holds every id from ``first``
        up to where the page filled (or to ``last``); the caller then reads PostgreSQL.

        Batches are fetched a few at a time and reading stops once the page is full, so a
        page never costs more than the batches it needs. A reader whose prefixes match few
        of the rows (one clinic of a thousand) gets ``None`` after the first chunk unless it
        was done by then (a long-poll woken by one push usually is): PostgreSQL reads its
        cells through an index in one round trip, where this would fetch and decode the
        whole tail to keep a handful (counted in ``sparse``).
        """
        if self._redis is None:
            return None
        key = self._feed_key(epoch)
        out: list[FeedRow] = []
        scanned = 0
        expected = first
        read: Callable[[aioredis.Redis], Awaitable[list[bytes]]] = functools.partial(
            _first_chunk, key=key, first=first, high=last
        )
        while expected <= last and len(out) < limit:
            chunk: list[bytes] | None = await self._call(read)
            if not chunk:
                break
            for member in chunk:
                rows = msgpack.unpackb(member, raw=False)
                if not rows or rows[-1][0] < expected:
                    continue
                if rows[0][0] > expected:
                    self.misses += 1
                    return None  # a hole: this range is not all here
                for row in rows:
                    if row[0] < expected:
                        continue
                    if row[0] > last or len(out) == limit:
                        break
                    expected = row[0] + 1
                    scanned += 1
                    if wanted(row):
                        out.append(row)
                if expected > last or len(out) == limit:
                    break
            # Next chunk: the batches starting after what was covered.
            read = functools.partial(_zrange_chunk, key=key, low=expected, high=last)
            if expected <= last and len(out) < limit and len(out) < scanned * MIN_MATCH_SHARE:
                self.sparse += 1
                return None
        if expected <= last and len(out) < limit:
            self.misses += 1
            return None
        self.hits += 1
        return out

    async def publish_wakeup(self, changed: Changed) -> None:
        """Tell the other hub processes what a push wrote (:func:`wakeup_message`)."""
        payload = wakeup_message(changed)
        await self._call(lambda r: r.publish(self._channel, payload))

    async def ping(self) -> bool:
        return await self._call(lambda r: r.ping()) is not None

    async def _listen(self) -> None:
        """Deliver wake-ups from other hub processes; reconnect quickly, with a short bounded
        backoff. ``subscribed`` follows Redis's confirmation of the subscription."""
        assert self._redis is not None
        first, most = LISTEN_RETRY_S
        delay = first
        loop = asyncio.get_running_loop()
        while True:
            pubsub = self._redis.pubsub()
            try:
                await pubsub.subscribe(self._channel)
                # A Redis that stopped answering (SIGSTOP, a frozen VM, a black-holed link)
                # leaves the connection open and silent, which looks like no traffic: after a
                # quiet second the listener pings on the subscription and calls it lost when
                # nothing at all came back for LISTEN_SILENCE_S.
                heard = loop.time()
                pinged = False
                while True:
                    msg = await pubsub.get_message(timeout=1.0)
                    now = loop.time()
                    if msg is None:
                        if self._failing:
                            await self.ping()  # close the breaker without waiting for traffic
                        if now - heard > LISTEN_SILENCE_S:
                            raise TimeoutError(
                                f"Redis sent nothing on the wake-up subscription for "
                                f"{now - heard:.1f} s, not even a PONG"
                            )
                        if not pinged and now - heard >= LISTEN_PING_S:
                            await pubsub.ping()
                            pinged = True
                        continue
                    heard, pinged = now, False
                    if msg["type"] == "subscribe":
                        delay = first
                        self._set_subscribed(True)  # a wake-up may have been missed before
                        continue
                    if msg["type"] != "message":
                        continue
                    data = msg.get("data")
                    text = data.decode() if isinstance(data, bytes) else str(data)
                    changed = read_wakeup(text)
                    if changed is None:
                        self._wake_all()
                    elif self.on_wakeup is not None and changed:
                        self.on_wakeup(changed)
            except (RedisError, OSError, TimeoutError):
                self._set_subscribed(False)
            finally:
                with contextlib.suppress(RedisError, OSError, TimeoutError):
                    async with asyncio.timeout(1.0):
                        # Through Any: redis-py types aclose in some releases only.
                        await cast(Any, pubsub).aclose()
            await asyncio.sleep(delay)
            delay = min(delay * 2, most)


def wakeup_message(changed: Changed) -> str:
    """The pub/sub payload for ``changed``: JSON ``{"tier": [cells]}``, or the tiers alone
    (``"1,2"``, every long-poll of those tiers wakes) past MAX_CELLS_ANNOUNCED cells or
    when a tier names no cells."""
    cells = [c for v in changed.values() if v is not None for c in v]
    if any(v is None for v in changed.values()) or len(cells) > MAX_CELLS_ANNOUNCED:
        return ",".join(str(t) for t in sorted(changed))
    return json.dumps({str(t): sorted(v or ()) for t, v in sorted(changed.items())})


def read_wakeup(text: str) -> Changed | None:
    """What a wake-up payload names; ``None`` for every tier and cell (``*``, or a payload
    this version cannot read: waking too many long-polls only costs re-reads)."""
    if text == _EVERY_TIER:
        return None
    if text.startswith("{"):
        try:
            raw = json.loads(text)
            return {
                int(t): frozenset(c for c in cells if isinstance(c, str))
                for t, cells in raw.items()
                if isinstance(cells, list)
            }
        except (ValueError, AttributeError, TypeError):
            return None
    tiers = [t for t in text.split(",") if t.isdigit()]
    return dict.fromkeys((int(t) for t in tiers), None) if tiers else None
