"""The link: the edge's HTTP client for its region hub (aiohttp).

:class:`HubLink` speaks the sync protocol of DESIGN.md (``POST /v1/push``, ``GET /v1/pull``,
``GET /v1/snapshot``, ``GET /v1/records``, ``GET /v1/config``) and is the one place where
the outside world's failures become syncengine errors. What a caller can see, by what it should do next:

- :class:`LinkError` (retry): the hub could not be reached, the connection broke, the call
  timed out, or something that is not a syncengine hub answered (a captive portal, a proxy,
  a wrong ``hub_url``). Never treated as a rejection of the data: changes stay queued.
- :class:`HubUnavailableError` (retry): the hub answered 5xx, 408 or 429.
- a typed 4xx error rebuilt with :func:`error_from_wire` (fix the input / the grant): the hub
  refused the request for good; ``detail["seq"]`` names the change at fault when one is.
- :class:`DecodeError` with code :data:`INVALID_RESPONSE`: the hub answered 2xx with a body
  that is not a valid message. The request may have been applied; retrying is safe (pushes
  are deduplicated, pulls move no cursor), so the sync layer treats it as transient.

Every call has a bounded total timeout; a long-poll's is its ``wait`` plus the same margin.
The bearer token is sent only in the ``Authorization`` header: it never appears in a log
line or an exception message (messages name the hub by its origin only).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import Any, Final, TypeVar

import aiohttp
import yarl

from syncengine import crashpoints
from syncengine.clock import MAX_HLC
from syncengine.codec import DEFAULT_LIMITS, Limits
from syncengine.edge.outbox import OutboxBatch
from syncengine.errors import (
    DecodeError,
    HubUnavailableError,
    LinkError,
    RetryableError,
    SyncError,
    error_from_wire,
)
from syncengine.protocol import (
    PullPage,
    PushAnswer,
    PushBatch,
    SnapshotPage,
    decode_body,
    decode_pull_page,
    decode_push_answer,
    decode_snapshot_page,
    encode_body,
    encode_push,
)
from syncengine.tiers import Tier

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "HUB_HLC_HEADER",
    "INVALID_RESPONSE",
    "MSGPACK",
    "HubLink",
]

log = logging.getLogger(__name__)
T = TypeVar("T")

MSGPACK: Final = "application/msgpack"
HUB_HLC_HEADER: Final = "X-Hub-HLC"
#: Total time one request may take (connect, send, answer), long-polls excepted.
DEFAULT_TIMEOUT_S: Final = 30.0
#: Connecting is quick or hopeless; do not spend the whole budget on a dead address.
CONNECT_TIMEOUT_S: Final = 10.0
#: The code of a :class:`DecodeError` about the hub's answer (not about our request).
INVALID_RESPONSE: Final = "invalid_response"
#: Statuses that mean "later", whatever the body says.
_RETRY_LATER: Final = frozenset({408, 429})


class HubLink:
    """An HTTP client for one hub, authenticated as one node.

    Use as ``async with HubLink(url, token, node_id=...) as link``, or call :meth:`close`
    (idempotent). A ``session`` passed in is borrowed, not closed; otherwise the link makes
    its own on first use (with automatic decompression off: bodies are inflated by the
    codec, within its limits).

    Attributes updated by every call:

    - ``hub_hlc``: the highest ``X-Hub-HLC`` header seen (``None`` before any answer), for
      the sync layer to fold into the edge clock;
    - ``bytes_sent`` / ``bytes_received``: HTTP bytes of every request that got an answer —
      bodies as they travelled (compressed) plus header lines; TCP/IP overhead excluded;
    - ``requests``: requests that got an answer.

    Not safe to share across event loops; safe for concurrent calls within one.
    """

    def __init__(
        self,
        hub_url: str,
        token: str,
        *,
        node_id: str,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        session: aiohttp.ClientSession | None = None,
        limits: Limits = DEFAULT_LIMITS,
    ) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, not {timeout_s!r}")
        url = yarl.URL(hub_url)
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError("hub_url must be an http(s):// URL with a host")
        self._base = url.with_query(None).with_fragment(None)
        # What messages and logs call the hub: never the path's userinfo, never the token.
        self.origin = str(url.origin())
        self.node_id = node_id
        self.timeout_s = timeout_s
        self.limits = limits
        self._token = token
        self._session = session
        self._owns_session = session is None
        self._closed = False
        self.hub_hlc: int | None = None
        self.bytes_sent = 0
        self.bytes_received = 0
        self.requests = 0

    def __repr__(self) -> str:
        # No token here: reprs end up in logs and tracebacks.
        return f"<HubLink {self.origin} node={self.node_id}>"

    # -- lifecycle ----------------------------------------------------------------------------

    async def __aenter__(self) -> HubLink:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the link's own HTTP session (a borrowed one is left open). Idempotent."""
        if self._closed:
            return
        self._closed = True
        session, self._session = self._session, None
        if session is not None and self._owns_session:
            await session.close()

    def _http(self) -> aiohttp.ClientSession:
        if self._closed:
            raise LinkError("the link to the hub is closed", code="link_closed")
        if self._session is None:
            # A short User-Agent: an idle edge pays for every header byte of its long-polls.
            self._session = aiohttp.ClientSession(
                auto_decompress=False, headers={"User-Agent": "syncengine"}
            )
        return self._session

    # -- the protocol -------------------------------------------------------------------------

    async def push(self, batch: OutboxBatch) -> PushAnswer:
        """Send one outbox batch; return the hub's answer (``acked`` is the highest seq of
        the lane the hub has applied).

        The crash point ``push.after_send_before_response`` fires once the request has been
        sent and before the answer's body is read. Raises as described in the module
        docstring; a 2xx answer for another lane is a :class:`DecodeError`
        (:data:`INVALID_RESPONSE`).
        """
        message = PushBatch(
            node=self.node_id,
            lane=batch.lane,
            first_seq=batch.first_seq,
            last_seq=batch.last_seq,
            skipped=list(batch.skipped),
            changes=list(batch.changes),
        )
        body, encoding = encode_body(encode_push(message))
        headers = {"Content-Type": MSGPACK}
        if encoding:
            headers["Content-Encoding"] = encoding
        obj = await self._call(
            "POST",
            "v1/push",
            data=body,
            headers=headers,
            timeout_s=self.timeout_s,
            crash_point="push.after_send_before_response",
        )
        answer = _decoded(decode_push_answer, obj, "push answer")
        if answer.lane != batch.lane:
            raise DecodeError(
                f"hub answered a push of lane {batch.lane} for lane {answer.lane}",
                code=INVALID_RESPONSE,
                detail={"lane": batch.lane, "answer_lane": answer.lane},
            )
        return answer

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
        """One page of ``tier``'s feed under ``prefixes`` after cursor ``after``.

        With ``wait_s`` > 0 the hub holds the request open (long-poll) until a change arrives
        or ``wait_s`` passes; the call's timeout is ``wait_s`` plus the link's timeout.
        ``watch`` (tier → cursor) makes the long-poll also end when one of those tiers has a
        change for this node (:attr:`PullPage.due`), and reports how far the others hold
        nothing for it (:attr:`PullPage.watched`). With ``tag`` (the config tag learnt last)
        the page carries the hub's current tag.
        """
        if wait_s < 0:
            raise ValueError(f"wait_s must be >= 0, not {wait_s!r}")
        params: list[tuple[str, str]] = [
            ("tier", Tier(tier).value),
            ("after", str(after)),
            ("limit", str(limit)),
            ("wait", f"{wait_s:g}"),
        ]
        params.extend(("watch", f"{Tier(t).value}:{c}") for t, c in (watch or {}).items())
        if tag is not None:
            params.append(("tag", tag))
        params.extend(("prefix", p) for p in prefixes)
        obj = await self._call("GET", "v1/pull", params=params, timeout_s=wait_s + self.timeout_s)
        return _decoded(decode_pull_page, obj, "pull page")

    async def snapshot(self, *, prefix: str, after: str | None, limit: int) -> SnapshotPage:
        """One page of the records under ``prefix``; ``after`` is the previous page's
        ``next`` token (None for the first page)."""
        params = [("prefix", prefix), ("limit", str(limit))]
        if after is not None:
            params.append(("after", after))
        obj = await self._call("GET", "v1/snapshot", params=params, timeout_s=self.timeout_s)
        return _decoded(decode_snapshot_page, obj, "snapshot page")

    async def records(self, *, cell: str, collection: str, keys: Sequence[str]) -> SnapshotPage:
        """The hub's state of the named records (those that exist), as a one-page snapshot."""
        params = [("cell", cell), ("collection", collection)]
        params.extend(("key", k) for k in keys)
        obj = await self._call("GET", "v1/records", params=params, timeout_s=self.timeout_s)
        return _decoded(decode_snapshot_page, obj, "records answer")

    async def conflicts(self, *, limit: int = 5) -> dict[str, Any]:
        """The conflicts this node took part in over the last day: ``count_24h`` and the
        ``latest`` few (for ``status``)."""
        obj = await self._call(
            "GET", "v1/conflicts", params=[("limit", str(limit))], timeout_s=self.timeout_s
        )
        if not isinstance(obj, dict):
            raise DecodeError(
                f"conflicts answer must be a map, got {type(obj).__name__}", code=INVALID_RESPONSE
            )
        return obj

    async def config(self) -> dict[str, Any]:
        """The hub's edge-facing config: ``tier_rules`` (wire list), ``resolvers``,
        ``max_batch_changes``, ``max_clock_drift_ms``, ``max_body_bytes``, ``hub_hlc``…

        Only the shape (a map) is checked here; the sync layer validates what it uses.
        """
        obj = await self._call("GET", "v1/config", timeout_s=self.timeout_s)
        if not isinstance(obj, dict):
            raise DecodeError(
                f"hub config must be a map, got {type(obj).__name__}", code=INVALID_RESPONSE
            )
        return obj

    # -- the seam: every foreign error is translated here, once ------------------------------

    async def _call(
        self,
        method: str,
        path: str,
        *,
        timeout_s: float,
        params: Sequence[tuple[str, str]] | None = None,
        data: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        crash_point: str | None = None,
    ) -> Any:
        """Send one request and return the decoded msgpack body of a 2xx answer."""
        http = self._http()
        all_headers = {
            "Authorization": f"Bearer {self._token}",
            "Accept": MSGPACK,
            "Accept-Encoding": "zstd",
            **(headers or {}),
        }
        timeout = aiohttp.ClientTimeout(total=timeout_s, connect=min(timeout_s, CONNECT_TIMEOUT_S))
        what = f"{method} /{path}"
        try:
            async with http.request(
                method,
                self._base / path,
                params=params,
                data=data,
                headers=all_headers,
                timeout=timeout,
                allow_redirects=False,
                auto_decompress=False,
            ) as resp:
                if crash_point is not None:
                    crashpoints.crashpoint(crash_point)
                self._note_hlc(resp.headers.get(HUB_HLC_HEADER))
                body = await self._read_capped(resp, what)
                self.requests += 1
                self.bytes_sent += len(data or b"") + _header_bytes(resp.request_info.headers)
                self.bytes_received += len(body) + sum(
                    len(k) + len(v) + 4 for k, v in resp.raw_headers
                )
                status = resp.status
                content_type = resp.content_type
                encoding = resp.headers.get("Content-Encoding")
        except TimeoutError:
            raise LinkError(
                f"{what} to {self.origin} timed out after {timeout_s:g} s",
                code="link_timeout",
                detail={"timeout_s": timeout_s},
            ) from None
        except (aiohttp.ClientError, OSError) as exc:
            # The exception's text names host and port at most; headers never appear in it.
            raise LinkError(
                f"{what} to {self.origin} failed: {type(exc).__name__}: {exc}"[:500],
                detail={"cause": type(exc).__name__},
            ) from None
        if 200 <= status < 300:
            if content_type != MSGPACK:
                raise DecodeError(
                    f"{what}: hub answered {status} with {content_type!r}, not {MSGPACK}",
                    code=INVALID_RESPONSE,
                    detail={"status": status, "content_type": content_type[:100]},
                )
            try:
                return decode_body(body, encoding, self.limits)
            except SyncError as exc:
                raise DecodeError(
                    f"{what}: hub answered {status} with an unreadable body: {exc.message}",
                    code=INVALID_RESPONSE,
                    detail={"status": status, "cause": exc.code},
                ) from None
        raise self._error(what, status, content_type, encoding, body)

    async def _read_capped(self, resp: aiohttp.ClientResponse, what: str) -> bytes:
        """The whole body, refusing (as :class:`LinkError`) more than the codec would take:
        a bounded read even when something other than the hub answers."""
        cap = self.limits.max_body_bytes
        if resp.content_length is not None and resp.content_length > cap:
            raise LinkError(
                f"{what}: answer of {resp.content_length} bytes exceeds {cap}",
                code="response_too_large",
            )
        chunks: list[bytes] = []
        size = 0
        async for chunk in resp.content.iter_chunked(64 * 1024):
            size += len(chunk)
            if size > cap:
                raise LinkError(f"{what}: answer exceeds {cap} bytes", code="response_too_large")
            chunks.append(chunk)
        return b"".join(chunks)

    def _error(
        self, what: str, status: int, content_type: str, encoding: str | None, body: bytes
    ) -> SyncError:
        """The typed error for a non-2xx answer."""
        parsed: object = None
        try:
            if content_type == MSGPACK:
                parsed = decode_body(body, encoding, self.limits)
            elif content_type == "application/json" and encoding in (None, "", "identity"):
                parsed = json.loads(body)
        except (SyncError, ValueError):
            parsed = None
        if isinstance(parsed, dict) and isinstance(parsed.get("error"), str):
            exc = error_from_wire(status, parsed)
            if (status >= 500 or status in _RETRY_LATER) and not isinstance(exc, RetryableError):
                # The status is the hub's promise of what to do next; the body only explains.
                exc = HubUnavailableError(exc.message, detail=exc.detail, code=exc.code)
            exc.detail.setdefault("http_status", status)
            return exc
        if status >= 500 or status in _RETRY_LATER:
            return HubUnavailableError(
                f"{what}: {self.origin} answered HTTP {status}",
                code=f"http_{status}",
                detail={"http_status": status},
            )
        # A 3xx/4xx without the hub's error shape did not come from a syncengine hub (a
        # portal, a proxy, a wrong URL). Refusing the data for it would dead-letter changes
        # the hub never saw, so it is a link problem: retried, changes kept.
        return LinkError(
            f"{what}: {self.origin} answered HTTP {status} ({content_type or 'no body'}), "
            "which is not a syncengine hub error",
            hint="Check hub_url: something other than the region hub answered "
            "(a proxy or captive portal?). Changes stay queued.",
            code="unexpected_response",
            detail={"http_status": status},
        )

    def _note_hlc(self, raw: str | None) -> None:
        if raw is None:
            return
        try:
            value = int(raw)
        except ValueError:
            log.debug("ignoring malformed %s header from %s", HUB_HLC_HEADER, self.origin)
            return
        if 0 < value <= MAX_HLC and (self.hub_hlc is None or value > self.hub_hlc):
            self.hub_hlc = value


def _decoded(decoder: Callable[[object], T], obj: object, what: str) -> T:
    """Run a protocol decoder over a hub answer; its complaints are about the answer."""
    try:
        return decoder(obj)
    except SyncError as exc:
        raise DecodeError(
            f"hub sent an invalid {what}: {exc.message}",
            code=INVALID_RESPONSE,
            detail={"cause": exc.code},
        ) from None


def _header_bytes(headers: Mapping[str, str]) -> int:
    # "Name: value\r\n" per header line.
    return sum(len(k) + len(v) + 4 for k, v in headers.items())
