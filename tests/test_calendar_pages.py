"""Unit tests for the calendar's "served by / took" lines and the gateway-side helpers that
feed them (no processes, no sockets)."""

from __future__ import annotations

import time

import pytest
from starlette.requests import Request

from examples.calendar import pages
from latitude import db
from latitude.gateway import observe
from latitude.topology import default_lab_topology_path, load_topology

TOPOLOGY = load_topology(default_lab_topology_path())


def request(cookie: str = "", note: dict | None = None, method: str = "GET") -> Request:
    headers = [(b"cookie", cookie.encode())] if cookie else []
    scope = {"type": "http", "method": method, "path": "/", "headers": headers}
    if note is not None:
        scope[pages.NOTE] = note
    return Request(scope)


@pytest.mark.parametrize(
    ("cookie", "line"),
    [
        (
            "us-west:161.0:forwarded:22.0",
            "your write went to us-west: 161 ms, one ocean round trip (22 ms of it at the primary)",
        ),
        ("us-west:400:forwarded:20", "your write went to us-west: 400 ms, three ocean round trips (20 ms of it at the primary)"),
        ("us-west:140:forwarded", "your write went to us-west: 140 ms, one ocean round trip"),
        ("eu-west:900:fallback:0", None),  # checked below: names both regions
        ("eu-west:12:read_only:0", "your change was not saved: the primary region does not answer (12 ms)"),
    ],
)  # fmt: skip
def test_last_write_lines(cookie, line):
    got = pages.last_write_line(request(f"{pages.LAST_WRITE_COOKIE}={cookie}"), "eu-west", TOPOLOGY)
    if line is None:
        assert got.startswith("your write ran here in eu-west with its SQL sent to us-west: 900 ms")
    else:
        assert got == line


def test_a_write_at_the_primary_crosses_no_ocean():
    got = pages.last_write_line(
        request(f"{pages.LAST_WRITE_COOKIE}=us-west:9.5:primary:0"), "us-west", TOPOLOGY
    )
    assert got == "your write ran here in us-west: 10 ms, no ocean crossed"


@pytest.mark.parametrize("cookie", ["garbage", "mars:12:forwarded:0", "us-west:abc:forwarded", ""])
def test_a_bad_cookie_shows_nothing(cookie):
    raw = f"{pages.LAST_WRITE_COOKIE}={cookie}" if cookie else ""
    assert pages.last_write_line(request(raw), "eu-west", TOPOLOGY) is None


def test_served_line_for_a_local_read():
    note = {"started": time.perf_counter() - 0.003, "replica_lag_s": 0.04, "read_wait_s": 0.0}
    with db.route_to_replica():
        line = pages.served_line(request(note=note), "eu-west")
    assert line.startswith("read in eu-west from its replica, ")
    assert line.endswith(" ms (replica 40 ms behind)")
    ms = int(line.split(", ")[1].split(" ms")[0])
    assert 3 <= ms < 1000


def test_served_line_names_a_wait_for_the_replica():
    note = {"started": time.perf_counter() - 0.05, "replica_lag_s": 0.0, "read_wait_s": 0.045}
    with db.route_to_replica():
        line = pages.served_line(request(note=note), "eu-west")
    assert "45 ms of it waiting for the replica to replay your last write" in line


def test_served_line_at_the_primary_and_without_a_gateway():
    with db.route_to_primary():
        line = pages.served_line(
            request(note={"started": time.perf_counter(), "primary": "us-west"}), "us-west"
        )
        assert line.startswith("read in us-west from the primary database, ")
        bare = pages.served_line(request(), "us-west")
    assert "no Latitude gateway in front" in bare


def test_server_timing_names_the_hop_and_the_primary_time_is_read_back():
    box = {"region": "eu-west", "primary": "us-west", "decision": "forward", "outcome": "forwarded"}
    entry = observe._server_timing(box, 0.1312)
    assert entry == 'eu-west;dur=131.2;desc="forwarded to us-west"'
    headers = [
        (b"server-timing", b'us-west;dur=22.5;desc="verified in us-west"'),
        (b"server-timing", entry.encode()),
    ]
    assert observe.primary_ms(headers, "us-west") == 22.5
    assert observe.primary_ms([], "us-west") == 0.0
    cookie = observe._last_write_cookie(box, 0.1312, 22.5)
    assert cookie.startswith(f"{observe.LAST_WRITE_COOKIE}=us-west:131.2:forwarded:22.5;")
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie


def test_note_is_a_no_op_without_an_observer():
    scope: dict = {}
    observe.note(scope, outcome="forwarded")
    assert scope == {}
    scope[observe.NOTE] = {}
    observe.note(scope, outcome="forwarded")
    assert scope[observe.NOTE] == {"outcome": "forwarded"}
