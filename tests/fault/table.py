"""The fault suite's results as one Markdown table: ``python tests/fault/table.py FILE``.

FILE holds the JSON summary lines the fault tests append (``SYNCENGINE_FAULT_RESULTS``);
``make test`` and ``make chaos`` write it and call this. The last rows list every crash point
of the catalog with its hits over the whole run. Exits 1 when a test had a violation or a
negative control saw nothing, and, with ``--require-all-points`` (a run of the whole suite),
when a crash point was never hit.
"""

from __future__ import annotations

import json
import re
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
COLUMNS = ("acknowledged", "lost", "duplicated", "divergent", "server_errors", "hung")


def catalog() -> list[str]:
    """The crash-point catalog, read from the source (this script imports no syncengine)."""
    text = (ROOT / "syncengine" / "crashpoints.py").read_text()
    block = text.split("CATALOG: Final = frozenset(", 1)[1].split("}", 1)[0]
    return sorted(re.findall(r'"([a-z_.]+)"', block))


def main(path: str, *, require_all_points: bool) -> int:
    if not Path(path).exists():
        print(f"no fault test results in {path}: no fault test ran")
        return 1 if require_all_points else 0
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    failed = False
    hits: Counter[str] = Counter()
    print(
        "| test | run | mode | cases | " + " | ".join(COLUMNS) + " | other violations "
        "| coverage (hit/armed, min hits) | seconds | seed |"
    )
    print("| --- " * (8 + len(COLUMNS)) + "|")
    for r in sorted(rows, key=lambda r: (int(r["test"].lstrip("T") or 0), r["control"])):
        cov = r.get("coverage", {})
        for k, n in cov.items():
            hits[k] += n
        covered = sum(1 for n in cov.values() if n >= r.get("min_hits", 1))
        coverage = f"{covered}/{len(cov)}, min {min(cov.values())}" if cov else "-"
        others = {k: v for k, v in r["violations"].items() if k not in COLUMNS}
        name = r["name"] + (" (negative control)" if r["control"] else "")
        if r["control"]:
            ok = bool(r["violations"]) or any(v for k, v in r["counts"].items())
        else:
            ok = not r["violations"] and not r["uncovered"]
        failed |= not ok
        print(
            f"| {r['test']} | {name} | {r['mode']} | {r['cases']} | "
            + " | ".join(str(r.get(c, 0)) for c in COLUMNS)
            + f" | {others or 0} | {coverage} | {r['seconds']} | {r['seed']} |"
        )
    print()
    print("| crash point | hits over the run |")
    print("| --- | --- |")
    for point in catalog():
        n = hits.get(point, 0)
        failed |= require_all_points and n == 0
        print(f"| {point} | {n}{'  **never hit**' if n == 0 else ''} |")
    return 1 if failed else 0


if __name__ == "__main__":
    args = sys.argv[1:]
    require = "--require-all-points" in args
    files = [a for a in args if not a.startswith("--")]
    sys.exit(main(files[0] if files else "chaos-results.jsonl", require_all_points=require))
