"""Positions carry the timeline: a position from before a promotion never makes a read wait out
its bound. The rule (`reach`), the watcher and the read decision with an in-memory replica (no
process), then the timelines the lab's real primary and streaming replica report."""

from __future__ import annotations

import asyncio

import psycopg
import pytest

from latitude.consistency import (
    ConsistencyMode,
    PositionCookie,
    Reach,
    ReplayWatcher,
    ReplicationPosition,
    primary_position,
    reach,
    read_locally,
)
from latitude.idempotency import IdempotencyStore

P = ReplicationPosition.parse


def on(timeline: int, text: str) -> ReplicationPosition:
    return P(text).on_timeline(timeline)


# ---- the text form -----------------------------------------------------------------------


def test_position_with_a_timeline_round_trips():
    pos = P("00000002/16/B374D848")
    assert (pos.timeline, pos.value) == (2, (0x16 << 32) | 0xB374D848)
    assert str(pos) == "00000002/16/B374D848" and pos.lsn == "16/B374D848"
    assert repr(pos) == "ReplicationPosition('00000002/16/B374D848')"
    assert P("0000000a/0/1") == on(10, "0/1")
    assert str(on(255, "1/0")) == "000000FF/1/0"
    # The old form still parses, its timeline unknown.
    assert P("16/B374D848").timeline is None and str(P("16/B374D848")) == "16/B374D848"


@pytest.mark.parametrize(
    "junk", ["2/16/B374D848", "000000002/1/1", "00000002/1/", "00000002//1", "0000000G/1/1"]
)
def test_a_malformed_timeline_is_refused_with_a_clear_error(junk):
    with pytest.raises(ValueError, match="not a Postgres WAL position"):
        P(junk)


def test_timeline_zero_and_bad_timelines_are_refused():
    with pytest.raises(ValueError, match="timeline 0"):
        P("00000000/1/1")
    for bad in (0, -1, 2**32, True, "2"):
        with pytest.raises(ValueError, match="timeline"):
            ReplicationPosition(1, bad)


def test_a_later_timeline_orders_after_any_position_of_an_earlier_one():
    assert on(1, "FF/0") < on(2, "0/1") and on(2, "0/1") > on(1, "FF/0")
    assert on(2, "1/0") < on(2, "1/1")
    assert max(on(1, "FF/0"), on(2, "0/1")) == on(2, "0/1")
    # A timeline unknown on either side: the LSN alone decides.
    assert P("1/0") < on(1, "2/0") and on(5, "2/0") > P("1/0")
    assert on(1, "1/0") != P("1/0")  # not the same position


def test_cookie_carries_the_timeline_and_reads_old_cookies():
    cookie = PositionCookie(b"s" * 32)
    assert cookie.read(cookie.issue(on(3, "16/B374D848"), "eu-west")) == on(3, "16/B374D848")
    assert cookie.read(cookie.issue(P("16/B374D848"), "eu-west")) == P("16/B374D848")


# ---- the rule ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "replayed", "known", "verdict"),
    [
        # One timeline, or none known: LSNs decide, as before timelines.
        (on(1, "0/100"), on(1, "0/200"), None, Reach.REACHED),
        (on(1, "0/300"), on(1, "0/200"), None, Reach.PENDING),
        (P("0/300"), on(2, "0/200"), None, Reach.PENDING),
        (on(2, "0/300"), P("0/200"), None, Reach.PENDING),
        # From an older timeline: replayed -> reached; not -> ask the primary, never wait.
        (on(1, "0/100"), on(2, "0/200"), None, Reach.REACHED),
        (on(1, "FF/0"), on(2, "0/200"), None, Reach.OLDER_TIMELINE),
        # The replica's own timeline unknown (or behind): a newer one learned elsewhere counts.
        (on(1, "FF/0"), P("0/200"), 2, Reach.OLDER_TIMELINE),
        (on(1, "FF/0"), on(1, "0/200"), 2, Reach.OLDER_TIMELINE),
        (on(2, "FF/0"), on(1, "0/200"), 2, Reach.PENDING),
        # A position on a newer timeline than the replica's: it waits (the replica will switch).
        (on(3, "0/300"), on(2, "0/200"), None, Reach.PENDING),
        (on(1, "0/100"), None, 2, Reach.PENDING),
    ],
)
def test_reach(target, replayed, known, verdict):
    assert reach(target, replayed, known) is verdict


# ---- the watcher with an in-memory replica ----------------------------------------------


