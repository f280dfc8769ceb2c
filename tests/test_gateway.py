"""The region gateway against the real world: Postgres primary + replicas, Valkey per region,
the calendar app in every region, requests over real sockets through the emulated links."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid

import aiohttp
import psycopg
import pytest
import redis

from latitude.signing import Keyring, SigningKey, content_digest, sign_request
from tests.conftest import start_calendar, wait_healthy

PRIMARY, EU, AP = "us-west", "eu-west", "ap-southeast"


def url(world, region: str) -> str:
    return f"http://127.0.0.1:{world.state().regions[region].app_port}"


def db(world, region: str) -> str:
    return next(r["database_url"] for r in world.status()["regions"] if r["name"] == region)


def valkey(world, region: str) -> redis.Redis:
    return redis.Redis(port=world.state().regions[region].valkey_port)


def client(world, region: str) -> aiohttp.ClientSession:
    # IP hosts need the unsafe jar to keep cookies; a user near `region` talks to it directly.
    return aiohttp.ClientSession(url(world, region), cookie_jar=aiohttp.CookieJar(unsafe=True))


async def login(session: aiohttp.ClientSession, name: str) -> dict:
    async with session.post("/login", json={"name": name}) as r:
        assert r.status == 200, await r.text()
        return await r.json()


def count_events(world, title: str) -> int:
    with psycopg.connect(db(world, PRIMARY)) as c:
        return c.execute("select count(*) from events where title = %s", (title,)).fetchone()[0]


async def test_post_in_eu_west_lands_once_with_session_both_ways(calendar):
    world = calendar
    async with client(world, EU) as c:
        user = await login(c, f"ana-{uuid.uuid4().hex[:6]}")
        sid = next(m.value for m in c.cookie_jar if m.key == "session")
        # The session lives in eu-west's store only: the app at the primary ran the sign-in on
        # the session it carried, in memory, and the answer brought the new one back.
        assert valkey(world, EU).get(f"latitude:session:{sid}") is not None
        assert valkey(world, EU).ttl(f"latitude:session:{sid}") > 3600
        assert valkey(world, PRIMARY).exists(f"latitude:session:{sid}") == 0
        title = f"standup {uuid.uuid4()}"
        async with c.post("/events", json={"title": title}) as r:
            assert r.status == 201, await r.text()
            body = await r.json()
        assert body["region"] == PRIMARY  # it ran at the primary
        assert count_events(world, title) == 1
        with psycopg.connect(db(world, PRIMARY)) as conn:
            created_by = conn.execute(
                "select created_by from events where title = %s", (title,)
            ).fetchone()[0]
        assert created_by == user["user"]["id"]  # the signed-in session was honoured at the primary
        # The flash message the primary put in the session is back in eu-west's store.
        stored = json.loads(valkey(world, EU).get(f"latitude:session:{sid}"))
        assert stored["flash"] == f"Created {title!r}"
        async with c.get("/me") as r:
            assert (await r.json())["flash"] == f"Created {title!r}"


async def test_concurrent_writes_of_one_session_keep_it_signed_in(calendar):
    world = calendar
    async with client(world, EU) as c:
        await login(c, f"busy-{uuid.uuid4().hex[:6]}")
        for round_ in range(5):
            posts = [c.post("/events", json={"title": f"busy {round_}.{i}"}) for i in range(4)]
            responses = await asyncio.gather(*(p.__aenter__() for p in posts))
            assert [r.status for r in responses] == [201] * 4, [await r.text() for r in responses]
            for r in responses:
                r.release()
        async with c.get("/me") as r:
            assert (await r.json())["user"] is not None


async def test_primary_sees_real_client_ip_not_client_headers(calendar):
    world = calendar
    async with client(world, EU) as c:
        await login(c, "ip-tester")
        title = f"ip {uuid.uuid4()}"
        spoof = {
            "X-Forwarded-For": "6.6.6.6",
            "Forwarded": "for=7.7.7.7;proto=https",
            "X-Real-IP": "8.8.8.8",
        }
        async with c.post("/events", json={"title": title}, headers=spoof) as r:
            assert r.status == 201
        async with c.get("/me", headers=spoof) as r:
            assert (await r.json())["client_ip"] == "127.0.0.1"
    with psycopg.connect(db(world, PRIMARY)) as conn:
        ip = conn.execute("select client_ip from events where title = %s", (title,)).fetchone()[0]
    assert ip == "127.0.0.1"


def lab_keyring(world) -> Keyring:
    return Keyring([SigningKey("lab-1", world.state().secret.encode())], "lab-1")


def forged_request(world, title: str, *, keyring=None, now=None, tamper=None):
    """A forwarded request built exactly like eu-west's gateway builds one, then tampered."""
    base = url(world, PRIMARY)
    body = json.dumps({"title": title}).encode()
    headers = [
        ("content-type", "application/json"),
        ("forwarded", "for=127.0.0.1;proto=http;host=eu"),
        ("idempotency-key", str(uuid.uuid4())),
        ("content-digest", content_digest(body)),
        ("latitude-session-length", "0"),
        ("latitude-forwarded-from", EU),
    ]
    path = "/events"
    signature = sign_request(
        keyring or lab_keyring(world),
        method="POST",
        url=base + path,
        headers=headers,
        now=now,
        covered=(
            "content-digest",
            "content-type",
            "idempotency-key",
            "forwarded",
            "latitude-session-length",
            "latitude-forwarded-from",
            "cookie",
            "authorization",
        ),
    )
    headers += list(signature.items())
    method = "POST"
    if tamper:
        method, path, headers, body = tamper(method, path, headers, body)
    return method, base + path, headers, body


