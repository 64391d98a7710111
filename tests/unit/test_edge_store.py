"""The edge store's contract: durable writes, one outbox row per write, group commit,
pull pages applied atomically, bad input refused with nothing written."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from syncengine.edge import sqlite as edge_sqlite
from syncengine.edge.store import EdgeStore
from syncengine.errors import (
    ConfigError,
    CorruptStoreError,
    ForbiddenError,
    LimitExceededError,
    SequenceError,
    StorageError,
    SyncError,
    ValidationError,
)
from syncengine.merge import Change
from syncengine.tiers import Tier, TierRule, TierRules

CELL = "west/ng/lagos/clinic-12"
RULES = TierRules(
    [
        TierRule(prefix=f"{CELL}/alerts", tier=Tier.CRITICAL),
        TierRule(prefix=f"{CELL}/stock", tier=Tier.IMPORTANT),
        TierRule(prefix=f"{CELL}/2019", tier=Tier.ARCHIVE),
    ]
)


def open_store(path: Path, **kw: Any) -> Any:
    kw.setdefault("node_id", "lagos-clinic-12")
    kw.setdefault("region", "west")
    kw.setdefault("tier_rules", RULES)
    return EdgeStore.open(path, **kw)


def raw(path: Path, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
    """Read the file with plain sqlite3, as an operator (or the fault checker) would."""
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


async def test_put_get_delete_scan(tmp_path: Path) -> None:
    async with open_store(tmp_path / "edge.db") as store:
        await store.put(CELL, "patients", "p1", {"name": "Ada", "age": 31})
        await store.put(CELL, "patients", "p2", {"name": "Bola"})
        await store.put(CELL, "patients", "p1", {"age": 32})
        assert await store.get(CELL, "patients", "p1") == {"name": "Ada", "age": 32}
        await store.delete(CELL, "patients", "p2")
        assert await store.get(CELL, "patients", "p2") is None
        assert await store.get(CELL, "patients", "nope") is None
        assert [k async for k, _ in store.scan(CELL, "patients")] == ["p1"]
    rows = raw(
        tmp_path / "edge.db",
        "SELECT key, json_extract(doc, '$.age'), deleted FROM records ORDER BY key",
    )
    assert rows == [("p1", 32, 0), ("p2", None, 1)]


async def test_scan_pages_through_large_collections(tmp_path: Path) -> None:
    async with open_store(tmp_path / "edge.db") as store:
        await asyncio.gather(*(store.put(CELL, "c", f"k{i:04}", {"i": i}) for i in range(1203)))
        keys = [k async for k, _ in store.scan(CELL, "c", page=100)]
    assert keys == [f"k{i:04}" for i in range(1203)]


async def test_one_outbox_row_per_write_in_tier_lanes(tmp_path: Path) -> None:
    async with open_store(tmp_path / "edge.db") as store:
        await store.put(f"{CELL}/2019", "visits", "v1", {"x": 1})
        await store.put(CELL, "visits", "v2", {"x": 1})
        await store.put(f"{CELL}/alerts", "alarms", "a1", {"level": "high"})
        await store.put(f"{CELL}/alerts", "alarms", "a1", {"level": "low"})
        await store.delete(f"{CELL}/stock", "items", "i1")
        status = {s.tier: s for s in await store.outbox.status()}
        assert {t: s.depth for t, s in status.items()} == {
            Tier.CRITICAL: 2,
            Tier.IMPORTANT: 1,
            Tier.STANDARD: 1,
            Tier.ARCHIVE: 1,
        }
        batch = await store.outbox.next_batch()
        assert batch is not None and batch.tier is Tier.CRITICAL
        assert [c.seq for c in batch.changes] == [1, 2]
        assert (batch.first_seq, batch.last_seq, batch.skipped) == (1, 2, [])
        # The second change replaced a value it had seen: its base names that version.
        first = batch.changes[0]
        assert batch.changes[1].base == {"level": (first.hlc, first.node)}
        assert await store.outbox.ack(0, 2) == 2
        batch = await store.outbox.next_batch()
        assert batch is not None and batch.tier is Tier.IMPORTANT and batch.changes[0].is_delete


async def test_ack_beyond_issued_seq_is_refused(tmp_path: Path) -> None:
    async with open_store(tmp_path / "edge.db") as store:
        await store.put(CELL, "c", "k", {"x": 1})
        with pytest.raises(SequenceError):
            await store.outbox.ack(2, 5)
        assert (await store.outbox.status())[2].depth == 1


async def test_dead_letter_is_kept_and_skipped_without_blocking(tmp_path: Path) -> None:
    async with open_store(tmp_path / "edge.db") as store:
        for i in range(5):
            await store.put(CELL, "c", f"k{i}", {"i": i})
        assert await store.outbox.dead_letter(
            2, 2, code="clock_drift", message="too far ahead", detail={"ahead_ms": 9e6}
        )
        assert not await store.outbox.dead_letter(2, 2, code="x", message="again")
        batch = await store.outbox.next_batch(limit=10)
        assert batch is not None
        assert [c.seq for c in batch.changes] == [1, 3, 4, 5]
        assert batch.skipped == [2] and (batch.first_seq, batch.last_seq) == (1, 5)
        await store.outbox.ack(2, 5)
        assert await store.outbox.next_batch() is None
        (dead,) = await store.outbox.dead_letters()
        assert (dead.seq, dead.code, dead.key, dead.fields) == (2, "clock_drift", "k1", {"i": 1})
        # A batch cut by the limit never claims dead letters past its last change.
        for i in range(3):
            await store.put(CELL, "c", f"m{i}", {"i": i})
        await store.outbox.dead_letter(2, 8, code="x", message="y")
        batch = await store.outbox.next_batch(limit=1)
        assert batch is not None and batch.skipped == [] and batch.last_seq == 6


async def test_a_batch_read_cancelled_midway_leaves_no_transaction_open(tmp_path: Path) -> None:
    """Callers are cancelled (a push timing out, a daemon stopping) at any await. A batch read
    cancelled after its BEGIN and before its COMMIT must not leave the shared read connection
    inside a transaction: every later read would fail with "cannot start a transaction
    within a transaction", and the lane would never push again."""
    async with open_store(tmp_path / "edge.db") as store:
        for i in range(20):
            await store.put(CELL, "c", f"k{i}", {"i": i})
        for delay_loops in range(12):  # cancel at every point of the read, in turn
            task = asyncio.create_task(store.outbox.next_batch(limit=5))
            for _ in range(delay_loops):
                await asyncio.sleep(0)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        reads = await asyncio.gather(*(store.outbox.next_batch(limit=5) for _ in range(8)))
        assert all(b is not None and [c.seq for c in b.changes] == [1, 2, 3, 4, 5] for b in reads)
        assert not store._reader.in_transaction