class FakeReplica:
    """Answers the watcher's queries with whatever `row` is: (replay LSN text, timeline); the
    timeline only to the query that asks for it."""

    def __init__(self, lsn: str, timeline: int | None):
        self.row = (lsn, timeline)

    queries = timeline_queries = 0

    async def execute(self, sql: str) -> FakeReplica:
        assert "pg_last_wal_replay_lsn" in sql
        self.timeline_asked = "received_tli" in sql
        self.queries += 1
        self.timeline_queries += self.timeline_asked
        return self

    async def fetchone(self) -> tuple:
        return self.row if self.timeline_asked else self.row[:1]

    async def close(self) -> None:
        pass


class Watcher(ReplayWatcher):
    def __init__(self, replica: FakeReplica, **kwargs):
        super().__init__("postgresql://app:secret@replica.invalid/app", **kwargs)
        self.replica = replica

    async def _connect(self) -> None:
        self._conn = self.replica


async def test_an_old_timeline_position_is_answered_at_once():
    replica = FakeReplica("0/2000", 2)
    async with Watcher(replica, idle_interval_s=3600) as watcher:
        assert watcher.replayed == on(2, "0/2000") and watcher.timeline == 2
        assert await watcher.wait_for(on(1, "0/1000"), timeout_s=5)  # replayed before the switch
        assert not await watcher.wait_for(on(1, "FF/0"), timeout_s=5)  # past it: ask the primary
        stats = watcher.stats()
        assert stats["reads_older_timeline"] == 1 and stats["reads_timed_out"] == 0
        assert stats["timeline"] == 2 and stats["replayed"] == "00000002/0/2000"
        # The same LSN on the current timeline is waited for, up to its bound.
        assert not await watcher.wait_for(on(2, "FF/0"), timeout_s=0.05)
        assert watcher.stats()["reads_timed_out"] == 1


async def test_a_promotion_noticed_during_the_wait_releases_the_waiters():
    replica = FakeReplica("0/2000", 1)
    async with Watcher(replica, poll_interval_s=0.005) as watcher:
        stuck = asyncio.create_task(watcher.wait_for(on(1, "FF/0"), timeout_s=30))
        replayed = asyncio.create_task(watcher.wait_for(on(1, "0/3000"), timeout_s=30))
        behind = asyncio.create_task(watcher.wait_for(on(2, "0/5000"), timeout_s=30))
        await asyncio.sleep(0.05)
        assert watcher.waiting == 3
        replica.row = ("0/4000", 2)  # promoted upstream: the replica follows timeline 2
        assert await asyncio.wait_for(stuck, 5) is False
        assert await asyncio.wait_for(replayed, 5) is True
        assert watcher.waiting == 1 and not behind.done()
        replica.row = ("0/6000", 2)
        assert await asyncio.wait_for(behind, 5) is True
        assert watcher.stats()["reads_older_timeline"] == 1


async def test_a_timeline_learned_from_the_primary_counts_when_the_replica_shows_none():
    # An unprivileged role on a standby sees no WAL receiver, and the checkpoint's timeline lags.
    replica = FakeReplica("0/2000", 1)
    async with Watcher(replica, poll_interval_s=0.005) as watcher:
        waiting = asyncio.create_task(watcher.wait_for(on(1, "FF/0"), timeout_s=30))
        await asyncio.sleep(0.02)
        watcher.note_timeline(2)  # a position from the primary said so
        assert await asyncio.wait_for(waiting, 5) is False
        assert watcher.timeline == 2
        watcher.note_timeline(1)  # never goes back
        assert watcher.timeline == 2
        replica.row = ("0/2100", None)  # a poll that shows no timeline keeps the known one
        await asyncio.sleep(0.05)
        assert watcher.replayed.timeline == 1 and watcher.timeline == 2


async def test_the_replay_position_and_timeline_never_go_back():
    replica = FakeReplica("0/2000", 2)
    async with Watcher(replica, poll_interval_s=0.005, idle_interval_s=0.01) as watcher:
        replica.row = ("0/2100", 1)  # the WAL receiver restarted: only the checkpoint's is seen
        await asyncio.sleep(0.1)
        assert watcher.replayed == on(2, "0/2100")


async def test_the_fast_polls_of_a_waiting_read_do_not_read_the_timeline():
    # pg_control_checkpoint() reads the control file: not at every 2 ms poll.
    replica = FakeReplica("0/2000", 2)
    async with Watcher(replica, poll_interval_s=0.002, idle_interval_s=3600) as watcher:
        started = asyncio.get_running_loop().time()
        assert not await watcher.wait_for(on(2, "FF/0"), timeout_s=0.3)
        elapsed = asyncio.get_running_loop().time() - started
    assert replica.queries > 10
    assert replica.timeline_queries <= elapsed / 0.1 + 2, (replica.timeline_queries, elapsed)


# ---- the one read decision -------------------------------------------------------------------


