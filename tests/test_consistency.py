"""Replication positions, the position cookie, consistency modes, and the replay watcher against
the lab's real primary and streaming replicas (eu-west: 125 ms RTT from the primary)."""

from __future__ import annotations

import asyncio
import base64
import contextvars
import time

import psycopg
import pytest
from hypothesis import given
from hypothesis import strategies as st

from latitude.consistency import (
    ConsistencyMode,
    ConsistencyPolicy,
    PositionCookie,
    ReplayWatcher,
    ReplicationPosition,
    StrongPositionSource,
    primary_position,
    primary_position_async,
    read_locally,
)
from latitude.db import (
    RequestInfo,
    WriteOnReplicaError,
    current_request,
    current_route,
    request_context,
    route_to_primary,
    route_to_replica,
)
from latitude.lab.postgres import database_url

P = ReplicationPosition.parse
SECRET = b"s" * 32
TABLE = "consistency_probe"

# ---- positions --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("0/0", 0),
        ("0/1", 1),
        ("16/B374D848", (0x16 << 32) | 0xB374D848),
        ("16/b374d848", (0x16 << 32) | 0xB374D848),
        ("0/03000060", 0x3000060),  # zero-padded low half, as newer Postgres prints it
        ("FFFFFFFF/FFFFFFFF", 2**64 - 1),
    ],
)
def test_position_parses_postgres_text(text, value):
    pos = P(text)
    assert pos.to_int() == int(pos) == value
    assert P(str(pos)) == pos
    assert ReplicationPosition.from_int(value) == pos


def test_position_formats_like_postgres():
    assert str(P("16/B374D848")) == "16/B374D848"
    assert str(P("0/03000060")) == "0/3000060"
    assert repr(P("1/2")) == "ReplicationPosition('1/2')"


@pytest.mark.parametrize(
    "junk",
    ["", "16", "16/", "/B3", "16/B374D848/1", "G/0", "123456789/0", "0/123456789", " 0/1", "0x1/2"],
)
def test_position_rejects_junk_with_a_clear_error(junk):
    with pytest.raises(ValueError, match="not a Postgres WAL position"):
        P(junk)


@pytest.mark.parametrize("junk", [-1, 2**64, 1.5, True, "1"])
def test_position_from_bad_int(junk):
    with pytest.raises(ValueError, match="replication position"):
        ReplicationPosition.from_int(junk)


def test_position_order():
    assert P("0/FFFFFFFF") < P("1/0") < P("1/1")
    assert P("A/0") > P("9/FFFFFFFF")
    assert P("1/10") == P("1/00000010")
    assert max(P("1/2"), P("0/FFFFFFFF"), P("1/1")) == P("1/2")
    assert P("1/10") - P("1/0") == 16
    assert len({P("1/1"), P("1/01")}) == 1
    with pytest.raises(TypeError):
        _ = P("1/1") < "1/2"


@given(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1))
def test_position_round_trips_and_orders_like_ints(a, b):
    pa, pb = ReplicationPosition(a), ReplicationPosition(b)
    assert P(str(pa)) == pa
    assert (pa < pb) == (a < b) and (pa == pb) == (a == b) and (pa >= pb) == (a >= b)


# ---- route and request context -------------------------------------------------------------


def test_route_defaults_to_replica_and_nests():
    assert current_route.get() == "replica"
    with route_to_primary():
        assert current_route.get() == "primary"
        with route_to_replica():
            assert current_route.get() == "replica"
        assert current_route.get() == "primary"
    assert current_route.get() == "replica"


async def test_route_is_per_task():
    seen = {}

    async def request(name, router):
        with router():
            await asyncio.sleep(0.01)
            seen[name] = current_route.get()

    await asyncio.gather(request("a", route_to_primary), request("b", route_to_replica))
    assert seen == {"a": "primary", "b": "replica"}


def test_request_context_and_error_message():
    assert current_request.get() is None
    with request_context("get", "/calendar/export", "eu-west"):
        assert current_request.get() == RequestInfo("GET", "/calendar/export", "eu-west")
        err = WriteOnReplicaError(statement="INSERT INTO t VALUES (1)", detail="read-only")
    text = str(err)
    assert "GET /calendar/export in eu-west" in text
    assert "always_forward" in text and "latitude.toml" in text
    assert "INSERT INTO t" in text and err.route == "replica"
    assert "outside of any request" in str(WriteOnReplicaError())


