"""`syncengine edge sync`: one round against a real hub, exit codes a script can trust."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
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


async def test_status_tells_why_it_is_not_syncing(hub, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Pending changes in every tier, a dead letter, the hub away, then back."""
    token = await hub.add_node("lagos-clinic-12", CELL)
    online = edge_toml(tmp_path, hub.url, token)
    offline_path = tmp_path / "offline.toml"
    offline_path.write_text(online.read_text().replace(hub.url, f"http://127.0.0.1:{free_port()}"))
    cells = {"critical": f"{CELL}/alerts", "important": f"{CELL}/stock", "standard": CELL,
             "archive": f"{CELL}/2019"}
    first = await invoke("edge", "sync", "--config", str(online), "--now")  # learn the rules
    assert first.exit_code == 0, first.output
    for tier, cell in cells.items():
        put = await invoke("edge", "put", "--config", str(online), cell, "docs", tier, '{"n": 1}')
        assert put.exit_code == 0, put.output
    # A write outside the node's grants: the hub refuses it for good (a dead letter).
    put = await invoke("edge", "put", "--config", str(online), "west/ng/abuja", "docs", "x", '{"n": 1}')
    assert put.exit_code == 0, put.output

    failed = await invoke("edge", "sync", "--config", str(offline_path), "--now")
    assert failed.exit_code == 1
    status = await invoke("status", "--config", str(offline_path), "--json")
    assert status.exit_code == 1, status.output  # warning: nothing is late yet
    data = json.loads(status.output)
    assert data["hub"]["reachable"] is False and data["hub"]["error"]["code"] == "link_error"
    tiers = {t["tier"]: t for t in data["tiers"]}
    assert {t: tiers[t]["depth"] for t in cells} == {"critical": 1, "important": 1,
                                                      "standard": 2, "archive": 1}
    push = tiers["critical"]["last_push"]
    assert push["failing"] and push["error"]["code"] == "link_error"
    assert tiers["standard"]["pull_lag_source"] == "last_pull"  # from the first sync
    assert data["db"]["disk_free_bytes"] > 0
    table = await invoke("status", "--config", str(offline_path))
    assert "unreachable" in table.output and "failing" in table.output

    synced = await invoke("edge", "sync", "--config", str(online), "--now")
    assert synced.exit_code == 0, synced.output
    status = await invoke("status", "--config", str(online), "--json")
    data = json.loads(status.output)
    assert status.exit_code == 1  # the dead letter still wants an operator
    assert data["dead_letters"]["count"] == 1
    assert data["dead_letters"]["latest"][0]["code"] == "not_granted"
    assert data["hub"]["reachable"] is True and abs(data["hub"]["clock_offset_ms"]) < 2000
    assert data["hub"]["feed_head"] == await hub.hub.pool.fetchval("SELECT id FROM feed_head")
    for t in data["tiers"]:
        assert t["depth"] == 0 and t["pull_lag"] == 0 and t["pull_lag_source"] == "hub"
        assert t["last_push"]["ok_at"] is not None and not t["last_push"]["failing"]

    # --watch: one document per refresh until interrupted; the exit code is the last state's.
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "syncengine", "status", "--config", str(online), "--json",
        "--watch", "0.5", stdout=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL)
    assert proc.stdout is not None
    docs = [json.loads(await asyncio.wait_for(proc.stdout.readline(), 20)) for _ in range(2)]
    assert [d["kind"] for d in docs] == ["edge", "edge"]
    proc.send_signal(signal.SIGINT)
    assert await asyncio.wait_for(proc.wait(), 20) == 1


