"""Outcomes of forwarded requests, stored under their idempotency key in the primary database.

A replica retries a forwarded write with the same ``Idempotency-Key`` until its deadline.
The primary must run such a request at most once, so before running it the gateway claims
the key here, and afterwards stores the response under it:

- :attr:`Outcome.NEW`: the key was unknown; a ``running`` row now holds it. The caller runs
  the request, then calls :meth:`IdempotencyStore.complete` (or
  :meth:`IdempotencyStore.abandon` if the app failed before having any effect).
- :attr:`Outcome.REPLAY`: the request already completed; answer with the stored status,
  headers and body, without running anything.
- :attr:`Outcome.IN_PROGRESS`: the same request is running right now (a concurrent
  duplicate): the gateway answers ``409``.
- :attr:`Outcome.MISMATCH`: the key was used for a different request (another request
  hash, e.g. another body): the gateway answers ``422``.

The table lives in the primary database so outcomes survive gateway restarts and are shared
by every gateway process::

    latitude_idempotency (key text primary key, request_hash text not null,
                          state text not null,            -- 'running' | 'completed'
                          status int, headers jsonb, body bytea,
                          created_at timestamptz default now(), completed_at timestamptz,
                          applied boolean default false,
                          runner text,                    -- the claiming run's token
                          owner int)                      -- the claiming process's liveness id

``created_at`` is when the current run claimed the key.

**Fencing.** ``applied`` is set by :func:`fence_statement`, which :mod:`latitude.db` runs as the
first statement of each of the app's transactions while a claimed request runs: it commits with
the app's writes or not at all, and row-locks the claim meanwhile. A claim is taken over, or
released by :meth:`IdempotencyStore.abandon`, only while no transaction of its run committed; a
stale or failed run that did commit is completed with the "answer lost" outcome
(``LOST_ANSWER_STATUS``) instead, so it is never run twice. A run whose claim was taken over
fails its next transaction's mark (``ClaimLost``) before writing anything.

**The claim in the app's transaction.** With :func:`claim_statement` as the first statement of
each of the app's transactions (``[gateway] idempotency_claim = "in_transaction"``), the run
claims nothing beforehand: the statement inserts the key (``runner`` = the run's token, marked
applied) or takes it if it is the run's own or a stale unapplied claim of the same request, and
finds it anyone else's otherwise (then the caller aborts the transaction and answers from
:meth:`IdempotencyStore.begin`). Such a row exists exactly when a transaction of its run
committed. :meth:`IdempotencyStore.complete_run` then stores the outcome (inserting the row if
no transaction committed), :meth:`IdempotencyStore.settle_run` settles a failed run that had
committed. See docs/gateway.md for what it asks of the app.

**Claims that arrive late.** A claim sent over a link that then stalls may reach the database
long after its sender gave up (a cut link holds the bytes and delivers them on heal). Nothing
would ever complete such a claim, and it would block its key until it went stale. So a caller
with a deadline passes ``not_after`` (a wall-clock time, ``time.time()`` seconds) to
:meth:`IdempotencyStore.begin`: the database then takes the claim only if it arrives before
that time by its own clock (``clock_timestamp()``), and a late claim changes nothing and raises
:class:`ClaimTooLate`. This assumes the two clocks agree to well within the deadline (NTP).

**A claim sent twice.** A statement whose connection broke may have committed before the
answer was lost, and :meth:`IdempotencyStore.begin` sends it again on a fresh connection. Each
call of it claims with a token of its own (``runner``), so the second send finds the claim its
own (``NEW``) rather than a run in progress, and the request's nonce its own, not a replay.

**Stale claims.** A ``running`` row whose ``created_at`` is older than ``stale_after_s``
(default 60 s) is taken to belong to a runner that died (process killed between claim and
completion). A new request with the same key and the same hash takes it over: the row's
``created_at`` is reset and the caller gets ``NEW`` (with ``Claim.taken_over`` set). This
trades a small risk for liveness: if the first runner was not dead but merely slower than
``stale_after_s``, the request runs twice. Choose ``stale_after_s`` well above the longest
time a request may run (the gateway's deadline plus the app's own timeouts). A runner whose
claim was taken over can no longer store its outcome if it passes its :class:`Claim` to
``complete`` / ``abandon``: the claim is checked against ``created_at``. A takeover is a
single conditional ``UPDATE``, so of two concurrent takers exactly one wins.

**Claims of a dead process.** A store opened with ``hold_liveness`` records its process's
liveness id in ``owner`` (:mod:`latitude.liveness`: a session advisory lock the database drops
when the process's connections close). A running claim whose owner no longer holds that lock is
treated as stale at once: a retry after the primary's gateway was killed runs (or is answered
"answer lost") on its first try, not a minute later.

It imports no gateway module: only the table's statements (:mod:`latitude.claims`), the
liveness lock and the WAL position's SQL.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any

import psycopg
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from latitude.claims import (
    CLAIM_NEW,
    CLAIM_NEW_WITH_NONCE,
    DEFAULT_PURGE_EVERY_S,
    DEFAULT_RETENTION_S,
    DEFAULT_STALE_AFTER_S,
    IN_TIME,
    LOST_ANSWER_BODY,
    LOST_ANSWER_HEADERS,
    LOST_ANSWER_STATUS,
    NONCE_INSERT,
    NONCE_PURGE_EVERY_S,
    NONCES,
    SCHEMA,
    TABLE,
    check_key,
    claim_statement,
    fence_statement,
    headers_json,
    owner_gone,
)
from latitude.consistency.position import POSITION_SQL
from latitude.liveness import RunnerLiveness
from latitude.outcome_store import (
    Claim,
    ClaimTooLate,
    IdempotencyError,
    IdempotencyUnavailable,
    NonceRecord,
    NonceUsed,
    Outcome,
    OutcomeStore,
)
from latitude.primary_pool import RefusalWatch, Refused, new_pool

__all__ = [
    "DEFAULT_PURGE_EVERY_S",
    "DEFAULT_RETENTION_S",
    "DEFAULT_STALE_AFTER_S",
    "TABLE",
    "Claim",
    "IdempotencyError",
    "IdempotencyStore",
    "IdempotencyUnavailable",
    "ClaimTooLate",
    "Outcome",
    "OutcomeStore",
    "claim_statement",
    "fence_statement",
]


class IdempotencyStore:
    """Claims and outcomes of forwarded requests, in the primary database.

    Built on a ``psycopg_pool.AsyncConnectionPool`` given by the caller (who then owns it:
    :meth:`close` leaves it open), or opened from a DSN with :meth:`open` (then :meth:`close`
    closes it). Database failures raise :class:`IdempotencyUnavailable`.
    """

    def __init__(
        self,
        pool: AsyncConnectionPool,
        *,
        liveness: RunnerLiveness | None = None,
        refusals: RefusalWatch | None = None,
        _owns_pool: bool = False,
    ) -> None:
        self._pool = pool
        self._liveness = liveness
        self._refusals = refusals
        self._owns_pool = _owns_pool

    @classmethod
    async def open(
        cls,
        dsn: str,
        *,
        min_size: int = 1,
        max_size: int = 10,
        timeout_s: float = 5.0,
        wait: bool = True,
        connect_timeout_s: float | None = None,
        hold_liveness: bool = False,
        fail_fast_when_refused: bool = False,
    ) -> IdempotencyStore:
        """Open a pool on ``dsn`` (waiting up to ``timeout_s`` for its first connections).

        With ``hold_liveness``, the store also holds this process's liveness lock there
        (:mod:`latitude.liveness`) and its claims record it, so a retry after this process died
        takes them over at once instead of after ``stale_after_s``. The store closes it. Claims
        made before the lock is first held (``wait=False``) record no owner.

        With ``wait=False`` it returns at once and connects in the background: for a database
        that may be out of reach now (the fallback's, over the ocean), one pool is kept and
        reused, and each call waits at most its own ``timeout_s`` for a connection.

        With ``fail_fast_when_refused``, such a wait ends as soon as the pool's latest attempt
        to connect was refused (:mod:`latitude.primary_pool`): a database that is down for
        good says so at once, not after the caller's whole timeout."""
        pool, refusals = new_pool(
            dsn,
            min_size=min_size,
            max_size=max_size,
            timeout_s=timeout_s,
            connect_timeout_s=connect_timeout_s,
            fail_fast_when_refused=fail_fast_when_refused,
        )
        if not wait:
            await pool.open(wait=False)
        else:
            try:
                await pool.open(wait=True, timeout=timeout_s)
            except (PoolTimeout, psycopg.Error) as exc:
                await pool.close()
                raise IdempotencyUnavailable(
                    f"idempotency store: cannot connect to the primary database ({exc})"
                ) from exc
        liveness = None
        if hold_liveness:
            liveness = RunnerLiveness(dsn, connect_timeout_s=connect_timeout_s or timeout_s)
            await liveness.start(wait=wait)
        return cls(pool, liveness=liveness, refusals=refusals, _owns_pool=True)

    @property
    def pool(self) -> AsyncConnectionPool:
        return self._pool

    @property
    def owner(self) -> int | None:
        """The liveness id this process's claims record now (None: no liveness lock held)."""
        return None if self._liveness is None else self._liveness.owner

    async def close(self) -> None:
        if self._liveness is not None:
            await self._liveness.close()
        if self._owns_pool:
            await self._pool.close()

    async def __aenter__(self) -> IdempotencyStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def ensure_schema(self) -> None:
        """Create the table (and its ``created_at`` index) if absent. Safe to run from several
        processes at once: an advisory lock serializes them."""
        async with self._transaction() as conn:
            await conn.execute("select pg_advisory_xact_lock(hashtext(%s))", (TABLE,))
            for statement in SCHEMA.split(";"):
                await conn.execute(statement)

    async def begin(
        self,
        key: str,
        request_hash: str,
        stale_after_s: float = DEFAULT_STALE_AFTER_S,
        *,
        not_after: float | None = None,
        timeout_s: float | None = None,
        nonce: NonceRecord | None = None,
    ) -> Claim:
        """Claim ``key`` for the request identified by ``request_hash`` (see the module doc).

        With ``not_after`` (wall-clock seconds), a claim that reaches the database later claims
        nothing and raises :class:`ClaimTooLate`. ``timeout_s`` bounds the wait for a pooled
        connection (then :class:`IdempotencyUnavailable` with ``sent`` False). With ``nonce``,
        the request's nonce is recorded in the claim's own statement, and a nonce recorded
        before claims nothing and raises :class:`NonceUsed`."""
        # The same in a retry of the statement: its claim and its nonce are its own.
        runner = uuid.uuid4().hex
        return await self._retrying(
            lambda: self._begin_once(
                key, request_hash, stale_after_s, not_after, timeout_s, nonce, runner
            )
        )

    async def record_nonce(self, nonce: NonceRecord, *, timeout_s: float | None = None) -> bool:
        """Record a forwarded request's nonce (one that claims no key: a read, a claim made in
        the app's transaction); False if it was recorded before."""
        runner = uuid.uuid4().hex

        async def once() -> bool:
            async with self._connection(timeout_s) as conn:
                cur = await conn.execute(NONCE_INSERT, (nonce.name, runner, float(nonce.ttl_s)))
                return await cur.fetchone() is not None

        return await self._retrying(once)

    async def ping(self, timeout_s: float | None = None) -> None:
        """One round trip to the database (through a healthy pooled connection)."""

        async def once() -> None:
            async with self._connection(timeout_s) as conn:
                await conn.execute("select 1")

        await self._retrying(once)

    async def position(self, timeout_s: float | None = None) -> str:
        """The database's current WAL position (``pg_current_wal_lsn``) and timeline, as text."""

        async def once() -> str:
            async with self._connection(timeout_s) as conn:
                cur = await conn.execute(f"select {POSITION_SQL}")
                return (await cur.fetchone())[0]

        return await self._retrying(once)

    async def _retrying(self, operation):
        """Run ``operation`` again if a pooled connection turned out to be broken (the database
        restarted, a link was reset): the pool discards each broken one, so after at most as
        many tries as the pool holds connections, a fresh one is used. The error raised says
        ``sent`` if any try may have reached the database."""
        sent = False
        for _ in range(self._pool.max_size):
            try:
                return await operation()
            except IdempotencyUnavailable as exc:
                sent = sent or exc.sent
                # No connection to be had within the timeout (PoolTimeout) is final, not a
                # broken connection to discard and try past.
                if not exc.sent or not isinstance(exc.__cause__, psycopg.OperationalError):
                    exc.sent = sent
                    raise
        try:
            return await operation()
        except IdempotencyUnavailable as exc:
            exc.sent = sent or exc.sent
            raise

    async def _begin_once(
        self,
        key: str,
        request_hash: str,
        stale_after_s: float,
        not_after: float | None,
        timeout_s: float | None,
        nonce: NonceRecord | None = None,
        runner: str | None = None,
    ) -> Claim:
        check_key(key)
        if not request_hash or not isinstance(request_hash, str):
            raise ValueError("request_hash must be a non-empty string")
        if stale_after_s <= 0:
            raise ValueError(f"stale_after_s must be positive, not {stale_after_s!r}")
        in_time = IN_TIME
        limit = None if not_after is None else float(not_after)
        # The row can vanish between the insert and the select (abandoned or purged meanwhile):
        # then claim again. Three rounds are plenty; a fourth would mean a pathological loop.
        for _ in range(3):
            # Autocommit: every statement below is atomic on its own, and one round trip each
            # matters here (this sits on every forwarded write's path).
            async with self._connection(timeout_s) as conn:
                # The claim commits without waiting for its WAL to reach the disk or a quorum
                # (`synchronous_commit = off`): whatever the run writes commits later, with the
                # claim's `applied` mark, and that commit waits for both; the WAL is one
                # sequence, so a disk or a standby that has that commit has the claim too, and
                # a crash or a promotion that loses the claim loses everything the run wrote
                # with it (a retry then runs afresh, correctly). A run that commits nothing
                # leaves nothing to run twice. One WAL flush (and quorum round trip) less per
                # forwarded write: 0.47-0.70 -> 0.17-0.22 ms with fsync on (benchmarks/README.md).
                claimed = (key, request_hash, self.owner, runner or None, limit)
                if nonce is None:
                    cur = await conn.execute(CLAIM_NEW, claimed)
                    inserted = await cur.fetchone()
                else:
                    recorded = (nonce.name, runner, float(nonce.ttl_s))
                    cur = await conn.execute(CLAIM_NEW_WITH_NONCE, recorded + claimed)
                    fresh, created_at = await cur.fetchone()
                    if not fresh:
                        raise NonceUsed(f"nonce {nonce.name!r} was recorded before")
                    inserted = None if created_at is None else (created_at,)
                if inserted:
                    return Claim(Outcome.NEW, key, started_at=inserted[0])
                cur = await conn.execute(
                    f"select request_hash, state, status, headers, body, created_at, "
                    f"{POSITION_SQL}, {in_time}, runner, applied from {TABLE} where key = %s",
                    (limit, key),
                )
                row = await cur.fetchone()
                if row is None:
                    if limit is not None and not await self._in_time(conn, limit):
                        raise ClaimTooLate(
                            f"idempotency key {key!r}: the claim reached the database after "
                            "its deadline; nothing was claimed"
                        )
                    continue
                stored_hash, state, status, headers, body, created_at, position, ok = row[:8]
                stored_runner, applied = row[8:]
                if stored_hash != request_hash:
                    return Claim(Outcome.MISMATCH, key)
                if state == "completed":
                    return Claim(
                        Outcome.REPLAY,
                        key,
                        status=status,
                        headers=[(n, v) for n, v in headers or []],
                        body=bytes(body or b""),
                        position=position,
                    )
                if not ok:
                    raise ClaimTooLate(
                        f"idempotency key {key!r}: the claim reached the database after its "
                        "deadline; nothing was claimed"
                    )
                if runner and stored_runner == runner and not applied:
                    # This call's own claim: its statement committed, but the connection broke
                    # before the answer came back, and `_retrying` sent it again. Nothing ran.
                    return Claim(Outcome.NEW, key, started_at=created_at)
                # A stale run, or one whose process died, that never committed is taken over;
                # one that did (its answer lost) is settled as such, never run again. The
                # update waits for a run still inside a transaction, then sees whether it
                # committed.
                over = f"(created_at < now() - make_interval(secs => %s) or {owner_gone()})"
                cur = await conn.execute(
                    f"update {TABLE} set created_at = now(), owner = %s, runner = %s "
                    f"where key = %s and state = 'running' and request_hash = %s and {over} "
                    f"and not applied and {in_time} returning created_at",
                    (self.owner, runner or None, key, request_hash, float(stale_after_s), limit),
                )
                taken = await cur.fetchone()
                if taken:
                    return Claim(Outcome.NEW, key, started_at=taken[0], taken_over=True)
                if await self._settle_lost_answer(
                    conn,
                    f"key = %s and request_hash = %s and {over}",
                    (key, request_hash, float(stale_after_s)),
                ):
                    continue  # now completed: the next round replays it
                return Claim(Outcome.IN_PROGRESS, key, started_at=created_at)
        raise IdempotencyError(f"idempotency key {key!r}: could not claim it (row keeps vanishing)")

    @staticmethod
    async def _settle_lost_answer(conn: psycopg.AsyncConnection, where: str, args: tuple) -> bool:
        """Complete the running, applied claim matching ``where`` with the lost-answer outcome."""
        cur = await conn.execute(
            f"update {TABLE} set state = 'completed', status = %s, headers = %s, body = %s, "
            f"completed_at = now() where state = 'running' and applied and {where} "
            "returning key",
            (LOST_ANSWER_STATUS, Jsonb(headers_json(LOST_ANSWER_HEADERS)), LOST_ANSWER_BODY)
            + tuple(args),
        )
        return await cur.fetchone() is not None

    @staticmethod
    async def _in_time(conn: psycopg.AsyncConnection, limit: float) -> bool:
        cur = await conn.execute("select clock_timestamp() < to_timestamp(%s)", (limit,))
        return (await cur.fetchone())[0]

    async def complete(
        self,
        key: str,
        status: int,
        headers: Iterable[Sequence[str | bytes]],
        body: bytes,
        *,
        claim: Claim | None = None,
    ) -> bool:
        """Store the response of a running request. Returns ``False`` (and stores nothing) if
        the row is no longer running, or, with ``claim``, no longer that claim's run."""
        stored, _ = await self.complete_at_position(key, status, headers, body, claim=claim)
        return stored

    async def complete_at_position(
        self,
        key: str,
        status: int,
        headers: Iterable[Sequence[str | bytes]],
        body: bytes,
        *,
        claim: Claim | None = None,
        timeout_s: float | None = None,
    ) -> tuple[bool, str | None]:
        """:meth:`complete`, also returning the database's WAL position (``pg_current_wal_lsn``)
        read in the same round trip: after the request's own commits, so a replica that has
        replayed it shows everything the request wrote."""
        check_key(key)
        query = (
            f"update {TABLE} set state = 'completed', status = %s, headers = %s, body = %s, "
            "completed_at = now() where key = %s and state = 'running'"
        )
        params: list[Any] = [int(status), Jsonb(headers_json(headers)), bytes(body), key]
        query, params = _with_claim(query, params, claim)
        return await self._retrying(lambda: self._complete_at(query, params, timeout_s))

    async def _complete_at(
        self, query: str, params: list[Any], timeout_s: float | None
    ) -> tuple[bool, str | None]:
        async with self._connection(timeout_s) as conn:
            cur = await conn.execute(
                f"with done as ({query} returning key) "
                f"select (select count(*) from done), {POSITION_SQL}",
                params,
            )
            stored, position = await cur.fetchone()
            return stored > 0, position

    async def complete_run(
        self,
        key: str,
        request_hash: str,
        runner: str,
        status: int,
        headers: Iterable[Sequence[str | bytes]],
        body: bytes,
        *,
        timeout_s: float | None = None,
    ) -> tuple[bool, str | None]:
        """Store the outcome of the run ``runner``, whose claim was made in the app's own
        transactions (:func:`claim_statement`), and read the WAL position, in one round trip:
        the run's running row is completed, or, if none of its transactions committed (no row),
        a completed row is inserted. A row that is anyone else's is left as it is (``False``)."""
        check_key(key)
        query = (
            f"with done as (insert into {TABLE} as t "
            "(key, request_hash, state, status, headers, body, completed_at, runner) "
            "values (%s, %s, 'completed', %s, %s, %s, now(), %s) "
            "on conflict (key) do update set state = 'completed', status = excluded.status, "
            "headers = excluded.headers, body = excluded.body, completed_at = now() "
            "where t.runner = excluded.runner and t.state = 'running' returning 1) "
            f"select (select count(*) from done), {POSITION_SQL}"
        )
        params = (key, request_hash, int(status), Jsonb(headers_json(headers)), bytes(body))
        params += (runner,)

        async def once() -> tuple[bool, str | None]:
            async with self._connection(timeout_s) as conn:
                cur = await conn.execute(query, params)
                stored, position = await cur.fetchone()
                return stored > 0, position

        return await self._retrying(once)

    async def settle_run(self, key: str, runner: str, *, timeout_s: float | None = None) -> bool:
        """The run ``runner`` failed after a transaction of it committed its claim: complete
        its row with the "answer lost" outcome, so a retry does not run it again. ``False`` if
        the run has no running row (none of its transactions committed: nothing to release)."""
        check_key(key)

        async def once() -> bool:
            async with self._connection(timeout_s) as conn:
                return await self._settle_lost_answer(
                    conn, "key = %s and runner = %s", (key, runner)
                )

        return await self._retrying(once)

    async def abandon(
        self, key: str, *, claim: Claim | None = None, timeout_s: float | None = None
    ) -> bool:
        """Delete a running row (the app failed) so a retry may run it. Returns ``False`` if
        there was no such running row (or, with ``claim``, not that run), or if the run had
        committed a transaction (see Fencing): that row is completed as "answer lost" instead."""
        check_key(key)
        query, params = _with_claim(
            f"delete from {TABLE} where key = %s and state = 'running' and not applied",
            [key],
            claim,
        )

        async def once() -> bool:
            async with self._connection(timeout_s) as conn:
                # Waits for the run's transaction, if one is still open, to end.
                cur = await conn.execute(query + " returning key", params)
                if await cur.fetchone() is not None:
                    return True
                # Not deleted: gone, or the run committed something before it failed.
                where, args = _with_claim("key = %s", [key], claim)
                await self._settle_lost_answer(conn, where, tuple(args))
                return False

        # Releasing matters most right after a link broke every pooled connection.
        return await self._retrying(once)

    async def purge(self, older_than_s: float) -> int:
        """Delete every row claimed more than ``older_than_s`` seconds ago; return how many."""
        if older_than_s < 0:
            raise ValueError(f"older_than_s must not be negative, not {older_than_s!r}")
        async with self._transaction() as conn:
            cur = await conn.execute(
                f"delete from {TABLE} where created_at < now() - make_interval(secs => %s)",
                (float(older_than_s),),
            )
            return cur.rowcount

    async def purge_nonces(self) -> int:
        """Delete the nonces whose signatures have expired; return how many."""
        async with self._transaction() as conn:
            cur = await conn.execute(f"delete from {NONCES} where expires_at < clock_timestamp()")
            return cur.rowcount

    async def purge_periodically(
        self,
        retention_s: float = DEFAULT_RETENTION_S,
        every_s: float = DEFAULT_PURGE_EVERY_S,
        on_error=None,
        nonces_every_s: float = NONCE_PURGE_EVERY_S,
    ) -> None:
        """Run :meth:`purge` (rows older than ``retention_s``) now and then every ``every_s``,
        and :meth:`purge_nonces` every ``nonces_every_s`` (a nonce is kept for seconds, but one
        is recorded per forwarded request), until cancelled. A failed purge (the database is
        away) is reported to ``on_error`` and tried again at the next turn: the tables must not
        grow without bound, but a purge is never urgent."""
        if retention_s <= 0 or every_s <= 0 or nonces_every_s <= 0:
            raise ValueError(
                "retention_s, every_s and nonces_every_s must be positive, not "
                f"{retention_s!r} / {every_s!r} / {nonces_every_s!r}"
            )
        outcomes_due = time.monotonic()
        while True:
            try:
                await self.purge_nonces()
                if time.monotonic() >= outcomes_due:
                    outcomes_due = time.monotonic() + every_s
                    await self.purge(retention_s)
            except (IdempotencyError, psycopg.Error) as exc:
                if on_error is not None:
                    on_error(exc)
            await asyncio.sleep(min(every_s, nonces_every_s))

    @contextlib.asynccontextmanager
    async def _connection(
        self, timeout_s: float | None = None
    ) -> AsyncIterator[psycopg.AsyncConnection]:
        """A pooled autocommit connection; database failures become `IdempotencyUnavailable`
        (``sent`` False when no connection was had, so nothing was sent)."""
        try:
            if self._refusals is None or timeout_s is None:
                async with self._pool.connection(timeout=timeout_s) as conn:
                    yield conn
            else:
                conn = await self._refusals.getconn(self._pool, timeout_s)
                try:
                    yield conn
                finally:
                    await self._pool.putconn(conn)
        except PoolTimeout as exc:  # raised only while waiting for a connection
            raise IdempotencyUnavailable(
                f"idempotency store: primary database unavailable ({type(exc).__name__}: {exc})",
                sent=False,
            ) from exc
        except Refused as exc:  # nothing was sent: no connection was had
            raise IdempotencyUnavailable(
                f"idempotency store: the primary database refuses connections ({exc})",
                sent=False,
            ) from exc
        except psycopg.OperationalError as exc:
            raise IdempotencyUnavailable(
                f"idempotency store: primary database unavailable ({type(exc).__name__}: {exc})"
            ) from exc

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[psycopg.AsyncConnection]:
        """A pooled connection inside one transaction; connection-level database failures
        become :class:`IdempotencyUnavailable`."""
        try:
            async with self._pool.connection() as conn, conn.transaction():
                yield conn
        except (PoolTimeout, psycopg.OperationalError) as exc:
            raise IdempotencyUnavailable(
                f"idempotency store: primary database unavailable ({type(exc).__name__}: {exc})"
            ) from exc


def _with_claim(query: str, params: list[Any], claim: Claim | None) -> tuple[str, list[Any]]:
    if claim is None:
        return query, params
    if claim.started_at is None:
        raise ValueError(f"claim for {claim.key!r} ({claim.outcome}) is not a running claim")
    return query + " and created_at = %s", [*params, claim.started_at]