def test_context_does_not_leak_into_a_copied_context():
    ctx = contextvars.copy_context()
    with route_to_primary():
        assert ctx.run(current_route.get) == "replica"


# ---- the cookie ------------------------------------------------------------------------------


def test_cookie_round_trip_and_expiry():
    cookie = PositionCookie(SECRET, max_age_s=30)
    value = cookie.issue(P("16/B374D848"), "eu-west", now=1000)
    assert cookie.read(value, now=1000) == P("16/B374D848")
    assert cookie.read(value, now=1029.9) == P("16/B374D848")
    assert cookie.read(value, now=1030) is None  # expired
    claim = cookie.read_claim(value, now=1000)
    assert claim.region == "eu-west" and claim.expires_at == 1030
    assert set(value) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.")
    assert cookie.read(cookie.issue(P("1/1"), "ap-southeast")) == P("1/1")  # real clock


def test_cookie_forged_tampered_or_unsigned_is_ignored():
    cookie = PositionCookie(SECRET)
    value = cookie.issue(P("1/100"), "eu-west", now=1000)
    body, mac = value.split(".")
    assert PositionCookie(b"x" * 32).read(value, now=1000) is None  # another secret
    assert PositionCookie(SECRET, name="other").read(value, now=1000) is None  # another cookie
    forged_body = base64.urlsafe_b64encode(b"FFFF/0|1030|eu-west").rstrip(b"=").decode()
    assert cookie.read(f"{forged_body}.{mac}", now=1000) is None  # payload changed, old MAC
    flipped = mac[:-2] + ("A" if mac[-2] != "A" else "B") + mac[-1]
    assert cookie.read(f"{body}.{flipped}", now=1000) is None
    assert cookie.read(body, now=1000) is None  # unsigned
    assert cookie.read("1/100", now=1000) is None  # a bare position
    for junk in [None, "", ".", "a.b", "!!.??", "x" * 5000, f"{body}.{mac}.x"]:
        assert cookie.read(junk, now=1000) is None


@given(st.text(max_size=300))
def test_cookie_read_never_raises(value):
    assert PositionCookie(SECRET).read(value) is None


def test_set_cookie_header_and_cookie_header_parsing():
    cookie = PositionCookie(SECRET, max_age_s=15)
    value = cookie.issue(P("1/1"), "eu-west")
    header = cookie.set_cookie_header(value, secure=False)
    assert header == f"latitude_pos={value}; Path=/; Max-Age=15; HttpOnly; SameSite=Lax"
    assert cookie.set_cookie_header(value, secure=True).endswith("; Secure")
    assert "Max-Age=0" in cookie.clear_cookie_header(secure=True)
    assert cookie.value_from_header(f"session=abc; latitude_pos={value}; x=y") == value
    assert cookie.value_from_header("session=abc") is None
    assert cookie.value_from_header(None) is None


def test_cookie_refuses_weak_setup():
    with pytest.raises(ValueError, match="16 bytes"):
        PositionCookie(b"short")
    with pytest.raises(ValueError, match="region"):
        PositionCookie(SECRET).issue(P("1/1"), "Bad Region|x")


# ---- modes and policy -----------------------------------------------------------------------


def test_policy_globs_and_specificity():
    policy = ConsistencyPolicy(
        routes={
            "/reports/*": ConsistencyMode.STRONG,
            "/reports/cached/*": "eventual",
            "/feed": "eventual",
        }
    )
    assert policy.default is ConsistencyMode.SESSION
    assert policy.mode_for("/reports/2024/q1") is ConsistencyMode.STRONG
    assert policy.mode_for("/reports/cached/x") is ConsistencyMode.EVENTUAL
    assert policy.mode_for("/feed") is ConsistencyMode.EVENTUAL
    assert policy.mode_for("/feed/more") is ConsistencyMode.SESSION
    assert policy.mode_for("/") is ConsistencyMode.SESSION
    assert ConsistencyPolicy("eventual").mode_for("/x") is ConsistencyMode.EVENTUAL


