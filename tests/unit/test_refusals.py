"""What the gateway refuses, and how: each refusal's status, its words, its Retry-After and
the key to retry with, in the client's language; the session is never touched by one."""

from __future__ import annotations

import asyncio
import json

import pytest

from latitude.gateway.envelope import IDEMPOTENCY_KEY
from latitude.sessions import SessionStoreUnavailable
from tests.unit.fakes import call


def post_events(headers, client) -> dict:
    """An ASGI scope for `POST /events` straight to a gateway, with these headers."""
    return {
        "type": "http",
        "method": "POST",
        "path": "/events",
        "raw_path": b"/events",
        "query_string": b"",
        "scheme": "http",
        "headers": headers,
        "client": client,
    }


class DownStore:
    """A session store that does not answer."""

    async def get(self, sid):
        raise SessionStoreUnavailable("session store unreachable: connection refused")

    set = delete = get

    async def close(self):
        pass


async def test_no_answer_by_the_deadline_is_504_with_the_key(make_regions):
    regions = make_regions(deadline_s=0.2)
    await regions.start()
    try:
        regions.link.script = ["stalled"] * 3
        answer = await regions.request("POST", "/events", {"title": "late"})
    finally:
        await regions.stop()
    body = json.loads(answer.body)
    assert answer.status == 504 and body["error"] == "The primary region did not answer in time"
    assert "0.2 s" in body["detail"] and body["idempotency_key"] in body["detail"]
    assert answer.header(IDEMPOTENCY_KEY) == body["idempotency_key"]
    assert answer.header(b"retry-after") == "1"


async def test_a_session_store_outage_is_503_and_says_nothing_was_changed(regions):
    regions.replica.session_store = DownStore()
    answer = await regions.request(
        "POST", "/events", {"title": "x"}, headers=[(b"cookie", b"session=" + b"a" * 43)]
    )
    body = json.loads(answer.body)
    assert answer.status == 503 and body["error"] == "Session store unavailable"
    assert "Nothing was changed" in body["detail"] and answer.header(b"retry-after") == "2"
    assert regions.link.sent == [] and regions.db.runs == 0


async def test_a_session_store_outage_before_the_run_changes_nothing(regions):
    await regions.request("POST", "/login", {"name": "ada"})
    regions.replica.session_store = DownStore()
    answer = await regions.request("POST", "/logout")
    body = json.loads(answer.body)
    # The session could not be read to send along, so nothing was forwarded.
    assert answer.status == 503 and "Nothing was changed" in body["detail"]
    assert regions.link.sent[-1]["scope"]["path"] == "/login"


class WritesDown:
    """A session store that reads but cannot write (it went away mid-request)."""

    def __init__(self, inner):
        self.inner = inner

    async def get(self, sid):
        return await self.inner.get(sid)

    async def set(self, sid, data, ttl_s=None):
        raise SessionStoreUnavailable("session store unreachable: connection reset")

    async def delete(self, sid):
        await self.set(sid, b"")

    async def close(self):
        pass


async def test_a_session_store_outage_after_the_run_gives_the_key_to_fetch_the_answer(regions):
    await regions.request("POST", "/login", {"name": "ada"})
    store = regions.replica.session_store
    regions.replica.session_store = WritesDown(store)
    key = (IDEMPOTENCY_KEY, b"out-after")
    answer = await regions.request("POST", "/logout", headers=[key])
    body = json.loads(answer.body)
    # The logout ran at the primary; only the replica's copy could not be deleted.
    assert answer.status == 503 and "carried out" in body["detail"]
    assert body["idempotency_key"] == "out-after" and answer.header(b"retry-after") == "2"
    regions.replica.session_store = store
    again = await regions.request("POST", "/logout", headers=[key])
    assert again.status == 200 and regions.primary.counters["replayed"] == 1


async def test_a_bad_answer_signature_is_502_and_the_answer_is_discarded(regions):
    from dataclasses import replace

    from latitude.signing import Keyring, SigningKey

    other = Keyring([SigningKey("k1", b"another-secret-entirely-0000000000000")], "k1")
    regions.primary.config = replace(regions.primary.config, keyring=other)
    answer = await regions.request("POST", "/events", {"title": "x"})
    # The primary, with another secret, refuses the request unsigned: the replica says so.
    assert answer.status == 502
    assert json.loads(answer.body)["error"] == "Bad answer from the primary region"
    assert regions.db.runs == 0


async def test_a_forwarded_request_with_a_bad_signature_is_401_and_runs_nothing(regions):
    scope = post_events(
        [
            (b"host", b"us-west.internal"),
            (b"latitude-forwarded-from", b"eu-west"),
            (b"signature-input", b'latitude=("@method");created=1;keyid="k1"'),
            (b"signature", b"latitude=:AAAA:"),
            (b"accept", b"application/json"),
        ],
        client=("203.0.113.5", 1),
    )
    answer = await call(regions.primary, scope, b"{}")
    assert answer.status == 401 and regions.db.runs == 0
    assert json.loads(answer.body)["error"] == "Forwarded request rejected"


