"""Configuration of the two programs: ``edge.toml`` for an edge node, ``hub.toml`` for a hub.

Values come from the TOML file, and the environment takes precedence over the file:

- ``SYNCENGINE_<KEY>`` (the key upper-cased) overrides any scalar key of either config, e.g.
  ``SYNCENGINE_NODE_ID``, ``SYNCENGINE_DB``, ``SYNCENGINE_HUB_URL``, ``SYNCENGINE_TOKEN``;
- ``DATABASE_URL`` and ``REDIS_URL`` override the hub's ``database_url`` and ``redis_url``
  (a ``SYNCENGINE_DATABASE_URL`` beats the plain name, being more specific).

An empty variable counts as unset. Arrays and tables (``subscriptions``, ``tier_rules``,
``tier_policies``) come from the file only. The environment is read in one place (the
"environment" section below), and only through the ``env`` argument of the loaders, which
defaults to ``os.environ``; tests pass a dict instead of mutating the process environment.

Relative ``db`` and ``token_file`` paths in a file resolve against the file's folder, so a
config means the same whatever the working directory; paths from the environment resolve
against the working directory, like any shell path. Passwords and tokens never appear in
``repr``/``str`` of a config: see :meth:`EdgeConfig.redacted` and :func:`mask_url`.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final, overload
from urllib.parse import SplitResult, urlsplit, urlunsplit

from syncengine import resources
from syncengine.cells import REGION_CODES, home_region, parse_prefix
from syncengine.errors import ConfigError, ValidationError
from syncengine.merge import RESOLVERS, validate_collection
from syncengine.resources import TomlTable
from syncengine.tiers import Tier, TierPolicy, TierRules, load_policies

__all__ = [
    "DEFAULT_BUSY_TIMEOUT_MS",
    "DEFAULT_LISTEN",
    "DEFAULT_FEED_RETENTION_DAYS",
    "DEFAULT_MAX_BATCH_CHANGES",
    "DEFAULT_MAX_BODY_BYTES",
    "DEFAULT_MAX_CLOCK_DRIFT_S",
    "DEFAULT_MAX_RECORD_BYTES",
    "ENV_PREFIX",
    "EdgeConfig",
    "HubConfig",
    "Secret",
    "load_config",
    "load_edge_config",
    "load_hub_config",
    "mask_url",
    "parse_listen",
]

#: ``SYNCENGINE_<KEY>`` overrides the scalar config key ``<key>``.
ENV_PREFIX: Final = "SYNCENGINE_"
#: Largest encoded record an edge accepts from the app: 1 MiB.
DEFAULT_MAX_RECORD_BYTES: Final = 1_048_576
#: How long SQLite waits for the other process (app or daemon) to release its lock.
DEFAULT_BUSY_TIMEOUT_MS: Final = 10_000
#: Stamps further ahead of the hub's clock are refused (DESIGN: 5 minutes).
DEFAULT_MAX_CLOCK_DRIFT_S: Final = 300
#: Largest request body the hub reads: 8 MiB, room for a batch of large records.
DEFAULT_MAX_BODY_BYTES: Final = 8 * 1_048_576
#: Most changes the hub applies from one push batch (one PostgreSQL transaction).
DEFAULT_MAX_BATCH_CHANGES: Final = 1_000
#: Loopback by default: exposing a hub is a decision, not an accident.
DEFAULT_LISTEN: Final = "127.0.0.1:8400"
#: Days the hub keeps its change feed (see syncengine/hub/retention.py).
DEFAULT_FEED_RETENTION_DAYS: Final = 30
#: The longest ``token_cache_s``: a revoked token is refused within five minutes at worst.
MAX_TOKEN_CACHE_S: Final = 300
#: Large pushes one hub process decodes and applies at once (see ``max_large_pushes``).
DEFAULT_MAX_LARGE_PUSHES: Final = 8

_NODE_ID: Final = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}\Z")
_MASK: Final = "***"
_SECRET_QUERY: Final = re.compile(
    r"((?:^|&)[^=&]*(?:password|passwd|token|secret)[^=&]*=)[^&]*", re.I
)

# Scalar keys, by the type an environment string is converted to. Non-scalar keys follow.
_EDGE_SCALARS: Final[Mapping[str, type]] = {
    "node_id": str,
    "region": str,
    "db": str,
    "hub_url": str,
    "token": str,
    "token_file": str,
    "max_record_bytes": int,
    "busy_timeout_ms": int,
    "metrics_listen": str,
}
_EDGE_KEYS: Final = frozenset(_EDGE_SCALARS) | {
    "subscriptions",
    "tier_rules",
    "tier_policies",
    "resolvers",
}
_HUB_SCALARS: Final[Mapping[str, type]] = {
    "region": str,
    "listen": str,
    "database_url": str,
    "redis_url": str,
    "max_clock_drift_s": int,
    "max_body_bytes": int,
    "max_batch_changes": int,
    "max_record_bytes": int,
    "feed_retention_days": int,
    "token_cache_s": int,
    "max_large_pushes": int,
}
_HUB_KEYS: Final = frozenset(_HUB_SCALARS) | {"tier_rules", "tier_policies", "resolvers"}
# Conventional names (Heroku, compose, most PaaS) honoured for the hub's stores.
_HUB_ALIASES: Final[Mapping[str, str]] = {"DATABASE_URL": "database_url", "REDIS_URL": "redis_url"}
# Keys that tell an edge file from a hub file.
_EDGE_ONLY: Final = _EDGE_KEYS - _HUB_KEYS
_HUB_ONLY: Final = _HUB_KEYS - _EDGE_KEYS


class Secret:
    """A string that does not show itself: ``repr`` and ``str`` give ``***``.

    Call :meth:`reveal` where the value is really needed (an ``Authorization`` header).
    """

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return f"Secret({_MASK!r})"

    def __str__(self) -> str:
        return _MASK

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@overload
def mask_url(url: str) -> str: ...
@overload
def mask_url(url: None) -> None: ...
def mask_url(url: str | None) -> str | None:
    """``url`` with its password (and password-like query values) replaced by ``***``.

    ``postgresql://u:pw@h/db`` → ``postgresql://u:***@h/db``. A URL that cannot be parsed is
    masked entirely rather than risk showing a secret.
    """
    if url is None:
        return None
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return _MASK
    if not parts.netloc and "@" in url:
        return _MASK  # "user:pw@host" without a scheme: cannot tell where the password ends
    netloc = parts.netloc
    if password is not None:
        userinfo, _, hostport = netloc.rpartition("@")
        user = userinfo.partition(":")[0]
        netloc = f"{user}:{_MASK}@{hostport}"
    query = _SECRET_QUERY.sub(lambda m: m.group(1) + _MASK, parts.query)
    return urlunsplit(SplitResult(parts.scheme, netloc, parts.path, query, parts.fragment))


def parse_listen(value: str) -> tuple[str, int]:
    """``"host:port"`` → ``(host, port)``; IPv6 hosts in brackets (``[::1]:8400``).

    Port 0 asks the OS for a free port. Raises :class:`ValidationError`.
    """
    hint = 'Write it as "host:port", e.g. "127.0.0.1:8400", "0.0.0.0:8400" or "[::1]:8400".'
    host, sep, port_text = value.rpartition(":")
    if not sep or not host or not (port_text.isascii() and port_text.isdigit()):
        raise ValidationError(f"expected host:port, got {value!r}", hint=hint)
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        if not host:
            raise ValidationError(f"expected host:port, got {value!r}", hint=hint)
    elif ":" in host:
        raise ValidationError(f"an IPv6 host must be in brackets, got {value!r}", hint=hint)
    port = int(port_text)
    if port > 65_535:
        raise ValidationError(f"port {port} is out of range 0..65535", hint=hint)
    return host, port


@functools.cache
def _default_policies() -> Mapping[Tier, TierPolicy]:
    return load_policies()


def _default_policies_copy() -> Mapping[Tier, TierPolicy]:
    return dict(_default_policies())


def _redacted_repr(name: str, fields: Mapping[str, object]) -> str:
    return f"{name}({', '.join(f'{k}={v!r}' for k, v in fields.items())})"


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True, repr=False)
class EdgeConfig:
    """The configuration of one edge node (``edge.toml``)."""

    #: Unique within the region; issued with the node's token by ``syncengine hub add-node``.
    node_id: str
    #: The node's home region code; it may only subscribe to cells of this region.
    region: str
    #: The SQLite file holding records and outbox.
    db: Path
    #: The region hub to sync with; ``None`` means the node runs offline only, for now.
    hub_url: str | None = None
    #: A file holding the node's token, read on each use of :attr:`token`.
    token_file: Path | None = None
    #: The token written inline in the config or the environment (prefer ``token_file``).
    inline_token: Secret | None = None
    #: Cell prefixes this node pulls, all in :attr:`region`.
    subscriptions: tuple[str, ...] = ()
    #: Offline tier rules: apply until the hub's rules arrive with the first sync.
    tier_rules: TierRules = dataclasses.field(default_factory=TierRules)
    #: Merge resolver per collection (``lww`` when absent). The hub's are authoritative.
    resolvers: Mapping[str, str] = dataclasses.field(default_factory=dict)
    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES
    busy_timeout_ms: int = DEFAULT_BUSY_TIMEOUT_MS
    #: ``host:port`` for the Prometheus endpoint; ``None`` serves no metrics.
    metrics_listen: str | None = None
    #: The tier policies, with this deployment's ``[tier_policies.<tier>]`` overrides applied.
    tier_policies: Mapping[Tier, TierPolicy] = dataclasses.field(
        default_factory=_default_policies_copy
    )
    #: Where this config was read from, for messages.
    source: str | None = dataclasses.field(default=None, compare=False)

    @property
    def token(self) -> str | None:
        """The node's token: inline, else read now from :attr:`token_file`, else ``None``.

        The file is read on each access, so a rotated token is picked up; read it once per
        connection, not per request. Raises :class:`ConfigError` when the file cannot be read
        or is empty.
        """
        if self.inline_token is not None:
            return self.inline_token.reveal()
        if self.token_file is None:
            return None
        try:
            text = self.token_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(
                f"token_file {self.token_file}: cannot read it: {exc}",
                hint="Check the path and that this user may read the file.",
                detail={"key": "token_file", "file": str(self.token_file)},
            ) from None
        if not text:
            raise ConfigError(
                f"token_file {self.token_file} is empty",
                hint="Write the token printed by `syncengine hub add-node` into it.",
                detail={"key": "token_file", "file": str(self.token_file)},
            )
        return text

    def redacted(self) -> dict[str, Any]:
        """The config as plain data fit to print or log: the token shows as ``***``."""
        return {
            "node_id": self.node_id,
            "region": self.region,
            "db": str(self.db),
            "hub_url": mask_url(self.hub_url),
            "token": _MASK if self.inline_token is not None else None,
            "token_file": str(self.token_file) if self.token_file is not None else None,
            "subscriptions": list(self.subscriptions),
            "tier_rules": self.tier_rules.to_wire(),
            "resolvers": dict(self.resolvers),
            "max_record_bytes": self.max_record_bytes,
            "busy_timeout_ms": self.busy_timeout_ms,
            "metrics_listen": self.metrics_listen,
            "source": self.source,
        }

    def __repr__(self) -> str:
        return _redacted_repr("EdgeConfig", self.redacted())

    @classmethod
    def from_mapping(
        cls,
        data: Mapping[str, Any],
        *,
        source: str = "<edge config>",
        base_dir: Path | None = None,
        env: Mapping[str, str] | None = None,
    ) -> EdgeConfig:
        """Validate an edge config given as a mapping (what :func:`load_edge_config` parses).

        ``base_dir`` anchors relative paths (default: the working directory). ``env`` is
        applied as described in the module docstring; the default here is *no* environment,
        so programs that build configs (the demo) are not steered by stray variables.
        Raises :class:`ConfigError` naming ``source`` (or the variable) and the key.
        """
        table, from_env = _with_environment(data, env or {}, source, _EDGE_SCALARS, {})
        # A token given in the environment replaces the file's token_file, and vice versa.
        for key, other in (("token", "token_file"), ("token_file", "token")):
            if key in from_env and other not in from_env:
                table = table.without(other)
        table.reject_unknown(_EDGE_KEYS)

        node_id = table.get_str("node_id")
        if not _NODE_ID.match(node_id):
            raise table.error(
                "node_id",
                f"invalid node id {node_id!r}",
                hint="Use 1-64 characters of [a-z0-9_.-], starting with a letter or digit.",
            )
        region = _region(table)
        if "token" in table and "token_file" in table:
            raise table.error(
                "token", "give either token or token_file, not both", hint="Prefer token_file."
            )
        token = table.get_str("token", None)
        metrics_listen = table.get_str("metrics_listen", None)
        if metrics_listen is not None:
            _listen(table, "metrics_listen")
        policy_overrides = table.get_table("tier_policies", {})
        return cls(
            node_id=node_id,
            region=region,
            db=_path(table, "db", base_dir, from_env),
            hub_url=_http_url(table, "hub_url"),
            token_file=_optional_path(table, "token_file", base_dir, from_env),
            inline_token=Secret(token) if token is not None else None,
            subscriptions=_subscriptions(table, region),
            resolvers=_resolvers(table),
            tier_rules=TierRules.from_config(
                table.get_list("tier_rules", []), source=table.source, region=region
            ),
            max_record_bytes=table.get_int("max_record_bytes", DEFAULT_MAX_RECORD_BYTES, minimum=1),
            busy_timeout_ms=table.get_int("busy_timeout_ms", DEFAULT_BUSY_TIMEOUT_MS, minimum=0),
            metrics_listen=metrics_listen,
            tier_policies=_policies(table, policy_overrides),
            source=source,
        )


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True, repr=False)
class HubConfig:
    """The configuration of one region hub process (``hub.toml``)."""

    #: The region this hub serves; it stores only cells homed here.
    region: str
    #: ``host:port`` of the HTTP API.
    listen: str = DEFAULT_LISTEN
    #: The region's PostgreSQL, always ``postgresql://``; holds a password: print it masked.
    database_url: str
    #: The Redis cache; ``None`` runs without cache (slower, never wrong).
    redis_url: str | None = None
    #: Authoritative prefix → tier rules, sent to the edges.
    tier_rules: TierRules = dataclasses.field(default_factory=TierRules)
    #: Merge resolver per collection (``lww`` when absent). The hub's are authoritative.
    resolvers: Mapping[str, str] = dataclasses.field(default_factory=dict)
    max_clock_drift_s: int = DEFAULT_MAX_CLOCK_DRIFT_S
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_batch_changes: int = DEFAULT_MAX_BATCH_CHANGES
    #: The largest record a put may carry (msgpack bytes of its fields), as on the edges;
    #: a larger one is refused with ``record_too_large`` and dead-lettered by its edge.
    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES
    #: Feed entries older than this many days, once every node still syncing has pulled
    #: them, are dropped; a node away longer re-bootstraps from a snapshot.
    feed_retention_days: int = DEFAULT_FEED_RETENTION_DAYS
    #: Seconds a hub process trusts a token it looked up (0: every request looks it up in
    #: PostgreSQL). A revoked token or narrowed grants take this long to apply to each
    #: process; in exchange most requests of a large fleet skip a database round trip.
    token_cache_s: int = 0
    #: Pushes with a body of ``LARGE_PUSH_BYTES`` or more that one hub process decodes and
    #: applies at once; more wait their turn (smaller pushes never wait). Each holds a
    #: decoded batch (up to ``max_batch_changes`` changes, a few KB each), so this bounds
    #: the memory of many edges coming back with backlogs at once.
    max_large_pushes: int = DEFAULT_MAX_LARGE_PUSHES
    tier_policies: Mapping[Tier, TierPolicy] = dataclasses.field(
        default_factory=_default_policies_copy
    )
    source: str | None = dataclasses.field(default=None, compare=False)

    @property
    def listen_host(self) -> str:
        return parse_listen(self.listen)[0]

    @property
    def listen_port(self) -> int:
        return parse_listen(self.listen)[1]

    def redacted(self) -> dict[str, Any]:
        """The config as plain data fit to print or log: passwords show as ``***``."""
        return {
            "region": self.region,
            "listen": self.listen,
            "database_url": mask_url(self.database_url),
            "redis_url": mask_url(self.redis_url),
            "tier_rules": self.tier_rules.to_wire(),
            "resolvers": dict(self.resolvers),
            "max_clock_drift_s": self.max_clock_drift_s,
            "max_body_bytes": self.max_body_bytes,
            "max_batch_changes": self.max_batch_changes,
            "max_record_bytes": self.max_record_bytes,
            "feed_retention_days": self.feed_retention_days,
            "token_cache_s": self.token_cache_s,
            "max_large_pushes": self.max_large_pushes,
            "source": self.source,
        }

    def __repr__(self) -> str:
        return _redacted_repr("HubConfig", self.redacted())

    @classmethod
    def from_mapping(
        cls,
        data: Mapping[str, Any],
        *,
        source: str = "<hub config>",
        env: Mapping[str, str] | None = None,
    ) -> HubConfig:
        """Validate a hub config given as a mapping (what :func:`load_hub_config` parses).

        ``env`` is applied as described in the module docstring (default: none). Raises
        :class:`ConfigError` naming ``source`` (or the variable) and the key.
        """
        table, _ = _with_environment(data, env or {}, source, _HUB_SCALARS, _HUB_ALIASES)
        table.reject_unknown(_HUB_KEYS)
        region = _region(table)
        listen = table.get_str("listen", DEFAULT_LISTEN)
        if "listen" in table:
            _listen(table, "listen")
        policy_overrides = table.get_table("tier_policies", {})
        return cls(
            region=region,
            listen=listen,
            database_url=_database_url(table),
            redis_url=_redis_url(table),
            resolvers=_resolvers(table),
            tier_rules=TierRules.from_config(
                table.get_list("tier_rules", []), source=table.source, region=region
            ),
            max_clock_drift_s=table.get_int(
                "max_clock_drift_s", DEFAULT_MAX_CLOCK_DRIFT_S, minimum=1
            ),
            max_body_bytes=table.get_int("max_body_bytes", DEFAULT_MAX_BODY_BYTES, minimum=1024),
            max_batch_changes=table.get_int(
                "max_batch_changes", DEFAULT_MAX_BATCH_CHANGES, minimum=1
            ),
            max_record_bytes=table.get_int("max_record_bytes", DEFAULT_MAX_RECORD_BYTES, minimum=1),
            feed_retention_days=table.get_int(
                "feed_retention_days", DEFAULT_FEED_RETENTION_DAYS, minimum=1
            ),
            token_cache_s=table.get_int("token_cache_s", 0, minimum=0, maximum=MAX_TOKEN_CACHE_S),
            max_large_pushes=table.get_int(
                "max_large_pushes", DEFAULT_MAX_LARGE_PUSHES, minimum=1, maximum=1024
            ),
            tier_policies=_policies(table, policy_overrides),
            source=source,
        )


# -- loading -----------------------------------------------------------------------------------


def load_edge_config(path: Path | str, *, env: Mapping[str, str] | None = None) -> EdgeConfig:
    """Load ``edge.toml``; ``env`` defaults to ``os.environ``. Raises :class:`ConfigError`."""
    path = Path(path)
    data = _read(path, "deploy/edge.toml.example")
    return EdgeConfig.from_mapping(
        data, source=str(path), base_dir=path.absolute().parent, env=_environment(env)
    )


def load_hub_config(path: Path | str, *, env: Mapping[str, str] | None = None) -> HubConfig:
    """Load ``hub.toml``; ``env`` defaults to ``os.environ``. Raises :class:`ConfigError`."""
    path = Path(path)
    data = _read(path, "deploy/hub.toml.example")
    return HubConfig.from_mapping(data, source=str(path), env=_environment(env))


def load_config(
    path: Path | str, *, env: Mapping[str, str] | None = None
) -> EdgeConfig | HubConfig:
    """Load an edge or a hub config, telling them apart by the file's keys.

    A hub config has hub-only keys (``listen``, ``database_url``, ``redis_url`` ...), an edge
    config edge-only keys (``node_id``, ``db``, ``subscriptions`` ...). A file with both or
    neither raises :class:`ConfigError`, as does anything :func:`load_edge_config` or
    :func:`load_hub_config` would refuse.
    """
    path = Path(path)
    data = _read(path, "deploy/edge.toml.example or deploy/hub.toml.example")
    hub_keys = sorted(_HUB_ONLY & data.keys())
    edge_keys = sorted(_EDGE_ONLY & data.keys())
    if hub_keys and edge_keys:
        raise ConfigError(
            f"{path}: mixes hub keys ({', '.join(hub_keys)}) and edge keys "
            f"({', '.join(edge_keys)})",
            hint="Keep the hub's and the edge's settings in separate files.",
            detail={"source": str(path), "key": edge_keys[0]},
        )
    if hub_keys:
        return HubConfig.from_mapping(data, source=str(path), env=_environment(env))
    if edge_keys:
        return EdgeConfig.from_mapping(
            data, source=str(path), base_dir=path.absolute().parent, env=_environment(env)
        )
    raise ConfigError(
        f"{path}: cannot tell an edge config from a hub config",
        hint="An edge config has node_id and db; a hub config has listen and database_url.",
        detail={"source": str(path)},
    )


def _read(path: Path, example: str) -> dict[str, Any]:
    if not path.exists():
        raise ConfigError(
            f"config file {path} not found; create it (see {example})",
            hint="Or pass the right path with --config.",
            detail={"file": str(path)},
        )
    return resources.read_toml(path, label=str(path))


# -- the environment: read here and nowhere else -----------------------------------------------


def _environment(env: Mapping[str, str] | None) -> Mapping[str, str]:
    return os.environ if env is None else env


def _environment_overrides(
    env: Mapping[str, str], scalars: Mapping[str, type], aliases: Mapping[str, str]
) -> dict[str, tuple[str, str]]:
    """``key -> (variable, raw value)`` for every non-empty variable overriding a scalar key.

    Aliases come first so that the ``SYNCENGINE_`` name, being more specific, wins.
    """
    found: dict[str, tuple[str, str]] = {}
    candidates = list(aliases.items())
    candidates += [(f"{ENV_PREFIX}{key.upper()}", key) for key in scalars]
    for var, key in candidates:
        value = env.get(var, "")
        if value.strip():
            found[key] = (var, value.strip())
    return found


def _with_environment(
    data: Mapping[str, Any],
    env: Mapping[str, str],
    source: str,
    scalars: Mapping[str, type],
    aliases: Mapping[str, str],
) -> tuple[TomlTable, frozenset[str]]:
    """The file's table with environment values laid over it, and the keys they replaced."""
    merged = dict(data)
    origins: dict[str, tuple[str, str]] = {}
    for key, (var, raw) in _environment_overrides(env, scalars, aliases).items():
        label = f"environment variable {var}"
        if scalars[key] is int:
            try:
                merged[key] = int(raw, 10)
            except ValueError:
                raise ConfigError(
                    f"{label}: key {key!r}: expected an integer, got {raw!r}",
                    detail={"source": label, "key": key},
                ) from None
        else:
            merged[key] = raw
        origins[key] = (label, key)
    return TomlTable(merged, source=source, origins=origins), frozenset(origins)


