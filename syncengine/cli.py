"""The ``syncengine`` command line: the operator's and the shell's way into edges and hubs.

Commands (their names and options are a contract with users, see DESIGN.md)::

    syncengine [--version] [-v/--verbose] COMMAND
    syncengine edge put    --config edge.toml CELL COLLECTION KEY JSON|-
    syncengine edge get    --config edge.toml CELL COLLECTION KEY
    syncengine edge delete --config edge.toml CELL COLLECTION KEY
    syncengine migrate     --config edge.toml|hub.toml [--status]
    syncengine hub run          --config hub.toml [--log-format text|json]
    syncengine hub add-node     NODE_ID --grant PREFIX [--grant PREFIX ...] --config hub.toml
    syncengine hub rotate-token NODE_ID --config hub.toml
    syncengine hub revoke       NODE_ID --config hub.toml
    syncengine hub nodes        --config hub.toml [--json]
    syncengine status           --config edge.toml|hub.toml [--json]

``--config`` may come from ``SYNCENGINE_CONFIG`` instead. Exit codes: 0 success; 1 a
:class:`~syncengine.errors.SyncError` (printed as ``error:`` and ``hint:`` lines on stderr), a
missing record, or a ``status`` warning; 2 a usage error (click's) or a ``status`` that is
critical (a tier past its promise, the hub's database unreachable).

This module is the only place that prints: results go to stdout (rich tables for people, JSON
for scripts), diagnostics to stderr through logging. Tokens and passwords are printed only by
``hub add-node`` and ``hub rotate-token``, which exist to show a token once; configs are
printed or logged only through their ``redacted()`` form.

Further ``edge`` subcommands (``sync``, ``run``) and ``demo`` hang off :data:`edge` and
:data:`cli` with the same helpers: :func:`config_option`, :func:`load_edge`, :func:`run`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import shutil
import signal
import sqlite3
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from importlib import metadata
from pathlib import Path
from typing import Any, Final, TypeVar

import aiosqlite
import asyncpg
import click
import redis.asyncio as aioredis
from click.decorators import FC
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from rich.console import Console
from rich.markup import escape
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from syncengine.cells import parse_prefix
from syncengine.clock import hlc_millis
from syncengine.config import EdgeConfig, HubConfig, load_config, mask_url
from syncengine.demo import run_demo
from syncengine.edge import sqlite as edge_sqlite
from syncengine.edge.backup import backup_file, restore_backup
from syncengine.edge.bundles import export_outbox, import_reply
from syncengine.edge.daemon import EdgeDaemon, connect_link, open_store
from syncengine.edge.recover import RecoveryReport, recover_store
from syncengine.edge.store import StepRecord
from syncengine.edge.sync import Syncer, SyncReport
from syncengine.errors import ConfigError, MigrationError, StorageError, SyncError, ValidationError
from syncengine.hub import db as hub_db
from syncengine.hub import nodes as hub_nodes
from syncengine.hub.app import run_hub
from syncengine.hub.bundles import export_reply, import_outbox
from syncengine.hub.retention import FeedReport, maintain_feed
from syncengine.hub.verify import Check as HubCheck
from syncengine.hub.verify import verify as verify_hub
from syncengine.migrations import (
    MigrationStatus,
    migrate_postgres,
    migrate_sqlite,
    status_postgres,
    status_sqlite,
)
from syncengine.regions import load_regions
from syncengine.resources import data_dir
from syncengine.service import LogFormat, log_formatter, notify, tune_gc
from syncengine.tiers import Tier

__all__ = ["STATUS_SCHEMA", "cli", "config_option", "edge", "hub", "main"]

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Version of the ``status --json`` (and ``hub nodes --json``) document. Bump it when a field
#: changes meaning or disappears; adding fields keeps the version.
STATUS_SCHEMA: Final = 1
#: How long `status` waits for the hub before reporting it unreachable.
_PROBE_TIMEOUT_S: Final = 3.0
#: Exit codes of ``status``.
EXIT_OK: Final = 0
EXIT_WARNING: Final = 1
EXIT_CRITICAL: Final = 2
#: How many dead letters ``status`` shows (the newest); the count covers all of them.
STATUS_DEAD_LETTERS: Final = 5
#: Free space under the edge database below which ``status`` warns, and below which it is
#: critical (a few group commits from refusing writes with ``disk_full``).
DISK_WARNING_BYTES: Final = 128 << 20
DISK_CRITICAL_BYTES: Final = 16 << 20
#: The hub's status opens a small pool: the CLI runs a handful of queries.
_POOL_MIN: Final = 1
_POOL_MAX: Final = 2
_PG_CONNECT_TIMEOUT_S: Final = 5.0
_REDIS_TIMEOUT_S: Final = 1.0
_STATES: Final = ("ok", "warning", "critical")
_STATE_STYLE: Final = {"ok": "green", "warning": "yellow", "critical": "bold red"}
_EXIT_BY_STATE: Final = {"ok": EXIT_OK, "warning": EXIT_WARNING, "critical": EXIT_CRITICAL}


# =============================================================================== output layer


def _console() -> Console:
    # Made per use: under tests sys.stdout is swapped between invocations. soft_wrap: a long
    # path or URL stays on one line (copy-pasteable); tables still fit the width.
    return Console(highlight=False, soft_wrap=True)


def _echo_json(data: Mapping[str, Any]) -> None:
    click.echo(json.dumps(data, indent=2, ensure_ascii=False))


def _report(message: str, hint: str | None = None) -> None:
    click.echo(f"error: {message}", err=True)
    if hint:
        click.echo(f"hint: {hint}", err=True)


def _styled(state: str, text: str | None = None) -> str:
    """``text`` (default: the state's name) in the colour of ``state`` (rich markup)."""
    return f"[{_STATE_STYLE[state]}]{state if text is None else text}[/]"


def _duration(seconds: float | None) -> str:
    """``75`` → ``1m 15s``, ``86400`` → ``1d``: two units at most, for tables."""
    if seconds is None:
        return "-"
    s = int(seconds)
    for unit, size, sub, sub_size in (
        ("d", 86_400, "h", 3_600),
        ("h", 3_600, "m", 60),
        ("m", 60, "s", 1),
    ):
        if s >= size:
            rest = (s % size) // sub_size
            return f"{s // size}{unit} {rest}{sub}" if rest else f"{s // size}{unit}"
    return f"{s}s"


def _size(n: int) -> str:
    """``1536`` → ``1.5 KiB``."""
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    value, i = float(n), 0
    while value >= 1024 and i < len(units) - 1:
        value /= 1024
        i += 1
    return f"{n} B" if i == 0 else f"{value:.1f} {units[i]}"


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="seconds")


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# ==================================================================================== logging


class _CliHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The stderr handler this module installs, told apart from anyone else's."""


def _configure_logging(
    ctx: click.Context,
    *,
    base: int = logging.WARNING,
    fmt: LogFormat = "text",
    tracebacks: bool = False,
) -> None:
    """Log to stderr at ``base`` (each ``-v`` one level lower), until the command ends.

    The handler sits on the root logger so that library warnings (asyncpg, aiohttp) show too;
    it is removed and the level restored when the command's context closes, so in-process
    callers (tests, the demo) are left as they were.
    """
    verbosity = ctx.find_root().params.get("verbose") or 0
    level = max(logging.DEBUG, base - 10 * verbosity)
    handler = _CliHandler(sys.stderr)
    handler.setFormatter(log_formatter(fmt, tracebacks=tracebacks or level <= logging.INFO))
    root = logging.getLogger()
    previous = root.level
    for old in [h for h in root.handlers if isinstance(h, _CliHandler)]:
        root.removeHandler(old)  # a subcommand (hub run) reconfigures what the group set
    root.addHandler(handler)
    root.setLevel(level)

    def restore() -> None:
        root.removeHandler(handler)
        root.setLevel(previous)

    ctx.call_on_close(restore)


# ============================================================================= shared helpers


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run one command's coroutine on a fresh event loop."""
    return asyncio.run(coro)


def _tier_option(help_text: str) -> Callable[[FC], FC]:
    """``--tier T`` (repeatable) into the ``tiers`` parameter."""
    return click.option(
        "--tier",
        "tiers",
        multiple=True,
        type=click.Choice([t.value for t in Tier]),
        help=help_text,
    )


def config_option(help_text: str = "The edge.toml or hub.toml file.") -> Callable[[FC], FC]:
    """``--config FILE``, required, or ``SYNCENGINE_CONFIG`` from the environment."""
    return click.option(
        "--config",
        "config_path",
        type=click.Path(dir_okay=False, path_type=Path),
        envvar="SYNCENGINE_CONFIG",
        show_envvar=True,
        required=True,
        metavar="FILE",
        help=help_text,
    )


def _load(path: Path) -> EdgeConfig | HubConfig:
    config = load_config(path)
    log.debug("config %s: %s", path, json.dumps(config.redacted(), default=str))
    return config


def load_edge(path: Path, command: str) -> EdgeConfig:
    """The edge config at ``path``; a hub config is refused naming ``command``."""
    config = _load(path)
    if not isinstance(config, EdgeConfig):
        raise ConfigError(
            f"{path} is a hub config; `syncengine {command}` needs an edge config",
            hint="Pass the node's edge.toml with --config (or SYNCENGINE_CONFIG).",
            detail={"file": str(path)},
        )
    return config


