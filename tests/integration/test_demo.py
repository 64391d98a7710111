"""`syncengine demo` runs to the end: the README's first command must keep working."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from syncengine.demo import run_demo

pytestmark = pytest.mark.integration


async def test_demo_runs_and_converges() -> None:
    out = io.StringIO()
    await run_demo(Console(file=out, width=120))
    text = out.getvalue()
    assert "demo finished" in text
    assert "follow_up" in text  # the conflict log shows the lost value
    assert text.count("115") >= 4  # every replica and the hub agree on the stock count
