"""Hostile and malformed requests against a running hub (invariant 8): what the T14 corpus
does not cover.

The bad-input corpus of ``tests/fault/test_t14_bad_input.py`` (651 requests, each checked for
its status and error code, an unchanged checksum of every hub table and a healthy hub
afterwards) supersedes the cases this file used to hold: malformed msgpack, sizes, types,
missing, wrong and revoked tokens, replays and odd text stored verbatim. What stays here is
what needs more than one request or a change behind the hub's back.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import time
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import msgpack
import pytest

from syncengine.merge import Change
from syncengine.protocol import PushBatch, encode_push

pytestmark = pytest.mark.integration

CELL = "west/ng/lagos/clinic-12"
TABLES = ["nodes", "node_lanes", "cells", "records", "feed", "feed_head", "conflicts"]


def now_hlc(offset_ms: int = 0) -> int:
    return (time.time_ns() // 1_000_000 + offset_ms) << 16


#: Seq n of a node is always stamped T0 + n (unless offset): re-sending a batch is a true
#: replay, which the hub answers as the first time (other changes under held seqs are not).
T0 = now_hlc()


def good_push(
    node: str = "node-a", *, first: int = 1, n: int = 2, cell: str = CELL, hlc_offset_ms: int = 0
) -> dict[str, Any]:
    base = now_hlc(hlc_offset_ms) if hlc_offset_ms else T0
    changes = [
        Change(
            cell=cell,
            collection="visits",
            key=f"k{first + i}",
            hlc=base + first + i,
            node=node,
            fields={"v": i},
            lane=2,
            seq=first + i,
        )
        for i in range(n)
    ]
    return encode_push(
        PushBatch(node=node, lane=2, first_seq=first, last_seq=first + n - 1, changes=changes)
    )


def packed(msg: dict[str, Any]) -> bytes:
    return msgpack.packb(msg, use_bin_type=True)


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
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{hub.url}/v1/push", data=packed(good_push()), headers=headers(token)) as resp,
    ):
        assert resp.status == 200, await resp.text()
    return hub, token


def headers(token: str | None, extra: dict[str, str] | None = None) -> dict[str, str]:
    h = {"Content-Type": "application/msgpack"}
    if token is not None:
        h["Authorization"] = f"Bearer {token}"
    h.update(extra or {})
    return h


async def test_other_changes_under_held_seqs_are_refused_not_dropped(seeded) -> None:  # type: ignore[no-untyped-def]
    """An older copy of a store re-uses seqs for new changes: answering them as a replay
    would lose them; the hub tells them apart by their stamps and refuses them."""
    hub, token = seeded
    before = await checksum(hub.hub.pool)
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{hub.url}/v1/push",
            data=packed(good_push(first=2, hlc_offset_ms=-1000)),
            headers=headers(token),
        ) as resp,
    ):
        assert resp.status == 409
        body = await resp.json()
        assert body["error"] == "seq_reused" and body["detail"]["seqs"] == [2]
    assert await checksum(hub.hub.pool) == before
    # What status shows of the node: its last error.
    assert (
        await hub.hub.pool.fetchval("SELECT last_error_code FROM nodes WHERE node_id = 'node-a'")
        == "seq_reused"
    )


async def test_replay_after_grants_narrowed_answers_as_the_first_time(seeded) -> None:  # type: ignore[no-untyped-def]
    """A lost answer, then the operator narrows the grants, then the edge re-sends: the hub
    must not 403 changes it already holds (the edge would dead-letter them)."""
    hub, token = seeded
    await hub.hub.pool.execute("UPDATE nodes SET grants = '{west/gh}' WHERE node_id = 'node-a'")
    async with aiohttp.ClientSession() as http:
        async with http.post(
            f"{hub.url}/v1/push",
            data=packed(good_push()),
            headers=headers(token, {"Accept": "application/msgpack"}),
        ) as resp:
            assert resp.status == 200
            assert msgpack.unpackb(await resp.read())["acked"] == 2
        async with http.post(
            f"{hub.url}/v1/push", data=packed(good_push(first=3)), headers=headers(token)
        ) as resp:
            assert resp.status == 403
            body = await resp.json()
            assert body["error"] == "not_granted" and body["detail"]["seq"] == 3


async def test_a_record_over_the_hubs_cap_is_refused_naming_its_seq(hub_factory) -> None:  # type: ignore[no-untyped-def]
    """The hub caps a put's record size as the edges do (``max_record_bytes``): a larger
    one is refused with ``record_too_large`` and its seq, so that its edge dead-letters
    that change alone; nothing of the batch is applied."""
    hub = await hub_factory(max_record_bytes=4096)
    token = await hub.add_node("node-a", "west/ng/lagos")
    msg = good_push(n=3)
    msg["changes"][1][4] = {"note": "x" * 5000}
    before = await checksum(hub.hub.pool)
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{hub.url}/v1/push", data=packed(msg), headers=headers(token)) as resp,
    ):
        assert resp.status == 413, await resp.text()
        body = await resp.json()
    assert body["error"] == "record_too_large"
    assert body["detail"]["seq"] == 2 and body["detail"]["max"] == 4096
    assert "max_record_bytes" in body["detail"]["hint"]
    assert await checksum(hub.hub.pool) == before


async def test_a_client_that_drops_mid_body_is_no_hub_error(
    seeded: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A push whose link drops half-way through its body (an RST, as a flaky link sends) is
    the client leaving, not a fault of the hub: nothing is applied, no traceback is logged,
    the drop is counted under ``client_disconnected``, and the hub serves the next request."""
    hub, token = seeded
    before = await checksum(hub.hub.pool)
    body = packed(good_push(first=3, n=20))
    url = urlsplit(hub.url)
    caplog.set_level(logging.DEBUG)
    for _ in range(3):
        _reader, writer = await asyncio.open_connection(url.hostname, url.port)
        head = (
            f"POST /v1/push HTTP/1.1\r\nHost: {url.netloc}\r\n"
            f"Authorization: Bearer {token}\r\nContent-Type: application/msgpack\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        writer.write(head.encode() + body[: len(body) // 2])
        await writer.drain()
        await asyncio.sleep(0.2)  # the hub is now reading the body
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.close()  # linger 0: an RST, not a FIN
    metric = hub.hub.metrics.errors.labels(code="client_disconnected")
    for _ in range(50):
        if metric._value.get() >= 3:
            break
        await asyncio.sleep(0.1)
    assert metric._value.get() >= 3
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], [
        r.getMessage() for r in caplog.records
    ]
    assert await checksum(hub.hub.pool) == before
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{hub.url}/v1/push", data=packed(good_push(first=3)), headers=headers(token)
        ) as resp,
    ):
        assert resp.status == 200, await resp.text()
