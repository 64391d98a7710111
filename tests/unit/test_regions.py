"""Regions: the shipped files load, every mistake names its file and key, windows tell time."""

from __future__ import annotations

import datetime as dt
import shutil
import zoneinfo
from pathlib import Path

import pytest

from syncengine import resources
from syncengine.cells import REGION_CODES
from syncengine.errors import ConfigError, ValidationError
from syncengine.regions import OffPeakWindow, Region, load_region, load_regions, parse_hhmm

UTC = dt.UTC


def _copy_regions(tmp_path: Path) -> Path:
    folder = tmp_path / "regions"
    shutil.copytree(resources.data_dir("regions"), folder)
    return folder


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text(encoding="utf-8")
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1), encoding="utf-8")


def _window(start: str, end: str) -> OffPeakWindow:
    return OffPeakWindow(start=parse_hhmm(start), end=parse_hhmm(end))


# -- the shipped files -------------------------------------------------------------------------


def test_default_regions_load() -> None:
    regions = load_regions()
    assert set(regions) == REGION_CODES
    for code, region in regions.items():
        assert region.code == code
        assert region.hub_url == f"https://hub.{code}.example.org"
        assert region.countries
        assert all(len(c) == 2 and c.isupper() for c in region.countries)


def test_default_regions_cover_the_african_union_once() -> None:
    regions = load_regions()
    members = [c for r in regions.values() for c in r.countries]
    assert len(members) == len(set(members)) == 55
    assert "NG" in regions["west"].countries
    assert "KE" in regions["east"].countries
    assert "ZA" in regions["southern"].countries
    assert "EG" in regions["north"].countries
    assert "CD" in regions["central"].countries


def test_default_region_zones() -> None:
    regions = load_regions()
    assert regions["west"].timezone == zoneinfo.ZoneInfo("Africa/Lagos")
    assert regions["east"].timezone == zoneinfo.ZoneInfo("Africa/Nairobi")
    assert regions["southern"].timezone == zoneinfo.ZoneInfo("Africa/Johannesburg")
    assert regions["north"].timezone == zoneinfo.ZoneInfo("Africa/Cairo")
    assert regions["central"].timezone == zoneinfo.ZoneInfo("Africa/Kinshasa")


def test_data_dir_falls_back_to_the_checkout() -> None:
    folder = resources.data_dir("regions")
    assert folder.is_dir()
    assert (folder / "west.toml").is_file()


def test_data_dir_rejects_unknown_names() -> None:
    with pytest.raises(ValidationError, match="unknown data folder"):
        resources.data_dir("secrets")


def test_load_single_region() -> None:
    region = load_region(resources.data_dir("regions") / "west.toml")
    assert isinstance(region, Region)
    assert region.name == "West Africa"


# -- every validation error names the file and the key -----------------------------------------


def test_unknown_time_zone_names_file_and_key(tmp_path: Path) -> None:
    folder = _copy_regions(tmp_path)
    _edit(folder / "west.toml", '"Africa/Lagos"', '"Africa/Lagoss"')
    with pytest.raises(ConfigError) as info:
        load_regions(folder)
    assert info.value.message == (
        "regions/west.toml: key 'timezone': unknown time zone 'Africa/Lagoss'"
    )
    assert info.value.detail == {"source": "regions/west.toml", "key": "timezone"}


@pytest.mark.parametrize(
    ("old", "new", "key", "fragment"),
    [
        ('code = "west"', 'code = "mars"', "code", "unknown region code 'mars'"),
        ('name = "West Africa"', 'name = ""', "name", "must not be empty"),
        ('"NG",', '"ng",', "countries", "'ng' is not an ISO 3166-1 alpha-2 code"),
        ('"NG",', '"NGA",', "countries", "'NGA' is not an ISO 3166-1 alpha-2 code"),
        ('"NG",', '"GH",', "countries", "GH is listed twice"),
        ('"NG",', "7,", "countries", "7 is not an ISO"),
        ('timezone = "Africa/Lagos"', "timezone = 1", "timezone", "expected a string"),
        ('timezone = "Africa/Lagos"', 'timezone = "/etc/passwd"', "timezone", "unknown time zone"),
        ("https://hub.west.example.org", "ftp://hub", "hub_url", "expected an http(s) URL"),
        ('start = "00:00"', 'start = "24:00"', "offpeak.start", 'expected a time as "HH:MM"'),
        ('start = "00:00"', 'start = "1:00"', "offpeak.start", "got '1:00'"),
        ('end = "05:00"', 'end = "05:00:30"', "offpeak.end", 'expected a time as "HH:MM"'),
        ('end = "05:00"', 'end = "00:00"', "offpeak.end", "is empty"),
        ('end = "05:00" }', 'end = "05:00", peak = "x" }', "offpeak.peak", "unknown key"),
        ("offpeak = {", "offpeak = 3 # {", "offpeak", "expected a table"),
        ('code = "west"', 'code = "west"\nmirror = "x"', "mirror", "unknown key"),
        ('hub_url = "https://hub.west.example.org"', "", "hub_url", "missing (required)"),
    ],
)
def test_bad_region_values_name_file_and_key(
    tmp_path: Path, old: str, new: str, key: str, fragment: str
) -> None:
    folder = _copy_regions(tmp_path)
    _edit(folder / "west.toml", old, new)
    with pytest.raises(ConfigError) as info:
        load_region(folder / "west.toml")
    message = info.value.message
    assert message.startswith(f"regions/west.toml: key '{key}': "), message
    assert fragment in message


