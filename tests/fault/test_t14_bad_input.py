"""T14: bad input gets a clear 4xx and leaves the hub's store untouched (invariant 8).

**Corpus.** ``tests/fault/corpus/`` holds 651 fixed requests (``*.bin`` bodies written by
``make_corpus.py``; ``expected.toml`` says where each goes and the status and error code the
hub must answer): malformed msgpack (truncated, 0xc1, trailing bytes, 10,000-deep nesting,
lengths declaring 2^32 items or 4 GiB, extension types, non-string keys), sizes (a body over
the limit, sent whole and chunked; a 32 KiB zstd bomb inflating to 1 GiB; batches over the
change limit; one oversized value), wrong types in every field of a push and its changes
(seq as string, float or negative; stamps negative, over 2^63, NaN; booleans for ints;
missing and unknown fields) and in every query parameter of the read routes, text (invalid
UTF-8, lone surrogates, NUL, RTL override, combining marks, emoji, 1 MB strings), cell ids
(``..``, ``//``, trailing ``/``, uppercase, unknown or foreign region, outside the grant) and
identity (no token, a revoked or unknown one, another node's id, replays, reused seqs,
gaps, non-monotonic ranges, stamps beyond the drift). Odd and SQL-ish text is *accepted*:
those cases check that a pull gives it back byte-identical and the JSONB view holds it.

For every case: the status and error code are the expected ones (and the body has the hub's
``{error, message, detail}`` shape); a checksum of every hub table, read with plain SQL, is
unchanged by a refused request (the nodes' bookkeeping columns aside: recording the refusal
there is the point); ``/healthz`` answers ok. The hub runs in this process (the ``hub``
fixture), so its memory is this process's RSS, sampled after every case: it must stay below
+50 MB over the run (the high-water mark, reached inside a request, is reported beside it).

**Fuzz.** Hypothesis drives random msgpack-ish bodies, mutations of valid pushes (fields
replaced, removed or added, bytes flipped, truncated or inserted, zstd on or off, tokens
swapped) and random query strings over HTTP: no 5xx, no 4xx without the error shape, no table
change on a refused request. Meanwhile, in a child process, atheris (libFuzzer) runs on the
hub's decode + validate path (``decode_body``, ``decode_push``, ``check_batch``), seeded with
the corpus: anything but a 4xx ``SyncError`` escaping is a crash. Quick mode fuzzes for 60 s
(the plan's 5 min is the long figure, with at least 1,000,000 atheris executions).

**Negative controls.** The same corpus against a hub that trusts the node id a batch claims
(``check_batch`` fed the batch's node), and against a hub configured without the 8 MiB body
cap: each must show mismatches.

Run ``python tests/fault/test_t14_bad_input.py --atheris [libFuzzer flags]`` (with ``tests/``
on ``PYTHONPATH``) for the atheris target alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import io
import json
import math
import os
import re
import resource
import shutil
import sys
import time
import tomllib
import types
from collections import Counter
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import msgpack
import psutil
import pytest
import zstandard
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st
from yarl import URL

from fault.harness import SEED, Summary, pick
from syncengine.clock import HybridClock
from syncengine.codec import Limits
from syncengine.errors import SyncError
from syncengine.hub import push as hub_push
from syncengine.hub.nodes import Node, revoke_node
from syncengine.protocol import decode_body, decode_push

pytestmark = [pytest.mark.integration, pytest.mark.slow]

T = TypeVar("T")

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "corpus"
MSGPACK = "application/msgpack"
RSS_BUDGET_MB = 50.0
#: Seconds of fuzzing (Hypothesis over HTTP, atheris alongside in a child process);
#: ``SYNCENGINE_T14_FUZZ_S`` overrides it (e.g. to replay a seed for longer).
FUZZ_S = float(os.environ.get("SYNCENGINE_T14_FUZZ_S") or pick(60.0, 300.0))
#: atheris executions: quick stops at FUZZ_S; long runs at least this many.
ATHERIS_RUNS = pick(0, 1_000_000)
#: A batch starting past the next seq waits this long for its predecessor (production: 3 s,
#: for pipelined pushes) before its 409; T14 tests the refusal, not the wait.
GAP_WAIT_S = 0.1

#: Identities of the corpus (expected.toml ``auth``) and the grants they hold.
NODES = {
    "node-a": "west/ng/lagos",
    "node-b": "west/ng/lagos",
    "node-c": "west/ng/lagos",  # revoked before the run
    "node-t": "west/ng/lagos/text",
    "node-r": "west/ng/lagos",
    "node-f": "west/ng/lagos/fuzz",
}
#: The nodes' bookkeeping (last seen, last refusal): written on purpose by refused requests.
BOOKKEEPING = {"nodes": {"last_seen", "last_error_code", "last_error", "last_error_at"}}


# -- the corpus ----------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Case:
    """One request of ``expected.toml`` and the answer it must get."""

    file: str
    category: str
    what: str
    method: str
    path: str
    auth: str
    status: int
    error: str
    query: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    chunked: bool = False
    acked: int | None = None
    mutates: bool = False
    roundtrip: bool = False

    def body(self) -> bytes:
        data = (CORPUS / self.file).read_bytes()
        if self.file.endswith(".zst"):
            data = zstandard.ZstdDecompressor().decompress(data, max_output_size=64 << 20)
        return data


def load_corpus() -> list[Case]:
    with (CORPUS / "expected.toml").open("rb") as f:
        return [Case(**c) for c in tomllib.load(f)["case"]]


# -- what the checks read: plain SQL and plain msgpack --------------------------------------------


_CHECKSUM_SQL: dict[int, str] = {}


async def table_checksums(pool: Any) -> dict[str, str]:
    """A row count and md5 of every table of the hub's schema (a partitioned table once,
    through its parent), without the bookkeeping columns of :data:`BOOKKEEPING`. One query;
    the table list is read once per pool."""
    sql = _CHECKSUM_SQL.get(id(pool))
    if sql is None:
        rows = await pool.fetch(
            "SELECT c.relname, array_agg(a.attname::text ORDER BY a.attnum) AS cols "
            "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped "
            "WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'p') "
            "AND NOT c.relispartition GROUP BY c.relname ORDER BY c.relname"
        )
        parts = []
        for table, cols in rows:
            select = ", ".join(f'"{c}"' for c in cols if c not in BOOKKEEPING.get(table, ()))
            parts.append(
                f"SELECT '{table}' AS name, count(*) || ':' || "
                "md5(coalesce(string_agg(h, '' ORDER BY h), '')) AS sum FROM "
                f'(SELECT md5(t::text) AS h FROM (SELECT {select} FROM "{table}") t) s'
            )
        sql = _CHECKSUM_SQL[id(pool)] = " UNION ALL ".join(parts)
    return {r["name"]: r["sum"] for r in await pool.fetch(sql)}


def changed_tables(before: dict[str, str], after: dict[str, str]) -> list[str]:
    return sorted(t for t in before.keys() | after.keys() if before.get(t) != after.get(t))


def canonical(obj: Any) -> bytes:
    """msgpack bytes with map keys sorted at every level: equal values, equal bytes (and a
    float never equals an int)."""

    def walk(o: Any) -> Any:
        if isinstance(o, dict):
            return {k: walk(o[k]) for k in sorted(o, key=repr)}
        if isinstance(o, list):
            return [walk(v) for v in o]
        return o

    return msgpack.packb(walk(obj), use_bin_type=True)  # type: ignore[no-any-return]


def unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


def parse_answer(content_type: str, raw: bytes) -> Any:
    """An answer body as JSON or msgpack by its content type; None when it is neither."""
    try:
        if content_type == "application/json":
            return json.loads(raw)
        if content_type == MSGPACK:
            return unpack(raw)
    except ValueError:
        return None
    return None


def error_shape_ok(body: Any) -> bool:
    return (
        isinstance(body, dict)
        and isinstance(body.get("error"), str)
        and bool(body["error"])
        and isinstance(body.get("message"), str)
        and bool(body["message"])
        and isinstance(body.get("detail"), dict)
    )


def rss_mb() -> float:
    return float(psutil.Process().memory_info().rss) / 1e6


def no_nul(obj: Any) -> Any:
    """What the JSONB view shows of a value: NULs become U+FFFD (JSONB cannot hold them)."""
    if isinstance(obj, str):
        return obj.replace("\x00", "\ufffd")
    if isinstance(obj, dict):
        return {no_nul(k): no_nul(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [no_nul(v) for v in obj]
    return obj


def has_float(obj: Any) -> bool:
    if isinstance(obj, float):
        return True
    if isinstance(obj, dict):
        return any(has_float(v) for v in obj.values())
    if isinstance(obj, list):
        return any(has_float(v) for v in obj)
    return False


# -- driving the hub ---------------------------------------------------------------------------


@dataclass
class Tally:
    """What a run counted; every count but ``cases`` must be 0."""

    cases: int = 0
    mismatches: int = 0
    server_errors: int = 0
    mutations: int = 0
    healthz_failures: int = 0
    roundtrip_failures: int = 0
    by_category: Counter[str] = field(default_factory=Counter)
    statuses: Counter[int] = field(default_factory=Counter)
    notes: list[str] = field(default_factory=list)
    rss_start_mb: float = 0.0
    rss_max_mb: float = 0.0

    def note(self, text: str) -> None:
        if len(self.notes) < 40:
            self.notes.append(text[:300])

    def sample_rss(self) -> None:
        self.rss_max_mb = max(self.rss_max_mb, rss_mb())


class Driver:
    """Sends requests to the hub as the corpus' identities and checks the store around them."""

    def __init__(self, hub: Any, http: aiohttp.ClientSession, tokens: dict[str, str]) -> None:
        self.hub = hub
        self.pool = hub.hub.pool
        self.http = http
        self.tokens = tokens
        self.cursor = 0  # node-r's pull cursor over the text cell
        #: The tables after the last corpus case (nothing else writes between cases).
        self.checksums: dict[str, str] | None = None

    def auth_headers(self, auth: str) -> dict[str, str]:
        if auth in ("none", "raw"):
            return {}
        if auth.endswith("+x"):
            return {"Authorization": f"Bearer {self.tokens[auth[:-2]]}x"}
        return {"Authorization": f"Bearer {self.tokens[auth]}"}

    async def send(
        self,
        method: str,
        path: str,
        *,
        query: str = "",
        body: bytes = b"",
        auth: str = "node-a",
        headers: dict[str, str] | None = None,
        chunked: bool = False,
    ) -> tuple[int, str, bytes]:
        """One request; returns (status, content type, body). Status 0: no answer."""
        url = URL(self.hub.url + path + (f"?{query}" if query else ""), encoded=True)
        h = {"Content-Type": MSGPACK} if method == "POST" else {}
        h.update(self.auth_headers(auth))
        h.update(headers or {})
        data: Any = None
        if method == "POST":
            data = chunks(body) if chunked else io.BytesIO(body)
        async with self.http.request(
            method, url, data=data, headers=h, timeout=aiohttp.ClientTimeout(total=60)
        ) as resp:
            return resp.status, resp.content_type, await resp.read()

    async def healthy(self) -> bool:
        try:
            async with self.http.get(
                f"{self.hub.url}/healthz", timeout=aiohttp.ClientTimeout(total=10)
            ) as resp:
                return resp.status == 200 and (await resp.json()).get("status") == "ok"
        except (aiohttp.ClientError, TimeoutError):
            return False

    async def run_case(self, case: Case, tally: Tally) -> None:
        """Send one corpus case and judge the answer and the store around it."""
        before = self.checksums or await table_checksums(self.pool)
        body = case.body()
        problems = []
        try:
            status, ctype, raw = await self.send(
                case.method,
                case.path,
                query=case.query,
                body=body,
                auth=case.auth,
                headers=case.headers,
                chunked=case.chunked,
            )
        except (aiohttp.ClientError, TimeoutError) as exc:
            status, ctype, raw = 0, "", repr(exc).encode()
        answer = parse_answer(ctype, raw)
        tally.statuses[status] += 1
        if status >= 500:
            tally.server_errors += 1
        if status != case.status:
            problems.append(f"status {status} (want {case.status})")
        if case.error:
            if not error_shape_ok(answer):
                problems.append(f"no error shape: {raw[:120]!r}")
            elif answer["error"] != case.error:
                problems.append(f"error {answer['error']!r} (want {case.error!r})")
        elif case.status >= 400 and error_shape_ok(answer):
            problems.append(f"a hub error body where none was expected: {answer['error']!r}")
        if case.acked is not None and status == 200:
            got = answer.get("acked") if isinstance(answer, dict) else None
            if got != case.acked:
                problems.append(f"acked {got!r} (want {case.acked})")
        after = self.checksums = await table_checksums(self.pool)
        changed = changed_tables(before, after)
        if case.mutates and status == 200 and "records" not in changed:
            problems.append("an accepted change left the records table as it was")
        if not case.mutates and changed:
            tally.mutations += 1
            problems.append(f"tables changed: {', '.join(changed)}")
        if case.roundtrip and status == 200:
            trouble = await self.read_back(body, case.acked or 0)
            if trouble:
                tally.roundtrip_failures += 1
                problems.append(trouble)
        if not await self.healthy():
            tally.healthz_failures += 1
            problems.append("/healthz failed afterwards")
        tally.cases += 1
        tally.by_category[case.category] += 1
        tally.sample_rss()
        if problems:
            tally.mismatches += 1
            tally.note(f"{case.file} ({case.what}): {'; '.join(problems)}")

    async def read_back(self, pushed: bytes, seq: int) -> str | None:
        """Pull node-t's change ``seq`` as node-r and compare it with what was pushed, byte
        for byte (canonical msgpack); compare the JSONB view too where JSON can say it."""
        msg = unpack(pushed)
        cell, coll = msg["cells"][0], msg["colls"][0]
        key, fields = msg["changes"][0][2], msg["changes"][0][4]
        query = f"tier=standard&prefix=west%2Fng%2Flagos%2Ftext&limit=50&after={self.cursor}"
        status, _, raw = await self.send(
            "GET", "/v1/pull", query=query, auth="node-r", headers={"Accept": MSGPACK}
        )
        if status != 200:
            return f"read-back pull answered {status}"
        page = unpack(raw)
        self.cursor = page["next"]
        found = [
            r
            for r in page["changes"]
            if page["nodes"][r[1]] == "node-t" and r[3] == seq and r[2] == msg["lane"]
        ]
        if len(found) != 1:
            return f"read-back: {len(found)} changes of node-t seq {seq} in the pull page"
        r = found[0]
        got = (page["cells"][r[4]], page["colls"][r[5]], r[6], r[8])
        if canonical(list(got)) != canonical([cell, coll, key, fields]):
            return f"read-back differs: sent {[cell, coll, key]!r:.80}, got {list(got[:3])!r:.80}"
        doc = await self.pool.fetchval(
            "SELECT doc::text FROM records WHERE cell = $1 AND collection = $2 AND key = $3",
            cell,
            coll,
            key,
        )
        if doc is None:
            return "read-back: no records row for the key as sent"
        if not has_float(fields) and json.loads(doc) != no_nul(fields):
            return f"JSONB view differs from what was sent: {doc[:80]!r}"
        return None


