"""The region gateway, measured in a throwaway two-region lab world (us-west primary, eu-west
replica) whose link has a 100 ms RTT, with the calendar example (`examples/calendar`).

    python benchmarks/bench_gateway.py [--json FILE] [--requests N] [--naive-requests N]
                                       [--reads N] [--seconds S] [--install-nginx]
                                       [--concurrency N] [--split-requests N] [--only PHASES]

Clients sit next to the region they talk to: they dial its app port directly, so the client's
own RTT is 0 here. Every figure and ratio below is measured in the same run.

(1) Forwarded write: p50 of `POST /events` (a write of 8 SQL statements in one transaction)
    made in eu-west, forwarded to the primary, versus the ideal = client RTT (0) + inter-region
    RTT (100 ms) + the primary's own time (p50 of the same write made directly at the primary,
    interleaved with the forwarded ones). Target: <= 1.05 x the ideal. The link's relay counts
    the connections opened across the ocean per write (0 with the warm pool). The same pair is
    then measured with the link at 0 ms: what forwarding costs besides the ocean, and split
    by part (`--split-requests` forwarded writes alone, then as many direct ones): CPU of the
    replica's and the primary's gateway process trees, statements at each region's Postgres
    (= round trips; counted from its log with `log_statement = 'all'` switched on by a reload
    for the duration) and commands at each region's Valkey (`INFO commandstats`).
(1b) The peer, in the same rounds: one write through eu-west's gateway, one through nginx as
    the seed's local keep-alive proxy in eu-west (`proxy_pass` to the primary's app port over
    the same link, `keepalive 8`) with 1 worker process and with 4, and one directly at the
    primary; every write on a new client connection, as arriving users make them, so that a
    request can land on an nginx worker whose own pool is cold. p50 and p99 of each as ratios
    to the ideal (link RTT + the primary's p50 in the same rounds), and the new connections
    each opened across the link (every proxy crosses it through a relay of its own). nginx
    runs with its own prefix and configuration in a temporary folder (workers as `nobody`
    when we are root) and is stopped with SIGQUIT.
(2) The same with pooling off (eu-west restarted with `--no-pool`: one new connection per
    forwarded request). The lab's WAN relay charges a new connection the TCP handshake's round
    trip, as a real ocean does (see `latitude.lab.relay`), so the delta is that handshake; TLS would
    add one or two more round trips, the ~+200 ms per POST the original deployment measured.
(3) The naive layout: the calendar served in eu-west by plain uvicorn, every request handled
    there and every SQL statement sent to the primary database over the link
    (`benchmarks/_naive_app.py`). Its write p50, and its ratio to the forwarded write.
(4) Local read, `GET /events/{id}` by a signed-in user in eu-west: through the gateway
    (`latitude serve`, 1 process) versus the bare calendar (plain uvicorn, 1 process, no
    gateway), same region, same replica, same session store. Sequential p50 overhead, one
    request to each in turn (target <= 0.1 ms); throughput at concurrency 32 in three adjacent
    pairs of runs, median of the pair ratios (target >= 95 %); and each server's CPU time per
    read, which other work on the machine hardly moves.
(5) Writes per second at concurrency 32, one signed-in user per connection: directly at the
    primary (its own ceiling), through eu-west's gateway with one worker process, and through
    nginx `proxy_pass` (1 worker, upstream `keepalive 32`) in eu-west in front of the primary's
    app port over the same link (`--concurrency N` clients; 503/504 answers are counted, not
    fatal; so are the new connections across the link and the gateway's decisions). nginx forwards unsigned, without the session and without
    idempotency: it is the floor for a proxy, not a like-for-like. Beside each: CPU time per
    write of the proxy process, of the primary's app and of the relays, and how busy the whole
    machine was. nginx comes from Debian's packages: if it is not on PATH, `--install-nginx`
    runs `apt-get install -y nginx-light`; otherwise the nginx row is skipped, and says why.

(4) and (5) use a lean keep-alive HTTP/1.1 load generator in this process (`benchmarks/_lab.py`)
so that on a small machine the server, not the client, is the ceiling; (1)-(3) use aiohttp.
`--only forwarded,peer` runs a subset of the phases (forwarded, peer, unpooled, naive, reads,
write_throughput).
The machine's load average is printed: other work on it moves every figure here.
Everything runs on 127.0.0.1 and is stopped at the end, also on Ctrl-C; about two minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import time
import urllib.request
import uuid
from pathlib import Path

import aiohttp
from _counters import Census
from _lab import (
    HOST,
    RawConnection,
    build_request,
    free_port,
    pct,
    run_load,
    say,
    service_pid,
    summary,
    throwaway_world,
    two_region_topology,
    uvicorn_argv,
    wait_http,
)
from _nginx import find_nginx, nginx_version, running_nginx

from latitude.gateway.observe import primary_ms
from latitude.lab import LabWorld, harness

RTT_MS = 100.0
CLIENT_RTT_MS = 0.0
PRIMARY, REPLICA = "us-west", "eu-west"
PRIMARY_WORKERS = 2
CONCURRENCY = 32
# Issue #14's goals: own cost <= 1 ms at a 100 ms link, p99 <= 1.05 x the ideal, a local read
# <= 0.1 ms slower than the bare app and >= 95 % of its requests/s under concurrency.
TARGET_WRITE_RATIO = 1.01
TARGET_P99_RATIO = 1.05
TARGET_READ_OVERHEAD_MS = 0.1
TARGET_READ_THROUGHPUT = 0.95
READ_LOAD_ORDER = ("bare", "gateway", "gateway", "bare", "bare", "gateway")
CALENDAR = "examples.calendar.app:app"
NAIVE = "benchmarks._naive_app:app"
PHASES = ("forwarded", "peer", "unpooled", "naive", "reads", "write_throughput")
TOPOLOGY = two_region_topology("bench-gateway", RTT_MS, PRIMARY, REPLICA)


def port_of(world: LabWorld, region: str) -> int:
    return world.state().regions[region].app_port


def log_of(world: LabWorld, region: str, service: str = "app") -> Path:
    return world.service_log(region, service)


def start_calendar(
    world: LabWorld, region: str, *, pooling: bool = True, env: dict[str, str] | None = None
) -> None:
    """The calendar behind the gateway, as the tests start it; waits until it is healthy."""
    workers = PRIMARY_WORKERS if region == PRIMARY else 1
    harness.start_calendar(world, region, workers, pooling=pooling, wait=60, env=env)


def start_uvicorn(
    world: LabWorld, service: str, app: str, env: dict[str, str] | None = None
) -> int:
    """A plain uvicorn (no gateway) in eu-west's environment, as lab service `service`."""
    port = free_port()
    world.set_service(REPLICA, service, uvicorn_argv(app, port), env)
    # GET /me needs no database: it answers as soon as the app is up.
    wait_http(
        f"http://{HOST}:{port}/me", 60, f"{app} in {REPLICA}", log_of(world, REPLICA, service)
    )
    return port


