"""The data files syncengine reads: where they live, and how a TOML file is read.

``regions/``, ``tiers/`` and ``migrations/`` are top-level folders of the repository, the
source of truth. A wheel carries copies at ``syncengine/_data/<name>`` (pyproject's
``force-include``); a source checkout or an editable install has no ``_data``, so we fall
back to the repository folder next to the package.

:class:`TomlTable` is the one place that turns a parsed TOML table into typed values, so that
every configuration error, whichever file it comes from, names the file and the key::

    regions/west.toml: key 'timezone': unknown time zone 'Africa/Lagoss'
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Final, TypeVar, overload

from syncengine.errors import ConfigError, ValidationError

__all__ = ["DATA_DIR_NAMES", "TomlTable", "data_dir", "describe_path", "read_toml"]

#: The folders :func:`data_dir` knows about.
DATA_DIR_NAMES: Final = frozenset({"regions", "tiers", "migrations"})

_PACKAGE_DIR: Final = Path(__file__).resolve().parent
_T = TypeVar("_T")


def data_dir(name: str) -> Path:
    """The folder holding the shipped ``regions``, ``tiers`` or ``migrations`` files.

    Prefers the copy inside an installed wheel (``syncengine/_data/<name>``), else the
    repository's top-level folder. Raises :class:`ConfigError` when neither exists, and
    :class:`ValidationError` for a name that is not one of :data:`DATA_DIR_NAMES`.
    """
    if name not in DATA_DIR_NAMES:
        raise ValidationError(
            f"unknown data folder {name!r}; expected one of {', '.join(sorted(DATA_DIR_NAMES))}"
        )
    candidates = (_PACKAGE_DIR / "_data" / name, _PACKAGE_DIR.parent / name)
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    raise ConfigError(
        f"data folder {name!r} not found (looked in {', '.join(str(c) for c in candidates)})",
        hint="Reinstall syncengine, or run from a complete source checkout.",
        detail={"folder": name},
    )


def describe_path(path: Path) -> str:
    """A short name for a data file in messages: ``regions/west.toml``."""
    return f"{path.parent.name}/{path.name}" if path.parent.name else path.name


def read_toml(path: Path, *, label: str | None = None) -> dict[str, Any]:
    """Parse one TOML file. Every failure is a :class:`ConfigError` naming ``label``.

    ``label`` is how the file is named in messages (default :func:`describe_path`). Syntax
    errors keep tomllib's line and column.
    """
    label = label or describe_path(path)
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{label}: file not found", detail={"file": str(path)}) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(
            f"{label}: invalid TOML: {exc}",
            hint="Fix the syntax at the given line; see https://toml.io for the format.",
            detail={"file": str(path)},
        ) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{label}: not UTF-8 text (byte {exc.start})",
            hint="Save the file as UTF-8.",
            detail={"file": str(path)},
        ) from None
    except OSError as exc:
        raise ConfigError(
            f"{label}: cannot read the file: {exc.strerror or exc}",
            hint="Check that the file exists and is readable by this user.",
            detail={"file": str(path)},
        ) from None


class _Missing:
    """Marker for "no default": the key is required."""

    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Final = _Missing()


class TomlTable:
    """One TOML table together with where it came from, read key by key.

    ``source`` names the file (``regions/west.toml``); ``prefix`` the enclosing table
    (``offpeak.``). ``origins`` may name another place for single keys, as
    ``key -> (source, shown key)``: the environment variable that overrode a file value, or
    the deployment override of a tier policy, so that the error points where the value was
    written. Getters return typed values or raise :class:`ConfigError` naming source and key.
    """

    __slots__ = ("_data", "_origins", "prefix", "source")

    def __init__(
        self,
        data: Mapping[str, Any],
        *,
        source: str,
        prefix: str = "",
        origins: Mapping[str, tuple[str, str]] | None = None,
    ) -> None:
        self._data = data
        self.source = source
        self.prefix = prefix
        self._origins = dict(origins or {})

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def keys(self) -> Iterable[str]:
        return self._data.keys()

    def as_dict(self) -> dict[str, Any]:
        """A shallow copy of the table's raw values."""
        return dict(self._data)

    def without(self, key: str) -> TomlTable:
        """A copy of this table with ``key`` removed."""
        data = {k: v for k, v in self._data.items() if k != key}
        return TomlTable(data, source=self.source, prefix=self.prefix, origins=self._origins)

    def raw(self, key: str) -> Any:
        """The untyped value, or ``None`` when absent."""
        return self._data.get(key)

    def error(self, key: str, message: str, *, hint: str | None = None) -> ConfigError:
        """A :class:`ConfigError` for ``key``: ``"<source>: key '<prefix><key>': <message>"``."""
        source, full_key = self._origins.get(key, (self.source, f"{self.prefix}{key}"))
        return ConfigError(
            f"{source}: key {full_key!r}: {message}",
            hint=hint,
            detail={"source": source, "key": full_key},
        )

    def reject_unknown(self, allowed: Iterable[str]) -> None:
        """Raise for the first key (sorted) that is not in ``allowed``."""
        allowed = frozenset(allowed)
        unknown = sorted(k for k in self._data if k not in allowed)
        if unknown:
            raise self.error(
                unknown[0],
                "unknown key",
                hint=f"Known keys here: {', '.join(sorted(allowed))}.",
            )

    @overload
    def get_str(self, key: str) -> str: ...
    @overload
    def get_str(self, key: str, default: str) -> str: ...
    @overload
    def get_str(self, key: str, default: None) -> str | None: ...
    def get_str(self, key: str, default: str | _Missing | None = REQUIRED) -> str | None:
        """A non-empty string (or ``default`` when absent)."""
        if key not in self._data:
            return self._absent(key, default)
        value = self._data[key]
        if not isinstance(value, str):
            raise self.error(key, f"expected a string, got {_type_name(value)}")
        if not value.strip():
            raise self.error(key, "must not be empty")
        return value

    @overload
    def get_int(
        self, key: str, *, minimum: int | None = None, maximum: int | None = None
    ) -> int: ...
    @overload
    def get_int(
        self, key: str, default: int, *, minimum: int | None = None, maximum: int | None = None
    ) -> int: ...
    @overload
    def get_int(
        self, key: str, default: None, *, minimum: int | None = None, maximum: int | None = None
    ) -> int | None: ...
    def get_int(
        self,
        key: str,
        default: int | _Missing | None = REQUIRED,
        *,
        minimum: int | None = None,
        maximum: int | None = None,
    ) -> int | None:
        """An integer within ``minimum..maximum`` (or ``default`` when absent)."""
        if key not in self._data:
            return self._absent(key, default)
        value = self._data[key]
        # bool is an int subclass; `true` is never a meaningful count.
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(key, f"expected an integer, got {_type_name(value)}")
        if minimum is not None and value < minimum:
            raise self.error(key, f"must be at least {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise self.error(key, f"must be at most {maximum}, got {value}")
        return value

    def get_bool(self, key: str, default: bool | _Missing = REQUIRED) -> bool:
        """``true`` or ``false`` (or ``default`` when absent)."""
        if key not in self._data:
            return self._absent(key, default)
        value = self._data[key]
        if not isinstance(value, bool):
            raise self.error(key, f"expected true or false, got {_type_name(value)}")
        return value

    def get_list(self, key: str, default: list[Any] | _Missing = REQUIRED) -> list[Any]:
        """An array (or ``default`` when absent)."""
        if key not in self._data:
            return self._absent(key, default)
        value = self._data[key]
        if not isinstance(value, list):
            raise self.error(key, f"expected an array, got {_type_name(value)}")
        return value

    def get_table(self, key: str, default: Mapping[str, Any] | _Missing = REQUIRED) -> TomlTable:
        """A nested table, as a :class:`TomlTable` whose errors name ``key.subkey``."""
        value = self._data[key] if key in self._data else self._absent(key, default)
        if not isinstance(value, Mapping):
            raise self.error(key, f"expected a table, got {_type_name(value)}")
        source, full_key = self._origins.get(key, (self.source, f"{self.prefix}{key}"))
        return TomlTable(value, source=source, prefix=f"{full_key}.")

    def _absent(self, key: str, default: _T | _Missing) -> _T:
        if isinstance(default, _Missing):
            raise self.error(key, "missing (required)")
        return default


def _type_name(value: object) -> str:
    names = {
        str: "a string",
        bool: "a boolean",
        int: "an integer",
        float: "a float",
        list: "an array",
        dict: "a table",
    }
    return names.get(type(value), type(value).__name__)