def _replace(headers, name, value):
    return [(k, value if k == name else v) for k, v in headers]


TAMPERS = {
    "missing signature": lambda m, p, h, b: (
        m,
        p,
        [x for x in h if x[0] not in ("signature", "signature-input")],
        b,
    ),
    "body": lambda m, p, h, b: (m, p, h, b.replace(b"}", b', "x": 1}')),
    "body and digest": lambda m, p, h, b: (
        m,
        p,
        _replace(h, "content-digest", content_digest(b + b" ")),
        b + b" ",
    ),
    "header": lambda m, p, h, b: (m, p, _replace(h, "forwarded", "for=6.6.6.6;proto=http"), b),
    "path": lambda m, p, h, b: (m, "/events?admin=1", h, b),
    "method": lambda m, p, h, b: ("PUT", p, h, b),
}


@pytest.mark.parametrize("tamper", list(TAMPERS))
async def test_tampered_forwarded_requests_are_refused_and_nothing_runs(calendar, tamper):
    world = calendar
    title = f"forged {uuid.uuid4()}"
    method, target, headers, body = forged_request(world, title, tamper=TAMPERS[tamper])
    async with (
        aiohttp.ClientSession() as s,
        s.request(method, target, headers=headers, data=body) as r,
    ):
        assert r.status == 401, (tamper, r.status, await r.text())
    assert count_events(world, title) == 0


async def test_expired_unknown_key_and_replayed_are_refused(calendar):
    world = calendar
    cases = {
        "expired": dict(now=time.time() - 3600),
        "unknown key": dict(
            keyring=Keyring([SigningKey("stolen", secrets.token_bytes(32))], "stolen")
        ),
        "wrong secret": dict(
            keyring=Keyring([SigningKey("lab-1", secrets.token_bytes(32))], "lab-1")
        ),
    }
    async with aiohttp.ClientSession() as s:
        for name, kwargs in cases.items():
            title = f"{name} {uuid.uuid4()}"
            method, target, headers, body = forged_request(world, title, **kwargs)
            async with s.request(method, target, headers=headers, data=body) as r:
                assert r.status == 401, (name, await r.text())
            assert count_events(world, title) == 0
        # A correctly signed request runs once (it has no session, so the app refuses it: 401
        # from the app, not the gateway); the exact same bytes sent again are a replay.
        title = f"replay {uuid.uuid4()}"
        method, target, headers, body = forged_request(world, title)
        async with s.request(method, target, headers=headers, data=body) as r:
            first = await r.text()
            assert "sign in first" in first, first
        async with s.request(method, target, headers=headers, data=body) as r:
            assert r.status == 401 and "nonce" in (await r.text()).lower()


