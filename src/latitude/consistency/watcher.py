"""The replay watcher: ONE per process follows the local replica's replay position (and
timeline) and wakes the reads waiting for a position when it arrives."""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import time
from typing import Any

from latitude.consistency.position import Reach, ReplicationPosition, _position_or_none, reach
from latitude.redact import redact_url

__all__ = ["WAIT_BUCKETS_MS", "ReplayWatcher"]

log = logging.getLogger("latitude.consistency")

# On a replica: the end of the last WAL record replayed. On a primary (a watcher pointed at the
# primary region's own database, or a replica since promoted) everything is "replayed".
#
# The timeline: on a primary, exact (its WAL file name). A standby exposes no replay timeline:
# the WAL receiver's (received_tli, visible to superusers and pg_read_all_stats only) may run
# ahead of replay, and pg_control_checkpoint()'s (anyone) is the last restartpoint's, minutes
# behind. Either is only used to tell that a position is from an *older* timeline, and then
# only to decide at once (reached if its LSN was replayed, else ask the primary), which is safe
# with a timeline read ahead of replay; greatest() ignores the NULL an unprivileged role sees.
# pg_control_checkpoint() reads the control file: the timeline is read at most every
# TIMELINE_EVERY_S, not at each 2 ms poll of a waiting read (it changes only at a promotion, and
# the gateway learns the primary's at once from the positions it relays).
_REPLAY_SQL = (
    "SELECT CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn()"
    " ELSE pg_current_wal_lsn() END::text"
)
_REPLAY_TIMELINE_SQL = (
    _REPLAY_SQL + ","
    " CASE WHEN pg_is_in_recovery() THEN greatest("
    "(SELECT received_tli FROM pg_stat_wal_receiver),"
    " (SELECT timeline_id FROM pg_control_checkpoint()))"
    " ELSE ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int END"
)
TIMELINE_EVERY_S = 0.1

# Upper bounds (ms) of the wait-time histogram buckets; the last bucket is "more".
WAIT_BUCKETS_MS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500)


