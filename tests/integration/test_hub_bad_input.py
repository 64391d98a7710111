"""Hostile and malformed requests against a running hub (invariant 8).

Every case must be answered with the expected 4xx and an ``{error, message, detail}`` body,
must leave every hub table exactly as it was (checksummed before and after), and the hub
must keep serving (``/healthz``) afterwards.
"""

from __future__ import annotations

import io
import json
import struct
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import msgpack
import pytest
import zstandard

from syncengine.codec import encode
from syncengine.hub.nodes import revoke_node
from syncengine.merge import Change, RecordState
from syncengine.protocol import PushBatch, encode_push

pytestmark = pytest.mark.integration

CELL = "west/ng/lagos/clinic-12"
TABLES = ["nodes", "node_lanes", "cells", "records", "feed", "feed_head", "conflicts"]


def now_hlc(offset_ms: int = 0) -> int:
    return (time.time_ns() // 1_000_000 + offset_ms) << 16


#: Seq n of a node is always stamped T0 + n (unless offset): re-sending a batch is a true
#: replay, which the hub answers as the first time (other changes under held seqs are not).
T0 = now_hlc()


def good_push(node: str = "node-a", *, first: int = 1, n: int = 2, cell: str = CELL,
              hlc_offset_ms: int = 0) -> dict[str, Any]:
    base = now_hlc(hlc_offset_ms) if hlc_offset_ms else T0
    changes = [
        Change(cell=cell, collection="visits", key=f"k{first + i}", hlc=base + first + i,
               node=node, fields={"v": i}, lane=2, seq=first + i)
        for i in range(n)
    ]
    return encode_push(PushBatch(node=node, lane=2, first_seq=first, last_seq=first + n - 1,
                                 changes=changes))


def mutate(**changes: Any) -> Callable[[dict[str, Any]], dict[str, Any]]:
    def f(msg: dict[str, Any]) -> dict[str, Any]:
        msg = dict(msg)
        for k, v in changes.items():
            if v is ...:
                del msg[k]
            else:
                msg[k] = v
        return msg
    return f


def packed(msg: dict[str, Any]) -> bytes:
    return msgpack.packb(msg, use_bin_type=True)


# (name, body bytes or builder, headers extra, expected status, expected error code)
CASES: list[tuple[str, Any, dict[str, str], int, str]] = [
    ("truncated msgpack", packed(good_push())[:-7], {}, 400, "malformed_body"),
    ("garbage bytes", b"\xc1\xc1\xc1garbage", {}, 400, "malformed_body"),
    ("trailing garbage", packed(good_push()) + b"\x00", {}, 400, "malformed_body"),
    ("not a map", packed([1, 2, 3]), {}, 400, "malformed_body"),
    ("array32 of 4G items", b"\xdd" + struct.pack(">I", 2**32 - 1), {}, 413, "item_limit_exceeded"),
    ("10,000-deep nesting", b"\x91" * 10_000 + b"\x00", {}, 413, "too_deep"),
    ("zstd bomb", zstandard.ZstdCompressor(level=19).compress(b"\x00" * (200 << 20)),
     {"Content-Encoding": "zstd"}, 413, "decompressed_too_large"),
    ("unknown encoding", packed(good_push()), {"Content-Encoding": "br"}, 400, "unsupported_encoding"),
    ("body over the limit", b"\x00" * (9 * 1024 * 1024), {}, 413, "body_too_large"),
    ("unknown field", packed(mutate(extra=1)(good_push())), {}, 400, "unknown_field"),
    ("missing field", packed(mutate(lane=...)(good_push())), {}, 400, "missing_field"),
    ("seq as string", packed(mutate(first="1")(good_push())), {}, 400, "invalid_value"),
    ("seq as float", packed(mutate(first=1.0)(good_push())), {}, 400, "invalid_value"),
    ("negative seq", packed(mutate(first=-1)(good_push())), {}, 400, "invalid_value"),
    ("bool lane", packed(mutate(lane=True)(good_push())), {}, 400, "invalid_value"),
    ("lane out of range", packed(mutate(lane=9)(good_push())), {}, 400, "invalid_value"),
    ("seq range does not match", packed(mutate(last=5)(good_push())), {}, 400, "invalid_seq"),
    ("backwards seq range", packed(mutate(first=3, last=2)(good_push())), {}, 400, "invalid_value"),
    ("unsupported version", packed(mutate(v=99)(good_push())), {}, 400, "unsupported_version"),
    ("batch over the item limit", packed(good_push(n=1001)), {}, 413, "batch_too_large"),
    ("cell of another region", packed(good_push(first=3, cell="east/ke/nairobi/shop-1")), {}, 403,
     "foreign_region"),
    ("cell outside the grants", packed(good_push(first=3, cell="west/gh/accra/school-3")), {}, 403,
     "not_granted"),
    ("invalid cell id", packed(mutate(cells=["west/NG/../x"])(good_push())), {}, 400, "invalid_cell"),
    ("uppercase region", packed(mutate(cells=["West/ng"])(good_push())), {}, 400, "invalid_cell"),
    ("node id of another node", packed(good_push(node="node-b")), {}, 403, "node_mismatch"),
    ("stamp beyond drift", packed(good_push(hlc_offset_ms=3_600_000)), {}, 422, "clock_drift"),
    ("negative hlc", packed(mutate(changes=[[0, 0, "k", -5, {"v": 1}, None]], last=1)(good_push())),
     {}, 400, "invalid_hlc"),
    ("float value NaN", packed(mutate(changes=[[0, 0, "k", now_hlc(), {"v": float("nan")}, None]],
                                      last=1)(good_push())), {}, 400, "invalid_value"),
    ("10,000-char key", packed(mutate(changes=[[0, 0, "k" * 10_000, now_hlc(), {"v": 1}, None]],
                                      last=1)(good_push())), {}, 400, "key_too_long"),
    ("gap: starts beyond acked", packed(good_push(first=50)), {}, 409, "seq_gap"),
    ("counter with a string", packed(mutate(colls=["stock"], first=3, last=3, changes=[
        [0, 0, "k", now_hlc(), {"n": "five"}, None]])(good_push())), {}, 400, "invalid_value"),
]


async def checksum(pool: Any) -> dict[str, str]:
    """A digest of every data table. The nodes' bookkeeping columns are left out: the hub
    records there that a request was refused, which is the point of recording it."""
    out = {}
    for table in TABLES:
        rows = (
            "(SELECT n.node_id, n.region, n.token_hash, n.grants, n.revoked_at FROM nodes n)"
            if table == "nodes"
            else table
        )
        out[table] = await pool.fetchval(
            f"SELECT md5(coalesce(string_agg(t::text, '|' ORDER BY t::text), '')) FROM {rows} t"
        )
    return out


@pytest.fixture
async def seeded(hub):  # type: ignore[no-untyped-def]
    """A hub with node-a (granted west/ng/lagos) and node-b, and one applied push."""
    token = await hub.add_node("node-a", "west/ng/lagos")
    await hub.add_node("node-b", "west/ng/lagos")
    async with aiohttp.ClientSession() as http, http.post(
        f"{hub.url}/v1/push", data=packed(good_push()), headers=headers(token)
    ) as resp:
        assert resp.status == 200, await resp.text()
    return hub, token


def headers(token: str | None, extra: dict[str, str] | None = None) -> dict[str, str]:
    h = {"Content-Type": "application/msgpack"}
    if token is not None:
        h["Authorization"] = f"Bearer {token}"
    h.update(extra or {})
    return h


async def test_bad_pushes_are_refused_and_change_nothing(seeded) -> None:  # type: ignore[no-untyped-def]
    hub, token = seeded
    before = await checksum(hub.hub.pool)
    mismatches = []
    async with aiohttp.ClientSession() as http:
        for name, body, extra, status, code in CASES:
            async with http.post(f"{hub.url}/v1/push", data=io.BytesIO(body),
                                 headers=headers(token, extra)) as resp:
                raw = await resp.read()
                got = json.loads(raw) if resp.content_type == "application/json" else {"raw": raw[:80]}
                if resp.status != status or got.get("error") != code or not got.get("message"):
                    mismatches.append((name, resp.status, got))
            async with http.get(f"{hub.url}/healthz") as resp:
                assert resp.status == 200, name
    for m in mismatches:
        print("MISMATCH", m[0], m[1], str(m[2])[:150])
    assert not mismatches, [m[0] for m in mismatches]
    assert await checksum(hub.hub.pool) == before


@pytest.mark.parametrize(
    ("token", "status", "code"),
    [(None, 401, "unauthenticated"), ("se1_wrong", 401, "invalid_token"), ("", 401, "unauthenticated")],
)
async def test_missing_or_wrong_token(seeded, token: str | None, status: int, code: str) -> None:  # type: ignore[no-untyped-def]
    hub, _ = seeded
    before = await checksum(hub.hub.pool)
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{hub.url}/v1/push", data=packed(good_push(first=3)),
                             headers=headers(token)) as resp:
            assert resp.status == status
            assert (await resp.json())["error"] == code
        async with http.get(f"{hub.url}/v1/pull", params={"prefix": CELL},
                            headers=headers(token)) as resp:
            assert resp.status == status
    assert await checksum(hub.hub.pool) == before