async def test_primary_gateway_down_write_falls_back_to_remote_database(calendar):
    world = calendar
    async with client(world, EU) as c:
        await login(c, "fallback-user")
        world.kill(PRIMARY, "app")
        try:
            title = f"fallback {uuid.uuid4()}"
            async with c.post("/events", json={"title": title}) as r:
                assert r.status == 201, await r.text()
                assert (await r.json())["region"] == EU  # handled here, SQL over the ocean
            assert count_events(world, title) == 1
        finally:
            world.revive(PRIMARY, "app")
            wait_healthy(world, PRIMARY)


async def test_link_cut_reads_work_writes_get_503_fast(healed, calendar):
    world = calendar
    async with client(world, EU) as c:
        await login(c, "cut-user")
        world.link("cut", PRIMARY, EU)
        started = time.monotonic()
        async with c.get("/events") as r:
            assert r.status == 200
        title = f"cut {uuid.uuid4()}"
        started = time.monotonic()
        async with c.post(
            "/events", json={"title": title}, headers={"Accept": "application/json"}
        ) as r:
            elapsed = time.monotonic() - started
            # 503 "nothing was changed" only if nothing can have been sent; an attempt held by
            # the cut (a warm pooled connection) may yet land: then 504, and the key decides.
            assert r.status in (503, 504), await r.text()
            assert r.headers["Retry-After"]
            assert r.headers["Cache-Control"] == "no-store"
            key = r.headers["Idempotency-Key"]
            assert (await r.json())["idempotency_key"] == key
        assert elapsed < 3.5  # within the 3 s deadline (plus scheduling slack): nothing hangs
        async with c.post(
            "/events",
            json={"title": title},
            headers={"Accept": "text/html", "Idempotency-Key": key},
        ) as r:
            assert r.status in (503, 504) and key in await r.text()
        world.link("heal", PRIMARY, EU)
    # Held by the cut link, the first attempt may still reach the primary after the heal and
    # run there; the 503 ran nothing here. Either way: never twice.
    assert count_events(world, title) <= 1


async def test_answer_lost_after_commit_retry_returns_stored_response(healed, calendar):
    world = calendar
    async with client(world, EU) as c:
        await login(c, "lost-answer")
        title = f"lost {uuid.uuid4()}"

        async def reset_mid_answer():
            # The request reaches the primary after ~62 ms and commits; its answer is held
            # back 600 ms by the app, and the link's connections are reset meanwhile.
            await asyncio.sleep(0.3)
            await asyncio.to_thread(world.link, "reset", PRIMARY, EU)

        post = c.post("/events", json={"title": title, "after_commit_delay_ms": 600})
        resetter = asyncio.create_task(reset_mid_answer())
        async with post as r:
            status, body = r.status, await r.json()
        await resetter
        assert status == 201, body
        assert body["title"] == title
    assert count_events(world, title) == 1


def app_relay_connections(world) -> int:
    target = world.state().regions[PRIMARY].app_port
    for link in world.control().call("GET", "/status")["links"]:
        if {link["a"], link["b"]} == {PRIMARY, EU}:
            # The relay names its target "host:port".
            relays = [
                r for r in link["relays"] if str(r["target"]).rpartition(":")[2] == str(target)
            ]
            assert relays, f"no relay to the primary's app port {target}: {link['relays']}"
            return sum(r["connections_total"] for r in relays)
    raise AssertionError("no us-west<->eu-west link")


