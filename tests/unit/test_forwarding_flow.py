"""A forwarded write, step by step, through both regions' gateways in one process: the replica
signs and sends it, the primary verifies, claims, runs, stores and signs, the replica relays the
answer and keeps the session the answer brings back."""

from __future__ import annotations

import json

from latitude.gateway.envelope import IDEMPOTENCY_KEY, POSITION, SESSION_STATE
from latitude.gateway.positions import POSITION_COOKIE
from latitude.gateway.primary import PrimarySide


async def test_a_write_in_a_replica_region_runs_once_at_the_primary(regions):
    answer = await regions.request("POST", "/events", {"title": "standup"})
    assert answer.status == 201, answer.body
    assert json.loads(answer.body)["id"] == 1
    assert regions.db.events == {1: "standup"} and regions.db.runs == 1
    assert regions.outcomes.calls["begin"] == 1 and regions.outcomes.calls["complete"] == 1
    assert regions.replica.counters["forwarded"] == 1
    assert regions.primary.counters["executed_forwarded"] == 1


async def test_the_answer_reaching_the_client_carries_none_of_the_envelope(regions):
    answer = await regions.request("POST", "/events", {"title": "x"})
    names = {k for k, _ in answer.headers}
    for internal in (b"signature", b"signature-input", b"content-digest", POSITION, SESSION_STATE):
        assert internal not in names, internal
    assert b"latitude-session-length" not in names


async def test_a_write_sets_a_signed_position_cookie_for_the_writers_next_read(regions):
    await regions.request("POST", "/events", {"title": "x"})
    assert POSITION_COOKIE in regions.cookies
    # The replica has not replayed the write: the writer's read waits its bound, then goes to
    # the primary; a read without the cookie is served locally at once.
    read = await regions.request("GET", "/events/1")
    assert read.status == 200 and regions.replica.counters["read_forwarded"] == 1
    fresh = await regions.request("GET", "/events/1", keep_cookies=False)
    assert fresh.status == 200 and regions.replica.counters["read_forwarded"] == 1


async def test_a_reads_own_region_serves_it_without_forwarding(regions):
    regions.db.events[7] = "local"
    answer = await regions.request("GET", "/events/7")
    assert answer.status == 200 and json.loads(answer.body) == {"title": "local"}
    assert regions.link.sent == []


async def test_a_sign_in_at_a_replica_keeps_the_session_in_the_replica_region(regions):
    answer = await regions.request("POST", "/login", {"name": "ada"})
    assert answer.status == 200
    sid = regions.cookies["session"]
    assert await regions.sessions["eu-west"].get(sid) is not None
    regions.watcher.replay_to("FF/0")  # the replica has replayed the sign-in
    me = await regions.request("GET", "/me")  # served in eu-west, from eu-west's store
    assert json.loads(me.body) == {"user": "ada"}
    assert regions.link.sent[-1]["scope"]["path"] == "/login"  # the read was not forwarded


async def test_the_session_rides_along_to_the_primary_and_back(regions):
    await regions.request("POST", "/login", {"name": "ada"})
    answer = await regions.request("POST", "/events", {"title": "with a session"})
    assert json.loads(answer.body)["by"] == "ada"  # the primary's app saw eu-west's session


async def test_sign_out_at_a_replica_deletes_the_replicas_session(regions):
    await regions.request("POST", "/login", {"name": "ada"})
    sid = regions.cookies["session"]
    assert (await regions.request("POST", "/logout")).status == 200
    assert await regions.sessions["eu-west"].get(sid) is None
    assert json.loads((await regions.request("GET", "/me")).body) == {"user": None}


async def test_the_primarys_copy_of_a_session_expires_soon(regions):
    """For an app that reads the primary's store itself (the sidecar's)."""
    regions.primary.app.reads_sessions_from_store = True
    await regions.request("POST", "/login", {"name": "ada"})
    sid = regions.cookies["session"]
    store = regions.sessions["us-west"]
    _, expires_at = store._data[store_key(store, sid)]
    assert expires_at is not None and expires_at - store._clock() <= 60


def store_key(store, sid):
    return next(k for k in store._data if sid in k)


async def test_a_retry_with_the_same_key_gets_the_stored_answer_not_a_second_run(regions):
    key = (IDEMPOTENCY_KEY, b"retry-1")
    first = await regions.request("POST", "/events", {"title": "once"}, headers=[key])
    again = await regions.request("POST", "/events", {"title": "once"}, headers=[key])
    assert (first.status, again.status) == (201, 201)
    assert first.body == again.body and regions.db.runs == 1
    assert regions.primary.counters["replayed"] == 1


