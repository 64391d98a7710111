"""Two writer processes on one edge file (invariant 1: local writes stay live and unique).

Both write through ``put`` at once; afterwards the file is checked with plain sqlite3: every
acknowledged key is present, the outbox holds exactly one change per record written, the
seqs are contiguous and no two writes share a stamp. The kill -9 loop is T3
(``test_t03_edge_kill.py``).
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from collections import Counter
from pathlib import Path

WRITER = Path(__file__).parent.parent / "support" / "edge_writer.py"


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


def test_two_processes_write_one_file_at_once(tmp_path: Path) -> None:
    db = tmp_path / "edge.db"
    # Create the file first so both children open an existing, migrated store.
    subprocess.run(
        [sys.executable, str(WRITER), str(db), "n1", "init", "1", "1"],
        check=True,
        capture_output=True,
    )
    children = [
        subprocess.Popen(
            [sys.executable, str(WRITER), str(db), "n1", name, "5000", "8"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
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
