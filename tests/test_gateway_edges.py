"""The gateway at its edges, against the real lab: a trivial app (tests/edge_app.py) behind
`latitude serve` and behind the sidecar (`latitude gateway --upstream`) in us-west and
eu-west, driven with exact bytes over raw sockets (httpx and aiohttp normalise URLs)."""

from __future__ import annotations

import hashlib
import http.client
import json
import socket
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

from latitude.gateway.messages import build_forwarded, parse_forwarded
from tests.extra_slots import EU, PRIMARY, free_port, topology_with_primary_at, wait_up

REPO = Path(__file__).resolve().parents[1]
MAX_ANSWER = 6 * 1024 * 1024
MAX_BODY = 2 * 1024 * 1024
EDGE_SETTINGS = f"""
[gateway]
max_answer_bytes = {MAX_ANSWER}
max_body_bytes = {MAX_BODY}
header_timeout_s = 2.0
max_pending_headers = 50
body_timeout_s = 3.0
"""


@dataclass
class Edges:
    serve: dict[str, int]  # region -> port of `latitude serve` (edge_app)
    sidecar: dict[str, int]  # region -> port of `latitude gateway --upstream` (edge_app)
    primary_db: str


@pytest.fixture(scope="module")
def edges(world, tmp_path_factory) -> Edges:
    folder = tmp_path_factory.mktemp("edges")
    serve = {r: free_port() for r in (PRIMARY, EU)}
    upstream = {r: free_port() for r in (PRIMARY, EU)}
    sidecar = {r: free_port() for r in (PRIMARY, EU)}
    serve_seen = {PRIMARY: serve[PRIMARY], EU: world.add_relay(EU, PRIMARY, serve[PRIMARY])}
    side_seen = {PRIMARY: sidecar[PRIMARY], EU: world.add_relay(EU, PRIMARY, sidecar[PRIMARY])}
    cli = [sys.executable, "-m", "latitude.cli"]
    try:
        for region in (PRIMARY, EU):
            for name, seen in (("serve", serve_seen), ("side", side_seen)):
                (folder / f"{name}-{region}.toml").write_text(
                    topology_with_primary_at(
                        world, region, f"http://127.0.0.1:{seen[region]}", EDGE_SETTINGS
                    )
                )
            topology = str(folder / f"serve-{region}.toml")
            side_topology = str(folder / f"side-{region}.toml")
            world.set_service(
                region,
                "edge",
                [*cli, "serve", "tests.edge_app:app", "--region", region, "--topology", topology]
                + ["--port", str(serve[region]), "--app-dir", str(REPO)],
            )
            world.set_service(
                region,
                "edge-upstream",
                [sys.executable, "-m", "uvicorn", "tests.edge_app:app", "--app-dir", str(REPO)]
                + ["--port", str(upstream[region]), "--log-level", "warning"],
                env={"LATITUDE_TOPOLOGY": side_topology, "LATITUDE_REGION": region},
            )
            world.set_service(
                region,
                "edge-sidecar",
                [*cli, "gateway", "--region", region, "--topology", side_topology]
                + ["--upstream", f"http://127.0.0.1:{upstream[region]}"]
                + ["--port", str(sidecar[region])],
            )
        for region in (PRIMARY, EU):
            for port in (serve[region], sidecar[region]):
                wait_up(f"http://127.0.0.1:{port}/_latitude/health", timeout=60)
        primary_db = next(
            r["database_url"] for r in world.status()["regions"] if r["name"] == PRIMARY
        )
        yield Edges(serve, sidecar, primary_db)
    finally:
        for region in (PRIMARY, EU):
            for service in ("edge", "edge-sidecar", "edge-upstream"):
                try:
                    world.kill(region, service)
                except Exception:
                    pass


# ---- a client that sends exactly the bytes it is given ---------------------------------------


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> dict:
        return json.loads(self.body)


