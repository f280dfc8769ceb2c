"""Routing without the lab: config, location, choice, checker, history, DNS front, HTTP, exports.

Real sockets on 127.0.0.1 throughout; the lab-based tests (kill a region, watch DNS move) are
in test_routing_lab.py.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import socket
import struct
import threading
import time
import urllib.request
from pathlib import Path

import dns.edns
import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import hcl2
import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from latitude.lab.harness import wait_until
from latitude.routing.choice import RegionRouter
from latitude.routing.config import RoutingConfigError, routing_config
from latitude.routing.dns import DnsFront
from latitude.routing.export import (
    ROUTE53_DEFAULT_INTERVAL_S,
    aws_region_for,
    powerdns_zone,
    route53_terraform,
)
from latitude.routing.geo import CidrTable, GeoIPDatabase, Locator, great_circle_km
from latitude.routing.health import (
    HealthChecker,
    HealthView,
    Peer,
    RegionHealth,
    Vantage,
    vantage_from_topology,
)
from latitude.routing.history import UptimeHistory
from latitude.routing.service import BackgroundRouting, RoutingService
from latitude.topology import parse_topology

ZONE = "example.test."
APP = "calendar.example.test."
ADDR = {"us-west": "192.0.2.1", "eu-west": "192.0.2.2", "ap-southeast": "192.0.2.3"}

TOPOLOGY = """
[app]
name = "calendar"

[lab]

[[regions]]
name = "us-west"
primary = true
location = [45.60, -121.18]
public_url = "https://us-west.example.test"

[[regions]]
name = "eu-west"
location = [53.35, -6.26]
public_url = "https://eu-west.example.test"

[[regions]]
name = "ap-southeast"
location = [1.35, 103.82]
public_url = "https://ap-southeast.example.test"

