"""The ``syncengine`` command line against a real region database: migrate, the node
lifecycle (add, list, rotate, revoke), status, and ``hub run`` as a real process that stops
cleanly on SIGTERM and speaks the systemd notify protocol."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from click.testing import CliRunner, Result

from support.servers import free_port
from syncengine.cli import cli
from syncengine.hub.retention import DAYS_AHEAD

pytestmark = pytest.mark.integration

NODE = "lagos-clinic-12"
GRANT = "west/ng/lagos/clinic-12"
CLEAN_ENV: dict[str, str | None] = {
    "SYNCENGINE_CONFIG": None,
    "SYNCENGINE_DATABASE_URL": None,
    "SYNCENGINE_REDIS_URL": None,
    "DATABASE_URL": None,
    "REDIS_URL": None,
}


def write_hub_toml(folder: Path, database_url: str, redis_url: str | None = None) -> Path:
    path = folder / "hub.toml"
    lines = [
        'region = "west"',
        f'listen = "127.0.0.1:{free_port()}"',
        f'database_url = "{database_url}"',
        f'tier_rules = [{{ prefix = "{GRANT}/alerts", tier = "critical" }}]',
    ]
    if redis_url is not None:
        lines.append(f'redis_url = "{redis_url}"')
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner(env=CLEAN_ENV)


@pytest.fixture
def hub_toml(tmp_path: Path, pg_dsn: str) -> Path:
    return write_hub_toml(tmp_path, pg_dsn)


def invoke(runner: CliRunner, *args: str) -> Result:
    return runner.invoke(cli, list(args), catch_exceptions=False)


def query(dsn: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    async def fetch() -> list[asyncpg.Record]:
        conn = await asyncpg.connect(dsn)
        try:
            return list(await conn.fetch(sql, *args))
        finally:
            await conn.close()

    return asyncio.run(fetch())


def test_migrate_then_the_node_lifecycle(runner: CliRunner, hub_toml: Path, pg_dsn: str) -> None:
    config = str(hub_toml)
    before = invoke(runner, "migrate", "--config", config, "--status")
    assert before.exit_code == 0, before.output
    assert "0001" in before.stdout and "pending" in before.stdout

    migrated = invoke(runner, "migrate", "--config", config)
    assert migrated.exit_code == 0, migrated.output
    assert "applied 0001_init" in migrated.stdout
    assert "up to date" in invoke(runner, "migrate", "--config", config).stdout
    after = invoke(runner, "migrate", "--config", config, "--status")
    assert "applied" in after.stdout and "pending" not in after.stdout

    # add-node: the token alone on stdout (not a TTY), only its SHA-256 in the database.
    added = invoke(
        runner,
        "hub",
        "add-node",
        NODE,
        "--grant",
        GRANT,
        "--grant",
        "west/ng/lagos/registry",
        "--config",
        config,
    )
    assert added.exit_code == 0, added.output
    token = added.stdout.strip()
    assert added.stdout == token + "\n" and token.startswith("se1_") and len(token) > 40
    rows = query(pg_dsn, "SELECT token_hash, grants FROM nodes WHERE node_id = $1", NODE)
    assert len(rows[0]["token_hash"]) == 32
    assert rows[0]["token_hash"] == hashlib.sha256(token.encode()).digest()
    assert rows[0]["grants"] == [GRANT, "west/ng/lagos/registry"]
    leaks = query(
        pg_dsn, "SELECT count(*) AS n FROM nodes WHERE nodes::text LIKE $1", f"%{token[4:]}%"
    )
    assert leaks[0]["n"] == 0

    again = invoke(runner, "hub", "add-node", NODE, "--grant", GRANT, "--config", config)
    assert again.exit_code == 1 and "already registered" in again.stderr
    foreign = invoke(
        runner, "hub", "add-node", "nairobi-1", "--grant", "east/ke", "--config", config
    )
    assert foreign.exit_code == 1 and "east/ke" in foreign.stderr and "hint: " in foreign.stderr
    no_grant = invoke(runner, "hub", "add-node", "x-1", "--config", config)
    assert no_grant.exit_code == 2  # --grant is required: a usage error

    listed = invoke(runner, "hub", "nodes", "--config", config, "--json")
    assert listed.exit_code == 0, listed.output
    data = json.loads(listed.stdout)
    assert data["schema"] == 1 and data["kind"] == "nodes"
    assert [(n["node_id"], n["revoked"], n["last_seen"]) for n in data["nodes"]] == [
        (NODE, False, None)
    ]
    assert data["nodes"][0]["grants"] == [GRANT, "west/ng/lagos/registry"]
    assert token not in listed.output
    table = invoke(runner, "hub", "nodes", "--config", config)
    assert table.exit_code == 0 and NODE in table.stdout and token not in table.stdout

    rotated = invoke(runner, "hub", "rotate-token", NODE, "--config", config)
    assert rotated.exit_code == 0, rotated.output
    new_token = rotated.stdout.strip()
    assert new_token.startswith("se1_") and new_token != token
    rows = query(pg_dsn, "SELECT token_hash FROM nodes WHERE node_id = $1", NODE)
    assert rows[0]["token_hash"] == hashlib.sha256(new_token.encode()).digest()
    unknown = invoke(runner, "hub", "rotate-token", "nobody", "--config", config)
    assert unknown.exit_code == 1 and "nobody" in unknown.stderr

    revoked = invoke(runner, "hub", "revoke", NODE, "--config", config)
    assert revoked.exit_code == 0, revoked.output
    assert new_token not in revoked.output
    data = json.loads(invoke(runner, "hub", "nodes", "--config", config, "--json").stdout)
    assert data["nodes"][0]["revoked"] is True

    status = invoke(runner, "status", "--config", config, "--json")
    assert status.exit_code == 0, status.output
    report = json.loads(status.stdout)
    assert report["schema"] == 1 and report["kind"] == "hub" and report["state"] == "ok"
    assert report["region"] == "west"
    assert report["database"]["reachable"] is True and report["database"]["migrated"] is True
    assert report["feed_head"] == 0 and report["conflicts"] == 0
    assert report["cache"]["state"] == "not_configured"
    [node] = report["nodes"]
    assert node["node_id"] == NODE and node["revoked"] is True
    assert node["acked_seq"] == {"critical": 0, "important": 0, "standard": 0, "archive": 0}
    assert new_token not in status.output
    shown = invoke(runner, "status", "--config", config)
    assert shown.exit_code == 0 and NODE in shown.stdout


def test_admin_commands_before_migrate_say_what_to_do(runner: CliRunner, hub_toml: Path) -> None:
    result = invoke(runner, "hub", "add-node", NODE, "--grant", GRANT, "--config", str(hub_toml))
    assert result.exit_code == 1
    assert "no syncengine schema" in result.stderr
    assert "syncengine migrate" in result.stderr
    status = invoke(runner, "status", "--config", str(hub_toml), "--json")
    assert status.exit_code == 2
    assert json.loads(status.stdout)["database"]["migrated"] is False


def test_status_reports_the_cache(
    runner: CliRunner, tmp_path: Path, pg_dsn: str, redis_url: str
) -> None:
    config = str(write_hub_toml(tmp_path, pg_dsn, redis_url))
    assert invoke(runner, "migrate", "--config", config).exit_code == 0
    report = json.loads(invoke(runner, "status", "--config", config, "--json").stdout)
    assert report["cache"]["configured"] is True and report["cache"]["state"] == "ok"


def test_hub_feed_shows_the_partitions_and_prunes_on_demand(
    runner: CliRunner, hub_toml: Path
) -> None:
    config = str(hub_toml)
    assert invoke(runner, "migrate", "--config", config).exit_code == 0
    shown = json.loads(invoke(runner, "hub", "feed", "--config", config, "--json").stdout)
    assert shown["kind"] == "feed" and shown["dry_run"] is True
    assert [p["name"] for p in shown["partitions"]] == ["feed_p_initial"]
    assert shown["horizon"] == 0 and shown["retention_days"] == 30 and shown["created"] == []
    pruned = json.loads(
        invoke(runner, "hub", "feed", "--config", config, "--prune", "--json").stdout
    )
    # feed_p_initial ends tomorrow; the days after it, up to a week ahead, are made.
    assert pruned["dry_run"] is False and len(pruned["created"]) == DAYS_AHEAD - 1
    assert len(pruned["partitions"]) == DAYS_AHEAD and pruned["dropped"] == []
    table = invoke(runner, "hub", "feed", "--config", config)
    assert table.exit_code == 0
    assert "horizon 0, kept 30 days" in table.stdout and "feed_p_initial" in table.stdout


@contextlib.contextmanager
def notify_socket() -> Iterator[tuple[str, socket.socket]]:
    """An abstract unix datagram socket standing in for systemd's NOTIFY_SOCKET."""
    name = f"syncengine-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(30)
        yield "@" + name, sock