async def chunks(body: bytes, size: int = 256 * 1024) -> AsyncIterator[bytes]:
    for i in range(0, len(body), size):
        yield body[i : i + size]


async def set_up_nodes(hub: Any) -> dict[str, str]:
    tokens = {n: await hub.add_node(n, grant) for n, grant in NODES.items()}
    await revoke_node(hub.hub.pool, "node-c")
    return tokens


async def run_corpus(
    driver: Driver, tally: Tally, keep: Callable[[Case], bool] = lambda c: True
) -> None:
    for case in load_corpus():
        if case.category == "setup" or keep(case):
            await driver.run_case(case, tally)


# -- fuzzing: Hypothesis over HTTP ----------------------------------------------------------------

FUZZ_CELL = "west/ng/lagos/fuzz"
PUSH_KEYS = ["v", "node", "lane", "first", "last", "skipped", "cells", "colls", "changes"]
TRICKY = [
    0,
    1,
    2,
    3,
    4,
    -1,
    True,
    False,
    None,
    0.5,
    math.nan,
    math.inf,
    2**63 - 1,
    2**63,
    2**64 - 1,
    -(2**63),
    "",
    "1",
    "node-f",
    "node-a",
    FUZZ_CELL,
    "west/ng/../x",
    "east/ke/x",
    "west//x",
    "\x00",
    "\ud7ff",
    "\U0001f600",
    [],
    {},
    [1],
    {"": 1},
    b"",
    b"\xc1",
]
leaves = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats()
    | st.text(max_size=16)
    | st.binary(max_size=16)
    | st.sampled_from(TRICKY)
)
values = st.recursive(
    leaves,
    lambda kids: (
        st.lists(kids, max_size=6)
        | st.dictionaries(st.text(max_size=8) | st.integers(-3, 3), kids, max_size=6)
    ),
    max_leaves=16,
)