async def test_a_key_reused_for_another_request_is_422(regions):
    key = (IDEMPOTENCY_KEY, b"reused")
    await regions.request("POST", "/events", {"title": "a"}, headers=[key])
    other = await regions.request("POST", "/events", {"title": "b"}, headers=[key])
    assert other.status == 422 and regions.db.runs == 1


async def test_one_users_key_never_replays_another_users_answer(regions):
    key = (IDEMPOTENCY_KEY, b"shared-key")
    await regions.request("POST", "/login", {"name": "ada"})
    await regions.request("POST", "/events", {"title": "same"}, headers=[key])
    regions.cookies.clear()
    await regions.request("POST", "/login", {"name": "bob"})
    other = await regions.request("POST", "/events", {"title": "same"}, headers=[key])
    assert other.status == 422  # the fingerprint covers the session id


async def test_a_lost_answer_is_retried_with_the_same_key_and_runs_once(regions):
    regions.link.script = ["lost"]  # the first attempt runs at the primary; its answer is lost
    answer = await regions.request("POST", "/events", {"title": "lost answer"})
    assert answer.status == 201 and regions.db.runs == 1
    assert regions.replica.counters["retries"] == 1 and regions.primary.counters["replayed"] == 1
    keys = {dict(s["scope"]["headers"])[IDEMPOTENCY_KEY] for s in regions.link.sent}
    assert len(keys) == 1  # both attempts carried one key


async def test_a_dropped_request_is_retried_and_runs_once(regions):
    regions.link.script = ["dropped", "dropped"]
    answer = await regions.request("POST", "/events", {"title": "dropped twice"})
    assert answer.status == 201 and regions.db.runs == 1
    assert regions.replica.counters["retries"] == 2


async def test_the_primary_sees_the_clients_address_and_scheme_not_the_gateways(regions):
    answer = await regions.request("POST", "/seen", {"x": 1})
    seen = json.loads(answer.body)
    assert seen["client"] == "198.51.100.7" and seen["scheme"] == "https"
    assert seen["headers"]["host"] == "eu-west.example.com"
    assert seen["body"] == '{"x": 1}'  # the session that rode along is not part of the body


async def test_client_set_trust_headers_never_reach_the_app(regions):
    forged = [(b"x-forwarded-for", b"6.6.6.6"), (b"latitude-forwarded-from", b"us-west")]
    answer = await regions.request("POST", "/seen", {}, headers=forged[:1])
    seen = json.loads(answer.body)
    assert seen["client"] == "198.51.100.7" and "x-forwarded-for" not in seen["headers"]


async def test_an_app_failure_at_the_primary_is_a_500_and_frees_the_key(regions):
    key = (IDEMPOTENCY_KEY, b"boom-1")
    answer = await regions.request("POST", "/boom", headers=[key])
    assert answer.status == 500
    assert "boom-1" not in regions.outcomes.rows  # abandoned: a retry may run it
    assert regions.outcomes.calls["abandon"] == 1


async def test_a_refusal_leaves_the_replicas_session_as_it_was(regions):
    await regions.request("POST", "/login", {"name": "ada"})
    sid = regions.cookies["session"]
    before = await regions.sessions["eu-west"].get(sid)
    key = (IDEMPOTENCY_KEY, b"refused")
    await regions.request("POST", "/events", {"title": "a"}, headers=[key])
    assert (await regions.request("POST", "/events", {"title": "b"}, headers=[key])).status == 422
    assert await regions.sessions["eu-west"].get(sid) == before
    assert json.loads((await regions.request("GET", "/me")).body) == {"user": "ada"}


async def test_a_session_the_app_grows_past_the_limit_is_refused_not_cut(regions):
    await regions.request("POST", "/login", {"name": "ada"})
    answer = await regions.request("POST", "/grow")
    assert answer.status == 500
    assert json.loads((await regions.request("GET", "/me")).body) == {"user": "ada"}


class StoreOperations(dict):
    """A memory store's data that counts what reaches it: the round trips a real store would
    be asked for (a session held in memory for a forwarded run never gets here)."""

    def __init__(self, data):
        super().__init__(data)
        self.n = 0

    def get(self, *args):
        self.n += 1
        return super().get(*args)

    def __setitem__(self, key, value):
        self.n += 1
        super().__setitem__(key, value)

    def pop(self, *args):
        self.n += 1
        return super().pop(*args)


def count_calls(store):
    """Count the operations that reach a memory session store."""
    store._data = StoreOperations(store._data)
    return store._data


