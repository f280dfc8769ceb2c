"""Helpers for tests that run extra servers in the shared world's regions (a sidecar, a TLS
primary, a Django app): free ports, waiting for them, and a region's topology file in which the
primary's gateway is one of those servers."""

from __future__ import annotations

from latitude.lab.harness import free_port, wait_http

__all__ = ["EU", "PRIMARY", "free_port", "topology_with_primary_at", "wait_up"]

PRIMARY, EU = "us-west", "eu-west"
wait_up = wait_http  # the name these tests know it by


def topology_with_primary_at(world, region: str, primary_url: str, extra: str = "") -> str:
    """`region`'s lab topology, with the primary's gateway replaced by `primary_url` (as this
    region reaches it) and `extra` TOML appended."""
    return world.region_topology(region).with_primary_at(primary_url).to_toml() + extra