def test_empty_country_list(tmp_path: Path) -> None:
    folder = tmp_path / "regions"
    folder.mkdir()
    (folder / "north.toml").write_text(
        'code = "north"\nname = "North"\ncountries = []\ntimezone = "Africa/Cairo"\n'
        'hub_url = "https://hub.north.example.org"\n'
        'offpeak = { start = "01:00", end = "05:00" }\n',
        encoding="utf-8",
    )
    with pytest.raises(ConfigError) as info:
        load_region(folder / "north.toml")
    assert info.value.message == (
        "regions/north.toml: key 'countries': must list at least one country"
    )


def test_native_toml_local_times_are_accepted(tmp_path: Path) -> None:
    folder = _copy_regions(tmp_path)
    _edit(
        folder / "west.toml", 'start = "00:00", end = "05:00"', "start = 00:00:00, end = 05:00:00"
    )
    assert load_region(folder / "west.toml").offpeak == _window("00:00", "05:00")


def test_native_toml_time_with_seconds_is_refused(tmp_path: Path) -> None:
    folder = _copy_regions(tmp_path)
    _edit(folder / "west.toml", 'start = "00:00"', "start = 00:00:30")
    with pytest.raises(ConfigError, match=r"key 'offpeak.start': expected a whole-minute"):
        load_region(folder / "west.toml")


def test_file_name_must_match_code(tmp_path: Path) -> None:
    folder = _copy_regions(tmp_path)
    (folder / "west.toml").rename(folder / "westafrica.toml")
    with pytest.raises(ConfigError) as info:
        load_region(folder / "westafrica.toml")
    assert info.value.message.startswith("regions/westafrica.toml: key 'code': ")
    assert "does not match the file name" in info.value.message


def test_country_in_two_regions(tmp_path: Path) -> None:
    folder = _copy_regions(tmp_path)
    _edit(folder / "west.toml", '"NG",', '"NG", "KE",')
    with pytest.raises(ConfigError) as info:
        load_regions(folder)
    message = info.value.message
    assert message.startswith("regions/west.toml: key 'countries': KE is already a member")
    assert "regions/east.toml" in message


def test_missing_region_file(tmp_path: Path) -> None:
    folder = _copy_regions(tmp_path)
    (folder / "central.toml").unlink()
    with pytest.raises(ConfigError, match=r"missing region file\(s\) central\.toml"):
        load_regions(folder)


def test_missing_regions_folder(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_regions(tmp_path / "nowhere")


def test_toml_syntax_error_has_the_line(tmp_path: Path) -> None:
    folder = _copy_regions(tmp_path)
    path = folder / "north.toml"
    lines = path.read_text(encoding="utf-8").splitlines()
    lines[3] = "name = 'North Africa"  # unterminated string on line 4
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_regions(folder)
    assert info.value.message.startswith("regions/north.toml: invalid TOML: ")
    assert "line 4" in info.value.message


def test_non_utf8_file(tmp_path: Path) -> None:
    folder = _copy_regions(tmp_path)
    (folder / "east.toml").write_bytes(b'code = "east"\nname = "\xff"\n')
    with pytest.raises(ConfigError, match=r"regions/east.toml: "):
        load_regions(folder)


# -- off-peak windows --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("clock", "inside"),
    [("00:59", False), ("01:00", True), ("03:00", True), ("04:59", True), ("05:00", False)],
)
def test_plain_window_contains(clock: str, inside: bool) -> None:
    assert _window("01:00", "05:00").contains(parse_hhmm(clock)) is inside


@pytest.mark.parametrize(
    ("clock", "inside"),
    [
        ("21:59", False),
        ("22:00", True),
        ("23:59", True),
        ("00:00", True),
        ("03:59", True),
        ("04:00", False),
        ("12:00", False),
    ],
)
def test_wrapping_window_contains(clock: str, inside: bool) -> None:
    window = _window("22:00", "04:00")
    assert window.wraps
    assert window.contains(parse_hhmm(clock)) is inside


def test_empty_window_is_refused() -> None:
    with pytest.raises(ValidationError, match="is empty"):
        _window("03:00", "03:00")


def test_next_open_when_open_is_now() -> None:
    lagos = zoneinfo.ZoneInfo("Africa/Lagos")
    now = dt.datetime(2024, 6, 1, 2, 30, tzinfo=lagos)
    assert _window("01:00", "05:00").next_open(now) == now


