"""Tiers: the four sync policies of ``tiers/*.toml`` and the rules that give a cell its tier.

Every cell has one tier. The tier decides how often its changes are pushed and pulled, whether
that waits for the region's off-peak window, how long a local copy is kept, and the promise
after which ``syncengine status`` reports the tier late. On a thin link tiers go in priority
order (critical first) and a tier never starves a higher one.

Which tier a cell has is decided by :class:`TierRules`: a map of cell prefixes to tiers where
the longest prefix covering the cell wins, on whole segments, and anything else is
``standard``. The hub's rules are authoritative and travel to edges with :meth:`TierRules.to_wire`;
an edge that has never synced uses the rules of its own config.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Final, Literal, TypeVar

from syncengine import resources
from syncengine.cells import home_region, parse_prefix
from syncengine.errors import ConfigError, ValidationError
from syncengine.resources import TomlTable

__all__ = [
    "MAX_LONG_POLL_S",
    "DEFAULT_DEBOUNCE_MS",
    "DEFAULT_LONG_POLL_IDLE_S",
    "DEFAULT_LONG_POLL_S",
    "DEFAULT_RETRY_INTERVAL_S",
    "DEFAULT_TIER",
    "PullMode",
    "PushMode",
    "Retention",
    "Tier",
    "TierPolicy",
    "TierRule",
    "TierRules",
    "load_policies",
    "load_policy",
]

#: Writes of an ``on_write`` tier within this many milliseconds travel as one batch.
DEFAULT_DEBOUNCE_MS: Final = 50
#: How long a ``live`` pull's long-poll is held open; below common 30 s proxy timeouts.
DEFAULT_LONG_POLL_S: Final = 25
DEFAULT_LONG_POLL_IDLE_S: Final = 900
#: The longest long-poll a hub holds (its ``MAX_WAIT_S``).
MAX_LONG_POLL_S: Final = 900
#: Longest wait before retrying a failed round when a tier file does not say.
DEFAULT_RETRY_INTERVAL_S: Final = 30
_SECONDS_PER_DAY: Final = 86_400


class Tier(enum.StrEnum):
    """The four tiers, declared in priority order (critical first)."""

    CRITICAL = "critical"
    IMPORTANT = "important"
    STANDARD = "standard"
    ARCHIVE = "archive"

    @property
    def priority(self) -> int:
        """0 for critical .. 3 for archive; lower goes first on a thin link."""
        return _PRIORITY[self]

    @classmethod
    def by_priority(cls) -> tuple[Tier, ...]:
        """All tiers, highest priority (critical) first."""
        return _BY_PRIORITY

    @classmethod
    def from_priority(cls, priority: int) -> Tier:
        """The tier with this priority; raises :class:`ValidationError` outside 0..3."""
        if isinstance(priority, bool) or not 0 <= priority < len(_BY_PRIORITY):
            raise ValidationError(
                f"no tier has priority {priority!r}; priorities are 0..{len(_BY_PRIORITY) - 1}"
            )
        return _BY_PRIORITY[priority]


_BY_PRIORITY: Final[tuple[Tier, ...]] = tuple(Tier)
_PRIORITY: Final[dict[Tier, int]] = {tier: i for i, tier in enumerate(_BY_PRIORITY)}
#: Cells no rule covers.
DEFAULT_TIER: Final = Tier.STANDARD


class PushMode(enum.StrEnum):
    """When a tier's changes are pushed."""

    ON_WRITE = "on_write"  # right after each (debounced) write
    INTERVAL = "interval"  # every push_interval_s
    CRON = "cron"  # at the times of push_cron, on the region's clock


class PullMode(enum.StrEnum):
    """How a tier's changes are pulled from the hub's change feed."""

    LIVE = "live"  # a long-poll, re-issued as soon as it returns
    INTERVAL = "interval"  # every pull_interval_s
    ON_DEMAND = "on_demand"  # only when a read misses locally


