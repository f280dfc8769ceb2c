"""The attempt's budget: a replica says how long it will wait for each attempt
(`Latitude-Budget-Ms`, signed), and the primary does not run work that has outwaited it."""

from __future__ import annotations

import asyncio
import json
import time

from latitude.gateway import budget
from latitude.gateway.envelope import BUDGET, IDEMPOTENCY_KEY
from latitude.gateway.recent import MIN_HISTORY
from tests.unit.fakes import call


async def _retry_runs_once(regions, key: str, title: str) -> None:
    """A retry with `key` after a refusal: the write runs, and only once."""
    again = await regions.request(
        "POST", "/events", {"title": title}, headers=[(IDEMPOTENCY_KEY, key.encode())]
    )
    assert again.status == 201, again.body
    assert regions.db.runs == 1


def _with_server_timing(app, region: str):
    """The primary's gateway as `latitude serve` runs it: `Observe` puts its own time on each
    answer as a `Server-Timing` entry named after the region (the unit gateways have none)."""

    async def timed(scope, receive, send):
        started = time.perf_counter()

        async def timed_send(message):
            if message["type"] == "http.response.start":
                ms = (time.perf_counter() - started) * 1000
                entry = (b"server-timing", f"{region};dur={ms:.1f}".encode())
                message = {**message, "headers": [*message.get("headers", []), entry]}
            await send(message)

        await app(scope, receive, timed_send)

    return timed


def _header(scope: dict, name: bytes) -> bytes | None:
    return next((v for k, v in scope["headers"] if k == name), None)


async def test_each_attempt_carries_its_budget_under_the_signature(regions):
    answer = await regions.request("POST", "/events", {"title": "x"})
    assert answer.status == 201
    sent = regions.link.sent[-1]["scope"]
    budget = int(_header(sent, BUDGET))
    assert 0 < budget <= 500  # [gateway] deadline_s = 0.5 in the unit topology
    assert b'"latitude-budget-ms"' in _header(sent, b"signature-input")


async def test_work_that_outwaited_its_budget_at_the_primary_is_not_run(regions, monkeypatch):
    # Room enough for the claim to end past the budget (0.5 - 0.2 s) but inside the deadline.
    monkeypatch.setattr(budget, "MARGIN_S", 0.2)
    begin = regions.outcomes.begin

    async def slow_begin(*args, **kwargs):  # the claim's round trip under overload
        claim = await begin(*args, **kwargs)
        await asyncio.sleep(0.4)
        return claim

    regions.outcomes.begin = slow_begin
    answer = await regions.request("POST", "/events", {"title": "late"})
    assert answer.status == 503, answer.body
    assert answer.header(b"retry-after") == "1"
    key = answer.header(b"idempotency-key")
    detail = json.loads(answer.body)["detail"]
    assert "not run" in detail and key in detail and "Nothing was changed" in detail
    assert regions.db.runs == 0 and regions.db.events == {}
    assert regions.primary.counters["budget_spent"] == 1

    # The claim was let go: a retry with the key runs the write, once.
    regions.outcomes.begin = begin
    await _retry_runs_once(regions, key, "late")


async def test_a_budget_changed_on_the_way_fails_the_signature(regions):
    await regions.request("POST", "/events", {"title": "x"})
    sent = regions.link.sent[-1]
    scope = dict(sent["scope"])
    scope["headers"] = [(k, b"999999" if k == BUDGET else v) for k, v in sent["scope"]["headers"]]
    answer = await call(regions.primary, scope, sent["body"])
    assert answer.status in (401, 403), answer.status
    assert regions.db.runs == 1


async def test_a_budget_that_is_not_a_number_is_a_bad_envelope(regions):
    """Only a gateway signs one, so a malformed value is a bug to name, not a guess."""
    from latitude.gateway.envelope import BadEnvelope, unpack_request

    scope = {
        "headers": [(IDEMPOTENCY_KEY, b"k"), (BUDGET, b"12.5")],
        "scheme": "http",
    }
    try:
        unpack_request(scope, 0)
    except BadEnvelope as exc:
        assert "latitude-budget-ms" in str(exc) and "12.5" in str(exc)
    else:
        raise AssertionError("a budget of 12.5 was taken")


async def test_an_app_run_past_its_budget_is_stopped_and_its_claim_released(regions):
    app = regions.primary.app
    started: list[str] = []

    async def slow_app(scope, receive, send):  # an overloaded primary: the run takes too long
        started.append(scope["path"])
        await asyncio.sleep(0.6)
        await app(scope, receive, send)

    regions.primary.app = slow_app
    answer = await regions.request("POST", "/events", {"title": "slow"})
    assert started == ["/events"]  # it began within its budget
    assert answer.status == 503, answer.body
    key = answer.header(b"idempotency-key")
    detail = json.loads(answer.body)["detail"]
    assert "stopped" in detail and "will not be applied twice" in detail and key in detail
    assert regions.db.runs == 0 and regions.primary.counters["budget_stopped"] == 1

    regions.primary.app = app
    await _retry_runs_once(regions, key, "slow")


