"""Idempotency outcomes, and the replay cache of nonces beside them, in the lab's real primary
Postgres."""

from __future__ import annotations

import asyncio
import time
import uuid

import psycopg
import pytest
from psycopg import sql
from psycopg_pool import AsyncConnectionPool

from latitude.claims import NONCE_INSERT, NONCES
from latitude.idempotency import (
    TABLE,
    Claim,
    IdempotencyStore,
    IdempotencyUnavailable,
    Outcome,
)
from latitude.outcome_store import NonceRecord, NonceUsed

HEADERS = [
    ("content-type", "application/json"),
    ("set-cookie", "a=1"),
    ("set-cookie", "b=2"),  # repeated names and their order are kept
    ("x-latitude-note", "caf\xe9"),  # latin-1, as HTTP carries it
]
BODY = b'{"id": 7}\x00\xff\xfe binary tail'


@pytest.fixture(scope="module")
def primary_dsn(world) -> str:
    (primary,) = [r for r in world.status()["regions"] if r["role"] == "primary"]
    return primary["database_url"]


@pytest.fixture
async def store(primary_dsn):
    s = await IdempotencyStore.open(primary_dsn, max_size=12)
    await s.ensure_schema()
    yield s
    await s.close()


@pytest.fixture
def prefix() -> str:
    return f"test-{uuid.uuid4()}-"


async def test_new_complete_replay_identical_bytes(store, prefix):
    key = prefix + "k"
    claim = await store.begin(key, "hash-a")
    assert claim.outcome is Outcome.NEW and not claim.taken_over and claim.started_at
    # Nothing stored yet: a duplicate now is a concurrent one.
    assert (await store.begin(key, "hash-a")).outcome is Outcome.IN_PROGRESS

    assert await store.complete(key, 201, HEADERS, BODY, claim=claim)
    replay = await store.begin(key, "hash-a")
    assert replay.outcome is Outcome.REPLAY
    assert replay.status == 201
    assert replay.headers == HEADERS
    assert replay.body == BODY and type(replay.body) is bytes
    assert replay.asgi_headers()[3] == (b"x-latitude-note", b"caf\xe9")

    # Completed once: a second completion (e.g. a late duplicate) changes nothing.
    assert not await store.complete(key, 500, [], b"other")
    assert (await store.begin(key, "hash-a")).body == BODY


async def test_asgi_byte_headers_are_accepted(store, prefix):
    key = prefix + "bytes"
    await store.begin(key, "h")
    assert await store.complete(key, 200, [(b"content-type", b"text/plain")], memoryview(b"ok"))
    replay = await store.begin(key, "h")
    assert replay.headers == [("content-type", "text/plain")] and replay.body == b"ok"


async def test_concurrent_begin_exactly_one_new(store, prefix):
    key = prefix + "race"
    claims = await asyncio.gather(*(store.begin(key, "same") for _ in range(10)))
    outcomes = [c.outcome for c in claims]
    assert outcomes.count(Outcome.NEW) == 1
    assert set(outcomes) <= {Outcome.NEW, Outcome.IN_PROGRESS, Outcome.REPLAY}

    # Racing with the winner's completion: still exactly one run, the rest see it running
    # or completed.
    key2 = prefix + "race-complete"

    async def begin_and_complete_if_new() -> Claim:
        claim = await store.begin(key2, "same")
        if claim.outcome is Outcome.NEW:
            await store.complete(key2, 200, HEADERS, BODY, claim=claim)
        return claim

    claims = await asyncio.gather(*(begin_and_complete_if_new() for _ in range(10)))
    outcomes = [c.outcome for c in claims]
    assert outcomes.count(Outcome.NEW) == 1
    assert set(outcomes) <= {Outcome.NEW, Outcome.IN_PROGRESS, Outcome.REPLAY}
    assert all(c.body == BODY for c in claims if c.outcome is Outcome.REPLAY)


async def test_same_key_other_request_is_a_mismatch(store, prefix):
    key = prefix + "m"
    await store.begin(key, "body-1")
    assert (await store.begin(key, "body-2")).outcome is Outcome.MISMATCH  # while running
    await store.complete(key, 200, HEADERS, BODY)
    mismatch = await store.begin(key, "body-2")  # and once completed
    assert mismatch.outcome is Outcome.MISMATCH and mismatch.body == b"" and mismatch.status is None