[routing]
zone = "example.test"
addresses = [["us-west", "192.0.2.1", "2001:db8::1"], ["eu-west", "192.0.2.2", "2001:db8::2"], ["ap-southeast", "192.0.2.3"]]
# Clients: Seattle, London and Jakarta by location; Dublin's /24 named by region outright;
# a /8 with a more specific /24 inside it (for ECS scopes).
cidrs = [
  ["198.51.100.0/24", 47.61, -122.33, "Seattle"],
  ["203.0.113.0/24", 51.51, -0.13, "London"],
  ["100.64.0.0/16", -6.2, 106.85, "Jakarta"],
  ["192.0.2.128/25", "eu-west"],
  ["10.0.0.0/8", "us-west"],
  ["10.1.2.0/24", "ap-southeast"],
  ["2001:db8:aa::/48", 51.51, -0.13, "London v6"],
]
"""

SEATTLE, LONDON, JAKARTA = "198.51.100.7", "203.0.113.9", "100.64.3.4"


@pytest.fixture(scope="module")
def topology():
    return parse_topology(TOPOLOGY, source="test.toml", environ={})


@pytest.fixture(scope="module")
def config(topology):
    return routing_config(topology)


def view_of(
    healthy: dict[str, bool], rtt: dict[tuple[str, str], float] | None = None, topology=None
) -> HealthView:
    regions = {n: RegionHealth(n, h, int(h), int(not h), {}) for n, h in healthy.items()}
    locations = {r.name: (r.latitude, r.longitude) for r in topology.regions} if topology else {}
    return HealthView(regions, rtt or {}, locations, time.time())


ALL_UP = {"us-west": True, "eu-west": True, "ap-southeast": True}

# Round trips as the lab's links would measure them (125 / 165 / 170 ms).
LAB_RTT = {
    ("us-west", "us-west"): 1.0,
    ("us-west", "eu-west"): 125.0,
    ("us-west", "ap-southeast"): 165.0,
    ("eu-west", "eu-west"): 1.0,
    ("eu-west", "us-west"): 125.0,
    ("eu-west", "ap-southeast"): 170.0,
    ("ap-southeast", "ap-southeast"): 1.0,
    ("ap-southeast", "us-west"): 165.0,
    ("ap-southeast", "eu-west"): 170.0,
}


def router_for(topology, config, healthy=ALL_UP, rtt=None) -> RegionRouter:
    view = view_of(healthy, rtt, topology)
    return RegionRouter(topology, config, Locator(CidrTable(config.cidrs, topology)), lambda: view)


# ---- config -------------------------------------------------------------------------------


def test_config_defaults_and_values(topology, config):
    assert config.zone == ZONE and config.name == APP
    assert config.ttl_s == 30 and config.check_interval_s == 1.0 and config.check_threshold == 2
    assert config.window == 3 and config.rise == 3 and config.suspect_interval_s == 0.25
    assert config.suspect_ttl_s == 1
    assert config.check_path == "/_latitude/health"
    assert config.addresses["us-west"] == ("192.0.2.1", "2001:db8::1")
    bare = routing_config(parse_topology(TOPOLOGY.split("[routing]")[0], environ={}))
    assert bare.name == "calendar.latitude.test." and bare.addresses == {}


def test_config_problems_name_the_key(topology):
    bad = TOPOLOGY.replace(
        'zone = "example.test"',
        'zone = "exa mple"\nttl_s = -1\ncheck_threshold = 1.5\ncheck_services = ["db"]\n'
        "check_window = 1\ncheck_threshold_x = 0\ncheck_suspect_interval_s = 5\nsuspect_ttl_s = -2",
    ).replace("check_threshold_x = 0\n", "")
    bad = bad.replace('["10.0.0.0/8", "us-west"]', '["10.0.0.0/8", "mars"]')
    with pytest.raises(RoutingConfigError, match="check_window: must be at most 32"):
        routing_config(parse_topology(TOPOLOGY + "check_window = 33\n", environ={}))
    with pytest.raises(RoutingConfigError) as info:
        routing_config(parse_topology(bad, environ={}))
    text = "\n".join(info.value.problems)
    for key in (
        "routing.zone",
        "routing.ttl_s",
        "routing.check_threshold",
        "routing.check_services",
        "routing.check_window",
        "routing.check_suspect_interval_s",
        "routing.suspect_ttl_s",
        "routing.cidrs[5]",
    ):
        assert key in text, text
    assert "mars" in text


# ---- location -----------------------------------------------------------------------------


def test_great_circle():
    assert great_circle_km(53.35, -6.26, 1.35, 103.82) == pytest.approx(
        11_200, rel=0.02
    )  # Dublin-Singapore
    assert great_circle_km(10, 20, 10, 20) == 0


def test_cidr_lookup_and_ecs_scope(topology, config):
    table = CidrTable(config.cidrs, topology)
    ip = ipaddress.ip_address
    assert table.lookup(ip(LONDON)).location.label == "London"
    assert table.lookup(ip("192.0.2.200")).location.region == "eu-west"
    # /24 from the client: the /24 entry decides, scope 24.
    assert table.lookup(ip("203.0.113.0"), 24).scope == 24
    # 10.9/16 is in the /8; the /24 inside the /8 starts 10.1: 12 leading bits rule it out.
    found = table.lookup(ip("10.9.0.0"), 16)
    assert found.location.region == "us-west" and found.scope == 13
    # 10.1/16 holds the more specific 10.1.2/24: the answer depends on bits the resolver did not
    # send (scope > source); it holds for 10.1.0/23, around the zero-filled address.
    found = table.lookup(ip("10.1.0.0"), 16)
    assert found.location.region == "us-west" and found.scope == 23
    assert table.lookup(ip("10.1.2.0"), 24).location.region == "ap-southeast"
    # Unknown address: no location; scope says how far the miss reaches.
    assert table.lookup(ip("8.8.8.0"), 24).location is None
    assert table.lookup(ip("2001:db8:aa:1::"), 56).location.label == "London v6"


class U16(int):
    pass


class U64(int):
    pass


def _mmdb_encode(value) -> bytes:
    def control(kind: int, size: int) -> bytes:
        ext = b""
        if kind > 7:
            ext, kind = bytes([kind - 7]), 0
        if size < 29:
            return bytes([(kind << 5) | size]) + ext
        if size < 285:
            return bytes([(kind << 5) | 29]) + ext + bytes([size - 29])
        return bytes([(kind << 5) | 30]) + ext + (size - 285).to_bytes(2, "big")

    if isinstance(value, str):
        raw = value.encode()
        return control(2, len(raw)) + raw
    if isinstance(value, float):
        return control(3, 8) + struct.pack("!d", value)
    if isinstance(value, int):
        raw = value.to_bytes((value.bit_length() + 7) // 8, "big")
        kind = 5 if isinstance(value, U16) else 9 if isinstance(value, U64) else 6
        return control(kind, len(raw)) + raw
    if isinstance(value, list):
        return control(11, len(value)) + b"".join(_mmdb_encode(v) for v in value)
    assert isinstance(value, dict)
    return control(7, len(value)) + b"".join(
        _mmdb_encode(k) + _mmdb_encode(v) for k, v in value.items()
    )


def write_mmdb(path: Path, networks: list[tuple[str, dict]]) -> None:
    """A minimal MaxMind DB writer (IPv4 tree, 24-bit records), enough for a GeoLite2-City shape."""
    nodes: list[list] = [[None, None]]
    data = bytearray()
    for cidr, record in sorted(networks, key=lambda n: ipaddress.ip_network(n[0]).prefixlen):
        net = ipaddress.ip_network(cidr)
        leaf = ("data", len(data))
        data += _mmdb_encode(record)
        bits, node = int(net.network_address), 0
        for i in range(net.prefixlen):
            bit = (bits >> (31 - i)) & 1
            if i == net.prefixlen - 1:
                nodes[node][bit] = leaf
                break
            child = nodes[node][bit]
            if not isinstance(child, int):  # empty, or a less specific network: split it
                nodes.append([child, child])
                child = len(nodes) - 1
                nodes[node][bit] = child
            node = child
    count = len(nodes)

    def record(v) -> int:
        return count if v is None else v if isinstance(v, int) else count + 16 + v[1]

    tree = b"".join(record(a).to_bytes(3, "big") + record(b).to_bytes(3, "big") for a, b in nodes)
    meta = {
        "node_count": count,
        "record_size": U16(24),
        "ip_version": U16(4),
        "database_type": "Latitude-Test-City",
        "languages": ["en"],
        "binary_format_major_version": U16(2),
        "binary_format_minor_version": U16(0),
        "build_epoch": U64(1_700_000_000),
        "description": {"en": "test data"},
    }
    path.write_bytes(
        tree + bytes(16) + bytes(data) + b"\xab\xcd\xefMaxMind.com" + _mmdb_encode(meta)
    )


def city(name: str, iso: str, lat: float, lon: float) -> dict:
    return {
        "city": {"names": {"en": name}},
        "country": {"iso_code": iso},
        "location": {"latitude": lat, "longitude": lon},
    }


def test_geoip_database(tmp_path, topology, config):
    pytest.importorskip("maxminddb")
    path = tmp_path / "GeoLite2-City-test.mmdb"
    write_mmdb(
        path,
        [
            ("81.2.69.0/24", city("London", "GB", 51.51, -0.13)),
            ("175.16.0.0/16", city("Changchun", "CN", 43.88, 125.32)),
            ("175.16.199.0/24", city("Singapore", "SG", 1.29, 103.85)),
        ],
    )
    db = GeoIPDatabase(str(path))
    try:
        found = db.lookup(ipaddress.ip_address("81.2.69.160"))
        assert found.location.label == "London, GB" and found.location.source == "geoip"
        assert found.scope == 24
        # The /16 with a more specific /24 (175.16.199/24) inside: from a /16 client subnet the
        # scope is longer than the source (175.16.0/17 is where the tree walk ends).
        found = db.lookup(ipaddress.ip_address("175.16.0.0"), 16)
        assert found.location.label == "Changchun, CN" and found.scope == 17
        assert db.lookup(ipaddress.ip_address("8.8.8.8")).location is None
        assert db.lookup(ipaddress.ip_address("2001:db8::1")).location is None  # IPv4-only file
        # The CIDR table goes first, the database after it.
        locator = Locator(CidrTable(config.cidrs, topology), db)
        router = RegionRouter(topology, config, locator, lambda: view_of(ALL_UP, LAB_RTT, topology))
        assert router.choose_for_address("81.2.69.160").region == "eu-west"
        assert router.choose_for_address("175.16.199.7").region == "ap-southeast"
        assert router.choose_for_address(SEATTLE).region == "us-west"
    finally:
        db.close()


# ---- choice -------------------------------------------------------------------------------


def test_choice_nearest_by_distance_without_measurements(topology, config):
    router = router_for(topology, config)
    assert router.choose_for_address(SEATTLE).region == "us-west"
    assert router.choose_for_address(LONDON).region == "eu-west"
    assert router.choose_for_address(JAKARTA).region == "ap-southeast"
    assert router.choose_for_address(LONDON).basis == "distance"
    # No location: the primary.
    choice = router.choose_for_address("127.0.0.1")
    assert choice.region == "us-west" and choice.basis == "default"


def test_choice_lowest_measured_rtt_among_healthy(topology, config):
    router = router_for(topology, config, rtt=LAB_RTT)
    choice = router.choose_for_address(LONDON)
    assert (
        choice.region == "eu-west"
        and choice.basis == "measured-rtt"
        and choice.vantage == "eu-west"
    )
    # eu-west down: from Dublin, us-west (125 ms) beats ap-southeast (170 ms) though Singapore
    # is not much further by great circle than Oregon.
    router = router_for(topology, config, {**ALL_UP, "eu-west": False}, LAB_RTT)
    choice = router.choose_for_address(LONDON)
    assert choice.region == "us-west" and not choice.fail_open
    assert choice.addresses == ("192.0.2.1", "2001:db8::1")
    # Measurements trump geography: make the eu-west -> ap-southeast link the fast one.
    fast = {**LAB_RTT, ("eu-west", "ap-southeast"): 60.0}
    router = router_for(topology, config, {**ALL_UP, "eu-west": False}, fast)
    assert router.choose_for_address(LONDON).region == "ap-southeast"


def test_choice_fail_open_when_everything_is_down(topology, config):
    router = router_for(topology, config, dict.fromkeys(ALL_UP, False), LAB_RTT)
    choice = router.choose_for_address(JAKARTA)
    assert choice.fail_open and choice.region == "ap-southeast" and choice.addresses
    # Primary down, client unknown: not the primary.
    router = router_for(topology, config, {**ALL_UP, "us-west": False}, LAB_RTT)
    assert router.choose_for_address("127.0.0.1").region == "eu-west"


# ---- checker ------------------------------------------------------------------------------


class HealthServers:
    """Small aiohttp servers answering /_latitude/health, one per region, in a thread."""

    def __init__(self, names: list[str]):
        self.names = names
        self.status = dict.fromkeys(names, 200)
        self.hits = dict.fromkeys(names, 0)
        self.ports: dict[str, int] = {}
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.runners: list[web.AppRunner] = []

    def __enter__(self):
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)
        return self

    async def _start(self):
        for name in self.names:

            async def health(request, name=name):
                self.hits[name] += 1
                return web.Response(status=self.status[name], text="ok")

            app = web.Application()
            app.router.add_get("/_latitude/health", health)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            self.ports[name] = site._server.sockets[0].getsockname()[1]
            self.runners.append(runner)

    def __exit__(self, *exc):
        async def stop():
            for r in self.runners:
                await r.cleanup()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()

    def topology_text(self) -> str:
        text = TOPOLOGY
        for name, port in self.ports.items():
            text = text.replace(
                f'public_url = "https://{name}.example.test"',
                f'public_url = "https://{name}.example.test"\ninternal_url = "http://127.0.0.1:{port}"',
            )
        return text


def test_checker_threshold_and_recovery_over_http():
    with HealthServers(["us-west", "eu-west", "ap-southeast"]) as servers:
        topology = parse_topology(servers.topology_text(), environ={})
        config = routing_config(topology).with_overrides(
            check_interval_s=0.1, check_threshold=3, check_timeout_s=0.08
        )
        service = RoutingService(topology, config, vantages=None, dns_port=None)
        with BackgroundRouting(service) as bg:
            checker = service.checker
            assert wait_until(lambda: all(p.healthy for p in checker.pairs.values()), 3)
            assert checker.view.rtt_ms[("local", "eu-west")] < 50
            servers.status["eu-west"] = 503
            t0 = time.monotonic()
            assert wait_until(lambda: not checker.view.regions["eu-west"].healthy, 3)
            took = time.monotonic() - t0
            # Three failures: the first at the next probe, two more at the suspect cadence.
            assert took >= 2 * config.suspect_interval_s
            pair = checker.pairs[("local", "eu-west", "app")]
            assert pair.last_error == "HTTP 503"
            assert bg.call(lambda: service.router.choose_for_address(LONDON).region) == "us-west"
            servers.status["eu-west"] = 200
            assert wait_until(lambda: checker.view.regions["eu-west"].healthy, 3)
        assert servers.hits["eu-west"] > 6


def test_peers_over_http():
    """`latitude health --http-port` in one place, a DNS front reading it as a vantage point."""
    with HealthServers(["us-west", "eu-west", "ap-southeast"]) as servers:
        topology = parse_topology(servers.topology_text(), environ={})
        config = routing_config(topology).with_overrides(
            check_interval_s=0.1, check_threshold=1, check_timeout_s=0.08
        )
        far = vantage_from_topology("ap-southeast", topology, config)
        health = RoutingService(topology, config, vantages=[far], dns_port=None, http_port=0)
        with BackgroundRouting(health):
            peer = Peer("ap-southeast", f"http://127.0.0.1:{health.http_port}")
            near = vantage_from_topology("us-west", topology, config)
            front = RoutingService(topology, config, vantages=[near], peers=[peer], dns_port=0)
            with BackgroundRouting(front):
                view = lambda: front.checker.view  # noqa: E731
                assert wait_until(lambda: ("ap-southeast", "eu-west") in view().rtt_ms, 5)
                assert view().vantage_locations["ap-southeast"] == (1.35, 103.82)
                servers.status["eu-west"] = 500
                assert wait_until(lambda: view().regions["eu-west"].down_votes == 2, 5)
                assert not view().regions["eu-west"].healthy
                q = dns.message.make_query(
                    APP, "A", use_edns=0, options=[dns.edns.ECSOption(LONDON, 32)]
                )
                reply = dns.query.udp(q, "127.0.0.1", port=front.dns_port, timeout=5)
                assert addresses(reply) != ["192.0.2.2"]
            servers.status["eu-west"] = 200


def test_checker_threshold_state_machine(topology, config):
    three = config.with_overrides(check_threshold=3)  # 3 of 3: three failures in a row
    checker = HealthChecker(topology, three, [])
    for ok in (True, False, False):
        checker.observe("v1", "eu-west", "app", ok)
    assert checker.pairs[("v1", "eu-west", "app")].healthy  # 2 failures < threshold 3
    checker.observe("v1", "eu-west", "app", True)  # a success breaks the run
    for _ in range(2):
        checker.observe("v1", "eu-west", "app", False)
    assert checker.view.regions["eu-west"].healthy
    checker.observe("v1", "eu-west", "app", False)
    assert not checker.view.regions["eu-west"].healthy


def test_default_hysteresis_no_flapping(topology, config):
    """Defaults: 2 failures among the last 3 results take a pair down, 3 successes in a row
    bring it back. One lost probe never takes it out; answering 1 probe in 3 keeps it out."""
    checker = HealthChecker(topology, config, [])
    pair = lambda: checker.pairs[("v1", "eu-west", "app")]  # noqa: E731
    for ok in [True] + [True, False, True, True] * 5:  # one probe in four lost, every time
        checker.observe("v1", "eu-west", "app", ok)
        assert pair().healthy
    assert pair().in_doubt(config.window)  # a failure among the last 3: probed faster
    checker.observe("v1", "eu-west", "app", True)
    assert pair().in_doubt(config.window) is False  # the last failure is 4 results back
    checker.observe("v1", "eu-west", "app", False)
    assert pair().healthy and pair().in_doubt(config.window)
    checker.observe("v1", "eu-west", "app", True)
    checker.observe("v1", "eu-west", "app", False)  # 2 of the last 3: out
    assert pair().healthy is False
    for ok in [True, False, False] * 10:  # answers 1 probe in 3: stays out
        checker.observe("v1", "eu-west", "app", ok)
        assert pair().healthy is False
    for ok in [True, True, False] * 5:  # 2 in 3: never 3 in a row either
        checker.observe("v1", "eu-west", "app", ok)
        assert pair().healthy is False
    for _ in range(2):
        checker.observe("v1", "eu-west", "app", True)
    assert pair().healthy is False
    checker.observe("v1", "eu-west", "app", True)  # the third success in a row
    assert pair().healthy is True and not pair().in_doubt(config.window)
    checker.observe("v1", "eu-west", "app", False)  # the old failures no longer count
    assert pair().healthy is True


def test_suspect_region_gets_a_short_ttl(topology, config):
    checker = HealthChecker(topology, config, [])
    names = ["us-west", "eu-west", "ap-southeast"]
    for v in names:
        for r in names:
            checker.observe(v, r, "app", True, LAB_RTT[(v, r)])
    router = RegionRouter(
        topology, config, Locator(CidrTable(config.cidrs, topology)), lambda: checker.view
    )
    front = DnsFront(config, router)
    assert ask(front, APP, client=LONDON).answer[0].ttl == 30
    checker.observe("us-west", "eu-west", "app", False)  # one vantage point saw one failure
    assert checker.view.suspect == ("eu-west",) and checker.view.healthy == tuple(names)
    r = ask(front, APP, client=LONDON)  # the cached answer is not reused: the view changed
    assert addresses(r) == ["192.0.2.2"] and r.answer[0].ttl == config.suspect_ttl_s
    assert ask(front, APP, client=SEATTLE).answer[0].ttl == 30  # other regions: full TTL
    assert checker.observations()["vantages"]["us-west"]["results"][1]["in_doubt"] is True
    for _ in range(config.window):
        checker.observe("us-west", "eu-west", "app", True)
    assert checker.view.suspect == ()  # the failure is out of the window
    assert ask(front, APP, client=LONDON).answer[0].ttl == 30


def test_quorum_across_vantage_points(topology, config):
    changes = []
    checker = HealthChecker(
        topology,
        config.with_overrides(check_threshold=1),
        [],
        on_change=lambda r, h, t: changes.append((r, h)),
    )
    names = ["us-west", "eu-west", "ap-southeast"]
    for v in names:
        for r in names:
            checker.observe(v, r, "app", True, 10.0)
    # A cut link between us-west and eu-west: each sees the other down, ap-southeast sees both up.
    checker.observe("us-west", "eu-west", "app", False)
    checker.observe("eu-west", "us-west", "app", False)
    assert checker.view.healthy == tuple(names)
    # eu-west cut off from everyone: a majority sees it down, though it sees itself up.
    checker.observe("ap-southeast", "eu-west", "app", False)
    assert checker.view.healthy == ("us-west", "ap-southeast")
    assert (
        checker.view.regions["eu-west"].down_votes == 2
        and checker.view.regions["eu-west"].up_votes == 1
    )
    assert changes == [("eu-west", False)]
    # RTTs of unhealthy pairs are not used for routing.
    assert ("us-west", "eu-west") not in checker.view.rtt_ms
    # Everything down: fail-open.
    for v in names:
        for r in names:
            checker.observe(v, r, "app", False)
    assert checker.view.healthy == () and checker.view.fail_open
    assert checker.view.routable == tuple(names)


def test_peer_observations_count_as_vantage_points(topology, config):
    here = HealthChecker(topology, config.with_overrides(check_threshold=1), [])
    there = HealthChecker(
        topology,
        config.with_overrides(check_threshold=1),
        [Vantage("ap-southeast", (), (1.35, 103.82))],
    )
    here.observe("us-west", "eu-west", "app", False)
    there.observe("ap-southeast", "eu-west", "app", False)
    there.observe("ap-southeast", "us-west", "app", True, 165.0)
    payload = json.loads(json.dumps(there.observations()))
    assert here.view.regions["eu-west"].healthy is False  # one vantage, one verdict
    here.observe("eu-west", "eu-west", "app", True)
    assert here.view.regions["eu-west"].healthy is True  # 1 of 2: no majority for down
    here.absorb(payload)
    assert here.view.regions["eu-west"].healthy is False  # 2 of 3 see it down
    assert here.view.rtt_ms[("ap-southeast", "us-west")] == 165.0
    assert here.view.vantage_locations["ap-southeast"] == (1.35, 103.82)
    # A peer that stops reporting abstains.
    here.absorb(payload, received_at=time.time() - 60)
    assert here.view.regions["eu-west"].healthy is True


def test_vantage_from_topology_targets(topology, config):
    v = vantage_from_topology(
        "eu-west", topology, config.with_overrides(check_services=("app", "mirror"))
    )
    assert v.location == (53.35, -6.26)
    assert {t.url for t in v.targets} == {
        "https://us-west.example.test/_latitude/health",
        "https://eu-west.example.test/_latitude/health",
        "https://ap-southeast.example.test/_latitude/health",
    }  # no mirror_url in this topology: no mirror targets


# ---- history ------------------------------------------------------------------------------

DAY = 86400.0
T0 = 1_795_000_000.0 - (1_795_000_000.0 % DAY)  # a UTC midnight


def test_uptime_spans_days_and_months(tmp_path):
    h = UptimeHistory(tmp_path / "h.sqlite3", max_gap_s=10)
    t = T0 - 3600  # one hour before midnight
    for i in range(0, 7200, 5):  # two hours of ticks, 5 s apart
        at = t + i
        down = T0 - 600 <= at < T0 + 300  # down from 23:50 to 00:05
        h.record({"eu-west": not down, "us-west": True}, at)
    days = {(r.region, r.period): r for r in h.uptime("day")}
    before, after = sorted({p for _, p in days})
    eu_before, eu_after = days[("eu-west", before)], days[("eu-west", after)]
    assert eu_before.down_s == pytest.approx(600) and eu_before.observed_s == pytest.approx(3600)
    assert eu_after.down_s == pytest.approx(300, abs=5)
    assert eu_before.outages == 1 and eu_after.outages == 0
    assert days[("us-west", before)].uptime_pct == 100.0
    outages = h.outages("eu-west")
    assert len(outages) == 1 and outages[0].duration_s == pytest.approx(900, abs=5)
    assert not outages[0].ongoing
    months = h.uptime("month")
    assert sum(r.down_s for r in months if r.region == "eu-west") == pytest.approx(900, abs=5)
    report = json.loads(h.to_json("day"))
    assert {"uptime", "outages"} <= set(report) and report["outages"][0]["region"] == "eu-west"
    h.close()


def test_uptime_gaps_are_unobserved_and_restarts_continue(tmp_path):
    path = tmp_path / "h.sqlite3"
    h = UptimeHistory(path, max_gap_s=10)
    h.record({"ap-southeast": True}, T0)
    h.record({"ap-southeast": False}, T0 + 5)
    h.record({"ap-southeast": False}, T0 + 10)
    h.close()
    h = UptimeHistory(path, max_gap_s=10)  # the checker restarted 1 h later
    h.record({"ap-southeast": False}, T0 + 3600)
    h.record({"ap-southeast": True}, T0 + 3605)
    h.record({"ap-southeast": True}, T0 + 3610)
    (row,) = h.uptime("day")
    assert row.observed_s == pytest.approx(20) and row.down_s == pytest.approx(10)
    assert [o.duration_s for o in h.outages()] == [pytest.approx(5), pytest.approx(5)]
    h.close()


# ---- DNS front ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def front(topology, config):
    return DnsFront(config, router_for(topology, config, rtt=LAB_RTT), ("127.0.0.1",))


def ask(front, name, rdtype="A", ecs=None, client="127.0.0.1", **kw):
    options = [dns.edns.ECSOption(*ecs)] if ecs else None
    q = dns.message.make_query(
        name, rdtype, use_edns=0 if ecs else kw.pop("use_edns", None), options=options, **kw
    )
    wire = front.handle(q.to_wire(), client)
    reply = dns.message.from_wire(wire)
    assert reply.id == q.id and reply.flags & dns.flags.QR
    return reply


def addresses(reply) -> list[str]:
    return sorted(rd.address for rrset in reply.answer for rd in rrset if hasattr(rd, "address"))


def ecs_of(reply):
    return next(o for o in reply.options if isinstance(o, dns.edns.ECSOption))


def test_dns_records(front):
    r = ask(front, APP, client=LONDON)
    assert r.rcode() == dns.rcode.NOERROR and r.flags & dns.flags.AA
    assert addresses(r) == ["192.0.2.2"] and r.answer[0].ttl == 30
    assert addresses(ask(front, APP, "AAAA", client=LONDON)) == ["2001:db8::2"]
    assert addresses(ask(front, APP, "AAAA", client=JAKARTA)) == []  # ap-southeast has no IPv6
    soa = ask(front, ZONE, "SOA")
    assert (
        soa.answer[0][0].mname.to_text() == "ns1.example.test." and soa.answer[0][0].minimum == 30
    )
    ns = ask(front, ZONE, "NS")
    assert ns.answer[0][0].target.to_text() == "ns1.example.test." and addresses(
        ask(front, "ns1." + ZONE)
    ) == ["127.0.0.1"]
    assert addresses(ask(front, "ap-southeast." + APP)) == ["192.0.2.3"]
    assert addresses(ask(front, APP.upper(), client=SEATTLE)) == ["192.0.2.1"]  # case-insensitive


def test_dns_negative_answers(front):
    nx = ask(front, "nope." + ZONE)
    assert nx.rcode() == dns.rcode.NXDOMAIN and nx.authority[0].rdtype == dns.rdatatype.SOA
    nodata = ask(front, APP, "MX")
    assert nodata.rcode() == dns.rcode.NOERROR and not nodata.answer and nodata.authority
    refused = ask(front, "example.com.")
    assert refused.rcode() == dns.rcode.REFUSED and not refused.flags & dns.flags.AA
    badvers = ask(front, APP, use_edns=1)
    assert badvers.rcode() == dns.rcode.BADVERS
    for opcode in (2, 5):  # STATUS, UPDATE
        wire = bytearray(dns.message.make_query(APP, "A").to_wire())
        wire[2] = opcode << 3
        notimp = dns.message.from_wire(front.handle(bytes(wire), "127.0.0.1"))
        assert notimp.rcode() == dns.rcode.NOTIMP


def test_dns_ecs_chooses_and_echoes_scope(front):
    # The resolver is in Seattle, the client subnet in London: the subnet wins.
    r = ask(front, APP, ecs=("203.0.113.0", 24), client=SEATTLE)
    assert addresses(r) == ["192.0.2.2"]
    e = ecs_of(r)
    assert (e.address, e.srclen, e.scopelen) == ("203.0.113.0", 24, 24)
    r = ask(front, APP, ecs=("10.9.0.0", 16))
    assert addresses(r) == ["192.0.2.1"] and ecs_of(r).scopelen == 13
    r = ask(front, APP, ecs=("10.1.0.0", 16))
    assert ecs_of(r).srclen == 16 and ecs_of(r).scopelen == 23  # needs more bits than sent
    r = ask(front, APP, "AAAA", ecs=("2001:db8:aa::", 48), client=SEATTLE)
    assert addresses(r) == ["2001:db8::2"] and ecs_of(r).scopelen == 48
    # Source prefix 0: the client asked not to be located; the resolver decides, scope 0.
    r = ask(front, APP, ecs=("0.0.0.0", 0), client=JAKARTA)
    assert addresses(r) == ["192.0.2.3"] and ecs_of(r).scopelen == 0
    # Answers that do not depend on the client carry scope 0.
    assert ecs_of(ask(front, ZONE, "SOA", ecs=("203.0.113.0", 24))).scopelen == 0


def ecs_query(payload: bytes) -> bytes:
    q = dns.message.make_query(APP, "A", use_edns=0, options=[dns.edns.GenericOption(8, payload)])
    return q.to_wire()


@pytest.mark.parametrize(
    "payload",
    [
        b"\x00\x01\x18",  # too short
        b"\x00\x03\x18\x00\xcb\x00\x71",  # family 3
        b"\x00\x01\x21\x00" + bytes(5),  # /33 for IPv4
        b"\x00\x01\x18\x00\xcb\x00",  # /24 with 2 address bytes
        b"\x00\x01\x18\x00\xcb\x00\x71\x09",  # /24 with 4 address bytes
        b"\x00\x01\x17\x00\xcb\x00\x71",  # /23 with the 24th bit set
    ],
)
def test_dns_malformed_ecs_is_formerr(front, payload):
    reply = dns.message.from_wire(front.handle(ecs_query(payload), "127.0.0.1"))
    assert reply.rcode() == dns.rcode.FORMERR


def test_dns_truncates_over_udp_limit(topology, config):
    many = {**config.addresses, "eu-west": tuple(f"192.0.2.{i}" for i in range(10, 60))}
    big = DnsFront(
        config.with_overrides(addresses=many),
        router_for(topology, config.with_overrides(addresses=many)),
    )
    q = dns.message.make_query(APP, "A").to_wire()
    udp = dns.message.from_wire(big.handle(q, LONDON))
    assert udp.flags & dns.flags.TC and not udp.answer
    tcp = dns.message.from_wire(big.handle(q, LONDON, tcp=True))
    assert len(tcp.answer[0]) == 50


# ---- fuzz ---------------------------------------------------------------------------------

GOOD = [
    dns.message.make_query(APP, "A").to_wire(),
    dns.message.make_query(
        APP, "AAAA", use_edns=0, options=[dns.edns.ECSOption("203.0.113.0", 24)]
    ).to_wire(),
    dns.message.make_query(ZONE, "SOA", use_edns=0, payload=4096).to_wire(),
    dns.message.make_query("x." + ZONE, "TXT").to_wire(),
]


def mutate(blob: bytes) -> bytes:
    """A malformed packet: random bytes, a good query with bytes flipped, overwritten, inserted
    or deleted, a truncated good query, or a plausible query header over random bytes.
    (One draw per case: hypothesis's own cost per draw dominates a 10,000-case run.)"""
    import random

    kind = blob[0] % 4 if blob else 0
    seed = int.from_bytes(blob[1:5], "big")
    rng = random.Random(seed)
    if kind == 0:
        return blob
    base = bytearray(GOOD[seed % len(GOOD)])
    if kind == 1:
        for _ in range(rng.randint(1, 8)):
            op, i = rng.randrange(4), rng.randrange(max(1, len(base)))
            if op == 0 and base:
                base[i] ^= 1 << rng.randrange(8)
            elif op == 1 and base:
                base[i] = rng.randrange(256)
            elif op == 2:
                base[i:i] = blob[:8] or b"\0"
            elif base:
                del base[i : i + rng.randint(1, 8)]
        return bytes(base)
    if kind == 2:
        return bytes(base[: rng.randint(0, len(base))])
    flags = rng.randrange(0x8000)  # QR clear: a query, any opcode and flags
    counts = [rng.choice((0, 1, 2, rng.randrange(0x10000))) for _ in range(4)]
    return struct.pack("!HHHHHH", rng.randrange(0x10000), flags, *counts) + blob[:300]


malformed = st.binary(max_size=700).map(mutate)


def good_answer_ok(front, expected: list[bytes] = []) -> None:  # noqa: B006 - a memo
    answer = front.handle(GOOD[0], LONDON)
    if not expected:
        reply = dns.message.from_wire(answer)
        assert reply.rcode() == dns.rcode.NOERROR and addresses(reply) == ["192.0.2.2"]
        expected.append(answer)
    assert answer == expected[0]


@settings(
    max_examples=10_000,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)
@given(packet=malformed)
def test_fuzz_handler_never_crashes(front, packet):
    answer = front.handle(packet, "127.0.0.1", tcp=len(packet) % 2 == 0)
    if answer is not None:
        assert len(packet) >= 12 and not packet[2] & 0x80  # only queries are answered
        reply = dns.message.from_wire(answer)  # always a well-formed message
        assert reply.id == struct.unpack("!H", packet[:2])[0]
        assert reply.flags & dns.flags.QR
    good_answer_ok(front)


def test_fuzz_handler_found_no_errors(front):
    print(front.stats)
    assert front.stats["errors"] == 0
    # The cases reached the parser's every outcome, not just the length check.
    assert front.stats["formerr"] > 1000 and front.stats["dropped"] > 500


@pytest.fixture(scope="module")
def served(topology, config):
    """A DNS front and HTTP endpoint on real sockets (no probing: health as configured)."""
    service = RoutingService(topology, config, vantages=[], dns_port=0, http_port=0, check=False)
    with BackgroundRouting(service):
        yield service


def test_fuzz_over_real_sockets(served):
    import random

    rng = random.Random(7)
    port = served.dns_port
    packets = []
    for _ in range(3000):
        base = bytearray(rng.choice(GOOD))
        for _ in range(rng.randint(1, 6)):
            i = rng.randrange(len(base))
            base[i] = rng.randrange(256)
        packets.append(bytes(base[: rng.randint(0, len(base))] if rng.random() < 0.3 else base))
    packets += [rng.randbytes(rng.randint(0, 600)) for _ in range(1000)]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for i, p in enumerate(packets):
            s.sendto(p, ("127.0.0.1", port))
            if i % 200 == 0:
                time.sleep(0.002)  # let the server keep up rather than overflow its buffer
    # TCP: garbage frames, a frame longer than what follows, a frame then a hang-up.
    for p in packets[:200]:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as c:
            c.sendall(struct.pack("!H", len(p)) + p if rng.random() < 0.8 else p)
    with socket.create_connection(("127.0.0.1", port), timeout=2) as c:
        c.sendall(b"\xff\xff" + b"x" * 100)
    q = dns.message.make_query(
        APP, "A", use_edns=0, options=[dns.edns.ECSOption("203.0.113.0", 24)]
    )
    for query in (dns.query.udp, dns.query.tcp):
        reply = query(q, "127.0.0.1", port=port, timeout=5)
        assert addresses(reply) == ["192.0.2.2"] and ecs_of(reply).scopelen == 24
    assert served.front.stats["errors"] == 0


def test_dns_tcp_pipelined_queries(served):
    qs = [dns.message.make_query(APP, "A") for _ in range(3)]
    with socket.create_connection(("127.0.0.1", served.dns_port), timeout=5) as c:
        c.sendall(b"".join(struct.pack("!H", len(w)) + w for w in (q.to_wire() for q in qs)))
        for q in qs:
            size = struct.unpack("!H", c.recv(2, socket.MSG_WAITALL))[0]
            reply = dns.message.from_wire(c.recv(size, socket.MSG_WAITALL))
            assert reply.id == q.id and reply.answer


# ---- HTTP ---------------------------------------------------------------------------------


def get_json(url: str):
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, json.loads(resp.read()), resp.headers
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read()), exc.headers


