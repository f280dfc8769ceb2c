"""`latitude mirror demo` in the shared lab world (issue 10, item 7)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(120)


def test_mirror_demo_publishes_and_reports_every_region(world, tmp_path):
    regions = list(world.state().regions)
    try:
        r = subprocess.run(
            [sys.executable, "-m", "latitude.cli", "mirror", "demo"]
            + ["--state-dir", str(world.state_dir)],
            cwd=tmp_path,
            env={**os.environ, "COLUMNS": "200"},
            capture_output=True,
            text=True,
            timeout=90,
        )
        assert r.returncode == 0, r.stdout + r.stderr
        m = re.search(r"published /demo/hello.json at us-west as serial (\d+)", r.stdout)
        assert m, r.stdout
        for region in regions:
            had = re.search(rf"{region}\s+had it after\s+([\d.]+) ms", r.stdout)
            assert had, (region, r.stdout)
        body = (world.state_dir / "regions/ap-southeast/mirror/demo/hello.json").read_bytes()
        assert body == (world.state_dir / "regions/us-west/mirror/demo/hello.json").read_bytes()
    finally:
        for region in regions:
            world.kill(region, "mirror")
            if region != world.state().primary:
                world.kill(region, "mirror-sync")


def test_mirror_demo_without_a_lab_says_how_to_start_one(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "latitude.cli", "mirror", "demo", "--state-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 1 and "latitude lab up" in r.stderr and "Traceback" not in r.stderr