class FixedPrimary:
    """A StrongPositionSource stand-in: the primary's position, or an error."""

    def __init__(self, position: ReplicationPosition | Exception):
        self.position = position

    async def current(self, timeout_s: float | None = None) -> ReplicationPosition:
        if isinstance(self.position, Exception):
            raise self.position
        return self.position


UNKNOWN = P("FFFFFFFF/FFFFFFFF")  # the gateway's "position unknown": never reached


async def test_read_locally_modes():
    async with Watcher(FakeReplica("0/2000", 2), idle_interval_s=3600) as watcher:
        eventual, session, strong = ConsistencyMode
        assert await read_locally(eventual, watcher, cookie_position=UNKNOWN)
        assert await read_locally(session, watcher)
        assert await read_locally(session, watcher, cookie_position=on(2, "0/1000"))
        assert not await read_locally(session, watcher, cookie_position=UNKNOWN, timeout_s=0.02)
        # An old-timeline cookie the replica has not replayed: forwarded, without waiting.
        assert not await read_locally(session, watcher, cookie_position=on(1, "FF/0"), timeout_s=30)
        # STRONG waits for the primary's position at request start, which covers the client's
        # own earlier writes: the cookie adds nothing (an unknown one would only make it wait).
        here = FixedPrimary(on(2, "0/1800"))
        assert await read_locally(strong, watcher, cookie_position=UNKNOWN, strong=here)
        ahead = FixedPrimary(on(2, "0/9000"))
        assert not await read_locally(strong, watcher, strong=ahead, timeout_s=0.02)
        # A primary that does not answer, or no way to ask it: freshness cannot be proven.
        down = FixedPrimary(ConnectionError("primary down"))
        assert not await read_locally(strong, watcher, strong=down)
        assert not await read_locally(strong, watcher)
        # The primary's position teaches the watcher its timeline.
        newer = FixedPrimary(on(3, "0/1900"))
        assert await read_locally(strong, watcher, strong=newer) and watcher.timeline == 3


async def test_read_locally_without_a_watcher():
    session, strong = ConsistencyMode.SESSION, ConsistencyMode.STRONG
    assert await read_locally(session, None)
    assert not await read_locally(session, None, cookie_position=on(2, "0/1"))
    assert not await read_locally(strong, None, strong=FixedPrimary(on(2, "0/1")))


async def test_read_locally_on_a_closed_watcher_asks_the_primary():
    watcher = Watcher(FakeReplica("0/2000", 2))
    await watcher.start()
    await watcher.close()
    assert not await read_locally(ConsistencyMode.SESSION, watcher, cookie_position=on(2, "1/0"))


# ---- the real primary and replica -----------------------------------------------------------


@pytest.fixture(scope="module")
def urls(world):
    return {r["name"]: r["database_url"] for r in world.status()["regions"]}


def test_the_primary_position_names_the_primary_timeline(urls):
    with psycopg.connect(urls["us-west"], autocommit=True) as c:
        position = primary_position(c)
        (checkpoint,) = c.execute("select timeline_id from pg_control_checkpoint()").fetchone()
        (walfile,) = c.execute("select pg_walfile_name(pg_current_wal_lsn())").fetchone()
    assert position.timeline == int(walfile[:8], 16) >= 1
    assert checkpoint <= position.timeline


async def test_the_replica_reports_the_primary_timeline(urls):
    with psycopg.connect(urls["us-west"], autocommit=True) as c:
        timeline = primary_position(c).timeline
    async with ReplayWatcher(urls["eu-west"]) as watcher:
        # The lab's role may read the WAL receiver: the replica's timeline is the primary's.
        assert watcher.replayed.timeline == timeline == watcher.stats()["timeline"]


async def test_an_unprivileged_role_on_the_replica_still_gets_a_timeline(urls):
    with psycopg.connect(urls["us-west"], autocommit=True) as c:
        timeline = primary_position(c).timeline
        exists = c.execute("select 1 from pg_roles where rolname = 'latitude_probe'").fetchone()
        if not exists:
            c.execute("create role latitude_probe login")
    url = urls["eu-west"].replace("postgres@", "latitude_probe@")
    deadline = asyncio.get_running_loop().time() + 20
    while True:  # the role replicates to eu-west across the 125 ms link
        try:
            watcher = ReplayWatcher(url)
            await watcher.start()
            break
        except psycopg.OperationalError:
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.2)
    try:
        # Only the checkpoint's timeline is visible to it: never ahead of the primary's.
        assert 1 <= watcher.replayed.timeline <= timeline
    finally:
        await watcher.close()


async def test_the_idempotency_store_answers_positions_with_their_timeline(urls):
    store = await IdempotencyStore.open(urls["us-west"])
    try:
        position = P(await store.position())
    finally:
        await store.close()
    with psycopg.connect(urls["us-west"], autocommit=True) as c:
        assert position.timeline == primary_position(c).timeline