class Retention(enum.StrEnum):
    """How long the edge keeps its local copy of a tier's records."""

    FOREVER = "forever"
    EVICT = "evict"  # dropped evict_after_s after the hub acknowledged them


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class TierPolicy:
    """The sync policy of one tier, from ``tiers/<name>.toml`` plus deployment overrides.

    Fields that belong to another mode are ``None``: ``debounce_ms`` is set only for
    ``on_write`` pushes, ``push_interval_s`` only for ``interval``, ``push_cron`` only for
    ``cron``; ``long_poll_s`` only for ``live`` pulls, ``pull_interval_s`` only for
    ``interval``; ``evict_after_s`` only for ``evict`` retention.
    """

    tier: Tier
    push_mode: PushMode
    #: on_write: writes within this window travel as one batch.
    debounce_ms: int | None = None
    #: interval: seconds between scheduled push rounds.
    push_interval_s: int | None = None
    #: cron: an APScheduler ``CronTrigger.from_crontab`` expression on the region's clock.
    push_cron: str | None = None
    #: After a failed round the next attempt comes at most this many seconds later.
    retry_interval_s: int = DEFAULT_RETRY_INTERVAL_S
    #: Scheduled rounds (push and interval pull) run only inside the region's off-peak window.
    offpeak_only: bool = False
    pull_mode: PullMode
    #: live: how long one long-poll is held open after activity. Each one that ends with
    #: nothing doubles it, up to ``long_poll_idle_s``; a change either way resets it.
    long_poll_s: int | None = None
    #: live: how long an idle edge's long-poll is held (what idling costs on the wire). The
    #: long-poll also watches the ``interval`` tiers, standing in for their pulls.
    long_poll_idle_s: int | None = None
    #: interval: seconds between pull rounds.
    pull_interval_s: int | None = None
    retention: Retention = Retention.FOREVER
    #: evict: local copies are dropped this many seconds after the hub acknowledged them.
    evict_after_s: int | None = None
    #: Status reports the tier late once its oldest pending change is older than this.
    promise_s: int
    #: "full": an acknowledged write survives power loss. The only value invariant 1 allows.
    durability: Literal["full"] = "full"

    @property
    def name(self) -> str:
        return self.tier.value

    @property
    def priority(self) -> int:
        return self.tier.priority


_POLICY_KEYS: Final = frozenset(
    {
        "name",
        "priority",
        "push",
        "debounce_ms",
        "push_interval_s",
        "push_cron",
        "retry_interval_s",
        "offpeak_only",
        "pull",
        "long_poll_s",
        "long_poll_idle_s",
        "pull_interval_s",
        "retention",
        "evict_after_days",
        "promise_s",
        "durability",
    }
)
# Keys that only mean something for one mode. When an override switches the mode, the
# file's keys of the old mode are dropped instead of clashing with the new one.
_PUSH_MODE_KEYS: Final = {
    PushMode.ON_WRITE: ("debounce_ms",),
    PushMode.INTERVAL: ("push_interval_s",),
    PushMode.CRON: ("push_cron",),
}
_PULL_MODE_KEYS: Final = {
    PullMode.LIVE: ("long_poll_s", "long_poll_idle_s"),
    PullMode.INTERVAL: ("pull_interval_s",),
}
_RETENTION_KEYS: Final = {Retention.EVICT: ("evict_after_days",)}
_NOT_OVERRIDABLE: Final = frozenset({"name", "priority"})
_TIER_NAMES: Final = frozenset(t.value for t in Tier)
_E = TypeVar("_E", bound=enum.StrEnum)