# -- validation of single keys -----------------------------------------------------------------


def _resolvers(table: TomlTable) -> dict[str, str]:
    """``resolvers = { stock = "counter", prices = "hub-wins" }``, validated."""
    raw = table.get_table("resolvers", {})
    out: dict[str, str] = {}
    for collection in raw.as_dict():
        try:
            validate_collection(collection)
        except ValidationError as exc:
            raise table.error("resolvers", exc.message) from None
        resolver = raw.get_str(collection)
        if resolver not in RESOLVERS:
            raise raw.error(
                collection,
                f"unknown resolver {resolver!r}; use one of {', '.join(sorted(RESOLVERS))}",
            )
        out[collection] = resolver
    return out


def _region(table: TomlTable) -> str:
    region = table.get_str("region")
    if region not in REGION_CODES:
        raise table.error(
            "region",
            f"unknown region {region!r}",
            hint=f"Use one of {', '.join(sorted(REGION_CODES))}.",
        )
    return region


def _resolve(value: str, base_dir: Path | None, from_env: bool) -> Path:
    path = Path(value).expanduser()
    if path.is_absolute():
        return path
    anchor = Path.cwd() if from_env or base_dir is None else base_dir
    return anchor / path


def _path(table: TomlTable, key: str, base_dir: Path | None, from_env: frozenset[str]) -> Path:
    return _resolve(table.get_str(key), base_dir, key in from_env)


