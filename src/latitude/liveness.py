"""A gateway process's liveness, as the primary database sees it.

A claim of an idempotency key (:mod:`latitude.idempotency`) belongs to the process that runs
the request. If that process dies (killed, out of memory, its host gone), nothing will ever
complete the claim, and a retry of the request had to wait ``stale_after_s`` (60 s) before it
could take the claim over. The database can tell sooner: :class:`RunnerLiveness` holds a session
advisory lock ``(LIVENESS_LOCK_CLASS, owner)`` on a connection of its own, and a claim records
``owner``. The lock is released by the database the moment that connection closes, which the
kernel does for a process that dies, so a retry finds the lock gone (``claims.owner_gone``) and
takes the claim over, or settles it as "answer lost" if its run had committed, at once.

A process that is alive but out of reach (a cut link holds its bytes: neither end sees the
connection close) must lose the lock too: the fallback claims over the ocean, and its runs are
stalled with the link. So the lock's session has an ``idle_session_timeout`` of ``idle_timeout_s``
and is pinged every ``check_every_s``: the database ends a session that goes quiet for longer,
dropping the lock. When the connection is back the same owner id is locked again, so the claims
of runs that survived are the process's again.

Taking a claim over early is as safe as taking it over when stale: the takeover waits on the
row lock of a transaction of the old run still open, and a run whose claim was taken cannot
commit any more (``claims.fence_statement``). What it does outside the database before its first
transaction is the same small risk as with a stale claim.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets

import psycopg

from latitude.claims import LIVENESS_LOCK_CLASS

__all__ = ["RunnerLiveness"]

log = logging.getLogger(__name__)


class RunnerLiveness:
    """Holds this process's liveness lock in the database at ``dsn``; :attr:`owner` is the id
    to store with a claim, or None while the lock is not held (then claims fall back to
    ``stale_after_s``)."""

    def __init__(
        self,
        dsn: str,
        *,
        check_every_s: float = 1.0,
        idle_timeout_s: float = 5.0,
        connect_timeout_s: float = 5.0,
    ) -> None:
        if not 0 < check_every_s < idle_timeout_s:
            raise ValueError(
                f"check_every_s ({check_every_s!r}) must be positive and below "
                f"idle_timeout_s ({idle_timeout_s!r})"
            )
        self._dsn = dsn
        self._check_every_s = check_every_s
        self._idle_timeout_ms = str(round(idle_timeout_s * 1000))
        self._connect_timeout_s = connect_timeout_s
        self._conn: psycopg.AsyncConnection | None = None
        self._id = 1 + secrets.randbelow(2**31 - 1)
        self._owner: int | None = None
        self._task: asyncio.Task | None = None

    @property
    def owner(self) -> int | None:
        return self._owner

    async def start(self, *, wait: bool = True) -> None:
        """Take the lock (with ``wait``, one try first, so a database out of reach does not hold
        up the caller for long), then keep it in the background."""
        if self._task is not None:
            return
        if wait:
            with contextlib.suppress(psycopg.Error, OSError, TimeoutError):
                await self._take()
        self._task = asyncio.create_task(self._keep(), name="latitude-liveness")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self._drop()

    async def _take(self) -> None:
        """Connect and lock the owner id. Ids are random: one that a live process already
        holds (a 1 in 2**31 chance) is refused by the try, and another is drawn."""
        conn = await asyncio.wait_for(
            psycopg.AsyncConnection.connect(
                self._dsn,
                autocommit=True,
                connect_timeout=max(1, round(self._connect_timeout_s)),
                application_name="latitude-liveness",
            ),
            self._connect_timeout_s + 1,
        )
        try:
            await conn.execute(
                "select set_config('idle_session_timeout', %s, false)", (self._idle_timeout_ms,)
            )
            for _ in range(5):
                cur = await conn.execute(
                    "select pg_try_advisory_lock(%s, %s)", (LIVENESS_LOCK_CLASS, self._id)
                )
                if (await cur.fetchone())[0]:
                    self._conn, self._owner = conn, self._id
                    return
                self._id = 1 + secrets.randbelow(2**31 - 1)
            raise psycopg.OperationalError("no free liveness id after 5 tries")
        except BaseException:
            await conn.close()
            raise

    async def _drop(self) -> None:
        self._owner = None
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(psycopg.Error, OSError):
                await conn.close()

    async def _keep(self) -> None:
        backoff = 0.0 if self._conn is None else self._check_every_s
        while True:
            await asyncio.sleep(backoff)
            try:
                if self._conn is None:
                    await self._take()
                    log.info("liveness lock taken again (owner %s)", self._owner)
                else:
                    await asyncio.wait_for(self._conn.execute("select 1"), self._check_every_s)
                backoff = self._check_every_s
            except (psycopg.Error, OSError, TimeoutError) as exc:
                if self._conn is not None:
                    log.warning("liveness lock lost (%r); claims wait for staleness meanwhile", exc)
                await self._drop()
                backoff = min(5.0, max(self._check_every_s, backoff * 1.5))