def load_policy(
    path: Path | str,
    *,
    override: Mapping[str, Any] | None = None,
    override_source: str = "tier policy overrides",
    override_key: str | None = None,
) -> TierPolicy:
    """Read and validate one ``tiers/<name>.toml``, with an optional deployment override.

    ``override`` maps policy keys (the TOML keys, e.g. ``push_interval_s``) to values that
    replace the file's; setting ``push``, ``pull`` or ``retention`` to another mode drops the
    file's keys of the old mode. Raises :class:`ConfigError` naming the file (or
    ``override_source`` and ``override_key.<key>``, default ``<tier>.<key>``) and the key.
    """
    path = Path(path)
    label = resources.describe_path(path)
    data = resources.read_toml(path, label=label)
    TomlTable(data, source=label).reject_unknown(_POLICY_KEYS)
    origins: dict[str, tuple[str, str]] = {}
    if override:
        shown = override_key if override_key is not None else path.stem
        where = TomlTable(override, source=override_source, prefix=f"{shown}.")
        where.reject_unknown(_POLICY_KEYS - _NOT_OVERRIDABLE)
        data = _merge(data, override)
        origins = {key: (override_source, f"{shown}.{key}") for key in override}
    table = TomlTable(data, source=label, origins=origins)

    name = table.get_str("name")
    try:
        tier = Tier(name)
    except ValueError:
        raise table.error(
            "name", f"unknown tier {name!r}", hint=f"Use one of {', '.join(Tier)}."
        ) from None
    if path.stem != name:
        raise table.error(
            "name",
            f"name {name!r} does not match the file name {path.name!r}",
            hint=f"Name the file {name}.toml, or fix the name.",
        )
    priority = table.get_int("priority")
    if priority != tier.priority:
        raise table.error(
            "priority",
            f"tier {name!r} has priority {tier.priority}, got {priority}",
            hint="Priorities are fixed: critical 0, important 1, standard 2, archive 3.",
        )

    push_mode = _enum(table, "push", PushMode)
    pull_mode = _enum(table, "pull", PullMode)
    retention = _enum(table, "retention", Retention, Retention.FOREVER)
    _reject_other_modes(table, "push", push_mode, _PUSH_MODE_KEYS)
    _reject_other_modes(table, "pull", pull_mode, _PULL_MODE_KEYS)
    _reject_other_modes(table, "retention", retention, _RETENTION_KEYS)

    debounce_ms = push_interval_s = None
    push_cron = None
    if push_mode is PushMode.ON_WRITE:
        debounce_ms = table.get_int("debounce_ms", DEFAULT_DEBOUNCE_MS, minimum=0, maximum=60_000)
    elif push_mode is PushMode.INTERVAL:
        push_interval_s = table.get_int("push_interval_s", minimum=1)
    else:
        push_cron = _cron(table, "push_cron")

    offpeak_only = table.get_bool("offpeak_only", False)
    if offpeak_only and push_mode is PushMode.ON_WRITE:
        raise table.error(
            "offpeak_only",
            "cannot be true when push = 'on_write'",
            hint="A tier pushed on every write cannot wait for the off-peak window.",
        )

    long_poll_s = long_poll_idle_s = pull_interval_s = None
    if pull_mode is PullMode.LIVE:
        long_poll_s = table.get_int("long_poll_s", DEFAULT_LONG_POLL_S, minimum=1, maximum=300)
        long_poll_idle_s = table.get_int(
            "long_poll_idle_s",
            max(long_poll_s, DEFAULT_LONG_POLL_IDLE_S),
            minimum=long_poll_s,
            maximum=MAX_LONG_POLL_S,
        )
    elif pull_mode is PullMode.INTERVAL:
        pull_interval_s = table.get_int("pull_interval_s", minimum=1)

    evict_after_s = None
    if retention is Retention.EVICT:
        evict_after_s = table.get_int("evict_after_days", minimum=0) * _SECONDS_PER_DAY

    promise_s = table.get_int("promise_s", minimum=1)
    if push_interval_s is not None and promise_s <= push_interval_s:
        raise table.error(
            "promise_s",
            f"the promise ({promise_s} s) must be longer than push_interval_s "
            f"({push_interval_s} s), or the tier is reported late after every interval",
            hint="Raise promise_s or lower push_interval_s.",
        )

    durability = table.get_str("durability", "full")
    if durability != "full":
        raise table.error(
            "durability",
            f"unsupported durability {durability!r}",
            hint="Only 'full' is supported: an acknowledged write must survive power loss.",
        )

    return TierPolicy(
        tier=tier,
        push_mode=push_mode,
        debounce_ms=debounce_ms,
        push_interval_s=push_interval_s,
        push_cron=push_cron,
        retry_interval_s=table.get_int("retry_interval_s", DEFAULT_RETRY_INTERVAL_S, minimum=1),
        offpeak_only=offpeak_only,
        pull_mode=pull_mode,
        long_poll_s=long_poll_s,
        long_poll_idle_s=long_poll_idle_s,
        pull_interval_s=pull_interval_s,
        retention=retention,
        evict_after_s=evict_after_s,
        promise_s=promise_s,
        durability="full",
    )


