"""The primary epoch without a lab: signing, ordering, the region's file, the topology keys."""

from __future__ import annotations

import pytest

from latitude.promotion.epoch import (
    ACTIVE,
    PENDING,
    Epoch,
    EpochError,
    EpochFile,
    sign_epoch,
    verify_epoch,
)
from latitude.promotion.follow import topology_for_epoch
from latitude.promotion.postgres import format_lsn, parse_lsn
from latitude.signing import Keyring, SigningKey
from latitude.topology import TopologyError, parse_topology

KEYRING = Keyring([SigningKey("k1", b"x" * 32), SigningKey("k2", b"y" * 32)], "k1")

TOPOLOGY = """
[[regions]]
name = "us-west"
primary = true
location = [45.6, -121.2]
database_url = "postgresql://app@us.internal/app"
[[regions]]
name = "eu-west"
location = [53.3, -6.3]
database_url = "postgresql://app@eu.internal/app"
[lab]
"""


def test_sign_and_verify_round_trip():
    epoch = Epoch(7, "eu-west", ACTIVE, 1700000000.0)
    assert verify_epoch(KEYRING, sign_epoch(KEYRING, epoch)) == epoch
    # Rotation: a token signed with another key of the ring is accepted.
    other = Keyring(KEYRING._keys.values(), "k2")
    assert verify_epoch(KEYRING, sign_epoch(other, epoch)) == epoch


@pytest.mark.parametrize(
    "mangle",
    [
        lambda t: t.replace(t.split(".")[0], t.split(".")[0][:-2] + "AA"),  # payload changed
        lambda t: t.rsplit(".", 1)[0] + ".AAAA",  # signature changed
        lambda t: t.replace(".k1.", ".k9."),  # unknown key
        lambda t: "not-a-token",
        lambda t: "",
    ],
)
def test_untrusted_tokens_are_refused(mangle):
    token = sign_epoch(KEYRING, Epoch(2, "eu-west"))
    with pytest.raises(EpochError):
        verify_epoch(KEYRING, mangle(token))


def test_a_token_from_another_keyring_is_refused():
    stranger = Keyring([SigningKey("k1", b"z" * 32)], "k1")
    with pytest.raises(EpochError, match="does not match"):
        verify_epoch(KEYRING, sign_epoch(stranger, Epoch(9, "eu-west")))


def test_order_pending_then_active_then_next():
    pending, active, nxt = Epoch(2, "eu-west", PENDING), Epoch(2, "eu-west"), Epoch(3, "us-west")
    assert active.newer_than(pending) and nxt.newer_than(active) and nxt.newer_than(pending)
    assert not pending.newer_than(active) and not active.newer_than(active)
    assert pending.newer_than(None)


def test_epoch_file_keeps_only_newer(tmp_path):
    f = EpochFile(tmp_path / "epoch.json", KEYRING)
    assert f.read() is None
    assert f.offer(sign_epoch(KEYRING, Epoch(3, "eu-west"))) is not None
    assert f.offer(sign_epoch(KEYRING, Epoch(2, "us-west"))) is None  # older: ignored
    assert f.offer(sign_epoch(KEYRING, Epoch(3, "ap-southeast"))) is None  # same number: first wins
    assert f.read()[0] == Epoch(3, "eu-west", ACTIVE, 0.0)
    assert f.offer(sign_epoch(KEYRING, Epoch(4, "us-west", PENDING))) is not None
    assert f.read()[0].primary == "us-west" and not f.read()[0].active
    # A damaged file reads as no epoch, never as a wrong one.
    (tmp_path / "epoch.json").write_text('{"token": "forged"}')
    assert f.read() is None
    assert not list(tmp_path.glob("*.tmp"))


def test_topology_for_epoch_moves_the_primary_and_the_write_path():
    t = topology_for_epoch(parse_topology(TOPOLOGY), "eu-west")
    assert t.primary.name == "eu-west"
    us = t.region("us-west")
    assert not us.primary and us.primary_database_url == "postgresql://app@eu.internal/app"
    assert t.region("eu-west").primary_database_url is None


