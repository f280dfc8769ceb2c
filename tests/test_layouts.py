"""The talk's table, reproduced in the shared world: a far user (in Frankfurt, nearest region
eu-west, primary us-west) reads and writes under the four layouts. Latitude's reads must be a
fraction of single-region reads (they stay in Europe), and its writes no worse than going
straight to the primary (one ocean round trip either way), within noise."""

from __future__ import annotations

import asyncio
import json
import os
import shutil

import aiohttp

from latitude.lab import demo

PLACE = "Frankfurt"
# The gateway's own work on both sides (signing, idempotency, the session copy) is a few ms on
# a quiet machine and more on a loaded one; beyond that a write must not cost more than going
# straight to the primary.
WRITE_TOLERANCE = 1.2


async def _warm(port: int, writes: int = 8) -> None:
    """The shared world may have idled past the primary's keep-alive: renew the pool first."""
    async with aiohttp.ClientSession(
        f"http://127.0.0.1:{port}", cookie_jar=aiohttp.CookieJar(unsafe=True)
    ) as c:
        async with c.post("/login", json={"name": "layouts-warm-up"}) as r:
            assert r.status == 200
        for i in range(writes):
            async with c.post("/events", json={"title": f"warm-up {i}"}) as r:
                assert r.status == 201


def test_a_far_user_reads_locally_and_writes_in_one_ocean_round_trip(calendar, tmp_path):
    asyncio.run(_warm(calendar.state().regions["eu-west"].app_port))
    result = demo.measure_layouts(calendar, (PLACE,), reads=12, writes=8)
    layouts = result["layouts"]
    assert set(layouts) == set(demo.LAYOUTS)
    for layout in demo.LAYOUTS:
        f = layouts[layout][PLACE]
        assert set(f) == {"read_p50_ms", "write_p50_ms", "read_p99_ms", "write_p99_ms"}
        assert 0 < f["read_p50_ms"] <= f["read_p99_ms"]
        assert 0 < f["write_p50_ms"] <= f["write_p99_ms"]
    where = result["places"][PLACE]
    assert where["nearest"] == "eu-west" and where["primary"] == "us-west"

    single, latitude = layouts["single-region"][PLACE], layouts["latitude"][PLACE]
    # Reads: straight to the primary costs the user's RTT to it; Latitude's stay near.
    assert single["read_p50_ms"] >= 0.9 * where["rtt_ms"]["us-west"]
    assert latitude["read_p50_ms"] < 0.5 * single["read_p50_ms"], (latitude, single)
    # Writes: one ocean round trip either way.
    # The gateway's CPU work on both sides (a few ms on a quiet machine) stretches with the run
    # queue: on a shared machine allow 10 ms per runnable process per core beyond the first.
    load = os.getloadavg()[0] / (os.cpu_count() or 1)
    allowance_ms = 10 * max(0.0, load - 1)
    limit = WRITE_TOLERANCE * single["write_p50_ms"] + allowance_ms
    assert latitude["write_p50_ms"] <= limit, (latitude, single, f"load/core {load:.1f}")
    # The other two layouts are slower at writing, for the reasons the talk gives.
    unpooled = layouts["forwarding-unpooled"][PLACE]
    sql = layouts["sql-over-the-ocean"][PLACE]
    rtt = calendar.topology().rtt_ms("eu-west", "us-west")
    # A new connection's handshakes cross the ocean: TCP's, and TLS 1.3's when openssl could
    # make the lab a certificate.
    handshakes = 2 if shutil.which("openssl") else 1
    assert unpooled["write_p50_ms"] >= latitude["write_p50_ms"] + (handshakes - 0.3) * rtt
    assert sql["write_p50_ms"] >= 4 * rtt  # a connection and every statement cross the ocean
    assert sql["read_p50_ms"] < 0.5 * single["read_p50_ms"]  # but its reads are local

    # The JSON and the chart the demo writes beside it.
    path = tmp_path / "figures.json"
    path.write_text(json.dumps({"layouts": layouts, "regions": {}}))
    chart = demo.write_chart(result, tmp_path / "figures.svg")
    svg = chart.read_text()
    assert svg.startswith("<?xml") and "<svg" in svg
    assert all(layout in svg for layout in demo.LAYOUTS) and PLACE in svg


def test_a_place_feels_as_far_as_the_model_says(calendar):
    """`latitude lab place Sydney`: its URLs cross client links whose RTT is the model's."""
    import subprocess
    import sys
    import time
    import urllib.request

    from latitude.lab import places

    out = subprocess.run(
        [sys.executable, "-m", "latitude.cli", "lab", "place", "Sydney", "--json",
         "--state-dir", str(calendar.state_dir)],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    vantage = json.loads(out.stdout)
    assert vantage["nearest"] == "ap-southeast" and vantage["primary"] == "us-west"
    model = places.client_rtts(places.place("Sydney"), calendar.topology())
    assert vantage["rtt_ms"] == model
    for region, url in vantage["app_urls"].items():
        best = float("inf")
        for _ in range(3):  # each on a new connection: the handshake's RTT plus the request's
            started = time.perf_counter()
            with urllib.request.urlopen(f"{url}/_latitude/health", timeout=10) as r:
                assert json.loads(r.read())["region"] == region
            best = min(best, (time.perf_counter() - started) * 1000)
        assert 2 * model[region] * 0.95 <= best <= 2 * model[region] + 150, (region, best)

    bad = subprocess.run(
        [sys.executable, "-m", "latitude.cli", "lab", "place", "Atlantis",
         "--state-dir", str(calendar.state_dir)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert bad.returncode == 2 and "no place called 'Atlantis'" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_series_measured_at_once_do_not_wait_on_each_others_locks(calendar):
    """The demo's users each write their own team's row: one series' transaction holding its
    row (the naive layout holds it for four ocean round trips) must not hold up another's
    writes. Here a transaction holding user A's team row stands in for A's naive write in
    flight, and B writes meanwhile."""
    import psycopg

    (primary,) = [r for r in calendar.status()["regions"] if r["role"] == "primary"]
    port = calendar.state().regions["us-west"].app_port

    async def run() -> None:
        url = f"http://127.0.0.1:{port}"
        jar = aiohttp.CookieJar(unsafe=True)
        async with (
            aiohttp.ClientSession(url, cookie_jar=aiohttp.CookieJar(unsafe=True)) as a,
            aiohttp.ClientSession(url, cookie_jar=jar) as b,
        ):
            user_a = await demo.sign_in(a, "locks-a-Sydney-naive", "naive", url)
            user_b = await demo.sign_in(b, "locks-b-Sao-Paulo-latitude", "latitude", url)
            assert user_a["team_id"] != user_b["team_id"]
            async with await psycopg.AsyncConnection.connect(primary["database_url"]) as held:
                await held.execute(
                    "select 1 from teams where id = %s for no key update", (user_a["team_id"],)
                )
                timeout = aiohttp.ClientTimeout(total=2)
                async with b.post("/events", json={"title": "not held up"}, timeout=timeout) as r:
                    assert r.status == 201, await r.text()
                await held.rollback()

    asyncio.run(run())
