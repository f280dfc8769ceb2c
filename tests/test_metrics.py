"""Prometheus metrics at `/_latitude/metrics` in every region of the shared world, parsed with
`prometheus_client.parser`, and moving after real traffic; the mirror's own series; quantiles."""

from __future__ import annotations

import json
import time
import urllib.request

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from latitude import metrics
from tests.test_sidecar import sidecars  # noqa: F401, F811  (a fixture: the sidecar in two regions)

EVERYWHERE = {
    "latitude_requests",
    "latitude_request_duration_seconds",
    "latitude_region_up",
    "latitude_link_rtt_seconds",
    "latitude_replica_lag_seconds",
    "latitude_replica_lag_bytes",
    "latitude_start_time_seconds",
}
# Event series appear once something has happened: after the test's traffic.
AT_A_REPLICA = {
    "latitude_forwarded_requests",
    "latitude_forward_duration_seconds",
    "latitude_read_wait_seconds",
}
AT_THE_PRIMARY = {"latitude_idempotency_outcomes"}


def scrape(port: int) -> dict[tuple[str, frozenset], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/_latitude/metrics", timeout=10) as r:
        assert r.headers["content-type"].startswith("text/plain")
        text = r.read().decode()
    samples = {}
    families = set()
    for family in text_string_to_metric_families(text):
        families.add(family.name)
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    samples[("__families__", frozenset())] = families  # type: ignore[assignment]
    return samples


def total(samples, name: str, **labels) -> float:
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))


async def _traffic(port: int, name: str, writes: int, reads: int) -> None:
    async with aiohttp.ClientSession(
        f"http://127.0.0.1:{port}", cookie_jar=aiohttp.CookieJar(unsafe=True)
    ) as c:
        async with c.post("/login", json={"name": name}) as r:
            assert r.status == 200, await r.text()
        for i in range(writes):
            async with c.post("/events", json={"title": f"{name} {i}"}) as r:
                assert r.status == 201, await r.text()
        async with c.get("/events") as r:  # waits (bounded) for the replica to replay them
            assert r.status == 200, await r.text()
    # Every read on a connection of its own, so both worker processes get some.
    for _ in range(reads):
        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as c:
            async with c.get("/_latitude/health") as r:
                assert r.status == 200


def test_every_region_exposes_parseable_metrics_that_move_with_traffic(calendar):
    import asyncio

    state = calendar.state()
    ports = {name: r.app_port for name, r in state.regions.items()}
    before = {name: scrape(port) for name, port in ports.items()}

    writes, reads = 4, 20
    asyncio.run(_traffic(ports["eu-west"], "metrics-eu", writes, reads))
    asyncio.run(_traffic(ports["ap-southeast"], "metrics-ap", writes, 0))
    time.sleep(2.5)  # a sampling round (region health, lag) after the traffic
    after = {name: scrape(port) for name, port in ports.items()}
    for name, samples in after.items():
        wanted = EVERYWHERE | (AT_THE_PRIMARY if name == "us-west" else AT_A_REPLICA)
        missing = wanted - samples[("__families__", frozenset())]
        assert not missing, f"{name} lacks {missing}"

    eu_b, eu_a = before["eu-west"], after["eu-west"]
    fwd = "latitude_forwarded_requests_total"
    assert (
        total(eu_a, fwd, outcome="forwarded") - total(eu_b, fwd, outcome="forwarded") >= writes + 1
    )
    count = "latitude_forward_duration_seconds_count"
    moved = total(eu_a, count) - total(eu_b, count)
    assert moved >= writes + 1
    spent = total(eu_a, "latitude_forward_duration_seconds_sum") - total(
        eu_b, "latitude_forward_duration_seconds_sum"
    )
    # A forwarded write crosses the 125 ms link once: the series must show the ocean.
    rtt_s = calendar.topology().rtt_ms("eu-west", "us-west") / 1000
    assert spent / moved >= 0.9 * rtt_s
    # Both workers' counts are in one scrape (multiprocess mode): all 20 health checks.
    req = "latitude_requests_total"
    assert total(eu_a, req, kind="latitude") - total(eu_b, req, kind="latitude") >= reads

    us_b, us_a = before["us-west"], after["us-west"]
    idem = "latitude_idempotency_outcomes_total"
    assert total(us_a, idem, outcome="new") - total(us_b, idem, outcome="new") >= 2 * (writes + 1)
    assert total(us_a, req, kind="verified") - total(us_b, req, kind="verified") >= 2 * (writes + 1)

    for name, samples in after.items():
        for region in ports:
            assert total(samples, "latitude_region_up", region=region) == 1.0, (name, region)
    assert total(eu_a, "latitude_link_rtt_seconds", peer="us-west") >= 0.9 * rtt_s
    for replica in ("eu-west", "ap-southeast"):
        assert ("latitude_replica_lag_seconds", frozenset({("region", replica)})) in after[replica]
        assert total(after[replica], "latitude_replica_lag_bytes", region=replica) >= 0
    for name in ("eu-west", "ap-southeast"):
        assert ("latitude_replica_lag_seconds", frozenset({("region", name)})) in after["us-west"]