def _optional_path(
    table: TomlTable, key: str, base_dir: Path | None, from_env: frozenset[str]
) -> Path | None:
    value = table.get_str(key, None)
    return None if value is None else _resolve(value, base_dir, key in from_env)


def _http_url(table: TomlTable, key: str) -> str | None:
    url = table.get_str(key, None)
    if url is None:
        return None
    try:
        parts = urlsplit(url)
        ok = parts.scheme in ("http", "https") and bool(parts.hostname)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        ok = False
    if not ok:
        raise table.error(
            key,
            f"expected an http(s) URL with a host, got {mask_url(url)!r}",
            hint='e.g. "http://127.0.0.1:8400" or "https://hub.west.example.org".',
        )
    return url


def _listen(table: TomlTable, key: str) -> None:
    try:
        parse_listen(table.get_str(key))
    except ValidationError as exc:
        raise table.error(key, exc.message, hint=exc.hint) from None


def _database_url(table: TomlTable) -> str:
    url = table.get_str("database_url")
    if url.startswith("postgres://"):
        # libpq and asyncpg both take postgresql://; many hosts hand out postgres://.
        url = "postgresql://" + url.removeprefix("postgres://")
    try:
        scheme = urlsplit(url).scheme
    except ValueError:
        scheme = ""
    if scheme != "postgresql":
        raise table.error(
            "database_url",
            f"expected a postgresql:// URL, got {mask_url(url)!r}",
            hint='e.g. "postgresql://syncengine@127.0.0.1:5432/syncengine_west".',
        )
    return url