async def test_dead_letters_are_listed_retried_and_discarded(hub, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    token = await hub.add_node("lagos-clinic-12", CELL)
    config = str(edge_toml(tmp_path, hub.url, token))
    abuja = "west/ng/abuja"  # outside the node's grants: refused for good
    for key in ("x", "y"):
        put = await invoke("edge", "put", "--config", config, abuja, "docs", key, '{"n": 1}')
        assert put.exit_code == 0, put.output
    refused = await invoke("edge", "sync", "--config", config, "--now")
    assert refused.exit_code == 0 and "dead-lettered 2" in refused.output, refused.output
    # The hub's status tells the same story from its side.
    hub_toml = tmp_path / "hub.toml"
    hub_toml.write_text(f'region = "west"\ndatabase_url = "{hub.config.database_url}"\n'
                        f'redis_url = "{hub.config.redis_url}"\n')
    seen = await invoke("status", "--config", str(hub_toml), "--json")
    assert seen.exit_code == 0, seen.output
    hub_view = json.loads(seen.output)
    (node,) = hub_view["nodes"]
    assert node["last_error"]["code"] == "not_granted" and node["last_seen"] is not None
    assert set(node["pull_lag"]) == {"critical", "important", "standard", "archive"}
    assert hub_view["ingest"]["changes_5m"] == 0  # both refused: nothing applied
    assert hub_view["connections"]["used"] >= 1 and hub_view["cache"]["state"] == "ok"
    table = await invoke("status", "--config", str(hub_toml))
    assert "not_granted" in table.output and "ingest" in table.output
    listed = await invoke("edge", "dead-letters", "--config", config, "--json")
    assert listed.exit_code == 0, listed.output
    dead = json.loads(listed.output)["dead_letters"]
    assert [(d["key"], d["code"]) for d in dead] == [("x", "not_granted"), ("y", "not_granted")]
    x_id, y_id = dead[0]["id"], dead[1]["id"]
    table = await invoke("edge", "dead-letters", "--config", config)
    assert x_id in table.output and "not_granted" in table.output

    bad = await invoke("edge", "dead-letters", "--config", config, "--retry", "standard:999")
    assert bad.exit_code == 1 and "no dead letter standard:999" in bad.output
    unsure = await invoke("edge", "dead-letters", "--config", config, "--discard", y_id)
    assert unsure.exit_code == 1  # no confirmation on stdin: nothing discarded
    assert len(json.loads((await invoke(
        "edge", "dead-letters", "--config", config, "--json")).output)["dead_letters"]) == 2

    # The operator widens the grants; x goes again and lands.
    await hub.hub.pool.execute(
        "UPDATE nodes SET grants = $1 WHERE node_id = 'lagos-clinic-12'", [CELL, abuja])
    retried = await invoke("edge", "dead-letters", "--config", config, "--retry", x_id)
    assert retried.exit_code == 0 and "queued again: 1" in retried.output
    assert (await invoke("edge", "sync", "--config", config, "--now")).exit_code == 0
    assert await hub.hub.pool.fetchval(
        "SELECT doc FROM records WHERE cell = $1 AND key = 'x'", abuja) is not None

    # y is given up: the local copy follows the hub, which never had it.
    gone = await invoke("edge", "dead-letters", "--config", config, "--discard", y_id, "--yes")
    assert gone.exit_code == 0, gone.output
    got = await invoke("edge", "get", "--config", config, abuja, "docs", "y")
    assert got.exit_code == 1 and "not found" in got.output
    listed = await invoke("edge", "dead-letters", "--config", config)
    assert "no dead letters" in listed.output


async def test_hub_conflicts_lists_both_sides(hub, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    configs = []
    for name in ("a", "b"):
        folder = tmp_path / name
        folder.mkdir()
        token = await hub.add_node(f"clinic-{name}", CELL)
        path = edge_toml(folder, hub.url, token)
        path.write_text(path.read_text().replace("lagos-clinic-12", f"clinic-{name}"))
        configs.append(str(path))
        put = await invoke("edge", "put", "--config", str(path), CELL, "patients", "p1",
                           json.dumps({"ward": name}))
        assert put.exit_code == 0, put.output
    for config in configs:
        assert (await invoke("edge", "sync", "--config", config, "--now")).exit_code == 0
    hub_toml = tmp_path / "hub.toml"
    hub_toml.write_text(f'region = "west"\ndatabase_url = "{hub.config.database_url}"\n')

    listed = await invoke("hub", "conflicts", "--config", str(hub_toml), "--json")
    assert listed.exit_code == 0, listed.output
    (c,) = json.loads(listed.output)["conflicts"]
    assert (c["cell"], c["key"], c["field"]) == (CELL, "p1", "ward")
    assert {c["winner"]["node"], c["loser"]["node"]} == {"clinic-a", "clinic-b"}
    assert {c["winner"]["value"], c["loser"]["value"]} == {"a", "b"}
    table = await invoke("hub", "conflicts", "--config", str(hub_toml), "--cell", CELL)
    assert "p1" in table.output and "clinic-a" in table.output
    for args in (["--cell", "west/ng/abuja"], ["--since", "2999-01-01"]):
        none = await invoke("hub", "conflicts", "--config", str(hub_toml), *args)
        assert none.exit_code == 0 and "no conflicts" in none.output
    recent = await invoke("hub", "conflicts", "--config", str(hub_toml), "--since", "1h", "--json")
    assert len(json.loads(recent.output)["conflicts"]) == 1
    # Each edge's status shows the conflict from its side.
    for config, me, other in ((configs[0], "clinic-a", "clinic-b"), (configs[1], "clinic-b", "clinic-a")):
        status = json.loads((await invoke("status", "--config", config, "--json")).output)
        seen = status["hub"]["conflicts"]
        assert seen["count_24h"] == 1 and seen["latest"][0]["other_node"] == other
        assert seen["latest"][0]["won"] == (c["winner"]["node"] == me)
    table = await invoke("status", "--config", configs[0])
    assert "conflicts with this node in the last day: 1" in table.output
    bad = await invoke("hub", "conflicts", "--config", str(hub_toml), "--since", "yesterday")
    assert bad.exit_code == 2 and "neither an ISO 8601 time" in bad.output
    bad = await invoke("hub", "conflicts", "--config", str(hub_toml), "--cell", "West/../x")
    assert bad.exit_code == 1 and "error:" in bad.output


async def test_hub_verify_finds_what_was_broken(hub, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    token = await hub.add_node("lagos-clinic-12", CELL)
    config = str(edge_toml(tmp_path, hub.url, token))
    for i in range(6):
        put = await invoke("edge", "put", "--config", config, f"{CELL}/stock", "stock", "item",
                           json.dumps({"qty": i + 1}))
        assert put.exit_code == 0, put.output
        put = await invoke("edge", "put", "--config", config, CELL, "visits", f"v{i}",
                           json.dumps({"i": i}))
        assert put.exit_code == 0, put.output
    assert (await invoke("edge", "sync", "--config", config, "--now")).exit_code == 0
    hub_toml = tmp_path / "hub.toml"
    hub_toml.write_text(f'region = "west"\ndatabase_url = "{hub.config.database_url}"\n'
                        'resolvers = { stock = "counter" }\n')

    clean = await invoke("hub", "verify", "--config", str(hub_toml), "--deep", "--json")
    assert clean.exit_code == 0, clean.output
    report = json.loads(clean.output)
    assert report["ok"] and len(report["checks"]) == 8

    pool = hub.hub.pool
    await pool.execute("UPDATE node_lanes SET acked_seq = 1")
    await pool.execute("UPDATE records SET state = (SELECT state FROM records "
                       "WHERE key = 'v0') WHERE key = 'v1'")
    await pool.execute("DELETE FROM feed WHERE id = (SELECT feed_id FROM records WHERE key = 'v5')")
    await pool.execute("INSERT INTO feed SELECT id + 1000, tier, cell, collection, key, node_id, "
                       "lane, seq, hlc, fields, base FROM feed WHERE key = 'v2'")
    broken = await invoke("hub", "verify", "--config", str(hub_toml), "--deep", "--json")
    assert broken.exit_code == 1
    failed = {c["name"]: c for c in json.loads(broken.output)["checks"] if not c["ok"]}
    assert set(failed) == {
        "feed ids are contiguous from the retention horizon to the head",
        "every change of a node is in the feed once",
        "every change in the feed is at or below its node's acknowledged seq",
        "every record's last feed entry exists",
        "records equal the replay of the feed",
    }, failed
    assert any("v1" in e for e in failed["records equal the replay of the feed"]["examples"])
    table = await invoke("hub", "verify", "--config", str(hub_toml))
    assert table.exit_code == 1 and "found" in table.output and "ok" in table.output


async def test_bundles_through_the_command_line(hub, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    token = await hub.add_node("lagos-clinic-12", CELL)
    config = str(edge_toml(tmp_path, f"http://127.0.0.1:{free_port()}", token))  # no network
    put = await invoke("edge", "put", "--config", config, CELL, "visits", "v1", '{"a": 1}')
    assert put.exit_code == 0, put.output
    hub_toml = tmp_path / "hub.toml"
    hub_toml.write_text(f'region = "west"\ndatabase_url = "{hub.config.database_url}"\n')
    out, reply = tmp_path / "out.bundle", tmp_path / "reply.bundle"
    made = await invoke("edge", "export-bundle", "--config", config, str(out))
    assert made.exit_code == 0 and "1 changes" in made.output, made.output
    imported = await invoke("hub", "import-bundle", "--config", str(hub_toml), str(out),
                            "--reply", str(reply))
    assert imported.exit_code == 0 and "1 changes applied" in imported.output, imported.output
    back = await invoke("edge", "import-bundle", "--config", config, str(reply))
    assert back.exit_code == 0 and "1 queued changes are now at the hub" in back.output
    status = json.loads((await invoke("status", "--config", config, "--json")).output)
    assert all(t["depth"] == 0 for t in status["tiers"])
    again = await invoke("hub", "export-bundle", "--config", str(hub_toml), "--node",
                         "lagos-clinic-12", str(reply))
    assert again.exit_code == 1 and "exists already" in again.output
    broken = tmp_path / "broken.bundle"
    broken.write_bytes(out.read_bytes()[:100])
    refused = await invoke("hub", "import-bundle", "--config", str(hub_toml), str(broken))
    assert refused.exit_code == 1 and "cut short" in refused.output