def test_http_route(served):
    base = f"http://127.0.0.1:{served.http_port}"
    status, body, headers = get_json(f"{base}/_latitude/route?ip={LONDON}")
    assert (
        status == 200
        and body["region"] == "eu-west"
        and body["url"] == "https://eu-west.example.test"
    )
    assert body["addresses"] == ["192.0.2.2", "2001:db8::2"] and body["ttl_s"] == 30
    assert "max-age=30" in headers["Cache-Control"]
    status, body, _ = get_json(f"{base}/_latitude/route?lat=1.3&lon=103.8")
    assert body["region"] == "ap-southeast" and body["client"]["from"] == "query location"
    status, body, _ = get_json(f"{base}/_latitude/route")  # from 127.0.0.1: no location
    assert body["region"] == "us-west" and body["basis"] == "default"
    status, body, _ = get_json(f"{base}/_latitude/route?ip=not-an-ip")
    assert status == 400 and "ip=" in body["error"]
    status, body, _ = get_json(f"{base}/_latitude/routing/status")
    assert status == 200 and body["healthy"] == ["us-west", "eu-west", "ap-southeast"]

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args, **kwargs):
            return None

    opener = urllib.request.build_opener(NoRedirect)
    with pytest.raises(urllib.error.HTTPError) as info:
        opener.open(f"{base}/_latitude/route?ip={SEATTLE}&redirect=1&path=/calendar/7", timeout=5)
    assert info.value.code == 307
    assert info.value.headers["Location"] == "https://us-west.example.test/calendar/7"