def _redis_url(table: TomlTable) -> str | None:
    url = table.get_str("redis_url", None)
    if url is None:
        return None
    try:
        scheme = urlsplit(url).scheme
    except ValueError:
        scheme = ""
    if scheme not in ("redis", "rediss", "unix"):
        raise table.error(
            "redis_url",
            f"expected a redis://, rediss:// or unix:// URL, got {mask_url(url)!r}",
            hint='e.g. "redis://127.0.0.1:6379/0".',
        )
    return url


def _subscriptions(table: TomlTable, region: str) -> tuple[str, ...]:
    out: list[str] = []
    for i, item in enumerate(table.get_list("subscriptions", [])):
        try:
            prefix = parse_prefix(item)
        except ValidationError as exc:
            raise table.error("subscriptions", f"item {i}: {exc.message}", hint=exc.hint) from None
        if home_region(prefix) != region:
            raise table.error(
                "subscriptions",
                f"{prefix!r} is not in the node's region {region!r}",
                hint=f"A node subscribes only to cells of its region: {region}/...",
            )
        if prefix not in out:
            out.append(prefix)
    return tuple(out)


def _policies(table: TomlTable, overrides: TomlTable) -> Mapping[Tier, TierPolicy]:
    raw = overrides.as_dict()
    if not raw:
        return _default_policies_copy()
    return load_policies(
        overrides=raw, overrides_source=table.source, overrides_key="tier_policies"
    )
