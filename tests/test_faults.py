"""The standing fault suite: the gateway under link resets, cuts, heals and a killed primary app,
against the shared lab world (real Postgres primary and replicas, Valkey, the calendar behind the
gateway in every region, requests over the emulated links). Run it alone with `-m faults`.

What must hold, whatever the link does: an acknowledged write is read back by its writer (or the
read says it is stale); no 5xx but 503 / 504; every 503 / 504 for a write carries the
Idempotency-Key and a retry with it runs the write at most once; a 503 that says "nothing was
changed" is true; a key is never blocked long after a brief cut.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import aiohttp
import psycopg
import pytest

from latitude.consistency import PositionCookie, ReplicationPosition
from tests.conftest import wait_healthy

pytestmark = pytest.mark.faults

PRIMARY, EU, AP = "us-west", "eu-west", "ap-southeast"
POS = "latitude_pos"
FAR_FUTURE = ReplicationPosition.parse("FFFFFFF/0")
DEADLINE_S = 3.0  # the gateway's default [gateway] deadline_s


def url(world, region: str) -> str:
    return f"http://127.0.0.1:{world.state().regions[region].app_port}"


def db_url(world, region: str) -> str:
    return next(r["database_url"] for r in world.status()["regions"] if r["name"] == region)


def user(world, region: str = EU) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(url(world, region), cookie_jar=aiohttp.CookieJar(unsafe=True))


async def login(c: aiohttp.ClientSession, name: str) -> None:
    """Sign in as a careful client does: a 503 / 504 is retried with the key it carries."""
    headers = {"Accept": "application/json"}
    for _ in range(10):
        async with c.post("/login", json={"name": name}, headers=headers) as r:
            if r.status not in (503, 504):
                assert r.status == 200, await r.text()
                return
            headers["Idempotency-Key"] = r.headers["Idempotency-Key"]
        await asyncio.sleep(0.5)
    raise AssertionError(f"{name} could not sign in")


def count_events(world, title: str) -> int:
    with psycopg.connect(db_url(world, PRIMARY)) as c:
        return c.execute("select count(*) from events where title = %s", (title,)).fetchone()[0]


def idempotency_row(world, key: str):
    with psycopg.connect(db_url(world, PRIMARY)) as c:
        return c.execute(
            "select state, status from latitude_idempotency where key = %s", (key,)
        ).fetchone()


async def post_event(c, title: str, key: str | None = None, timeout: float = 30):
    headers = {"Accept": "application/json"}
    if key:
        headers["Idempotency-Key"] = key
    async with c.post(
        "/events",
        json={"title": title},
        headers=headers,
        timeout=aiohttp.ClientTimeout(total=timeout),
    ) as r:
        try:
            body = await r.json(content_type=None)
        except ValueError:
            body = {"text": (await r.text())[:300]}
        return r.status, r.headers.copy(), body, POS in r.cookies


async def retry_until_done(c, title: str, key: str, within_s: float):
    """A careful client: retry with the key it was given until a final answer (or give up)."""
    deadline = time.monotonic() + within_s
    answers = []
    while True:
        status, headers, body, cookie = await post_event(c, title, key)
        answers.append(status)
        if status not in (503, 504, 409) or time.monotonic() > deadline:
            return status, body, cookie, answers
        await asyncio.sleep(0.3)


@pytest.fixture(scope="module", autouse=True)
def fresh_replica_app_after(calendar):
    """After the faults, eu-west's calendar is restarted for the tests that follow. Known
    defect, not fixed: its fallback pool to the primary database can take longer than a
    deadline to recover from a run of cuts and resets (psycopg_pool's reconnect back-off); the
    gateway renews a pool that hands out nothing, but only for the request after."""
    yield
    from tests.conftest import start_calendar

    start_calendar(calendar, EU)
    wait_healthy(calendar, EU)


async def warm_the_fallback(c) -> None:
    """One write through the fallback, so the test's own write finds its connections open.
    Cold (its pools' connections reset by an earlier test), the fallback's new connections and
    dozen round trips across the ocean can outlast the 3 s deadline: then the write answers 504
    with its key, and the key finishes it, as for any client."""
    title, key = f"warm {uuid.uuid4()}", str(uuid.uuid4())
    status, body, _, answers = await retry_until_done(c, title, key, within_s=DEADLINE_S * 4)
    assert status == 201 and body["region"] == EU, (answers, body)


@pytest.fixture
def primary_app_down(calendar):
    """us-west's app (and with it its gateway) killed: eu-west's writes fall back."""
    calendar.kill(PRIMARY, "app")
    try:
        yield calendar
    finally:
        calendar.revive(PRIMARY, "app")
        wait_healthy(calendar, PRIMARY)


# ---- replays and positions ----------------------------------------------------------------


async def test_a_replayed_write_sets_the_position_cookie(calendar):
    """A duplicate answered from the stored outcome carries the primary's position, so the
    writer's next read waits for the write like after the first answer."""
    world = calendar
    async with user(world) as c:
        await login(c, f"replay-{uuid.uuid4().hex[:6]}")
        title, key = f"replay {uuid.uuid4()}", str(uuid.uuid4())
        status, _, body, cookie = await post_event(c, title, key)
        assert status == 201 and cookie, body
        c.cookie_jar.clear(lambda m: m.key == POS)
        status, _, again, cookie = await post_event(c, title, key)
        assert (status, again) == (201, body)
        assert cookie, "the replayed answer set no position cookie"
    assert count_events(world, title) == 1


async def test_forwarded_reads_store_no_outcome(calendar):
    world = calendar
    lab = PositionCookie(world.state().secret.encode())
    async with aiohttp.ClientSession(url(world, EU), cookie_jar=aiohttp.DummyCookieJar()) as c:
        key = str(uuid.uuid4())
        # A position the replica will not reach: the read is forwarded to the primary.
        headers = {"Idempotency-Key": key, "Cookie": f"{POS}={lab.issue(FAR_FUTURE, EU)}"}
        async with c.get("/events", headers=headers) as r:
            assert r.status == 401, await r.text()  # not signed in, as the primary says
            assert POS in r.cookies  # forwarded: the primary's position came back
    assert idempotency_row(world, key) is None


async def test_a_position_cookie_from_another_region_is_ignored(calendar):
    """eu-west's cookie names eu-west: ap-southeast serves the read at once, locally."""
    world = calendar
    lab = PositionCookie(world.state().secret.encode())
    async with aiohttp.ClientSession(url(world, AP), cookie_jar=aiohttp.DummyCookieJar()) as c:
        for region, honoured in ((EU, False), (AP, True)):
            cookie = lab.issue(FAR_FUTURE, region)
            started = time.monotonic()
            async with c.get("/events", headers={"Cookie": f"{POS}={cookie}"}) as r:
                elapsed = time.monotonic() - started
                assert r.status in (200, 401), await r.text()
                forwarded = POS in r.cookies
            assert forwarded is honoured, (region, elapsed)
            if not honoured:
                assert elapsed < 0.25, elapsed


# ---- the fallback path (primary app down, writes run here over the ocean) -----------------


async def test_a_claim_held_by_a_cut_link_does_not_block_its_key(healed, primary_app_down):
    """The fallback's claim is sent over a warm connection, then held by the cut: the answer
    may not say "nothing was changed", and after the heal a retry with the key runs it once,
    without waiting out the 60 s takeover."""
    world = primary_app_down
    async with user(world) as c:
        await login(c, f"held-{uuid.uuid4().hex[:6]}")
        await warm_the_fallback(c)
        title, key = f"held {uuid.uuid4()}", str(uuid.uuid4())
        world.link("cut", PRIMARY, EU)
        try:
            status, headers, body, _ = await post_event(c, title, key)
        finally:
            world.link("heal", PRIMARY, EU)
        assert status == 504, (status, body)
        assert headers.get("Idempotency-Key") == key
        status, body, _, answers = await retry_until_done(c, title, key, within_s=DEADLINE_S * 3)
        assert status == 201, (answers, body)
    assert count_events(world, title) == 1


async def test_a_503_says_nothing_was_changed_only_when_nothing_was_sent(healed, calendar):
    """Cut, then reset (no live connection across the link is left, and the pool cannot
    refill across a cut link): the write cannot have left eu-west, so the 503 is true: after
    the heal nothing has run, and the key runs it."""
    world = calendar
    async with user(world) as c:
        await login(c, f"ro-{uuid.uuid4().hex[:6]}")
        title = f"ro {uuid.uuid4()}"
        # Cut first: after a reset alone the pool refills itself within a second, and a write
        # on a refilled connection over the cut may have been sent (a 504, rightly).
        world.link("cut", PRIMARY, EU)
        try:
            # Twice: a connection a pool was opening during the first reset is caught by the
            # second.
            for _ in range(2):
                world.link("reset", PRIMARY, EU)
                await asyncio.sleep(0.5)  # the resets reach both ends
            # No key of its own: a request that brings one may have run before.
            status, headers, body, _ = await post_event(c, title)
            assert status == 503 and body.get("read_only") is True, (status, body)
            key = headers["Idempotency-Key"]
            assert body["idempotency_key"] == key
        finally:
            world.link("heal", PRIMARY, EU)
        await asyncio.sleep(1.0)
        assert count_events(world, title) == 0
        status, body, _, answers = await retry_until_done(c, title, key, within_s=DEADLINE_S * 3)
        assert status == 201, (answers, body)
    assert count_events(world, title) == 1


async def test_a_fallback_reset_mid_sql_answers_with_the_key_and_runs_once(
    healed, primary_app_down
):
    world = primary_app_down
    async with user(world) as c:
        await login(c, f"midsql-{uuid.uuid4().hex[:6]}")
        await warm_the_fallback(c)
        title, key = f"midsql {uuid.uuid4()}", str(uuid.uuid4())

        async def reset_soon():
            # the claim takes one round trip (150 ms); the app's eight statements take more
            await asyncio.sleep(0.45)
            await asyncio.to_thread(world.link, "reset", PRIMARY, EU)

        resetter = asyncio.create_task(reset_soon())
        status, headers, body, _ = await post_event(c, title, key)
        await resetter
        if status != 201:
            assert status in (503, 504), (status, body)
            assert headers.get("Idempotency-Key") == key, headers
            status, body, _, answers = await retry_until_done(c, title, key, DEADLINE_S * 4)
            assert status == 201, (answers, body)
    assert count_events(world, title) == 1


async def test_a_slow_fallback_write_answers_within_the_deadline(healed, primary_app_down):
    """At 600 ms RTT the fallback's dozen round trips take about 7 s: the client hears within
    `deadline_s`, and the key then answers with the write's outcome."""
    world = primary_app_down
    async with user(world) as c:
        await login(c, f"slow-{uuid.uuid4().hex[:6]}")
        title, key = f"slow {uuid.uuid4()}", str(uuid.uuid4())
        world.link("set", PRIMARY, EU, rtt_ms=600)
        started = time.monotonic()
        status, headers, body, _ = await post_event(c, title, key)
        elapsed = time.monotonic() - started
        assert elapsed < DEADLINE_S + 0.6, (elapsed, status, body)
        assert status == 504 and headers.get("Idempotency-Key") == key, (status, body)
        status, body, _, answers = await retry_until_done(c, title, key, within_s=20)
        assert status == 201, (answers, body)
    assert count_events(world, title) == 1


async def test_a_concurrent_duplicate_in_the_fallback_is_a_504_not_a_503(healed, primary_app_down):
    """While the first attempt holds the key, a duplicate must not be told "nothing was
    changed": the first may yet commit."""
    world = primary_app_down
    async with user(world) as c:
        await login(c, f"dup-{uuid.uuid4().hex[:6]}")
        title, key = f"dup {uuid.uuid4()}", str(uuid.uuid4())
        world.link("set", PRIMARY, EU, rtt_ms=600)
        first = asyncio.create_task(post_event(c, title, key))
        await asyncio.sleep(0.8)
        status, headers, body, _ = await post_event(c, title, key)
        assert status == 504, (status, body)
        assert headers.get("Idempotency-Key") == key
        await first
        world.link("set", PRIMARY, EU, rtt_ms=125)
        status, body, _, answers = await retry_until_done(c, title, key, within_s=20)
        assert status == 201, (answers, body)
    assert count_events(world, title) == 1


# ---- reads during a cut -------------------------------------------------------------------


async def test_a_read_that_can_only_be_stale_says_so(healed, calendar):
    """The replica is behind the client's last write and the primary is out of reach: the
    replica's answer is served, marked stale; a current read is not marked."""
    world = calendar
    lab = PositionCookie(world.state().secret.encode())
    async with aiohttp.ClientSession(url(world, EU), cookie_jar=aiohttp.DummyCookieJar()) as c:
        async with c.get("/events") as r:
            assert r.status == 401
            assert "Latitude-Stale" not in r.headers
        world.link("cut", PRIMARY, EU)
        started = time.monotonic()
        headers = {"Cookie": f"{POS}={lab.issue(FAR_FUTURE, EU)}"}
        async with c.get("/events", headers=headers) as r:
            assert r.status == 401, await r.text()
            assert r.headers.get("Latitude-Stale") == "replica", dict(r.headers)
        assert time.monotonic() - started < DEADLINE_S + 1.5


# ---- the link-fault writer, short (the >= 1,000-write run is benchmarks/bench_faults.py) ----


@pytest.mark.slow
@pytest.mark.timeout(600)
async def test_careful_writers_through_random_link_faults_lose_double_and_misread_nothing(
    healed, calendar
):
    from latitude.lab.faults import run_fault_writer

    world = calendar
    seed = int(time.time())
    try:
        tally = await run_fault_writer(
            world,
            writes=150,
            users=6,
            primary=PRIMARY,
            region=EU,
            kills=1,
            seed=seed,
            progress=print,
        )
    finally:
        wait_healthy(world, PRIMARY)
    report = tally.as_dict()
    print(json.dumps(report, indent=1))
    assert tally.acked >= 140, report  # a run that wrote nothing would prove nothing
    assert sum(tally.faults.values()) >= 5, report
    assert (tally.lost, tally.doubled, tally.stale, tally.bad_5xx) == (0, 0, 0, 0), report
    assert (tally.keyless, tally.unfinished, tally.no_answer) == (0, 0, 0), report
    assert tally.task_destroyed_logged == 0, report
