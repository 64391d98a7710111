"""Config files: typed values, environment precedence, and secrets that never print."""

from __future__ import annotations

from pathlib import Path

import pytest

from syncengine.config import (
    DEFAULT_BUSY_TIMEOUT_MS,
    DEFAULT_LISTEN,
    DEFAULT_MAX_CLOCK_DRIFT_S,
    DEFAULT_MAX_RECORD_BYTES,
    EdgeConfig,
    HubConfig,
    Secret,
    load_config,
    load_edge_config,
    load_hub_config,
    mask_url,
    parse_listen,
)
from syncengine.errors import ConfigError, ValidationError
from syncengine.tiers import Tier, TierPolicy

TOKEN = "tok-3f9c2a7be1d04c55"
PASSWORD = "pg-Secr3t-pw"
REDIS_PASSWORD = "redis-Secr3t-pw"

EDGE_TOML = f"""
node_id = "lagos-clinic-12"
region = "west"
db = "/var/lib/syncengine/edge.db"
hub_url = "http://127.0.0.1:8400"
token = "{TOKEN}"
subscriptions = ["west/ng/lagos/clinic-12"]
tier_rules = [{{ prefix = "west/ng/lagos/clinic-12/alerts", tier = "critical" }}]
"""

HUB_TOML = f"""
region = "west"
listen = "127.0.0.1:8400"
database_url = "postgresql://syncengine:{PASSWORD}@127.0.0.1:5432/syncengine_west"
redis_url = "redis://:{REDIS_PASSWORD}@127.0.0.1:6379/0"
tier_rules = [{{ prefix = "west/ng/lagos/clinic-12/alerts", tier = "critical" }}]
"""

NO_ENV: dict[str, str] = {}


def _write(tmp_path: Path, text: str, name: str = "edge.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _edge(tmp_path: Path, text: str = EDGE_TOML, env: dict[str, str] | None = None) -> EdgeConfig:
    return load_edge_config(_write(tmp_path, text), env=NO_ENV if env is None else env)


def _hub(tmp_path: Path, text: str = HUB_TOML, env: dict[str, str] | None = None) -> HubConfig:
    return load_hub_config(_write(tmp_path, text, "hub.toml"), env=NO_ENV if env is None else env)


# -- the DESIGN examples load ------------------------------------------------------------------


def test_edge_config_loads(tmp_path: Path) -> None:
    config = _edge(tmp_path)
    assert config.node_id == "lagos-clinic-12"
    assert config.region == "west"
    assert config.db == Path("/var/lib/syncengine/edge.db")
    assert config.hub_url == "http://127.0.0.1:8400"
    assert config.token == TOKEN
    assert config.subscriptions == ("west/ng/lagos/clinic-12",)
    assert config.tier_rules.tier_for("west/ng/lagos/clinic-12/alerts") is Tier.CRITICAL
    assert config.tier_rules.tier_for("west/ng/lagos/clinic-12/visits") is Tier.STANDARD
    assert config.max_record_bytes == DEFAULT_MAX_RECORD_BYTES == 1_048_576
    assert config.busy_timeout_ms == DEFAULT_BUSY_TIMEOUT_MS == 10_000
    assert config.metrics_listen is None
    assert set(config.tier_policies) == set(Tier)
    assert config.source == str(tmp_path / "edge.toml")


def test_hub_config_loads(tmp_path: Path) -> None:
    config = _hub(tmp_path)
    assert config.region == "west"
    assert (config.listen_host, config.listen_port) == ("127.0.0.1", 8400)
    assert config.database_url.startswith("postgresql://syncengine:")
    assert config.redis_url == f"redis://:{REDIS_PASSWORD}@127.0.0.1:6379/0"
    assert config.max_clock_drift_s == DEFAULT_MAX_CLOCK_DRIFT_S == 300
    assert config.tier_rules.tier_for("west/ng/lagos/clinic-12/alerts") is Tier.CRITICAL


@pytest.mark.parametrize(
    ("key", "default", "good", "refused", "why"),
    [
        ("token_cache_s", 0, 30, [3600, -1], ["at most 300", "at least 0"]),
        ("max_large_pushes", 8, 2, [0, 2000], ["at least 1", "at most 1024"]),
    ],
)
def test_hub_bounded_keys_have_defaults_and_refuse_what_is_out_of_bounds(
    tmp_path: Path, key: str, default: int, good: int, refused: list[int], why: list[str]
) -> None:
    minimal = 'region = "east"\ndatabase_url = "postgresql:///east"\n'
    assert getattr(_hub(tmp_path, minimal), key) == default
    assert getattr(_hub(tmp_path, minimal + f"{key} = {good}\n"), key) == good
    for value, reason in zip(refused, why, strict=True):
        with pytest.raises(ConfigError, match=rf"{key}.*{reason}"):
            _hub(tmp_path, minimal + f"{key} = {value}\n")


def test_minimal_configs_take_defaults(tmp_path: Path) -> None:
    edge = _edge(tmp_path, 'node_id = "n1"\nregion = "east"\ndb = "edge.db"\n')
    assert edge.hub_url is None and edge.token is None and edge.token_file is None
    assert edge.subscriptions == () and len(edge.tier_rules) == 0
    hub = _hub(tmp_path, 'region = "east"\ndatabase_url = "postgresql:///east"\n')
    assert hub.listen == DEFAULT_LISTEN and hub.redis_url is None


def test_load_config_tells_edge_from_hub(tmp_path: Path) -> None:
    assert isinstance(load_config(_write(tmp_path, EDGE_TOML), env=NO_ENV), EdgeConfig)
    hub_path = _write(tmp_path, HUB_TOML, "hub.toml")
    assert isinstance(load_config(hub_path, env=NO_ENV), HubConfig)
    listen_only = _write(tmp_path, 'region = "west"\nlisten = "0.0.0.0:1"\n', "h2.toml")
    with pytest.raises(ConfigError, match="key 'database_url': missing"):
        load_config(listen_only, env=NO_ENV)  # a hub, but an incomplete one
    assert isinstance(load_config(listen_only, env={"DATABASE_URL": "postgres://h/db"}), HubConfig)


def test_load_config_refuses_mixed_and_unknown_files(tmp_path: Path) -> None:
    mixed = _write(tmp_path, EDGE_TOML + 'listen = "127.0.0.1:1"\n')
    with pytest.raises(ConfigError, match="mixes hub keys"):
        load_config(mixed, env=NO_ENV)
    neither = _write(tmp_path, 'region = "west"\n', "x.toml")
    with pytest.raises(ConfigError, match="cannot tell an edge config from a hub config"):
        load_config(neither, env=NO_ENV)


def test_missing_file_says_what_to_do(tmp_path: Path) -> None:
    path = tmp_path / "edge.toml"
    with pytest.raises(ConfigError) as info:
        load_edge_config(path, env=NO_ENV)
    assert info.value.message == (
        f"config file {path} not found; create it (see deploy/edge.toml.example)"
    )
    with pytest.raises(ConfigError, match=r"see deploy/hub\.toml\.example"):
        load_hub_config(tmp_path / "hub.toml", env=NO_ENV)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "any.toml", env=NO_ENV)