def test_dashboard_json_names_every_region(calendar):
    port = calendar.state().regions["ap-southeast"].app_port
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/_latitude/world.json", timeout=10) as r:
        world = json.loads(r.read())
    assert world["seen_from"] == "ap-southeast"
    regions = {r["region"]: r for r in world["regions"]}
    assert set(regions) == {"us-west", "eu-west", "ap-southeast"}
    assert all(r["up"] for r in regions.values())
    assert regions["us-west"]["role"] == "primary"
    # Fetched across the links: the far regions cost at least one RTT.
    topology = calendar.topology()
    assert regions["us-west"]["fetched_in_ms"] >= 0.9 * topology.rtt_ms("ap-southeast", "us-west")


def test_mirror_serve_exposes_its_serial(calendar):
    from latitude.lab.mirrors import start_lab_mirrors, wait_lab_mirrors_ready
    from latitude.mirror.publisher import Publisher

    roots = start_lab_mirrors(calendar)
    # A mirror is ready after its first long poll; under load that can take a while.
    assert wait_lab_mirrors_ready(calendar, timeout=120)
    with Publisher(roots["us-west"]) as pub:
        serial = pub.publish("metrics/probe.json", b'{"probe": true}\n').serial
    state = calendar.state()
    for name, r in state.regions.items():
        port = r.mirror_port
        deadline = time.monotonic() + 30
        while True:
            samples = scrape(port)
            if total(samples, "latitude_mirror_serial", region=name) >= serial:
                break
            assert time.monotonic() < deadline, f"{name}'s mirror never reported serial {serial}"
            time.sleep(0.2)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics/probe.json", timeout=10):
            pass
        samples = scrape(port)
        assert total(samples, "latitude_requests_total", region=name, kind="mirror") >= 1
        assert ("latitude_mirror_lag_seconds", frozenset({("region", name)})) in samples


def test_quantiles_interpolate_within_buckets():
    bounds = [(0.1, 0.0), (0.2, 50.0), (0.4, 100.0), (float("inf"), 100.0)]
    assert metrics._quantile(0.5, bounds) == pytest.approx(0.2)
    assert metrics._quantile(0.25, bounds) == pytest.approx(0.15)
    assert metrics._quantile(0.99, bounds) == pytest.approx(0.396)


def test_quantile_beyond_the_last_bucket_is_its_bound():
    bounds = [(0.1, 10.0), (float("inf"), 20.0)]
    assert metrics._quantile(0.99, bounds) == 0.1


def test_the_grafana_dashboard_uses_only_series_we_export():
    import re
    from pathlib import Path

    dashboard = json.loads(
        (Path(__file__).parents[1] / "docs" / "grafana-dashboard.json").read_text()
    )
    used = set()
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            used |= set(re.findall(r"latitude_[a-z_]+", target["expr"]))
    snapshot = metrics.Snapshot("r", "primary")
    metrics.forwarded_total.labels("r", "forwarded").inc(0)
    metrics.forward_duration.labels("r")
    metrics.read_wait.labels("r")
    metrics.idempotency_total.labels("r", "new").inc(0)
    metrics.requests_total.labels("r", "primary", "200").inc(0)
    metrics.request_duration.labels("r", "primary")
    exported = set()
    for family in text_string_to_metric_families(metrics.exposition(snapshot).decode()):
        exported |= {s.name for s in family.samples} | {family.name}
    assert used and used <= exported, used - exported


def test_the_sidecar_gateway_counts_too(world, sidecars):  # noqa: F811
    """`latitude gateway --upstream` (the sidecar) exposes the same series."""
    import asyncio

    from tests.extra_slots import EU, PRIMARY

    before = {r: scrape(port) for r, port in sidecars.items()}

    async def sign_in() -> None:
        jar = aiohttp.CookieJar(unsafe=True)
        async with aiohttp.ClientSession(f"http://127.0.0.1:{sidecars[EU]}", cookie_jar=jar) as c:
            for name in ("metrics-a", "metrics-b"):
                async with c.post("/login", data={"name": name}) as r:
                    assert r.status == 200

    asyncio.run(sign_in())
    after = {r: scrape(port) for r, port in sidecars.items()}
    fwd = "latitude_forwarded_requests_total"
    assert (
        total(after[EU], fwd, outcome="forwarded") - total(before[EU], fwd, outcome="forwarded")
        == 2
    )
    idem = "latitude_idempotency_outcomes_total"
    assert (
        total(after[PRIMARY], idem, outcome="new") - total(before[PRIMARY], idem, outcome="new")
        == 2
    )