def test_policy_from_config_and_errors():
    policy = ConsistencyPolicy.from_config(
        {"default": "eventual", "routes": {"/account/*": "session"}}
    )
    assert policy.mode_for("/account/me") is ConsistencyMode.SESSION
    assert policy.mode_for("/x") is ConsistencyMode.EVENTUAL
    assert ConsistencyPolicy.from_config("STRONG").default is ConsistencyMode.STRONG
    assert ConsistencyPolicy.from_config(None).default is ConsistencyMode.SESSION
    with pytest.raises(ValueError, match="'eventual', 'session', 'strong'"):
        ConsistencyPolicy.from_config("sometimes")
    with pytest.raises(ValueError, match="unknown key"):
        ConsistencyPolicy.from_config({"defualt": "session"})
    with pytest.raises(ValueError, match="starting with '/'"):
        ConsistencyPolicy(routes={"reports/*": "strong"})


# ---- against the lab ------------------------------------------------------------------------


def region_urls(world) -> dict[str, str]:
    return {r["name"]: r["database_url"] for r in world.status()["regions"]}


@pytest.fixture(scope="module")
def urls(world):
    found = region_urls(world)
    with psycopg.connect(found["us-west"], autocommit=True) as c:
        c.execute(f"create table if not exists {TABLE} (id serial primary key, note text)")
    return found


async def write(primary_url: str, note: str = "x") -> ReplicationPosition:
    """Commit a row at the primary and return the primary's position after the commit."""
    async with await psycopg.AsyncConnection.connect(primary_url, autocommit=True) as c:
        await c.execute(f"insert into {TABLE} (note) values (%s)", (note,))
        return await primary_position_async(c)


def test_primary_position_sync_grows_with_writes(urls):
    with psycopg.connect(urls["us-west"], autocommit=True) as c:
        before = primary_position(c)
        c.execute(f"insert into {TABLE} (note) values ('sync')")
        after = primary_position(c)
        with c.cursor() as cur:  # a DB-API cursor works too
            assert primary_position(cur) >= after
        assert primary_position(c, insert=True) >= after
    assert after > before


async def test_wait_for_a_fresh_write_wakes_when_the_replica_replays_it(urls):
    async with ReplayWatcher(urls["eu-west"]) as watcher:
        note = f"fresh-{time.monotonic_ns()}"
        position = await write(urls["us-west"], note)
        assert watcher.replayed < position  # the WAL is still crossing the ocean
        started = time.monotonic()
        assert await watcher.wait_for(position, timeout_s=10)
        waited = time.monotonic() - started
        # The read now sees the write, on the replica itself.
        async with await psycopg.AsyncConnection.connect(urls["eu-west"]) as c:
            cur = await c.execute(f"select 1 from {TABLE} where note = %s", (note,))
            assert await cur.fetchone() is not None
        stats = watcher.stats()
    # WAL needs at least the one-way delay (62.5 ms) to arrive: the wait really happened.
    assert waited >= 0.05
    assert stats["reads_waited"] == 1 and stats["reads_timed_out"] == 0
    assert sum(stats["wait_ms_histogram"].values()) == 1
    assert stats["wait_ms_total"] >= 50 and stats["waiting"] == 0 and stats["healthy"]


async def test_a_read_without_a_pending_position_issues_no_query(urls):
    # Idle refreshes are pushed out of the way, so every query would be the reads' doing.
    async with ReplayWatcher(urls["eu-west"], idle_interval_s=3600) as watcher:
        queries = watcher.queries
        replayed = watcher.replayed
        for _ in range(200):
            assert await watcher.wait_for(replayed, timeout_s=0.5)
            assert await watcher.wait_for(None, timeout_s=0.5)
            assert await watcher.wait_for(ReplicationPosition(0), timeout_s=0.5)
        assert watcher.queries == queries
        assert watcher.stats()["reads_immediate"] == 600
        assert watcher.stats()["reads_waited"] == 0


async def test_idle_watcher_keeps_the_position_fresh(urls):
    async with ReplayWatcher(urls["eu-west"], idle_interval_s=0.05) as watcher:
        position = await write(urls["us-west"], "idle")
        deadline = time.monotonic() + 10
        while watcher.replayed < position and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert watcher.replayed >= position  # learned in the background, nobody waited
        assert watcher.stats()["reads_waited"] == 0
        assert watcher.stats()["replayed_age_ms"] < 10_000


