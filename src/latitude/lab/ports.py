"""Free local ports, for the lab's services and for the servers tests and benchmarks start."""

from __future__ import annotations

import random
import socket
from pathlib import Path

from latitude.lab.errors import LabError

__all__ = ["SERVICE_PORTS", "free_port", "free_ports"]

# Services get ports below the kernel's ephemeral range, so that no relay (listening on port 0)
# or outgoing connection can take a port between our choosing it and the service binding it.
SERVICE_PORTS = range(20000, 32000)


def _ephemeral_range() -> range:
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        return range(low, high + 1)
    except (OSError, ValueError):
        return range(32768, 61000)


def free_ports(n: int) -> list[int]:
    ephemeral = _ephemeral_range()
    candidates = [p for p in SERVICE_PORTS if p not in ephemeral] or list(SERVICE_PORTS)
    chosen: list[int] = []
    for port in random.sample(candidates, len(candidates)):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        chosen.append(port)
        if len(chosen) == n:
            return chosen
    raise LabError(f"no {n} free ports between {SERVICE_PORTS.start} and {SERVICE_PORTS.stop}")


def free_port() -> int:
    """One free port on 127.0.0.1 (see `free_ports`)."""
    return free_ports(1)[0]
