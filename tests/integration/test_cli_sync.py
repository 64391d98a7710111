"""`syncengine edge sync`: one round against a real hub, exit codes a script can trust."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from support.servers import free_port
from syncengine.cli import cli

pytestmark = pytest.mark.integration

CELL = "west/ng/lagos/clinic-12"


async def invoke(*args: str):  # type: ignore[no-untyped-def]
    """Run the CLI in a worker thread: it calls asyncio.run, which cannot nest in our loop."""
    return await asyncio.to_thread(CliRunner().invoke, cli, list(args))


def edge_toml(tmp_path: Path, hub_url: str, token: str) -> Path:
    (tmp_path / "token").write_text(token + "\n")
    path = tmp_path / "edge.toml"
    path.write_text(
        f'node_id = "lagos-clinic-12"\nregion = "west"\ndb = "edge.db"\n'
        f'hub_url = "{hub_url}"\ntoken_file = "token"\nsubscriptions = ["{CELL}"]\n'
        # The offline rule, as the hub has it: before the first sync the edge's own apply.
        f'tier_rules = [{{ prefix = "{CELL}/alerts", tier = "critical" }}]\n'
    )
    return path


async def test_edge_sync_pushes_and_exits_zero(hub, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    token = await hub.add_node("lagos-clinic-12", CELL)
    config = edge_toml(tmp_path, hub.url, token)
    for key in ("a", "b"):
        put = await invoke("edge", "put", "--config", str(config), f"{CELL}/alerts", "alarms",
                           key, '{"level": "high"}')
        assert put.exit_code == 0, put.output
    put = await invoke("edge", "put", "--config", str(config), CELL, "visits", "v1",
                       '{"reason": "fever"}')
    assert put.exit_code == 0, put.output
    result = await invoke("edge", "sync", "--config", str(config), "--now", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["caught_up"] and report["pushed"]["critical"] == 2
    assert report["pushed"]["standard"] == 1 and report["errors"] == []
    assert await hub.hub.pool.fetchval("SELECT count(*) FROM feed") == 3
    # Without --now, off-peak tiers are skipped outside their window (or synced inside it).
    plain = await invoke("edge", "sync", "--config", str(config))
    assert plain.exit_code == 0, plain.output
    assert "critical: pushed 0" in plain.output


async def test_edge_sync_exits_one_when_the_hub_is_unreachable(hub, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    token = await hub.add_node("lagos-clinic-12", CELL)
    config = edge_toml(tmp_path, f"http://127.0.0.1:{free_port()}", token)
    put = await invoke("edge", "put", "--config", str(config), f"{CELL}/alerts", "alarms", "x",
                       '{"level": "high"}')
    assert put.exit_code == 0, put.output
    result = await invoke("edge", "sync", "--config", str(config), "--now", "--tier", "critical")
    assert result.exit_code == 1, result.output
    assert "link" in result.output.lower()
    status = await invoke("status", "--config", str(config), "--json")
    tiers = {t["tier"]: t for t in json.loads(status.output)["tiers"]}
    assert tiers["critical"]["depth"] == 1  # nothing lost, still queued