async def test_a_write_that_leaves_the_session_costs_the_replica_one_store_call(regions):
    await regions.request("POST", "/login", {"name": "ada"})
    replica_calls = count_calls(regions.sessions["eu-west"])
    answer = await regions.request("POST", "/events", {"title": "no session change"})
    assert answer.status == 201 and json.loads(answer.body)["by"] == "ada"
    assert replica_calls.n == 1  # the read of the session to carry; nothing written back
    me = await regions.request("GET", "/me", keep_cookies=True)
    assert me.status == 200


async def test_the_primary_runs_a_carried_session_without_its_store(regions):
    """The app at the primary reads and writes the session the request brought in memory:
    a write that leaves the session costs the primary's store nothing, and one that makes a
    session (a sign-in) leaves it only in the replica region's store (the nonce is another
    store)."""
    primary = count_calls(regions.sessions["us-west"])
    login = await regions.request("POST", "/login", {"name": "ada"})
    assert login.status == 200 and primary.n == 0
    assert len(regions.sessions["eu-west"]._data) == 1 and not regions.sessions["us-west"]._data
    answer = await regions.request("POST", "/events", {"title": "no session change"})
    assert answer.status == 201 and json.loads(answer.body)["by"] == "ada"
    assert primary.n == 0
    logout = await regions.request("POST", "/logout")
    assert logout.status == 200 and primary.n == 0
    assert json.loads((await regions.request("GET", "/me")).body) == {"user": None}


async def test_an_app_that_reads_the_store_itself_gets_the_copy_there(regions):
    """An app behind HTTP (the sidecar) reads the primary's store: the carried session is put
    there, as a copy that expires soon, and read back after the run."""
    await regions.request("POST", "/login", {"name": "ada"})
    regions.primary.app.reads_sessions_from_store = True
    primary = count_calls(regions.sessions["us-west"])
    answer = await regions.request("POST", "/events", {"title": "through the store"})
    assert answer.status == 201 and json.loads(answer.body)["by"] == "ada"
    assert primary.n == 3  # the copy written, the app's own read, one read after the run


async def test_the_primary_keeps_its_own_regions_session_for_its_whole_lifetime(regions):
    """A write this region's gateway sent to its own primary side (after a promotion) carries
    the region's own session: the store keeps it for its usual lifetime, not as a copy."""
    side = PrimarySide(regions.primary)
    assert side._copy_ttl([(b"latitude-forwarded-from", b"eu-west")]) == 60
    assert side._copy_ttl([(b"latitude-forwarded-from", b"us-west")]) is None


async def test_a_small_envelope_goes_as_one_piece_a_large_one_streams(regions):
    """Head, body and session in one write for a small write: one segment across the link."""
    from latitude.gateway.replica import ONE_WRITE_BYTES

    send, given = regions.link.send, []

    async def recording_send(method, path_and_query, headers, body, **kwargs):
        given.append(type(body).__name__)
        return await send(method, path_and_query, headers, body, **kwargs)

    regions.link.send = recording_send
    await regions.request("POST", "/login", {"name": "ada"})  # a session rides along
    small = await regions.request("POST", "/events", {"title": "x"})
    large = await regions.request("POST", "/events", {"title": "y" * ONE_WRITE_BYTES})
    assert small.status == 201 and large.status == 201, (small.body, large.body)
    assert given[1] == "bytes" and given[2] == "async_generator"
    body = regions.link.sent[1]["body"]  # the request, then the session riding after it
    assert body.startswith(b'{"title": "x"}') and len(body) > len(b'{"title": "x"}')
    assert sorted(regions.db.events.values()) == ["x", "y" * ONE_WRITE_BYTES]


async def test_a_fault_of_the_gateway_while_forwarding_is_a_named_502_with_the_key(regions):
    """A bug on the way (the lab once met uvloop's RuntimeError for a closed transport) is
    answered as the gateway's fault with the write's key, never a bare 500: the retry with the
    key runs the write once."""
    regions.link.script = ["broken"]
    answer = await regions.request("POST", "/events", {"title": "once"})
    assert answer.status == 502, answer.body
    body = json.loads(answer.body)
    key = dict(answer.headers)[IDEMPOTENCY_KEY].decode()
    assert body["idempotency_key"] == key and "RuntimeError" in body["detail"]
    assert regions.replica.counters["gateway_fault"] == 1
    again = await regions.request(
        "POST", "/events", {"title": "once"}, headers=[(IDEMPOTENCY_KEY, key.encode())]
    )
    assert again.status == 201, again.body
    assert regions.db.events == {1: "once"} and regions.db.runs == 1
