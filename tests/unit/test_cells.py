from __future__ import annotations

import pytest

from syncengine.cells import covers, home_region, parse_cell, parse_prefix
from syncengine.errors import ValidationError


@pytest.mark.parametrize("cell", ["west/ng", "west/ng/lagos/clinic-12", "central/cd/kin_01/x-1"])
def test_valid_cells(cell: str) -> None:
    assert parse_cell(cell) == cell


@pytest.mark.parametrize(
    "bad",
    ["", "west", "West/ng", "west//ng", "west/ng/", "/west/ng", "west/../ng", "west/./ng",
     "mars/ng", "west/ng lagos", "west/ng/" + "a" * 65, "west/" + "/".join(["a"] * 16),
     "west/ñ", None, 7],
)
def test_invalid_cells_are_refused(bad: object) -> None:
    with pytest.raises(ValidationError):
        parse_cell(bad)


def test_prefix_matches_whole_segments_only() -> None:
    assert covers("west/ng/lagos/clinic-1", "west/ng/lagos/clinic-1")
    assert covers("west/ng/lagos/clinic-1", "west/ng/lagos/clinic-1/alerts")
    assert not covers("west/ng/lagos/clinic-1", "west/ng/lagos/clinic-12")
    assert covers("west", "west/ng")
    assert parse_prefix("west") == "west"


def test_home_region() -> None:
    assert home_region("southern/za/cpt/shop-3") == "southern"
