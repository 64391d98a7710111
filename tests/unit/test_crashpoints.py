"""The crash-point catalog is the list the fault suite checks coverage against: it must name
exactly the points the code has, and a point that is not armed must cost nothing."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from syncengine import crashpoints

SOURCE = Path(crashpoints.__file__).parent
CALL = re.compile(r"crashpoint\(\s*[\"']([a-z_.]+)[\"']\s*\)")


def test_the_catalog_names_exactly_the_points_in_the_code() -> None:
    in_code = {
        name
        for path in SOURCE.rglob("*.py")
        if path.name != "crashpoints.py"
        for name in CALL.findall(path.read_text())
    }
    # link.py passes the name through a variable: its callers name the point.
    in_code |= {
        name
        for path in SOURCE.rglob("*.py")
        for name in re.findall(r"crash_point=[\"']([a-z_.]+)[\"']", path.read_text())
    }
    assert in_code - crashpoints.CATALOG == set(), "points in the code but not in CATALOG"
    assert crashpoints.CATALOG - in_code == set(), "points in CATALOG that no code reaches"


def test_an_unknown_point_in_the_environment_is_refused_with_its_name() -> None:
    with pytest.raises(ValueError, match=r"edge\.nowhere"):
        crashpoints.reload("edge.nowhere:0.5")
    crashpoints.reload("")


def test_an_unarmed_point_is_a_no_op() -> None:
    crashpoints.reload("")
    for name in crashpoints.CATALOG:
        crashpoints.crashpoint(name)  # would SIGKILL this process if armed