# ---- exports ------------------------------------------------------------------------------


def test_route53_terraform_parses_with_every_region(topology, config):
    text = route53_terraform(topology, config)
    doc = hcl2.loads(text)

    def blocks(kind: str) -> dict[str, dict]:
        found = {}
        for block in doc.get("resource", []):
            for name, body in block.get(f'"{kind}"', block.get(kind, {})).items():
                found[name.strip('"')] = body
        return found

    checks, records = blocks("aws_route53_health_check"), blocks("aws_route53_record")
    for region in ("us-west", "eu-west", "ap-southeast"):
        ident = region.replace("-", "_")
        check = checks[ident]
        assert check["fqdn"].strip('"') == f"{region}.example.test"
        assert check["resource_path"].strip('"') == "/_latitude/health"
        assert check["type"].strip('"') == "HTTPS" and check["port"] == 443
        assert check["request_interval"] == 10
        assert check["failure_threshold"] == config.check_threshold
        record = records[f"{ident}_a"]
        assert record["set_identifier"].strip('"') == region
        assert record["name"].strip('"') == "calendar.example.test" and record["ttl"] == 30
        assert [r.strip('"') for r in record["records"]] == [ADDR[region]]
        assert ident in record["health_check_id"]
        policy = record["latency_routing_policy"]
        policy = policy[0] if isinstance(policy, list) else policy
        assert policy["region"].strip('"') == aws_region_for(topology.region(region))
    assert "us_west_aaaa" in records and "ap_southeast_aaaa" not in records
    assert {aws_region_for(topology.region(n)) for n in ADDR} == {
        "us-west-2",
        "eu-west-1",
        "ap-southeast-1",
    }
    slow = route53_terraform(
        topology, config.with_overrides(check_interval_s=20.0, check_threshold=12)
    )
    assert (
        f"request_interval  = {ROUTE53_DEFAULT_INTERVAL_S}" in slow
        and "failure_threshold = 10" in slow
    )