def valid_push(first: int, n: int, lane: int) -> dict[str, Any]:
    base = (1_767_225_600_000 << 16) + first * 10
    rows = [
        [0, 0, f"k{first + i}", base if i == 0 else 10, {"v": first + i}, None] for i in range(n)
    ]
    return {
        "v": 1,
        "node": "node-f",
        "lane": lane,
        "first": first,
        "last": first + n - 1,
        "skipped": [],
        "cells": [FUZZ_CELL],
        "colls": ["fz"],
        "changes": rows,
    }


@st.composite
def push_requests(draw: st.DrawFn) -> dict[str, Any]:
    """A POST /v1/push as a recipe (see :func:`build_push`): random bytes, a random msgpack
    value, or a valid push of the fuzz node, its fields replaced, removed or added, then its
    bytes flipped, cut or extended, zstd on or off. Nothing here reads the hub's state, so
    Hypothesis sees the same draws for the same choices."""
    kind = draw(st.sampled_from(["bytes", "value", "push-like", "mutated", "mutated", "mutated"]))
    recipe: dict[str, Any] = {"kind": kind, "ops": [], "byte_ops": []}
    if kind == "bytes":
        recipe["raw"] = draw(st.binary(max_size=400))
    elif kind == "value":
        recipe["raw"] = msgpack.packb(draw(values), use_bin_type=True)
    else:
        recipe["lane"] = draw(st.integers(0, 3))
        recipe["n"] = draw(st.integers(1, 3))
        if kind == "push-like":
            for k in draw(st.lists(st.sampled_from(PUSH_KEYS), max_size=3, unique=True)):
                recipe["ops"].append(("set", k, draw(values)))
        else:
            for _ in range(draw(st.integers(1, 3))):
                op = draw(st.sampled_from(["set", "del", "add", "row", "fields", "cell", "seq"]))
                if op == "set":
                    recipe["ops"].append(("set", draw(st.sampled_from(PUSH_KEYS)), draw(values)))
                elif op == "del":
                    recipe["ops"].append(("del", draw(st.sampled_from(PUSH_KEYS))))
                elif op == "add":
                    recipe["ops"].append(
                        ("set", draw(st.text(max_size=6) | st.integers(-2, 2)), draw(values))
                    )
                elif op == "row":
                    recipe["ops"].append(("row", draw(st.integers(0, 5)), draw(values)))
                elif op == "fields":
                    recipe["ops"].append(
                        ("fields", draw(st.dictionaries(st.text(max_size=6), values, max_size=3)))
                    )
                elif op == "cell":
                    cell = draw(st.sampled_from(TRICKY[20:24]) | st.text(max_size=30))
                    recipe["ops"].append(("set", "cells", [cell]))
                else:
                    recipe["ops"].append(
                        ("seq", draw(st.integers(-3, 2)), draw(st.integers(-3, 5)))
                    )
            for _ in range(draw(st.integers(0, 2))):
                recipe["byte_ops"].append(
                    (
                        draw(st.sampled_from(["flip", "cut", "insert", "append"])),
                        draw(st.integers(0, 1 << 16)),
                        draw(st.binary(min_size=1, max_size=8)),
                    )
                )
    recipe["encoding"] = draw(st.sampled_from([None, None, None, "zstd", "zstd-label", "gzip"]))
    recipe["auth"] = draw(st.sampled_from(["node-f"] * 6 + ["none", "node-c", "node-f+x"]))
    return recipe


