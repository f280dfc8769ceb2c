"""What the edge refuses (`latitude.gateway.intake`), decided on the header bytes alone."""

from __future__ import annotations

import pytest

from latitude.gateway.intake import check_request, valid_host

LIMITS = {"max_header_bytes": 1024, "max_headers_bytes": 4096}


def refusal(headers):
    return check_request(headers, **LIMITS)


def test_ordinary_headers_pass():
    headers = [
        (b"host", b"eu.example.com:8443"),
        (b"cookie", b"session=abc; theme=dark"),
        (b"user-agent", "Mozilla/5.0 (été)".encode()),  # UTF-8 in an unsigned header
        (b"x-tab", b"a\tb"),
    ]
    assert refusal(headers) is None


@pytest.mark.parametrize(
    ("headers", "status", "named"),
    [
        ([(b"cookie", b"s=caf\xe9")], 400, "cookie"),
        ([(b"authorization", "Bearer é".encode())], 400, "authorization"),
        ([(b"idempotency-key", b"k\x80")], 400, "idempotency-key"),
        ([(b"x-note", b"\xe9t\xe9")], 400, "x-note"),
        ([(b"x-ctl", b"a\x00b")], 400, "x-ctl"),
        ([(b"x-big", b"a" * 1100)], 431, "x-big"),
        ([(b"x-%d" % i, b"a" * 900) for i in range(5)], 431, "max_headers_bytes"),
        ([(b"host", b"a"), (b"host", b"b")], 400, "more than one host"),
    ],
)
def test_refused_with_a_status_that_names_the_problem(headers, status, named):
    got = refusal(headers)
    assert got is not None and got.status == status
    assert named.lower() in (got.title + got.detail).lower()


@pytest.mark.parametrize(
    "host",
    [
        "example.com",
        "example.com:8443",
        "127.0.0.1",
        "127.0.0.1:80",
        "[::1]",
        "[::1]:8000",
        "a_b.internal",
        "localhost",
    ],
)
def test_valid_hosts(host):
    assert valid_host(host)


@pytest.mark.parametrize(
    "host",
    [
        'a";for=6.6.6.6;proto=https;x="',
        "a,b",
        "a b",
        "a;b",
        "example.com:99999",
        "example.com:",
        "-a.com",
        "[::1",
        "user@host",
        "a/b",
        "",
    ],
)
def test_invalid_hosts_are_refused(host):
    assert not valid_host(host)
    if host:
        got = refusal([(b"host", host.encode())])
        assert got is not None and got.status == 400 and "Host" in got.title
