"""Bad input to the real `latitude` command: one clear line on stderr, no traceback, exit 2.

Each test runs `python -m latitude.cli` as a subprocess; none needs a running lab (a missing
lab is itself the input where a lab is asked about)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def latitude(*args: str, cwd: Path | None = None, env: dict | None = None):
    return subprocess.run(
        [sys.executable, "-m", "latitude.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, "COLUMNS": "120", **(env or {})},
        timeout=60,
    )


def one_error_line(result, code: int) -> str:
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert result.returncode == code, (result.returncode, result.stderr)
    return lines[0]


@pytest.mark.parametrize(
    "args, names",
    [
        (["lab", "link", "set", "us-west", "eu-west", "--rtt", "abc"], "--rtt"),
        (["dns", "--port", "abc"], "--port"),
        (["demo", "--reads", "abc"], "--reads"),
        (["check", "a", "b"], "(b)"),
        (["lab", "status", "--json", "extra"], "(extra)"),
        (["mirror", "serve", "--bogus"], "--bogus"),
        (["bogus"], "No such command 'bogus'; see `latitude --help`"),
    ],
)
def test_usage_errors_are_one_line_and_exit_2(args, names):
    line = one_error_line(latitude(*args), 2)
    assert line.startswith("error: ") and names in line, line
    assert "--help" in line, line


def lab_topology() -> str:
    from latitude.topology import default_lab_topology_path

    return str(default_lab_topology_path())


def test_failover_watch_names_an_unknown_region():
    line = one_error_line(
        latitude("failover", "watch", "--region", "mars", "-t", lab_topology()), 2
    )
    assert "mars" in line and "us-west" in line and "--region" in line, line


def test_topology_problems_keep_their_brackets(tmp_path):
    (tmp_path / "empty.toml").write_text("")
    result = latitude("check", "empty.toml", cwd=tmp_path)
    assert "Traceback" not in result.stderr and result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert any(line.startswith("empty.toml: regions:") and "[[regions]]" in line for line in lines)
    assert any("[[signing.keys]]" in line for line in lines), result.stderr
    assert "[]" not in result.stderr, result.stderr


@pytest.mark.parametrize(
    "args, says",
    [
        (["lab", "link", "explode", "us-west", "eu-west"], "unknown link action 'explode'"),
        (["lab", "link", "set", "us-west", "eu-west", "--rtt", "-5"], "--rtt must be >= 0"),
        (["lab", "link", "set", "us-west", "eu-west", "--jitter", "-1"], "--jitter must be >= 0"),
        (["lab", "link", "set", "us-west", "eu-west"], "needs --rtt"),
    ],
)
def test_bad_link_requests_exit_2_before_asking_the_lab(tmp_path, args, says):
    line = one_error_line(latitude(*args, "--state-dir", str(tmp_path / "none")), 2)
    assert says in line, line


def test_a_missing_lab_is_a_world_problem_exit_1(tmp_path):
    line = one_error_line(latitude("lab", "kill", "us-west", "db", "--state-dir", str(tmp_path)), 1)
    assert "no lab world" in line and "latitude lab up" in line, line


def lab_state(tmp_path: Path) -> Path:
    # The lab's own files, as `lab up` writes them, for a world that has no processes left:
    # naming a region or part it lacks is refused before any process is touched.
    import shutil

    from latitude.lab.state import LabState, RegionState

    shutil.copy(lab_topology(), tmp_path / "topology.toml")
    regions = {}
    for i, name in enumerate(("us-west", "eu-west")):
        (tmp_path / "regions" / name).mkdir(parents=True)
        regions[name] = RegionState(
            role="replica",
            pg_port=1 + i,
            pg_data=str(tmp_path / "regions" / name / "pg" / "data"),
            valkey_port=3 + i,
            app_port=5 + i,
            mirror_port=7 + i,
            topology_file=str(tmp_path / "regions" / name / "topology.toml"),
        )
    LabState(
        started_at=0.0,
        source_topology=str(lab_topology()),
        secret="s" * 32,
        data_root=str(tmp_path / "regions"),
        pg_bin=str(tmp_path / "no-bin"),
        valkey_bin=str(tmp_path / "no-valkey"),
        run_as="nobody",
        supervisor_pid_file=str(tmp_path / "supervisor.pid"),
        primary="us-west",
        regions=regions,
    ).save(tmp_path / "state.json")
    return tmp_path


@pytest.mark.parametrize(
    "region, part, says",
    [
        ("mars", "db", "no region 'mars' in the lab (regions: us-west, eu-west)"),
        ("eu-west", "brain", "unknown part 'brain' of eu-west; use one of db, sessions"),
    ],
)
@pytest.mark.parametrize("verb", ["kill", "revive"])
def test_kill_and_revive_of_no_such_part_exit_2(tmp_path, verb, region, part, says):
    line = one_error_line(
        latitude("lab", verb, region, part, "--state-dir", str(lab_state(tmp_path))), 2
    )
    assert says in line, line


def test_lab_place_error_is_one_unwrapped_line(tmp_path):
    result = latitude("lab", "place", "Atlantis", "--state-dir", str(tmp_path))
    line = one_error_line(result, 2)
    # Longer than the 120 columns piped output gets, and still whole: the last place is on it.
    assert "'Atlantis'" in line and "known places:" in line and len(line) > 120, line
    from latitude.lab.places import PLACES

    assert line.rstrip().endswith(PLACES[-1].name), line


@pytest.mark.parametrize("args", [[], ["missing.toml"]])
def test_check_without_a_file_says_how_check_takes_one(tmp_path, args):
    line = one_error_line(latitude("check", *args, cwd=tmp_path), 2)
    assert "file not found" in line and "latitude check PATH" in line, line
    assert "--topology" not in line, line


def test_rejoin_of_the_primary_says_it_is_the_primary(tmp_path):
    line = one_error_line(latitude("rejoin", "us-west", "--state-dir", str(lab_state(tmp_path))), 2)
    assert "us-west is the primary" in line and "latitude lab revive us-west db" in line, line


def test_rejoin_of_no_such_region_exits_2(tmp_path):
    line = one_error_line(latitude("rejoin", "mars", "--state-dir", str(lab_state(tmp_path))), 2)
    assert "no region 'mars'" in line, line


# ---- in the shared world: what only a running lab can answer ----------------------------


def test_lab_status_cuts_no_header_or_figure_at_120_columns(world):
    result = latitude("lab", "status", "--state-dir", str(world.state_dir))
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert "…" not in result.stdout, result.stdout
    assert all(len(line) <= 120 for line in result.stdout.splitlines()), result.stdout
    for region in ("us-west", "eu-west", "ap-southeast"):
        assert region in result.stdout, result.stdout


def test_cutting_a_link_to_no_such_region_exits_2(world):
    line = one_error_line(
        latitude("lab", "link", "cut", "us-west", "mars", "--state-dir", str(world.state_dir)), 2
    )
    assert "mars" in line, line
