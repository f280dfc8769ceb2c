"""The mirror network in a running lab: `latitude mirror serve` in every region and
`latitude mirror sync` in the replicas, as the regions' services (the mirror itself never knows
it runs in a lab). Used by `latitude mirror demo`, `latitude demo`, the lab tests and the
benchmark."""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.request
from pathlib import Path

from latitude.lab.world import LabWorld


def lab_mirror_root(world: LabWorld, region: str) -> Path:
    return world.state_dir / "regions" / region / "mirror"


def start_lab_mirrors(
    world: LabWorld, extra: tuple[str, ...] = (), sync_extra: tuple[str, ...] = ()
) -> dict[str, Path]:
    """Run `latitude mirror serve` and `sync` in every region of a running lab (the primary's
    sync daemon idles until a promotion makes its region a mirror: `latitude.mirror.role`)."""
    roots = {}
    py = [sys.executable, "-m", "latitude.cli", "mirror"]
    for name in world.state().regions:
        roots[name] = root = lab_mirror_root(world, name)
        root.mkdir(parents=True, exist_ok=True)
        world.set_service(name, "mirror", [*py, "serve", "--root", str(root), *extra])
        world.set_service(name, "mirror-sync", [*py, "sync", "--root", str(root), *sync_extra])
    return roots


def wait_lab_mirrors_ready(world: LabWorld, timeout: float = 30.0) -> bool:
    """Wait until every region's mirror answers and every replica is current and healthy."""
    state = world.state()
    deadline = time.monotonic() + timeout
    pending = set(state.regions)
    while pending and time.monotonic() < deadline:
        for name in list(pending):
            port = state.regions[name].mirror_port
            try:
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{port}/_latitude/mirror/health", timeout=2
                ) as r:
                    h = json.loads(r.read())
            except OSError:
                continue
            if h.get("role") == "primary" or (
                h.get("behind_seconds") == 0 and h.get("primary") == "reachable" and h["healthy"]
            ):
                pending.discard(name)
        time.sleep(0.05)
    return not pending


def propagation(
    world: LabWorld, path: str = "demo/hello.json", timeout_s: float = 10.0
) -> tuple[int, dict[str, float | None]]:
    """Start a mirror in every region of a running lab, publish one file at the primary, and
    return its serial and how many ms after the commit each region's copy had it."""
    from latitude.mirror.publisher import Publisher

    primary = world.state().primary
    roots = start_lab_mirrors(world)
    if not wait_lab_mirrors_ready(world, timeout=30):
        raise RuntimeError(
            "the mirrors did not become ready within 30 s; see regions/*/mirror*.log in "
            f"{world.state_dir}"
        )
    body = f'{{"published_at": {time.time():.6f}, "pid": {os.getpid()}}}\n'.encode()
    with Publisher(roots[primary]) as pub:
        change = pub.publish(path, body)
        t0 = time.perf_counter()  # committed: from here on every mirror may hear of it
    seen: dict[str, float] = {}
    while len(seen) < len(roots) and time.perf_counter() - t0 < timeout_s:
        for name, root in roots.items():
            f = root / path
            if name not in seen and f.exists() and f.read_bytes() == body:
                seen[name] = (time.perf_counter() - t0) * 1000
        time.sleep(0.001)
    return change.serial, {name: seen.get(name) for name in roots}


def demo(world: LabWorld, path: str = "demo/hello.json") -> list[str]:
    """`latitude mirror demo`: mirrors in every region, one file published at the primary; a
    line per region saying when its copy had it. `LabError` when no world runs."""
    from latitude.lab.errors import LabError

    if not world.is_running():
        raise LabError(
            f"no lab world is running from {world.state_dir}; start one with "
            "`latitude lab up` (or pass --state-dir DIR)"
        )
    primary = world.state().primary
    try:
        serial, seen = propagation(world, path)
    except RuntimeError as exc:
        raise LabError(str(exc)) from None
    lines = [f"published /{path} at {primary} as serial {serial}"]
    topology = world.topology()
    for name, ms in seen.items():
        rtt = topology.rtt_ms(name, primary)
        when = f"{ms:7.1f} ms" if ms is not None else "not within 10 s"
        lines.append(f"  {name:14} had it after {when}   (link RTT to {primary}: {rtt:.0f} ms)")
    return lines