def gateway_figures(world, region: str = EU) -> dict:
    """A region's gateway figures, summed over its worker processes (each publishes every
    second)."""
    return next(r for r in world.status()["regions"] if r["name"] == region)["gateway"]


# The new connections a region's gateway processes open, each counted where it is opened:
# the forwarding pool (retries on a fresh connection included), its path checks, the
# dashboard's sampler and the epoch follower's peer questions.
OPENED = ("forwarding_connections", "forwarding_probes", "sampler_connections")
OPENED += ("epoch_peer_connections", "forwarding_refills")


def opened_by(figures: dict) -> dict:
    return {k: figures.get(k, 0.0) for k in OPENED}


async def test_warm_pool_forwarded_posts_open_no_new_connection(calendar):
    world = calendar

    async def posts(c, n: int, name: str) -> None:
        for i in range(n):
            # a fresh client connection per request, so requests spread over eu-west's workers
            async with (
                aiohttp.ClientSession(url(world, EU), cookie_jar=c.cookie_jar) as fresh,
                fresh.post("/events", json={"title": f"{name} {i}"}) as r,
            ):
                assert r.status == 201

    async with client(world, EU) as c:
        await login(c, "pool-user")
        # Steady state first: an earlier test's link reset killed pooled connections, and a
        # worker's pool replaces a dead one on the next request it forwards (seen: 1).
        await posts(c, 20, "warm-up")
        await asyncio.sleep(1.2)  # every worker has published its figures
        relay_before, before = app_relay_connections(world), opened_by(gateway_figures(world))
        retries_before = gateway_figures(world).get("retries", 0.0)
        await posts(c, 100, "pool")
        await asyncio.sleep(1.2)
        after = gateway_figures(world)
        opened = {k: v - before[k] for k, v in opened_by(after).items()}
        retries = after.get("retries", 0.0) - retries_before
        relay_opened = app_relay_connections(world) - relay_before
        # The forwarded POSTs themselves opened nothing beyond a retry's fresh connection...
        assert opened["forwarding_connections"] <= retries, (opened, retries)
        # ...and every connection that crossed the link to the primary's app was opened, and
        # counted, by one of eu-west's gateway parts (the lab's own checks dial other ports).
        assert relay_opened <= sum(opened.values()), (relay_opened, opened)
        assert relay_opened <= 2, (relay_opened, opened)


async def test_64k_session_travels_both_ways_and_oversize_is_refused(calendar):
    world = calendar
    notes = secrets.token_hex(32 * 1024)  # 64 KiB, incompressible
    async with client(world, EU) as c:
        await login(c, "big-session")
        async with c.post("/notes", json={"notes": notes}) as r:  # forwarded: set at the primary
            assert r.status == 200 and (await r.json())["notes_bytes"] == len(notes)
        sid = next(m.value for m in c.cookie_jar if m.key == "session")
        title = f"big {uuid.uuid4()}"
        async with c.post("/events", json={"title": title}) as r:  # carried to the primary and back
            assert r.status == 201
        stored = json.loads(valkey(world, EU).get(f"latitude:session:{sid}"))
        assert stored["notes"] == notes and stored["flash"] == f"Created {title!r}"
        # A session over the limit (1 MiB) is refused with a clear error, not truncated.
        huge = json.dumps({**stored, "notes": secrets.token_hex(800 * 1024)}).encode()
        valkey(world, EU).set(f"latitude:session:{sid}", huge)
        async with c.post(
            "/events", json={"title": "never"}, headers={"Accept": "application/json"}
        ) as r:
            assert r.status == 413
            detail = (await r.json())["detail"]
            assert "session_limit_bytes" in detail
        assert valkey(world, EU).get(f"latitude:session:{sid}") == huge