def relay_connections(world: LabWorld, relay_port: int) -> int:
    """Connections the WAN relay on `relay_port` has accepted so far."""
    for link in world.control().call("GET", "/status")["links"]:
        for relay in link["relays"]:
            if relay["port"] == relay_port:
                return relay["connections_total"]
    raise RuntimeError(f"no relay on port {relay_port}")


# ---------------------------------------------------------------------------------- clients


def client(port: int) -> aiohttp.ClientSession:
    # IP hosts need the unsafe jar to keep cookies.
    return aiohttp.ClientSession(f"http://{HOST}:{port}", cookie_jar=aiohttp.CookieJar(unsafe=True))


async def login(session: aiohttp.ClientSession, name: str) -> None:
    async with session.post("/login", json={"name": name}) as r:
        if r.status != 200:
            raise RuntimeError(f"login failed: {r.status} {await r.text()}")
        await r.read()


def session_cookie(session: aiohttp.ClientSession) -> str:
    """The signed-in session cookie alone (no replication-position cookie)."""
    return next(f"session={m.value}" for m in session.cookie_jar if m.key == "session")


async def timed_write(
    session: aiohttp.ClientSession, expect_region: str, hops: list | None = None
) -> float:
    """One write's latency in ms; with `hops`, also appends each hop's own time (its
    `Server-Timing` entry, by region) to it."""
    t0 = time.perf_counter()
    async with session.post("/events", json={"title": f"bench {uuid.uuid4().hex[:8]}"}) as r:
        body = await r.read()
    ms = (time.perf_counter() - t0) * 1000
    if hops is not None:
        hops.append(hop_times(r.headers.getall("Server-Timing", [])))
    if r.status != 201:
        raise RuntimeError(f"POST /events: {r.status} {body[:300]!r}")
    ran_in = json.loads(body)["region"]
    if ran_in != expect_region:
        raise RuntimeError(f"the write ran in {ran_in}, expected {expect_region}")
    return ms


def hop_times(values: list[str]) -> dict[str, float]:
    """`{region: dur}` from `Server-Timing` values (one entry per gateway the request crossed),
    read as the replica reads the primary's."""
    pairs = [(b"server-timing", v.encode("latin-1")) for v in values]
    times = {region: primary_ms(pairs, region, None) for region in (PRIMARY, REPLICA)}
    return {region: ms for region, ms in times.items() if ms is not None}


async def write_series(
    world: LabWorld,
    replica_port: int,
    n: int,
    *,
    expect_region: str = PRIMARY,
    with_primary: bool = True,
    warmup: int = 5,
) -> dict:
    """`n` writes in eu-west (on `replica_port`), each followed by the same write made directly
    at the primary when `with_primary`; new connections across the link counted meanwhile."""
    relay = world.relay_port(REPLICA, PRIMARY, "app")
    async with client(port_of(world, PRIMARY)) as near_primary, client(replica_port) as near_eu:
        await login(near_eu, f"eu-{uuid.uuid4().hex[:8]}")
        if with_primary:
            await login(near_primary, f"us-{uuid.uuid4().hex[:8]}")
        for _ in range(warmup):
            await timed_write(near_eu, expect_region)
            if with_primary:
                await timed_write(near_primary, PRIMARY)
        eu, primary, eu_hops, primary_hops = [], [], [], []
        before = relay_connections(world, relay)
        for i in range(n):
            eu.append(await timed_write(near_eu, expect_region, eu_hops))
            if with_primary:
                primary.append(await timed_write(near_primary, PRIMARY, primary_hops))
            if (i + 1) % 20 == 0:
                say(f"  {i + 1}/{n} writes, eu-west p50 so far {pct(eu, 50):.1f} ms")
        opened = relay_connections(world, relay) - before
    out = {"replica": summary(eu), "new_link_connections_per_write": round(opened / n, 2)}
    if with_primary:
        out["primary"] = summary(primary)
        out["by_hop"] = split_by_hop(eu_hops, primary_hops)
    return out


def split_by_hop(forwarded: list[dict], direct: list[dict]) -> dict | None:
    """The own cost by each gateway's own clock (its `Server-Timing`): the primary's extra for a
    forwarded write (its median time for one, less its median for a direct write) and the
    replica's part with the link's (the median, write by write, of the replica's time less the
    primary's). Per-write differences move less with the machine than two medians do."""
    both = [h for h in forwarded if REPLICA in h and PRIMARY in h]
    alone = [h[PRIMARY] for h in direct if PRIMARY in h]
    if not both or not alone:
        return None
    primary_fwd = statistics.median(h[PRIMARY] for h in both)
    return {
        "primary_forwarded_ms": round(primary_fwd, 2),
        "primary_direct_ms": round(statistics.median(alone), 2),
        "primary_extra_ms": round(primary_fwd - statistics.median(alone), 2),
        "replica_and_link_ms": round(statistics.median(h[REPLICA] - h[PRIMARY] for h in both), 2),
    }


# ------------------------------------------------------------------------------ (1) (2) (3)