def build_push(recipe: dict[str, Any], acked: dict[int, int]) -> dict[str, Any]:
    """The request of a :func:`push_requests` recipe, given the fuzz node's acked seq per lane
    (so a mutated push starts from one the hub would accept)."""
    if recipe["kind"] in ("bytes", "value"):
        body = recipe["raw"]
    else:
        lane = recipe["lane"]
        msg: dict[Any, Any] = valid_push(acked.get(lane, 0) + 1, recipe["n"], lane)
        for op, *args in recipe["ops"]:
            if op == "set":
                msg[args[0]] = args[1]
            elif op == "del":
                msg.pop(args[0], None)
            elif op == "row" and isinstance(msg.get("changes"), list) and msg["changes"]:
                r = msg["changes"][0]
                if isinstance(r, list) and len(r) > args[0]:
                    r[args[0]] = args[1]
            elif op == "fields" and isinstance(msg.get("changes"), list) and msg["changes"]:
                r = msg["changes"][-1]
                if isinstance(r, list) and len(r) > 4:
                    r[4] = args[0]
            elif op == "seq":
                a = acked.get(lane, 0)
                msg["first"], msg["last"] = a + 1 + args[0], a + 1 + args[1]
        body = msgpack.packb(msg, use_bin_type=True)
        for how, pos, extra in recipe["byte_ops"]:
            where = pos % max(1, len(body))
            if how == "flip" and body:
                body = body[:where] + bytes([body[where] ^ (extra[0] or 1)]) + body[where + 1 :]
            elif how == "cut":
                body = body[:where]
            elif how == "insert":
                body = body[:where] + extra + body[where:]
            else:
                body += extra
    headers = {}
    if recipe["encoding"] == "zstd":
        body = zstandard.ZstdCompressor(level=1).compress(body)
        headers["Content-Encoding"] = "zstd"
    elif recipe["encoding"] == "zstd-label":
        headers["Content-Encoding"] = "zstd"
    elif recipe["encoding"]:
        headers["Content-Encoding"] = recipe["encoding"]
    return {
        "method": "POST",
        "path": "/v1/push",
        "body": body,
        "headers": headers,
        "auth": recipe["auth"],
    }