async def test_always_forward_get_runs_at_primary(calendar):
    world = calendar
    async with client(world, EU) as c, c.get("/auth/callback") as r:
        assert r.status == 200 and (await r.json())["region"] == PRIMARY


async def test_duplicate_after_primary_restart_gets_the_stored_response(calendar):
    """Outcomes live in the primary database: a restarted primary gateway still knows them."""
    world = calendar
    key = str(uuid.uuid4())
    title = f"dup {uuid.uuid4()}"
    async with client(world, EU) as c:
        await login(c, "dup-user")
        async with c.post("/events", json={"title": title}, headers={"Idempotency-Key": key}) as r:
            assert r.status == 201
            first = await r.json()
        start_calendar(world, PRIMARY)  # a new primary gateway process
        wait_healthy(world, PRIMARY)
        async with c.post("/events", json={"title": title}, headers={"Idempotency-Key": key}) as r:
            assert r.status == 201
            assert await r.json() == first  # the stored answer, not a second run
        async with c.post(
            "/events", json={"title": title + " other"}, headers={"Idempotency-Key": key}
        ) as r:
            assert r.status == 422  # same key, another body
    assert count_events(world, title) == 1


async def test_forwarded_read_of_a_signed_in_user_is_verified(calendar):
    """A read forwarded with a session (the replica behind) carries a body envelope: the
    client library must not add headers the signature does not cover."""
    world = calendar
    async with client(world, EU) as c:
        await login(c, "forwarded-reader")
        with psycopg.connect(db(world, EU), autocommit=True) as replica:
            replica.execute("select pg_wal_replay_pause()")
            try:
                async with c.post("/events", json={"title": "read me"}) as r:
                    event = await r.json()
                async with c.get(f"/events/{event['id']}") as r:  # waits 0.5 s, then forwarded
                    assert r.status == 200, await r.text()
                    assert (await r.json())["title"] == "read me"
            finally:
                replica.execute("select pg_wal_replay_resume()")


async def test_a_large_upload_is_forwarded_intact(calendar):
    """5 MiB, streamed in chunks: spooled to disk past 1 MiB at each gateway, never corrupted."""
    import hashlib
    import os

    payload = os.urandom(5 * 1024 * 1024)

    async def chunks():
        for i in range(0, len(payload), 64 * 1024):
            yield payload[i : i + 64 * 1024]

    async with client(calendar, EU) as c, c.post("/attachments", data=chunks()) as r:
        assert r.status == 201, await r.text()
        body = await r.json()
    assert body == {
        "bytes": len(payload),
        "sha256": hashlib.sha256(payload).hexdigest(),
        "region": PRIMARY,
    }


async def test_every_gateway_process_froze_its_start_up_heap(calendar):
    # gc.freeze() after start-up keeps full collections (50-75 ms) off the requests' path.
    for region in (PRIMARY, EU):
        async with client(calendar, region) as c, c.get("/_latitude/status") as r:
            assert r.status == 200
            heap = (await r.json())["heap"]
        assert heap["frozen_objects"] > 10_000, (region, heap)


def test_a_burst_of_300_connections_is_served_whole(calendar):
    # Each new connection counts as waiting for its headers from the moment it opens: a bound
    # of 256 closed the first clients of a 300-connection burst before they could send a byte.
    import resource
    import socket

    port = calendar.state().regions[AP].app_port  # one gateway worker: the burst is all its own
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1024:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    socks = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(300)]
    try:
        time.sleep(0.5)  # the worker has accepted them all before the first request comes
        for s in socks:
            s.sendall(
                b"GET /_latitude/health HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n"
            )
        cut = 0
        for s in socks:
            data = b""
            try:
                while chunk := s.recv(4096):
                    data += chunk
            except ConnectionResetError:
                pass
            cut += not data.startswith(b"HTTP/1.1 ")
        assert cut == 0, f"{cut} of 300 connections were closed unanswered"
    finally:
        for s in socks:
            s.close()