def forwarded_writes(world: LabWorld, n: int, split_n: int) -> dict:
    say(f"(1) {n} forwarded writes in {REPLICA}, interleaved with {n} writes at the primary")
    pooled = asyncio.run(write_series(world, port_of(world, REPLICA), n))
    primary_p50 = pooled["primary"]["p50_ms"]
    ideal = CLIENT_RTT_MS + RTT_MS + primary_p50
    pooled["ideal_ms"] = round(ideal, 2)
    pooled["ratio_to_ideal"] = round(pooled["replica"]["p50_ms"] / ideal, 3)
    pooled["overhead_ms"] = round(pooled["replica"]["p50_ms"] - ideal, 2)
    pooled["target_ratio"] = TARGET_WRITE_RATIO
    pooled["overhead_budget_ms"] = round((TARGET_WRITE_RATIO - 1) * ideal, 2)
    pooled["met"] = pooled["ratio_to_ideal"] <= TARGET_WRITE_RATIO
    say(
        f"(1) forwarded p50 {pooled['replica']['p50_ms']:.1f} ms, ideal {ideal:.1f} ms "
        f"-> {pooled['ratio_to_ideal']:.3f} x"
    )
    # The same with the ocean taken out: what forwarding itself costs, round trips aside.
    say("(1) again with the link at 0 ms RTT: forwarding's own cost")
    world.link("set", PRIMARY, REPLICA, rtt_ms=0)
    try:
        local = asyncio.run(write_series(world, port_of(world, REPLICA), n))
        say(f"(1) own-cost split: {split_n} forwarded writes alone, then {split_n} direct ones")
        split = own_cost_split(world, split_n)
    finally:
        world.link("set", PRIMARY, REPLICA, rtt_ms=RTT_MS)
    pooled["link_at_0_ms"] = {
        "replica": local["replica"],
        "primary": local["primary"],
        "by_hop": local.get("by_hop"),
        "overhead_ms": round(local["replica"]["p50_ms"] - local["primary"]["p50_ms"], 2),
    }
    say(f"(1) at 0 ms RTT: forwarding adds {pooled['link_at_0_ms']['overhead_ms']:.1f} ms")
    pooled["own_cost_split"] = split
    return pooled


async def _census_series(census: Census, port: int, n: int, expect_region: str) -> dict:
    """`n` sequential writes on `port` (after sign-in and warm-up), counted by `census`."""
    async with client(port) as c:
        await login(c, f"split-{uuid.uuid4().hex[:8]}")
        for _ in range(5):
            await timed_write(c, expect_region)
        with census.window() as counted:
            ms = [await timed_write(c, expect_region) for _ in range(n)]
    counted["latency"] = summary(ms)
    return counted


def own_cost_split(world: LabWorld, n: int) -> dict:
    """What a forwarded write costs besides the primary's own work, per write, by part: CPU of
    each side's gateway process tree, statements at the databases (one round trip each),
    commands at the Valkeys. Forwarded writes alone, then the same number of direct writes at
    the primary alone (the app's own share), so each counter sees one kind only."""
    census = Census(
        world,
        {
            "replica": service_pid(world, REPLICA, "app"),
            "primary": service_pid(world, PRIMARY, "app"),
        },
    )
    with census.logging_statements():
        fw = asyncio.run(_census_series(census, port_of(world, REPLICA), n, PRIMARY))
        dw = asyncio.run(_census_series(census, port_of(world, PRIMARY), n, PRIMARY))

    def per(x: float) -> float:
        return round(x / n, 3)

    def part(key: str) -> dict:
        fwd = {r: per(v) for r, v in fw[key].items()}
        direct = {r: per(v) for r, v in dw[key].items()}
        return {
            "forwarded_write": fwd,
            "direct_write": direct,
            "own": round(sum(fwd.values()) - sum(direct.values()), 2),
        }

    primary_fwd = fw["cpu_s"]["primary"] * 1000 / n
    primary_direct = dw["cpu_s"]["primary"] * 1000 / n
    return {
        "writes": n,
        "link_rtt_ms": 0,
        "latency_forwarded": fw["latency"],
        "latency_direct": dw["latency"],
        # The replica's gateway does nothing for a direct write: all of its CPU is forwarding's.
        "replica_cpu_ms_per_write": round(fw["cpu_s"]["replica"] * 1000 / n, 3),
        "primary_cpu_ms_per_forwarded_write": round(primary_fwd, 3),
        "primary_cpu_ms_per_direct_write": round(primary_direct, 3),
        "primary_cpu_ms_own": round(primary_fwd - primary_direct, 3),
        "db_round_trips": part("pg_statements"),
        "valkey_round_trips": part("valkey_commands"),
    }


def unpooled_writes(world: LabWorld, n: int) -> dict:
    say(f"(2) restarting {REPLICA} with --no-pool; {n} writes again")
    start_calendar(world, REPLICA, pooling=False)
    try:
        out = asyncio.run(write_series(world, port_of(world, REPLICA), n))
    finally:
        say(f"(2) restarting {REPLICA} with its pool")
        start_calendar(world, REPLICA, pooling=True)
    ideal = CLIENT_RTT_MS + RTT_MS + out["primary"]["p50_ms"]
    per_write = out["new_link_connections_per_write"]
    out["ideal_ms"] = round(ideal, 2)
    out["ratio_to_ideal"] = round(out["replica"]["p50_ms"] / ideal, 3)
    out["handshake_rtts_per_write"] = round(per_write, 2)
    say(
        f"(2) unpooled p50 {out['replica']['p50_ms']:.1f} ms, "
        f"{per_write:.2f} new connections across the link per write"
    )
    return out


def naive_writes(world: LabWorld, n: int) -> dict:
    say(f"(3) the naive layout in {REPLICA}: {n} writes with every SQL statement over the link")
    port = start_uvicorn(world, "naive", NAIVE)
    try:
        out = asyncio.run(
            write_series(world, port, n, expect_region=REPLICA, with_primary=False, warmup=2)
        )
    finally:
        world.kill(REPLICA, "naive")
    out["round_trips_per_write"] = round(out["replica"]["p50_ms"] / RTT_MS, 1)
    say(f"(3) naive p50 {out['replica']['p50_ms']:.0f} ms")
    return out


# ------------------------------------------------------------------------------- (1b) peer


def fresh_client(port: int) -> aiohttp.ClientSession:
    """A client that opens a new connection for every request, as arriving users do."""
    return aiohttp.ClientSession(
        f"http://{HOST}:{port}",
        connector=aiohttp.TCPConnector(force_close=True),
        cookie_jar=aiohttp.CookieJar(unsafe=True),
    )