def test_powerdns_lua_records(topology, config):
    text = powerdns_zone(topology, config)
    a = next(line for line in text.splitlines() if " LUA A " in line)
    assert a.startswith(
        "calendar.example.test. 30 IN LUA A \"ifurlup('https://calendar.example.test/_latitude/health'"
    )
    assert "{{'192.0.2.1', '192.0.2.2', '192.0.2.3'}}" in a
    assert "selector='pickclosest'" in a and "backupSelector='pickclosest'" in a
    aaaa = next(line for line in text.splitlines() if " LUA AAAA " in line)
    assert "'2001:db8::1', '2001:db8::2'" in aaaa
    assert "enable-lua-records=yes" in text and "$ORIGIN example.test." in text


# ---- CLI ----------------------------------------------------------------------------------


def test_cli_export_and_uptime(tmp_path):
    from latitude.cli import app

    topo = tmp_path / "latitude.toml"
    topo.write_text(TOPOLOGY)
    runner = CliRunner()
    result = runner.invoke(
        app, ["routing", "export", "route53", "-t", str(topo), "-o", str(tmp_path / "r53.tf")]
    )
    assert result.exit_code == 0, result.output
    hcl2.loads((tmp_path / "r53.tf").read_text())
    result = runner.invoke(app, ["routing", "export", "powerdns", "-t", str(topo)])
    assert result.exit_code == 0 and "ifurlup" in result.output
    result = runner.invoke(app, ["routing", "export", "bind", "-t", str(topo)])
    assert result.exit_code == 2
    history = tmp_path / "h.sqlite3"
    h = UptimeHistory(history)
    for i in range(0, 101, 5):  # down from 90 s to 100 s
        h.record({"eu-west": not 90 <= i < 100}, T0 + i)
    h.close()
    result = runner.invoke(app, ["routing", "uptime", "--history", str(history), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["uptime"][0]["down_s"] == 10 and report["uptime"][0]["uptime_pct"] == 90
    result = runner.invoke(app, ["routing", "uptime", "--history", str(history), "--by", "month"])
    assert result.exit_code == 0 and "90.000%" in result.output
    result = runner.invoke(app, ["routing", "choose", LONDON, "-t", str(topo)])
    assert json.loads(result.output)["region"] == "eu-west"
