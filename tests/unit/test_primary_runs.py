"""The primary's run slots (`[gateway] max_runs`): forwarded requests past the bound wait
their turn before their idempotency claim, and one that could not finish within its budget is
refused unrun, its key free for the retry."""

from __future__ import annotations

import asyncio
import json

import pytest

from latitude.gateway.recent import MIN_HISTORY
from tests.unit.test_budget import _retry_runs_once


def _counting(regions, seconds: float):
    """The primary's app, slowed by `seconds` per write, counting the runs at once."""
    app = regions.primary.app
    at_once = {"now": 0, "most": 0}

    async def slow_app(scope, receive, send):
        if scope["method"] == "POST":
            at_once["now"] += 1
            at_once["most"] = max(at_once["most"], at_once["now"])
            try:
                await asyncio.sleep(seconds)
            finally:
                at_once["now"] -= 1
        await app(scope, receive, send)

    regions.primary.app = slow_app
    return at_once


async def test_runs_past_the_bound_wait_their_turn(make_regions):
    regions = make_regions(max_runs=2, deadline_s=2.0)
    await regions.start()
    try:
        at_once = _counting(regions, 0.1)
        answers = await asyncio.gather(
            *(
                regions.request("POST", "/events", {"title": f"e{i}"}, keep_cookies=False)
                for i in range(6)
            )
        )
        assert [a.status for a in answers] == [201] * 6
        assert at_once["most"] == 2
        assert regions.db.runs == 6
    finally:
        await regions.stop()


async def test_a_run_that_could_not_finish_in_its_budget_is_refused_unrun(make_regions):
    regions = make_regions(max_runs=1, deadline_s=1.0)
    await regions.start()
    try:
        runs = regions.primary.primary.runs
        for _ in range(MIN_HISTORY):
            runs.record(0.6)  # a run holds its slot ~0.6 s lately
        _counting(regions, 0.6)
        first, second = await asyncio.gather(
            regions.request("POST", "/events", {"title": "a"}, keep_cookies=False),
            regions.request("POST", "/events", {"title": "b"}, keep_cookies=False),
        )
        statuses = sorted([first.status, second.status])
        assert statuses == [201, 503], (first.body, second.body)
        refused = first if first.status == 503 else second
        detail = json.loads(refused.body)["detail"]
        assert "running at the primary" in detail and "max_runs" in detail
        assert "not run" in detail and "Nothing was changed" in detail
        assert regions.db.runs == 1
        assert regions.primary.counters["budget_spent"] == 1

        key = refused.header(b"idempotency-key")
        regions.db.runs = 0
        await _retry_runs_once(regions, key, "a" if first.status == 503 else "b")
    finally:
        await regions.stop()


def test_max_runs_comes_from_the_topology_and_must_be_positive():
    from latitude.gateway.config import GatewayConfigError
    from tests.unit.test_intake import _config

    assert _config("").max_runs == 8
    assert _config("\n[gateway]\nmax_runs = 4\n").max_runs == 4
    with pytest.raises(GatewayConfigError, match="max_runs"):
        _config("\n[gateway]\nmax_runs = 0\n")
    with pytest.raises(GatewayConfigError, match="max_runs = 'eight' is not a whole number"):
        _config('\n[gateway]\nmax_runs = "eight"\n')
