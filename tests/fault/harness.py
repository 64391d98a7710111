"""What every fault test shares: the mode, the seed, the history log, crash-point hits, and
the one-line summary each test prints (``RELIABILITY.md`` §1).

- **Mode.** ``quick`` by default (what ``.ci/run`` runs); ``long`` with
  ``SYNCENGINE_FAULT_MODE=long`` or ``pytest --long`` (what ``make chaos`` runs). Tests size
  their runs with :func:`pick`.
- **Seed.** ``SYNCENGINE_SEED`` replays a run; otherwise a fresh one is drawn. Either way it is
  printed in the summary.
- **History.** :class:`History` appends ``{proc, op, type, value, t}`` JSON lines (Jepsen's
  invoke/ok/fail/info) so a failure can be read back operation by operation.
- **Crash points.** :func:`crashpoint_env` arms points in a child's environment and names the
  log the child appends to before it dies; :func:`crashpoint_hits` counts that log.
- **Summary.** :class:`Summary` prints one JSON line (and appends it to
  ``SYNCENGINE_FAULT_RESULTS`` when set, for ``make chaos``'s table), then fails the test on
  any violation or on an armed crash point or fault kind that was never hit.
- **Negative controls.** :meth:`Summary.control` is the same line for a run against a
  deliberately broken build: it fails the test when the violation was *not* seen.

This module imports nothing from ``syncengine``: the checks must not share the code they check.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

__all__ = [
    "MODE",
    "SEED",
    "History",
    "Summary",
    "crashpoint_env",
    "crashpoint_hits",
    "pick",
]

T = TypeVar("T")

MODE = "long" if os.environ.get("SYNCENGINE_FAULT_MODE", "quick") == "long" else "quick"
SEED = int(os.environ.get("SYNCENGINE_SEED") or random.SystemRandom().randrange(1 << 31))

#: Counts that are violations when above 0 (every test reports the ones it measures).
VIOLATIONS = ("lost", "duplicated", "divergent", "server_errors", "hung")


def pick(quick: T, long: T) -> T:
    """The quick (CI) or the long (release) figure, by :data:`MODE`."""
    return long if MODE == "long" else quick


def crashpoint_env(
    points: Mapping[str, float], log: Path, base: Mapping[str, str] | None = None
) -> dict[str, str]:
    """A child's environment with ``points`` armed (name → probability); each hit is
    appended to ``log`` before the child kills itself."""
    env = dict(os.environ if base is None else base)
    env["SYNCENGINE_CRASHPOINTS"] = ",".join(f"{n}:{p}" for n, p in points.items())
    env["SYNCENGINE_CRASHPOINT_LOG"] = str(log)
    return env


def crashpoint_hits(log: Path) -> Counter[str]:
    """How often each crash point fired, from the log children append to."""
    return Counter(log.read_text().split()) if log.exists() else Counter()


class History:
    """A Jepsen-style operation log: one JSON line per invoke/ok/fail/info."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = path.open("a", buffering=1)
        self._t0 = time.monotonic()

    def log(self, proc: str, op: str, type_: str, value: Any) -> None:
        record = {
            "proc": proc,
            "op": op,
            "type": type_,
            "value": value,
            "t": round(time.monotonic() - self._t0, 4),
        }
        self._file.write(json.dumps(record) + "\n")

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> History:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @staticmethod
    def read(path: Path) -> list[dict[str, Any]]:
        with path.open() as f:
            return [json.loads(line) for line in f if line.strip()]


@dataclass
class Summary:
    """The figures of one fault test run; :meth:`finish` prints and judges them.

    ``cases`` counts cycles, cuts, cases or changes (whatever the test repeats);
    ``counts`` holds the violation counts of :data:`VIOLATIONS` the test measured plus its
    own (``extra_violations`` names the test's own counts that must be 0); ``coverage``
    maps every armed crash point or fault kind to its hits, each needing ``min_hits``, or
    what ``needs`` says for that kind.
    """

    test: str
    name: str
    cases: int = 0
    acknowledged: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    extra_violations: tuple[str, ...] = ()
    coverage: dict[str, int] = field(default_factory=dict)
    min_hits: int = 1
    needs: dict[str, int] = field(default_factory=dict)
    figures: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)

    def cover(self, kinds: Iterable[str], hits: Mapping[str, int]) -> None:
        """Record the hits of ``kinds`` (0 for one never hit)."""
        for kind in kinds:
            self.coverage[kind] = self.coverage.get(kind, 0) + int(hits.get(kind, 0))

    def violations(self) -> dict[str, int]:
        names = (*VIOLATIONS, *self.extra_violations)
        return {n: v for n, v in self.counts.items() if n in names and v}

    def uncovered(self) -> list[str]:
        return sorted(k for k, n in self.coverage.items() if n < self.needs.get(k, self.min_hits))

    def line(self, *, control: bool = False) -> dict[str, Any]:
        return {
            "test": self.test,
            "name": self.name,
            "control": control,
            "seed": SEED,
            "mode": MODE,
            "seconds": round(time.monotonic() - self.started, 1),
            "cases": self.cases,
            "acknowledged": self.acknowledged,
            **{n: self.counts.get(n, 0) for n in VIOLATIONS},
            "counts": {k: v for k, v in self.counts.items() if k not in VIOLATIONS},
            "violations": self.violations(),
            "coverage": self.coverage,
            "min_hits": self.min_hits,
            "needs": self.needs,
            "uncovered": self.uncovered(),
            "figures": self.figures,
        }

    def _emit(self, line: dict[str, Any]) -> None:
        text = json.dumps(line, sort_keys=False)
        print(text)
        sys.stdout.flush()
        results = os.environ.get("SYNCENGINE_FAULT_RESULTS")
        if results:
            with open(results, "a") as f:
                f.write(text + "\n")

    def finish(self) -> None:
        """Print the summary; fail on any violation, or on coverage below ``min_hits``."""
        line = self.line()
        self._emit(line)
        assert not line["violations"], (
            f"{self.test} {self.name}: violations {line['violations']} "
            f"(replay with SYNCENGINE_SEED={SEED})"
        )
        assert not line["uncovered"], (
            f"{self.test} {self.name}: never reached {line['uncovered']} "
            f"(fewer than {self.min_hits} hits each, or {self.needs}): the run did not test "
            f"them enough; "
            f"replay with SYNCENGINE_SEED={SEED}"
        )
        assert self.cases > 0, f"{self.test} {self.name}: ran no cases, so it proved nothing"

    def control(self, seen: str) -> None:
        """Print the summary of a negative control; fail unless ``counts[seen]`` > 0: the
        broken build must be caught, or the test is blind to the bug it guards against."""
        self._emit(self.line(control=True))
        assert self.counts.get(seen, 0) > 0, (
            f"{self.test} negative control {self.name}: the broken build showed no {seen!r}: "
            f"the test cannot see the bug it guards against (seed {SEED})"
        )
