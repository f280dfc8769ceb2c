"""Pure logic of the gateway: the decision order, the client address, Forwarded."""

import ipaddress

import pytest

from latitude.gateway.classify import Decision, classify
from latitude.gateway.messages import (
    build_forwarded,
    client_address,
    parse_forwarded,
    strip_untrusted,
)

LB = (ipaddress.ip_network("10.0.0.0/8"),)


@pytest.mark.parametrize(
    "method, path, primary, forwarded, expected",
    [
        ("POST", "/_latitude/health", False, True, Decision.LATITUDE),  # own endpoints first
        ("POST", "/events", True, True, Decision.VERIFY),
        ("POST", "/events", True, False, Decision.PRIMARY),
        ("POST", "/search", False, False, Decision.LOCAL),  # listed local
        ("GET", "/auth/callback", False, False, Decision.FORWARD),  # listed always_forward
        ("GET", "/events", False, False, Decision.LOCAL),
        ("HEAD", "/events", False, False, Decision.LOCAL),
        ("OPTIONS", "/events", False, False, Decision.LOCAL),
        ("DELETE", "/events/1", False, False, Decision.FORWARD),
        ("PATCH", "/events/1", False, False, Decision.FORWARD),
    ],
)
def test_classify_order(method, path, primary, forwarded, expected):
    got = classify(
        method,
        path,
        is_primary=primary,
        forwarded=forwarded,
        local=("/search",),
        always_forward=("/auth/*",),
    )
    assert got is expected


@pytest.mark.parametrize(
    "peer, xff, expected",
    [
        ("203.0.113.9", "6.6.6.6", "203.0.113.9"),  # untrusted peer: the header means nothing
        ("10.0.0.5", "198.51.100.7", "198.51.100.7"),  # the balancer says who it saw
        ("10.0.0.5", "6.6.6.6, 198.51.100.7", "198.51.100.7"),  # a client-sent entry is skipped
        ("10.0.0.5", "198.51.100.7, 10.0.0.9", "198.51.100.7"),  # two trusted hops
        ("10.0.0.5", "not-an-ip", "10.0.0.5"),  # malformed: fall back to the peer
        ("10.0.0.5", None, "10.0.0.5"),
    ],
)
def test_client_address_trusts_only_configured_proxies(peer, xff, expected):
    assert client_address(peer, xff, LB) == expected
    assert client_address(peer, xff, ()) == peer  # no trusted proxies: always the peer


def test_forwarded_round_trip_and_untrusted_headers_dropped():
    value = build_forwarded("2001:db8::1", "https", "eu.example.com")
    assert parse_forwarded(value) == {
        "for": "2001:db8::1",
        "proto": "https",
        "host": "eu.example.com",
    }
    headers = [
        (b"forwarded", b"for=6.6.6.6"),
        (b"x-forwarded-for", b"6.6.6.6"),
        (b"latitude-session-length", b"9"),
        (b"signature", b"x"),
        (b"accept", b"*/*"),
    ]
    assert strip_untrusted(headers) == [(b"accept", b"*/*")]
    # A server that does not lowercase names must not let one through.
    shouted = [(b"X-Forwarded-For", b"6.6.6.6"), (b"Latitude-Region", b"x"), (b"Signature", b"x")]
    assert strip_untrusted(shouted + [(b"Accept", b"*/*")]) == [(b"Accept", b"*/*")]


@pytest.mark.parametrize("prefix", [0, 1, 65536, 69999, 70000, 2_999_999, 3_000_000])
async def test_spooled_body_hashes_request_and_envelope_in_one_pass(prefix):
    """The primary hashes the request without its session on the way past, across chunk edges."""
    import os

    from latitude.gateway.messages import SpooledBody
    from latitude.signing import content_digest

    data = os.urandom(3_000_000)  # beyond 1 MiB: the spool goes to disk
    chunks = iter([data[i : i + 70000] for i in range(0, len(data), 70000)])

    async def receive():
        chunk = next(chunks, None)
        return {"type": "http.request", "body": chunk or b"", "more_body": chunk is not None}

    body = await SpooledBody.read(receive, prefix_length=prefix)
    assert body._prefix_value == content_digest(data[:prefix])
    assert body.prefix_digest(prefix) == content_digest(data[:prefix])
    assert body.digest.header_value() == content_digest(data)
    assert body.read_tail(10) == data[-10:]
    body.close()
