"""Tiers: the four policies, their overrides, and the longest-prefix rules."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from syncengine import resources
from syncengine.errors import ConfigError, ValidationError
from syncengine.tiers import (
    DEFAULT_TIER,
    PullMode,
    PushMode,
    Retention,
    Tier,
    TierPolicy,
    TierRule,
    TierRules,
    load_policies,
    load_policy,
)

DAY_S = 86_400


def _copy_tiers(tmp_path: Path) -> Path:
    folder = tmp_path / "tiers"
    shutil.copytree(resources.data_dir("tiers"), folder)
    return folder


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text(encoding="utf-8")
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1), encoding="utf-8")


def _rules(*pairs: tuple[str, Tier]) -> TierRules:
    return TierRules([TierRule(prefix=p, tier=t) for p, t in pairs])


# -- the Tier enum -----------------------------------------------------------------------------


def test_tier_priorities() -> None:
    assert [t.priority for t in Tier] == [0, 1, 2, 3]
    assert Tier.by_priority() == (Tier.CRITICAL, Tier.IMPORTANT, Tier.STANDARD, Tier.ARCHIVE)
    assert all(Tier.from_priority(t.priority) is t for t in Tier)
    assert Tier("critical") is Tier.CRITICAL
    assert str(Tier.ARCHIVE) == "archive"


@pytest.mark.parametrize("bad", [-1, 4, True])
def test_from_priority_rejects_unknown(bad: int) -> None:
    with pytest.raises(ValidationError, match="no tier has priority"):
        Tier.from_priority(bad)


# -- the shipped policies ----------------------------------------------------------------------


def test_default_policies_load_in_priority_order() -> None:
    policies = load_policies()
    assert list(policies) == list(Tier.by_priority())
    assert all(isinstance(p, TierPolicy) and p.tier is t for t, p in policies.items())
    assert all(p.durability == "full" for p in policies.values())


def test_default_critical_policy() -> None:
    critical = load_policies()[Tier.CRITICAL]
    assert critical.push_mode is PushMode.ON_WRITE
    assert critical.debounce_ms == 50
    assert critical.retry_interval_s <= 10
    assert critical.pull_mode is PullMode.LIVE
    assert critical.long_poll_s is not None
    assert critical.retention is Retention.FOREVER
    assert critical.promise_s == 60
    assert not critical.offpeak_only
    assert (critical.name, critical.priority) == ("critical", 0)


def test_default_important_policy() -> None:
    important = load_policies()[Tier.IMPORTANT]
    assert important.push_mode is PushMode.INTERVAL
    assert important.push_interval_s == 60
    assert important.pull_mode is PullMode.INTERVAL
    assert important.pull_interval_s == 60
    assert important.promise_s == 300
    assert important.debounce_ms is None and important.push_cron is None


def test_default_standard_policy() -> None:
    standard = load_policies()[Tier.STANDARD]
    assert standard.push_interval_s == DAY_S
    assert standard.pull_interval_s == DAY_S
    assert standard.offpeak_only
    assert standard.promise_s == 2 * DAY_S
    assert DEFAULT_TIER is Tier.STANDARD


def test_default_archive_policy() -> None:
    archive = load_policies()[Tier.ARCHIVE]
    assert archive.push_interval_s == 7 * DAY_S
    assert archive.offpeak_only
    assert archive.pull_mode is PullMode.ON_DEMAND
    assert archive.pull_interval_s is None and archive.long_poll_s is None
    assert archive.retention is Retention.EVICT
    assert archive.evict_after_s == 14 * DAY_S
    assert archive.promise_s == 8 * DAY_S


# -- overrides ---------------------------------------------------------------------------------


def test_override_replaces_one_key() -> None:
    policies = load_policies(overrides={"important": {"push_interval_s": 30}})
    assert policies[Tier.IMPORTANT].push_interval_s == 30
    assert policies[Tier.IMPORTANT].pull_interval_s == 60
    assert policies[Tier.CRITICAL] == load_policies()[Tier.CRITICAL]


def test_override_switching_mode_drops_the_old_modes_keys() -> None:
    policies = load_policies(
        overrides={
            "archive": {"push": "cron", "push_cron": "0 2 * * sun"},
            "important": {"pull": "live"},
            "standard": {"retention": "evict", "evict_after_days": 90},
        }
    )
    archive = policies[Tier.ARCHIVE]
    assert archive.push_mode is PushMode.CRON
    assert archive.push_cron == "0 2 * * sun"
    assert archive.push_interval_s is None
    important = policies[Tier.IMPORTANT]
    assert important.pull_mode is PullMode.LIVE
    assert important.pull_interval_s is None
    assert important.long_poll_s == 25
    assert policies[Tier.STANDARD].evict_after_s == 90 * DAY_S


@pytest.mark.parametrize(
    ("overrides", "key", "fragment"),
    [
        ({"important": {"push_interval_s": 0}}, "important.push_interval_s", "at least 1"),
        ({"important": {"push_interval_s": "60"}}, "important.push_interval_s", "an integer"),
        ({"important": {"push_interval_s": True}}, "important.push_interval_s", "an integer"),
        ({"important": {"push_interval_s": 400}}, "promise_s", "must be longer"),
        ({"important": {"push_cron": "0 2 * * sun"}}, "important.push_cron", "only applies"),
        ({"important": {"pushinterval": 30}}, "important.pushinterval", "unknown key"),
        ({"important": {"name": "critical"}}, "important.name", "unknown key"),
        ({"important": {"priority": 0}}, "important.priority", "unknown key"),
        ({"vital": {"promise_s": 1}}, "vital", "unknown tier"),
        ({"important": 30}, "important", "expected a table"),
        ({"critical": {"offpeak_only": True}}, "critical.offpeak_only", "on_write"),
        ({"critical": {"push": "sometimes"}}, "critical.push", "unknown value 'sometimes'"),
    ],
)
def test_bad_overrides_name_source_and_key(
    overrides: dict[str, Any], key: str, fragment: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_policies(overrides=overrides, overrides_source="edge.toml")
    message = info.value.message
    if key == "promise_s":  # a clash with the file's value is reported at the file's key
        assert message.startswith("tiers/important.toml: key 'promise_s': "), message
    else:
        assert message.startswith(f"edge.toml: key '{key}': "), message
    assert fragment in message


def test_override_key_prefix_for_config_files() -> None:
    with pytest.raises(ConfigError) as info:
        load_policies(
            overrides={"standard": {"retry_interval_s": 0}},
            overrides_source="edge.toml",
            overrides_key="tier_policies",
        )
    assert info.value.message.startswith(
        "edge.toml: key 'tier_policies.standard.retry_interval_s': must be at least 1"
    )
    assert info.value.detail["key"] == "tier_policies.standard.retry_interval_s"


# -- file errors -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("file", "old", "new", "key", "fragment"),
    [
        ("critical", "priority = 0", "priority = 3", "priority", "has priority 0, got 3"),
        ("critical", 'name = "critical"', 'name = "vital"', "name", "unknown tier 'vital'"),
        ("critical", 'name = "critical"', 'name = "archive"', "name", "does not match"),
        ("critical", "debounce_ms = 50", "debounce_ms = -1", "debounce_ms", "at least 0"),
        ("critical", "debounce_ms = 50", "debounce_ms = 5.0", "debounce_ms", "a float"),
        ("critical", 'pull = "live"', 'pull = "push"', "pull", "unknown value 'push'"),
        ("critical", "long_poll_s = 25", "long_poll_s = 3600", "long_poll_s", "at most 300"),
        ("critical", "durability", "durability = 'relaxed'\n#", "durability", "unsupported"),
        ("critical", "promise_s = 60", "promise_s = 0", "promise_s", "at least 1"),
        ("critical", "promise_s = 60", "", "promise_s", "missing (required)"),
        ("critical", "retention", "keep = 1\nretention", "keep", "unknown key"),
        ("important", "push_interval_s = 60", "", "push_interval_s", "missing (required)"),
        ("important", "push_interval_s = 60", "push_interval_s = 60\ndebounce_ms = 5",
         "debounce_ms", "only applies when push = 'on_write', not 'interval'"),
        ("important", "pull_interval_s = 60", "long_poll_s = 20", "long_poll_s", "only applies"),
        ("standard", "offpeak_only = true", "offpeak_only = 1", "offpeak_only", "true or false"),
        ("archive", 'retention = "evict"', 'retention = "forever"', "evict_after_days",
         "only applies when retention = 'evict'"),
        ("archive", "evict_after_days = 14", "", "evict_after_days", "missing (required)"),
        ("archive", 'push = "interval"\npush_interval_s = 604800',
         'push = "cron"\npush_cron = "0 2 * * 0"', "push_cron", "day-of-week '0' uses numbers"),
        ("archive", 'push = "interval"\npush_interval_s = 604800',
         'push = "cron"\npush_cron = "0 2 * *"', "push_cron", "invalid cron expression"),
        ("archive", 'push = "interval"\npush_interval_s = 604800',
         'push = "cron"\npush_cron = "61 2 * * sun"', "push_cron", "invalid cron expression"),
    ],
)  # fmt: skip
def test_bad_tier_files_name_file_and_key(
    tmp_path: Path, file: str, old: str, new: str, key: str, fragment: str
) -> None:
    folder = _copy_tiers(tmp_path)
    _edit(folder / f"{file}.toml", old, new)
    with pytest.raises(ConfigError) as info:
        load_policies(folder)
    message = info.value.message
    assert message.startswith(f"tiers/{file}.toml: key '{key}': "), message
    assert fragment in message


def test_cron_policy_from_a_file(tmp_path: Path) -> None:
    folder = _copy_tiers(tmp_path)
    _edit(
        folder / "archive.toml",
        'push = "interval"\npush_interval_s = 604800',
        'push = "cron"\npush_cron = "30 2 * * sun"',
    )
    archive = load_policy(folder / "archive.toml")
    assert archive.push_mode is PushMode.CRON
    assert archive.push_cron == "30 2 * * sun"


def test_missing_tier_file(tmp_path: Path) -> None:
    folder = _copy_tiers(tmp_path)
    (folder / "important.toml").unlink()
    with pytest.raises(ConfigError, match=r"tiers/important.toml: file not found"):
        load_policies(folder)


def test_tier_toml_syntax_error(tmp_path: Path) -> None:
    folder = _copy_tiers(tmp_path)
    _edit(folder / "standard.toml", "priority = 2", "priority = = 2")
    with pytest.raises(ConfigError) as info:
        load_policies(folder)
    assert info.value.message.startswith("tiers/standard.toml: invalid TOML: ")
    assert "line" in info.value.message


# -- which tier a cell has ---------------------------------------------------------------------


def test_longest_prefix_wins() -> None:
    rules = _rules(
        ("west/ng", Tier.IMPORTANT),
        ("west/ng/lagos/clinic-12", Tier.STANDARD),
        ("west/ng/lagos/clinic-12/alerts", Tier.CRITICAL),
        ("west/ng/lagos/clinic-12/2019", Tier.ARCHIVE),
    )
    assert rules.tier_for("west/ng/lagos/clinic-12/alerts") is Tier.CRITICAL
    assert rules.tier_for("west/ng/lagos/clinic-12/alerts/bp") is Tier.CRITICAL
    assert rules.tier_for("west/ng/lagos/clinic-12/visits") is Tier.STANDARD
    assert rules.tier_for("west/ng/lagos/clinic-12/2019") is Tier.ARCHIVE
    assert rules.tier_for("west/ng/abuja/clinic-1") is Tier.IMPORTANT
    assert rules.tier_for("west/gh/accra") is Tier.STANDARD
    assert rules.tier_for("east/ke/nairobi") is Tier.STANDARD


def test_prefixes_match_whole_segments_only() -> None:
    rules = _rules(("west/ng/lagos/clinic-1", Tier.CRITICAL))
    assert rules.tier_for("west/ng/lagos/clinic-1") is Tier.CRITICAL
    assert rules.tier_for("west/ng/lagos/clinic-1/alerts") is Tier.CRITICAL
    assert rules.tier_for("west/ng/lagos/clinic-12") is Tier.STANDARD
    assert rules.tier_for("west/ng/lagos/clinic-12/alerts") is Tier.STANDARD
    assert rules.tier_for("west/ng/lagos") is Tier.STANDARD


def test_region_wide_rule_and_custom_default() -> None:
    rules = TierRules([TierRule(prefix="west", tier=Tier.IMPORTANT)], default=Tier.ARCHIVE)
    assert rules.tier_for("west/ng") is Tier.IMPORTANT
    assert rules.tier_for("east/ke") is Tier.ARCHIVE
    assert TierRules().tier_for("west/ng") is DEFAULT_TIER


def test_rule_for_names_the_deciding_rule() -> None:
    rules = _rules(("west/ng", Tier.IMPORTANT), ("west/ng/lagos", Tier.CRITICAL))
    assert rules.rule_for("west/ng/lagos/x") == TierRule(prefix="west/ng/lagos", tier=Tier.CRITICAL)
    assert rules.rule_for("west/gh") is None


def test_duplicate_prefix_with_different_tiers_is_refused() -> None:
    with pytest.raises(ConfigError, match="two tiers"):
        _rules(("west/ng", Tier.IMPORTANT), ("west/ng", Tier.CRITICAL))
    same = _rules(("west/ng", Tier.IMPORTANT), ("west/ng", Tier.IMPORTANT))
    assert len(same) == 1


@pytest.mark.parametrize("prefix", ["", "mars/ng", "west//ng", "West/ng", "west/ng/"])
def test_rule_prefixes_are_validated(prefix: str) -> None:
    with pytest.raises(ValidationError):
        TierRule(prefix=prefix, tier=Tier.CRITICAL)


def test_rule_accepts_a_tier_name_and_refuses_unknown_ones() -> None:
    assert TierRule(prefix="west", tier="critical").tier is Tier.CRITICAL  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="unknown tier"):
        TierRule(prefix="west", tier="vital")  # type: ignore[arg-type]


def test_wire_round_trip() -> None:
    rules = _rules(("west/ng/lagos", Tier.CRITICAL), ("west/gh", Tier.ARCHIVE))
    wire = rules.to_wire()
    assert wire == [
        {"prefix": "west/gh", "tier": "archive"},
        {"prefix": "west/ng/lagos", "tier": "critical"},
    ]
    assert TierRules.from_wire(wire) == rules
    assert list(rules) == [
        TierRule(prefix="west/gh", tier=Tier.ARCHIVE),
        TierRule(prefix="west/ng/lagos", tier=Tier.CRITICAL),
    ]
    assert "west/gh" in repr(rules)


@pytest.mark.parametrize(
    "wire",
    [
        "west",
        {"prefix": "west", "tier": "critical"},
        [{"prefix": "west"}],
        [{"prefix": "west", "tier": "critical", "extra": 1}],
        [{"prefix": "mars", "tier": "critical"}],
        [{"prefix": "west", "tier": "vital"}],
        [["west", "critical"]],
    ],
)
def test_malformed_wire_rules(wire: object) -> None:
    with pytest.raises(ValidationError):
        TierRules.from_wire(wire)


def test_rules_from_config() -> None:
    rules = TierRules.from_config(
        [{"prefix": "west/ng/lagos/clinic-12/alerts", "tier": "critical"}],
        source="hub.toml",
        region="west",
    )
    assert rules.tier_for("west/ng/lagos/clinic-12/alerts") is Tier.CRITICAL


@pytest.mark.parametrize(
    ("items", "key", "fragment"),
    [
        ("west", "tier_rules", "expected an array"),
        (["west"], "tier_rules", "rule 0: expected a table"),
        ([{"prefix": "west/ng", "tier": "vital"}], "tier_rules[0].tier", "unknown tier"),
        ([{"prefix": "west/NG", "tier": "critical"}], "tier_rules[0].prefix", "invalid segment"),
        ([{"prefix": "east/ke", "tier": "critical"}], "tier_rules[0].prefix", "region 'west'"),
        ([{"tier": "critical"}], "tier_rules[0].prefix", "missing (required)"),
        ([{"prefix": "west", "tier": "critical", "ttl": 1}], "tier_rules[0].ttl", "unknown key"),
        (
            [
                {"prefix": "west/ng", "tier": "critical"},
                {"prefix": "west/ng", "tier": "archive"},
            ],
            "tier_rules[1].prefix",
            "already has tier critical",
        ),
    ],
)
def test_bad_config_rules_name_file_and_key(items: object, key: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        TierRules.from_config(items, source="hub.toml", region="west")
    assert info.value.message.startswith(f"hub.toml: key '{key}': "), info.value.message
    assert fragment in info.value.message


def test_lookup_among_many_rules() -> None:
    many = TierRules(
        TierRule(prefix=f"west/ng/site-{i}", tier=Tier.IMPORTANT) for i in range(20_000)
    )
    assert len(many) == 20_000
    assert many.tier_for("west/ng/site-19999/alerts") is Tier.IMPORTANT
    assert many.tier_for("west/ng/site-20000") is Tier.STANDARD
