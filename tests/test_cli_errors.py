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