def raw_request(
    port: int,
    method: str,
    target: str,
    headers: list[tuple[str, bytes | str]] = (),
    body: bytes = b"",
    *,
    host: bytes = b"127.0.0.1",
    timeout: float = 30,
) -> Answer:
    lines = [f"{method} {target} HTTP/1.1".encode("latin-1"), b"host: " + host]
    for k, v in headers:
        lines.append(k.encode() + b": " + (v if isinstance(v, bytes) else v.encode("latin-1")))
    if body or method in ("POST", "PUT", "PATCH"):
        lines.append(b"content-length: " + str(len(body)).encode())
    wire = b"\r\n".join(lines) + b"\r\n\r\n" + body
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(wire)
        return read_answer(sock, method)


def read_answer(sock: socket.socket, method: str) -> Answer:
    resp = http.client.HTTPResponse(sock, method=method)
    resp.begin()
    data = resp.read()
    return Answer(resp.status, {k.lower(): v for k, v in resp.getheaders()}, data)


def records(edges: Edges, key: str) -> list[tuple]:
    with psycopg.connect(edges.primary_db) as db:
        try:
            return db.execute("select size, sha from edge_writes where key = %s", (key,)).fetchall()
        except psycopg.errors.UndefinedTable:
            return []


# ---- 1. the path and query arrive byte for byte ---------------------------------------------

ODD_TARGETS = [
    "/a%7Eb",
    "/a%2fb",
    "/a%2Fb/c",
    "/a/../b",
    "/a/./b",
    "/./a/..",
    "//a//b",
    "/a?q=%41",
    "/a?q=%7e",
    "/a?q=a|b",
    "/events?src=%7Eteam",
    "/a?",
    "/a?&&=&",
    "/a?q=%20+x&q=%2B",
    "/%C3%A9t%C3%A9?q=%E2%82%AC",
    "/a;b=c,d",
    "/a%3Fb?c=d",
    "/a?b=c?d",
    "/a%23b?x=%23",
    "/a?q='x'&r=[1]&s=!*()",
    "/~user/%7e",
    "/a%25b?c=%25",
    "/A%5Bb%5D?%5B%5D=1",
    "/" + "x" * 8000,
    "/long?q=" + "%41" * 2700,
]


def _sent(target: str) -> tuple[str, str]:
    path, _, query = target.partition("?")
    return path, query


@pytest.mark.parametrize("kind", ["serve", "sidecar"])
def test_odd_targets_arrive_byte_for_byte(edges, kind):
    port = getattr(edges, kind)[EU]
    wrong = []
    for target in ODD_TARGETS:
        for method in ("POST", "GET"):  # forwarded to us-west, served in eu-west
            answer = raw_request(port, method, target, body=b"x" if method == "POST" else b"")
            if answer.status not in (200, 201):
                wrong.append((method, target[:60], answer.status, answer.body[:200]))
                continue
            seen = answer.json()
            if (seen["raw_path"], seen["query_string"]) != _sent(target):
                wrong.append(
                    (method, target[:60], seen["raw_path"][:60], seen["query_string"][:60])
                )
            expected_route = "primary" if method == "POST" else "replica"
            if seen["route"] != expected_route:
                wrong.append((method, target[:60], "route", seen["route"]))
    assert wrong == []


@pytest.mark.parametrize("target", ["http://elsewhere/x?q=1", "/a#b", "*"])
def test_a_target_that_is_not_a_path_is_refused(edges, target):
    record = f"target-{uuid.uuid4()}"
    for method in ("POST", "OPTIONS"):
        answer = raw_request(edges.serve[EU], method, target, [("x-record", record)], b"x")
        assert answer.status == 400, answer.body[:200]
        assert b"not a path" in answer.body
    assert records(edges, record) == []


# ---- 12. the client's headers, not the HTTP library's ---------------------------------------


@pytest.mark.parametrize("kind", ["serve", "sidecar"])
def test_forwarded_request_carries_no_library_headers(edges, kind):
    port = getattr(edges, kind)[EU]
    answer = raw_request(port, "POST", "/h", [("x-test", "1")], b"{}")
    assert answer.status == 201
    names = [k for k, _ in answer.json()["headers"]]
    for added in ("accept-encoding", "accept", "user-agent", "content-type"):
        assert added not in names
    assert names.count("x-test") == 1 and names.count("host") == 1
    # Asked for, they arrive as the client wrote them.
    answer = raw_request(
        port, "POST", "/h", [("accept-encoding", "br"), ("user-agent", "curl/8")], b"{}"
    )
    seen = dict(answer.json()["headers"])
    assert seen["accept-encoding"] == "br" and seen["user-agent"] == "curl/8"


