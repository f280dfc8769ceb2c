"""A write in flight when the primary moves (`latitude.promotion.inflight`): the old primary
refuses it unsigned, naming the new epoch; the replica follows the epoch and sends the write
again, with its key, to the new primary: here eu-west itself, the switchover's target."""

from __future__ import annotations

import json
import time

from latitude.gateway.envelope import IDEMPOTENCY_KEY
from latitude.promotion.epoch import Epoch, sign_epoch
from latitude.promotion.follow import EPOCH_HEADER


def demoted_primary(token: str | None, *, then=None):
    """What a demoted primary's gateway answers a forwarded write: an unsigned 503 carrying
    its newest epoch (`primary.py`, `Demoted`); `then` runs once it has answered."""

    async def app(scope, receive, send):
        while (await receive()).get("more_body"):
            pass
        headers = [(b"content-type", b"application/json"), (b"retry-after", b"1")]
        if token:
            headers.append((EPOCH_HEADER.encode(), token.encode()))
        body = json.dumps({"error": "Misdirected request", "detail": "not primary"}).encode()
        await send({"type": "http.response.start", "status": 503, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        if then is not None:
            then()

    return app


def epoch_token(regions, epoch: Epoch) -> str:
    return sign_epoch(regions.replica.config.keyring, epoch)


async def promoted_replica(regions):
    """eu-west as it is when promoted: its database is the primary one (the shared outcome
    table stands for it)."""
    regions.replica.idempotency = regions.outcomes


async def test_a_write_refused_by_the_demoted_primary_runs_once_at_the_new_one(regions):
    await promoted_replica(regions)
    token = epoch_token(regions, Epoch(2, "eu-west", "active", time.time()))
    regions.link.app = demoted_primary(token)
    answer = await regions.request("POST", "/events", {"title": "crossed the moment"})
    assert answer.status == 201, answer.body
    assert regions.db.events == {1: "crossed the moment"} and regions.db.runs == 1
    assert regions.replica.config.is_primary  # it followed the epoch the refusal named
    assert regions.replica.counters["sent_to_new_primary"] == 1
    assert regions.replica.counters["executed_forwarded"] == 1  # claimed by its key, run here
    assert regions.outcomes.calls["begin"] == 1


async def test_a_write_whose_first_attempt_ran_is_replayed_by_its_key(regions):
    """The client retries with the key of an attempt that ran at the old primary (its answer
    was lost): the new primary, promoted from that database, replays it."""
    key = (IDEMPOTENCY_KEY, b"ran-before")
    first = await regions.request("POST", "/events", {"title": "once"}, headers=[key])
    assert first.status == 201
    await promoted_replica(regions)
    regions.link.app = demoted_primary(
        epoch_token(regions, Epoch(2, "eu-west", "active", time.time()))
    )
    again = await regions.request("POST", "/events", {"title": "once"}, headers=[key])
    assert again.status == 201 and again.body == first.body
    assert regions.db.runs == 1 and regions.replica.counters["replayed"] == 1


async def test_an_unsigned_503_without_a_new_primary_is_discarded_for_a_503_with_the_key(regions):
    """Nothing moved: the unsigned answer is discarded (its body is not relayed); being a 503,
    the client is told to retry with the key rather than handed a 502."""
    regions.link.app = demoted_primary(None)
    answer = await regions.request("POST", "/events", {"title": "x"})
    body = json.loads(answer.body)
    assert answer.status == 503 and regions.db.runs == 0
    assert body["error"] == "Writes paused at the primary region" and body["idempotency_key"]
    assert regions.replica.counters["sent_to_new_primary"] == 0


async def test_an_epoch_that_is_not_signed_moves_nothing(regions):
    forged = epoch_token(regions, Epoch(2, "eu-west", "active", time.time()))[:-4] + "AAAA"
    regions.link.app = demoted_primary(forged)
    answer = await regions.request("POST", "/events", {"title": "x"})
    # The forged epoch is not followed; the unsigned 503 is answered as one, with the key.
    assert answer.status == 503 and not regions.replica.config.is_primary
    assert regions.replica.counters["sent_to_new_primary"] == 0 and regions.db.runs == 0


async def test_an_unsigned_refusal_while_the_epoch_is_pending_is_a_503_with_the_key(regions):
    """The old primary held the write past its bound while the epoch was pending: the client
    is told to retry with the key, not that the answer was bad."""
    pending = epoch_token(regions, Epoch(2, "us-west", "pending", time.time()))
    regions.link.app = demoted_primary(pending)
    answer = await regions.request("POST", "/events", {"title": "x"})
    assert answer.status == 503, answer.body
    body = json.loads(answer.body)
    assert answer.header(b"retry-after") == "1"
    key = answer.header(IDEMPOTENCY_KEY)
    assert key and body["idempotency_key"] == key and key in body["detail"]
    assert regions.db.runs == 0