def test_config_syntax_error_has_the_line(tmp_path: Path) -> None:
    path = _write(tmp_path, 'node_id = "n1"\nregion = west\n')
    with pytest.raises(ConfigError) as info:
        load_edge_config(path, env=NO_ENV)
    assert info.value.message.startswith(f"{path}: invalid TOML: ")
    assert "line 2" in info.value.message


# -- validation names the file and the key -----------------------------------------------------


@pytest.mark.parametrize(
    ("old", "new", "key", "fragment"),
    [
        ('node_id = "lagos-clinic-12"', 'node_id = "Lagos Clinic"', "node_id", "invalid node id"),
        ('node_id = "lagos-clinic-12"', 'node_id = "-x"', "node_id", "invalid node id"),
        ('node_id = "lagos-clinic-12"', f'node_id = "{"a" * 65}"', "node_id", "invalid"),
        ('node_id = "lagos-clinic-12"', "", "node_id", "missing (required)"),
        ('region = "west"', 'region = "westt"', "region", "unknown region 'westt'"),
        ('db = "/var/lib/syncengine/edge.db"', "db = 3", "db", "expected a string"),
        ('hub_url = "http://127.0.0.1:8400"', 'hub_url = "127.0.0.1:8400"', "hub_url", "http(s)"),
        ('hub_url = "http://127.0.0.1:8400"', 'hub_url = "http://h:99999"', "hub_url", "http(s)"),
        (f'token = "{TOKEN}"', f'token = "{TOKEN}"\ntoken_file = "t"', "token", "not both"),
        (f'token = "{TOKEN}"', 'token = ""', "token", "must not be empty"),
        ('["west/ng/lagos/clinic-12"]', '["east/ke/nairobi"]', "subscriptions", "node's region"),
        ('["west/ng/lagos/clinic-12"]', '["west/NG"]', "subscriptions", "item 0"),
        ('["west/ng/lagos/clinic-12"]', '"west"', "subscriptions", "expected an array"),
        ('prefix = "west/ng/lagos', 'prefix = "east/ke/nairobi', "tier_rules[0].prefix", "region"),
        ('tier = "critical"', 'tier = "urgent"', "tier_rules[0].tier", "unknown tier"),
        ('region = "west"', 'region = "west"\nmax_record_bytes = 0', "max_record_bytes", "least 1"),
        ('region = "west"', 'region = "west"\nbusy_timeout_ms = "1s"', "busy_timeout_ms", "integer"),
        ('region = "west"', 'region = "west"\nmetrics_listen = "9100"', "metrics_listen", "host:port"),
        ('region = "west"', 'region = "west"\nnodeid = "x"', "nodeid", "unknown key"),
        ('region = "west"', 'region = "west"\nlisten = "x"', "listen", "mixes"),
    ],
)  # fmt: skip
def test_bad_edge_values_name_file_and_key(
    tmp_path: Path, old: str, new: str, key: str, fragment: str
) -> None:
    assert old in EDGE_TOML
    path = _write(tmp_path, EDGE_TOML.replace(old, new, 1))
    with pytest.raises(ConfigError) as info:
        if key == "listen":
            load_config(path, env=NO_ENV)
        else:
            load_edge_config(path, env=NO_ENV)
    message = info.value.message
    if key != "listen":
        assert message.startswith(f"{path}: key '{key}': "), message
    assert fragment in message
    assert TOKEN not in str(info.value)