async def _peer_rounds(world: LabWorld, targets: dict[str, tuple[int, int]], n: int) -> dict:
    """`n` rounds of one write through each target (port, relay port it crosses the link by)
    and one directly at the primary, every write on a new client connection."""
    names = list(targets)
    clients = {name: fresh_client(port) for name, (port, _) in targets.items()}
    clients["primary"] = fresh_client(port_of(world, PRIMARY))
    ms: dict[str, list[float]] = {name: [] for name in clients}
    try:
        for c in clients.values():
            await login(c, f"peer-{uuid.uuid4().hex[:8]}")
        for _ in range(5):
            for c in clients.values():
                await timed_write(c, PRIMARY)
        before = {name: relay_connections(world, relay) for name, (_, relay) in targets.items()}
        for i in range(n):
            for name, c in clients.items():
                ms[name].append(await timed_write(c, PRIMARY))
            if (i + 1) % 20 == 0:
                say(f"  {i + 1}/{n} rounds")
        opened = {
            name: relay_connections(world, relay) - before[name]
            for name, (_, relay) in targets.items()
        }
    finally:
        for c in clients.values():
            await c.close()
    primary = summary(ms["primary"])
    # One ideal for both percentiles, as in (1): the link plus the primary's own p50. A proxy's
    # p99 over it is then what its slow writes cost a user, the primary's own spikes included.
    ideal = RTT_MS + CLIENT_RTT_MS + primary["p50_ms"]
    out: dict = {
        "writes": n,
        "client_connection": "new per write",
        "primary": primary,
        "ideal_ms": round(ideal, 2),
    }
    for name in names:
        s = summary(ms[name])
        out[name] = {
            **s,
            "p50_ratio_to_ideal": round(s["p50_ms"] / ideal, 3),
            "p99_ratio_to_ideal": round(s["p99_ms"] / ideal, 3),
            "new_link_connections": opened[name],
        }
    return out


def peer_writes(world: LabWorld, nginx: str | None, why: str, n: int) -> dict:
    if nginx is None:
        return {"skipped": why}
    say(
        f"(1b) {n} rounds: a write through {REPLICA}'s gateway, through nginx (1 and 4 workers, "
        "keepalive 8) and directly at the primary, each on a new client connection"
    )
    primary_app = port_of(world, PRIMARY)
    # A relay of its own for each nginx, so that each one's new link connections are counted.
    relays = {w: world.add_relay(REPLICA, PRIMARY, primary_app) for w in (1, 4)}
    with (
        running_nginx(
            nginx, f"{HOST}:{relays[1]}", workers=1, keepalive=8, health="/_latitude/health"
        ) as one,
        running_nginx(
            nginx, f"{HOST}:{relays[4]}", workers=4, keepalive=8, health="/_latitude/health"
        ) as four,
    ):
        targets = {
            "latitude": (port_of(world, REPLICA), world.relay_port(REPLICA, PRIMARY, "app")),
            "nginx_1_worker": (one.port, relays[1]),
            "nginx_4_workers": (four.port, relays[4]),
        }
        heap_before = gateway_heaps(world)
        out = asyncio.run(_peer_rounds(world, targets, n))
        out["collector"] = collector_during(heap_before, gateway_heaps(world))
    out["nginx_version"] = nginx_version(nginx)
    for name in targets:
        x = out[name]
        say(
            f"(1b) {name}: p50 {x['p50_ms']:.1f} ms = {x['p50_ratio_to_ideal']:.3f} x ideal, "
            f"p99 {x['p99_ms']:.1f} ms = {x['p99_ratio_to_ideal']:.3f} x ideal, "
            f"{x['new_link_connections']} new link connections"
        )
    return out


# ------------------------------------------------------------------------------------- (4)


async def _prepare_read(world: LabWorld, bare_port: int) -> tuple[str, str]:
    """A signed-in user in eu-west and an event that eu-west's replica already has."""
    async with client(port_of(world, REPLICA)) as eu:
        await login(eu, f"reader-{uuid.uuid4().hex[:8]}")
        async with eu.post("/events", json={"title": "read me"}) as r:
            event_id = (await r.json())["id"]
        cookie = session_cookie(eu)
    path = f"/events/{event_id}"
    async with client(bare_port) as bare:
        for _ in range(200):
            async with bare.get(path) as r:
                if r.status == 200:
                    return path, cookie
            await asyncio.sleep(0.05)
    raise RuntimeError(f"event {event_id} never reached {REPLICA}'s replica")


async def _sequential_reads(ports: dict[str, int], path: str, cookie: str, n: int) -> dict:
    """Sequential GETs, one to each server in turn, so that both see the same moment of a
    machine shared with other work; p50 of each, and the median of the paired differences."""
    conns = {name: RawConnection(port) for name, port in ports.items()}
    reqs = {name: build_request("GET", path, port, cookie=cookie) for name, port in ports.items()}
    ms: dict[str, list[float]] = {name: [] for name in ports}
    try:
        for i in range(n + 100):  # the first 100 rounds warm up
            for name, conn in conns.items():
                t0 = time.perf_counter()
                status, _ = await conn.request(reqs[name])
                if i >= 100:
                    ms[name].append((time.perf_counter() - t0) * 1000)
                if status != 200:
                    raise RuntimeError(f"GET {path} on {name}: {status}")
    finally:
        for conn in conns.values():
            await conn.close()
    out = {name: summary(v, 3) for name, v in ms.items()}
    out["paired_difference_p50_ms"] = round(
        pct([g - b for g, b in zip(ms["gateway"], ms["bare"], strict=True)], 50), 3
    )
    return out