async def test_abandon_lets_a_retry_run(store, prefix):
    key = prefix + "a"
    claim = await store.begin(key, "h")
    assert await store.abandon(key, claim=claim)
    assert not await store.abandon(key)  # nothing left to abandon
    retry = await store.begin(key, "h")
    assert retry.outcome is Outcome.NEW and not retry.taken_over
    # A completed outcome cannot be abandoned.
    await store.complete(key, 200, [], b"done")
    assert not await store.abandon(key)
    assert (await store.begin(key, "h")).outcome is Outcome.REPLAY


async def test_stale_running_claim_is_taken_over(store, prefix):
    key = prefix + "stale"
    dead = await store.begin(key, "h")
    assert dead.outcome is Outcome.NEW
    assert (await store.begin(key, "h", stale_after_s=60)).outcome is Outcome.IN_PROGRESS
    await asyncio.sleep(0.6)

    # Several gateways notice at once: exactly one takes the claim over.
    claims = await asyncio.gather(*(store.begin(key, "h", stale_after_s=0.5) for _ in range(5)))
    takers = [c for c in claims if c.outcome is Outcome.NEW]
    assert len(takers) == 1 and takers[0].taken_over
    assert {c.outcome for c in claims} == {Outcome.NEW, Outcome.IN_PROGRESS}
    taker = takers[0]
    assert taker.started_at > dead.started_at

    # The presumed-dead runner wakes up: its claim is no longer the row's, nothing is stored.
    assert not await store.complete(key, 500, [], b"late", claim=dead)
    assert not await store.abandon(key, claim=dead)
    assert await store.complete(key, 201, HEADERS, BODY, claim=taker)
    replay = await store.begin(key, "h", stale_after_s=0.5)
    assert replay.outcome is Outcome.REPLAY and replay.status == 201 and replay.body == BODY

    # A stale claim with another request hash is still a mismatch, never taken over.
    other = prefix + "stale-other"
    await store.begin(other, "h")
    await asyncio.sleep(0.6)
    assert (await store.begin(other, "x", stale_after_s=0.5)).outcome is Outcome.MISMATCH


async def test_outcome_survives_a_new_store_instance(primary_dsn, prefix):
    key = prefix + "restart"
    first = await IdempotencyStore.open(primary_dsn)
    await first.ensure_schema()
    claim = await first.begin(key, "h")
    await first.complete(key, 202, HEADERS, BODY, claim=claim)
    await first.close()  # the gateway restarts

    second = await IdempotencyStore.open(primary_dsn)
    try:
        replay = await second.begin(key, "h")
        assert (replay.outcome, replay.status, replay.headers, replay.body) == (
            Outcome.REPLAY,
            202,
            HEADERS,
            BODY,
        )
    finally:
        await second.close()


async def test_caller_owned_pool_is_left_open(primary_dsn, prefix):
    pool = AsyncConnectionPool(primary_dsn, min_size=1, max_size=2, open=False)
    await pool.open(wait=True)
    try:
        store = IdempotencyStore(pool)  # a non-autocommit pool works too
        await store.ensure_schema()
        assert (await store.begin(prefix + "p", "h")).outcome is Outcome.NEW
        await store.close()
        assert not pool.closed
        async with pool.connection() as conn:
            cur = await conn.execute(f"select state from {TABLE} where key = %s", (prefix + "p",))
            assert await cur.fetchone() == ("running",)
    finally:
        await pool.close()


async def test_purge_deletes_old_rows_only(store, prefix, primary_dsn):
    old, fresh = prefix + "old", prefix + "fresh"
    for key in (old, fresh):
        await store.begin(key, "h")
        await store.complete(key, 200, [], b"")
    async with await psycopg.AsyncConnection.connect(primary_dsn, autocommit=True) as conn:
        await conn.execute(
            f"update {TABLE} set created_at = now() - interval '2 days' where key = %s", (old,)
        )
    assert await store.purge(86400) >= 1
    assert (await store.begin(old, "h")).outcome is Outcome.NEW
    assert (await store.begin(fresh, "h")).outcome is Outcome.REPLAY