# ---- 2. large answers arrive whole; past the limit a clear 502 -------------------------------


def _expected_answer(n: int) -> bytes:
    return (bytes(range(251)) * (n // 251 + 1))[:n]


@pytest.mark.parametrize("size", [70_000, 1_000_000, 5_000_000])
def test_large_answers_arrive_whole(edges, size):
    answer = raw_request(edges.serve[EU], "POST", "/big", [("x-answer-bytes", str(size))], b"x")
    assert answer.status == 201, answer.body[:300]
    assert len(answer.body) == size
    assert answer.body == _expected_answer(size)


def test_answer_past_the_limit_is_a_clear_502_and_the_retry_gets_the_stored_outcome(edges):
    key, record = str(uuid.uuid4()), f"big-{uuid.uuid4()}"
    headers = [
        ("x-answer-bytes", str(MAX_ANSWER + 100_000)),
        ("x-record", record),
        ("idempotency-key", key),
        ("accept", "application/json"),
    ]
    first = raw_request(edges.serve[EU], "POST", "/big", headers, b"payload")
    assert first.status == 502
    assert first.headers["idempotency-key"] == key
    error = first.json()
    assert "max_answer_bytes" in error["detail"] and str(MAX_ANSWER) in error["detail"]
    assert error["max_answer_bytes"] == MAX_ANSWER
    again = raw_request(edges.serve[EU], "POST", "/big", headers, b"payload")
    assert again.status == 502 and again.json()["idempotency_key"] == key
    # The app ran once: the retry was answered from the stored outcome.
    assert records(edges, record) == [(7, hashlib.sha256(b"payload").hexdigest())]


# ---- 3. nothing a client sends changes the address, scheme or host the app is told ---------

FORGED_HOST = b'a";for=6.6.6.6;proto=https;x="'


def test_forged_host_is_refused_before_anything_runs(edges):
    record = f"forged-{uuid.uuid4()}"
    for method in ("POST", "GET"):
        answer = raw_request(
            edges.serve[EU],
            method,
            "/who",
            [("x-record", record), ("accept", "application/json")],
            b"x" if method == "POST" else b"",
            host=FORGED_HOST,
        )
        assert answer.status == 400, answer.body
        assert "Host" in answer.json()["detail"]
    assert records(edges, record) == []


def test_an_apps_unhandled_error_is_a_named_answer_not_the_servers_bare_500(edges):
    """Through `latitude serve` on real sockets: a read served in eu-west, a write run at the
    primary's own region, and a write forwarded there, each failing in the app."""
    cases = [
        (EU, "GET", "eu-west", "logged there"),  # served where it is asked
        (PRIMARY, "POST", "us-west", "may stand"),  # run at the primary's own region
    ]
    for region, method, named, said in cases:
        for accept, kind in (("application/json", "application/json"), ("text/html", "text/html")):
            answer = raw_request(
                edges.serve[region],
                method,
                "/who",
                [("x-fail", "1"), ("accept", accept)],
                b"x" if method == "POST" else b"",
            )
            assert answer.status == 500, (region, method, answer.body)
            assert answer.headers["content-type"].startswith(kind), answer.headers
            assert b"Internal Server Error" not in answer.body  # not uvicorn's plain text
            assert named.encode() in answer.body and said.encode() in answer.body, answer.body
    # Forwarded: the primary runs the app, which fails; its signed 500 is relayed, naming where
    # it is logged (the key was released: this run committed nothing).
    forwarded = raw_request(
        edges.serve[EU], "POST", "/who", [("x-fail", "1"), ("accept", "application/json")], b"x"
    )
    assert forwarded.status == 500, forwarded.body
    assert forwarded.json()["error"] == "Internal error"
    assert "us-west" in forwarded.json()["detail"], forwarded.body


@pytest.mark.parametrize("kind", ["serve", "sidecar"])
def test_the_app_sees_the_real_client_and_scheme(edges, kind):
    port = getattr(edges, kind)[EU]
    answer = raw_request(
        port,
        "POST",
        "/who",
        [
            ("forwarded", "for=6.6.6.6;proto=https;host=evil"),
            ("x-forwarded-for", "6.6.6.6"),
            ("x-forwarded-proto", "https"),
            ("x-real-ip", "6.6.6.6"),
        ],
        b"x",
        host=b"calendar.example:8443",
    )
    assert answer.status == 201
    seen = answer.json()
    headers = dict(seen["headers"])
    assert "6.6.6.6" not in json.dumps(seen)
    forwarded = parse_forwarded(headers["forwarded"])
    assert forwarded == {"for": "127.0.0.1", "proto": "http", "host": "calendar.example:8443"}
    if kind == "serve":
        assert seen["client"] == "127.0.0.1" and seen["scheme"] == "http"
        assert headers["host"] == "calendar.example:8443"


@pytest.mark.parametrize(
    "host",
    [
        'a";for=6.6.6.6;proto=https;x="',
        "a,for=6.6.6.6",
        'x\\"y',
        "h;proto=https",
        "example.com:8443",
    ],
)
def test_forwarded_round_trips_any_host(host):
    value = build_forwarded("192.0.2.1", "http", host)
    assert parse_forwarded(value) == {"for": "192.0.2.1", "proto": "http", "host": host}


# ---- 4. bad header bytes and over-large headers: 400 / 431 at the edge ----------------------


@pytest.mark.parametrize(
    ("headers", "host", "status", "named"),
    [
        ([("cookie", b"session=caf\xe9")], b"127.0.0.1", 400, "cookie"),
        ([("authorization", b"Bearer \xff\xfe")], b"127.0.0.1", 400, "authorization"),
        ([], b"h\xc3\xa9te.example", 400, "host"),
        ([("x-note", b"\xe9t\xe9")], b"127.0.0.1", 400, "x-note"),  # not UTF-8
        ([("x-big", b"a" * (20 * 1024))], b"127.0.0.1", 431, "x-big"),
        ([(f"x-part-{i}", b"a" * (15 * 1024)) for i in range(5)], b"127.0.0.1", 431, "headers"),
        ([("x-huge", b"a" * (100 * 1024))], b"127.0.0.1", 431, "x-huge"),
    ],
)
def test_bad_headers_are_refused_at_the_edge(edges, headers, host, status, named):
    record = f"bad-{uuid.uuid4()}"
    for method in ("POST", "GET"):
        answer = raw_request(
            edges.serve[EU],
            method,
            "/h",
            [*headers, ("x-record", record)],
            b"x" if method == "POST" else b"",
            host=host,
        )
        assert answer.status == status, answer.body[:300]
        assert named.lower() in answer.body.decode().lower()
    assert records(edges, record) == []


def test_a_header_block_past_the_servers_buffer_is_431(edges):
    """Sent in pieces, a header block over what the server buffers never reaches the gateway:
    the server's own answer still says 431 and names the limit."""
    with socket.create_connection(("127.0.0.1", edges.serve[EU]), timeout=30) as sock:
        sock.sendall(b"GET /h HTTP/1.1\r\nhost: 127.0.0.1\r\nx-huge: ")
        try:
            for _ in range(20):
                sock.sendall(b"a" * 8192)
                time.sleep(0.01)
        except (BrokenPipeError, ConnectionResetError):
            pass
        data = b""
        try:
            while chunk := sock.recv(65536):
                data += chunk
        except ConnectionResetError:
            pass
    assert data.startswith(b"HTTP/1.1 431"), data[:200]
    assert b"max_headers_bytes" in data


def test_utf8_in_an_unsigned_header_arrives_intact(edges):
    answer = raw_request(edges.serve[EU], "POST", "/h", [("x-note", "été".encode())], b"x")
    assert answer.status == 201
    raw = dict(answer.json()["headers"])["x-note"].encode("latin-1")
    assert raw == "été".encode()


# ---- 5. the deadline starts when the body is complete ---------------------------------------


def _slow_upload(port: int, record: str, size: int, rate: float, stall_after: int | None = None):
    head = (
        f"POST /upload HTTP/1.1\r\nhost: 127.0.0.1\r\nx-record: {record}\r\n"
        f"accept: application/json\r\ncontent-length: {size}\r\n\r\n"
    ).encode()
    data = bytes(i % 256 for i in range(size))
    piece = 20_000
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(head)
        sent = 0
        while sent < size:
            if stall_after is not None and sent >= stall_after:
                break
            sock.sendall(data[sent : sent + piece])
            sent += piece
            time.sleep(piece / rate)
        return read_answer(sock, "POST"), data


def test_a_slow_upload_is_forwarded_once_complete(edges):
    record = f"slow-{uuid.uuid4()}"
    started = time.monotonic()
    answer, data = _slow_upload(edges.serve[EU], record, 1024 * 1024, rate=200_000)
    took = time.monotonic() - started
    assert took > 4  # longer than the 3 s forwarding deadline
    assert answer.status == 201, answer.body[:300]
    assert records(edges, record) == [(len(data), hashlib.sha256(data).hexdigest())]


def test_a_stalled_upload_gets_408_and_runs_nothing(edges):
    record = f"stall-{uuid.uuid4()}"
    answer, _ = _slow_upload(
        edges.serve[EU], record, 1024 * 1024, rate=1_000_000, stall_after=200_000
    )
    assert answer.status == 408
    assert "body_timeout_s" in answer.json()["detail"]
    assert records(edges, record) == []


def test_a_body_announced_past_the_bound_is_refused_before_it_is_read(edges):
    record = f"huge-{uuid.uuid4()}"
    head = (
        f"POST /upload HTTP/1.1\r\nhost: 127.0.0.1\r\nx-record: {record}\r\n"
        f"accept: application/json\r\ncontent-length: {MAX_BODY + 1}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", edges.serve[EU]), timeout=30) as sock:
        sock.sendall(head)  # and not one byte of the body
        answer = read_answer(sock, "POST")
    assert answer.status == 413, answer.body[:300]
    assert answer.json()["max_body_bytes"] == MAX_BODY
    assert "max_body_bytes" in answer.json()["detail"]
    assert records(edges, record) == []


def test_a_chunked_body_that_outgrows_the_bound_is_refused_and_runs_nothing(edges):
    record = f"grows-{uuid.uuid4()}"
    head = (
        f"POST /upload HTTP/1.1\r\nhost: 127.0.0.1\r\nx-record: {record}\r\n"
        "accept: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
    ).encode()
    piece = b"x" * 64 * 1024
    chunk = b"%x\r\n%s\r\n" % (len(piece), piece)
    with socket.create_connection(("127.0.0.1", edges.serve[EU]), timeout=30) as sock:
        sock.sendall(head)
        try:
            for _ in range(MAX_BODY // len(piece) + 4):  # past the bound, never finished
                sock.sendall(chunk)
        except OSError:
            pass  # the gateway answered and closed while we were still sending
        answer = read_answer(sock, "POST")
    assert answer.status == 413, answer.body[:300]
    assert records(edges, record) == []


# ---- 6. connections that never finish their headers ----------------------------------------


def test_slow_header_connections_are_closed_and_others_served(edges):
    port = edges.serve[EU]
    socks = []
    try:
        for _ in range(200):
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            s.sendall(b"GET /slow HTTP/1.1\r\nhost: 127.0.0.1\r\nx-a: ")
            socks.append(s)
        # With 200 half-sent requests open, a whole one is answered at once.
        answer = raw_request(port, "GET", "/ok", timeout=5)
        assert answer.status == 200
        deadline = time.monotonic() + 2.0 + 5.0  # header_timeout_s, plus slack for a busy host
        closed = 0
        for s in socks:
            s.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                while s.recv(4096):
                    pass
                closed += 1
            except TimeoutError:
                pass
            except ConnectionResetError:
                closed += 1
        assert closed == 200
    finally:
        for s in socks:
            s.close()
    # The 408 names the bound; one that just waits gets it too.
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET / HTTP/1.1\r\n")
        start = time.monotonic()
        data = b""
        while chunk := s.recv(4096):
            data += chunk
        assert data.startswith(b"HTTP/1.1 408") and b"header_timeout_s" in data
        assert 1.5 < time.monotonic() - start < 7
