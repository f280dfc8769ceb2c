"""Free local ports, for the lab's services and for the servers tests and benchmarks start."""

from __future__ import annotations

import os
import random
import socket
import threading
from collections import deque
from pathlib import Path

from latitude.lab.errors import LabError

__all__ = ["SERVICE_PORTS", "free_port", "free_ports", "service_ports"]

# Services get ports below the kernel's ephemeral range, so that no relay (listening on port 0)
# or outgoing connection can take a port between our choosing it and the service binding it.
SERVICE_PORTS = range(20000, 32000)

# The ports this process handed out lately. A port is free when chosen, but its server binds it
# later: a test that chose six ports one call at a time could get one twice (CI: the primary's
# sidecar failed to bind a port the replica's upstream app had taken, so the replica's sidecar
# forwarded to an unsigned app). Remembered, they are not handed out again while they may still
# be waiting for their server.
_RECENT = 2048
_handed_out: deque[int] = deque(maxlen=_RECENT)
_lock = threading.Lock()


def _ephemeral_range() -> range:
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        return range(low, high + 1)
    except (OSError, ValueError):
        return range(32768, 61000)


def service_ports(environ=os.environ) -> range:
    """The ports services are given: `SERVICE_PORTS`, or `LATITUDE_PORTS` ("20000-25999").
    The memory of ports handed out is one process's: labs run side by side (the test suite's
    two workers) each take a range of their own, so that one never picks a port another's
    service has let go for a moment (a restart) and is about to bind again."""
    spec = environ.get("LATITUDE_PORTS")
    if not spec:
        return SERVICE_PORTS
    low, sep, high = spec.partition("-")
    if not (sep and low.strip().isdigit() and high.strip().isdigit()):
        raise LabError(f"LATITUDE_PORTS={spec!r}: expected a range of ports like 20000-25999")
    ports = range(int(low), int(high) + 1)
    if not ports or ports.start < 1024 or ports.stop > 65536:
        raise LabError(f"LATITUDE_PORTS={spec!r}: expected a range within 1024-65535, low first")
    return ports


def free_ports(n: int) -> list[int]:
    ephemeral = _ephemeral_range()
    pool = service_ports()
    candidates = [p for p in pool if p not in ephemeral] or list(pool)
    chosen: list[int] = []
    with _lock:
        recent = set(_handed_out)
        for port in random.sample(candidates, len(candidates)):
            if port in recent:
                continue
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
            chosen.append(port)
            if len(chosen) == n:
                _handed_out.extend(chosen)
                return chosen
    raise LabError(f"no {n} free ports between {pool.start} and {pool.stop}")


def free_port() -> int:
    """One free port on 127.0.0.1 (see `free_ports`)."""
    return free_ports(1)[0]