async def test_a_transaction_cancelled_at_its_begin_leaves_none_open(tmp_path: Path) -> None:
    """The same for write transactions: a cancel that lands while BEGIN IMMEDIATE is queued
    on the connection's thread rolls it back once it has run, so the next one can begin."""
    path = tmp_path / "t.db"
    conn = await edge_sqlite.connect(path, busy_timeout_ms=1000)
    try:
        await conn.execute("CREATE TABLE t (v INTEGER)")

        async def insert() -> None:
            await conn.execute("INSERT INTO t VALUES (1)")

        for delay_loops in range(8):
            task = asyncio.create_task(edge_sqlite.transaction(conn, path, insert))
            for _ in range(delay_loops):
                await asyncio.sleep(0)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await edge_sqlite.transaction(conn, path, insert)
        assert not conn.in_transaction
    finally:
        await conn.close()
    assert raw(path, "SELECT count(*) FROM t")[0][0] >= 1


async def test_group_commit_shares_transactions(tmp_path: Path) -> None:
    async with open_store(tmp_path / "edge.db") as store:
        stamps = await asyncio.gather(
            *(store.put(CELL, "c", f"k{i}", {"i": i}) for i in range(512))
        )
        assert len(set(stamps)) == 512
        assert store.writes_committed == 512
        assert store.commits < 64, store.commits
    assert raw(tmp_path / "edge.db", "SELECT count(*) FROM outbox") == [(512,)]


