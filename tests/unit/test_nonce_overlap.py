"""The primary records a forwarded request's nonce while it claims the request's key (two round
trips at once instead of one after the other), and acts on neither before both are in: a
request whose nonce is not new is refused, unrun, its new claim released and no stored answer
given out."""

from __future__ import annotations

import asyncio
import json

from latitude.gateway.envelope import IDEMPOTENCY_KEY
from latitude.signing import MemoryNonceCache, NonceCacheError


class NonceCacheWaitingForTheClaim(MemoryNonceCache):
    """Answers a nonce only once the claim of the same request has been asked for: a primary
    that waited for the nonce before claiming would never get an answer."""

    def __init__(self, claim_asked: asyncio.Event) -> None:
        super().__init__()
        self.claim_asked = claim_asked

    async def add_if_new(self, nonce: str, ttl_seconds: float) -> bool:
        await asyncio.wait_for(self.claim_asked.wait(), 2.0)
        return await super().add_if_new(nonce, ttl_seconds)


class NonceCacheThatHasSeenEverything(MemoryNonceCache):
    async def add_if_new(self, nonce: str, ttl_seconds: float) -> bool:
        return False


class NonceCacheDown(MemoryNonceCache):
    async def add_if_new(self, nonce: str, ttl_seconds: float) -> bool:
        raise NonceCacheError("the replay cache does not answer")


def watch_claims(regions) -> asyncio.Event:
    asked = asyncio.Event()
    begin = regions.outcomes.begin

    async def watched(*args, **kwargs):
        asked.set()
        return await begin(*args, **kwargs)

    regions.outcomes.begin = watched
    return asked


async def test_the_nonce_and_the_claim_are_in_flight_together(regions):
    regions.primary.nonce_cache = NonceCacheWaitingForTheClaim(watch_claims(regions))
    answer = await regions.request("POST", "/events", {"title": "overlapped"})
    assert answer.status == 201, answer.body
    assert regions.db.events == {1: "overlapped"} and regions.db.runs == 1


async def test_a_replayed_nonce_is_refused_unrun_and_its_new_claim_released(regions):
    regions.primary.nonce_cache = NonceCacheThatHasSeenEverything()
    answer = await regions.request("POST", "/events", {"title": "replayed"})
    # The primary's 401 is unsigned: the replica calls it a bad answer and runs nothing.
    assert answer.status == 502, answer.body
    assert regions.primary.counters["rejected"] == 1
    assert regions.db.runs == 0 and regions.db.events == {}
    assert regions.outcomes.calls["begin"] == 1 and regions.outcomes.calls["abandon"] == 1
    assert regions.outcomes.rows == {}  # the key is free for a retry that is not a replay
    regions.primary.nonce_cache = MemoryNonceCache()
    again = await regions.request("POST", "/events", {"title": "replayed"})
    assert again.status == 201 and regions.db.runs == 1


async def test_a_replayed_nonce_never_gets_the_stored_answer(regions):
    first = await regions.request("POST", "/events", {"title": "stored-answer-7f3a"})
    assert first.status == 201 and b'"id": 1' in first.body
    sent = regions.link.sent[-1]
    key = dict(sent["scope"]["headers"])[IDEMPOTENCY_KEY].decode()
    regions.primary.nonce_cache = NonceCacheThatHasSeenEverything()
    # The same envelope again, straight to the primary: its key's answer is stored.
    replayed = await regions.link.send(
        sent["scope"]["method"],
        sent["scope"]["path"],
        [(k, v) for k, v in sent["scope"]["headers"] if k != b"host"],
        sent["body"],
        timeout_s=2.0,
    )
    assert replayed.status == 401, replayed.body
    assert b'"id"' not in replayed.body  # not the stored answer
    assert regions.outcomes.rows[key].state == "completed"  # the stored answer is untouched
    assert regions.db.runs == 1


async def test_a_replay_cache_that_is_down_is_a_signed_503_and_the_claim_released(regions):
    regions.primary.nonce_cache = NonceCacheDown()
    answer = await regions.request("POST", "/events", {"title": "unchecked"})
    assert answer.status == 503, answer.body
    assert "replay cache" in json.loads(answer.body)["detail"]
    assert regions.db.runs == 0 and regions.outcomes.rows == {}
