"""The primary's replay cache of forwarded requests' nonces is its database: an eager claim
records its request's nonce in the claim's own statement (one round trip for both), any other
forwarded request records it while its body is read, and nothing of a request whose nonce is
not new is run, replayed or stored."""

from __future__ import annotations

import json

from latitude.gateway.envelope import IDEMPOTENCY_KEY


def resend(regions, sent: dict):
    """The same signed envelope again, straight to the primary (what an attacker on the link
    could do with a request it saw)."""
    return regions.link.send(
        sent["scope"]["method"],
        sent["scope"]["path"],
        [(k, v) for k, v in sent["scope"]["headers"] if k != b"host"],
        sent["body"],
        timeout_s=2.0,
    )


async def test_an_eager_claim_records_the_nonce_in_its_own_statement(regions):
    answer = await regions.request("POST", "/events", {"title": "one trip"})
    assert answer.status == 201, answer.body
    assert regions.outcomes.calls["begin"] == 1
    assert regions.outcomes.calls["record_nonce"] == 0  # no round trip of its own
    assert len(regions.outcomes.nonces) == 1


async def test_a_replayed_write_is_refused_and_never_gets_the_stored_answer(regions):
    first = await regions.request("POST", "/events", {"title": "stored-answer-7f3a"})
    assert first.status == 201 and b'"id": 1' in first.body
    sent = regions.link.sent[-1]
    key = dict(sent["scope"]["headers"])[IDEMPOTENCY_KEY].decode()
    replayed = await resend(regions, sent)
    assert replayed.status == 401, replayed.body
    assert b"nonce" in replayed.body and b'"id"' not in replayed.body  # not the stored answer
    assert regions.outcomes.rows[key].state == "completed"  # the stored answer is untouched
    assert regions.db.runs == 1 and regions.primary.counters["rejected"] == 1


async def test_a_replayed_write_whose_key_is_free_claims_nothing(regions):
    """A replay arriving after its key was released (the first run failed before any effect)
    must not claim the key: the client's own retry of it would find it taken."""
    answer = await regions.request("POST", "/boom", headers=[(IDEMPOTENCY_KEY, b"k-free")])
    assert answer.status == 500 and "k-free" not in regions.outcomes.rows
    replayed = await resend(regions, regions.link.sent[-1])
    assert replayed.status == 401, replayed.body
    assert "k-free" not in regions.outcomes.rows  # the key is still free for the real retry
    assert regions.db.runs == 0


async def test_a_forwarded_reads_nonce_is_recorded_before_it_runs(regions):
    """A read the replica forwards (its region is behind the writer) claims no key: its nonce
    has a round trip of its own, and a replay of it is refused."""
    await regions.request("POST", "/events", {"title": "x"})
    read = await regions.request("GET", "/events/1")  # waits its bound, then forwarded
    assert read.status == 200 and regions.replica.counters["read_forwarded"] == 1
    assert regions.outcomes.calls["record_nonce"] == 1
    replayed = await resend(regions, regions.link.sent[-1])
    assert replayed.status == 401, replayed.body


async def test_a_claim_in_the_apps_transaction_records_the_nonce_apart(make_regions):
    regions = make_regions(idempotency_claim="in_transaction")
    await regions.start()
    try:
        answer = await regions.request("POST", "/events", {"title": "in the transaction"})
        assert answer.status == 201, answer.body
        assert regions.outcomes.calls["record_nonce"] == 1
        assert regions.outcomes.calls["begin"] == 0
        replayed = await resend(regions, regions.link.sent[-1])
        assert replayed.status == 401, replayed.body
        assert regions.db.runs == 1
    finally:
        await regions.stop()


async def test_a_replay_cache_that_is_down_is_a_signed_503_and_nothing_runs(regions):
    regions.outcomes.down = True  # the primary database: claims and nonces alike
    answer = await regions.request("POST", "/events", {"title": "unchecked"})
    assert answer.status == 503, answer.body
    assert json.loads(answer.body)["error"] == "Idempotency store unavailable"
    assert regions.db.runs == 0 and regions.outcomes.rows == {}