async def test_a_forwarded_request_sent_to_a_replica_is_421(regions):
    scope = post_events(
        [(b"host", b"eu-west.internal"), (b"latitude-forwarded-from", b"ap-south")],
        client=("10.0.0.9", 1),
    )
    answer = await call(regions.replica, scope, b"{}")
    assert answer.status == 421 and answer.header(b"retry-after") == "1"


async def test_a_replayed_forwarded_request_is_refused_by_its_nonce(regions):
    await regions.request("POST", "/events", {"title": "x"})
    sent = regions.link.sent[-1]
    again = await call(regions.primary, sent["scope"], sent["body"])
    assert again.status == 401 and regions.db.runs == 1


async def test_a_tampered_forwarded_body_is_401(regions):
    await regions.request("POST", "/events", {"title": "x"})
    sent = regions.link.sent[-1]
    regions.outcomes.nonces.clear()  # so only the body can be wrong
    tampered = sent["body"].replace(b'"x"', b'"y"')
    answer = await call(regions.primary, sent["scope"], tampered)
    assert answer.status == 401 and b"digest" in answer.body.lower()
    assert regions.db.runs == 1 and regions.db.events == {1: "x"}


async def test_a_stalled_upload_is_408_and_runs_nothing(make_regions):
    regions = make_regions(body_timeout_s=0.05)
    await regions.start()
    try:
        scope = post_events(
            [(b"host", b"eu-west.example.com"), (b"accept", b"application/json")],
            client=("198.51.100.7", 1),
        )
        sent = []

        async def receive():
            if not sent:
                sent.append(1)
                return {"type": "http.request", "body": b"{", "more_body": True}
            await asyncio.sleep(10)

        answer = {}

        async def send(message):
            if message["type"] == "http.response.start":
                answer["status"] = message["status"]

        await regions.replica(scope, receive, send)
    finally:
        await regions.stop()
    assert answer["status"] == 408 and regions.db.runs == 0


@pytest.mark.parametrize(
    "accept, kind",
    [(b"application/json", b"application/json"), (b"text/html", b"text/html; charset=utf-8")],
)
async def test_a_refusal_speaks_the_clients_language(regions, accept, kind):
    regions.link.reachable = False
    regions.outcomes.down = True
    answer = await regions.request("POST", "/events", {"x": 1}, headers=[(b"accept", accept)])
    assert answer.status == 503 and answer.header(b"content-type") == kind.decode()


async def test_past_the_forwarding_slots_and_their_queue_a_write_is_503_busy(make_regions):
    """One slot, one place in the queue: with the link stalled, the first write holds the slot
    till its deadline (504), the second waits in the queue, the third is refused at once."""
    regions = make_regions(max_connections=1, queue_size=1, deadline_s=0.3)
    await regions.start()
    try:
        regions.link.script = ["stalled"]
        first = asyncio.ensure_future(regions.request("POST", "/events", {"title": "1"}))
        await asyncio.sleep(0.05)
        second = asyncio.ensure_future(regions.request("POST", "/events", {"title": "2"}))
        await asyncio.sleep(0.05)
        third = await regions.request("POST", "/events", {"title": "3"})
        body = json.loads(third.body)
        assert third.status == 503 and body["error"] == "Busy"
        assert "max_connections" in body["detail"] and "Nothing was sent" in body["detail"]
        assert third.header(b"retry-after") == "1"
        assert (await first).status == 504
        assert (await second).status in (201, 503)  # the slot freed at the first's deadline
    finally:
        await regions.stop()
    assert regions.replica.counters["busy"] >= 1


async def test_a_primary_refusing_writes_unsigned_is_503_with_the_key_not_502(regions):
    """A primary whose lease ran out refuses writes with an unsigned 503. Unsigned, its "nothing
    changed" is not taken on trust: the client gets a 503 with the key to retry with."""
    follower = regions.primary.epochs
    follower.lease_s, follower._majority_seen_at = 0.5, float("-inf")
    key = (IDEMPOTENCY_KEY, b"lease-out")
    answer = await regions.request("POST", "/events", {"title": "x"}, headers=[key])
    body = json.loads(answer.body)
    assert answer.status == 503, body
    assert body["error"] == "Writes paused at the primary region"
    assert body["idempotency_key"] == "lease-out" and answer.header(b"retry-after") == "1"
    assert regions.db.runs == 0 and regions.replica.counters["bad_answer_signature"] == 1
    follower.lease_s = None  # the lease is back: the retry with the key runs it, once
    again = await regions.request("POST", "/events", {"title": "x"}, headers=[key])
    assert again.status == 201 and regions.db.runs == 1
