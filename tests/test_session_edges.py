"""Sessions at the gateway's edges, with the calendar in the shared world: a refusal never
signs a user out, a session store outage is a 503 (not the user's fault), and a bad cookie
gets the same answer on every method in every region."""

from __future__ import annotations

import uuid

import aiohttp
import pytest

PRIMARY, EU, AP = "us-west", "eu-west", "ap-southeast"


def base(world, region: str) -> str:
    return f"http://127.0.0.1:{world.state().regions[region].app_port}"


def client(world, region: str) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(base(world, region), cookie_jar=aiohttp.CookieJar(unsafe=True))


async def sign_in(c: aiohttp.ClientSession, name: str) -> None:
    async with c.post("/login", json={"name": name}) as r:
        assert r.status == 200, await r.text()


async def whoami(c: aiohttp.ClientSession) -> dict | None:
    async with c.get("/me") as r:
        assert r.status == 200
        return (await r.json())["user"]


async def test_a_refusal_leaves_the_user_signed_in(calendar):
    name = f"refused-{uuid.uuid4().hex[:8]}"
    async with client(calendar, EU) as c:
        await sign_in(c, name)
        key = str(uuid.uuid4())
        async with c.post("/events", json={"title": "a"}, headers={"Idempotency-Key": key}) as r:
            assert r.status == 201
        # The same key for another body: the primary's gateway refuses it.
        async with c.post("/events", json={"title": "b"}, headers={"Idempotency-Key": key}) as r:
            assert r.status == 422
        assert (await whoami(c))["name"] == name
        # Nor does a refusal at the replica's own edge.
        async with c.post("/events", json={}, headers={"X-Big": "a" * 20000}) as r:
            assert r.status == 431
        assert (await whoami(c))["name"] == name
        # Signing out is still carried back as "deleted".
        async with c.post("/logout") as r:
            assert r.status == 200
        assert await whoami(c) is None


async def test_session_store_outage_is_503_with_retry_after(calendar):
    name = f"outage-{uuid.uuid4().hex[:8]}"
    async with client(calendar, EU) as c:
        await sign_in(c, name)
        calendar.kill(EU, "sessions")
        try:
            answers = {}
            for method, path, body in (
                ("POST", "/events", {"title": "during the outage"}),
                ("GET", "/me", None),
                ("POST", "/login", {"name": name}),
            ):
                async with c.request(
                    method, path, json=body, headers={"Accept": "application/json"}
                ) as r:
                    answers[(method, path)] = (
                        r.status,
                        r.headers.get("Retry-After") is not None,
                        (await r.json())["error"],
                    )
            expected = (503, True, "Session store unavailable")
            assert answers == {k: expected for k in answers}
        finally:
            calendar.revive(EU, "sessions")
        # Back: the store answers again (the killed Valkey kept nothing, so sign in anew).
        await sign_in(c, name)
        assert (await whoami(c))["name"] == name


@pytest.mark.parametrize("cookie", ["session=short", "session=bad!value{}", 'session="x y"'])
async def test_a_bad_cookie_gets_the_same_answer_everywhere(calendar, cookie):
    seen = {}
    for region in (PRIMARY, EU, AP):
        async with aiohttp.ClientSession(base(calendar, region)) as c:
            headers = {"Cookie": cookie, "Accept": "application/json"}
            async with c.get("/me", headers=headers) as r:
                me = (r.status, (await r.json()).get("user"))
            async with c.post("/events", json={"title": "x"}, headers=headers) as r:
                write = r.status
            async with c.post(
                "/login", json={"name": f"cookie-{uuid.uuid4().hex[:6]}"}, headers=headers
            ) as r:
                login = (r.status, "session=" in r.headers.get("Set-Cookie", ""))
        seen[region] = (me, write, login)
    assert seen == {r: ((200, None), 401, (200, True)) for r in (PRIMARY, EU, AP)}


async def test_a_primary_region_whose_session_store_is_down_still_takes_forwarded_writes(
    calendar,
):
    """Nothing a forwarded write needs is in the primary region's Valkey: the replay cache of
    nonces is the primary database, and the session rides in the envelope to an app in the
    gateway's process. With that Valkey down, a write from eu-west runs and its user stays
    signed in."""
    async with client(calendar, EU) as c:
        name = f"far-outage-{uuid.uuid4().hex[:8]}"
        await sign_in(c, name)
        calendar.kill(PRIMARY, "sessions")
        try:
            title = f"while us-west's Valkey is down {uuid.uuid4().hex[:8]}"
            async with c.post("/events", json={"title": title}) as r:
                assert r.status == 201, await r.text()
                assert (await r.json())["title"] == title
            assert (await whoami(c))["name"] == name  # signed in still, in eu-west's store
        finally:
            calendar.revive(PRIMARY, "sessions")