def load_hub(path: Path, command: str) -> HubConfig:
    """The hub config at ``path``; an edge config is refused naming ``command``."""
    config = _load(path)
    if not isinstance(config, HubConfig):
        raise ConfigError(
            f"{path} is an edge config; `syncengine {command}` needs a hub config",
            hint="Pass the region hub's hub.toml with --config (or SYNCENGINE_CONFIG).",
            detail={"file": str(path)},
        )
    return config


def _require_store_file(config: EdgeConfig) -> None:
    """Commands that only look must not create a database in the wrong place."""
    if not config.db.exists():
        raise StorageError(
            f"edge database {config.db} does not exist yet",
            hint="It is created by the first `syncengine edge put` or by "
            f"`syncengine migrate --config {config.source or 'edge.toml'}`; check `db`.",
            code="no_store",
            detail={"path": str(config.db)},
        )


@contextlib.asynccontextmanager
async def _hub_pool(config: HubConfig) -> AsyncIterator[asyncpg.Pool]:
    """A small pool on the hub's database, which must be migrated already."""
    pool = await hub_db.connect_pool(
        config.database_url, min_size=_POOL_MIN, max_size=_POOL_MAX, migrate=False
    )
    try:
        async with hub_db.translated("schema check"):
            migrated = await pool.fetchval("SELECT to_regclass('nodes') IS NOT NULL")
        if not migrated:
            raise MigrationError(
                f"the hub database {mask_url(config.database_url)} has no syncengine schema",
                hint=f"Run `syncengine migrate --config {config.source or 'hub.toml'}` first.",
                code="not_migrated",
            )
        yield pool
    finally:
        await pool.close()


# ======================================================================== the top-level group


def _version() -> str:
    try:
        return metadata.version("syncengine")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


class _SyncErrorsToExit(click.Group):
    """Turns every :class:`SyncError` into ``error:``/``hint:`` on stderr and exit code 1.

    Only the top-level group catches, so the subcommands of every group are covered.
    """

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except SyncError as exc:
            _report(exc.message, exc.hint)
            raise click.exceptions.Exit(1) from None


