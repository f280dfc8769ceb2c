"""The primary's gateway out of reach: a replica region runs the write itself with its SQL to
the primary database, after claiming the key there; with the database out of reach too it is
read-only and says so; a retry with the key never runs a write twice."""

from __future__ import annotations

import json

from latitude.gateway.envelope import IDEMPOTENCY_KEY, STALE
from latitude.gateway.positions import POSITION_COOKIE


def error(answer) -> dict:
    return json.loads(answer.body)


async def test_a_write_runs_here_when_the_primarys_gateway_refuses_connections(regions):
    regions.link.reachable = False
    answer = await regions.request("POST", "/events", {"title": "fallback"})
    assert answer.status == 201 and regions.db.runs == 1
    assert regions.replica.counters["fallback"] == 1
    assert regions.outcomes.calls["begin"] == 1 and regions.outcomes.calls["complete"] == 1
    assert POSITION_COOKIE in regions.cookies  # the writer's reads still wait for the write


async def test_a_fallback_write_and_its_retry_through_the_primary_run_once(regions):
    regions.link.reachable = False
    key = (IDEMPOTENCY_KEY, b"fb-1")
    first = await regions.request("POST", "/events", {"title": "once"}, headers=[key])
    regions.link.reachable = True
    again = await regions.request("POST", "/events", {"title": "once"}, headers=[key])
    assert (first.status, again.status) == (201, 201) and regions.db.runs == 1
    assert json.loads(first.body) == json.loads(again.body)


async def test_a_retry_through_the_fallback_replays_what_the_primary_ran(regions):
    key = (IDEMPOTENCY_KEY, b"fb-2")
    first = await regions.request("POST", "/events", {"title": "once"}, headers=[key])
    regions.link.reachable = False
    again = await regions.request("POST", "/events", {"title": "once"}, headers=[key])
    assert (first.status, again.status) == (201, 201) and regions.db.runs == 1
    assert again.body == first.body  # the session that rode along was cut off the replay
    assert regions.replica.counters["replayed"] == 1


async def test_with_the_primary_database_out_of_reach_too_the_region_is_read_only(regions):
    regions.link.reachable = False
    regions.outcomes.down = True
    answer = await regions.request("POST", "/events", {"title": "nowhere"})
    assert answer.status == 503 and regions.db.runs == 0
    body = error(answer)
    assert body["read_only"] is True and body["error"] == "Read-only for now"
    assert "Nothing was changed" in body["detail"]
    assert answer.header(b"retry-after") == "5"
    assert answer.header(IDEMPOTENCY_KEY.lower()) == body["idempotency_key"]


async def test_a_request_that_brings_its_key_is_never_told_nothing_changed(regions):
    """It may be a retry of an attempt that ran: only the key can tell, so 504 with it."""
    regions.link.reachable = False
    regions.outcomes.down = True
    key = (IDEMPOTENCY_KEY, b"maybe-ran")
    answer = await regions.request("POST", "/events", {"title": "?"}, headers=[key])
    assert answer.status == 504 and error(answer)["idempotency_key"] == "maybe-ran"


async def test_a_key_claimed_by_a_running_request_is_504_with_the_key(regions):
    await regions.outcomes.begin("busy", "another-run")  # ...with another fingerprint: 422
    regions.link.reachable = False
    key = (IDEMPOTENCY_KEY, b"busy")
    answer = await regions.request("POST", "/events", {"title": "x"}, headers=[key])
    assert answer.status == 422 and error(answer)["error"] == "Idempotency-Key reused"


async def test_a_read_that_cannot_be_forwarded_reads_the_primary_database(regions):
    await regions.request("POST", "/events", {"title": "mine"})  # the cookie asks for it
    regions.link.reachable = False
    answer = await regions.request("GET", "/events/1")
    assert answer.status == 200 and answer.header(STALE) is None
    assert regions.outcomes.calls["ping"] == 1


async def test_a_read_with_nothing_in_reach_is_served_stale_and_marked_so(regions):
    await regions.request("POST", "/events", {"title": "mine"})
    regions.link.reachable = False
    regions.outcomes.down = True
    answer = await regions.request("GET", "/events/1")
    assert answer.status == 200 and answer.header(STALE) == "replica"
    assert regions.replica.counters["read_served_stale"] == 1


async def test_an_app_failure_in_the_fallback_is_504_and_frees_the_key(regions):
    regions.link.reachable = False
    answer = await regions.request("POST", "/boom", headers=[(IDEMPOTENCY_KEY, b"fb-boom")])
    assert answer.status == 504
    # The claim is released in the background: it is gone once the loop has run it.
    import asyncio

    for _ in range(50):
        if "fb-boom" not in regions.outcomes.rows:
            break
        await asyncio.sleep(0.01)
    assert "fb-boom" not in regions.outcomes.rows
