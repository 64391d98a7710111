"""Regions: the five hub regions of ``regions/*.toml`` and their off-peak windows.

A region has a code (the first segment of its cells' ids), member countries, the time zone
of its hub and an off-peak window in that zone's wall-clock time, when links are cheapest
and the standard and archive tiers sync. A window may wrap past midnight (``22:00`` to ``04:00``).

Loading validates everything and fails with a :class:`ConfigError` naming the file and key;
nothing here runs before the files are known to be right.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
import zoneinfo
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

from syncengine import resources
from syncengine.cells import REGION_CODES
from syncengine.errors import ConfigError, ValidationError
from syncengine.resources import TomlTable

__all__ = ["OffPeakWindow", "Region", "load_region", "load_regions", "parse_hhmm"]

_HHMM: Final = re.compile(r"([01][0-9]|2[0-3]):([0-5][0-9])\Z")
_COUNTRY: Final = re.compile(r"[A-Z]{2}\Z")
_REGION_KEYS: Final = frozenset({"code", "name", "countries", "timezone", "hub_url", "offpeak"})
_OFFPEAK_KEYS: Final = frozenset({"start", "end"})


def parse_hhmm(value: str) -> dt.time:
    """``"HH:MM"`` (24-hour) to a naive :class:`datetime.time`; raises :class:`ValidationError`."""
    match = _HHMM.match(value)
    if match is None:
        raise ValidationError(
            f'expected a time as "HH:MM" (00:00..23:59), got {value!r}',
            hint='Write times like "01:00" or "23:30".',
        )
    return dt.time(int(match.group(1)), int(match.group(2)))


def _require_aware(now: dt.datetime) -> None:
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValidationError(
            "a timezone-aware datetime is required",
            hint="Use datetime.now(timezone.utc) or pass a tzinfo.",
        )


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class OffPeakWindow:
    """A daily window ``[start, end)`` of local wall-clock time; wraps when ``end < start``.

    The times are naive: the window means "01:00 on whatever clock the caller reads", and
    :class:`Region` supplies the zone. ``start == end`` is refused (is it empty or all day?).
    """

    start: dt.time
    end: dt.time

    def __post_init__(self) -> None:
        for name, value in (("start", self.start), ("end", self.end)):
            if value.tzinfo is not None:
                raise ValidationError(f"off-peak {name} must be a naive local time, got {value}")
        if self.start == self.end:
            raise ValidationError(
                f"off-peak window {self.start:%H:%M}-{self.end:%H:%M} is empty",
                hint="Give different start and end times, e.g. 01:00 and 05:00.",
            )

    @property
    def wraps(self) -> bool:
        """True when the window crosses midnight (``end`` is on the next day)."""
        return self.end < self.start

    def contains(self, local_time: dt.time) -> bool:
        """True when the wall-clock ``local_time`` is inside the window (start inclusive)."""
        t = local_time.replace(tzinfo=None)
        if self.wraps:
            return t >= self.start or t < self.end
        return self.start <= t < self.end

    def next_open(self, now: dt.datetime) -> dt.datetime:
        """When the window is next open, on ``now``'s own clock and zone.

        Returns ``now`` itself when the window is open at ``now``, else the next start. The
        result is tz-aware in ``now``'s zone; a start that falls into a daylight-saving gap is
        moved to the real instant after the gap. Raises :class:`ValidationError` for a naive
        ``now``.
        """
        _require_aware(now)
        if self.contains(now.timetz()):
            return now
        tz = now.tzinfo
        assert tz is not None  # checked by _require_aware; narrows for mypy
        candidate = dt.datetime.combine(now.date(), self.start, tzinfo=tz)
        if candidate <= now:
            candidate = dt.datetime.combine(
                now.date() + dt.timedelta(days=1), self.start, tzinfo=tz
            )
        # Round-trip through UTC so a wall time skipped by a DST jump becomes a real instant.
        return candidate.astimezone(dt.UTC).astimezone(tz)

    def __str__(self) -> str:
        return f"{self.start:%H:%M}-{self.end:%H:%M}"


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Region:
    """One hub region, as described by ``regions/<code>.toml``."""

    #: The region code, also the first segment of every cell id homed here.
    code: str
    #: Human name, e.g. "West Africa".
    name: str
    #: Member countries, ISO 3166-1 alpha-2, uppercase.
    countries: frozenset[str]
    #: The hub's time zone; the off-peak window is read on this clock.
    timezone: zoneinfo.ZoneInfo
    #: Default URL of the region's hub (a deployment may override it in edge.toml).
    hub_url: str
    #: When bulk tiers sync, in local time.
    offpeak: OffPeakWindow

    def local_now(self, now: dt.datetime) -> dt.datetime:
        """``now`` (tz-aware) on this region's clock."""
        _require_aware(now)
        return now.astimezone(self.timezone)

    def in_offpeak(self, now: dt.datetime) -> bool:
        """True when the tz-aware instant ``now`` falls inside the region's off-peak window."""
        return self.offpeak.contains(self.local_now(now).time())

    def next_offpeak(self, now: dt.datetime) -> dt.datetime:
        """When the off-peak window next opens (``now`` if open), in the region's zone."""
        return self.offpeak.next_open(self.local_now(now))