async def test_bad_arguments(store):
    for key in ("", "has space", "x" * 256, "caf\xe9"):
        with pytest.raises(ValueError, match="idempotency key"):
            await store.begin(key, "h")
    with pytest.raises(ValueError, match="request_hash"):
        await store.begin("k", "")
    with pytest.raises(ValueError, match="stale_after_s"):
        await store.begin("k", "h", stale_after_s=0)


async def test_unreachable_database_is_reported():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(IdempotencyUnavailable, match="cannot connect"):
        await IdempotencyStore.open(f"postgresql://x@127.0.0.1:{port}/x", timeout_s=1)


async def test_a_claim_sent_again_after_a_broken_connection_finds_itself(store, prefix):
    """`_retrying` sends a claim again when its connection broke, and the first may have
    committed: the same call's claim (its runner token) is its own, not a run in progress;
    another call's is still in progress, and neither has run anything."""
    key = prefix + "again"
    first = await store._begin_once(key, "h", 60.0, None, None, None, "call-1")
    again = await store._begin_once(key, "h", 60.0, None, None, None, "call-1")
    assert first.outcome is again.outcome is Outcome.NEW
    assert again.started_at == first.started_at and not again.taken_over
    other = await store._begin_once(key, "h", 60.0, None, None, None, "call-2")
    assert other.outcome is Outcome.IN_PROGRESS
    assert (await store.begin(key, "h")).outcome is Outcome.IN_PROGRESS


async def test_a_claim_that_arrives_after_its_deadline_claims_nothing(store, prefix, primary_dsn):
    """A claim held up (a cut link delivers it on heal) after its sender gave up must not take
    the key: nothing would ever complete it."""
    import time

    from latitude.idempotency import ClaimTooLate

    key = prefix + "late"
    with pytest.raises(ClaimTooLate, match="after its deadline"):
        await store.begin(key, "h", not_after=time.time() - 0.5)
    with psycopg.connect(primary_dsn) as conn:
        assert conn.execute(f"select 1 from {TABLE} where key = %s", (key,)).fetchone() is None
    claim = await store.begin(key, "h", not_after=time.time() + 5)  # in time: claimed
    assert claim.outcome is Outcome.NEW
    assert await store.complete(key, 201, HEADERS, BODY, claim=claim)
    replay = await store.begin(key, "h", not_after=time.time() - 0.5)  # replays stay readable
    assert replay.outcome is Outcome.REPLAY and replay.position


async def test_no_connection_in_time_is_reported_as_not_sent():
    """The fallback's pool connects in the background; a call that gets no connection within
    its timeout sent nothing, and says so (the gateway may then answer "nothing was changed")."""
    import socket
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = await IdempotencyStore.open(
        f"postgresql://x@127.0.0.1:{port}/x", wait=False, connect_timeout_s=1
    )
    try:
        started = time.monotonic()
        with pytest.raises(IdempotencyUnavailable) as info:
            await store.begin("k", "h", timeout_s=0.5)
        assert info.value.sent is False
        assert time.monotonic() - started < 2  # one timeout, not one per pooled connection
    finally:
        await store.close()


async def test_purge_periodically_checks_its_arguments_and_reports_failures(store):
    for retention_s, every_s in ((0, 1), (1, 0), (-1, 1)):
        with pytest.raises(ValueError, match="must be positive"):
            await store.purge_periodically(retention_s, every_s)
    errors = []
    closed = await IdempotencyStore.open(
        "postgresql://x@127.0.0.1:9/x", wait=False, connect_timeout_s=1, timeout_s=0.2
    )
    task = asyncio.create_task(closed.purge_periodically(60, 0.1, on_error=errors.append))
    try:
        for _ in range(50):
            if len(errors) >= 2:  # it kept going after the first failure
                break
            await asyncio.sleep(0.1)
        assert len(errors) >= 2 and isinstance(errors[0], IdempotencyUnavailable)
    finally:
        task.cancel()
        await closed.close()