async def test_the_apps_own_timeout_is_not_taken_for_the_budget(regions):
    app = regions.primary.app

    async def impatient_app(scope, receive, send):
        if scope["method"] == "POST":
            async with asyncio.timeout(0.01):
                await asyncio.sleep(1)  # the app's own timeout fires, well inside the budget
        await app(scope, receive, send)

    regions.primary.app = impatient_app
    answer = await regions.request("POST", "/events", {"title": "x"})
    assert answer.status == 500, answer.body  # the app failed: not "overloaded"
    assert regions.primary.counters["budget_stopped"] == 0


async def test_the_budget_is_what_is_left_after_waiting_for_a_forwarding_slot(make_regions):
    regions = make_regions(max_connections=1)
    await regions.start()
    try:
        app = regions.primary.app

        async def slow_app(scope, receive, send):  # the first write holds the one slot 0.2 s
            if not regions.link.sent[1:]:
                await asyncio.sleep(0.2)
            await app(scope, receive, send)

        regions.primary.app = slow_app
        first, second = await asyncio.gather(
            regions.request("POST", "/events", {"title": "a"}, keep_cookies=False),
            regions.request("POST", "/events", {"title": "b"}, keep_cookies=False),
        )
        assert first.status == second.status == 201
        budgets = sorted(int(_header(sent["scope"], BUDGET)) for sent in regions.link.sent)
        assert budgets[0] <= budgets[1] - 150  # the second waited ~0.2 s for the slot
    finally:
        await regions.stop()


async def test_the_primarys_stop_answers_before_the_replica_gives_up(make_regions, monkeypatch):
    """The budget leaves the way back: the primary's signed 503 crosses the link in time, so
    the replica relays it (key, Retry-After) instead of timing out, closing its pooled
    connection and answering `504`."""
    monkeypatch.setattr(budget, "MARGIN_S", 0.1)  # room for a loaded machine's loop lag
    regions = make_regions(deadline_s=1.0)
    await regions.start()
    try:
        regions.link.one_way_s = 0.1
        regions.link.app = _with_server_timing(regions.primary, "us-west")
        for i in range(MIN_HISTORY):  # answers enough for an estimate of the way back
            assert (await regions.request("POST", "/events", {"title": f"w{i}"})).status == 201
        app = regions.primary.app

        async def slow_app(scope, receive, send):
            await asyncio.sleep(1.0)
            await app(scope, receive, send)

        regions.primary.app = slow_app
        answer = await regions.request("POST", "/events", {"title": "slow"})
        assert answer.status == 503, answer.body
        assert "stopped" in json.loads(answer.body)["detail"]
        assert regions.replica.counters["retries"] == 0  # no attempt ran out of time
        budgets = [int(_header(sent["scope"], BUDGET)) for sent in regions.link.sent]
        assert budgets[0] <= 900 and budgets[-1] <= 1000 - 200 - 100  # the warm-ups' round trip
        assert regions.db.runs == MIN_HISTORY
    finally:
        await regions.stop()


async def test_an_answer_without_the_primarys_own_time_gives_no_figure(make_regions):
    """Without `Server-Timing` the app's time would pass for the link's: the budget keeps back
    only its margin, however slow the answers."""
    regions = make_regions(deadline_s=1.0)
    await regions.start()
    try:
        regions.link.one_way_s = 0.05
        for i in range(MIN_HISTORY + 1):
            assert (await regions.request("POST", "/events", {"title": f"w{i}"})).status == 201
        assert regions.replica.replica.budget.way_back_s == 0.0
        last = int(_header(regions.link.sent[-1]["scope"], BUDGET))
        assert last >= 1000 - budget.MARGIN_S * 1000 - 20  # only the margin (and the signing)
    finally:
        await regions.stop()


async def test_an_unfenced_upstream_is_never_stopped_part_way(regions):
    """The sidecar's upstream may have committed by the budget's end and nothing marks it: its
    run is left to finish and its outcome stored, so the retry replays it, never runs it."""
    from latitude.gateway.upstream import HttpUpstream

    app = regions.primary.app

    class SlowUpstream(HttpUpstream):
        async def __call__(self, scope, receive, send):
            await asyncio.sleep(0.6)  # past the 0.5 s deadline
            await app(scope, receive, send)

    regions.primary.app = SlowUpstream("http://127.0.0.1:1")
    answer = await regions.request("POST", "/events", {"title": "slow"})
    assert answer.status == 504, answer.body
    await asyncio.sleep(0.3)  # the run ends at the primary all the same
    assert regions.db.runs == 1 and regions.primary.counters["budget_stopped"] == 0

    regions.primary.app = app
    again = await regions.request(
        "POST",
        "/events",
        {"title": "slow"},
        headers=[(IDEMPOTENCY_KEY, answer.header(b"idempotency-key").encode())],
    )
    assert again.status == 201, again.body  # the stored answer
    assert regions.db.runs == 1