@st.composite
def pull_requests(draw: st.DrawFn) -> dict[str, Any]:
    """A GET of a read route with random parameters (never a valid ``wait``: no long-polls)."""
    path = draw(st.sampled_from(["/v1/pull", "/v1/pull", "/v1/snapshot", "/v1/records"]))
    names = ["prefix", "tier", "limit", "after", "watch", "cell", "collection", "key", "tag"]
    params = []
    for name in draw(st.lists(st.sampled_from(names), max_size=5)):
        value = draw(
            st.sampled_from(
                [
                    FUZZ_CELL,
                    "west/ng/lagos",
                    "standard",
                    "critical:0",
                    "10",
                    "-1",
                    "fz",
                    "k1",
                    "east/x",
                ]
            )
            | st.text(max_size=20)
        )
        params.append((name, value))
    if draw(st.booleans()):
        params.append(("wait", draw(st.sampled_from(["-1", "nan", "x", "1e9"]))))
    query = "&".join(f"{URL.build(query={k: v}).raw_query_string}" for k, v in params)
    auth = draw(st.sampled_from(["node-f", "node-f", "none", "node-c"]))
    return {"method": "GET", "path": path, "query": query, "auth": auth, "headers": {}}


@dataclass
class FuzzTally:
    examples: int = 0
    server_errors: int = 0
    mutations: int = 0
    bad_error_shape: int = 0
    healthz_failures: int = 0
    accepted: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    notes: list[str] = field(default_factory=list)

    def note(self, text: str) -> None:
        if len(self.notes) < 20:
            self.notes.append(text[:300])