@click.group(cls=_SyncErrorsToExit, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(_version(), "--version", prog_name="syncengine")
@click.option("-v", "--verbose", count=True, help="Log more to stderr (-v info, -vv debug).")
@click.pass_context
def cli(ctx: click.Context, verbose: int) -> None:
    """Offline-first regional sync engine: SQLite edges, PostgreSQL + Redis region hubs."""
    _configure_logging(ctx)


# ============================================================================= edge commands


@cli.group()
def edge() -> None:
    """Local reads and writes on an edge node; they work offline."""


def _parse_fields(text: str) -> dict[str, Any]:
    """The JSON object of fields given on the command line (or ``-``: stdin)."""
    source = "stdin" if text == "-" else "the JSON argument"
    if text == "-":
        text = sys.stdin.read()
    hint = """Pass a JSON object of fields, e.g. '{"temp_c": 38.5, "ward": "B"}'."""

    def no_constant(name: str) -> Any:
        raise ValueError(f"{name} is not valid JSON")

    try:
        value = json.loads(text, parse_constant=no_constant)
    except ValueError as exc:
        raise ValidationError(
            f"{source} is not valid JSON: {exc}", hint=hint, code="invalid_json"
        ) from None
    if not isinstance(value, dict):
        raise ValidationError(
            f"{source} must be a JSON object of fields, got {type(value).__name__}",
            hint=hint,
            code="invalid_json",
        )
    return value


@edge.command("put")
@config_option("The node's edge.toml.")
@click.argument("cell")
@click.argument("collection")
@click.argument("key")
@click.argument("json_text", metavar="JSON")
def edge_put(config_path: Path, cell: str, collection: str, key: str, json_text: str) -> None:
    """Merge the fields of JSON (an object; `-` reads stdin) into a record; print its hlc.

    The write is on disk when the command returns and is queued for the hub.
    """
    config = load_edge(config_path, "edge put")
    fields = _parse_fields(json_text)  # before opening: bad input writes nothing

    async def put() -> int:
        async with open_store(config) as store:
            return await store.put(cell, collection, key, fields)

    click.echo(run(put()))


@edge.command("get")
@config_option("The node's edge.toml.")
@click.argument("cell")
@click.argument("collection")
@click.argument("key")
@click.pass_context
def edge_get(ctx: click.Context, config_path: Path, cell: str, collection: str, key: str) -> None:
    """Print a record's document as JSON; exit 1 when it does not exist.

    A record evicted locally (archive tiers) is fetched back from the hub; when the hub
    cannot be reached the command says so and exits 1.
    """
    config = load_edge(config_path, "edge get")
    _require_store_file(config)  # a mistyped `db` must not become a new, empty store

    async def get() -> dict[str, Any] | None:
        async with open_store(config) as store:
            if not await store.is_evicted(cell, collection, key):
                return await store.get(cell, collection, key)
            async with connect_link(config, load_regions()[config.region]) as link:
                syncer = Syncer(store, link, subscriptions=config.subscriptions)
                return await syncer.get(cell, collection, key)

    doc = run(get())
    if doc is None:
        _report(
            f"not found: {cell} {collection} {key}",
            "Check the cell, collection and key; a deleted record is not found either.",
        )
        ctx.exit(1)
    _echo_json(doc)


@edge.command("delete")
@config_option("The node's edge.toml.")
@click.argument("cell")
@click.argument("collection")
@click.argument("key")
def edge_delete(config_path: Path, cell: str, collection: str, key: str) -> None:
    """Delete a record (a tombstone, queued for the hub); print its hlc."""
    config = load_edge(config_path, "edge delete")

    async def delete() -> int:
        async with open_store(config) as store:
            return await store.delete(cell, collection, key)

    click.echo(run(delete()))


@edge.command("sync")
@config_option("The node's edge.toml.")
@click.option(
    "--now", is_flag=True, help="Sync off-peak tiers (standard, archive) outside their window."
)
@_tier_option("Only this tier (repeatable). Default: every tier.")
@click.option("--json", "as_json", is_flag=True, help="Print the round's report as JSON.")
def edge_sync(config_path: Path, now: bool, tiers: tuple[str, ...], as_json: bool) -> None:
    """One push and pull round with the hub, most important tier first, then exit.

    Tiers whose policy is off-peak only (standard and archive by default) are skipped
    outside the region's off-peak window unless --now is given. Exit 0 when the tiers
    handled are caught up, 1 with the reasons when the hub could not be reached or refused.
    """
    config = load_edge(config_path, "edge sync")
    wanted = [Tier(t) for t in tiers] or list(Tier.by_priority())
    region = load_regions()[config.region]
    moment = datetime.now(UTC)
    skipped = [
        t
        for t in wanted
        if config.tier_policies[t].offpeak_only and not now and not region.in_offpeak(moment)
    ]
    chosen = [t for t in wanted if t not in skipped]
    link = connect_link(config, region)  # raises before any work when no token is set

    async def one_round() -> SyncReport:
        async with open_store(config) as store, link:
            syncer = Syncer(store, link, subscriptions=config.subscriptions)
            return await syncer.sync_once(tiers=chosen)

    report = run(one_round()) if chosen else None
    if as_json:
        _echo_json(
            {
                "schema": 1,
                "kind": "sync",
                "caught_up": report.caught_up if report else True,
                "skipped_offpeak": [t.value for t in skipped],
                "pushed": {t.value: n for t, n in report.pushed.items()} if report else {},
                "pulled": {t.value: n for t, n in report.pulled.items()} if report else {},
                "dead_lettered": report.dead_lettered if report else 0,
                "errors": [
                    {
                        "step": e.step,
                        "tier": e.tier.value if e.tier else None,
                        "code": e.code,
                        "message": e.message,
                        "retryable": e.retryable,
                    }
                    for e in (report.errors if report else ())
                ],
                "bytes_sent": report.bytes_sent if report else 0,
                "bytes_received": report.bytes_received if report else 0,
            }
        )
    else:
        for t in skipped:
            click.echo(f"{t.value:>9}: skipped (outside the off-peak window; --now forces it)")
        if report is not None:
            for t in chosen:
                click.echo(
                    f"{t.value:>9}: pushed {report.pushed.get(t, 0)}, "
                    f"pulled {report.pulled.get(t, 0)}"
                )
            if report.dead_lettered:
                click.echo(
                    f"dead-lettered {report.dead_lettered} change(s): see `syncengine status`"
                )
            for e in report.errors:
                where = f"{e.step} {e.tier.value}" if e.tier else e.step
                _report(f"{where}: {e.message} ({e.code})")
    if report is not None and not report.caught_up:
        sys.exit(1)


async def _run_edge(config: EdgeConfig) -> None:
    """Run the daemon until SIGTERM or SIGINT (or until it fails, which is raised)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_signal(sig: signal.Signals) -> None:
        if not stop.is_set():
            log.info("received %s; stopping", sig.name)
        stop.set()

    handled = (signal.SIGTERM, signal.SIGINT)
    for sig in handled:
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        async with EdgeDaemon(config) as daemon:
            tune_gc()
            waiters = {
                asyncio.create_task(stop.wait(), name="stop-signal"),
                asyncio.create_task(daemon.wait(), name="daemon-failure"),
            }
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            for waiter in waiters:
                waiter.cancel()
            # A failure is raised by the daemon's close (leaving the block), not from here.
            await asyncio.gather(*waiters, return_exceptions=True)
    finally:
        for sig in handled:
            loop.remove_signal_handler(sig)


@edge.command("run")
@config_option("The node's edge.toml.")
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="stderr log lines as text or as one JSON object per line.",
)
@click.pass_context
def edge_run(ctx: click.Context, config_path: Path, log_format: LogFormat) -> None:
    """Run the edge daemon until SIGTERM/SIGINT (then exit 0).

    Pushes critical changes on every write (also writes of other processes on the same
    file) and pulls critical cells live; the other tiers follow their schedules, standard
    and archive inside the region's off-peak window. Bootstraps the subscriptions from the
    hub's snapshot first when the store never had them. With NOTIFY_SOCKET set (systemd
    Type=notify) it sends READY=1, WATCHDOG=1 (when WatchdogSec is set) and STOPPING=1.
    """
    _configure_logging(ctx, base=logging.INFO, fmt=log_format, tracebacks=True)
    config = load_edge(config_path, "edge run")
    log.info("starting edge daemon: %s", json.dumps(config.redacted(), default=str))
    try:
        run(_run_edge(config))
    except SyncError as exc:
        log.error("edge daemon stopped: %s (hint: %s)", exc.message, exc.hint)
        raise


@edge.command("bootstrap")
@config_option("The node's edge.toml.")
def edge_bootstrap(config_path: Path) -> None:
    """Fetch the subscribed cells from the hub's snapshot, with a progress bar.

    Resumable: run it again after an interruption and it goes on from the last page it
    saved. `edge run` does this by itself on a new store; this command does it in the
    foreground, e.g. while installing a machine on a good link.
    """
    config = load_edge(config_path, "edge bootstrap")
    link = connect_link(config, load_regions()[config.region])

    async def fetch() -> int:
        async with open_store(config) as store, link:
            syncer = Syncer(store, link, subscriptions=config.subscriptions)
            with _snapshot_progress() as progress:
                return await syncer.bootstrap(progress=progress)

    records = run(fetch())
    click.echo(f"bootstrap done: {records} records")


@contextlib.contextmanager
def _snapshot_progress() -> Iterator[Callable[[int, str], None]]:
    """A progress bar on stderr for a snapshot fetch; yields its ``progress`` callback."""
    columns = (
        TextColumn("{task.description}"),
        SpinnerColumn(),
        TextColumn("{task.completed:,} records"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=Console(stderr=True), transient=False) as bar:
        task = bar.add_task("bootstrap", total=None)

        def progress(records: int, prefix: str) -> None:
            bar.update(task, completed=records, description=f"bootstrap {prefix}")

        yield progress


@edge.command("recover")
@config_option("The node's edge.toml.")
def edge_recover(config_path: Path) -> None:
    """Rebuild a damaged edge store, keeping every change that can still be read.

    Salvages the readable changes of the damaged file's outbox, moves the file aside
    (`<db>.damaged-<time>`, never deleted), builds a new store from the hub's snapshot and
    queues again the salvaged changes the hub does not hold yet. Stop the edge daemon
    first. Needs the hub: without it nothing is touched.
    """
    config = load_edge(config_path, "edge recover")
    _require_store_file(config)
    link = connect_link(config, load_regions()[config.region])

    async def rebuild() -> RecoveryReport:
        async with link:
            with _snapshot_progress() as progress:
                return await recover_store(
                    config.db,
                    open_new=lambda: open_store(config),
                    link=link,
                    subscriptions=config.subscriptions,
                    progress=progress,
                )

    report = run(rebuild())
    click.echo(
        f"recovered {config.db}: {report.salvaged} changes salvaged "
        f"({report.held_by_hub} already at the hub, {report.requeued} queued again), "
        f"{report.unreadable} unreadable; {report.records} records from the hub. "
        f"The damaged file is {report.damaged_moved_to}."
    )


def _dead_letter_id(text: str) -> tuple[int, int]:
    """``tier:seq`` as `edge dead-letters` lists them."""
    tier, _, seq = text.partition(":")
    try:
        return Tier(tier).priority, int(seq)
    except ValueError:
        raise click.BadParameter(
            f"{text!r} is not TIER:SEQ (e.g. standard:42), as `edge dead-letters` lists them"
        ) from None


@edge.command("dead-letters")
@config_option("The node's edge.toml.")
@click.argument("ids", nargs=-1, metavar="[TIER:SEQ]...")
@click.option("--retry", is_flag=True, help="Queue the named dead letters (or --all) again.")
@click.option("--discard", is_flag=True, help="Delete the named dead letters (or --all).")
@click.option("--all", "every", is_flag=True, help="Act on every dead letter.")
@click.option("--yes", is_flag=True, help="Discard without asking for confirmation.")
@click.option("--json", "as_json", is_flag=True, help="List as JSON.")
def edge_dead_letters(
    config_path: Path,
    *,
    ids: tuple[str, ...],
    retry: bool,
    discard: bool,
    every: bool,
    yes: bool,
    as_json: bool,
) -> None:
    """List the changes the hub refused for good, retry them or discard them.

    Without --retry or --discard: list them, oldest first, with the hub's reason. Name
    them as TIER:SEQ, or use --all.

    \b
    --retry   queues them again (new seq, original stamp and fields): after fixing the
              cause, e.g. widening the node's grants or setting the clock.
    --discard deletes them; asks first unless --yes. Needs the hub: the local copies of
              the records they touched are taken anew from it, since they still show
              the discarded changes.
    """
    config = load_edge(config_path, "edge dead-letters")
    _require_store_file(config)
    if retry and discard:
        raise click.UsageError("use --retry or --discard, not both")
    if (retry or discard) and not (ids or every):
        raise click.UsageError("name the dead letters (TIER:SEQ...) or use --all")
    if (ids or every) and not (retry or discard):
        raise click.UsageError("say what to do with them: --retry or --discard")
    which = None if every else [_dead_letter_id(i) for i in ids]

    async def listing() -> list[Any]:
        async with open_store(config) as store:
            return await store.outbox.dead_letters()

    if not (retry or discard):
        dead = run(listing())
        rows = [
            {
                "id": f"{Tier.from_priority(d.lane)}:{d.seq}",
                "cell": d.cell,
                "collection": d.collection,
                "key": d.key,
                "code": d.code,
                "message": d.message,
                "fields": d.fields,
                "written_at": _iso(d.created_at_ms),
                "dead_at": _iso(d.dead_at_ms),
            }
            for d in dead
        ]
        if as_json:
            _echo_json({"schema": STATUS_SCHEMA, "kind": "dead_letters", "dead_letters": rows})
            return
        if not rows:
            click.echo("no dead letters")
            return
        table = Table(title=f"dead letters: {len(rows)}", title_justify="left")
        for column in ("id", "record", "code", "message", "dead at (UTC)"):
            table.add_column(column, no_wrap=column == "id")
        for r in rows:
            table.add_row(
                r["id"],
                escape(f"{r['cell']} {r['collection']} {r['key']}"),
                escape(r["code"]),
                escape(r["message"]),
                _short_time(r["dead_at"]),
            )
        _console().print(table)
        return
    if retry:

        async def requeue() -> int:
            async with open_store(config) as store:
                return await store.outbox.retry_dead_letters(which)

        click.echo(f"queued again: {run(requeue())} changes")
        return
    what = "every dead letter" if every else f"{len(ids)} dead letters"
    if not yes and not click.confirm(f"Discard {what}? The changes are lost for good."):
        raise click.Abort

    async def drop() -> int:
        async with (
            open_store(config) as store,
            connect_link(config, load_regions()[config.region]) as link,
        ):
            await link.config()  # reachable? Else nothing is discarded.
            touched = await store.outbox.discard_dead_letters(which)
            await Syncer(store, link, subscriptions=config.subscriptions).refresh(touched)
            return len(touched)

    click.echo(f"discarded; {run(drop())} records taken anew from the hub")


@edge.command("export-bundle")
@config_option("The node's edge.toml.")
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
@_tier_option("Only these tiers' changes (repeatable). Default: every tier.")
def edge_export_bundle(config_path: Path, path: Path, tiers: tuple[str, ...]) -> None:
    """Write the changes waiting for the hub (and the pull cursors) to a bundle file PATH,
    to carry to the hub by hand: `syncengine hub import-bundle PATH` there.

    Signed with a key derived from the node's token; compressed. The changes stay queued
    until the hub's reply bundle (or the network) says the hub holds them, so exporting
    again, or syncing over the network meanwhile, is harmless.
    """
    config = load_edge(config_path, "edge export-bundle")
    _require_store_file(config)
    token = _edge_token(config)

    async def export() -> dict[str, Any]:
        async with open_store(config) as store:
            chosen = [Tier(t) for t in tiers] if tiers else list(Tier)
            return await export_outbox(store, path, token=token, tiers=chosen)

    made = run(export())
    click.echo(
        f"bundle {path}: {made['changes']:,} changes in {made['batches']} batches, "
        f"{made['bytes']:,} bytes. Import it with `syncengine hub import-bundle` at the hub."
    )


@edge.command("import-bundle")
@config_option("The node's edge.toml.")
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
def edge_import_bundle(config_path: Path, path: Path) -> None:
    """Apply the hub's reply bundle PATH: what others wrote (like a pull) and what the hub
    holds of this node (those changes leave the queue). Importing it twice, or after the
    same changes came over the network, changes nothing."""
    config = load_edge(config_path, "edge import-bundle")
    _require_store_file(config)
    token = _edge_token(config)

    async def apply() -> dict[str, Any]:
        async with open_store(config) as store:
            return await import_reply(store, path, token=token)

    done = run(apply())
    click.echo(
        f"applied {done['applied']:,} changes from the hub (bundle of {done['created_at']}); "
        f"{done['acknowledged']:,} queued changes are now at the hub"
    )


def _edge_token(config: EdgeConfig) -> str:
    token = config.token
    if token is None:
        raise ConfigError(
            "no token configured for this node: bundles are signed with it",
            hint="Set token_file (or token) in edge.toml to the token `syncengine hub "
            "add-node` printed.",
            detail={"key": "token_file"},
        )
    return token


@edge.command("backup")
@config_option("The node's edge.toml.")
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
def edge_backup(config_path: Path, path: Path) -> None:
    """Write a consistent copy of the edge store to PATH while it stays in use.

    Safe while the daemon and applications write: the copy is one read snapshot (SQLite
    `VACUUM INTO`), verified before it is renamed into place. PATH must not exist.
    Put it back with `syncengine edge restore PATH`.
    """
    config = load_edge(config_path, "edge backup")
    _require_store_file(config)
    info = run(backup_file(config.db, path))
    click.echo(
        f"backup of {config.db} written to {info.path}: {info.size_bytes:,} bytes, "
        f"{info.records:,} records, {info.queued:,} changes not yet at the hub"
    )


@edge.command("restore")
@config_option("The node's edge.toml.")
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def edge_restore(config_path: Path, path: Path, yes: bool) -> None:
    """Put the backup PATH in place of the edge store. Stop the edge daemon first.

    The current file is moved aside (`<db>.replaced-<time>`), never deleted. On its next
    contact with the hub the restored store lines up with what the hub holds: changes the
    hub has are dropped from its queue, changes written since the restore are numbered
    after them, and what the replaced store wrote after the backup is pulled back. Nothing
    is lost and nothing counts twice.
    """
    config = load_edge(config_path, "edge restore")
    if not yes and not click.confirm(
        f"Replace {config.db} with the backup {path}? (the current file is moved aside)"
    ):
        raise click.Abort
    info, aside = run(restore_backup(path, config.db, node_id=config.node_id, region=config.region))
    where = f"; the replaced file is {aside}" if aside is not None else ""
    click.echo(
        f"restored {config.db} from {path}: {info.records:,} records, {info.queued:,} changes "
        f"not yet at the hub{where}. Start the daemon (or run `syncengine edge sync --now`) "
        "to line it up with the hub."
    )


# ================================================================================== migrate


Migrated = tuple[list[int], list[MigrationStatus]]


async def _migrate_edge(config: EdgeConfig, *, apply: bool) -> Migrated:
    """Apply (when ``apply``) the edge migrations; return what was applied and the states."""
    folder = data_dir("migrations") / "edge"
    if not apply and not config.db.exists():
        # Nothing applied yet: compare against an empty database without creating the file.
        async with aiosqlite.connect(":memory:") as memory:
            return [], await status_sqlite(memory, folder)
    conn = await edge_sqlite.connect(config.db, busy_timeout_ms=config.busy_timeout_ms)
    try:
        applied = await migrate_sqlite(conn, folder) if apply else []
        return applied, await status_sqlite(conn, folder)
    except sqlite3.Error as exc:
        raise edge_sqlite.translate(exc, config.db) from None
    finally:
        await conn.close()


async def _migrate_hub(config: HubConfig, *, apply: bool) -> Migrated:
    """Apply (when ``apply``) the hub migrations; return what was applied and the states."""
    folder = data_dir("migrations") / "hub"
    async with hub_db.translated("migrate"):
        conn = await asyncpg.connect(config.database_url, timeout=_PG_CONNECT_TIMEOUT_S)
        try:
            applied = await migrate_postgres(conn, folder) if apply else []
            return applied, await status_postgres(conn, folder)
        finally:
            await conn.close()


@cli.command()
@config_option()
@click.option("--status", "status_only", is_flag=True, help="List migrations; apply nothing.")
def migrate(config_path: Path, status_only: bool) -> None:
    """Apply pending schema migrations (or list them with --status).

    An edge config migrates its SQLite file (migrations/edge); a hub config its PostgreSQL
    database (migrations/hub). Safe to run again, and concurrently with running processes.
    """
    config = _load(config_path)
    if isinstance(config, EdgeConfig):
        target = str(config.db)
        applied, statuses = run(_migrate_edge(config, apply=not status_only))
    else:
        target = mask_url(config.database_url)
        applied, statuses = run(_migrate_hub(config, apply=not status_only))
    console = _console()
    if status_only:
        table = Table(title=escape(target), title_justify="left")
        table.add_column("version", justify="right")
        table.add_column("name")
        table.add_column("state")
        for s in statuses:
            style = {"applied": "green", "pending": "yellow"}.get(s.state, "red")
            table.add_row(f"{s.version:04d}", escape(s.name), f"[{style}]{s.state}[/]")
        console.print(table)
    elif applied:
        names = {s.version: s.name for s in statuses}
        done = ", ".join(f"{v:04d}_{names.get(v, '?')}" for v in applied)
        console.print(f"{escape(target)}: applied {escape(done)}")
    else:
        console.print(f"{escape(target)}: up to date")


# ============================================================================== hub commands


@cli.command()
def demo() -> None:
    """A region hub and three edges on this machine: offline writes, reconnect, a conflict,
    the status. Starts private PostgreSQL and Redis servers and removes everything after."""
    run(run_demo())


@cli.group()
def hub() -> None:
    """The region hub: run it, and manage the edge nodes it serves."""


async def _serve_hub(config: HubConfig) -> None:
    """Serve until SIGTERM or SIGINT, then shut down cleanly (the serving task is
    cancelled, which closes the listener, the pool and the cache)."""
    loop = asyncio.get_running_loop()
    stop_signals: list[str] = []

    def ready() -> None:
        log.info("hub ready")
        tune_gc()
        notify("READY=1")

    serving = asyncio.create_task(run_hub(config, ready=ready), name="syncengine-hub")

    def on_signal(sig: signal.Signals) -> None:
        if not stop_signals:
            log.info("received %s; shutting down", sig.name)
            notify("STOPPING=1")
        stop_signals.append(sig.name)
        serving.cancel()

    handled = (signal.SIGTERM, signal.SIGINT)
    for sig in handled:
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        await serving
    except asyncio.CancelledError:
        # Our own cancellation (not a signal's) must propagate.
        current = asyncio.current_task()
        if not stop_signals or (current is not None and current.cancelling()):
            raise
    except OSError as exc:
        if exc.errno in (errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES):
            raise ConfigError(
                f"cannot listen on {config.listen}: {exc.strerror}",
                hint="Stop the process using that address, or change `listen` in hub.toml.",
                detail={"key": "listen"},
            ) from None
        raise
    finally:
        for sig in handled:
            loop.remove_signal_handler(sig)
    log.info("hub stopped")


@hub.command("run")
@config_option("The region's hub.toml.")
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="stderr log lines as text or as one JSON object per line.",
)
@click.pass_context
def hub_run(ctx: click.Context, config_path: Path, log_format: LogFormat) -> None:
    """Run the region hub until SIGTERM/SIGINT (then exit 0).

    Migrates the database on start. With NOTIFY_SOCKET set (systemd Type=notify) it sends
    READY=1 once listening and STOPPING=1 on shutdown.
    """
    _configure_logging(ctx, base=logging.INFO, fmt=log_format, tracebacks=True)
    config = load_hub(config_path, "hub run")
    log.info("starting hub: %s", json.dumps(config.redacted(), default=str))
    try:
        run(_serve_hub(config))
    except SyncError as exc:
        # Also as a log line, for whoever reads the service's log (journald, JSON shippers).
        log.error("hub stopped: %s (hint: %s)", exc.message, exc.hint)
        raise


@hub.command("add-node")
@click.argument("node_id")
@click.option(
    "--grant",
    "grants",
    multiple=True,
    required=True,
    metavar="PREFIX",
    help="A cell prefix the node may read and write; repeat for more.",
)
@config_option("The region's hub.toml.")
def hub_add_node(node_id: str, grants: tuple[str, ...], config_path: Path) -> None:
    """Register an edge node and print its token, once.

    Only the token's hash is stored. When stdout is not a terminal, the token is printed
    alone on one line, so that a script can capture it.
    """
    config = load_hub(config_path, "hub add-node")

    async def add() -> str:
        async with _hub_pool(config) as pool:
            return await hub_nodes.add_node(pool, config.region, node_id, list(grants))

    _show_token(run(add()), f"Node {node_id} registered with grants {', '.join(grants)}.")


@hub.command("rotate-token")
@click.argument("node_id")
@config_option("The region's hub.toml.")
def hub_rotate_token(node_id: str, config_path: Path) -> None:
    """Issue a new token for a node and print it; the old token stops working at once."""
    config = load_hub(config_path, "hub rotate-token")

    async def rotate() -> str:
        async with _hub_pool(config) as pool:
            return await hub_nodes.rotate_token(pool, node_id)

    _show_token(run(rotate()), f"Node {node_id} has a new token; the old one no longer works.")


def _show_token(token: str, what: str) -> None:
    if not sys.stdout.isatty():
        click.echo(token)
        return
    click.echo(f"{what}\nIts token, shown only this once (the hub keeps just a hash):\n")
    click.echo(f"    {token}\n")
    click.echo(
        "Write it into the node's token_file (e.g. /etc/syncengine/token, mode 0600, owned by "
        "the daemon's user)."
    )


@hub.command("revoke")
@click.argument("node_id")
@config_option("The region's hub.toml.")
def hub_revoke(node_id: str, config_path: Path) -> None:
    """Revoke a node's token: its next request is refused (401)."""
    config = load_hub(config_path, "hub revoke")

    async def revoke() -> None:
        async with _hub_pool(config) as pool:
            await hub_nodes.revoke_node(pool, node_id)

    run(revoke())
    click.echo(f"revoked {node_id}")


