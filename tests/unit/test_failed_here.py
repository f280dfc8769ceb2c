"""An error that no part of the gateway names, met before the answer started, is answered as a
named error in the client's language (and, at the primary, signed, with the write's key), never
the server's bare `500 Internal Server Error`."""

from __future__ import annotations

import json

from latitude.gateway.envelope import IDEMPOTENCY_KEY


async def test_an_unhandled_error_of_the_app_on_a_local_read_is_a_named_500(regions):
    answer = await regions.request("GET", "/boom")
    assert answer.status == 500, answer.body
    assert answer.header(b"content-type").startswith("application/json")
    body = json.loads(answer.body)
    assert body["error"] == "Internal error"
    assert "eu-west" in body["detail"] and "logged" in body["detail"]
    assert "change" not in body["detail"]  # a read changed nothing
    assert regions.replica.counters["failed_here"] == 1
    assert regions.link.sent == []  # served where it was asked


async def test_a_write_that_fails_where_it_runs_says_its_change_may_stand(regions):
    answer = await regions.request("POST", "/boom", region="us-west")  # run at the primary
    assert answer.status == 500, answer.body
    detail = json.loads(answer.body)["detail"]
    assert "us-west" in detail and "may stand" in detail
    assert regions.primary.counters["failed_here"] == 1


async def test_a_browser_gets_the_failure_as_a_page(regions):
    answer = await regions.request("GET", "/boom", headers=[(b"accept", b"text/html")])
    assert answer.status == 500
    assert answer.header(b"content-type").startswith("text/html")
    assert b"Internal error" in answer.body and b"eu-west" in answer.body


async def test_an_unnamed_error_at_the_primary_is_relayed_signed_with_the_key(regions):
    """The primary's idempotency store raising an error of no kind the gateway knows: the
    primary answers a signed 502 with the key (not a bare 500, which the replica could only
    call a bad answer), and the retry with the key runs the write once."""
    begin = regions.outcomes.begin
    failures = [RuntimeError("the store broke in a new way")]

    async def flaky_begin(*args, **kwargs):
        if failures:
            raise failures.pop()
        return await begin(*args, **kwargs)

    regions.outcomes.begin = flaky_begin
    answer = await regions.request("POST", "/events", {"title": "once"})
    assert answer.status == 502, answer.body
    body = json.loads(answer.body)
    assert body["error"] == "The gateway failed"
    assert "RuntimeError at the primary region" in body["detail"]
    key = answer.header(IDEMPOTENCY_KEY)
    assert key and f"Idempotency-Key: {key}" in body["detail"]
    assert regions.primary.counters["gateway_fault"] == 1
    assert regions.db.runs == 0
    again = await regions.request(
        "POST", "/events", {"title": "once"}, headers=[(IDEMPOTENCY_KEY, key.encode())]
    )
    assert again.status == 201, again.body
    assert regions.db.events == {1: "once"} and regions.db.runs == 1