@pytest.mark.parametrize(
    ("old", "new", "key", "fragment"),
    [
        ('listen = "127.0.0.1:8400"', 'listen = "8400"', "listen", "expected host:port"),
        ('listen = "127.0.0.1:8400"', 'listen = "h:70000"', "listen", "out of range"),
        ('listen = "127.0.0.1:8400"', 'listen = "::1:8400"', "listen", "brackets"),
        ("postgresql://syncengine:", "mysql://syncengine:", "database_url", "postgresql://"),
        ("redis://:", "http://:", "redis_url", "redis://"),
        ('region = "west"', 'region = "west"\nmax_clock_drift_s = 0', "max_clock_drift_s", "least"),
        ('region = "west"', 'region = "west"\nmax_batch_changes = -5', "max_batch_changes", "least"),
        ('region = "west"', 'region = "west"\nnode_id = "x"', "node_id", "unknown key"),
        ('prefix = "west/ng/lagos', 'prefix = "north/eg/cairo', "tier_rules[0].prefix", "region"),
    ],
)  # fmt: skip
def test_bad_hub_values_name_file_and_key(
    tmp_path: Path, old: str, new: str, key: str, fragment: str
) -> None:
    assert old in HUB_TOML
    path = _write(tmp_path, HUB_TOML.replace(old, new, 1), "hub.toml")
    with pytest.raises(ConfigError) as info:
        load_hub_config(path, env=NO_ENV)
    message = info.value.message
    assert message.startswith(f"{path}: key '{key}': "), message
    assert fragment in message
    assert PASSWORD not in str(info.value) and REDIS_PASSWORD not in str(info.value)


def test_tier_policy_overrides_in_config(tmp_path: Path) -> None:
    config = _edge(tmp_path, EDGE_TOML + "[tier_policies.important]\npush_interval_s = 30\n")
    assert config.tier_policies[Tier.IMPORTANT].push_interval_s == 30
    assert config.tier_policies[Tier.STANDARD].push_interval_s == 86_400
    assert all(isinstance(p, TierPolicy) for p in config.tier_policies.values())


def test_bad_tier_policy_override_names_file_and_key(tmp_path: Path) -> None:
    path = _write(tmp_path, HUB_TOML + "[tier_policies.important]\npush_interval_s = 0\n")
    with pytest.raises(ConfigError) as info:
        load_hub_config(path, env=NO_ENV)
    assert info.value.message.startswith(
        f"{path}: key 'tier_policies.important.push_interval_s': must be at least 1"
    )
    path = _write(tmp_path, HUB_TOML + "[tier_policies.urgent]\npromise_s = 1\n")
    with pytest.raises(ConfigError, match=r"key 'tier_policies.urgent': unknown tier"):
        load_hub_config(path, env=NO_ENV)


# -- paths and tokens --------------------------------------------------------------------------