def local_reads(world: LabWorld, n: int, seconds: float) -> dict:
    say(f"(4) local reads in {REPLICA}: gateway vs the bare calendar (plain uvicorn)")
    # Both run the calendar with a pool for the load's clients: with SQLAlchemy's default
    # (5 + 10 overflow) every read past five at a time opened and closed a connection, on
    # either side at random, and the ratio swung with it (benchmarks/README.md, session 13).
    quiet = {"CALENDAR_POOL_SIZE": str(CONCURRENCY)}
    start_calendar(world, REPLICA, env=quiet)
    bare_port = start_uvicorn(world, "bare", CALENDAR, env=quiet)
    ports = {"gateway": port_of(world, REPLICA), "bare": bare_port}
    pids = {
        "gateway": service_pid(world, REPLICA, "app"),
        "bare": service_pid(world, REPLICA, "bare"),
    }
    try:
        path, cookie = asyncio.run(_prepare_read(world, bare_port))
        say(f"(4) {n} sequential GET {path} on each, alternating")
        latency = asyncio.run(_sequential_reads(ports, path, cookie, n))
        overhead = latency["gateway"]["p50_ms"] - latency["bare"]["p50_ms"]
        say(
            f"(4) p50 gateway {latency['gateway']['p50_ms']:.3f} ms, bare "
            f"{latency['bare']['p50_ms']:.3f} ms: overhead {overhead:.3f} ms"
        )
        runs: dict[str, list[dict]] = {"gateway": [], "bare": []}
        # Adjacent pairs in alternating order: a neighbour's burst of work on a shared machine
        # then lands on one pair, and the median of the pair ratios shrugs it off.
        for name in READ_LOAD_ORDER:
            req = build_request("GET", path, ports[name], cookie=cookie)
            r = asyncio.run(
                run_load(
                    ports[name],
                    lambda i, req=req: req,
                    concurrency=CONCURRENCY,
                    seconds=seconds,
                    cpu_pids={"server": pids[name]},
                )
            )
            runs[name].append(r)
            say(f"(4) {name}: {r['rps']:.0f} req/s at concurrency {CONCURRENCY}")
    finally:
        world.kill(REPLICA, "bare")
        start_calendar(world, REPLICA)  # as the other phases expect it

    def mean(name: str, key: str) -> float:
        return round(sum(r[key] for r in runs[name]) / len(runs[name]), 3)

    def cpu_ms(name: str) -> float:
        total = sum(r["server_cpu_ms_per_request"] * r["requests"] for r in runs[name])
        return total / sum(r["requests"] for r in runs[name])

    throughput = {
        name: {
            "rps": round(mean(name, "rps")),
            "p50_ms": mean(name, "p50_ms"),
            "server_cpu_ms_per_request": round(cpu_ms(name), 3),
            "server_cpu_percent": mean(name, "server_cpu_percent"),
            "machine_cpu_percent": mean(name, "machine_cpu_percent"),
            "runs": runs[name],
        }
        for name in runs
    }
    pair_ratios = [g["rps"] / b["rps"] for g, b in zip(runs["gateway"], runs["bare"], strict=True)]
    ratio = pct(pair_ratios, 50)
    return {
        "path": "GET /events/{id}",
        "sequential": latency,
        "p50_overhead_ms": round(overhead, 3),
        "target_overhead_ms": TARGET_READ_OVERHEAD_MS,
        "overhead_met": overhead <= TARGET_READ_OVERHEAD_MS,
        "throughput": throughput,
        "concurrency": CONCURRENCY,
        "calendar_pool_size": CONCURRENCY,
        "throughput_pair_ratios": [round(x, 3) for x in pair_ratios],
        "throughput_ratio": round(ratio, 3),
        # What one core would carry, from CPU time per request: immune to neighbours' load.
        "cpu_capacity_ratio": round(cpu_ms("bare") / cpu_ms("gateway"), 3),
        "target_throughput_ratio": TARGET_READ_THROUGHPUT,
        "throughput_met": ratio >= TARGET_READ_THROUGHPUT,
    }


# ------------------------------------------------------------------------------------- (5)


async def _cookies(port: int, users: int) -> list[str]:
    """Sign `users` users in through `port`; their session cookies."""
    out = []
    for _ in range(users):
        async with client(port) as c:
            await login(c, f"load-{uuid.uuid4().hex[:8]}")
            out.append(session_cookie(c))
    return out


def write_load(
    port: int,
    cookies: list[str],
    seconds: float,
    cpu_pids: dict[str, int],
    *,
    tolerate: tuple[int, ...] = (),
    counters: dict | None = None,
) -> dict:
    # One signed-in user per connection, so no two requests of one session are ever in flight
    # together: the primary's gateway parks a forwarded session under the client's session id
    # while the request runs, and concurrent requests of one session can lose it that way.
    body = json.dumps({"title": "load"}).encode()
    reqs = [build_request("POST", "/events", port, cookie=c, body=body) for c in cookies]
    # A line to start a profiler on (the sign-ins before it are not the load).
    say(f"(5) load starts: {len(cookies)} signed-in clients on port {port} for {seconds:g} s")
    return asyncio.run(
        run_load(
            port,
            lambda i: reqs[i],
            concurrency=len(cookies),
            seconds=seconds,
            warmup_s=1.5,
            expect=(201,),
            tolerate=tolerate,
            cpu_pids=cpu_pids,
            counters=counters,
        )
    )


def gateway_status(port: int) -> dict:
    with urllib.request.urlopen(f"http://{HOST}:{port}/_latitude/status", timeout=10) as r:
        return json.loads(r.read())


def gateway_heaps(world: LabWorld) -> dict[str, dict]:
    """Each region's collector figures, as one of its gateway processes reports them."""
    return {r: gateway_status(port_of(world, r)).get("heap", {}) for r in (REPLICA, PRIMARY)}


def collector_during(before: dict[str, dict], after: dict[str, dict]) -> dict[str, dict]:
    """Full collections in the rounds (a stalled request waits for one), per region."""
    return {
        region: {
            "frozen_objects": after[region].get("frozen_objects", 0),
            "full_collections": after[region].get("full_collections", 0)
            - before[region].get("full_collections", 0),
            "longest_ms_since_start": after[region].get("full_collection_longest_ms"),
        }
        for region in after
    }


def nginx_writes(world: LabWorld, nginx: str, seconds: float, concurrency: int) -> dict:
    # nginx gets a relay of its own across the same link, so its new connections are its own.
    relay = world.add_relay(REPLICA, PRIMARY, port_of(world, PRIMARY))
    with running_nginx(
        nginx, f"{HOST}:{relay}", workers=1, keepalive=32, health="/_latitude/health"
    ) as proxy:
        cookies = asyncio.run(_cookies(proxy.port, concurrency))
        before = relay_connections(world, relay)
        out = write_load(
            proxy.port,
            cookies,
            seconds,
            {
                "proxy": proxy.pid,
                "primary": service_pid(world, PRIMARY, "app"),
                "relays": int((world.state_dir / "supervisor.pid").read_text()),
            },
            tolerate=(502, 503, 504),
            counters={"link_connections": lambda: relay_connections(world, relay)},
        )
        out["new_link_connections"] = relay_connections(world, relay) - before
    out["nginx_version"] = nginx_version(nginx)
    return out