class HttpFuzzer:
    """Runs Hypothesis in a worker thread; each example is sent from the hub's event loop."""

    def __init__(
        self, driver: Driver, loop: asyncio.AbstractEventLoop, done: Callable[[], bool]
    ) -> None:
        self.driver = driver
        self.loop = loop
        self.done = done
        self.tally = FuzzTally()
        self.checksums: dict[str, str] | None = None

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=120)

    async def acked(self) -> dict[int, int]:
        rows = await self.driver.pool.fetch(
            "SELECT lane, acked_seq FROM node_lanes WHERE node_id = 'node-f'"
        )
        return {r["lane"]: r["acked_seq"] for r in rows}

    async def one(self, req: dict[str, Any]) -> None:
        t = self.tally
        if self.checksums is None:
            self.checksums = await table_checksums(self.driver.pool)
        try:
            status, ctype, raw = await self.driver.send(
                req["method"],
                req["path"],
                query=req.get("query", ""),
                body=req.get("body", b""),
                auth=req["auth"],
                headers=req["headers"],
            )
        except (aiohttp.ClientError, TimeoutError) as exc:
            status, ctype, raw = 0, "", repr(exc).encode()
        t.examples += 1
        t.statuses[status] += 1
        what = (
            f"{req['method']} {req['path']} {req.get('query', '')[:60]} {req['headers']} "
            f"auth={req['auth']} body={req.get('body', b'')[:60].hex()}"
        )
        if status >= 500 or status == 0:
            t.server_errors += 1
            t.note(f"{status}: {what}: {raw[:160]!r}")
        elif status >= 400:
            if not error_shape_ok(parse_answer(ctype, raw)):
                t.bad_error_shape += 1
                t.note(f"{status} without the error shape: {what}: {raw[:120]!r}")
            after = await table_checksums(self.driver.pool)
            changed = changed_tables(self.checksums, after)
            if changed:
                t.mutations += 1
                t.note(f"{status} changed {changed}: {what}")
            self.checksums = after
        else:
            t.accepted += 1
            self.checksums = None  # accepted: the store may change; re-read next time
        if not await self.driver.healthy():
            t.healthz_failures += 1
            t.note(f"/healthz failed after {what}")

    def run(self) -> FuzzTally:
        """Rounds of 100 examples (seeded from SEED) until ``done()``."""
        round_no = 0
        while not self.done():

            @seed(SEED + round_no)
            @settings(
                max_examples=100,
                deadline=None,
                database=None,
                phases=[Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            @given(data=st.data())
            def examples(data: st.DataObject) -> None:
                pull = data.draw(st.integers(0, 4)) == 0
                recipe = data.draw(pull_requests() if pull else push_requests())
                if self.done():
                    return
                req = recipe if pull else build_push(recipe, self.call(self.acked()))
                self.call(self.one(req))

            examples()
            round_no += 1
        return self.tally


# -- fuzzing: atheris on decode + validate (child process) --------------------------------------------


def atheris_main(flags: list[str]) -> None:
    """The libFuzzer target: the hub's decode and validate path on raw bodies (zstd when the
    input starts with zstd's magic). Anything but a 4xx SyncError escaping is a crash."""
    import atheris  # noqa: PLC0415  (the child's alone: libFuzzer takes over the process)

    # Coverage feedback from syncengine's own code (atheris.instrument_all would take
    # minutes over everything pytest and aiohttp loaded).
    for obj in gc.get_objects():
        if isinstance(obj, types.FunctionType) and (obj.__module__ or "").startswith("syncengine"):
            atheris.instrument_func(obj)
    node = Node(node_id="node-a", region="west", grants=("west/ng/lagos",))
    clock = HybridClock(max_drift_ms=300_000)
    limits = Limits(max_body_bytes=8 * 1_048_576)
    magic = b"\x28\xb5\x2f\xfd"

    def one_input(data: bytes) -> None:
        try:
            msg = decode_body(data, "zstd" if data[:4] == magic else None, limits)
            batch = decode_push(msg, max_changes=1000)
            hub_push.check_batch(
                node, batch, region="west", clock=clock, resolvers={"stock": "counter"}
            )
        except SyncError as exc:
            if not 400 <= exc.http_status < 500 or not exc.code or not exc.message:
                raise AssertionError(f"{exc.code} answered {exc.http_status}") from exc

    atheris.Setup([sys.argv[0], *flags], one_input)
    atheris.Fuzz()


@dataclass
class AtherisRun:
    """The atheris child process: started by :func:`atheris_child`, judged by :meth:`result`."""

    proc: asyncio.subprocess.Process
    seconds: float
    runs: int

    async def result(self) -> tuple[int, int, str]:
        """Wait for the child; returns (executions, crashes, the tail of its output)."""
        limit = self.seconds + 180 if not self.runs else 24 * 3600
        try:
            out, _ = await asyncio.wait_for(self.proc.communicate(), timeout=limit)
        except TimeoutError:
            return 0, 1, f"atheris child did not finish within {limit} s"
        text = out.decode(errors="replace")
        found = re.findall(r"stat::number_of_executed_units:\s*(\d+)", text) or re.findall(
            r"Done (\d+) runs", text
        )
        execs = int(found[-1]) if found else 0
        crashed = self.proc.returncode != 0 or "Uncaught Python exception" in text
        return execs, int(crashed), text[-3000:]


@contextlib.asynccontextmanager
async def atheris_child(workdir: Path, seconds: float, runs: int) -> AsyncIterator[AtherisRun]:
    """Run :func:`atheris_main` in a child process, seeded with the corpus' small bodies, for
    ``seconds`` (or ``runs`` executions in long mode); the child is killed (by its pid) if it
    is still running when the block exits."""
    seeds = workdir / "seeds"
    seeds.mkdir(parents=True)
    for p in sorted(CORPUS.glob("*.bin")):
        if p.stat().st_size <= 4096:
            shutil.copy(p, seeds / p.name)
    flags = [
        f"-max_total_time={int(seconds) if not runs else 24 * 3600}",
        f"-seed={SEED}",
        "-max_len=4096",
        "-timeout=30",
        "-rss_limit_mb=2048",
        "-print_final_stats=1",
        f"-artifact_prefix={workdir}/",
        str(seeds),
    ]
    if runs:
        flags.insert(0, f"-runs={runs}")
    path = os.pathsep.join(filter(None, [str(HERE.parent), os.environ.get("PYTHONPATH")]))
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(Path(__file__).resolve()),
        "--atheris",
        *flags,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=dict(os.environ, PYTHONPATH=path),
        cwd=workdir,
    )
    try:
        yield AtherisRun(proc=proc, seconds=seconds, runs=runs)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


# -- the tests -----------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def corpus_driver(hub: Any) -> AsyncIterator[Driver]:
    tokens = await set_up_nodes(hub)
    async with aiohttp.ClientSession() as http:
        yield Driver(hub, http, tokens)


async def test_t14_bad_input_corpus_and_fuzz(
    hub: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every corpus case gets its expected status and code, changes no table when refused,
    leaves /healthz ok; accepted odd text reads back byte-identical; Hypothesis over HTTP and
    atheris on decode + validate find no 5xx, no mutation, no crash; RSS grows < 50 MB."""
    monkeypatch.setattr(hub_push, "GAP_WAIT_S", GAP_WAIT_S)
    summary = Summary(test="T14", name="bad-input corpus and fuzzing of the hub")
    async with corpus_driver(hub) as driver:
        await driver.healthy()
        rss_start = rss_mb()
        # Hypothesis first, on a small store (every refusal is checksummed), then the corpus;
        # the atheris child runs alongside both (its start-up takes a few seconds).
        started = time.monotonic()
        async with atheris_child(tmp_path / "atheris", FUZZ_S, ATHERIS_RUNS) as atheris:
            deadline = started + FUZZ_S
            fuzzer = HttpFuzzer(
                driver, asyncio.get_running_loop(), lambda: time.monotonic() >= deadline
            )
            fuzz = await asyncio.to_thread(fuzzer.run)
            fuzz_s = time.monotonic() - started
            rss_after_fuzz = rss_mb()
            tally = Tally(rss_start_mb=rss_start, rss_max_mb=max(rss_start, rss_after_fuzz))
            started = time.monotonic()
            await run_corpus(driver, tally)
            corpus_s = time.monotonic() - started
            tally.sample_rss()
            execs, crashes, atheris_out = await atheris.result()
    growth = max(0.0, tally.rss_max_mb - rss_start)
    for note in tally.notes + fuzz.notes:
        print("T14:", note)
    if crashes:
        print("T14 atheris output:\n" + atheris_out)
    summary.cases = tally.cases + fuzz.examples + execs
    summary.counts = {
        "mismatches": tally.mismatches,
        "server_errors": tally.server_errors + fuzz.server_errors,
        "mutations": tally.mutations + fuzz.mutations,
        "fuzz_crashes": crashes,
        "healthz_failures": tally.healthz_failures + fuzz.healthz_failures,
        "roundtrip_failures": tally.roundtrip_failures,
        "bad_error_shape": fuzz.bad_error_shape,
        "rss_over_budget": int(growth >= RSS_BUDGET_MB),
        "atheris_not_run": int(execs == 0),
    }
    summary.extra_violations = (
        "mismatches",
        "mutations",
        "fuzz_crashes",
        "healthz_failures",
        "roundtrip_failures",
        "bad_error_shape",
        "rss_over_budget",
        "atheris_not_run",
    )
    summary.figures = {
        "corpus_cases": tally.cases,
        "by_category": dict(tally.by_category),
        "corpus_statuses": {str(k): v for k, v in sorted(tally.statuses.items())},
        "hypothesis_examples": fuzz.examples,
        "hypothesis_accepted": fuzz.accepted,
        "hypothesis_statuses": {str(k): v for k, v in sorted(fuzz.statuses.items())},
        "atheris_execs": execs,
        "fuzz_budget_s": FUZZ_S,
        "hypothesis_seconds": round(fuzz_s, 1),
        "corpus_seconds": round(corpus_s, 1),
        "rss_start_mb": round(rss_start, 1),
        "rss_after_fuzz_mb": round(rss_after_fuzz, 1),
        "rss_max_mb": round(tally.rss_max_mb, 1),
        "rss_growth_mb": round(growth, 1),
        # The high-water mark includes moments inside a request (a bomb inflates up to the
        # codec's 64 MiB cap before it is refused); the budget is judged between requests.
        "rss_peak_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3, 1),
        "rss_measured": "this process (the hub fixture runs in-process)",
    }
    summary.finish()


#: The broken builds of the negative controls, and the corpus categories each runs.
CONTROLS = {
    "trusts-claimed-node": ("identity", "check_batch is given the node the batch claims"),
    "no-body-cap": ("size", "the hub runs with max_body_bytes = 64 MiB"),
}


@pytest.mark.parametrize("bug", sorted(CONTROLS))
async def test_t14_negative_control(
    bug: str, hub_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The corpus must catch a broken hub: one that checks a batch against the node id it
    claims instead of its token's, or one without the 8 MiB body cap."""
    monkeypatch.setattr(hub_push, "GAP_WAIT_S", GAP_WAIT_S)
    category, what = CONTROLS[bug]
    if bug == "trusts-claimed-node":
        original = hub_push.check_batch

        def trusting(node: Any, batch: Any, **kw: Any) -> None:
            original(dataclasses.replace(node, node_id=batch.node), batch, **kw)

        monkeypatch.setattr(hub_push, "check_batch", trusting)
        hub = await hub_factory()
    else:
        hub = await hub_factory(max_body_bytes=64 * 1_048_576)
    summary = Summary(test="T14", name=f"negative control: {what}")
    tally = Tally()
    async with corpus_driver(hub) as driver:
        await run_corpus(driver, tally, keep=lambda c: c.category == category)
    for note in tally.notes[:5]:
        print("T14 control:", note)
    summary.cases = tally.cases
    summary.counts = {"mismatches": tally.mismatches, "mutations": tally.mutations}
    summary.control("mismatches")


if __name__ == "__main__" and sys.argv[1:2] == ["--atheris"]:
    atheris_main(sys.argv[2:])
