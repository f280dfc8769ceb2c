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
        ([(b"x-del", b"a\x7fb")], 400, "x-del"),  # DEL and the C0 bytes: past the fast path
        ([(b"x-us", b"\x1f")], 400, "x-us"),
        ([(b"x-lf", b"a\nb")], 400, "x-lf"),
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


def _config(extra: str):
    from latitude.gateway.config import GatewayConfig
    from latitude.topology import default_lab_topology_path, parse_topology

    text = default_lab_topology_path().read_text() + extra
    topology = parse_topology(text, environ={"LATITUDE_LAB_KEY": "k" * 32})
    return GatewayConfig.from_topology(topology, "eu-west", environ={"LATITUDE_LAB_KEY": "k" * 32})


def test_edge_bounds_come_from_the_topology():
    config = _config(
        "\n[gateway]\nmax_header_bytes = 8192\nheader_timeout_s = 2.5\nbody_timeout_s = 4\n"
    )
    assert (config.max_header_bytes, config.header_timeout_s, config.body_timeout_s) == (
        8192,
        2.5,
        4.0,
    )
    defaults = _config("")
    assert (defaults.max_answer_bytes, defaults.max_headers_bytes) == (64 << 20, 64 << 10)


@pytest.mark.parametrize("setting", ["header_timeout_s = 0", "max_pending_headers = -1"])
def test_a_bound_that_is_not_positive_is_named(setting):
    from latitude.gateway.config import GatewayConfigError

    with pytest.raises(GatewayConfigError, match=setting.split()[0]):
        _config(f"\n[gateway]\n{setting}\n")


@pytest.mark.parametrize("target", [b"/", b"/a/../b", b"//x", b"/%23"])
def test_paths_pass(target):
    from latitude.gateway.intake import check_target

    assert check_target(target) is None


@pytest.mark.parametrize("target", [b"*", b"http://x/abs", b"/a#b", b"a"])
def test_a_target_that_is_not_a_path_is_refused(target):
    from latitude.gateway.intake import check_target

    got = check_target(target)
    assert got is not None and got.status == 400 and "not a path" in got.detail
