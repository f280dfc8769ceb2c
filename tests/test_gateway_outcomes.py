"""The primary's gateway keeps its idempotency bookkeeping: old outcomes are purged on a
schedule, a run whose claim was taken over cannot store its outcome over its successor's, and
with `idempotency_claim = "in_transaction"` the claim rides in the app's own transaction.

An in-process `RegionGateway` for the lab's primary region (its real Postgres and Valkey), fed
forwarded requests signed exactly as a replica's gateway signs them."""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import psycopg
import pytest

from latitude.gateway import GatewayConfig, RegionGateway
from latitude.gateway.config import GatewayConfigError
from latitude.gateway.envelope import SIGNED_REQUEST_HEADERS
from latitude.idempotency import TABLE, IdempotencyStore, IdempotencyUnavailable, Outcome
from latitude.signing import content_digest, sign_request
from latitude.topology import load_topology

PRIMARY, EU = "us-west", "eu-west"
HOST = "primary.internal"


def primary_config(world, **overrides) -> GatewayConfig:
    env = world.region_env(PRIMARY)
    topology = load_topology(env["LATITUDE_TOPOLOGY"], environ=env)
    return GatewayConfig.from_topology(topology, PRIMARY, environ=env, **overrides)


def primary_dsn(world) -> str:
    return next(r["database_url"] for r in world.status()["regions"] if r["name"] == PRIMARY)


async def call(gateway, config, key: str, body: bytes) -> tuple[int, bytes]:
    """One forwarded POST /things, signed as eu-west's gateway signs it."""
    headers = [
        ("content-type", "application/json"),
        ("forwarded", f"for=127.0.0.1;proto=http;host={HOST}"),
        ("idempotency-key", key),
        ("content-digest", content_digest(body)),
        ("latitude-session-length", "0"),
        ("latitude-forwarded-from", EU),
    ]
    signature = sign_request(
        config.keyring,
        method="POST",
        url=f"http://{HOST}/things",
        headers=headers,
        covered=SIGNED_REQUEST_HEADERS,
    )
    headers += [(k.lower(), v) for k, v in signature.items()]
    headers += [("host", HOST), ("content-length", str(len(body)))]
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/things",
        "raw_path": b"/things",
        "query_string": b"",
        "scheme": "http",
        "client": ("127.0.0.1", 40000),
        "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers],
    }
    sent = [{"type": "http.request", "body": body, "more_body": False}]
    answer: dict = {"status": None, "body": b""}

    async def receive():
        return sent.pop() if sent else {"type": "http.disconnect"}

    async def send(message):
        if message["type"] == "http.response.start":
            answer["status"] = message["status"]
        elif message["type"] == "http.response.body":
            answer["body"] += message.get("body", b"")

    await gateway(scope, receive, send)
    return answer["status"], answer["body"]


async def test_outcomes_older_than_the_retention_are_purged_on_a_schedule(world):
    config = primary_config(world, idempotency_retention_s=3600, idempotency_purge_every_s=0.2)
    prefix = f"purge-{uuid.uuid4()}-"
    async with await IdempotencyStore.open(primary_dsn(world), max_size=1) as store:
        await store.ensure_schema()
    async with await psycopg.AsyncConnection.connect(primary_dsn(world), autocommit=True) as db:
        for name, age_s in (("old", 7200), ("recent", 60)):
            await db.execute(
                f"insert into {TABLE} (key, request_hash, state, created_at) "
                "values (%s, 'h', 'completed', now() - make_interval(secs => %s))",
                (prefix + name, age_s),
            )

        async def keys() -> set[str]:
            cur = await db.execute(f"select key from {TABLE} where key like %s", (prefix + "%",))
            return {row[0].removeprefix(prefix) for row in await cur.fetchall()}

        gateway = RegionGateway(lambda *a: None, config)
        await gateway.startup()
        try:
            deadline = time.monotonic() + 10
            while "old" in await keys():
                assert time.monotonic() < deadline, "the old outcome was never purged"
                await asyncio.sleep(0.1)
            assert await keys() == {"recent"}
        finally:
            await gateway.shutdown()
            await db.execute(f"delete from {TABLE} where key like %s", (prefix + "%",))