async def test_apply_remote_merges_and_moves_cursor_atomically(tmp_path: Path) -> None:
    async with open_store(tmp_path / "edge.db") as store:
        await store.put(CELL, "c", "k", {"mine": 1})
        page = [
            Change(
                cell=CELL,
                collection="c",
                key="k",
                hlc=1,
                node="other",
                fields={"theirs": 2},
                lane=2,
                seq=1,
            ),
            Change(
                cell=CELL,
                collection="c",
                key="r",
                hlc=2,
                node="other",
                fields={"a": 1},
                lane=2,
                seq=2,
            ),
        ]
        assert await store.apply_remote(page, cursor=10) == 2
        assert await store.get(CELL, "c", "k") == {"mine": 1, "theirs": 2}
        assert await store.cursor() == 10
        # A stale or repeated page changes nothing.
        assert await store.apply_remote(page, cursor=10) == 0
        # Own changes come back from the hub and are skipped (a counter would double).
        own = Change(
            cell=CELL,
            collection="c",
            key="k",
            hlc=5,
            node="lagos-clinic-12",
            fields={"mine": 99},
            lane=2,
            seq=1,
        )
        assert await store.apply_remote([own], cursor=11) == 0
        assert await store.get(CELL, "c", "k") == {"mine": 1, "theirs": 2}
        assert (await store.outbox.status())[2].depth == 1  # pulls never enter the outbox


async def test_remote_far_future_stamp_is_applied_but_not_folded(tmp_path: Path) -> None:
    wall = [1_000_000_000]
    async with open_store(tmp_path / "edge.db", wall=lambda: wall[0]) as store:
        future = (wall[0] + 3_600_000) << 16
        await store.apply_remote(
            [Change(cell=CELL, collection="c", key="k", hlc=future, node="x", fields={"a": 1})],
            cursor=1,
        )
        assert await store.get(CELL, "c", "k") == {"a": 1}
        assert store.clock.last < future


@pytest.mark.parametrize(
    ("args", "error", "code"),
    [
        ((CELL, "c", "k", {"x": object()}), ValidationError, "unencodable_value"),
        (("west/NG/lagos", "c", "k", {"x": 1}), ValidationError, "invalid_cell"),
        (("west//x", "c", "k", {"x": 1}), ValidationError, "invalid_cell"),
        ((CELL, "c", "k", {"x": "y" * (1024 * 1024 + 1)}), LimitExceededError, "record_too_large"),
        ((CELL, "c", "k" * 10_000, {"x": 1}), ValidationError, "key_too_long"),
        ((CELL, "bad name", "k", {"x": 1}), ValidationError, "invalid_collection"),
        (("east/ke/nairobi", "c", "k", {"x": 1}), ForbiddenError, "foreign_region"),
        ((CELL, "c", "k", {}), ValidationError, "empty_put"),
    ],
)
async def test_bad_input_is_refused_and_nothing_written(
    tmp_path: Path, args: tuple[Any, ...], error: type[SyncError], code: str
) -> None:
    async with open_store(tmp_path / "edge.db") as store:
        with pytest.raises(error) as info:
            await store.put(*args)
        assert info.value.code == code and info.value.message
    assert raw(tmp_path / "edge.db", "SELECT count(*) FROM records") == [(0,)]
    assert raw(tmp_path / "edge.db", "SELECT count(*) FROM outbox") == [(0,)]


async def test_restart_keeps_data_and_the_clock_never_regresses(tmp_path: Path) -> None:
    wall = [2_000_000_000_000]
    async with open_store(tmp_path / "edge.db", wall=lambda: wall[0]) as store:
        last = await store.put(CELL, "c", "k", {"x": 1})
    wall[0] -= 86_400_000  # rebooted with the clock a day behind
    async with open_store(tmp_path / "edge.db", wall=lambda: wall[0]) as store:
        assert await store.get(CELL, "c", "k") == {"x": 1}
        assert await store.put(CELL, "c", "k", {"x": 2}) > last
        assert await store.get(CELL, "c", "k") == {"x": 2}
        assert await store.integrity_check() == "ok"


async def test_store_refuses_another_nodes_file(tmp_path: Path) -> None:
    async with open_store(tmp_path / "edge.db"):
        pass
    with pytest.raises(ConfigError) as info:
        await open_store(tmp_path / "edge.db", node_id="someone-else")
    assert "lagos-clinic-12" in info.value.message