def test_next_open_later_today_and_tomorrow() -> None:
    lagos = zoneinfo.ZoneInfo("Africa/Lagos")
    window = _window("01:00", "05:00")
    before = dt.datetime(2024, 6, 1, 0, 15, tzinfo=lagos)
    assert window.next_open(before) == dt.datetime(2024, 6, 1, 1, 0, tzinfo=lagos)
    after = dt.datetime(2024, 6, 1, 5, 0, tzinfo=lagos)
    assert window.next_open(after) == dt.datetime(2024, 6, 2, 1, 0, tzinfo=lagos)


def test_next_open_of_a_wrapping_window() -> None:
    jnb = zoneinfo.ZoneInfo("Africa/Johannesburg")
    window = _window("22:00", "04:00")
    noon = dt.datetime(2024, 12, 31, 12, 0, tzinfo=jnb)
    assert window.next_open(noon) == dt.datetime(2024, 12, 31, 22, 0, tzinfo=jnb)
    late = dt.datetime(2024, 12, 31, 23, 30, tzinfo=jnb)
    assert window.next_open(late) == late
    early = dt.datetime(2025, 1, 1, 3, 59, tzinfo=jnb)
    assert window.next_open(early) == early
    closed = dt.datetime(2025, 1, 1, 4, 0, tzinfo=jnb)
    assert window.next_open(closed) == dt.datetime(2025, 1, 1, 22, 0, tzinfo=jnb)


def test_naive_datetimes_are_refused() -> None:
    region = load_regions()["west"]
    naive = dt.datetime(2024, 6, 1, 2, 0)
    with pytest.raises(ValidationError, match="timezone-aware"):
        region.in_offpeak(naive)
    with pytest.raises(ValidationError, match="timezone-aware"):
        region.offpeak.next_open(naive)


@pytest.mark.parametrize("month", [1, 4, 7, 10])
def test_dst_free_zones_keep_the_same_window_all_year(month: int) -> None:
    regions = load_regions()
    west, southern = regions["west"], regions["southern"]  # UTC+1 and UTC+2, no DST
    # West opens 00:00-05:00 Lagos time = 23:00-04:00 UTC.
    assert west.in_offpeak(dt.datetime(2024, month, 10, 23, 0, tzinfo=UTC))
    assert west.in_offpeak(dt.datetime(2024, month, 11, 3, 59, tzinfo=UTC))
    assert not west.in_offpeak(dt.datetime(2024, month, 11, 4, 0, tzinfo=UTC))
    assert not west.in_offpeak(dt.datetime(2024, month, 10, 22, 59, tzinfo=UTC))
    # Southern wraps: 23:00-05:00 Johannesburg time = 21:00-03:00 UTC.
    assert southern.in_offpeak(dt.datetime(2024, month, 10, 21, 0, tzinfo=UTC))
    assert southern.in_offpeak(dt.datetime(2024, month, 11, 2, 59, tzinfo=UTC))
    assert not southern.in_offpeak(dt.datetime(2024, month, 11, 3, 0, tzinfo=UTC))
    assert not southern.in_offpeak(dt.datetime(2024, month, 10, 20, 59, tzinfo=UTC))


def test_next_offpeak_is_in_the_region_zone() -> None:
    west = load_regions()["west"]
    now = dt.datetime(2024, 6, 1, 12, 0, tzinfo=UTC)  # 13:00 in Lagos
    opens = west.next_offpeak(now)
    assert opens.tzinfo == west.timezone
    assert opens == dt.datetime(2024, 6, 2, 0, 0, tzinfo=west.timezone)
    assert opens.astimezone(UTC) == dt.datetime(2024, 6, 1, 23, 0, tzinfo=UTC)


def _cairo_has_dst() -> bool:
    cairo = zoneinfo.ZoneInfo("Africa/Cairo")
    return (
        dt.datetime(2024, 7, 1, tzinfo=cairo).utcoffset()
        != dt.datetime(2024, 1, 1, tzinfo=cairo).utcoffset()
    )


@pytest.mark.skipif(not _cairo_has_dst(), reason="tz database predates Egypt's 2023 DST")
def test_window_follows_the_wall_clock_across_dst() -> None:
    north = load_regions()["north"]  # 01:00-05:00 Cairo time
    # 22:30 UTC is 01:30 in summer (UTC+3) but 00:30 in winter (UTC+2).
    assert north.in_offpeak(dt.datetime(2024, 7, 1, 22, 30, tzinfo=UTC))
    assert not north.in_offpeak(dt.datetime(2024, 1, 1, 22, 30, tzinfo=UTC))


@pytest.mark.skipif(not _cairo_has_dst(), reason="tz database predates Egypt's 2023 DST")
def test_next_open_inside_a_dst_gap_is_a_real_instant() -> None:
    cairo = zoneinfo.ZoneInfo("Africa/Cairo")
    # On 2024-04-26 Cairo jumps from 00:00 to 01:00: 00:30 does not exist that night.
    window = _window("00:30", "05:00")
    now = dt.datetime(2024, 4, 25, 23, 0, tzinfo=cairo)
    opens = window.next_open(now)
    assert opens.astimezone(UTC) == dt.datetime(2024, 4, 25, 22, 30, tzinfo=UTC)
    assert window.contains(opens.time())
