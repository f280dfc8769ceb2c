"""Shared fixtures. One local world per test run: tests that cut a link heal it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from latitude.lab import LabWorld


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> LabWorld:
    """The default three-region world (us-west primary, eu-west, ap-southeast), started once."""
    state_dir = Path(os.environ.get("LATITUDE_TEST_LAB_DIR") or tmp_path_factory.mktemp("lab"))
    lab = LabWorld(state_dir)
    lab.up()
    try:
        yield lab
    finally:
        lab.down()


@pytest.fixture
def healed(world: LabWorld):
    """Yield the world, and afterwards heal every link and restore its RTT from the topology."""
    yield world
    topology = world.topology()
    for a, b in topology.region_pairs():
        world.link("heal", a, b)
        world.link("set", a, b, rtt_ms=topology.rtt_ms(a, b), jitter_ms=topology.link(a, b).jitter_ms)


CALENDAR_WORKERS = {"us-west": 2, "eu-west": 2}


def start_calendar(world: LabWorld, region: str) -> None:
    import sys

    state = world.state()
    repo = Path(__file__).resolve().parents[1]
    world.set_app(
        region,
        [
            sys.executable,
            "-m",
            "latitude.cli",
            "serve",
            "examples.calendar.app:app",
            "--region",
            region,
            "--topology",
            state["regions"][region]["topology_file"],
            "--app-dir",
            str(repo),
            "--workers",
            str(CALENDAR_WORKERS.get(region, 1)),
        ],
    )


def wait_healthy(world: LabWorld, region: str, timeout: float = 30.0) -> None:
    import time
    import urllib.request

    port = world.state()["regions"][region]["app_port"]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{port}/_latitude/health", timeout=2
            ) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    log = world.service_log(region, "app").read_text(errors="replace")[-3000:]
    raise RuntimeError(f"the calendar in {region} did not come up:\n{log}")


@pytest.fixture(scope="session")
def calendar(world: LabWorld) -> LabWorld:
    """The calendar example running behind the gateway in every region of the shared world."""
    topology = world.topology()
    # The primary first: it creates the schema the replicas then receive by replication.
    start_calendar(world, topology.primary.name)
    wait_healthy(world, topology.primary.name)
    for region in topology.regions:
        if not region.primary:
            start_calendar(world, region.name)
    for region in topology.regions:
        wait_healthy(world, region.name)
    return world