async def test_replayed_batch_is_a_no_op_with_the_same_answer(seeded) -> None:  # type: ignore[no-untyped-def]
    hub, token = seeded
    before = await checksum(hub.hub.pool)
    async with aiohttp.ClientSession() as http, http.post(
        f"{hub.url}/v1/push", data=packed(good_push()),
        headers=headers(token, {"Accept": "application/msgpack"}),
    ) as resp:
        assert resp.status == 200
        assert msgpack.unpackb(await resp.read())["acked"] == 2
    after = await checksum(hub.hub.pool)
    # Only bookkeeping moves (last_seen); no record, feed or lane changes.
    assert {k: v for k, v in after.items() if k != "nodes"} == {
        k: v for k, v in before.items() if k != "nodes"}


async def test_other_changes_under_held_seqs_are_refused_not_dropped(seeded) -> None:  # type: ignore[no-untyped-def]
    """An older copy of a store re-uses seqs for new changes: answering them as a replay
    would lose them; the hub tells them apart by their stamps and refuses them."""
    hub, token = seeded
    before = await checksum(hub.hub.pool)
    async with aiohttp.ClientSession() as http, http.post(
        f"{hub.url}/v1/push", data=packed(good_push(first=2, hlc_offset_ms=-1000)),
        headers=headers(token),
    ) as resp:
        assert resp.status == 409
        body = await resp.json()
        assert body["error"] == "seq_reused" and body["detail"]["seqs"] == [2]
    assert await checksum(hub.hub.pool) == before
    # What status shows of the node: its last error.
    assert await hub.hub.pool.fetchval(
        "SELECT last_error_code FROM nodes WHERE node_id = 'node-a'") == "seq_reused"


