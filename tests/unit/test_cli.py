"""The ``syncengine`` command line on an edge node: offline reads and writes, migrate, status
and its exit codes, errors as ``error:``/``hint:``, and the example configs."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

import syncengine.cli as cli_module
from support.servers import free_port
from syncengine.cli import cli, tier_state
from syncengine.config import load_config, load_edge_config, load_hub_config
from syncengine.edge.store import EdgeStore
from syncengine.service import GC_THRESHOLDS, log_formatter, notify, tune_gc, watchdog_interval_s
from syncengine.tiers import TierRules

REPO = Path(__file__).resolve().parents[2]
CELL = "west/ng/lagos/clinic-12"
# One cell per tier, as the tier rules below say.
CELLS = {
    "critical": f"{CELL}/alerts",
    "important": f"{CELL}/stock",
    "standard": CELL,
    "archive": f"{CELL}/2019",
}
EDGE_TOML = f"""
node_id = "lagos-clinic-12"
region = "west"
db = "edge.db"
tier_rules = [
    {{ prefix = "{CELLS["critical"]}", tier = "critical" }},
    {{ prefix = "{CELLS["important"]}", tier = "important" }},
    {{ prefix = "{CELLS["archive"]}", tier = "archive" }},
]
"""
# Variables that would steer config loading away from the files under test.
CLEAN_ENV: dict[str, str | None] = {
    "SYNCENGINE_CONFIG": None,
    "SYNCENGINE_DB": None,
    "SYNCENGINE_NODE_ID": None,
    "DATABASE_URL": None,
    "REDIS_URL": None,
}


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner(env=CLEAN_ENV)


@pytest.fixture
def edge_toml(tmp_path: Path) -> Path:
    path = tmp_path / "edge.toml"
    path.write_text(EDGE_TOML, encoding="utf-8")
    return path


def invoke(runner: CliRunner, *args: str, stdin: str | None = None) -> Result:
    return runner.invoke(cli, list(args), input=stdin, catch_exceptions=False)


def outbox_rows(db: Path) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(db)
    try:
        return conn.execute(
            "SELECT lane, cell, collection, key FROM outbox ORDER BY lane"
        ).fetchall()
    finally:
        conn.close()


def age_outbox(db: Path, lane: int, seconds: float) -> None:
    """Make the pending changes of ``lane`` look ``seconds`` old, as an operator could."""
    created = time.time_ns() // 1_000_000 - int(seconds * 1000)
    conn = sqlite3.connect(db)
    try:
        with conn:
            conn.execute("UPDATE outbox SET created_at_ms = ? WHERE lane = ?", (created, lane))
    finally:
        conn.close()


def status_json(runner: CliRunner, config: Path) -> tuple[int, dict[str, Any]]:
    result = invoke(runner, "status", "--config", str(config), "--json")
    return result.exit_code, json.loads(result.stdout)


# ------------------------------------------------------------------------ edge put/get/delete


def test_put_get_delete_round_trip(runner: CliRunner, edge_toml: Path) -> None:
    put = invoke(
        runner,
        "edge",
        "put",
        "--config",
        str(edge_toml),
        CELL,
        "visits",
        "v1",
        '{"patient": "Ada", "temp_c": 38.5}',
    )
    assert put.exit_code == 0, put.output
    hlc = int(put.stdout.strip())
    assert hlc > 0

    got = invoke(runner, "edge", "get", "--config", str(edge_toml), CELL, "visits", "v1")
    assert got.exit_code == 0, got.output
    assert json.loads(got.stdout) == {"patient": "Ada", "temp_c": 38.5}

    # Fields merge into the record; JSON may come from stdin.
    put2 = invoke(
        runner,
        "edge",
        "put",
        "--config",
        str(edge_toml),
        CELL,
        "visits",
        "v1",
        "-",
        stdin='{"temp_c": 37.9}',
    )
    assert put2.exit_code == 0, put2.output
    assert int(put2.stdout) > hlc
    got = invoke(runner, "edge", "get", "--config", str(edge_toml), CELL, "visits", "v1")
    assert json.loads(got.stdout) == {"patient": "Ada", "temp_c": 37.9}

    deleted = invoke(runner, "edge", "delete", "--config", str(edge_toml), CELL, "visits", "v1")
    assert deleted.exit_code == 0, deleted.output
    assert int(deleted.stdout) > int(put2.stdout)
    gone = invoke(runner, "edge", "get", "--config", str(edge_toml), CELL, "visits", "v1")
    assert gone.exit_code == 1
    assert "not found" in gone.stderr
    # Every write is queued for the hub, in the standard lane.
    assert [r[0] for r in outbox_rows(tmp_db(edge_toml))] == [2, 2, 2]


def tmp_db(edge_toml: Path) -> Path:
    return edge_toml.parent / "edge.db"


def test_config_comes_from_the_environment(edge_toml: Path) -> None:
    runner = CliRunner(env={**CLEAN_ENV, "SYNCENGINE_CONFIG": str(edge_toml)})
    put = invoke(runner, "edge", "put", CELL, "visits", "v1", '{"a": 1}')
    assert put.exit_code == 0, put.output
    assert json.loads(invoke(runner, "edge", "get", CELL, "visits", "v1").stdout) == {"a": 1}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"temp_c": 38.5', "not valid JSON"),
        ("[1, 2]", "must be a JSON object"),
        ('{"x": NaN}', "not valid JSON"),
    ],
)
def test_bad_json_exits_1_and_writes_nothing(
    runner: CliRunner, edge_toml: Path, text: str, expected: str
) -> None:
    result = invoke(runner, "edge", "put", "--config", str(edge_toml), CELL, "visits", "v1", text)
    assert result.exit_code == 1
    assert result.stderr.startswith("error: ")
    assert expected in result.stderr
    assert "hint: " in result.stderr
    assert result.stdout == ""
    # Refused before the store was even opened.
    assert not tmp_db(edge_toml).exists()


def test_invalid_cell_exits_1_naming_the_cell(runner: CliRunner, edge_toml: Path) -> None:
    result = invoke(
        runner, "edge", "put", "--config", str(edge_toml), "West/NG", "visits", "v1", '{"a": 1}'
    )
    assert result.exit_code == 1
    assert "error: " in result.stderr and "'West/NG'" in result.stderr
    assert "hint: " in result.stderr
    foreign = invoke(
        runner,
        "edge",
        "put",
        "--config",
        str(edge_toml),
        "east/ke/nairobi",
        "visits",
        "v1",
        '{"a": 1}',
    )
    assert foreign.exit_code == 1 and "east/ke/nairobi" in foreign.stderr
    assert outbox_rows(tmp_db(edge_toml)) == []


def test_get_of_a_missing_record(runner: CliRunner, edge_toml: Path) -> None:
    # Before the store exists, a get says so rather than creating an empty store.
    early = invoke(runner, "edge", "get", "--config", str(edge_toml), CELL, "visits", "nope")
    assert early.exit_code == 1
    assert "does not exist yet" in early.stderr
    assert not tmp_db(edge_toml).exists()

    invoke(runner, "edge", "put", "--config", str(edge_toml), CELL, "visits", "v1", '{"a": 1}')
    result = invoke(runner, "edge", "get", "--config", str(edge_toml), CELL, "visits", "nope")
    assert result.exit_code == 1
    assert result.stdout == ""
    assert f"error: not found: {CELL} visits nope" in result.stderr


def test_usage_errors_keep_exit_code_2(runner: CliRunner, edge_toml: Path) -> None:
    result = invoke(runner, "edge", "put", "--config", str(edge_toml), CELL, "visits")
    assert result.exit_code == 2
    assert invoke(runner, "edge", "get", CELL, "visits", "v1").exit_code == 2  # no --config


def test_missing_config_file_is_a_clear_error(runner: CliRunner, tmp_path: Path) -> None:
    result = invoke(runner, "edge", "get", "--config", str(tmp_path / "nope.toml"), CELL, "v", "k")
    assert result.exit_code == 1
    assert "nope.toml" in result.stderr and "not found" in result.stderr


def test_hub_command_refuses_an_edge_config(runner: CliRunner, edge_toml: Path) -> None:
    result = invoke(runner, "hub", "nodes", "--config", str(edge_toml))
    assert result.exit_code == 1
    assert "is an edge config" in result.stderr


# ---------------------------------------------------------------------------------- migrate


def test_migrate_status_then_migrate(runner: CliRunner, edge_toml: Path) -> None:
    before = invoke(runner, "migrate", "--config", str(edge_toml), "--status")
    assert before.exit_code == 0, before.output
    assert "0001" in before.stdout and "init" in before.stdout and "pending" in before.stdout
    assert not tmp_db(edge_toml).exists()  # --status only looks

    applied = invoke(runner, "migrate", "--config", str(edge_toml))
    assert applied.exit_code == 0, applied.output
    assert "applied 0001_init" in applied.stdout
    again = invoke(runner, "migrate", "--config", str(edge_toml))
    assert "up to date" in again.stdout

    after = invoke(runner, "migrate", "--config", str(edge_toml), "--status")
    assert after.exit_code == 0
    assert "applied" in after.stdout and "pending" not in after.stdout


# ----------------------------------------------------------------------------------- status


def put_everywhere(runner: CliRunner, edge_toml: Path) -> None:
    """Two writes in the critical tier, one in each other tier."""
    writes = [
        ("critical", "a1"),
        ("critical", "a2"),
        ("important", "s1"),
        ("standard", "v1"),
        ("archive", "o1"),
    ]
    for tier, key in writes:
        result = invoke(
            runner, "edge", "put", "--config", str(edge_toml), CELLS[tier], "docs", key, '{"n": 1}'
        )
        assert result.exit_code == 0, result.output


def test_status_json_reports_pending_changes_per_tier(runner: CliRunner, edge_toml: Path) -> None:
    put_everywhere(runner, edge_toml)
    code, data = status_json(runner, edge_toml)
    assert code == 0
    assert data["schema"] == 1 and data["kind"] == "edge" and data["state"] == "ok"
    assert data["node_id"] == "lagos-clinic-12" and data["region"] == "west"
    assert data["hub_url"] is None
    assert data["db"]["path"] == str(tmp_db(edge_toml)) and data["db"]["bytes"] > 0
    tiers = {t["tier"]: t for t in data["tiers"]}
    assert [t["tier"] for t in data["tiers"]] == ["critical", "important", "standard", "archive"]
    assert {name: t["depth"] for name, t in tiers.items()} == {
        "critical": 2,
        "important": 1,
        "standard": 1,
        "archive": 1,
    }
    for t in data["tiers"]:
        assert t["state"] == "ok"
        assert t["bytes_pending"] > 0
        assert 0 <= t["oldest_pending_age_s"] < 60
        assert t["pull_cursor"] == 0 and t["dead_letters"] == 0
    assert tiers["critical"]["promise_s"] == 60  # tiers/critical.toml
    assert data["dead_letters"] == {"count": 0, "latest": []}

    table = invoke(runner, "status", "--config", str(edge_toml))
    assert table.exit_code == 0
    assert "critical" in table.stdout and "lagos-clinic-12" in table.stdout


def test_status_exit_2_when_a_tier_is_past_its_promise(runner: CliRunner, edge_toml: Path) -> None:
    put_everywhere(runner, edge_toml)
    age_outbox(tmp_db(edge_toml), lane=0, seconds=600)  # critical promises 60 s
    code, data = status_json(runner, edge_toml)
    assert code == 2
    assert data["state"] == "critical"
    states = {t["tier"]: t["state"] for t in data["tiers"]}
    assert states == {"critical": "critical", "important": "ok", "standard": "ok", "archive": "ok"}
    table = invoke(runner, "status", "--config", str(edge_toml))
    assert table.exit_code == 2


@pytest.mark.parametrize(
    ("free", "read_only", "state", "code", "shown"),
    [
        (0, False, "critical", 2, "0 B free"),
        (8 << 20, False, "critical", 2, "8.0 MiB free"),
        (100 << 20, False, "warning", 1, "100.0 MiB free"),
    ],
)
def test_status_says_when_the_disk_is_full_or_read_only(
    runner: CliRunner,
    edge_toml: Path,
    monkeypatch: pytest.MonkeyPatch,
    free: int,
    read_only: bool,
    state: str,
    code: int,
    shown: str,
) -> None:
    """A store that is about to refuse writes (no space, read-only disk) is not "ok",
    however empty its queues are."""
    put_everywhere(runner, edge_toml)
    usage = shutil.disk_usage(edge_toml.parent)
    monkeypatch.setattr(cli_module.shutil, "disk_usage", lambda _p: usage._replace(free=free))
    monkeypatch.setattr(cli_module.edge_sqlite, "read_only_filesystem", lambda _p: read_only)
    got, data = status_json(runner, edge_toml)
    assert got == code and data["state"] == state
    assert data["db"]["disk_state"] == state and data["db"]["read_only"] is read_only
    assert data["db"]["disk_free_bytes"] == free
    table = invoke(runner, "status", "--config", str(edge_toml))
    assert table.exit_code == code and shown in table.stdout


def test_status_on_a_read_only_filesystem_says_so(
    runner: CliRunner, edge_toml: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    put_everywhere(runner, edge_toml)
    monkeypatch.setattr(cli_module.edge_sqlite, "read_only_filesystem", lambda _p: True)
    result = invoke(runner, "status", "--config", str(edge_toml))
    assert result.exit_code == 1
    assert "read-only filesystem" in result.stderr and "remount" in result.stderr


def test_status_warning_past_half_the_overridden_promise(
    runner: CliRunner, edge_toml: Path
) -> None:
    edge_toml.write_text(EDGE_TOML + "\n[tier_policies.critical]\npromise_s = 1000\n")
    put_everywhere(runner, edge_toml)
    age_outbox(tmp_db(edge_toml), lane=0, seconds=600)  # past 500 s, not past 1000 s
    code, data = status_json(runner, edge_toml)
    assert code == 1
    critical = data["tiers"][0]
    assert critical["promise_s"] == 1000 and critical["state"] == "warning"
    assert data["state"] == "warning"


def test_status_warns_about_dead_letters(runner: CliRunner, edge_toml: Path) -> None:
    put_everywhere(runner, edge_toml)

    async def dead_letter() -> None:
        async with EdgeStore.open(
            tmp_db(edge_toml), node_id="lagos-clinic-12", region="west", tier_rules=TierRules()
        ) as store:
            assert await store.outbox.dead_letter(
                1, 1, code="invalid_value", message="field 'n' refused by the hub"
            )

    asyncio.run(dead_letter())
    code, data = status_json(runner, edge_toml)
    assert code == 1
    important = data["tiers"][1]
    assert important["state"] == "warning" and important["dead_letters"] == 1
    assert important["depth"] == 0
    assert data["dead_letters"]["count"] == 1
    latest = data["dead_letters"]["latest"][0]
    assert latest["code"] == "invalid_value" and latest["tier"] == "important"
    assert latest["cell"] == CELLS["important"] and "refused" in latest["message"]
    table = invoke(runner, "status", "--config", str(edge_toml))
    assert table.exit_code == 1 and "invalid_value" in table.stdout


def test_status_of_a_node_without_a_database(runner: CliRunner, edge_toml: Path) -> None:
    result = invoke(runner, "status", "--config", str(edge_toml), "--json")
    assert result.exit_code == 1
    assert "does not exist yet" in result.stderr and "hint: " in result.stderr
    assert not tmp_db(edge_toml).exists()


def test_hub_status_with_the_database_unreachable_exits_2(
    runner: CliRunner, tmp_path: Path
) -> None:
    hub_toml = tmp_path / "hub.toml"
    # Nothing listens on the port; the password must never be printed.
    hub_toml.write_text(
        'region = "west"\n'
        f'database_url = "postgresql://syncengine:pg-Secr3t@127.0.0.1:{free_port()}/west"\n'
    )
    result = invoke(runner, "status", "--config", str(hub_toml), "--json")
    assert result.exit_code == 2
    data = json.loads(result.stdout)
    assert data["schema"] == 1 and data["kind"] == "hub" and data["state"] == "critical"
    assert data["database"]["reachable"] is False and data["database"]["error"]
    assert data["cache"]["state"] == "not_configured"
    assert "pg-Secr3t" not in result.output and "***" in data["database"]["url"]
    table = invoke(runner, "status", "--config", str(hub_toml))
    assert table.exit_code == 2 and "pg-Secr3t" not in table.output


@pytest.mark.parametrize(
    ("age", "dead", "state"),
    [
        (None, 0, "ok"),
        (10.0, 0, "ok"),
        (31.0, 0, "warning"),
        (None, 2, "warning"),
        (61.0, 0, "critical"),
        (61.0, 3, "critical"),
    ],
)
def test_tier_state(age: float | None, dead: int, state: str) -> None:
    assert tier_state(age, 60, dead) == state


# --------------------------------------------------------------------------- global options


def test_version_via_python_m() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "syncengine", "--version"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("syncengine, version ")


def test_json_log_lines() -> None:
    record = logging.LogRecord(
        "syncengine.hub.app",
        logging.INFO,
        __file__,
        1,
        "listening on %s\nnext",
        ("127.0.0.1:8400",),
        None,
    )
    record.node = "lagos-clinic-12"  # what extra={"node": ...} sets
    line = log_formatter("json", tracebacks=True).format(record)
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["level"] == "INFO" and entry["logger"] == "syncengine.hub.app"
    assert entry["message"] == "listening on 127.0.0.1:8400\nnext"
    assert entry["node"] == "lagos-clinic-12" and entry["ts"].startswith("20")


def test_systemd_notify_sends_one_datagram(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:

    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(2)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        assert notify("READY=1") is True
        assert sock.recv(100) == b"READY=1"
        monkeypatch.delenv("NOTIFY_SOCKET")
        assert notify("READY=1") is False  # nobody listening: a no-op
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone.sock"))
    assert notify("STOPPING=1") is False  # logged, never raised


def test_tune_gc_freezes_start_up_objects_and_raises_thresholds() -> None:
    before = gc.get_threshold()
    try:
        tune_gc()
        assert gc.get_threshold() == GC_THRESHOLDS
        assert gc.get_freeze_count() > 0  # modules and config: out of the collector's way
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


def test_watchdog_interval_is_half_of_what_systemd_allows() -> None:

    assert watchdog_interval_s({}) is None
    assert watchdog_interval_s({"WATCHDOG_USEC": "10000000"}) == 5.0
    assert watchdog_interval_s({"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": "1"}) is (
        None if os.getpid() != 1 else 5.0
    )


# ---------------------------------------------------------------------------- example configs


def test_the_example_configs_load() -> None:
    edge = load_edge_config(REPO / "deploy" / "edge.toml.example", env={})
    assert edge.node_id == "lagos-clinic-12" and edge.region == "west"
    assert len(edge.tier_rules) == 3 and edge.resolvers["stock"] == "counter"
    hub = load_hub_config(REPO / "deploy" / "hub.toml.example", env={})
    assert hub.region == "west" and hub.redis_url is not None
    assert len(hub.tier_rules) >= 3 and hub.resolvers["stock"] == "counter"
    # And each is recognised for what it is by the loader `migrate` and `status` use.
    assert load_config(REPO / "deploy" / "edge.toml.example", env={}) == edge
    assert load_config(REPO / "deploy" / "hub.toml.example", env={}) == hub


def test_the_compose_configs_load_and_match() -> None:
    """deploy/compose.yaml's hub (with its DATABASE_URL) and edges: each edge subscribes
    within the region, and its token file is the one the register service writes."""
    folder = REPO / "deploy" / "compose"
    hub = load_hub_config(folder / "hub.toml", env={"DATABASE_URL": "postgresql://h/db"})
    assert hub.region == "west" and hub.listen_port == 8400
    compose = (REPO / "deploy" / "compose.yaml").read_text()
    for name in ("clinic", "pharmacy", "school"):
        edge = load_edge_config(folder / f"edge-{name}.toml", env={})
        assert edge.node_id == name and edge.hub_url == "http://lb:8400"
        assert str(edge.token_file) == f"/tokens/{name}"
        assert all(s.startswith("west/") for s in edge.subscriptions)
        assert f"{name}:{edge.subscriptions[0]}" in compose  # registered with that grant