def load_region(path: Path | str) -> Region:
    """Read and validate one ``regions/<code>.toml``.

    Raises :class:`ConfigError` naming the file and the key for any problem: TOML syntax,
    unknown or missing keys, a file name that differs from ``code``, a code outside
    :data:`syncengine.cells.REGION_CODES`, bad country codes, an unknown time zone, a bad URL
    or a bad off-peak time.
    """
    path = Path(path)
    label = resources.describe_path(path)
    table = TomlTable(resources.read_toml(path, label=label), source=label)
    table.reject_unknown(_REGION_KEYS)

    code = table.get_str("code")
    if code not in REGION_CODES:
        raise table.error(
            "code",
            f"unknown region code {code!r}",
            hint=f"Use one of {', '.join(sorted(REGION_CODES))}.",
        )
    if path.stem != code:
        raise table.error(
            "code",
            f"code {code!r} does not match the file name {path.name!r}",
            hint=f"Name the file {code}.toml, or fix the code.",
        )
    return Region(
        code=code,
        name=table.get_str("name"),
        countries=_countries(table),
        timezone=_timezone(table),
        hub_url=_hub_url(table),
        offpeak=_offpeak(table),
    )


def load_regions(directory: Path | str | None = None) -> dict[str, Region]:
    """Load every ``*.toml`` in ``directory`` (default: the shipped ``regions/``), by code.

    All five regions of :data:`~syncengine.cells.REGION_CODES` must be present and no country
    may belong to two of them. Raises :class:`ConfigError`.
    """
    folder = Path(directory) if directory is not None else resources.data_dir("regions")
    if not folder.is_dir():
        raise ConfigError(f"regions folder {folder} not found", detail={"folder": str(folder)})
    regions: dict[str, Region] = {}
    owner: dict[str, str] = {}
    for path in sorted(folder.glob("*.toml")):
        region = load_region(path)
        for country in sorted(region.countries):
            if country in owner:
                label = resources.describe_path(path)
                raise ConfigError(
                    f"{label}: key 'countries': {country} is already a member of region "
                    f"{owner[country]!r} ({folder.name}/{owner[country]}.toml)",
                    hint="A country belongs to exactly one region; remove it from one file.",
                    detail={"source": label, "key": "countries", "country": country},
                )
            owner[country] = region.code
        regions[region.code] = region
    missing = sorted(REGION_CODES - regions.keys())
    if missing:
        raise ConfigError(
            f"{folder.name}/: missing region file(s) {', '.join(m + '.toml' for m in missing)}",
            hint="Every region needs its file; restore them from the syncengine release.",
            detail={"folder": str(folder), "missing": missing},
        )
    return regions


def _countries(table: TomlTable) -> frozenset[str]:
    items = table.get_list("countries")
    if not items:
        raise table.error("countries", "must list at least one country")
    seen: set[str] = set()
    for item in items:
        if not isinstance(item, str) or not _COUNTRY.match(item):
            raise table.error(
                "countries",
                f"{item!r} is not an ISO 3166-1 alpha-2 code",
                hint='Use two uppercase letters, e.g. "NG".',
            )
        if item in seen:
            raise table.error("countries", f"{item} is listed twice")
        seen.add(item)
    return frozenset(seen)


def _timezone(table: TomlTable) -> zoneinfo.ZoneInfo:
    name = table.get_str("timezone")
    try:
        return zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        # ValueError: names zoneinfo refuses outright, e.g. absolute paths.
        raise table.error(
            "timezone",
            f"unknown time zone {name!r}",
            hint='Use an IANA zone name such as "Africa/Lagos".',
        ) from None


def _hub_url(table: TomlTable) -> str:
    url = table.get_str("hub_url")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise table.error(
            "hub_url",
            f"expected an http(s) URL with a host, got {url!r}",
            hint='e.g. "https://hub.west.example.org".',
        )
    return url


def _offpeak(table: TomlTable) -> OffPeakWindow:
    window = table.get_table("offpeak")
    window.reject_unknown(_OFFPEAK_KEYS)
    times: dict[str, dt.time] = {}
    for key in ("start", "end"):
        times[key] = _local_time(window, key)
    try:
        return OffPeakWindow(start=times["start"], end=times["end"])
    except ValidationError as exc:
        raise window.error("end", exc.message, hint=exc.hint) from None


def _local_time(table: TomlTable, key: str) -> dt.time:
    raw: Any = table.raw(key)
    # TOML's native local time (start = 01:00:00) is accepted too, to the minute.
    if isinstance(raw, dt.time):
        if raw.tzinfo is not None or raw.second or raw.microsecond:
            raise table.error(key, f"expected a whole-minute local time, got {raw}")
        return raw
    value = table.get_str(key)
    try:
        return parse_hhmm(value)
    except ValidationError as exc:
        raise table.error(key, exc.message, hint=exc.hint) from None
