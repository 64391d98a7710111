"""kill -9 of a writing edge (invariant 1, process crash).

A child writes through ``put`` with group commit and prints each key once ``put`` returned;
the parent SIGKILLs it at a random moment, or a crash point kills it from inside, 20 times.
After each kill the file is checked with plain sqlite3 (no syncengine code): every
acknowledged key is present, the outbox holds exactly one change per record written, and
``PRAGMA integrity_check`` is ok.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

WRITER = Path(__file__).parent.parent / "support" / "edge_writer.py"
CYCLES = 20
CRASHPOINTS = "edge.put.before_commit:0.002,edge.put.after_commit_before_ack:0.002,edge.groupcommit.mid:0.002"


def check(db: Path, acked: set[str]) -> dict[str, int]:
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        records = {k for (k,) in conn.execute("SELECT key FROM records")}
        outbox = Counter(k for (k,) in conn.execute("SELECT key FROM outbox"))
    finally:
        conn.close()
    missing = acked - records
    assert not missing, f"acknowledged writes lost: {sorted(missing)[:5]}"
    assert set(outbox) == records, "a record change without its outbox row, or the reverse"
    dups = [k for k, n in outbox.items() if n != 1]
    assert not dups, f"duplicate outbox rows: {dups[:5]}"
    return {"records": len(records), "outbox": sum(outbox.values())}


@pytest.mark.slow
def test_kill_minus_9_loses_no_acknowledged_write(tmp_path: Path) -> None:
    seed = int(os.environ.get("SYNCENGINE_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    db = tmp_path / "edge.db"
    hits_log = tmp_path / "crashpoints.log"
    acked: set[str] = set()
    kills = {"timer": 0, "crashpoint": 0}
    for cycle in range(CYCLES):
        env = dict(os.environ)
        use_crashpoint = rng.random() < 0.5
        if use_crashpoint:
            env["SYNCENGINE_CRASHPOINTS"] = CRASHPOINTS
            env["SYNCENGINE_CRASHPOINT_LOG"] = str(hits_log)
        child = subprocess.Popen(
            [sys.executable, str(WRITER), str(db), "lagos-clinic-12", f"c{cycle}", "1000000", "16"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
        )
        assert child.stdout is not None and child.stderr is not None
        fd = child.stdout.fileno()
        assert child.stdout.readline().strip() == b"ready", child.stderr.read()
        os.set_blocking(fd, False)
        deadline = time.monotonic() + rng.uniform(0.02, 2.0)
        buf = bytearray()

        def drain(fd: int = fd, buf: bytearray = buf) -> None:
            while True:
                try:
                    chunk = os.read(fd, 1 << 16)
                except BlockingIOError:
                    return
                if not chunk:
                    return
                buf.extend(chunk)

        while time.monotonic() < deadline and child.poll() is None:
            time.sleep(0.005)
            drain()
        if child.poll() is None:
            child.send_signal(signal.SIGKILL)
            kills["timer"] += 1
        else:
            assert child.returncode == -signal.SIGKILL, child.stderr.read()
            kills["crashpoint"] += 1
        child.wait()
        drain()
        child.stdout.close()
        child.stderr.close()
        # Only complete lines were acknowledged; a torn last line was not.
        lines = buf.decode().split("\n")
        acked.update(line for line in lines[:-1] if line)
        counts = check(db, acked)
    hits = Counter(hits_log.read_text().split()) if hits_log.exists() else Counter()
    print(json.dumps({"test": "edge_kill", "seed": seed, "cycles": CYCLES, "acked": len(acked),
                      "lost": 0, **counts, "kills": kills, "crashpoint_hits": dict(hits)}))
    assert len(acked) > 1000, "the writer barely wrote anything; the test saw nothing"


def test_two_processes_write_one_file_at_once(tmp_path: Path) -> None:
    db = tmp_path / "edge.db"
    # Create the file first so both children open an existing, migrated store.
    subprocess.run([sys.executable, str(WRITER), str(db), "n1", "init", "1", "1"], check=True,
                   capture_output=True)
    children = [
        subprocess.Popen([sys.executable, str(WRITER), str(db), "n1", name, "5000", "8"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for name in ("a", "b")
    ]
    outputs = [c.communicate(timeout=300) for c in children]
    for child, (_out, err) in zip(children, outputs, strict=True):
        assert child.returncode == 0, err
        assert "locked" not in err
    acked = {line for out, _ in outputs for line in out.split() if line != "ready"}
    assert len(acked) == 10_000
    counts = check(db, acked | {"init-0"})
    assert counts["records"] == 10_001
    conn = sqlite3.connect(db)
    try:
        seqs = [s for (s,) in conn.execute("SELECT seq FROM outbox WHERE lane = 2 ORDER BY seq")]
        stamps = [h for (h,) in conn.execute("SELECT hlc FROM outbox")]
    finally:
        conn.close()
    assert seqs == list(range(1, 10_002)), "seqs must be contiguous and unique across processes"
    assert len(set(stamps)) == len(stamps), "two processes issued the same stamp"