def wait_healthy(url: str, proc: subprocess.Popen[bytes], timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, "hub run exited before it was healthy"
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.1)
    raise AssertionError(f"{url} did not answer within {timeout_s} s")


def test_hub_run_serves_and_stops_cleanly_on_sigterm(
    tmp_path: Path, pg_dsn: str, redis_url: str
) -> None:
    hub_toml = write_hub_toml(tmp_path, pg_dsn, redis_url)
    listen = next(line for line in hub_toml.read_text().splitlines() if line.startswith("listen"))
    address = listen.split('"')[1]
    env = {k: v for k, v in os.environ.items() if k not in CLEAN_ENV and k != "NOTIFY_SOCKET"}
    with notify_socket() as (notify_name, notify):
        env["NOTIFY_SOCKET"] = notify_name
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "syncengine",
                "hub",
                "run",
                "--config",
                str(hub_toml),
                "--log-format",
                "json",
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            wait_healthy(f"http://{address}/healthz", proc)
            assert notify.recv(256) == b"READY=1"
            proc.send_signal(signal.SIGTERM)
            started = time.monotonic()
            _, stderr = proc.communicate(timeout=10)
            assert time.monotonic() - started < 10
            assert proc.returncode == 0, stderr.decode()
            assert notify.recv(256) == b"STOPPING=1"
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    entries = [json.loads(line) for line in stderr.decode().splitlines()]
    messages = [e["message"] for e in entries]
    assert all({"ts", "level", "logger", "message"} <= e.keys() for e in entries)
    assert any("listening on" in m for m in messages)
    assert "hub ready" in messages and "received SIGTERM; shutting down" in messages
    assert messages[-1] == "hub stopped"
    # The config is logged, but only its redacted form.
    assert any(m.startswith("starting hub:") for m in messages)


def test_hub_run_on_a_busy_port_is_a_clear_error(runner: CliRunner, hub_toml: Path) -> None:
    text = hub_toml.read_text()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        lines = [
            f'listen = "127.0.0.1:{port}"' if line.startswith("listen") else line
            for line in text.splitlines()
        ]
        hub_toml.write_text("\n".join(lines) + "\n")
        result = invoke(runner, "hub", "run", "--config", str(hub_toml))
    assert result.exit_code == 1
    assert f"error: cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "hint: " in result.stderr