async def test_the_claim_does_not_wait_for_a_quorum_the_outcome_does(store, primary_dsn, prefix):
    """With quorum commit on, the claim commits locally (the run's own commit, later in the
    same WAL, waits for the quorum and carries the claim with it); the outcome waits. Here the
    quorum names a standby that does not exist, so any commit that waits never returns."""
    with psycopg.connect(primary_dsn, autocommit=True) as admin:
        before = admin.execute("show synchronous_standby_names").fetchone()[0]
        admin.execute("alter system set synchronous_standby_names = 'ANY 1 (nobody_here)'")
        admin.execute("select pg_reload_conf()")
        try:
            await asyncio.sleep(0.3)  # the reload reaches the backends
            claim = await asyncio.wait_for(store.begin(prefix + "q", "hash-q"), 5)
            assert claim.outcome is Outcome.NEW
            with pytest.raises(TimeoutError):  # the setting is in force: this one waits
                await asyncio.wait_for(store.complete(prefix + "q", 201, HEADERS, BODY), 1.5)
        finally:
            if before:
                admin.execute(
                    sql.SQL("alter system set synchronous_standby_names = {}").format(
                        sql.Literal(before)
                    )
                )
            else:
                admin.execute("alter system reset synchronous_standby_names")
            admin.execute("select pg_reload_conf()")


