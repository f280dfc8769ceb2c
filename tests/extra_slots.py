"""Helpers for tests that run extra servers in the shared world's regions (a sidecar, a TLS
primary, a Django app): free ports, waiting for them, and a region's topology file in which the
primary's gateway is one of those servers."""

from __future__ import annotations

import socket
import ssl
import time
import urllib.request
from pathlib import Path

PRIMARY, EU = "us-west", "eu-west"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_up(url: str, timeout: float = 20, ca_file: Path | None = None) -> None:
    context = ssl.create_default_context(cafile=str(ca_file)) if ca_file else None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2, context=context):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing answers at {url}")


def topology_with_primary_at(world, region: str, primary_url: str, extra: str = "") -> str:
    """`region`'s lab topology, with the primary's gateway replaced by `primary_url` (as this
    region reaches it) and `extra` TOML appended."""
    return world.region_topology(region).with_primary_at(primary_url).to_toml() + extra