_RELATIVE_SINCE: Final = {"m": 60, "h": 3600, "d": 86400}


def _since(text: str | None) -> datetime | None:
    """``--since``: an ISO 8601 time (UTC when no offset is given) or an age like 30m, 6h, 7d."""
    if text is None:
        return None
    amount, unit = text[:-1], text[-1:]
    if amount.isdigit() and unit in _RELATIVE_SINCE:
        return datetime.now(UTC) - timedelta(seconds=int(amount) * _RELATIVE_SINCE[unit])
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise click.BadParameter(
            f"{text!r} is neither an ISO 8601 time (2026-05-01T10:00) nor an age (30m, 6h, 7d)",
            param_hint="--since",
        ) from None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


@hub.command("conflicts")
@config_option("The region's hub.toml.")
@click.option("--cell", "prefix", default=None, help="Only records under this cell prefix.")
@click.option(
    "--since", default=None, help="Only conflicts logged since (ISO 8601, or 7d, 6h, 30m)."
)
@click.option("--limit", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def hub_conflicts(
    config_path: Path, *, prefix: str | None, since: str | None, limit: int, as_json: bool
) -> None:
    """List the conflict log, newest first: for each field two nodes wrote concurrently, the
    value that won and the value that lost (kept here; nothing is lost silently).

    \b
    --json prints {"schema": 1, "kind": "conflicts", "conflicts": [{id, logged_at, cell,
      collection, key, field, winner: {node, hlc, value, deleted}, loser: {node, hlc,
      value}}]}
    """
    config = load_hub(config_path, "hub conflicts")
    cell = parse_prefix(prefix) if prefix is not None else None
    after = _since(since)

    async def listing() -> list[Any]:
        async with _hub_pool(config) as pool, hub_db.translated("conflicts"):
            return list(
                await pool.fetch(
                    "SELECT id, logged_at, cell, collection, key, field, winner_value, "
                    "winner_hlc, winner_node, winner_deleted, loser_value, loser_hlc, loser_node "
                    "FROM conflicts WHERE ($1::text IS NULL OR cell = $1 "
                    "OR starts_with(cell, $1 || '/')) AND ($2::timestamptz IS NULL "
                    "OR logged_at >= $2) ORDER BY logged_at DESC, id DESC LIMIT $3",
                    cell,
                    after,
                    limit,
                )
            )

    rows = [
        {
            "id": r["id"],
            "logged_at": r["logged_at"].isoformat(timespec="seconds"),
            "cell": r["cell"],
            "collection": r["collection"],
            "key": r["key"],
            "field": r["field"],
            "winner": {
                "node": r["winner_node"],
                "hlc": r["winner_hlc"],
                "value": None if r["winner_value"] is None else json.loads(r["winner_value"]),
                "deleted": r["winner_deleted"],
            },
            "loser": {
                "node": r["loser_node"],
                "hlc": r["loser_hlc"],
                "value": None if r["loser_value"] is None else json.loads(r["loser_value"]),
            },
        }
        for r in run(listing())
    ]
    if as_json:
        _echo_json({"schema": STATUS_SCHEMA, "kind": "conflicts", "conflicts": rows})
        return
    if not rows:
        click.echo("no conflicts")
        return
    table = Table(title=f"conflicts (newest first, at most {limit})", title_justify="left")
    for column in ("logged (UTC)", "record", "field", "winner", "loser"):
        table.add_column(column)
    for c in rows:
        won = "deleted" if c["winner"]["deleted"] else json.dumps(c["winner"]["value"])
        table.add_row(
            _short_time(c["logged_at"]),
            escape(f"{c['cell']} {c['collection']} {c['key']}"),
            escape(c["field"]),
            escape(f"{c['winner']['node']}: {won}"),
            escape(f"{c['loser']['node']}: {json.dumps(c['loser']['value'])}"),
        )
    _console().print(table)


@hub.command("import-bundle")
@config_option("The region's hub.toml.")
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--reply",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also write the node's reply bundle here (from the cursors in its bundle).",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.pass_context
def hub_import_bundle(
    ctx: click.Context, config_path: Path, path: Path, reply: Path | None, as_json: bool
) -> None:
    """Apply an edge's bundle PATH exactly like its pushes: the same checks, dedup, merge,
    conflict log and grants. A tampered, cut or foreign bundle is refused before anything
    is applied; importing one twice changes nothing. Exit 1 when the hub refused some
    batches (they stay queued at the edge)."""
    config = load_hub(config_path, "hub import-bundle")

    async def apply() -> tuple[dict[str, Any], dict[str, Any] | None]:
        async with _hub_pool(config) as pool:
            done = await import_outbox(pool, config, path)
            made = None
            if reply is not None:
                made = await export_reply(
                    pool, config, done["node"], reply, since=done["cursors"] or None
                )
            return done, made

    done, made = run(apply())
    if as_json:
        _echo_json({"schema": STATUS_SCHEMA, "kind": "bundle_import", **done})
    else:
        click.echo(
            f"node {done['node']}: {done['applied']:,} changes applied from "
            f"{done['batches']} batches, {done['conflicts']} conflicts logged"
        )
        for r in done["refused"]:
            _report(
                f"refused {r['tier']} seqs {r['first_seq']}..{r['last_seq']}: "
                f"{r['code']}: {r['message']}",
                "They stay queued at the edge; see `syncengine edge dead-letters` there once "
                "it syncs.",
            )
        if made is not None:
            click.echo(
                f"reply bundle {reply}: {made['changes']:,} changes, {made['bytes']:,} bytes; "
                "import it at the edge with `syncengine edge import-bundle`"
            )
    ctx.exit(1 if done["refused"] else 0)


@hub.command("export-bundle")
@config_option("The region's hub.toml.")
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--node", "node_id", required=True, help="The node the bundle is for.")
@click.option(
    "--since",
    type=click.IntRange(min=0),
    default=None,
    help="Feed cursor to start after (default: where the node last pulled from this hub).",
)
def hub_export_bundle(config_path: Path, path: Path, node_id: str, since: int | None) -> None:
    """Write the reply bundle PATH for NODE: the changes it would pull under its grants, and
    the seqs the hub holds of it (so its queue drops them)."""
    config = load_hub(config_path, "hub export-bundle")

    async def export() -> dict[str, Any]:
        async with _hub_pool(config) as pool:
            return await export_reply(pool, config, node_id, path, since=since)

    made = run(export())
    click.echo(
        f"reply bundle {path} for {node_id}: {made['changes']:,} changes, {made['bytes']:,} "
        "bytes; import it at the edge with `syncengine edge import-bundle`"
    )


@hub.command("verify")
@config_option("The region's hub.toml.")
@click.option(
    "--deep", is_flag=True, help="Also replay the whole feed and compare it with the records."
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.pass_context
def hub_verify(ctx: click.Context, config_path: Path, deep: bool, as_json: bool) -> None:
    """Check the hub database's invariants; exit 0 when all hold, 1 when some do not.

    Read-only, safe on a live hub: the feed's ids are contiguous up to its head, every
    change is at or below its node's acknowledged seq, records point at existing feed
    entries, no orphan nodes or cells, constraints and indexes valid. --deep also replays
    the feed record by record and compares the result with `records` (reads the whole
    feed; run it off-peak on a big hub).

    \b
    --json prints {"schema": 1, "kind": "verify", "ok": bool, "checks": [{name, ok,
      problems, examples, hint}]}
    """
    config = load_hub(config_path, "hub verify")

    async def check() -> list[HubCheck]:
        async with _hub_pool(config) as pool, hub_db.translated("verify"):
            return await verify_hub(pool, resolvers=config.resolvers, deep=deep)

    checks = run(check())
    ok = all(c.ok for c in checks)
    if as_json:
        _echo_json(
            {
                "schema": STATUS_SCHEMA,
                "kind": "verify",
                "ok": ok,
                "checks": [
                    {
                        "name": c.name,
                        "ok": c.ok,
                        "problems": c.problems,
                        "examples": c.examples,
                        "hint": c.hint,
                    }
                    for c in checks
                ],
            }
        )
    else:
        console = _console()
        for c in checks:
            mark = "[green]ok[/]  " if c.ok else f"[bold red]{c.problems} found[/]"
            console.print(f"{mark} {escape(c.name)}")
            for example in c.examples:
                console.print(f"      {escape(example)}")
            if not c.ok:
                console.print(f"      [dim]{escape(c.hint)}[/]")
    ctx.exit(0 if ok else 1)


@hub.command("feed")
@config_option("The region's hub.toml.")
@click.option(
    "--prune",
    is_flag=True,
    help="Run the feed's maintenance now: make the coming days' partitions, drop expired ones.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def hub_feed(config_path: Path, prune: bool, as_json: bool) -> None:
    """Show the change feed's day partitions, its head and its retention horizon.

    The hub keeps the feed for feed_retention_days (hub.toml, default 30) and drops whole
    day partitions past that once every node still syncing has pulled them; a node away
    longer re-bootstraps from a snapshot by itself. Each hub process does this hourly;
    --prune does it now. Without --prune nothing is changed, and "held by" names the nodes
    whose cursors keep the oldest expired partition.

    \b
    --json prints {"schema": 1, "kind": "feed", "horizon": int, "head": int,
      "retention_days": int, "created": [str], "dropped": [str], "held_by": {partition:
      [node]}, "skipped": str, "dry_run": bool, "partitions": [{name, starts_at, ends_at,
      rows}]}
    """
    config = load_hub(config_path, "hub feed")

    async def body() -> FeedReport:
        async with _hub_pool(config) as pool:
            return await maintain_feed(
                pool, retention_days=config.feed_retention_days, dry_run=not prune
            )

    report = run(body())
    if as_json:
        _echo_json({"schema": STATUS_SCHEMA, "kind": "feed", **report.to_json()})
        return
    console = _console()
    table = Table(
        title=f"change feed of region {config.region}: head {report.head:,}, horizon "
        f"{report.horizon:,}, kept {report.retention_days} days",
        title_justify="left",
    )
    table.add_column("partition", no_wrap=True)
    table.add_column("from (UTC)", no_wrap=True)
    table.add_column("to (UTC)", no_wrap=True)
    table.add_column("rows (est.)", justify="right")
    for p in report.partitions:
        table.add_row(
            p.name,
            _short_time(p.starts_at.isoformat()) if p.starts_at else "the beginning",
            _short_time(p.ends_at.isoformat()),
            f"{p.rows:,}",
        )
    console.print(table)
    dropped = "would drop" if report.dry_run else "dropped"
    for what, names in (("created", report.created), (dropped, report.dropped)):
        if names:
            console.print(f"{what}: {', '.join(names)}")
    for name, holders in report.held_by.items():
        console.print(
            f"[yellow]{name} is past the horizon but held by {len(holders)} node(s) that have "
            f"not pulled it yet:[/] {escape(', '.join(holders[:10]))}"
        )
    if report.skipped:
        console.print(f"[yellow]not run: {escape(report.skipped)}[/]")


@hub.command("nodes")
@config_option("The region's hub.toml.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def hub_list_nodes(config_path: Path, as_json: bool) -> None:
    """List the registered nodes with their grants, last contact and state.

    \b
    --json prints {"schema": 1, "kind": "nodes", "region": str, "nodes": [
      {"node_id": str, "region": str, "grants": [str], "last_seen": ISO 8601 | null,
       "revoked": bool}]}
    """
    config = load_hub(config_path, "hub nodes")

    async def listing() -> list[hub_nodes.Node]:
        async with _hub_pool(config) as pool:
            return await hub_nodes.list_nodes(pool)

    found = run(listing())
    if as_json:
        _echo_json(
            {
                "schema": STATUS_SCHEMA,
                "kind": "nodes",
                "region": config.region,
                "nodes": [
                    {
                        "node_id": n.node_id,
                        "region": n.region,
                        "grants": list(n.grants),
                        "last_seen": n.last_seen.isoformat() if n.last_seen else None,
                        "revoked": n.revoked,
                    }
                    for n in found
                ],
            }
        )
        return
    table = Table(title=f"nodes of region {config.region}", title_justify="left")
    table.add_column("node", no_wrap=True)
    table.add_column("grants")
    table.add_column("last seen (UTC)", no_wrap=True)
    table.add_column("state")
    for n in found:
        table.add_row(
            escape(n.node_id),
            escape("\n".join(n.grants)),
            _short_time(n.last_seen.isoformat() if n.last_seen else None),
            "[red]revoked[/]" if n.revoked else "[green]active[/]",
        )
    _console().print(table)


# ==================================================================================== status


def disk_state_of(free_bytes: int, read_only: bool) -> str:
    """The edge disk's state: ``critical`` when writes fail or are about to (read-only, or
    under :data:`DISK_CRITICAL_BYTES` free), ``warning`` under :data:`DISK_WARNING_BYTES`."""
    if read_only or free_bytes < DISK_CRITICAL_BYTES:
        return "critical"
    return "warning" if free_bytes < DISK_WARNING_BYTES else "ok"


def tier_state(age_s: float | None, promise_s: int, dead_letters: int) -> str:
    """``critical`` once the oldest pending change is older than the tier's promise;
    ``warning`` past half the promise or with dead letters; else ``ok``."""
    if age_s is not None and age_s > promise_s:
        return "critical"
    if (age_s is not None and age_s > promise_s / 2) or dead_letters:
        return "warning"
    return "ok"


def _worst(states: Sequence[str]) -> str:
    return max(states, key=_STATES.index, default="ok")


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _step_json(step: StepRecord | None) -> dict[str, Any] | None:
    if step is None:
        return None
    return {
        "ok_at": _iso(step.last_ok_ms) if step.last_ok_ms is not None else None,
        "failing": step.failing,
        "error": None
        if step.last_error_ms is None
        else {
            "at": _iso(step.last_error_ms),
            "code": step.last_error_code,
            "message": step.last_error,
        },
    }


async def _probe_hub(config: EdgeConfig) -> dict[str, Any]:
    """Ask the hub (briefly) whether it is reachable, its feed head and its clock."""
    probe: dict[str, Any] = {
        "reachable": None,
        "error": None,
        "feed_head": None,
        "clock_offset_ms": None,
        "clock_state": None,
        "conflicts": None,
    }
    try:
        link = connect_link(config, load_regions()[config.region], timeout_s=_PROBE_TIMEOUT_S)
    except ConfigError as exc:
        probe["error"] = {"code": exc.code, "message": exc.message}
        return probe
    async with link:
        sent = time.time_ns() // 1_000_000
        try:
            cfg = await link.config()
        except SyncError as exc:
            probe.update(reachable=False, error={"code": exc.code, "message": exc.message})
            return probe
        back = time.time_ns() // 1_000_000
        with contextlib.suppress(SyncError):  # an older hub: no conflicts to show
            probe["conflicts"] = await link.conflicts()
    probe["reachable"] = True
    head = cfg.get("feed_head")
    probe["feed_head"] = head if isinstance(head, int) else None
    hub_hlc, max_drift = cfg.get("hub_hlc"), cfg.get("max_clock_drift_ms")
    if isinstance(hub_hlc, int) and hub_hlc > 0:
        # The hub read its clock about halfway through the round trip.
        offset = (sent + back) // 2 - hlc_millis(hub_hlc)
        probe["clock_offset_ms"] = offset
        limit = max_drift if isinstance(max_drift, int) else None
        probe["clock_state"] = "warning" if limit and abs(offset) > limit / 2 else "ok"
    return probe


async def edge_status(config: EdgeConfig) -> dict[str, Any]:
    """The edge's ``status --json`` document (see :func:`status`)."""
    _require_store_file(config)
    async with open_store(config) as store:
        lanes = await store.outbox.status()
        dead = await store.outbox.dead_letters()
        cursors = {tier: await store.cursor(f"pull:{tier}") for tier in Tier.by_priority()}
        steps = await store.sync_steps()
    hub = await _probe_hub(config)
    now_ms = time.time_ns() // 1_000_000
    tiers: list[dict[str, Any]] = []
    for lane in lanes:
        promise_s = config.tier_policies[lane.tier].promise_s
        age_s = (
            None
            if lane.oldest_created_at_ms is None
            else max(0.0, (now_ms - lane.oldest_created_at_ms) / 1000)
        )
        push, pull = steps.get(("push", lane.tier)), steps.get(("pull", lane.tier))
        state = tier_state(age_s, promise_s, lane.dead_letters)
        if (push is not None and push.failing) or (pull is not None and pull.failing):
            state = _worst([state, "warning"])
        head, lag_source = hub["feed_head"], "hub"
        if head is None and pull is not None and pull.hub_head is not None:
            head, lag_source = pull.hub_head, "last_pull"
        cursor = cursors[lane.tier]
        tiers.append(
            {
                "tier": lane.tier.value,
                "state": state,
                "depth": lane.depth,
                "bytes_pending": lane.bytes_pending,
                "oldest_pending_age_s": None if age_s is None else round(age_s, 3),
                "promise_s": promise_s,
                "acked_seq": lane.acked_seq,
                "next_seq": lane.next_seq,
                "dead_letters": lane.dead_letters,
                "pull_cursor": cursor,
                "pull_lag": None if head is None else max(0, head - cursor),
                "pull_lag_source": None if head is None else lag_source,
                "last_push": _step_json(push),
                "last_pull": _step_json(pull),
            }
        )
    wal = config.db.with_name(config.db.name + "-wal")
    free = shutil.disk_usage(config.db.parent).free
    read_only = edge_sqlite.read_only_filesystem(config.db.parent)
    disk_state = disk_state_of(free, read_only)
    states = [t["state"] for t in tiers]
    states.append(disk_state)
    if hub["reachable"] is False or hub["clock_state"] == "warning":
        states.append("warning")
    return {
        "schema": STATUS_SCHEMA,
        "kind": "edge",
        "generated_at": _now_iso(),
        "state": _worst(states),
        "node_id": config.node_id,
        "region": config.region,
        "hub_url": mask_url(config.hub_url),
        "hub": hub,
        "db": {
            "path": str(config.db),
            "bytes": _file_size(config.db),
            "wal_bytes": _file_size(wal),
            "disk_free_bytes": free,
            "read_only": read_only,
            "disk_state": disk_state,
        },
        "tiers": tiers,
        "dead_letters": {
            "count": len(dead),
            "latest": [
                {
                    "tier": Tier.from_priority(d.lane).value,
                    "seq": d.seq,
                    "cell": d.cell,
                    "collection": d.collection,
                    "key": d.key,
                    "code": d.code,
                    "message": d.message,
                    "dead_at": _iso(d.dead_at_ms),
                }
                for d in reversed(dead[-STATUS_DEAD_LETTERS:])
            ],
        },
    }


_HUB_NODES_SQL: Final = (
    "SELECT n.node_id, n.region, n.grants, n.last_seen, n.revoked_at IS NOT NULL AS revoked, "
    "n.last_error_code, n.last_error, n.last_error_at, "
    "coalesce((SELECT jsonb_object_agg(l.lane, l.acked_seq) FROM node_lanes l "
    "WHERE l.node_id = n.node_id), '{}') AS acked, "
    "coalesce((SELECT jsonb_object_agg(p.tier, p.cursor) FROM node_pulls p "
    "WHERE p.node_id = n.node_id), '{}') AS cursors "
    "FROM nodes n ORDER BY n.node_id"
)
#: Ingest over the last five minutes: an index range over the newest feed ids (ids follow
#: commit order), bounded so a huge feed is never scanned whole.
_INGEST_SQL: Final = (
    "SELECT count(*) FROM feed WHERE id > (SELECT id FROM feed_head) - 1000000 "
    "AND applied_at > now() - interval '5 minutes'"
)
_POOL_SQL: Final = (
    "SELECT (SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()), "
    "current_setting('max_connections')::int"
)


async def _hub_database(config: HubConfig) -> dict[str, Any]:
    """Feed head, conflicts and nodes as :meth:`Hub.status` reports them, read directly from
    PostgreSQL; ``database.reachable`` false (and an ``error``) when that fails."""
    database: dict[str, Any] = {
        "url": mask_url(config.database_url),
        "reachable": False,
        "migrated": False,
        "error": None,
        "hint": None,
    }
    out: dict[str, Any] = {
        "database": database,
        "feed_head": None,
        "conflicts": None,
        "ingest": None,
        "connections": None,
        "nodes": [],
    }
    try:
        pool = await hub_db.connect_pool(
            config.database_url, min_size=_POOL_MIN, max_size=_POOL_MAX, migrate=False
        )
    except SyncError as exc:
        database.update(error=exc.message, hint=exc.hint)
        return out
    try:
        async with hub_db.translated("status"):
            database["reachable"] = True
            if not await pool.fetchval("SELECT to_regclass('feed_head') IS NOT NULL"):
                database.update(
                    error="the database has no syncengine schema",
                    hint=f"Run `syncengine migrate --config {config.source or 'hub.toml'}`.",
                )
                return out
            database["migrated"] = True
            out["feed_head"] = head = await pool.fetchval("SELECT id FROM feed_head")
            out["conflicts"] = await pool.fetchval("SELECT count(*) FROM conflicts")
            ingested = await pool.fetchval(_INGEST_SQL)
            out["ingest"] = {"changes_5m": ingested, "per_s": round(ingested / 300, 2)}
            used, limit = await pool.fetchrow(_POOL_SQL)
            out["connections"] = {"used": used, "max": limit}
            rows = await pool.fetch(_HUB_NODES_SQL)
    except SyncError as exc:
        database.update(error=exc.message, hint=exc.hint)
        return out
    finally:
        await pool.close()
    for r in rows:
        acked = {int(lane): seq for lane, seq in json.loads(r["acked"]).items()}
        cursors = {int(tier): c for tier, c in json.loads(r["cursors"]).items()}
        out["nodes"].append(
            {
                "node_id": r["node_id"],
                "region": r["region"],
                "grants": list(r["grants"]),
                "last_seen": r["last_seen"].isoformat() if r["last_seen"] else None,
                "revoked": r["revoked"],
                "acked_seq": {t.value: acked.get(t.priority, 0) for t in Tier.by_priority()},
                # Feed entries behind the head, per tier it pulls (as of its last pull).
                "pull_lag": {
                    t.value: max(0, head - cursors[t.priority])
                    for t in Tier.by_priority()
                    if t.priority in cursors
                },
                "last_error": None
                if r["last_error_code"] is None
                else {
                    "code": r["last_error_code"],
                    "message": r["last_error"],
                    "at": r["last_error_at"].isoformat(timespec="seconds"),
                },
            }
        )
    return out


async def _hub_cache(config: HubConfig) -> dict[str, Any]:
    """One PING, as the hub's ``/readyz`` does; Redis down only degrades a hub."""
    if config.redis_url is None:
        return {
            "url": None,
            "configured": False,
            "state": "not_configured",
            "error": None,
            "hit_ratio": None,
        }
    out: dict[str, Any] = {"url": mask_url(config.redis_url), "configured": True}
    # No retries: one bounded attempt is the answer a status needs.
    client = aioredis.Redis.from_url(
        config.redis_url,
        socket_timeout=_REDIS_TIMEOUT_S,
        socket_connect_timeout=_REDIS_TIMEOUT_S,
        retry=Retry(NoBackoff(), 0),
    )
    try:
        async with asyncio.timeout(2 * _REDIS_TIMEOUT_S):
            stats = await client.info("stats")
    except (RedisError, OSError, TimeoutError) as exc:
        out.update(state="degraded", error=f"{type(exc).__name__}: {exc}", hit_ratio=None)
    else:
        hits, misses = int(stats.get("keyspace_hits", 0)), int(stats.get("keyspace_misses", 0))
        ratio = round(hits / (hits + misses), 3) if hits + misses else None
        out.update(state="ok", error=None, hit_ratio=ratio)
    finally:
        with contextlib.suppress(RedisError, OSError):
            await client.aclose()
    return out


async def hub_status(config: HubConfig) -> dict[str, Any]:
    """The hub's ``status --json`` document (see :func:`status`)."""
    found = await _hub_database(config)
    cache = await _hub_cache(config)
    usable = found["database"]["reachable"] and found["database"]["migrated"]
    return {
        "schema": STATUS_SCHEMA,
        "kind": "hub",
        "generated_at": _now_iso(),
        "state": "ok" if usable else "critical",
        "region": config.region,
        "listen": config.listen,
        **found,
        "cache": cache,
    }


def _render_edge(data: Mapping[str, Any]) -> None:
    console = _console()
    db = data["db"]
    console.print(
        f"[bold]edge {escape(data['node_id'])}[/] · region {data['region']} · "
        f"state {_styled(data['state'])}"
    )
    hub = data["hub"]
    if hub["reachable"]:
        reach = "[green]reachable[/]"
        if hub["clock_offset_ms"] is not None:
            offset = f"clock offset {hub['clock_offset_ms'] / 1000:+.1f} s"
            reach += f" · {offset if hub['clock_state'] == 'ok' else f'[yellow]{offset}[/]'}"
    elif hub["error"] is not None:
        verb = "unreachable" if hub["reachable"] is False else "not asked"
        reach = f"[yellow]{verb}[/]: {escape(hub['error']['message'])}"
    else:
        reach = "not asked"
    console.print(f"hub      {escape(data['hub_url'] or 'the region default')} · {reach}")
    console.print(
        f"database {escape(db['path'])} · {_size(db['bytes'])} + WAL {_size(db['wal_bytes'])} "
        f"· {_styled(db['disk_state'], _size(db['disk_free_bytes']) + ' free')}"
        + (" · [bold red]read-only filesystem[/]" if db["read_only"] else "")
    )
    table = Table(title="outbox per tier", title_justify="left")
    columns = ("tier", "state", "pending", "bytes", "age/limit", "push", "pull", "lag", "dead")
    for column in columns:
        left = column in ("tier", "state")
        table.add_column(column, justify="left" if left else "right", no_wrap=left)
    failing = []
    for t in data["tiers"]:
        for name in ("push", "pull"):
            step = t[f"last_{name}"]
            if step is not None and step["failing"]:
                failing.append((t["tier"], name, step["error"]))
        table.add_row(
            t["tier"],
            _styled(t["state"]),
            str(t["depth"]),
            _size(t["bytes_pending"]),
            f"{_duration(t['oldest_pending_age_s'])}/{_duration(t['promise_s'])}",
            _step_cell(t["last_push"]),
            _step_cell(t["last_pull"]),
            "-" if t["pull_lag"] is None else f"{t['pull_lag']:,}",
            str(t["dead_letters"]),
        )
    console.print(table)
    conflicts = hub.get("conflicts")
    if conflicts and conflicts["count_24h"]:
        console.print(f"conflicts with this node in the last day: {conflicts['count_24h']}")
        for c in conflicts["latest"]:
            outcome = "won over" if c["won"] else "lost to"
            console.print(
                f"  {_short_time(c['at'])} {escape(c['cell'])} {escape(c['collection'])}/"
                f"{escape(c['key'])} .{escape(c['field'])}: {outcome} {escape(c['other_node'])}"
            )
    for tier, name, error in failing:
        console.print(
            f"[yellow]{name} of {tier} failing[/] since {_short_time(error['at'])}: "
            f"{escape(error['code'])}: {escape(error['message'])}"
        )
    dead = data["dead_letters"]
    if dead["count"]:
        shown = len(dead["latest"])
        table = Table(title=f"dead letters: {dead['count']} (latest {shown})", title_justify="left")
        for column in ("when", "tier", "seq", "record", "code", "message"):
            table.add_column(column)
        for d in dead["latest"]:
            table.add_row(
                d["dead_at"],
                d["tier"],
                str(d["seq"]),
                escape(f"{d['cell']} {d['collection']} {d['key']}"),
                escape(d["code"]),
                escape(d["message"]),
            )
        console.print(table)


def _step_cell(step: Mapping[str, Any] | None) -> str:
    if step is None:
        return "never"
    shown = _short_time(step["ok_at"]) if step["ok_at"] else "never"
    return f"[yellow]{shown} ✗[/]" if step["failing"] else shown


def _render_hub(data: Mapping[str, Any]) -> None:
    console = _console()
    database, cache = data["database"], data["cache"]
    console.print(
        f"[bold]hub of region {data['region']}[/] · listen {escape(data['listen'])} · "
        f"state {_styled(data['state'])}"
    )
    db_state = "[green]ok[/]" if database["migrated"] else "[bold red]unusable[/]"
    console.print(f"database {escape(database['url'])} · {db_state}")
    if database["error"]:
        console.print(f"  error: {escape(database['error'])}")
        if database["hint"]:
            console.print(f"  hint: {escape(database['hint'])}")
    cache_style = {"ok": "green", "degraded": "yellow"}.get(cache["state"], "dim")
    console.print(f"cache    {escape(cache['url'] or '-')} · [{cache_style}]{cache['state']}[/]")
    if not database["migrated"]:
        return
    ingest, conns = data["ingest"], data["connections"]
    console.print(
        f"feed head {data['feed_head']} · ingest {ingest['per_s']}/s (last 5 min) · "
        f"conflicts logged {data['conflicts']} · PostgreSQL connections "
        f"{conns['used']}/{conns['max']}"
    )
    if cache.get("hit_ratio") is not None:
        console.print(f"cache hit ratio {cache['hit_ratio']:.0%} (Redis-wide)")
    table = Table(
        title="nodes",
        title_justify="left",
        caption="acked seq: the highest seq applied per tier, critical/important/standard/archive",
        caption_justify="left",
    )
    table.add_column("node", no_wrap=True)
    table.add_column("last seen (UTC)", no_wrap=True)
    table.add_column("state")
    table.add_column("acked seq", no_wrap=True)
    table.add_column("pull lag", justify="right")
    for n in data["nodes"]:
        table.add_row(
            escape(n["node_id"]),
            _short_time(n["last_seen"]),
            "[red]revoked[/]" if n["revoked"] else "[green]active[/]",
            "/".join(str(n["acked_seq"][t.value]) for t in Tier.by_priority()),
            str(max(n["pull_lag"].values())) if n["pull_lag"] else "-",
        )
    console.print(table)
    for n in data["nodes"]:
        error = n["last_error"]
        if error is not None:
            console.print(
                f"{escape(n['node_id'])}: last error {_short_time(error['at'])}: "
                f"{escape(error['code'])}: {escape(error['message'])}"
            )


def _short_time(iso: str | None) -> str:
    """An ISO 8601 time as ``2024-05-01 10:00`` UTC for tables; ``never`` for None."""
    if iso is None:
        return "never"
    return datetime.fromisoformat(iso).astimezone(UTC).strftime("%Y-%m-%d %H:%M")


@cli.command()
@config_option()
@click.option("--json", "as_json", is_flag=True, help="Print the versioned JSON document.")
@click.option(
    "--watch",
    type=click.FloatRange(min=0.5),
    default=None,
    metavar="SECONDS",
    help="Refresh every SECONDS until interrupted (with --json: one document per line).",
)
@click.pass_context
def status(ctx: click.Context, config_path: Path, as_json: bool, watch: float | None) -> None:
    """Sync status of an edge node or a region hub; exit 0 ok, 1 warning, 2 critical.

    An edge is critical when a tier's oldest pending change is older than the tier's
    promise, warning past half of it, with dead letters, while a push or pull fails, when
    the hub is unreachable or its clock is off by more than half the allowed drift; and
    critical when its disk is read-only or has under 16 MiB free (warning: 128 MiB). A hub is critical when its
    database is unreachable or not migrated.

    \b
    --json prints one object; "schema" is 1 (it changes only when a field changes
    meaning or goes away; new fields may appear). Times are ISO 8601 UTC, ages seconds.
    \b
    Both kinds:
      schema 1 | kind "edge"|"hub" | generated_at | state "ok"|"warning"|"critical"
    \b
    kind "edge":
      node_id, region, hub_url (configured value, password masked, or null)
      hub: {reachable (null when not asked: no token), error {code, message} | null,
        feed_head, clock_offset_ms (this clock minus the hub's), clock_state,
        conflicts: null | {count_24h, latest: [{at, cell, collection, key, field, won,
        other_node, lost_value}]} (conflicts this node took part in)}
      db: {path, bytes, wal_bytes, disk_free_bytes, read_only, disk_state (critical
        when read-only or under 16 MiB free, warning under 128 MiB)}
      tiers: one per tier, critical first: {tier, state, depth (pending changes),
        bytes_pending, oldest_pending_age_s (null when empty), promise_s, acked_seq,
        next_seq, dead_letters, pull_cursor, pull_lag (feed entries behind the hub's
        head, null when unknown), pull_lag_source "hub"|"last_pull",
        last_push, last_pull: null (never) | {ok_at, failing, error {at, code,
        message} | null}}
      dead_letters: {count, latest: newest first, at most 5: {tier, seq, cell,
        collection, key, code, message, dead_at}}
    \b
    kind "hub":
      region, listen
      database: {url (masked), reachable, migrated, error, hint}
      feed_head, conflicts, ingest {changes_5m, per_s}, connections {used, max}
        (null when the database is unusable)
      nodes: [{node_id, region, grants, last_seen, revoked,
        acked_seq: {critical, important, standard, archive},
        pull_lag: {tier: feed entries behind the head at its last pull, per tier pulled},
        last_error: null | {code, message, at}}]
      cache: {url (masked) | null, configured,
        state "ok"|"degraded"|"not_configured", error, hit_ratio (Redis-wide) | null}
    """
    config = _load(config_path)

    def fetch() -> dict[str, Any]:
        if isinstance(config, EdgeConfig):
            return run(edge_status(config))
        return run(hub_status(config))

    render = _render_edge if isinstance(config, EdgeConfig) else _render_hub
    if watch is None:
        data = fetch()
        if as_json:
            _echo_json(data)
        else:
            render(data)
        ctx.exit(_EXIT_BY_STATE[data["state"]])
    code = 0
    try:
        while True:
            data = fetch()
            code = _EXIT_BY_STATE[data["state"]]
            if as_json:
                click.echo(json.dumps(data, ensure_ascii=False))
            else:
                _console().clear()
                render(data)
            time.sleep(watch)
    except KeyboardInterrupt:
        pass  # the exit code is the last state's
    ctx.exit(code)


# ================================================================================ entry point


def main(argv: Sequence[str] | None = None) -> None:
    """The ``syncengine`` console script (and ``python -m syncengine``)."""
    cli.main(args=list(argv) if argv is not None else None, prog_name="syncengine")