def test_relative_paths_resolve_against_the_config_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "etc"
    folder.mkdir()
    (folder / "token").write_text(f"{TOKEN}\n", encoding="utf-8")
    path = _write(
        folder, 'node_id = "n1"\nregion = "west"\ndb = "data/edge.db"\ntoken_file = "token"\n'
    )
    monkeypatch.chdir(tmp_path)  # somewhere else than the config's folder
    config = load_edge_config(Path("etc") / "edge.toml", env=NO_ENV)
    assert config.db == folder.absolute() / "data" / "edge.db"
    assert config.token_file == folder.absolute() / "token"
    assert config.token == TOKEN  # read from the file, whitespace stripped
    assert path.exists()


def test_token_file_is_read_lazily(tmp_path: Path) -> None:
    token_path = tmp_path / "token"
    config = _edge(tmp_path, 'node_id = "n1"\nregion = "west"\ndb = "e.db"\ntoken_file = "token"\n')
    with pytest.raises(ConfigError, match=r"token_file .* cannot read it"):
        _ = config.token  # not there yet: loading succeeded, using fails
    token_path.write_text("", encoding="utf-8")
    with pytest.raises(ConfigError, match="is empty"):
        _ = config.token
    token_path.write_text("first\n", encoding="utf-8")
    assert config.token == "first"
    token_path.write_text("rotated\n", encoding="utf-8")
    assert config.token == "rotated"


# -- the environment ---------------------------------------------------------------------------


def test_environment_overrides_edge_scalars(tmp_path: Path) -> None:
    env = {
        "SYNCENGINE_NODE_ID": "abuja-clinic-3",
        "SYNCENGINE_HUB_URL": "https://hub.west.example.org",
        "SYNCENGINE_DB": "/srv/edge.db",
        "SYNCENGINE_BUSY_TIMEOUT_MS": "2500",
        "SYNCENGINE_METRICS_LISTEN": "127.0.0.1:9100",
        "DATABASE_URL": "postgresql://ignored/by/edges",
        "SYNCENGINE_UNRELATED": "ignored",
    }
    config = _edge(tmp_path, env=env)
    assert config.node_id == "abuja-clinic-3"
    assert config.hub_url == "https://hub.west.example.org"
    assert config.db == Path("/srv/edge.db")
    assert config.busy_timeout_ms == 2500
    assert config.metrics_listen == "127.0.0.1:9100"
    assert config.subscriptions == ("west/ng/lagos/clinic-12",)  # from the file


def test_empty_variables_count_as_unset(tmp_path: Path) -> None:
    config = _edge(tmp_path, env={"SYNCENGINE_NODE_ID": "", "SYNCENGINE_HUB_URL": "  "})
    assert config.node_id == "lagos-clinic-12"
    assert config.hub_url == "http://127.0.0.1:8400"


def test_environment_paths_resolve_against_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "conf").mkdir()
    (tmp_path / "run").mkdir()
    monkeypatch.chdir(tmp_path / "run")
    config = load_edge_config(
        _write(tmp_path / "conf", EDGE_TOML), env={"SYNCENGINE_DB": "local.db"}
    )
    assert config.db == (tmp_path / "run").absolute() / "local.db"


def test_environment_token_replaces_the_files_token_file(tmp_path: Path) -> None:
    text = 'node_id = "n1"\nregion = "west"\ndb = "e.db"\ntoken_file = "/nonexistent"\n'
    config = _edge(tmp_path, text, env={"SYNCENGINE_TOKEN": TOKEN})
    assert config.token_file is None
    assert config.token == TOKEN
    config = _edge(tmp_path, EDGE_TOML, env={"SYNCENGINE_TOKEN_FILE": "/run/secrets/token"})
    assert config.inline_token is None
    assert config.token_file == Path("/run/secrets/token")


def test_bad_environment_values_name_the_variable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        _edge(tmp_path, env={"SYNCENGINE_BUSY_TIMEOUT_MS": "ten"})
    assert info.value.message == (
        "environment variable SYNCENGINE_BUSY_TIMEOUT_MS: key 'busy_timeout_ms': "
        "expected an integer, got 'ten'"
    )
    with pytest.raises(ConfigError) as info:
        _edge(tmp_path, env={"SYNCENGINE_REGION": "mars"})
    assert info.value.message.startswith(
        "environment variable SYNCENGINE_REGION: key 'region': unknown region 'mars'"
    )