def load_policies(
    directory: Path | str | None = None,
    *,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    overrides_source: str = "tier policy overrides",
    overrides_key: str = "",
) -> dict[Tier, TierPolicy]:
    """Load the four tier policies from ``directory`` (default: the shipped ``tiers/``).

    ``overrides`` maps tier names to policy overrides, e.g.
    ``{"important": {"push_interval_s": 30}}``, validated like the files (see
    :func:`load_policy`). Errors name ``overrides_source`` (e.g. ``"edge.toml"``) and the key
    below ``overrides_key`` (``"tier_policies"`` gives ``tier_policies.important.<key>``).
    The result is in priority order. Raises :class:`ConfigError` when a file is missing or
    wrong, or an override names an unknown tier or key.
    """
    folder = Path(directory) if directory is not None else resources.data_dir("tiers")
    overrides = overrides or {}
    for name, override in overrides.items():
        shown = f"{overrides_key}.{name}" if overrides_key else name
        if name not in _TIER_NAMES:
            raise ConfigError(
                f"{overrides_source}: key {shown!r}: unknown tier",
                hint=f"Override one of {', '.join(Tier)}.",
                detail={"source": overrides_source, "key": shown},
            )
        if not isinstance(override, Mapping):
            raise ConfigError(
                f"{overrides_source}: key {shown!r}: expected a table of policy keys",
                detail={"source": overrides_source, "key": shown},
            )
    policies: dict[Tier, TierPolicy] = {}
    for tier in Tier.by_priority():
        path = folder / f"{tier.value}.toml"
        if not path.is_file():
            raise ConfigError(
                f"{resources.describe_path(path)}: file not found",
                hint="Every tier needs its file; restore it from the syncengine release.",
                detail={"file": str(path)},
            )
        policies[tier] = load_policy(
            path,
            override=overrides.get(tier.value),
            override_source=overrides_source,
            override_key=f"{overrides_key}.{tier.value}" if overrides_key else tier.value,
        )
    return policies


def _merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for mode_key, mode_keys in (
        ("push", _PUSH_MODE_KEYS),
        ("pull", _PULL_MODE_KEYS),
        ("retention", _RETENTION_KEYS),
    ):
        if mode_key in override and override[mode_key] != base.get(mode_key):
            for keys in mode_keys.values():
                for key in keys:
                    merged.pop(key, None)
    merged.update(override)
    return merged


def _enum(table: TomlTable, key: str, kind: type[_E], default: _E | None = None) -> _E:
    raw = table.get_str(key) if default is None else table.get_str(key, default.value)
    try:
        return kind(raw)
    except ValueError:
        raise table.error(
            key, f"unknown value {raw!r}", hint=f"Use one of {', '.join(m.value for m in kind)}."
        ) from None


def _reject_other_modes(
    table: TomlTable, mode_key: str, mode: _E, mode_keys: Mapping[_E, tuple[str, ...]]
) -> None:
    for other_mode, keys in mode_keys.items():
        for key in keys:
            if other_mode is mode or key not in table:
                continue
            raise table.error(
                key,
                f"only applies when {mode_key} = {other_mode.value!r}, not {mode.value!r}",
                hint=f"Remove {key}, or set {mode_key} = {other_mode.value!r}.",
            )


