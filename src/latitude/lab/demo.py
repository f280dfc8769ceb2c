"""The demo: the calendar app in every region of a lab world, and a scripted user next to each
region whose reads and writes are timed, beside what physics allows (the ideal)."""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
import urllib.request
from pathlib import Path

import aiohttp

from latitude.lab.world import LabError, LabWorld

REPO = Path(__file__).resolve().parents[3]
CALENDAR_APP = "examples.calendar.app:app"


def calendar_argv(
    world: LabWorld, region: str, workers: int = 1, extra: list[str] | None = None
) -> list[str]:
    state = world.state()
    if not (REPO / "examples" / "calendar" / "app.py").exists():
        raise LabError(
            f"the calendar example is not at {REPO / 'examples'}; run the demo from a clone"
        )
    return [
        sys.executable,
        "-m",
        "latitude.cli",
        "serve",
        CALENDAR_APP,
        "--region",
        region,
        "--topology",
        state["regions"][region]["topology_file"],
        "--app-dir",
        str(REPO),
        "--workers",
        str(workers),
        *(extra or []),
    ]


def wait_healthy(world: LabWorld, region: str, timeout: float = 30.0) -> None:
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
    log = world.service_log(region, "app")
    tail = log.read_text(errors="replace")[-3000:] if log.exists() else "(no log)"
    raise LabError(
        f"the calendar in {region} did not come up within {timeout:.0f} s; its log ends:\n{tail}"
    )


def start_calendar(world: LabWorld, workers: dict[str, int] | None = None, progress=None) -> None:
    """The calendar behind the gateway in every region; the primary first (it makes the schema)."""
    progress = progress or (lambda _m: None)
    topology = world.topology()
    order = [topology.primary.name] + [r.name for r in topology.regions if not r.primary]
    for i, region in enumerate(order):
        progress(f"{region}: start the calendar app behind the gateway")
        world.set_app(region, calendar_argv(world, region, (workers or {}).get(region, 1)))
        if i == 0:
            wait_healthy(world, region)
    for region in order:
        wait_healthy(world, region)


def _p50(samples: list[float]) -> float:
    return round(statistics.median(samples), 1)


async def _user(url: str, name: str, reads: int, writes: int) -> dict:
    jar = aiohttp.CookieJar(unsafe=True)  # the lab's hosts are IP addresses
    async with aiohttp.ClientSession(url, cookie_jar=jar) as c:
        async with c.post("/login", json={"name": name}) as r:
            if r.status != 200:
                raise LabError(f"demo sign-in at {url} failed: {r.status} {await r.text()}")
        write_ms, read_ms, event_id = [], [], None
        for i in range(writes):
            started = time.perf_counter()
            async with c.post("/events", json={"title": f"{name} meeting {i}"}) as r:
                body = await r.json()
                if r.status != 201:
                    raise LabError(f"demo write at {url} failed: {r.status} {body}")
            write_ms.append((time.perf_counter() - started) * 1000)
            event_id = body["id"]
        # Give replication a moment, so reads measure the replica, not the wait for it.
        await asyncio.sleep(0.5)
        for _ in range(reads):
            started = time.perf_counter()
            async with c.get(f"/events/{event_id}") as r:
                await r.read()
                if r.status != 200:
                    raise LabError(f"demo read at {url} failed: {r.status}")
            read_ms.append((time.perf_counter() - started) * 1000)
    return {"read_p50_ms": _p50(read_ms), "write_p50_ms": _p50(write_ms)}


def measure(world: LabWorld, reads: int = 20, writes: int = 10, progress=None) -> dict:
    """A scripted user next to each region reads and writes; figures per region."""
    progress = progress or (lambda _m: None)
    topology = world.topology()
    state = world.state()
    primary = topology.primary.name
    figures: dict[str, dict] = {}
    for region in [primary] + [r.name for r in topology.regions if not r.primary]:
        progress(
            f"{region}: a user next to {region} signs in, writes {writes} events, reads {reads} times"
        )
        url = f"http://127.0.0.1:{state['regions'][region]['app_port']}"
        figures[region] = asyncio.run(_user(url, f"demo-{region}", reads, writes))
    own = figures[primary]["write_p50_ms"]
    for region, f in figures.items():
        inter = topology.rtt_ms(region, primary)
        f["client_rtt_ms"] = 0.0  # the scripted user sits next to its region
        f["inter_region_rtt_ms"] = inter
        f["ideal_write_ms"] = round(inter + own, 1)
        f["write_vs_ideal"] = (
            round(f["write_p50_ms"] / f["ideal_write_ms"], 3) if f["ideal_write_ms"] else None
        )
        f["url"] = f"http://127.0.0.1:{state['regions'][region]['app_port']}"
    return figures
