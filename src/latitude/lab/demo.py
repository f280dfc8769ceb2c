"""The demo: the calendar app in every region of a lab world; a scripted user next to each
region whose reads and writes are timed beside what physics allows (the ideal); and far users
(`latitude.lab.places`) timed under four layouts, the talk's table reproduced."""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import shutil
import ssl
import statistics
import subprocess
import sys
import time
import urllib.request
from dataclasses import replace
from pathlib import Path

import aiohttp

from latitude import atomic
from latitude.lab.world import LabError, LabWorld
from latitude.topology import Topology

REPO = Path(__file__).resolve().parents[3]
CALENDAR_APP = "examples.calendar.app:app"


def calendar_argv(
    world: LabWorld,
    region: str,
    workers: int = 1,
    extra: list[str] | None = None,
    topology_file: str | None = None,
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
        topology_file or state.regions[region].topology_file,
        "--app-dir",
        str(REPO),
        "--workers",
        str(workers),
        *(extra or []),
    ]


def wait_healthy(world: LabWorld, region: str, timeout: float = 30.0) -> None:
    port = world.state().regions[region].app_port
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


def start_calendar(
    world: LabWorld,
    workers: dict[str, int] | None = None,
    progress=None,
    timeout: float = 30.0,
) -> None:
    """The calendar behind the gateway in every region; the primary first (it makes the schema)."""
    progress = progress or (lambda _m: None)
    topology = world.topology()
    order = [topology.primary.name] + [r.name for r in topology.regions if not r.primary]
    for i, region in enumerate(order):
        progress(f"{region}: start the calendar app behind the gateway")
        world.set_app(region, calendar_argv(world, region, (workers or {}).get(region, 1)))
        if i == 0:
            wait_healthy(world, region, timeout)
    for region in order:
        wait_healthy(world, region, timeout)


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
        url = f"http://127.0.0.1:{state.regions[region].app_port}"
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
        f["url"] = f"http://127.0.0.1:{state.regions[region].app_port}"
    return figures


# ---- far users: the four layouts, per place -----------------------------------------------

LAYOUTS = ("single-region", "sql-over-the-ocean", "forwarding-unpooled", "latitude")
LAYOUT_HELP = {
    "single-region": "everything at the primary; the user crosses the ocean for every request",
    "sql-over-the-ocean": "app and replica near the user; every write's SQL sent to the far "
    "primary on a new connection (the talk's first attempt)",
    "forwarding-unpooled": "app and replica near the user; writes forwarded whole to the "
    "primary, on a new TLS connection each time",
    "latitude": "app and replica near the user; writes forwarded on a pooled, kept-alive "
    "connection; reads local",
}
DEFAULT_PLACES = ("Sydney", "Frankfurt", "São Paulo", "Tokyo", "Virginia", "Johannesburg")
NAIVE_APP = "examples.calendar.naive:app"


def _pct(samples: list[float], q: float) -> float:
    """Nearest-rank percentile: with few samples the p99 is the slowest one, never invented."""
    ordered = sorted(samples)
    return round(ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))], 1)


def _self_signed(folder: Path) -> tuple[Path, Path] | None:
    """A certificate for 127.0.0.1 (its own CA), made with the openssl command; None without it."""
    cert, key = folder / "cert.pem", folder / "key.pem"
    if cert.exists() and key.exists():
        return cert, key
    if not shutil.which("openssl"):
        return None
    folder.mkdir(parents=True, exist_ok=True)
    argv = ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
            "-nodes", "-days", "2", "-subj", "/CN=latitude-lab", "-addext",
            "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    return (cert, key) if done.returncode == 0 else None


def _with_gateway_keys(topology: Topology, keys: dict[str, str]) -> str:
    return replace(topology, gateway={**topology.gateway, **keys}).to_toml()


def _tls_primary(world: LabWorld, progress) -> tuple[int, Path] | None:
    """The primary's calendar behind a TLS gateway (slot `layout-tls`), for the unpooled layout:
    a new connection then pays the TLS handshake's round trip on top of TCP's, as in the talk."""
    from latitude.lab.ports import free_ports

    state = world.state()
    primary = state.primary
    made = _self_signed(world.state_dir / "layouts-tls")
    if made is None:
        progress(
            "no openssl command: the unpooled layout forwards over plain TCP (no TLS handshake)"
        )
        return None
    cert, key = made
    (port,) = free_ports(1)
    topology = world.state_dir / "layouts-tls" / f"{primary}.toml"
    keys = {"tls_cert": str(cert), "tls_key": str(key)}
    atomic.write_text(topology, _with_gateway_keys(world.region_topology(primary), keys))
    progress(
        f"{primary}: start the calendar behind a TLS gateway on {port} (for forwarding-unpooled)"
    )
    world.set_service(
        primary,
        "layout-tls",
        calendar_argv(world, primary, 1, ["--port", str(port)], str(topology)),
    )
    context = ssl.create_default_context(cafile=str(cert))
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(
                f"https://127.0.0.1:{port}/_latitude/health", timeout=2, context=context
            ):
                break
        except OSError:
            if time.monotonic() > deadline:
                raise LabError(
                    f"{primary}: the TLS gateway did not answer on {port}; see "
                    f"{world.service_log(primary, 'layout-tls')}"
                ) from None
            time.sleep(0.1)
    return port, cert


