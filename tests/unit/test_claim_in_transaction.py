"""`idempotency_claim = "in_transaction"`: the primary claims nothing before the app runs; the
app's first transaction makes the claim, and a forwarded write costs one call of the outcome
store for its key (the outcome and position) instead of two (its nonce has a round trip of its
own, overlapping the body's read; the eager claim records it in the claim's statement). A retry, a duplicate, another request under
the key: the transaction is refused and the gateway answers from the store."""

from __future__ import annotations

import json

import pytest

from latitude.claims import LOST_ANSWER_STATUS
from latitude.gateway.config import GatewayConfigError
from latitude.gateway.envelope import IDEMPOTENCY_KEY


@pytest.fixture
async def regions(make_regions):
    world = make_regions(idempotency_claim="in_transaction")
    await world.start()
    try:
        yield world
    finally:
        await world.stop()


def gateway_calls(outcomes) -> dict[str, int]:
    """The outcome store's calls made by the gateway for the key (not the app's own claim
    statement, nor the nonce's record)."""
    skipped = ("claim_in_transaction", "record_nonce")
    return {k: v for k, v in outcomes.calls.items() if k not in skipped and v}


async def test_a_first_write_costs_one_store_call(regions):
    answer = await regions.request("POST", "/events", {"title": "standup"})
    assert answer.status == 201, answer.body
    assert regions.db.runs == 1
    assert gateway_calls(regions.outcomes) == {"complete_run": 1}
    assert regions.outcomes.calls["claim_in_transaction"] == 1  # in the app's transaction
    assert regions.outcomes.calls["record_nonce"] == 1
    (row,) = regions.outcomes.rows.values()
    assert row.state == "completed" and row.status == 201


async def test_the_eager_claim_stays_the_default(make_regions):
    world = make_regions()
    await world.start()
    try:
        assert (await world.request("POST", "/events", {"title": "x"})).status == 201
        assert gateway_calls(world.outcomes) == {"begin": 1, "complete": 1}
        assert world.outcomes.calls["record_nonce"] == 0  # recorded by the claim's statement
    finally:
        await world.stop()


async def test_a_retry_after_completion_is_replayed_not_run_again(regions):
    key = (IDEMPOTENCY_KEY, b"retry-1")
    first = await regions.request("POST", "/events", {"title": "once"}, headers=[key])
    again = await regions.request("POST", "/events", {"title": "once"}, headers=[key])
    assert (first.status, again.status) == (201, 201)
    assert first.body == again.body and regions.db.runs == 1
    assert regions.primary.counters["replayed"] == 1
    # The retry: its transaction refused, one look-up of the stored answer.
    assert gateway_calls(regions.outcomes) == {"complete_run": 1, "begin": 1}


async def test_the_stored_answer_wins_over_what_the_app_rendered(regions):
    key = (IDEMPOTENCY_KEY, b"rendered-1")
    first = await regions.request("POST", "/events/rendered", {"a": 1}, headers=[key])
    again = await regions.request("POST", "/events/rendered", {"a": 1}, headers=[key])
    assert json.loads(first.body) == {"rendered": "created"}
    assert again.status == 201 and again.body == first.body  # not the app's "sorry" page
    assert regions.db.runs == 1


async def test_a_lost_answer_is_retried_and_runs_once(regions):
    regions.link.script = ["lost"]
    answer = await regions.request("POST", "/events", {"title": "lost answer"})
    assert answer.status == 201 and regions.db.runs == 1
    assert regions.replica.counters["retries"] == 1 and regions.primary.counters["replayed"] == 1


@pytest.mark.parametrize("path", ["/events", "/events/rendered"])
async def test_a_key_reused_for_another_request_is_422(regions, path):
    key = (IDEMPOTENCY_KEY, b"reused")
    await regions.request("POST", path, {"title": "a"}, headers=[key])
    other = await regions.request("POST", path, {"title": "b"}, headers=[key])
    assert other.status == 422 and regions.db.runs == 1
    assert regions.outcomes.calls["begin"] == 1  # one look-up, however the app failed


async def test_a_duplicate_of_a_running_request_is_refused_before_it_writes(regions):
    key = (IDEMPOTENCY_KEY, b"running-1")
    await regions.request("POST", "/events", {"title": "dup"}, headers=[key])
    # As if another run of it had committed its claim and not stored its outcome yet.
    row = regions.outcomes.rows["running-1"]
    row.state, row.runner = "running", "another-run"
    sent_before = len(regions.link.sent)
    answer = await regions.request("POST", "/events", {"title": "dup"}, headers=[key])
    assert answer.status == 504 and regions.db.runs == 1  # 409s until the deadline
    attempts = len(regions.link.sent) - sent_before
    assert attempts >= 1 and regions.outcomes.calls["begin"] == attempts  # one look-up each
    assert regions.primary.counters["replayed"] == 0


async def test_an_app_failure_before_any_transaction_leaves_nothing_to_release(regions):
    key = (IDEMPOTENCY_KEY, b"boom-1")
    answer = await regions.request("POST", "/boom", headers=[key])
    assert answer.status == 500
    assert "boom-1" not in regions.outcomes.rows
    assert gateway_calls(regions.outcomes) == {}  # no claim was made: none to release


async def test_an_app_failure_after_its_commit_is_settled_never_run_again(regions):
    key = (IDEMPOTENCY_KEY, b"boom-2")
    answer = await regions.request("POST", "/write-then-boom", headers=[key])
    assert answer.status == 500 and regions.db.runs == 1
    assert regions.outcomes.rows["boom-2"].status == LOST_ANSWER_STATUS
    again = await regions.request("POST", "/write-then-boom", headers=[key])
    assert again.status == LOST_ANSWER_STATUS and regions.db.runs == 1
    assert b"answer was lost" in again.body


async def test_a_run_without_a_transaction_stores_its_outcome(regions):
    answer = await regions.request("POST", "/login", {"name": "ada"})
    assert answer.status == 200
    assert gateway_calls(regions.outcomes) == {"complete_run": 1}
    (row,) = regions.outcomes.rows.values()
    assert row.state == "completed" and row.status == 200


def test_the_setting_is_checked(make_regions):
    with pytest.raises(GatewayConfigError, match="idempotency_claim = 'lazy'.*'eager' or"):
        make_regions(idempotency_claim="lazy")


def test_an_app_behind_upstream_cannot_have_the_claim_in_its_transaction(make_regions):
    from latitude.gateway.middleware import RegionGateway
    from latitude.gateway.upstream import HttpUpstream

    config = make_regions(idempotency_claim="in_transaction").primary.config
    with pytest.raises(GatewayConfigError, match='--upstream.*"eager"'):
        RegionGateway(HttpUpstream("http://127.0.0.1:9"), config)


async def test_a_write_without_a_transaction_is_warned_about_once(regions, caplog):
    await regions.request("POST", "/login", {"name": "ada"})
    await regions.request("POST", "/login", {"name": "bob"})
    warnings = [r for r in caplog.records if "opened no latitude.db transaction" in r.message]
    assert len(warnings) == 1 and "POST /login" in warnings[0].message