async def test_damaged_file_is_reported_and_left_untouched(tmp_path: Path) -> None:
    path = tmp_path / "edge.db"
    async with open_store(path) as store:
        await asyncio.gather(*(store.put(CELL, "c", f"k{i}", {"v": "x" * 200}) for i in range(300)))
    data = bytearray(path.read_bytes())
    data[8192:12288] = b"\xde\xad\xbe\xef" * 1024  # overwrite pages in the middle
    path.write_bytes(bytes(data))
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(CorruptStoreError) as info:
        await open_store(path)
    assert str(path) in info.value.message and "recover" in info.value.hint
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before


async def test_garbage_file_is_not_a_database(tmp_path: Path) -> None:
    path = tmp_path / "edge.db"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(CorruptStoreError):
        await open_store(path)
    assert path.read_bytes() == b"this is not sqlite" * 100


async def test_missing_folder_is_a_clear_storage_error(tmp_path: Path) -> None:
    with pytest.raises(StorageError) as info:
        await open_store(tmp_path / "nope" / "edge.db")
    assert info.value.code == "no_such_folder"


async def test_learnt_tier_rules_survive_restart(tmp_path: Path) -> None:
    async with open_store(tmp_path / "edge.db") as store:
        learnt = TierRules([TierRule(prefix=CELL, tier=Tier.CRITICAL)])
        await store.save_learnt_rules(learnt, {"stock": "counter"})
    async with open_store(tmp_path / "edge.db") as store:
        assert store.tier_rules.tier_for(f"{CELL}/x") is Tier.CRITICAL
        assert store.resolver_for("stock") == "counter"
        await store.put(CELL, "stock", "s", {"n": 2})
        await store.put(CELL, "stock", "s", {"n": 3})
        assert await store.get(CELL, "stock", "s") == {"n": 5}


async def test_documents_are_canonical_json(tmp_path: Path) -> None:
    async with open_store(tmp_path / "edge.db") as store:
        await store.put(CELL, "c", "k", {"b": 1, "a": {"z": "é", "y": None}})
    (doc,) = raw(tmp_path / "edge.db", "SELECT doc FROM records")[0]
    assert doc == '{"a":{"y":null,"z":"é"},"b":1}'
    assert json.loads(doc) == {"b": 1, "a": {"z": "é", "y": None}}


async def test_a_filesystem_gone_read_only_during_a_commit_is_not_acknowledged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once a failing disk is remounted read-only under an open file, older Linux kernels
    answer fsync with success while nothing reaches the disk: a commit made then is refused
    as an unknown outcome (never acknowledged), the write connection is reopened, and writes
    fail clearly until the filesystem is writable again."""
    read_only = False
    monkeypatch.setattr(edge_sqlite, "read_only_filesystem", lambda _folder: read_only)
    async with open_store(tmp_path / "edge.db") as store:
        await store.put(CELL, "patients", "p1", {"n": 1})
        read_only = True
        with pytest.raises(StorageError) as during:
            await store.put(CELL, "patients", "p2", {"n": 2})
        assert during.value.code == "read_only"
        assert during.value.detail["during_commit"] is True
        assert "may or may not be stored" in during.value.hint
        # The reopen finds the filesystem read-only: a clear refusal, nothing written.
        with pytest.raises(StorageError) as after:
            await store.put(CELL, "patients", "p3", {"n": 3})
        assert after.value.code == "read_only"
        assert "during_commit" not in after.value.detail
        assert "remount" in after.value.hint
        read_only = False
        await store.put(CELL, "patients", "p4", {"n": 4})
        assert await store.get(CELL, "patients", "p1") == {"n": 1}
        assert await store.get(CELL, "patients", "p3") is None
        assert await store.get(CELL, "patients", "p4") == {"n": 4}


async def test_a_store_on_a_read_only_filesystem_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(edge_sqlite, "read_only_filesystem", lambda _folder: True)
    with pytest.raises(StorageError) as refused:
        async with open_store(tmp_path / "edge.db"):
            pass
    assert refused.value.code == "read_only"
    assert "read-only filesystem" in refused.value.message