def start_layouts(world: LabWorld, regions: list[str], progress=None) -> dict[str, dict]:
    """In each replica region near a user: the naive app (`layout-sql`) and an unpooled gateway
    (`layout-unpooled`, forwarding over TLS when openssl can make a certificate) beside the
    normal one. Returns the port of each layout per region."""
    from latitude.lab.ports import free_ports

    progress = progress or (lambda _m: None)
    state = world.state()
    primary = state.primary
    ports: dict[str, dict] = {}
    tls = _tls_primary(world, progress) if set(regions) - {primary} else None
    for region in regions:
        app_port = state.regions[region].app_port
        if region == primary:
            ports[region] = dict.fromkeys(LAYOUTS, app_port)
            continue
        sql_port, unpooled_port = free_ports(2)
        progress(
            f"{region}: start the naive app (SQL over the ocean, unpooled) on {sql_port} and an "
            f"unpooled gateway on {unpooled_port}"
        )
        world.set_service(
            region,
            "layout-sql",
            [
                sys.executable,
                "-m",
                "uvicorn",
                NAIVE_APP,
                "--host",
                "127.0.0.1",
                "--port",
                str(sql_port),
                "--app-dir",
                str(REPO),
                "--log-level",
                "warning",
            ],
            env={"CALENDAR_PRIMARY_POOL": "none", "PYTHONPATH": str(REPO)},
        )
        topology_file = None
        if tls is not None:
            tls_port, ca_file = tls
            relay = world.add_relay(region, primary, tls_port)
            seen_here = world.region_topology(region).with_primary_at(f"https://127.0.0.1:{relay}")
            path = world.state_dir / "layouts-tls" / f"{region}.toml"
            atomic.write_text(path, _with_gateway_keys(seen_here, {"ca_file": str(ca_file)}))
            topology_file = str(path)
        world.set_service(
            region,
            "layout-unpooled",
            calendar_argv(
                world, region, 1, ["--no-pool", "--port", str(unpooled_port)], topology_file
            ),
        )
        ports[region] = {
            "single-region": state.regions[primary].app_port,
            "sql-over-the-ocean": sql_port,
            "forwarding-unpooled": unpooled_port,
            "latitude": app_port,
        }
    for region, by_layout in ports.items():
        for layout, port in by_layout.items():
            _wait_port(world, region, layout, port)
    return ports