def test_environment_overrides_hub_stores(tmp_path: Path) -> None:
    env = {
        "DATABASE_URL": "postgresql://u:envpw@db.internal/west",
        "REDIS_URL": "rediss://cache.internal:6380/1",
        "SYNCENGINE_LISTEN": "0.0.0.0:9000",
        "SYNCENGINE_MAX_CLOCK_DRIFT_S": "60",
        "SYNCENGINE_NODE_ID": "ignored-by-hubs",
    }
    config = _hub(tmp_path, env=env)
    assert config.database_url == "postgresql://u:envpw@db.internal/west"
    assert config.redis_url == "rediss://cache.internal:6380/1"
    assert (config.listen_host, config.listen_port) == ("0.0.0.0", 9000)
    assert config.max_clock_drift_s == 60


def test_prefixed_variable_beats_the_plain_name(tmp_path: Path) -> None:
    env = {
        "DATABASE_URL": "postgresql://generic/db",
        "SYNCENGINE_DATABASE_URL": "postgresql://specific/db",
    }
    assert _hub(tmp_path, env=env).database_url == "postgresql://specific/db"


def test_default_environment_is_os_environ(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SYNCENGINE_NODE_ID", "from-os-environ")
    path = _write(tmp_path, EDGE_TOML)
    assert load_edge_config(path).node_id == "from-os-environ"
    # Configs built in code are not steered by the environment unless asked.
    assert EdgeConfig.from_mapping({"node_id": "n1", "region": "west", "db": "e.db"}).node_id == (
        "n1"
    )


# -- URLs and secrets --------------------------------------------------------------------------


def test_postgres_scheme_is_normalised(tmp_path: Path) -> None:
    text = HUB_TOML.replace("postgresql://", "postgres://")
    config = _hub(tmp_path, text)
    assert config.database_url == (
        f"postgresql://syncengine:{PASSWORD}@127.0.0.1:5432/syncengine_west"
    )
    env_config = _hub(tmp_path, env={"DATABASE_URL": "postgres://u@h:5433/db"})
    assert env_config.database_url == "postgresql://u@h:5433/db"


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("postgresql://u:pw@h/db", "postgresql://u:***@h/db"),
        ("postgresql://u:p%40ss@h:5432/db?sslmode=require", "postgresql://u:***@h:5432/db?sslmode=require"),
        ("postgresql://u@h/db", "postgresql://u@h/db"),
        ("postgresql://h/db?user=u&password=pw&x=1", "postgresql://h/db?user=u&password=***&x=1"),
        ("redis://:pw@h:6379/0", "redis://:***@h:6379/0"),
        ("redis://user:p@ss@[::1]:6379", "redis://user:***@[::1]:6379"),
        ("http://127.0.0.1:8400", "http://127.0.0.1:8400"),
        ("http://[::1", "***"),
        ("u:pw@h/db", "***"),
    ],
)  # fmt: skip
def test_mask_url(url: str, masked: str) -> None:
    assert mask_url(url) == masked


def test_mask_url_none() -> None:
    assert mask_url(None) is None


def test_edge_repr_and_str_hide_the_token(tmp_path: Path) -> None:
    config = _edge(tmp_path)
    for text in (repr(config), str(config), repr(config.redacted())):
        assert TOKEN not in text
        assert "lagos-clinic-12" in text
    assert config.redacted()["token"] == "***"
    assert TOKEN not in repr(config.inline_token)
    assert TOKEN not in str(config.inline_token)


def test_hub_repr_and_str_hide_passwords(tmp_path: Path) -> None:
    config = _hub(tmp_path)
    for text in (repr(config), str(config), repr(config.redacted())):
        assert PASSWORD not in text
        assert REDIS_PASSWORD not in text
        assert "postgresql://syncengine:***@127.0.0.1:5432/syncengine_west" in text


def test_secret() -> None:
    secret = Secret(TOKEN)
    assert secret.reveal() == TOKEN
    assert repr(secret) == "Secret('***')" and str(secret) == "***"
    assert secret == Secret(TOKEN) and secret != Secret("other")
    assert hash(secret) == hash(Secret(TOKEN))


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("127.0.0.1:8400", ("127.0.0.1", 8400)),
        ("0.0.0.0:0", ("0.0.0.0", 0)),
        ("localhost:65535", ("localhost", 65535)),
        ("[::1]:8400", ("::1", 8400)),
    ],
)
def test_parse_listen(value: str, expected: tuple[str, int]) -> None:
    assert parse_listen(value) == expected


@pytest.mark.parametrize(
    "value", ["8400", ":8400", "h:", "h:port", "[]:1", "::1:8400", "h:65536", "h:\u0663"]
)
def test_parse_listen_refuses(value: str) -> None:
    with pytest.raises(ValidationError):
        parse_listen(value)