def _cron(table: TomlTable, key: str) -> str:
    expr = table.get_str(key)
    fields = expr.split()
    if len(fields) == 5 and any(c.isdigit() for c in fields[4]):
        raise table.error(
            key,
            f"day-of-week {fields[4]!r} uses numbers",
            hint="Use day names (mon..sun): APScheduler 3 numbers Monday 0, cron numbers Sunday 0.",
        )
    # Imported here: only a cron policy needs APScheduler, and the pure core stays light.
    from apscheduler.triggers.cron import CronTrigger  # noqa: PLC0415

    try:
        CronTrigger.from_crontab(expr, timezone="UTC")
    except ValueError as exc:
        raise table.error(
            key,
            f"invalid cron expression {expr!r}: {exc}",
            hint='Five fields: minute hour day month day-of-week, e.g. "0 2 * * sun".',
        ) from None
    return expr


# -- which tier a cell has ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class TierRule:
    """Cells at or below ``prefix`` (on whole segments) have ``tier``, unless a longer rule
    says otherwise. Raises :class:`ValidationError` for a bad prefix or tier."""

    prefix: str
    tier: Tier

    def __post_init__(self) -> None:
        parse_prefix(self.prefix)
        raw: object = self.tier
        if not isinstance(raw, Tier):
            # Accept the tier's name ("critical") as well, as it arrives from TOML or the wire.
            try:
                tier = Tier(raw) if isinstance(raw, str) else None
            except ValueError:
                tier = None
            if tier is None:
                raise ValidationError(
                    f"unknown tier {raw!r}", hint=f"Use one of {', '.join(Tier)}."
                )
            object.__setattr__(self, "tier", tier)

    def to_wire(self) -> dict[str, str]:
        return {"prefix": self.prefix, "tier": self.tier.value}