def _wait_port(world: LabWorld, region: str, layout: str, port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/me", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    service = {"sql-over-the-ocean": "layout-sql", "forwarding-unpooled": "layout-unpooled"}
    log = world.service_log(region, service.get(layout, "app"))
    tail = log.read_text(errors="replace")[-2000:] if log.exists() else "(no log)"
    raise LabError(f"{region}: the {layout} layout did not answer on {port}; its log ends:\n{tail}")


async def sign_in(client: aiohttp.ClientSession, user: str, layout: str, url: str) -> dict:
    """Sign `user` in, in a team of its own: every write of the calendar updates its team's
    row, and the naive layout's transaction holds that row locked for four ocean round trips,
    so series measured at once in one shared team waited on each other's locks (~600 ms a
    write, a whole series at a time, in whichever layout fell into step behind another)."""
    async with client.post("/login", json={"name": user, "team": user}) as r:
        if r.status != 200:
            raise LabError(f"{layout}: sign-in at {url} failed: {r.status} {await r.text()}")
        return (await r.json())["user"]


async def _timed_place(
    place: str, urls: dict[str, str], name: str, reads: int, writes: int, progress
) -> dict:
    """One user per layout, all from the same place, taking turns write by write and read by
    read: a machine that slows down for a while slows every layout alike."""
    timeout = aiohttp.ClientTimeout(total=120)
    async with contextlib.AsyncExitStack() as stack:
        clients = {}
        for layout, url in urls.items():
            jar = aiohttp.CookieJar(unsafe=True)  # the lab's hosts are IP addresses
            c = await stack.enter_async_context(
                aiohttp.ClientSession(url, cookie_jar=jar, timeout=timeout)
            )
            await sign_in(c, f"{name}-{layout}", layout, url)
            clients[layout] = c
        write_ms: dict[str, list[float]] = {layout: [] for layout in urls}
        read_ms: dict[str, list[float]] = {layout: [] for layout in urls}
        event_ids = {}
        for i in range(writes):
            for layout, c in clients.items():
                started = time.perf_counter()
                async with c.post("/events", json={"title": f"{name} {layout} {i}"}) as r:
                    body = await r.json()
                    if r.status != 201:
                        raise LabError(
                            f"{layout}: write at {urls[layout]} failed: {r.status} {body}"
                        )
                write_ms[layout].append((time.perf_counter() - started) * 1000)
                event_ids[layout] = body["id"]
        progress(f"{place}: {writes} writes done in every layout; now {reads} reads")
        await asyncio.sleep(0.5)  # reads measure the replica, not the wait for the last write
        for _ in range(reads):
            for layout, c in clients.items():
                started = time.perf_counter()
                async with c.get(f"/events/{event_ids[layout]}") as r:
                    await r.read()
                    if r.status != 200:
                        raise LabError(f"{layout}: read at {urls[layout]} failed: {r.status}")
                read_ms[layout].append((time.perf_counter() - started) * 1000)
    return {
        layout: {
            "read_p50_ms": _p50(read_ms[layout]),
            "write_p50_ms": _p50(write_ms[layout]),
            "read_p99_ms": _pct(read_ms[layout], 0.99),
            "write_p99_ms": _pct(write_ms[layout], 0.99),
        }
        for layout in urls
    }


def measure_layouts(
    world: LabWorld,
    place_names: tuple[str, ...] = DEFAULT_PLACES,
    reads: int = 20,
    writes: int = 10,
    progress=None,
    concurrency: int = 3,
) -> dict:
    """For a user in each place, reads and writes under the four layouts (places measured
    `concurrency` at a time).

    Returns `{"layouts": {LAYOUT: {PLACE: figures}}, "places": {PLACE: where it is}}`."""
    from latitude.lab import places

    progress = progress or (lambda _m: None)
    chosen = [places.place(name) for name in place_names]
    vantages = {}
    for p in chosen:
        v = places.join(world, p)
        vantages[p.name] = v
        rtts = ", ".join(f"{r} {ms:.0f} ms" for r, ms in v.rtt_ms.items())
        progress(f"{p.name}: client links to every region ({rtts}); nearest {v.nearest}")
    ports = start_layouts(world, sorted({v.nearest for v in vantages.values()}), progress)
    urls: dict[str, dict[str, str]] = {}
    for p in chosen:
        v = vantages[p.name]
        urls[p.name] = {}
        for layout in LAYOUTS:
            # single-region is reached across the client link to the primary; the others
            # across the link to the nearest region.
            region = v.primary if layout == "single-region" else v.nearest
            urls[p.name][layout] = places.relay_from(world, p, region, ports[v.nearest][layout])

    async def run_all() -> dict:
        gate = asyncio.Semaphore(concurrency)

        async def one(p) -> tuple[str, dict]:
            async with gate:
                v = vantages[p.name]
                progress(
                    f"{p.name}: one user per layout takes turns: {writes} writes, {reads} reads "
                    f"(via {v.nearest}, {v.rtt_ms[v.nearest]:.0f} ms away; the primary "
                    f"{v.rtt_ms[v.primary]:.0f} ms away)"
                )
                name = f"{p.key}-{os.getpid()}-{time.time_ns() % 10**6}"
                return p.name, await _timed_place(
                    p.name, urls[p.name], name, reads, writes, progress
                )

        return dict(await asyncio.gather(*(one(p) for p in chosen)))

    by_place = asyncio.run(run_all())
    return {
        "layouts": {
            layout: {p.name: by_place[p.name][layout] for p in chosen} for layout in LAYOUTS
        },
        "places": {name: v.as_dict() for name, v in vantages.items()},
    }


def write_chart(figures: dict, path: Path) -> Path:
    """The layouts table as an SVG bar chart (log scale: naive writes take seconds)."""
    import pygal
    from pygal.style import DefaultStyle

    layouts = figures["layouts"]
    place_names = list(next(iter(layouts.values())))
    values = [f[k] for by_place in layouts.values() for f in by_place.values() for k in f]
    # Bars grow from a power of ten below the smallest figure, so every bar shows.
    low = 10 ** math.floor(math.log10(max(0.1, min(values))))
    chart = pygal.Bar(
        logarithmic=True,
        range=(low, max(values) * 1.3),
        zero=low,
        style=DefaultStyle,
        width=1200,
        height=600,
        x_label_rotation=30,
        legend_at_bottom=True,
        title="A far user's p50 (ms, log scale): reads and writes under four layouts",
        y_title="ms (p50)",
    )
    chart.x_labels = [f"{p} {kind}" for p in place_names for kind in ("read", "write")]
    for layout, by_place in layouts.items():
        chart.add(
            layout,
            [
                max(0.1, by_place[p][f"{kind}_p50_ms"])
                for p in place_names
                for kind in ("read", "write")
            ],
        )
    atomic.write_bytes(path, chart.render())
    return path