def test_the_retention_is_configurable_and_checked(world):
    config = primary_config(world)
    assert config.idempotency_retention_s == 24 * 3600  # the default: a day
    assert primary_config(world, idempotency_retention_s=600).idempotency_retention_s == 600
    for bad in (0, -5, "soon"):
        with pytest.raises(GatewayConfigError, match="idempotency_retention_s"):
            primary_config(world, idempotency_retention_s=bad)


async def test_a_run_whose_claim_was_taken_over_does_not_store_its_outcome(world):
    """While the app runs, its claim goes stale and another runner takes the key over: the
    first run's answer still reaches its caller, but the row stays the successor's."""
    config = primary_config(world)
    key = f"takeover-{uuid.uuid4()}"
    dsn = primary_dsn(world)
    successor = {}

    async def app(scope, receive, send):
        await receive()
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as db:
            # The claim looks abandoned (older than the takeover time)...
            await db.execute(
                f"update {TABLE} set created_at = now() - interval '10 minutes' where key = %s",
                (key,),
            )
            cur = await db.execute(f"select request_hash from {TABLE} where key = %s", (key,))
            (request_hash,) = await cur.fetchone()
        # ...and a retry takes it over.
        async with await IdempotencyStore.open(dsn, max_size=1) as other:
            successor["claim"] = await other.begin(key, request_hash)
        await send(
            {
                "type": "http.response.start",
                "status": 201,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": json.dumps({"run": 1}).encode()})

    gateway = RegionGateway(app, config)
    await gateway.startup()
    try:
        status, body = await call(gateway, config, key, b'{"thing": 1}')
    finally:
        await gateway.shutdown()
    assert status == 201 and body.startswith(b'{"run": 1}'), (status, body)
    claim = successor["claim"]
    assert claim.outcome is Outcome.NEW and claim.taken_over
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as db:
        cur = await db.execute(f"select state, created_at from {TABLE} where key = %s", (key,))
        state, created_at = await cur.fetchone()
        await db.execute(f"delete from {TABLE} where key = %s", (key,))
    assert (state, created_at) == ("running", claim.started_at)


async def test_the_apps_transactions_are_fenced_by_the_claim(world):
    """Inside a claimed request each transaction on the primary marks the claim applied, with
    its writes; a run whose claim was taken over cannot commit, and an applied run is settled,
    not run again."""
    from sqlalchemy import text

    from latitude.db import AsyncRoutedEngines, ClaimLost, claimed, route_to_primary

    dsn = primary_dsn(world)
    engines = AsyncRoutedEngines(dsn, dsn)
    key = f"fence-{uuid.uuid4()}"
    async with await IdempotencyStore.open(dsn, max_size=2) as store:
        await store.ensure_schema()
        claim = await store.begin(key, "h")
        try:
            with route_to_primary(), claimed(key, claim.started_at):
                async with engines.engine().begin() as db:
                    await db.execute(text("create temp table fence_probe (x int)"))
            # Rolled back: the mark with it; the claim may be released (a retry may run it).
            with route_to_primary(), claimed(key, claim.started_at):
                async with engines.engine().connect() as db:
                    await db.execute(text("select 1"))
                    await db.rollback()
            async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
                cur = await conn.execute(f"select applied from {TABLE} where key = %s", (key,))
                assert (await cur.fetchone())[0] is True  # the committed one marked it
            # Applied: abandoning does not free the key for a second run; it is settled.
            assert not await store.abandon(key, claim=claim)
            replay = await store.begin(key, "h")
            assert replay.outcome is Outcome.REPLAY and replay.status == 409
            assert b"answer was lost" in replay.body

            # A run whose claim was taken over (another started_at) cannot commit anything.
            other = f"fence-{uuid.uuid4()}"
            mine = await store.begin(other, "h")
            async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
                await conn.execute(
                    f"update {TABLE} set created_at = now() - interval '2 minutes' where key = %s",
                    (other,),
                )
            successor = await store.begin(other, "h")
            assert successor.taken_over
            with pytest.raises(ClaimLost, match="taken over"):
                with route_to_primary(), claimed(other, mine.started_at):
                    async with engines.engine().begin() as db:
                        await db.execute(text("select 1"))
        finally:
            await engines.dispose()
            async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
                await conn.execute(f"delete from {TABLE} where key like 'fence-%%'")


class CountingConnection(psycopg.AsyncConnection):
    """A connection of the outcome store's pool that counts the statements sent on it: each
    one a round trip to the primary database."""

    sent: list[str] = []

    async def execute(self, *args, **kwargs):
        type(self).sent.append(str(args[0]))
        return await super().execute(*args, **kwargs)


async def counting_store(dsn: str) -> IdempotencyStore:
    from psycopg_pool import AsyncConnectionPool

    class Counting(CountingConnection):
        sent = []

    pool = AsyncConnectionPool(
        dsn,
        min_size=1,
        max_size=4,
        kwargs={"autocommit": True},
        connection_class=Counting,
        open=False,
    )
    pool.counter = Counting  # the test reads and resets it
    await pool.open(wait=True, timeout=10)
    store = IdempotencyStore(pool)
    await store.ensure_schema()
    return store


def probe_app(dsn: str, notes_table: str, *, hold_s: float = 0.0, fail_after: bool = False):
    """An app on `latitude.db` (async SQLAlchemy): one transaction inserts the request's body
    as a note (held open ``hold_s``), then it answers 201, or fails after its commit."""
    from sqlalchemy import text

    from latitude.db import AsyncRoutedEngines

    engines = AsyncRoutedEngines(dsn, dsn)

    async def app(scope, receive, send):
        message = await receive()
        async with engines.engine().begin() as db:
            await db.execute(
                text(f"insert into {notes_table} (note) values (:n)"),
                {"n": message.get("body", b"").decode()},
            )
            await asyncio.sleep(hold_s)
        if fail_after:
            raise RuntimeError("the app failed after its commit")
        await send(
            {
                "type": "http.response.start",
                "status": 201,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": b'{"created": true}'})

    app.engines = engines
    return app


@pytest.fixture
async def notes(world):
    dsn = primary_dsn(world)
    name = f"claim_notes_{uuid.uuid4().hex[:8]}"
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as db:
        await db.execute(f"create table {name} (id serial primary key, note text)")
    yield name
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as db:
        await db.execute(f"drop table {name}")


async def count_notes(dsn: str, table: str, note: bytes) -> int:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as db:
        cur = await db.execute(f"select count(*) from {table} where note = %s", (note.decode(),))
        return (await cur.fetchone())[0]


async def run_gateway(world, app, claim_mode: str, calls):
    """Start a primary gateway with ``claim_mode`` and a counting outcome store, run
    ``calls(gateway, config, counter)``, and stop everything."""
    dsn = primary_dsn(world)
    config = primary_config(world, idempotency_claim=claim_mode)
    store = await counting_store(dsn)
    gateway = RegionGateway(app, config, idempotency=store)
    await gateway.startup()
    try:
        return await calls(gateway, config, store.pool.counter)
    finally:
        await gateway.shutdown()
        await store.pool.close()
        await app.engines.dispose()


def statement_kind(sql: str) -> str:
    if "latitude_nonces" in sql:
        return "claim and nonce" if "latitude_idempotency" in sql else "nonce"
    return "outcome" if "completed" in sql else sql[:40]


async def test_a_claim_in_the_apps_transaction_sends_no_claim_of_its_own(world, notes):
    """Counted on the outcome store's connections: the eager claim sends two statements per
    first-time write (the claim with the request's nonce, the outcome), the claim in the app's
    transaction sends the nonce alone (before the app runs) and the outcome with its position;
    a retry after completion is replayed without a second note."""
    dsn = primary_dsn(world)
    trips = {}

    async def first_writes(mode):
        async def calls(gateway, config, counter):
            body = f'{{"mode": "{mode}", "n": "{uuid.uuid4()}"}}'.encode()
            key = f"trips-{uuid.uuid4()}"
            counter.sent.clear()
            assert (await call(gateway, config, key, body))[0] == 201
            # The purge the gateway runs at start-up (a delete) is not the write's.
            trips[mode] = [
                statement_kind(sql) for sql in counter.sent if not sql.startswith("delete from")
            ]
            status, answer = await call(gateway, config, key, body)  # the retry
            assert status == 201 and answer.startswith(b'{"created": true}'), (status, answer)
            assert await count_notes(dsn, notes, body) == 1
            assert gateway.counters["replayed"] == 1

        await run_gateway(world, probe_app(dsn, notes), mode, calls)

    await first_writes("eager")
    await first_writes("in_transaction")
    assert trips == {
        "eager": ["claim and nonce", "outcome"],
        "in_transaction": ["nonce", "outcome"],
    }


async def test_a_concurrent_duplicate_waits_for_the_first_transaction_and_is_refused(world, notes):
    """The duplicate's claim waits on the key's unique index while the first run's transaction
    is open, then finds the key the first run's: nothing of it is written, and it is answered
    409 (still running) or the first run's answer (already stored)."""
    dsn = primary_dsn(world)
    body = f'{{"dup": "{uuid.uuid4()}"}}'.encode()
    key = f"dup-{uuid.uuid4()}"

    async def calls(gateway, config, counter):
        first = asyncio.create_task(call(gateway, config, key, body))
        await asyncio.sleep(0.1)  # the first run holds its transaction open
        second = await call(gateway, config, key, body)
        return await first, second

    first, second = await run_gateway(
        world, probe_app(dsn, notes, hold_s=0.5), "in_transaction", calls
    )
    assert first[0] == 201, first
    assert second[0] in (409, 201), second
    if second[0] == 409:
        assert b"running" in second[1]
    assert await count_notes(dsn, notes, body) == 1


async def test_a_failure_after_the_claims_commit_is_settled_never_run_again(world, notes):
    dsn = primary_dsn(world)
    body = f'{{"boom": "{uuid.uuid4()}"}}'.encode()
    key = f"boom-{uuid.uuid4()}"

    async def calls(gateway, config, counter):
        return await call(gateway, config, key, body), await call(gateway, config, key, body)

    app = probe_app(dsn, notes, fail_after=True)
    failed, retried = await run_gateway(world, app, "in_transaction", calls)
    assert failed[0] == 500, failed
    assert retried[0] == 409 and b"answer was lost" in retried[1], retried
    assert await count_notes(dsn, notes, body) == 1


async def test_an_answer_lost_after_the_apps_commit_never_runs_twice(world, notes):
    """The hole of docs/gateway.md: the app committed (its claim with it), then the outcome
    could not be stored. A retry is refused in the app's transaction and answered 409 (still
    running), and once the claim is stale "Applied, but the answer was lost": never a second
    note."""
    dsn = primary_dsn(world)
    body = f'{{"lost": "{uuid.uuid4()}"}}'.encode()
    key = f"lost-{uuid.uuid4()}"

    async def calls(gateway, config, counter):
        store = gateway.idempotency
        real = store.complete_run

        async def unreachable(*args, **kwargs):
            raise IdempotencyUnavailable("the primary database went away after the commit")

        store.complete_run = unreachable
        lost = await call(gateway, config, key, body)
        store.complete_run = real
        running = await call(gateway, config, key, body)
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as db:
            await db.execute(
                f"update {TABLE} set created_at = now() - interval '2 minutes' where key = %s",
                (key,),
            )
        settled = await call(gateway, config, key, body)
        return lost, running, settled

    lost, running, settled = await run_gateway(
        world, probe_app(dsn, notes), "in_transaction", calls
    )
    assert lost[0] == 503, lost
    assert running[0] == 409 and b"running" in running[1], running
    assert settled[0] == 409 and b"answer was lost" in settled[1], settled
    assert await count_notes(dsn, notes, body) == 1
