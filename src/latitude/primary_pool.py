"""The pool of connections to the primary database that the idempotency store draws on.

`new_pool` builds it with no round trip on checkout (a forwarded write must not pay one, and on
the fallback path that is an ocean crossing): `alive_locally` only reads what the socket already
holds, so a connection a reset or close already broke is dropped before anything is sent on it.

It can also tell when the database refuses connections right now. A pool connects in the
background and a caller waits for a connection up to its timeout. When the database is down for
good (its host up, nothing listening: the process was killed, the region is being failed over)
every attempt is refused at once, yet the caller still waited the whole timeout: the fallback's
writes answered "read-only for now" only after 2.9 s each, and the write in flight when the new
primary came waited those seconds out before it could be sent there. `RefusalWatch` hands the
pool a connection class that reports each attempt; `RefusalWatch.getconn` stops waiting once the
latest attempt was refused and none has succeeded since.

Only a refusal counts (the server's host answered "nothing here", or the connection was reset
before the handshake): a timeout or a silent link is not, as the database may answer yet. The
error's text is libpq's; one we do not recognise counts as no refusal, so a wrong guess only
keeps the old wait.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import psycopg
from psycopg import pq
from psycopg_pool import AsyncConnectionPool

__all__ = ["RefusalWatch", "Refused", "alive_locally", "is_refusal", "new_pool"]


class Refused(Exception):
    """The database refuses connections now (the pool's latest attempt was turned away)."""


_REFUSED = (
    "connection refused",
    "connection reset",
    "server closed the connection unexpectedly",
    "no such file or directory",  # a Unix socket with no server behind it
)


def is_refusal(exc: BaseException) -> bool:
    """A connection attempt that the database's host turned away (not one that timed out)."""
    text = str(exc).lower()
    return "timeout" not in text and any(marker in text for marker in _REFUSED)


class RefusalWatch:
    """The outcome of a pool's latest connection attempt; `connection_class()` is the
    `psycopg.AsyncConnection` subclass that reports to it."""

    def __init__(self) -> None:
        self.refused_at: float | None = None  # monotonic time of the latest refused attempt
        self.error: str = ""
        self._changed = asyncio.Event()

    async def getconn(self, pool: AsyncConnectionPool, timeout_s: float) -> psycopg.AsyncConnection:
        """`pool.getconn(timeout_s)`, but no longer than until the latest attempt of `pool`
        (whose connection class is this watch's) was refused: then `Refused`."""
        getting = asyncio.ensure_future(pool.getconn(timeout=timeout_s))
        refused = asyncio.ensure_future(self.wait_refused())
        try:
            await asyncio.wait({getting, refused}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            _abandon(pool, getting)
            raise
        finally:
            refused.cancel()
        if getting.done():
            return getting.result()  # a connection had at the same moment is used all the same
        _abandon(pool, getting)
        raise Refused(self.error)

    def refusing(self) -> bool:
        return self.refused_at is not None

    async def wait_refused(self) -> None:
        """Return once the latest attempt was refused (at once if it already was)."""
        while not self.refusing():
            self._changed.clear()
            await self._changed.wait()

    def _report(self, exc: BaseException | None) -> None:
        if exc is None:
            self.refused_at, self.error = None, ""
        elif is_refusal(exc):
            self.refused_at, self.error = time.monotonic(), str(exc).strip().splitlines()[0]
        else:
            return  # a timeout says nothing either way
        self._changed.set()

    def connection_class(self) -> type[psycopg.AsyncConnection]:
        watch = self

        class ReportingConnection(psycopg.AsyncConnection):
            @classmethod
            async def connect(cls, *args, **kwargs):
                try:
                    conn = await super().connect(*args, **kwargs)
                except psycopg.OperationalError as exc:
                    watch._report(exc)
                    raise
                watch._report(None)
                return conn

        return ReportingConnection


def _abandon(pool: AsyncConnectionPool, getting: asyncio.Future) -> None:
    """Stop waiting for a connection; one that comes all the same goes back to the pool."""

    def give_back(task: asyncio.Future) -> None:
        if not task.cancelled() and task.exception() is None:
            asyncio.ensure_future(pool.putconn(task.result()))

    getting.cancel()
    getting.add_done_callback(give_back)


def new_pool(
    dsn: str,
    *,
    min_size: int,
    max_size: int,
    timeout_s: float,
    connect_timeout_s: float | None = None,
    fail_fast_when_refused: bool = False,
) -> tuple[AsyncConnectionPool, RefusalWatch | None]:
    """An unopened autocommit pool on `dsn`, and its `RefusalWatch` if asked for."""
    kwargs: dict[str, Any] = {"autocommit": True}
    if connect_timeout_s is not None:
        kwargs["connect_timeout"] = max(1, round(connect_timeout_s))
    refusals = RefusalWatch() if fail_fast_when_refused else None
    pool = AsyncConnectionPool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        timeout=timeout_s,
        kwargs=kwargs,
        check=alive_locally,
        open=False,
        **({"connection_class": refusals.connection_class()} if refusals else {}),
    )
    return pool, refusals


async def alive_locally(conn: psycopg.AsyncConnection) -> None:
    """Raise if the connection is known dead without asking the server: the socket already
    holds a reset or end of stream (a broken link's resets arrive before our next query)."""
    if conn.closed or conn.pgconn.status != pq.ConnStatus.OK:
        raise psycopg.OperationalError("the connection is closed")
    conn.pgconn.consume_input()  # raises on a reset or closed socket; reads nothing else
    if conn.pgconn.status != pq.ConnStatus.OK:
        raise psycopg.OperationalError("the connection was closed by the server")
