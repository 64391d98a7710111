"""The writing process of T12 (disk full and I/O errors): the public ``put`` API under a
fault the parent arranges, with one line on stdout per outcome.

Usage: ``python t12_child.py MODE DB PREFIX [options]``; modes:

- ``burst --count N --concurrency C``: write N new keys, C at a time (the libfiu run).
- ``cycles --cycles K --concurrency C --after A``: K times: wait for ``fill`` on stdin (the
  parent has placed a filler file), write until the disk is full, print ``full``; wait for
  ``freed`` (the parent deleted the filler), retry until a write lands, print
  ``resumed SECONDS``, write A more.
- ``steady --concurrency C --fails F``: write until F puts have failed (the parent makes the
  filesystem read-only meanwhile), then read back every acknowledged key.
- ``probe``: open the store, put one key, read one key (a read-only filesystem).

Lines: ``ready``; ``ok KEY MONOTONIC`` only after ``put`` returned; ``fail KEY CODE`` for a
:class:`StorageError` with a hint (a clear refusal; ``CODE@commit`` when the filesystem
went read-only during the commit, an unknown outcome); ``unclear KEY ...`` for anything else,
which a caller could not act on; ``read ok|fail N [CODES]``; ``open-failed CODE {json}``
when the store did not open; at the end ``stats {json}`` and ``done``.

The stats come from watching the store's transaction seam (``sqlite.run_transaction``):
failed transactions, those failed with an I/O error, and commits attempted on a connection
that had already had an I/O error (the fsyncgate rule says: never); plus the reopens of the
write connection the store logged and the opens that failed.

``SYNCENGINE_T12_BROKEN=ack_early`` is the negative control's broken build: the store
acknowledges a group of writes before its transaction commits.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from typing import Any

from syncengine.edge import sqlite as edge_sqlite
from syncengine.edge.store import EdgeStore
from syncengine.errors import StorageError, SyncError

CELL = "west/ng/lagos/clinic-12/alerts"  # critical: a daemon pushes it at once
OPEN_ATTEMPTS = 50


class _ConnectionSpy:
    """Watches the store's transaction seam: which write connection each transaction ran
    on, and whether one ran on a connection that already had an I/O error (fsyncgate)."""

    def __init__(self) -> None:
        #: Connections a transaction failed on with an I/O error, one entry per failure;
        #: strong references, so no id is reused.
        self.failed_conns: list[object] = []
        self._failed_ids: set[int] = set()
        self.failed_transactions = 0
        self.reused = 0
        real = edge_sqlite.run_transaction

        async def spy(conn: Any, path: Any, body: Any, *args: Any) -> Any:
            if id(conn) in self._failed_ids:
                self.reused += 1
            try:
                return await real(conn, path, body, *args)
            except SyncError as exc:
                self.failed_transactions += 1
                if exc.code == "io_error" or exc.detail.get("during_commit"):
                    self.failed_conns.append(conn)
                    self._failed_ids.add(id(conn))
                raise

        edge_sqlite.run_transaction = spy


class _StoreLog(logging.Handler):
    """Counts the store's own account of reopening its write connection (fsyncgate)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.reopens = 0
        self.reopen_failures = 0

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if "reopening the write connection" in text:
            self.reopens += 1
        elif text.startswith("reopening") and "failed" in text:
            self.reopen_failures += 1


#: Group commits that failed after the broken build had acknowledged them (the control's
#: writer still needs to know when the disk is full, which its callers are not told).
HIDDEN_FAILURES = 0


def _break_ack_early() -> None:
    commit_group = EdgeStore._commit_group

    async def early(self: EdgeStore, group: list[Any]) -> None:
        global HIDDEN_FAILURES
        for w in group:
            if not w.future.done():
                w.future.set_result(0)
        before = self.commits
        await commit_group(self, group)
        if self.commits == before:
            HIDDEN_FAILURES += 1

    EdgeStore._commit_group = early  # type: ignore[method-assign]


def emit(line: str) -> None:
    """One line to the parent, flushed at once (the parent reads acknowledgements live)."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


class Writer:
    """Writes new keys ``PREFIX-N`` and reports each outcome."""

    def __init__(self, store: EdgeStore, prefix: str) -> None:
        self.store = store
        self.prefix = prefix
        self.next = 0
        self.acked: list[str] = []

    async def put_one(self) -> str | None:
        """Write one new key; return the failure's code (None when acknowledged)."""
        key = f"{self.prefix}-{self.next}"
        self.next += 1
        try:
            await self.store.put(CELL, "events", key, {"k": key, "pad": "x" * 200})
        except StorageError as exc:
            if not exc.hint:
                emit(f"unclear {key} {exc.code} without a hint: {exc.message}")
                return "unclear"
            # A filesystem that went read-only during the commit: the outcome is unknown
            # (the write may be on disk), unlike a clean refusal before anything was written.
            code = f"{exc.code}@commit" if exc.detail.get("during_commit") else exc.code
            emit(f"fail {key} {code}")
            return code
        except Exception as exc:
            emit(f"unclear {key} {exc!r}".replace("\n", " "))
            return "unclear"
        self.acked.append(key)
        # CLOCK_MONOTONIC is one clock for every process: the parent compares it with the
        # moment it failed the disk.
        emit(f"ok {key} {time.monotonic():.6f}")
        return None

    async def batch(self, concurrency: int) -> list[str | None]:
        return list(await asyncio.gather(*(self.put_one() for _ in range(concurrency))))