# A gateway process that claims three keys and then hangs until it is killed: one claim
# running (its run never committed), one whose run committed (the fence), one made in the
# app's own transaction (`claim_statement`, committed).
_DYING_RUNNER = r"""
import asyncio, sys
import psycopg
from latitude.claims import claim_statement, fence_statement
from latitude.idempotency import IdempotencyStore

async def main(dsn, prefix):
    store = await IdempotencyStore.open(dsn, hold_liveness=True)
    assert store.owner, "no liveness lock"
    await store.begin(prefix + "running", "h")
    committed = await store.begin(prefix + "committed", "h")
    with psycopg.connect(dsn) as conn:
        sql, params = fence_statement(committed.key, committed.started_at)
        assert conn.execute(sql, params).fetchone()[0] == 1
        conn.commit()
        sql, params = claim_statement(prefix + "in-tx", "h", "run-1", owner=store.owner)
        assert conn.execute(sql, params).fetchone()[0] == 1
        conn.commit()
    print(store.owner, flush=True)
    await asyncio.sleep(600)

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


async def test_claims_of_a_killed_process_are_taken_over_at_once(primary_dsn, prefix):
    """The primary's gateway is killed mid-run: a retry must not wait `stale_after_s` (60 s)
    for claims nobody will complete. While the process lives its claims hold; once it is
    SIGKILLed, its never-committed claim is taken over and its committed ones are settled as
    "answer lost" on the first try."""
    import signal
    import subprocess
    import sys

    child = subprocess.Popen(
        [sys.executable, "-c", _DYING_RUNNER, primary_dsn, prefix],
        stdout=subprocess.PIPE,
        text=True,
    )
    store = await IdempotencyStore.open(primary_dsn, hold_liveness=True)
    try:
        owner = await asyncio.wait_for(asyncio.to_thread(child.stdout.readline), 30)
        assert owner.strip().isdigit(), f"the runner did not start (exit {child.poll()})"
        assert store.owner and str(store.owner) != owner.strip()
        for name in ("running", "committed", "in-tx"):
            assert (await store.begin(prefix + name, "h")).outcome is Outcome.IN_PROGRESS

        child.send_signal(signal.SIGKILL)
        child.wait(10)
        # The database notices the closed connections within moments, not a minute.
        for _ in range(50):
            claim = await store.begin(prefix + "running", "h")
            if claim.outcome is not Outcome.IN_PROGRESS:
                break
            await asyncio.sleep(0.1)
        assert claim.outcome is Outcome.NEW and claim.taken_over
        for name in ("committed", "in-tx"):
            settled = await store.begin(prefix + name, "h")
            assert (settled.outcome, settled.status) == (Outcome.REPLAY, 409), name
        # The taken claim is this (live) process's now: a duplicate waits for it.
        assert (await store.begin(prefix + "running", "h")).outcome is Outcome.IN_PROGRESS
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)
        child.stdout.close()
        await store.close()


async def test_a_store_without_the_lock_claims_without_an_owner(store, primary_dsn, prefix):
    claim = await store.begin(prefix + "anon", "h")
    assert claim.outcome is Outcome.NEW and store.owner is None
    with psycopg.connect(primary_dsn) as conn:
        row = conn.execute(f"select owner from {TABLE} where key = %s", (prefix + "anon",))
        assert row.fetchone() == (None,)


def _lock_held(dsn: str, owner: int) -> bool:
    from latitude.claims import LIVENESS_LOCK_CLASS

    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "select count(*) from pg_locks where locktype = 'advisory' and classid = %s "
            "and objid = %s and objsubid = 2",
            (LIVENESS_LOCK_CLASS, owner),
        ).fetchone()
    return row[0] == 1


async def _until(predicate, timeout_s: float) -> float:
    started = asyncio.get_running_loop().time()
    while not await asyncio.to_thread(predicate):
        if asyncio.get_running_loop().time() - started > timeout_s:
            raise AssertionError(f"not within {timeout_s} s")
        await asyncio.sleep(0.1)
    return asyncio.get_running_loop().time() - started


async def test_a_process_cut_off_by_a_link_loses_its_lock_and_gets_it_back(healed, primary_dsn):
    """The fallback holds its lock over the ocean, where a cut closes nothing: the database
    must end the quiet session itself (idle_session_timeout), and the lock comes back, with the
    same owner id, once the link heals."""
    from latitude.lab.postgres import database_url
    from latitude.liveness import RunnerLiveness

    world = healed
    primary = world.topology().primary.name
    other = next(r.name for r in world.topology().regions if r.name != primary)
    over_the_ocean = database_url(world.state().relay_port(other, primary, "pg"))
    liveness = RunnerLiveness(over_the_ocean, check_every_s=0.3, idle_timeout_s=1.5)
    await liveness.start()
    try:
        owner = liveness.owner
        assert owner and _lock_held(primary_dsn, owner)
        world.link("cut", primary, other)
        try:
            gone_after = await _until(lambda: not _lock_held(primary_dsn, owner), 10)
        finally:
            world.link("heal", primary, other)
        assert gone_after >= 0.5, "the lock went before the database could have noticed"
        await _until(lambda: liveness.owner == owner and _lock_held(primary_dsn, owner), 15)
    finally:
        await liveness.close()
    await _until(lambda: not _lock_held(primary_dsn, owner), 5)  # the backend ends after close


def test_liveness_checks_its_timings():
    from latitude.liveness import RunnerLiveness

    with pytest.raises(ValueError, match="check_every_s"):
        RunnerLiveness("postgresql://x", check_every_s=5, idle_timeout_s=5)


# ---- a database that refuses connections says so at once ----------------------------------


async def test_a_database_that_refuses_connections_is_told_without_waiting_the_timeout():
    """Nothing listens at the port: with `fail_fast_when_refused` the claim fails as soon as the
    pool's first attempt is refused (naming the refusal; nothing sent), where the plain store
    waits out its timeout (PoolTimeout)."""
    import socket

    from latitude.lab.ports import free_port

    port = free_port()
    with socket.socket() as probe:  # nobody there
        assert probe.connect_ex(("127.0.0.1", port)) != 0
    dsn = f"postgresql://app@127.0.0.1:{port}/app"
    for fail_fast, said in ((True, "refuses connections"), (False, "PoolTimeout")):
        store = await IdempotencyStore.open(
            dsn, wait=False, max_size=2, fail_fast_when_refused=fail_fast
        )
        try:
            for _ in range(2):  # the first (before any attempt) and one after
                with pytest.raises(IdempotencyUnavailable) as caught:
                    await store.begin(f"refused-{uuid.uuid4()}", "h", timeout_s=1.0)
                assert said in str(caught.value) and caught.value.sent is False
        finally:
            await store.close()


async def test_a_silent_database_is_waited_for_and_a_live_one_used(primary_dsn, prefix):
    """A server that accepts and never answers is not a refusal: the wait is the timeout.
    Against the real database the fail-fast store claims as usual and gives its connection
    back."""
    import socket

    silent = socket.create_server(("127.0.0.1", 0))
    try:
        dsn = f"postgresql://app@127.0.0.1:{silent.getsockname()[1]}/app?connect_timeout=5"
        store = await IdempotencyStore.open(dsn, wait=False, fail_fast_when_refused=True)
        try:
            with pytest.raises(IdempotencyUnavailable, match="PoolTimeout"):
                await store.begin(prefix + "silent", "h", timeout_s=0.5)
        finally:
            await store.close()
    finally:
        silent.close()
    store = await IdempotencyStore.open(primary_dsn, max_size=2, fail_fast_when_refused=True)
    try:
        claims = [await store.begin(prefix + f"live-{i}", "h", timeout_s=2) for i in range(5)]
        assert [c.outcome for c in claims] == [Outcome.NEW] * 5
        assert store.pool.get_stats()["pool_available"] >= 1  # given back, not leaked
    finally:
        await store.close()


# ---- the replay cache of forwarded requests' nonces, beside the claims: recorded in the eager
# claim's own statement or on its own, refused when seen before, purged when expired, and
# replicated with the claims (so a promotion keeps it).


@pytest.fixture
def name() -> str:
    return f"lab-1:test-{uuid.uuid4()}"


async def test_a_claim_records_its_nonce_and_a_replay_of_it_claims_nothing(store, name):
    first = await store.begin(f"{name}-a", "h", nonce=NonceRecord(name, 30))
    assert first.outcome is Outcome.NEW
    with pytest.raises(NonceUsed):
        await store.begin(f"{name}-b", "h", nonce=NonceRecord(name, 30))
    # The replay left its key untouched: the key is anyone's to claim.
    assert (await store.begin(f"{name}-b", "h")).outcome is Outcome.NEW
    assert not await store.record_nonce(NonceRecord(name, 30))


async def test_a_nonce_recorded_on_its_own_is_refused_to_a_claim(store, name):
    assert await store.record_nonce(NonceRecord(name, 30))
    assert not await store.record_nonce(NonceRecord(name, 30))
    with pytest.raises(NonceUsed):
        await store.begin(f"{name}-k", "h", nonce=NonceRecord(name, 30))


async def test_of_two_claims_with_one_nonce_exactly_one_gets_through(store, name):
    results = await asyncio.gather(
        *(store.begin(f"{name}-{i}", "h", nonce=NonceRecord(name, 30)) for i in range(8)),
        return_exceptions=True,
    )
    claimed = [r for r in results if not isinstance(r, BaseException)]
    assert len(claimed) == 1 and claimed[0].outcome is Outcome.NEW, results
    assert all(isinstance(r, NonceUsed) for r in results if r not in claimed), results


async def test_a_retried_statement_finds_the_nonce_its_own(primary_dsn, name):
    """The store sends a statement again when its connection broke, and the first may have
    committed: the same runner's nonce is its own, another runner's is a replay."""
    async with await psycopg.AsyncConnection.connect(primary_dsn, autocommit=True) as c:
        for runner, fresh in (("run-1", True), ("run-1", True), ("run-2", False)):
            cur = await c.execute(NONCE_INSERT, (name, runner, 30.0))
            assert (await cur.fetchone() is not None) is fresh, runner


async def test_expired_nonces_are_purged_and_live_ones_kept(store, name):
    assert await store.record_nonce(NonceRecord(f"{name}-short", 0.05))
    assert await store.record_nonce(NonceRecord(f"{name}-long", 60))
    await asyncio.sleep(0.2)
    assert await store.purge_nonces() >= 1
    assert await store.record_nonce(NonceRecord(f"{name}-short", 30))  # forgotten: new again
    assert not await store.record_nonce(NonceRecord(f"{name}-long", 60))


async def test_the_nonces_reach_the_replicas_with_the_claims(store, world, name):
    """Replicated like the claims: a replica promoted to primary knows the nonces the old
    primary recorded, so a request replayed to the new primary is refused there too."""
    assert (await store.begin(f"{name}-k", "h", nonce=NonceRecord(name, 60))).outcome is Outcome.NEW
    (replica, *_) = [r for r in world.status()["regions"] if r["role"] == "replica"]
    deadline = time.monotonic() + 10
    async with await psycopg.AsyncConnection.connect(replica["database_url"], autocommit=True) as c:
        while True:
            cur = await c.execute(f"select count(*) from {NONCES} where nonce = %s", (name,))
            if (await cur.fetchone())[0] == 1:
                break
            assert time.monotonic() < deadline, "the nonce never reached the replica"
            await asyncio.sleep(0.05)
