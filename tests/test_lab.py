"""The local world: real Postgres streaming replication through the emulated links."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid

import psycopg
import pytest

from latitude.lab import LabAlreadyRunning, LabWorld

TABLE = "lab_probe"


def urls(world: LabWorld) -> dict[str, str]:
    return {r["name"]: r["database_url"] for r in world.status()["regions"]}


@pytest.fixture(scope="module")
def probe_table(world):
    primary = urls(world)[world.topology().primary.name]
    with psycopg.connect(primary, autocommit=True) as c:
        c.execute(
            f"create table if not exists {TABLE} (id text primary key, at timestamptz default now())"
        )
    return primary


def wait_for_row(url: str, row_id: str, timeout: float) -> float | None:
    """Poll a replica until the row appears; return when (monotonic), or None."""
    deadline = time.monotonic() + timeout
    with psycopg.connect(url, autocommit=True) as c:
        while time.monotonic() < deadline:
            try:
                if c.execute(f"select 1 from {TABLE} where id = %s", (row_id,)).fetchone():
                    return time.monotonic()
            except psycopg.errors.UndefinedTable:
                pass
            time.sleep(0.002)
    return None


def test_row_committed_at_primary_is_readable_on_every_replica(world, probe_table):
    row = str(uuid.uuid4())
    with psycopg.connect(probe_table, autocommit=True) as c:
        c.execute(f"insert into {TABLE} (id) values (%s)", (row,))
    for name, url in urls(world).items():
        assert wait_for_row(url, row, timeout=10), f"row not replicated to {name}"


def test_replication_crosses_the_emulated_ocean(healed, probe_table):
    world = healed
    world.link("set", "us-west", "eu-west", rtt_ms=200)
    replica = urls(world)["eu-west"]
    delays = []
    for _ in range(3):
        row = str(uuid.uuid4())
        with psycopg.connect(probe_table, autocommit=True) as c:
            # Timed from the insert's sending: the WAL leaves as the commit is made, before its
            # acknowledgment reaches us (one CI run, two test workers busy, saw the row 91 ms
            # after the acknowledgment, over a link 100 ms each way).
            sent = time.monotonic()
            c.execute(f"insert into {TABLE} (id) values (%s)", (row,))
        seen = wait_for_row(replica, row, timeout=10)
        assert seen is not None
        delays.append((seen - sent) * 1000)
    # One way is half the RTT: the WAL cannot arrive sooner than ~100 ms after the insert.
    assert min(delays) >= 95, delays
    assert min(delays) < 600, delays


def test_cut_link_stops_replication_and_heal_catches_up(healed, probe_table):
    world = healed
    replica = urls(world)["eu-west"]
    world.link("cut", "us-west", "eu-west")
    rows = [str(uuid.uuid4()) for _ in range(20)]
    with psycopg.connect(probe_table, autocommit=True) as c:
        for row in rows:  # the primary keeps accepting writes
            c.execute(f"insert into {TABLE} (id) values (%s)", (row,))
    assert wait_for_row(replica, rows[-1], timeout=1.0) is None, "replication crossed a cut link"
    # ap-southeast's link is intact: it still receives the rows
    assert wait_for_row(urls(world)["ap-southeast"], rows[-1], timeout=10)
    world.link("heal", "us-west", "eu-west")
    assert wait_for_row(replica, rows[-1], timeout=20), "replica did not catch up after heal"
    with psycopg.connect(replica) as c:
        got = {r[0] for r in c.execute(f"select id from {TABLE} where id = any(%s)", (rows,))}
    assert got == set(rows)


def test_status_json_lists_regions_for_scripts(world):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "latitude.cli",
            "lab",
            "status",
            "--json",
            "--state-dir",
            str(world.state_dir),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    by_name = {r["name"]: r for r in status["regions"]}
    assert by_name["us-west"]["role"] == "primary"
    assert by_name["eu-west"]["role"] == "replica"
    for r in by_name.values():
        with psycopg.connect(r["database_url"]) as c:
            assert c.execute("select 1").fetchone() == (1,)
    assert {(link["a"], link["b"]) for link in status["links"]} >= {("us-west", "eu-west")}


def test_second_up_is_refused(world):
    with pytest.raises(LabAlreadyRunning, match="already running"):
        LabWorld(world.state_dir).up()
    result = subprocess.run(
        [sys.executable, "-m", "latitude.cli", "lab", "up", "--state-dir", str(world.state_dir)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1 and "already running" in result.stderr
    assert "Traceback" not in result.stderr


def test_kill_and_revive_a_replica_database(world, probe_table):
    world.kill("ap-southeast", "db")
    assert "ap-southeast db" in world.status()["down"]
    world.revive("ap-southeast", "db")
    row = str(uuid.uuid4())
    with psycopg.connect(probe_table, autocommit=True) as c:
        c.execute(f"insert into {TABLE} (id) values (%s)", (row,))
    assert wait_for_row(urls(world)["ap-southeast"], row, timeout=20)


def pids_under(path: str) -> list[str]:
    out = subprocess.run(
        ["ps", "-ww", "-eo", "pid=,stat=,args="], capture_output=True, text=True
    ).stdout
    return [
        line
        for line in out.splitlines()
        if path in line and " Z" not in line and "ps -eo" not in line
    ]


def test_down_leaves_no_process(tmp_path):
    topology = tmp_path / "two.toml"
    topology.write_text(
        '[lab]\n[[regions]]\nname = "a"\nprimary = true\nlocation = [0, 0]\n'
        '[[regions]]\nname = "b"\nlocation = [10, 10]\n[links]\ndefault_rtt_ms = 20\n'
    )
    state = tmp_path / "state"
    cli = [sys.executable, "-m", "latitude.cli", "lab"]
    up = subprocess.run(
        [*cli, "up", "--topology", str(topology), "--state-dir", str(state)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    try:
        assert up.returncode == 0, up.stderr
        # The steps run concurrently, and each still says what it is doing.
        for step in (
            "WAN emulator (1 links)",
            "a: initdb",
            "b: pg_basebackup from a",
            "a: start the Valkey",
            "b: start the Valkey",
            "waiting for replicas",
            "world up in",
        ):
            assert step in up.stderr, up.stderr
        data_root = json.loads((state / "state.json").read_text())["data_root"]
        assert pids_under(str(state)) and pids_under(data_root)
    finally:
        down = subprocess.run(
            [*cli, "down", "--state-dir", str(state)], capture_output=True, text=True, timeout=120
        )
    assert down.returncode == 0, down.stderr
    assert "link supervisor" in down.stdout
    assert pids_under(str(state)) == [] and pids_under(data_root) == []
    assert not os.path.exists(state / "state.json")


def test_a_failed_step_stops_the_steps_started_beside_it(tmp_path):
    """Valkey cannot start while the databases start in parallel: `up` names the step that failed
    and leaves nothing running."""
    topology = tmp_path / "two.toml"
    topology.write_text(
        '[lab]\n[[regions]]\nname = "a"\nprimary = true\nlocation = [0, 0]\n'
        '[[regions]]\nname = "b"\nlocation = [10, 10]\n[links]\ndefault_rtt_ms = 20\n'
    )
    state = tmp_path / "state"
    env = {**os.environ, "LATITUDE_VALKEY_SERVER": "/bin/false"}
    cli = [sys.executable, "-m", "latitude.cli", "lab"]
    up = subprocess.run(
        [*cli, "up", "--topology", str(topology), "--state-dir", str(state)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert up.returncode == 1
    assert "Valkey (/bin/false) exited at start-up" in up.stderr
    assert "start-up failed; stopping what was started" in up.stderr
    assert "a: stopping Postgres" in up.stderr  # the primary started beside it is stopped
    assert "Traceback" not in up.stderr
    assert pids_under(str(state)) == []
    assert not os.path.exists(state / "state.json")