def write_throughput(
    world: LabWorld, seconds: float, nginx: str | None, why: str, concurrency: int
) -> dict:
    pids = {
        "proxy": service_pid(world, REPLICA, "app"),
        "primary": service_pid(world, PRIMARY, "app"),
        "relays": int((world.state_dir / "supervisor.pid").read_text()),
    }
    out: dict = {"concurrency": concurrency}
    say(f"(5) the primary's own capacity: writes made directly at {PRIMARY}, no proxy")
    port = port_of(world, PRIMARY)
    cookies = asyncio.run(_cookies(port, concurrency))
    out["primary_direct"] = write_load(port, cookies, seconds, {"primary": pids["primary"]})
    say(f"(5) primary direct: {out['primary_direct']['rps']:.0f} writes/s")
    say(f"(5) forwarded writes/s through {REPLICA}'s gateway (1 process)")
    port = port_of(world, REPLICA)
    relay = world.relay_port(REPLICA, PRIMARY, "app")
    cookies = asyncio.run(_cookies(port, concurrency))
    status0, before = gateway_status(port), relay_connections(world, relay)
    # A 504 under overload is a figure here, not a reason to lose the run's other figures.
    lat = write_load(
        port,
        cookies,
        seconds,
        pids,
        tolerate=(503, 504),
        counters={"link_connections": lambda: relay_connections(world, relay)},
    )
    lat["new_link_connections"] = relay_connections(world, relay) - before
    status1 = gateway_status(port)
    lat["gateway_decisions"] = {
        k: v - status0["decisions"].get(k, 0)
        for k, v in status1["decisions"].items()
        if v != status0["decisions"].get(k, 0)
    }
    lat["pool_after"] = status1["forwarding"]
    out["latitude"] = lat
    say(
        f"(5) latitude gateway: {lat['rps']:.0f} writes/s, {lat['new_link_connections']} new "
        f"link connections ({lat['link_connections_in_window']} after the warm-up), "
        f"decisions {lat['gateway_decisions']}"
    )
    if nginx is None:
        out["nginx"] = {"skipped": why}
        say(f"(5) nginx row skipped: {why}")
    else:
        say("(5) the same through nginx proxy_pass (keepalive 32) over the same link")
        out["nginx"] = nginx_writes(world, nginx, seconds, concurrency)
        say(f"(5) nginx: {out['nginx']['rps']:.0f} writes/s")
        out["ratio_latitude_vs_nginx"] = round(out["latitude"]["rps"] / out["nginx"]["rps"], 3)
    return out