async def test_many_waiters_share_one_poll(urls):
    async with ReplayWatcher(urls["eu-west"], poll_interval_s=0.002) as watcher:
        positions = [await write(urls["us-west"], f"many-{i}") for i in range(5)]
        queries = watcher.queries
        started = time.monotonic()
        results = await asyncio.gather(
            *(watcher.wait_for(positions[i % 5], timeout_s=10) for i in range(100))
        )
        elapsed = time.monotonic() - started
        polls = watcher.queries - queries
    assert all(results)
    assert watcher.stats()["reads_waited"] == 100
    # At most one query per poll interval, whatever the number of waiting reads; a waiter
    # polling on its own would make that ~100 times as many.
    assert polls <= elapsed / 0.002 + 2, (polls, elapsed)


async def test_cut_link_times_out_then_catches_up_after_heal(healed, urls):
    world = healed
    async with ReplayWatcher(urls["eu-west"]) as watcher:
        world.link("cut", "us-west", "eu-west")
        try:
            position = await write(urls["us-west"], "cut")
            assert not await watcher.wait_for(position, timeout_s=0.3)
            stats = watcher.stats()
            assert stats["reads_timed_out"] == 1 and stats["reads_waited"] == 0
            assert stats["waiting"] == 0 and stats["healthy"]  # the local replica still answers
        finally:
            world.link("heal", "us-west", "eu-west")
        assert await watcher.wait_for(position, timeout_s=15)


async def test_close_releases_pending_waiters(urls):
    watcher = ReplayWatcher(urls["eu-west"])
    await watcher.start()
    far = ReplicationPosition(watcher.replayed.to_int() + 10**12)
    pending = asyncio.create_task(watcher.wait_for(far, timeout_s=30))
    await asyncio.sleep(0.05)
    assert watcher.waiting == 1
    await watcher.close()
    assert await asyncio.wait_for(pending, 5) is False
    with pytest.raises(RuntimeError):
        await watcher.wait_for(far, 1)


async def test_watcher_on_an_unreachable_replica_times_out_reads():
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    watcher = ReplayWatcher(database_url(port), connect_timeout_s=1)
    with pytest.raises(psycopg.OperationalError):
        await watcher.start()
    await watcher.start(require_connection=False)
    try:
        assert not watcher.healthy and watcher.replayed is None
        assert not await watcher.wait_for(ReplicationPosition(1), timeout_s=0.1)
        assert watcher.stats()["last_error"]
    finally:
        await watcher.close()


async def test_watcher_on_the_primary_region_treats_all_as_replayed(urls):
    async with ReplayWatcher(urls["us-west"]) as watcher:
        position = await write(urls["us-west"], "primary-region")
        assert await watcher.wait_for(position, timeout_s=5)


async def test_strong_reads_wait_for_the_primary_position_at_request_start(world, urls):
    # From eu-west, the primary is across the ocean: through the link's relay.
    primary_via_link = database_url(world.relay_port("eu-west", "us-west", "pg"))
    async with (
        ReplayWatcher(urls["eu-west"]) as watcher,
        StrongPositionSource(primary_via_link, max_size=2) as strong,
    ):
        note = f"strong-{time.monotonic_ns()}"
        before = await write(urls["us-west"], note)
        positions = await asyncio.gather(*(strong.current(timeout_s=10) for _ in range(10)))
        assert all(p >= before for p in positions)
        assert strong.queries == 1 and strong.requests == 10  # one flight for the burst
        assert await read_locally(ConsistencyMode.STRONG, watcher, strong=strong, timeout_s=10)
        async with await psycopg.AsyncConnection.connect(urls["eu-west"]) as c:
            cur = await c.execute(f"select 1 from {TABLE} where note = %s", (note,))
            assert await cur.fetchone() is not None
        # EVENTUAL never waits, SESSION without a cookie neither: no read is counted as waiting.
        waited = watcher.stats()["reads_waited"] + watcher.stats()["reads_immediate"]
        fresh = await write(urls["us-west"], "eventual")
        assert await read_locally(ConsistencyMode.EVENTUAL, watcher, cookie_position=fresh)
        assert await read_locally(ConsistencyMode.SESSION, watcher)
        stats = watcher.stats()
        assert stats["reads_waited"] + stats["reads_immediate"] == waited
        # SESSION with the cookie of that fresh write waits for it.
        assert await read_locally(
            ConsistencyMode.SESSION, watcher, cookie_position=fresh, timeout_s=10
        )
        assert watcher.replayed >= fresh