class ReplayWatcher:
    """Follows a replica's replay position; ONE per process, shared by all requests.

    * ``replayed`` is refreshed in the background every ``idle_interval_s`` (default 200 ms).
    * ``await wait_for(position, timeout_s)`` returns True at once, with no query, when
      ``replayed >= position``. Otherwise the request registers a waiter and the watcher polls
      the replica every ``poll_interval_s`` (default 2 ms) only while waiters exist, waking every
      satisfied waiter at each poll: one query per poll whatever the number of waiting reads.
    * ``stats()``: reads served at once / after a wait / timed out, wait times, queries, lag.
    * Timelines: ``timeline`` is the newest the watcher knows, the replica's own or one learned
      from the primary's positions (``note_timeline``). A read waiting for a position from an
      older timeline that the replica has not replayed returns False at once, rather than wait
      out its bound for a write that may have been lost in a promotion (see
      :func:`~latitude.consistency.position.reach`).

    Errors talking to the replica never escape the background task: the watcher reconnects,
    ``healthy`` turns False meanwhile, and waiters run into their timeout (the gateway then
    forwards the read).
    """

    def __init__(
        self,
        replica_dsn: str,
        poll_interval_s: float = 0.002,
        idle_interval_s: float = 0.2,
        connect_timeout_s: float = 5.0,
    ):
        if poll_interval_s <= 0 or idle_interval_s <= 0:
            raise ValueError("poll_interval_s and idle_interval_s must be positive")
        self.replica_dsn = replica_dsn
        self.poll_interval_s = poll_interval_s
        self.idle_interval_s = idle_interval_s
        self.connect_timeout_s = connect_timeout_s
        self.replayed: ReplicationPosition | None = None
        self._timeline_hint: int | None = None
        self._timeline_read_at = float("-inf")
        self.replayed_at: float | None = None  # monotonic time of the last successful poll
        self.healthy = False
        self.last_error: str | None = None
        self._conn: Any = None
        self._task: asyncio.Task | None = None
        self._wake: asyncio.Event | None = None
        # A heap of (LSN, seq, future, position); `_live` counts the futures in it not yet done,
        # `_abandoned` the done ones (timed-out reads) still in it, purged lazily.
        self._waiters: list[tuple[int, int, asyncio.Future, ReplicationPosition]] = []
        self._live = 0
        self._abandoned = 0
        self._seq = itertools.count()
        self._closed = False
        # counters
        self.queries = 0
        self.reads_immediate = 0
        self.reads_waited = 0
        self.reads_timed_out = 0
        self.reads_older_timeline = 0
        self.wait_ms_total = 0.0
        self.wait_ms_max = 0.0
        self._hist = [0] * (len(WAIT_BUCKETS_MS) + 1)

    # -- lifecycle --

    async def start(self, require_connection: bool = True) -> None:
        """Connect, read the replay position once, and start following it.

        With ``require_connection=False`` a replica that is down does not fail the start: the
        watcher keeps trying in the background (reads wait for nothing meanwhile but time out).
        """
        if self._task is not None:
            raise RuntimeError("this ReplayWatcher is already started")
        self._closed = False
        self._wake = asyncio.Event()
        try:
            await self._connect()
            await self._poll()
        except Exception as exc:
            await self._disconnect()
            if require_connection:
                raise
            self.healthy = False
            self.last_error = f"{type(exc).__name__}: {exc}"
        self._task = asyncio.create_task(self._run(), name="latitude-replay-watcher")

    async def close(self) -> None:
        """Stop following; pending waiters return False. Idempotent."""
        self._closed = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for _, _, fut, _ in self._waiters:
            if not fut.done():
                fut.set_result(Reach.PENDING)
        self._waiters.clear()
        self._live = self._abandoned = 0
        await self._disconnect()
        self.healthy = False

    async def __aenter__(self) -> ReplayWatcher:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _connect(self) -> None:
        import psycopg

        self._conn = await psycopg.AsyncConnection.connect(
            self.replica_dsn,
            autocommit=True,
            connect_timeout=max(1, int(self.connect_timeout_s)),
            application_name="latitude-replay-watcher",
        )

    async def _disconnect(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close()

    async def _poll(self) -> None:
        self.queries += 1
        now = time.monotonic()
        with_timeline = now - self._timeline_read_at >= TIMELINE_EVERY_S
        cur = await self._conn.execute(_REPLAY_TIMELINE_SQL if with_timeline else _REPLAY_SQL)
        row = await cur.fetchone()
        if with_timeline:
            self._timeline_read_at = now
        position = _position_or_none(row[0], row[1] if with_timeline else None) if row else None
        self.replayed_at = time.monotonic()
        self.healthy = True
        self.last_error = None
        if position is not None:
            self._advance(position)

    def _advance(self, position: ReplicationPosition) -> None:
        """LSN and timeline each only move forward: the timeline read on a standby falls back
        to an older one whenever its WAL receiver restarts."""
        old = self.replayed
        if old is None:
            self.replayed = position
            moved = position.timeline is not None
        else:
            tli = max((t for t in (old.timeline, position.timeline) if t is not None), default=None)
            self.replayed = ReplicationPosition(max(old.value, position.value), tli)
            moved = tli != old.timeline
        self._release(everyone=moved)

    def note_timeline(self, timeline: int | None) -> None:
        """A newer timeline seen elsewhere (in the primary's positions): the replica's own is
        not always visible, and positions from before it must not make reads wait."""
        if timeline is None or timeline <= (self.timeline or 0):
            return
        self._timeline_hint = timeline
        self._release(everyone=True)

    @property
    def timeline(self) -> int | None:
        """The newest timeline known: the replica's own, or one learned from the primary."""
        own = self.replayed.timeline if self.replayed is not None else None
        hint = self._timeline_hint
        if own is None or (hint is not None and hint > own):
            return hint
        return own

    def _verdict(self, position: ReplicationPosition) -> Reach:
        return reach(position, self.replayed, self.timeline)

    def _release(self, everyone: bool = False) -> None:
        """Wake every waiter whose position has been replayed, False to those whose position is
        from an older timeline (and drop abandoned ones). The heap's order is the LSN's; only a
        timeline change can decide a waiter behind an undecided one, so only then all are seen."""
        waiters = self._waiters
        if everyone:
            undecided = []
            for entry in waiters:
                if entry[2].done():
                    self._abandoned -= 1
                elif not self._settle(entry[2], self._verdict(entry[3])):
                    undecided.append(entry)
            heapq.heapify(undecided)
            self._waiters = undecided
            return
        while waiters:
            _, _, fut, position = waiters[0]
            if fut.done():
                self._abandoned -= 1
            elif not self._settle(fut, self._verdict(position)):
                break
            heapq.heappop(waiters)

    def _settle(self, fut: asyncio.Future, verdict: Reach) -> bool:
        if verdict is Reach.PENDING:
            return False
        fut.set_result(verdict)
        self._live -= 1
        return True

    async def _run(self) -> None:
        assert self._wake is not None
        backoff = 0.05
        while not self._closed:
            try:
                if self._conn is None:
                    await self._connect()
                if self._live:
                    await asyncio.sleep(self.poll_interval_s)
                else:
                    self._wake.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), self.idle_interval_s)
                await self._poll()
                backoff = 0.05
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the replica is down or restarting: keep trying
                if self.healthy:
                    log.warning("replay watcher lost %s: %s", redact_url(self.replica_dsn), exc)
                self.healthy = False
                self.last_error = f"{type(exc).__name__}: {exc}"
                await self._disconnect()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)

    # -- waiting --

    async def wait_for(self, position: ReplicationPosition | None, timeout_s: float) -> bool:
        """True once the replica has replayed ``position`` (at once, with no query, if it has);
        False if it has not within ``timeout_s`` or the watcher is closed, and False at once for
        a position from an older timeline that the replica has not replayed."""
        verdict = Reach.REACHED if position is None else self._verdict(position)
        if verdict is Reach.REACHED:
            self.reads_immediate += 1
            return True
        if self._task is None or self._closed:
            raise RuntimeError("ReplayWatcher.wait_for before start() or after close()")
        if verdict is Reach.OLDER_TIMELINE:
            self.reads_older_timeline += 1
            return False
        if timeout_s <= 0:
            self.reads_timed_out += 1
            return False
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (position.value, next(self._seq), fut, position))
        self._live += 1
        assert self._wake is not None
        self._wake.set()  # an idle watcher polls right now rather than after its idle interval
        started = time.monotonic()
        try:
            verdict = await asyncio.wait_for(asyncio.shield(fut), timeout_s)
        except TimeoutError:  # (released in the very same instant: still a success)
            verdict = fut.result() if fut.done() and not fut.cancelled() else Reach.PENDING
        finally:
            if not fut.done():
                fut.cancel()  # abandoned (timed out or the caller was cancelled)
                self._live -= 1
                self._abandoned += 1
                if self._abandoned > 64 and self._abandoned * 2 > len(self._waiters):
                    self._waiters = [w for w in self._waiters if not w[2].done()]
                    heapq.heapify(self._waiters)
                    self._abandoned = 0
        waited_ms = (time.monotonic() - started) * 1000
        self.wait_ms_total += waited_ms
        if verdict is Reach.REACHED:
            self.reads_waited += 1
            self.wait_ms_max = max(self.wait_ms_max, waited_ms)
            self._hist[_bucket(waited_ms)] += 1
        elif verdict is Reach.OLDER_TIMELINE:  # a promotion was noticed during the wait
            self.reads_older_timeline += 1
        else:
            self.reads_timed_out += 1
        return verdict is Reach.REACHED

    @property
    def waiting(self) -> int:
        """Reads waiting right now."""
        return self._live

    def stats(self) -> dict[str, Any]:
        buckets = {f"le_{b}ms": n for b, n in zip(WAIT_BUCKETS_MS, self._hist, strict=False)}
        buckets["more"] = self._hist[-1]
        age = None if self.replayed_at is None else time.monotonic() - self.replayed_at
        return {
            "replayed": str(self.replayed) if self.replayed else None,
            "replayed_age_ms": None if age is None else round(age * 1000, 1),
            "healthy": self.healthy,
            "last_error": self.last_error,
            "waiting": self.waiting,
            "queries": self.queries,
            "reads_immediate": self.reads_immediate,
            "reads_waited": self.reads_waited,
            "reads_timed_out": self.reads_timed_out,
            "reads_older_timeline": self.reads_older_timeline,
            "timeline": self.timeline,
            "wait_ms_total": round(self.wait_ms_total, 3),
            "wait_ms_max": round(self.wait_ms_max, 3),
            "wait_ms_histogram": buckets,
        }


def _bucket(ms: float) -> int:
    for i, bound in enumerate(WAIT_BUCKETS_MS):
        if ms <= bound:
            return i
    return len(WAIT_BUCKETS_MS)