# ------------------------------------------------------------------------------------ main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", type=Path, help="Also write the figures as JSON.")
    ap.add_argument(
        "--requests", type=int, default=50, help="Sequential writes per series in (1)-(2)."
    )
    ap.add_argument(
        "--naive-requests",
        type=int,
        default=None,
        help="Writes for the naive layout (3); default: a third of --requests, at least 10.",
    )
    ap.add_argument("--reads", type=int, default=2000, help="Sequential reads per server in (4).")
    ap.add_argument("--seconds", type=float, default=5.0, help="Each load run in (4) and (5).")
    ap.add_argument(
        "--concurrency", type=int, default=CONCURRENCY, help="Clients in (5) (default 32)."
    )
    ap.add_argument(
        "--split-requests",
        type=int,
        default=200,
        help="Writes of each kind in (1)'s own-cost split (CPU, round trips).",
    )
    ap.add_argument(
        "--only",
        help=f"Comma-separated phases to run (default all): {', '.join(PHASES)}.",
    )
    ap.add_argument(
        "--idempotency-claim",
        choices=("eager", "in_transaction"),
        default="eager",
        help="[gateway] idempotency_claim of both regions (docs/gateway.md).",
    )
    ap.add_argument(
        "--forwarding-client",
        choices=("h1", "aiohttp"),
        default="h1",
        help="[gateway] forwarding_client of both regions (docs/gateway.md).",
    )
    ap.add_argument(
        "--max-runs",
        type=int,
        default=None,
        help="[gateway] max_runs of both regions (docs/gateway.md; default: the gateway's).",
    )
    ap.add_argument(
        "--install-nginx",
        action="store_true",
        help="If nginx is missing, apt-get install nginx-light (Debian; root).",
    )
    args = ap.parse_args()
    if args.requests < 5 or args.reads < 100 or args.seconds <= 0 or args.split_requests < 20:
        ap.error("--requests >= 5, --reads >= 100, --split-requests >= 20, --seconds > 0, please")
    if args.concurrency < 1:
        ap.error("--concurrency >= 1, please")
    if args.max_runs is not None and args.max_runs < 1:
        ap.error("--max-runs >= 1, please")
    only = PHASES if not args.only else tuple(x.strip() for x in args.only.split(","))
    if unknown := set(only) - set(PHASES):
        ap.error(f"unknown phase(s) {', '.join(sorted(unknown))}; known: {', '.join(PHASES)}")
    naive_n = args.naive_requests or max(10, args.requests // 3)
    nginx, why = find_nginx(args.install_nginx)
    started = time.monotonic()
    results: dict = {
        "rtt_ms": RTT_MS,
        "client_rtt_ms": CLIENT_RTT_MS,
        "regions": {PRIMARY: "primary", REPLICA: "replica"},
        "primary_workers": PRIMARY_WORKERS,
        "replica_workers": 1,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_average_at_start": round(os.getloadavg()[0], 2),
        },
    }
    results["idempotency_claim"] = args.idempotency_claim
    results["forwarding_client"] = args.forwarding_client
    results["max_runs"] = args.max_runs
    topology = TOPOLOGY + (
        f'\n[gateway]\nidempotency_claim = "{args.idempotency_claim}"\n'
        f'forwarding_client = "{args.forwarding_client}"\n'
        + (f"max_runs = {args.max_runs}\n" if args.max_runs is not None else "")
    )
    with throwaway_world("bench-gateway-", topology) as world:
        say(f"starting the calendar in {PRIMARY} (creates the schema), then in {REPLICA}")
        start_calendar(world, PRIMARY)
        start_calendar(world, REPLICA)
        phases = {
            "forwarded": lambda: forwarded_writes(world, args.requests, args.split_requests),
            "peer": lambda: peer_writes(world, nginx, why, args.requests),
            "unpooled": lambda: unpooled_writes(world, args.requests),
            "naive": lambda: naive_writes(world, naive_n),
            "reads": lambda: local_reads(world, args.reads, args.seconds),
            "write_throughput": lambda: write_throughput(
                world, args.seconds, nginx, why, args.concurrency
            ),
        }
        for name, phase in phases.items():
            if name not in only:
                continue
            try:
                results[name] = phase()
            except Exception as exc:  # one phase failing must not cost the others' figures
                say(f"{name}: failed: {exc!r}")
                results[name] = {"error": f"{type(exc).__name__}: {exc}"}
    if "error" not in results.get("naive", {"error": 1}) and "error" not in results.get(
        "forwarded", {"error": 1}
    ):
        results["naive"]["ratio_to_forwarded"] = round(
            results["naive"]["replica"]["p50_ms"] / results["forwarded"]["replica"]["p50_ms"], 2
        )
    results["machine"]["load_average_at_end"] = round(os.getloadavg()[0], 2)
    results["seconds"] = round(time.monotonic() - started, 1)
    report(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


def _verdict(met: bool) -> str:
    return "met" if met else "MISSED"


def report(r: dict) -> None:
    m = r["machine"]
    print(
        f"gateway benchmark: {PRIMARY} (primary, {r['primary_workers']} workers) + {REPLICA}, "
        f"link {r['rtt_ms']:.0f} ms RTT, client RTT {r['client_rtt_ms']:.0f} ms (clients dial a "
        f"region's port directly); {m['cpus']} CPUs, load average {m['load_average_at_start']}"
        f" -> {m['load_average_at_end']}; {r['seconds']:.0f} s; idempotency claim "
        f"{r.get('idempotency_claim', 'eager')}, forwarding client "
        f"{r.get('forwarding_client', 'aiohttp')}"
        + (f", max_runs {r['max_runs']}" if r.get("max_runs") else "")
    )
    for name, show in (
        ("forwarded", _report_forwarded),
        ("peer", _report_peer),
        ("unpooled", _report_unpooled),
        ("naive", _report_naive),
        ("reads", _report_reads),
        ("write_throughput", _report_throughput),
    ):
        if name not in r:
            continue
        if "error" in r[name]:
            print(f"({name}) FAILED: {r[name]['error']}")
        else:
            show(r)


def _report_forwarded(r: dict) -> None:
    f = r["forwarded"]
    prim = f["primary"]["p50_ms"]
    print(f"(1) write POST /events (8 SQL statements), p50 of {f['replica']['n']}")
    print(f"    at the primary, direct (a client next to {PRIMARY})  {prim:8.1f} ms")
    print(
        f"    ideal = {r['client_rtt_ms']:.0f} + {r['rtt_ms']:.0f} + {prim:.1f}"
        f"{'':25}{f['ideal_ms']:8.1f} ms"
    )
    print(
        f"    {REPLICA}, forwarded over the warm pool             {f['replica']['p50_ms']:8.1f} ms"
        f"  = {f['ratio_to_ideal']:.3f} x ideal; target <= {f['target_ratio']} "
        f"{_verdict(f['met'])} (+{f['overhead_ms']:.1f} ms over the ideal, budget "
        f"{f['overhead_budget_ms']:.1f} ms); p99 {f['replica']['p99_ms']:.1f} ms; "
        f"{f['new_link_connections_per_write']:.2f} new link connections per write"
    )
    z = f["link_at_0_ms"]
    print(
        f"    same, link at 0 ms: {REPLICA} {z['replica']['p50_ms']:.1f} ms vs primary "
        f"{z['primary']['p50_ms']:.1f} ms -> forwarding's own cost {z['overhead_ms']:.1f} ms"
    )
    if hops := z.get("by_hop"):
        print(
            f"    by each gateway's Server-Timing: the primary {hops['primary_forwarded_ms']:.1f} ms "
            f"for a forwarded write vs {hops['primary_direct_ms']:.1f} ms direct (+"
            f"{hops['primary_extra_ms']:.1f} ms), {REPLICA}'s gateway and the link "
            f"{hops['replica_and_link_ms']:.1f} ms"
        )
    _report_split(f)


def _report_split(f: dict) -> None:
    sp = f["own_cost_split"]
    db, vk = sp["db_round_trips"], sp["valkey_round_trips"]

    def regions(d: dict) -> str:
        return ", ".join(f"{k} {v:g}" for k, v in d.items())

    print(
        f"    own cost per forwarded write, link at 0 ms ({sp['writes']} writes of each kind): "
        f"CPU {sp['replica_cpu_ms_per_write']:.2f} ms in {REPLICA}'s gateway + "
        f"{sp['primary_cpu_ms_own']:.2f} ms more at the primary ({sp['primary_cpu_ms_per_direct_write']:.2f}"
        f" ms for a direct write); DB round trips +{db['own']:g} ({regions(db['forwarded_write'])}"
        f" vs direct {regions(db['direct_write'])}); Valkey round trips +{vk['own']:g} "
        f"({regions(vk['forwarded_write'])} vs direct {regions(vk['direct_write'])})"
    )


def _report_peer(r: dict) -> None:
    p = r["peer"]
    if "skipped" in p:
        print(f"(1b) nginx peer: skipped: {p['skipped']}")
        return
    print(
        f"(1b) the same write, {p['writes']} rounds, a new client connection per write; ideal "
        f"{p['ideal_ms']:.1f} ms (100 ms + the primary's own p50 in the same rounds; its p99 "
        f"{p['primary']['p99_ms']:.1f} ms)"
    )
    for name, label in (
        ("latitude", f"{REPLICA}'s gateway, warm shared pool"),
        ("nginx_1_worker", f"nginx {p['nginx_version']}, 1 worker, keepalive 8"),
        ("nginx_4_workers", f"nginx {p['nginx_version']}, 4 workers, keepalive 8"),
    ):
        x = p[name]
        goal = ""
        if name == "latitude":
            met = x["p99_ratio_to_ideal"] <= TARGET_P99_RATIO
            goal = f"   p99 target <= {TARGET_P99_RATIO} {_verdict(met)}"
        print(
            f"    {label:42} p50 {x['p50_ms']:7.1f} ms = {x['p50_ratio_to_ideal']:.3f} x   "
            f"p99 {x['p99_ms']:7.1f} ms = {x['p99_ratio_to_ideal']:.3f} x   "
            f"{x['new_link_connections']} new link connections{goal}"
        )
    for region, c in p.get("collector", {}).items():
        print(
            f"    collector in {region}'s gateway: {c['frozen_objects']:,} objects frozen at "
            f"start-up, {c['full_collections']} full collections in the rounds, the longest "
            f"since start-up {c['longest_ms_since_start']} ms"
        )


def _report_unpooled(r: dict) -> None:
    u = r["unpooled"]
    delta = ""
    if "error" not in r.get("forwarded", {"error": 1}):
        delta = (
            f"; {u['replica']['p50_ms'] - r['forwarded']['replica']['p50_ms']:+.1f} ms vs pooled"
        )
    print(
        f"(2) pooling off (--no-pool)                            {u['replica']['p50_ms']:8.1f} ms"
        f"  = {u['ratio_to_ideal']:.3f} x ideal ({u['primary']['p50_ms']:.1f} ms at the primary "
        f"meanwhile); {u['new_link_connections_per_write']:.2f} new link connections per write"
        f"{delta}"
    )
    print("    (each new connection pays the TCP handshake's round trip; TLS would add 1-2 more)")


def _report_naive(r: dict) -> None:
    n = r["naive"]
    ratio = (
        f"  = {n['ratio_to_forwarded']:.2f} x the forwarded write"
        if "ratio_to_forwarded" in n
        else ""
    )
    print(
        f"(3) naive layout (app in {REPLICA}, its SQL over the link) {n['replica']['p50_ms']:8.1f} ms"
        f"{ratio} (~{n['round_trips_per_write']:.0f} round trips per write; n={n['replica']['n']})"
    )


def _report_reads(r: dict) -> None:
    rd = r["reads"]
    g, b = rd["sequential"]["gateway"], rd["sequential"]["bare"]
    tg, tb = rd["throughput"]["gateway"], rd["throughput"]["bare"]
    print(f"(4) local read {rd['path']} in {REPLICA}, signed in, 1 server process each")
    print(
        f"    sequential p50: bare {b['p50_ms']:.3f} ms, gateway {g['p50_ms']:.3f} ms -> overhead "
        f"{rd['p50_overhead_ms']:.3f} ms; target <= {rd['target_overhead_ms']} ms "
        f"{_verdict(rd['overhead_met'])} (n={g['n']} each, alternating; median paired "
        f"difference {rd['sequential']['paired_difference_p50_ms']:.3f} ms)"
    )
    pairs = ", ".join(f"{100 * x:.0f}" for x in rd["throughput_pair_ratios"])
    print(
        f"    throughput at concurrency {rd['concurrency']}: bare {tb['rps']} req/s, gateway "
        f"{tg['rps']} req/s (means of {len(tb['runs'])} runs each) -> median of paired ratios "
        f"{100 * rd['throughput_ratio']:.1f} % ({pairs}); target >= "
        f"{100 * rd['target_throughput_ratio']:.0f} % {_verdict(rd['throughput_met'])}"
    )
    print(
        f"    server CPU per read: bare {tb['server_cpu_ms_per_request']:.3f} ms, gateway "
        f"{tg['server_cpu_ms_per_request']:.3f} ms -> one core carries "
        f"{100 * rd['cpu_capacity_ratio']:.1f} % as many reads through the gateway; machine CPU "
        f"{tb['machine_cpu_percent']:.0f} / {tg['machine_cpu_percent']:.0f} % busy"
    )


def _report_throughput(r: dict) -> None:
    w = r["write_throughput"]
    d, lat = w["primary_direct"], w["latitude"]
    print(
        f"(5) writes per second, concurrency {w['concurrency']}, one signed-in user per connection"
    )
    print(
        f"    direct at the primary, no proxy (its ceiling)     {d['rps']:8.0f} writes/s  "
        f"p50 {d['p50_ms']:6.1f} ms; primary {d['primary_cpu_ms_per_request']:.2f} CPU ms/write;"
        f" machine CPU {d['machine_cpu_percent']:.0f} %"
    )
    rows = [("latitude gateway, 1 process (signed, session)", lat)]
    ng = w["nginx"]
    if "skipped" not in ng:
        rows.append((f"nginx {ng['nginx_version']} proxy_pass, 1 worker, keepalive 32", ng))
    for label, x in rows:
        ceiling = 1000 / max(x["proxy_cpu_ms_per_request"], 1e-3)
        print(
            f"    {label:50}{x['rps']:8.0f} writes/s  p50 {x['p50_ms']:6.1f} ms; proxy "
            f"{x['proxy_cpu_ms_per_request']:.2f} CPU ms/write ({x['proxy_cpu_percent']:.0f} % of a "
            f"core; one core would carry ~{ceiling:,.0f}/s); primary "
            f"{x['primary_cpu_ms_per_request']:.2f} CPU ms/write; relays "
            f"{x['relays_cpu_ms_per_request']:.2f}; machine CPU {x['machine_cpu_percent']:.0f} %;"
            f" p99 {x['p99_ms']:.0f} ms; {x['new_link_connections']} new link connections "
            f"({x.get('link_connections_in_window', '?')} after the warm-up){_other_statuses(x)}"
        )
    if lat.get("gateway_decisions"):
        print(f"    gateway decisions meanwhile: {lat['gateway_decisions']}")
    if "skipped" in ng:
        print(f"    nginx: skipped: {ng['skipped']}")
    else:
        print(
            f"    -> latitude = {w['ratio_latitude_vs_nginx']:.2f} x nginx (nginx forwards unsigned,"
            " without sessions or idempotency: a floor, not a like-for-like)"
        )


def _other_statuses(x: dict) -> str:
    other = x.get("other_statuses")
    return f"; other statuses {other}" if other else ""


if __name__ == "__main__":
    main()
