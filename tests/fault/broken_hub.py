"""A deliberately broken hub for T5's negative control: the push dedup is switched off.

Usage: ``python tests/fault/broken_hub.py hub run --config hub.toml`` (the arguments of
``syncengine``). It patches :mod:`syncengine.hub.push` in this process only, then runs the
real CLI; production code is untouched.

The bug it plants: the hub still reads ``node_lanes.acked_seq`` for the batch's lane, but
then trusts the batch instead, as if it had applied only up to ``first_seq - 1``. So a
replayed batch (an edge retrying after a lost answer) is applied again: its changes enter
the feed twice and ``counter`` fields add their increments twice. The replay check
(``_check_replayed``) and the gap check never fire, because nothing looks held any more.
"""

from __future__ import annotations

import inspect
import sys
import textwrap

from syncengine.cli import main
from syncengine.hub import push

#: The statement the patch goes in front of, in ``push._admit``.
ANCHOR = "_check_replayed(node, batch, acked, held)"
#: The bug: forget what the hub holds of this lane.
BUG = "acked = min(acked, batch.first_seq - 1)  # BROKEN BUILD: dedup disabled\n"


def disable_dedup() -> None:
    """Replace ``push._admit`` with a copy that re-applies replays.

    Raises:
        RuntimeError: the production function no longer has the statement the patch needs
            (update :data:`ANCHOR`), so the control would not test what it claims.
    """
    source = textwrap.dedent(inspect.getsource(push._admit))
    if source.count(ANCHOR) != 1:
        raise RuntimeError(
            f"broken_hub: {ANCHOR!r} not found once in syncengine.hub.push._admit; "
            "the negative control needs updating"
        )
    line = next(ln for ln in source.splitlines() if ANCHOR in ln)
    indent = line[: len(line) - len(line.lstrip())]
    patched = source.replace(line, indent + BUG + line)
    namespace = vars(push)
    exec(compile(patched, "<broken_hub _admit>", "exec"), namespace)


if __name__ == "__main__":
    disable_dedup()
    main(sys.argv[1:])