class TierRules:
    """Prefix → tier rules: the longest prefix covering a cell wins, else ``default``.

    Immutable. :meth:`tier_for` walks the cell's ancestors from the cell itself up to its
    region and looks each up in a dict, so a lookup costs O(depth) whatever the rule count,
    and ``west/ng/lagos/clinic-1`` never matches ``west/ng/lagos/clinic-12``. Two rules with
    the same prefix and different tiers raise :class:`ConfigError`; exact duplicates collapse.
    """

    __slots__ = ("_by_prefix", "default")

    def __init__(self, rules: Iterable[TierRule] = (), default: Tier = DEFAULT_TIER) -> None:
        by_prefix: dict[str, Tier] = {}
        for rule in rules:
            known = by_prefix.get(rule.prefix)
            if known is not None and known is not rule.tier:
                raise ConfigError(
                    f"tier rules give prefix {rule.prefix!r} two tiers: {known} and {rule.tier}",
                    hint="Keep one rule per prefix.",
                    detail={"prefix": rule.prefix},
                )
            by_prefix[rule.prefix] = rule.tier
        self._by_prefix: Mapping[str, Tier] = dict(sorted(by_prefix.items()))
        self.default: Tier = Tier(default)

    def tier_for(self, cell: str) -> Tier:
        """The tier of ``cell``: the longest rule prefix covering it, else the default.

        ``cell`` is trusted to be a valid id (see :func:`syncengine.cells.parse_cell`).
        """
        prefix = self._match(cell)
        return self.default if prefix is None else self._by_prefix[prefix]

    def rule_for(self, cell: str) -> TierRule | None:
        """The rule that decides ``cell``'s tier, or ``None`` when the default applies."""
        prefix = self._match(cell)
        return None if prefix is None else TierRule(prefix=prefix, tier=self._by_prefix[prefix])

    def _match(self, cell: str) -> str | None:
        # Ancestors from longest to shortest: west/ng/lagos/clinic-12, west/ng/lagos, ...
        by_prefix = self._by_prefix
        if not by_prefix:
            return None
        key = cell
        while key not in by_prefix:
            cut = key.rfind("/")
            if cut < 0:
                return None
            key = key[:cut]
        return key

    @property
    def rules(self) -> tuple[TierRule, ...]:
        """The rules, sorted by prefix."""
        return tuple(TierRule(prefix=p, tier=t) for p, t in self._by_prefix.items())

    def __iter__(self) -> Iterator[TierRule]:
        return iter(self.rules)

    def __len__(self) -> int:
        return len(self._by_prefix)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TierRules):
            return NotImplemented
        return self.default is other.default and self._by_prefix == other._by_prefix

    def __hash__(self) -> int:
        return hash((self.default, tuple(self._by_prefix.items())))

    def __repr__(self) -> str:
        rules = ", ".join(f"{p!r}: {t.value}" for p, t in self._by_prefix.items())
        return f"TierRules({{{rules}}}, default={self.default.value})"

    def to_wire(self) -> list[dict[str, str]]:
        """The rules as ``[{"prefix": ..., "tier": ...}]``, sorted by prefix (hub → edges)."""
        return [{"prefix": p, "tier": t.value} for p, t in self._by_prefix.items()]

    @classmethod
    def from_wire(cls, data: object, *, default: Tier = DEFAULT_TIER) -> TierRules:
        """Rebuild rules sent by :meth:`to_wire`; raises :class:`ValidationError` when malformed."""
        if not isinstance(data, Sequence) or isinstance(data, str | bytes):
            raise ValidationError(f"tier rules must be a list, got {type(data).__name__}")
        rules: list[TierRule] = []
        for item in data:
            if not isinstance(item, Mapping) or set(item) != {"prefix", "tier"}:
                raise ValidationError(
                    f"a tier rule must be a map with exactly 'prefix' and 'tier', got {item!r}"[
                        :200
                    ]
                )
            rules.append(TierRule(prefix=item["prefix"], tier=item["tier"]))
        return cls(rules, default=default)

    @classmethod
    def from_config(
        cls,
        items: object,
        *,
        source: str,
        key: str = "tier_rules",
        region: str | None = None,
        default: Tier = DEFAULT_TIER,
    ) -> TierRules:
        """Build rules from a config array of ``{prefix, tier}`` tables.

        Every problem is a :class:`ConfigError` naming ``source`` and ``key`` (with the index
        of the rule). With ``region``, every prefix must be a cell of that region.
        """
        where = TomlTable({key: items}, source=source)
        rules: list[TierRule] = []
        seen: dict[str, Tier] = {}
        for i, item in enumerate(where.get_list(key)):
            if not isinstance(item, Mapping):
                raise where.error(key, f"rule {i}: expected a table {{prefix, tier}}")
            entry = TomlTable(item, source=source, prefix=f"{key}[{i}].")
            entry.reject_unknown(("prefix", "tier"))
            prefix = entry.get_str("prefix")
            tier_name = entry.get_str("tier")
            try:
                rule = TierRule(prefix=prefix, tier=Tier(tier_name))
            except ValueError:
                raise entry.error(
                    "tier", f"unknown tier {tier_name!r}", hint=f"Use one of {', '.join(Tier)}."
                ) from None
            except ValidationError as exc:
                raise entry.error("prefix", exc.message, hint=exc.hint) from None
            if region is not None and home_region(prefix) != region:
                raise entry.error(
                    "prefix",
                    f"{prefix!r} is not a cell of region {region!r}",
                    hint=f"Rules here may only cover cells starting with {region}/.",
                )
            if prefix in seen and seen[prefix] is not rule.tier:
                raise entry.error(
                    "prefix",
                    f"{prefix!r} already has tier {seen[prefix]} (a rule above); got {rule.tier}",
                    hint="Keep one rule per prefix.",
                )
            seen[prefix] = rule.tier
            rules.append(rule)
        return cls(rules, default=default)
