"""The primary's replay cache of forwarded requests' nonces, in the lab's real primary Postgres:
recorded in the eager claim's own statement or on its own, refused when seen before, purged
when expired, and replicated with the claims (so a promotion keeps it)."""

from __future__ import annotations

import asyncio
import time
import uuid

import psycopg
import pytest

from latitude.claims import NONCE_INSERT, NONCES
from latitude.idempotency import IdempotencyStore, Outcome
from latitude.outcome_store import NonceRecord, NonceUsed


@pytest.fixture(scope="module")
def databases(world) -> dict[str, str]:
    return {r["role"]: r["database_url"] for r in world.status()["regions"]}


@pytest.fixture
async def store(databases):
    s = await IdempotencyStore.open(databases["primary"], max_size=12)
    await s.ensure_schema()
    yield s
    await s.close()


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


async def test_a_retried_statement_finds_the_nonce_its_own(databases, name):
    """The store sends a statement again when its connection broke, and the first may have
    committed: the same runner's nonce is its own, another runner's is a replay."""
    async with await psycopg.AsyncConnection.connect(databases["primary"], autocommit=True) as c:
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


async def test_the_nonces_reach_the_replicas_with_the_claims(store, databases, name):
    """Replicated like the claims: a replica promoted to primary knows the nonces the old
    primary recorded, so a request replayed to the new primary is refused there too."""
    assert (await store.begin(f"{name}-k", "h", nonce=NonceRecord(name, 60))).outcome is Outcome.NEW
    deadline = time.monotonic() + 10
    async with await psycopg.AsyncConnection.connect(databases["replica"], autocommit=True) as c:
        while True:
            cur = await c.execute(f"select count(*) from {NONCES} where nonce = %s", (name,))
            if (await cur.fetchone())[0] == 1:
                break
            assert time.monotonic() < deadline, "the nonce never reached the replica"
            await asyncio.sleep(0.05)