def test_replication_and_failover_keys_are_validated():
    t = parse_topology(TOPOLOGY + "[replication]\nsynchronous = 1\n[failover]\nautomatic = true\n")
    assert t.replication["synchronous"] == 1 and t.failover["automatic"] is True
    with pytest.raises(TopologyError) as info:
        parse_topology(TOPOLOGY + "[replication]\nsynchronous = 2\n")
    assert "only 1 replica regions" in str(info.value)
    with pytest.raises(TopologyError) as info:
        parse_topology(TOPOLOGY + '[failover]\nautomatic = "yes"\nafter = 3\n')
    text = str(info.value)
    assert "failover.automatic: must be true or false" in text and "after_s" in text


def test_lsn_text_round_trip():
    assert parse_lsn("16/B374D848") == (0x16 << 32) | 0xB374D848
    assert format_lsn(parse_lsn("0/3000108")) == "0/3000108"
    assert parse_lsn(None) is None


def test_journal_resumes_the_same_promotion_and_refuses_another(tmp_path):
    from latitude.promotion.journal import BadPromotion, Journal

    j = Journal(tmp_path)
    with pytest.raises(RuntimeError), j.running("eu-west", "switchover") as run:
        run.mark("checked")
        run.mark("pending", told={"us-west": "told"})
        raise RuntimeError("the command died here")
    # A step that changed something was done: the journal stays, to resume from.
    assert Journal(tmp_path).read()["done"] == ["checked", "pending"]
    with pytest.raises(BadPromotion, match="interrupted after step pending"):
        with Journal(tmp_path).running("ap-southeast", "switchover"):
            pass
    with Journal(tmp_path).running("eu-west", "switchover") as again:
        assert again.done("pending") and not again.done("fenced")
    assert Journal(tmp_path).read() is None  # finished: forgotten
    # Refused before anything changed: nothing to resume, nothing blocks the next one.
    with pytest.raises(BadPromotion), Journal(tmp_path).running("eu-west", "switchover") as run:
        run.mark("checked")
        raise BadPromotion("too far behind")
    assert Journal(tmp_path).read() is None


# ---- the gateway's side (latitude.promotion.follow), without a network -------------------

SECRET = "s" * 40
GATEWAY_TOPOLOGY = (
    TOPOLOGY
    + """
[signing]
keys = [{ id = "k1", env = "EPOCH_TEST_KEY" }]
[failover]
hold_s = 0.2
"""
)


def follower_for(tmp_path, extra: str = ""):
    from types import SimpleNamespace

    from latitude.gateway.config import GatewayConfig
    from latitude.promotion.follow import EpochFollower

    env = {"EPOCH_TEST_KEY": SECRET}
    path = tmp_path / "latitude.toml"
    topology = parse_topology(
        GATEWAY_TOPOLOGY + extra,
        source=str(path),
        environ=env,
    )
    config = GatewayConfig.from_topology(topology, "us-west", environ=env)
    return EpochFollower(config), SimpleNamespace(config=config), config.keyring


async def call(follower, gateway, method: str, path: str, body: bytes = b""):
    sent = []

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http",
        "method": method,
        "path": path,
        "headers": [(b"accept", b"application/json")],
    }
    answered = await follower.gate(gateway, scope, receive, send)
    if not answered:
        return None, {}, b""
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], dict(start["headers"]), body