async def test_revoked_token_gets_401_on_the_next_request(seeded) -> None:  # type: ignore[no-untyped-def]
    hub, token = seeded
    await revoke_node(hub.hub.pool, "node-a")
    async with aiohttp.ClientSession() as http, http.get(
        f"{hub.url}/v1/pull", params={"prefix": CELL}, headers=headers(token)
    ) as resp:
        assert resp.status == 401
        assert (await resp.json())["error"] == "revoked_token"


async def test_sql_ish_and_odd_text_is_stored_verbatim(seeded) -> None:  # type: ignore[no-untyped-def]
    hub, token = seeded
    odd = ["'; DROP TABLE records;--", "$1", "a\x00b", "\u202eRTL", "e\u0301", "😀", "x" * 100_000]
    msg = encode_push(PushBatch(node="node-a", lane=2, first_seq=3, last_seq=3, changes=[
        Change(cell=CELL, collection="visits", key="odd", hlc=now_hlc(), node="node-a",
               fields={f"f{i}": s for i, s in enumerate(odd)}, lane=2, seq=3)]))
    async with aiohttp.ClientSession() as http, http.post(
        f"{hub.url}/v1/push", data=encode(msg), headers=headers(token)
    ) as resp:
        assert resp.status == 200, await resp.text()
    state = RecordState.from_bytes(
        await hub.hub.pool.fetchval("SELECT state FROM records WHERE key = 'odd'"))
    assert state.document() == {f"f{i}": s for i, s in enumerate(odd)}
    # JSONB cannot hold NUL: the operator view shows U+FFFD, the state keeps the exact value.
    assert await hub.hub.pool.fetchval("SELECT doc->>'f2' FROM records WHERE key = 'odd'") == "a\ufffdb"
    assert await hub.hub.pool.fetchval("SELECT count(*) FROM records") == 3


async def test_replay_after_grants_narrowed_answers_as_the_first_time(seeded) -> None:  # type: ignore[no-untyped-def]
    """A lost answer, then the operator narrows the grants, then the edge re-sends: the hub
    must not 403 changes it already holds (the edge would dead-letter them)."""
    hub, token = seeded
    await hub.hub.pool.execute("UPDATE nodes SET grants = '{west/gh}' WHERE node_id = 'node-a'")
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{hub.url}/v1/push", data=packed(good_push()),
                             headers=headers(token, {"Accept": "application/msgpack"})) as resp:
            assert resp.status == 200
            assert msgpack.unpackb(await resp.read())["acked"] == 2
        async with http.post(f"{hub.url}/v1/push", data=packed(good_push(first=3)),
                             headers=headers(token)) as resp:
            assert resp.status == 403
            body = await resp.json()
            assert body["error"] == "not_granted" and body["detail"]["seq"] == 3