async def _open(db: str) -> tuple[EdgeStore, int]:
    """Open the store, retrying an open that failed under the injected faults."""
    failed = 0
    while True:
        try:
            return await EdgeStore.open(db, node_id="n1", region="west"), failed
        except SyncError as exc:
            failed += 1
            if failed >= OPEN_ATTEMPTS:
                raise
            sys.stderr.write(f"open failed ({exc.code}): {exc.message}; retrying\n")
            await asyncio.sleep(0.01)


async def _line(reader: asyncio.StreamReader) -> str:
    return (await reader.readline()).decode().strip()


async def main(args: argparse.Namespace) -> None:
    log = _StoreLog()
    logging.getLogger("syncengine.edge.store").addHandler(log)
    spy = _ConnectionSpy()
    if args.mode == "probe":
        await probe(args)
        return
    store, open_failures = await _open(args.db)
    w = Writer(store, args.prefix)
    emit("ready")
    try:
        if args.mode == "burst":
            while w.next < args.count:
                await w.batch(min(args.concurrency, args.count - w.next))
        elif args.mode == "cycles":
            await cycles(w, args)
        elif args.mode == "steady":
            await steady(w, args)
    finally:
        await store.close()
    stats = {
        "failed_transactions": spy.failed_transactions,
        "commits_on_failed_connection": spy.reused,
        "io_failed_transactions": len(spy.failed_conns),
        "reopens": log.reopens,
        "reopen_failures": log.reopen_failures,
        "open_failures": open_failures,
    }
    emit(f"stats {json.dumps(stats)}")
    emit("done")


async def cycles(w: Writer, args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    for _ in range(args.cycles):
        if await _line(stdin) != "fill":
            raise SystemExit("expected 'fill' from the parent")
        full_batches = 0
        # Full once two batches in a row were refused for lack of space: writes keep
        # failing (none acknowledged) while the disk is full.
        while full_batches < 2:
            hidden = HIDDEN_FAILURES
            codes = await w.batch(args.concurrency)
            await asyncio.sleep(0)  # let a broken build's commit finish (the control)
            full = "disk_full" in codes or hidden < HIDDEN_FAILURES
            full_batches = full_batches + 1 if full else 0
            if w.next > 10_000_000:
                raise SystemExit("the disk never filled")
        emit("full")
        if await _line(stdin) != "freed":
            raise SystemExit("expected 'freed' from the parent")
        started = time.monotonic()
        while await w.put_one() is not None:
            if time.monotonic() - started > 60:
                raise SystemExit("writes did not resume within 60 s of freeing space")
            await asyncio.sleep(0.01)
        emit(f"resumed {time.monotonic() - started:.4f}")
        for _ in range(args.after // args.concurrency):
            await w.batch(args.concurrency)
        emit("cycle-done")


async def steady(w: Writer, args: argparse.Namespace) -> None:
    fails = 0
    while fails < args.fails:
        outcomes = await w.batch(args.concurrency)
        fails += sum(c is not None for c in outcomes)
        if w.next > 10_000_000:
            raise SystemExit("no write ever failed")
    ok = failed = 0
    codes: set[str] = set()
    for key in w.acked:
        try:
            doc = await w.store.get(CELL, "events", key)
        except SyncError as exc:
            failed += 1
            codes.add(exc.code)
            continue
        if doc is not None and doc.get("k") == key:
            ok += 1
        else:
            failed += 1
            codes.add("missing")
    emit(f"read ok {ok}")
    emit(f"read fail {failed} {','.join(sorted(codes)) or '-'}")


async def probe(args: argparse.Namespace) -> None:
    """On a read-only filesystem: does a put fail clearly, and can the store be read?"""
    try:
        store = await EdgeStore.open(args.db, node_id="n1", region="west")
    except SyncError as exc:
        emit(f"open-failed {exc.code} {json.dumps({'message': exc.message, 'hint': exc.hint})}")
        emit("done")
        return
    try:
        w = Writer(store, args.prefix)
        await w.put_one()
        try:
            doc = await store.get(CELL, "events", args.read_key)
            emit(f"read ok {int(doc is not None)}")
        except SyncError as exc:
            emit(f"read fail 1 {exc.code}")
    finally:
        await store.close()
    emit("done")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["burst", "cycles", "steady", "probe"])
    parser.add_argument("db")
    parser.add_argument("prefix")
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--cycles", type=int, default=1)
    parser.add_argument("--after", type=int, default=32)
    parser.add_argument("--fails", type=int, default=20)
    parser.add_argument("--read-key", default="")
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    if os.environ.get("SYNCENGINE_T12_BROKEN") == "ack_early":
        _break_ack_early()
    asyncio.run(main(parser.parse_args()))