async def test_epoch_endpoint_adopts_only_signed_newer_epochs(tmp_path):
    import json

    follower, gw, keyring = follower_for(tmp_path)
    status, _, body = await call(follower, gw, "GET", "/_latitude/epoch")
    assert status == 200 and json.loads(body)["epoch"]["number"] == 1
    assert (await call(follower, gw, "POST", "/_latitude/epoch", b"not json"))[0] == 400
    forged = sign_epoch(Keyring([SigningKey("k1", b"f" * 32)], "k1"), Epoch(5, "us-west"))
    status, _, body = await call(
        follower, gw, "POST", "/_latitude/epoch", json.dumps({"token": forged}).encode()
    )
    assert status == 403 and b"does not match" in body
    good = sign_epoch(keyring, Epoch(2, "us-west"))
    status, _, body = await call(
        follower, gw, "POST", "/_latitude/epoch", json.dumps({"token": good}).encode()
    )
    assert status == 200 and json.loads(body)["adopted"] is True
    assert json.loads((tmp_path / "epoch.json").read_text())["number"] == 2  # persisted
    again = await call(
        follower, gw, "POST", "/_latitude/epoch", json.dumps({"token": good}).encode()
    )
    assert json.loads(again[2])["adopted"] is False
    assert follower.headers() == [(b"latitude-epoch", good.encode())]


async def test_pending_epoch_holds_writes_then_refuses_reads_pass(tmp_path):
    import time

    follower, gw, keyring = follower_for(tmp_path)
    follower.offer(sign_epoch(keyring, Epoch(2, "us-west", PENDING)))
    started = time.monotonic()
    status, headers, _ = await call(follower, gw, "POST", "/events")
    assert status == 503 and time.monotonic() - started >= 0.2  # held for hold_s first
    assert headers[b"retry-after"] == b"1" and b"latitude-epoch" in headers
    assert (await call(follower, gw, "GET", "/events"))[0] is None  # reads are not held
    # Another process (or the promotion) activates it: the file is followed, writes pass.
    EpochFile(tmp_path / "epoch.json", keyring).offer(sign_epoch(keyring, Epoch(2, "us-west")))
    assert (await call(follower, gw, "POST", "/events"))[0] is None


async def test_a_primary_without_a_majority_lease_refuses_writes(tmp_path):
    follower, gw, _ = follower_for(tmp_path, "lease_s = 5\n")
    status, _, body = await call(follower, gw, "POST", "/events")
    assert status == 503 and b"majority" in body


def test_every_region_is_asked_at_once_and_each_answer_or_error_is_kept():
    """A region out of reach costs its timeout once, not before each region after it: both
    silent servers are connected to before the first one's timeout, and the one that answers
    and the one that refuses are told apart."""
    import http.server
    import socket
    import threading
    import time
    import urllib.error

    from latitude.promotion.regions_http import json_to_all

    class Answer(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            length = int(self.headers["content-length"])
            body = self.rfile.read(length)
            status = 200 if b'"token"' in body else 409
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.end_headers()
            self.wfile.write(b'{"adopted": true}')

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Answer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    silent = [socket.create_server(("127.0.0.1", 0)) for _ in range(2)]
    accepted: list[float] = []

    def accept(sock):
        conn, _ = sock.accept()
        accepted.append(time.monotonic())
        time.sleep(1.5)
        conn.close()

    threads = [threading.Thread(target=accept, args=(s,), daemon=True) for s in silent]
    for t in threads:
        t.start()
    try:
        answering = f"http://127.0.0.1:{server.server_address[1]}/_latitude/epoch"
        urls = {
            f"silent-{i}": f"http://127.0.0.1:{s.getsockname()[1]}/" for i, s in enumerate(silent)
        }
        started = time.monotonic()
        answers = json_to_all({**urls, "up": answering}, {"token": "t"}, timeout_s=0.5)
        assert answers["up"] == {"adopted": True}
        assert all(isinstance(answers[name], OSError) for name in urls), answers
        assert len(accepted) == 2 and max(accepted) - started < 0.5, (accepted, started)
        refused = json_to_all({"up": answering}, {"other": 1}, timeout_s=2)["up"]
        assert isinstance(refused, urllib.error.HTTPError) and refused.code == 409
    finally:
        server.shutdown()
        server.server_close()
        for t in threads:
            t.join()
        for s in silent:
            s.close()
