"""When the primary region's gateway cannot be reached: run here, with SQL to the primary.

A write is run in this region with its SQL routed over the ocean to the primary database,
after its idempotency key is claimed there exactly as the primary's gateway would claim it:
whichever runs first, the request runs once. A read meant for the primary (the replica is
behind) reads the primary database the same way, or, if that is out of reach too, the local
replica's answer marked `Latitude-Stale`. When neither the primary's gateway nor its database
answers, the region is read-only and says so (`answers.ReadOnly`).
"""

from __future__ import annotations

import asyncio
import logging
import time

from latitude import db
from latitude.gateway.answers import KeyReused, ReadOnly, refuse
from latitude.gateway.deadlines import bounded, in_background
from latitude.gateway.envelope import SESSION_LENGTH, STALE, client_headers
from latitude.gateway.messages import (
    CapturedResponse,
    Scope,
    Send,
    SpooledBody,
    header,
    send_response,
)
from latitude.gateway.observe import note
from latitude.gateway.positions import request_route
from latitude.idempotency import (
    Claim,
    ClaimTooLate,
    IdempotencyStore,
    IdempotencyUnavailable,
    Outcome,
    OutcomeStore,
)

log = logging.getLogger("latitude.gateway")

# Bounds what a run over the ocean may hold: SQL over a slow link completes; a stalled one
# must not keep the run (and its claim) forever.
FALLBACK_TIMEOUT_S = 30.0
# A transaction whose next statement is held by a stalled link is aborted by the database
# well before the fallback's bound, so a late commit cannot land.
FENCE_IDLE_S = 10.0
# A write whose position is unknown sends its writer's reads to the primary until the cookie
# expires: a position no replica reaches.
UNKNOWN_POSITION = "FFFFFFFF/FFFFFFFF"


def marked_stale(send: Send) -> Send:
    """`send`, adding `Latitude-Stale` to the answer: it comes from this region's replica,
    which may not have replayed the client's latest write (the primary is out of reach)."""

    async def marked(message: dict) -> None:
        if message["type"] == "http.response.start":
            headers = [*message.get("headers", []), (STALE, b"replica")]
            message = {**message, "headers": headers}
        await send(message)

    return marked


class Fallback:
    """One region's fallback: its pool to the primary database, made once and kept."""

    def __init__(self, gateway, store: OutcomeStore | None = None) -> None:
        self.gateway = gateway
        self._store = store
        self._store_lock = asyncio.Lock()
        self._renewed_at = float("-inf")
        self._primary_db_seen_at = float("-inf")  # when a read last reached the primary DB

    async def open(self) -> OutcomeStore:
        """The primary database's idempotency table over the ocean: one pool that connects in
        the background; each call bounds its own wait."""
        async with self._store_lock:
            if self._store is None:
                cfg = self.gateway.config
                url = cfg.region.primary_database_url
                if not url:
                    raise RuntimeError(f"region {cfg.region.name} has no primary_database_url")
                # The liveness lock lets the primary's gateway take over the claims of a run
                # stalled here by a cut within seconds of the cut, not after stale_after_s.
                self._store = await IdempotencyStore.open(
                    url,
                    min_size=1,
                    max_size=4,
                    wait=False,
                    connect_timeout_s=cfg.connect_timeout_s,
                    hold_liveness=True,
                    # A primary database that is down for good (the region died) is told at
                    # once: "read-only for now" in one round trip, not after the deadline.
                    fail_fast_when_refused=True,
                )
        return self._store

    async def detach(self) -> OutcomeStore | None:
        """Give up the pool (the primary moved): the next use makes a new one to the new
        primary; the caller closes the old one once requests in flight are done with it."""
        async with self._store_lock:
            store, self._store = self._store, None
        self._primary_db_seen_at = float("-inf")
        return store

    async def close(self) -> None:
        store = await self.detach()
        if store is not None:
            await store.close()

    def _renew(self) -> None:
        """No connection could be had from the pool: start a fresh one for the next request
        (at most every 2 s). After a run of cuts and resets psycopg_pool backs off its
        reconnects for longer than a deadline, and its connections may be held by attempts
        stalled on the old link; a new pool connects at once."""
        now = time.monotonic()
        if self._store is None or now - self._renewed_at < 2.0:
            return
        self._renewed_at = now
        old, self._store = self._store, None
        self.gateway.counters["fallback_pool_renewed"] += 1
        in_background(old.close())

    # ---- writes ----------------------------------------------------------------------------

    async def write(
        self,
        scope: Scope,
        body: SpooledBody,
        send: Send,
        key: str,
        fingerprint: str,
        deadline: float,
        maybe_sent: bool = False,
    ) -> None:
        """Claim the key in the primary database, run the app here, store its outcome. The
        client hears by the deadline; what is still under way then (a claim or the app's SQL
        held by a stalled link) finishes in the background and settles the key, so a retry
        with it gets the outcome. `maybe_sent`: a forwarded attempt may have reached the
        primary, so nothing can be promised unchanged."""
        gw = self.gateway

        def left() -> float:
            return max(0.0, deadline - time.monotonic())

        try:
            store = await self.open()
            claim = await self._claim(store, key, fingerprint, deadline)
        except Exception as exc:  # unreachable, stalled or failing
            log.warning(
                "fallback for %s %s: primary database: %r", scope["method"], scope["path"], exc
            )
            not_sent = isinstance(exc, IdempotencyUnavailable) and not exc.sent
            if not_sent:
                self._renew()
            if (isinstance(exc, ClaimTooLate) or not_sent) and not maybe_sent:
                gw.counters["read_only"] += 1
                note(scope, outcome="read_only")
                why = "neither the primary region nor its database answers"
                await refuse(scope, send, ReadOnly(why, key=key))
            else:
                # The claim (or the forwarded attempt) may yet land: only the key can tell.
                await self.gateway.deadline_passed(scope, send, key)
            return
        if claim.outcome is Outcome.REPLAY:
            gw.counters["replayed"] += 1
            stored = claim.asgi_headers()
            n = int(header(stored, SESSION_LENGTH) or "0")
            headers = client_headers(stored)
            headers += gw.positions.cookie_headers(scope, claim.position)
            await send_response(send, claim.status, headers, claim.body[: len(claim.body) - n])
            return
        if claim.outcome is Outcome.IN_PROGRESS:
            await self.gateway.deadline_passed(scope, send, key)
            return
        if claim.outcome is Outcome.MISMATCH:
            why = "This Idempotency-Key was already used for a different request."
            await refuse(scope, send, KeyReused(why))
            return
        gw.counters["fallback"] += 1
        note(scope, outcome="fallback")
        claimed_at = time.monotonic()
        # The run may outlive this request (which closes its spooled body): it gets a copy.
        data = b"".join([chunk async for chunk in body.chunks()])
        run = asyncio.ensure_future(self._run_app(scope, data, claim))
        await asyncio.wait({run}, timeout=left())
        if not run.done():
            # The app's SQL may or may not commit: the run settles the key when it ends.
            log.warning(
                "fallback for %s %s (key %s) still running at the deadline (%.2f s after the "
                "claim); answering 504",
                scope["method"],
                scope["path"],
                key,
                time.monotonic() - claimed_at,
            )
            in_background(self._settle(store, claim, run))
            await self.gateway.deadline_passed(scope, send, key)
            return
        if run.exception() is not None:
            log.warning(
                "fallback for %s %s (key %s) failed: %r",
                scope["method"],
                scope["path"],
                key,
                run.exception(),
            )
            gw.counters["fallback_failed"] += 1
            in_background(store.abandon(key, claim=claim, timeout_s=FALLBACK_TIMEOUT_S))
            await self.gateway.deadline_passed(scope, send, key)
            return
        captured = run.result()
        storing = asyncio.ensure_future(self._store_outcome(store, claim, captured))
        await asyncio.wait({storing}, timeout=left())
        if storing.done() and storing.exception() is None:
            position = storing.result()
        else:
            if not storing.done():
                in_background(storing)
            log.warning("could not store the outcome of %s (key %s) in time", scope["path"], key)
            position = UNKNOWN_POSITION
        await send_response(
            send,
            captured.status,
            [*captured.headers, *gw.positions.cookie_headers(scope, position)],
            bytes(captured.body),
        )

    async def _claim(self, store: OutcomeStore, key, fingerprint, deadline) -> Claim:
        """Claim the key in the primary database by the deadline. A claim that lands later is
        refused by the database (`not_after`); one whose answer comes late is released."""
        not_after = time.time() + max(0.0, deadline - time.monotonic())
        while True:
            left = max(0.0, deadline - time.monotonic())
            attempt = asyncio.ensure_future(
                store.begin(key, fingerprint, not_after=not_after, timeout_s=max(0.01, left - 0.1))
            )
            await asyncio.wait({attempt}, timeout=left)
            if not attempt.done():
                in_background(attempt, then=lambda c: self._release_late_claim(store, c))
                raise TimeoutError(
                    f"the primary database did not answer the claim within {left:.2f} s"
                )
            claim = attempt.result()
            if claim.outcome is not Outcome.IN_PROGRESS or deadline - time.monotonic() < 0.1:
                return claim
            await asyncio.sleep(0.05)

    def _release_late_claim(self, store: OutcomeStore, claim: Claim) -> None:
        if claim.outcome is Outcome.NEW:
            self.gateway.counters["fallback_late_claims_released"] += 1
            in_background(store.abandon(claim.key, claim=claim, timeout_s=FALLBACK_TIMEOUT_S))

    async def _run_app(self, scope: Scope, data: bytes, claim: Claim) -> CapturedResponse:
        """Run the app here with its SQL routed to the primary database, each of its
        transactions fenced by the claim (committed with it, or not at all)."""
        gw = self.gateway
        captured = CapturedResponse()
        given, finished = False, asyncio.Event()

        async def receive() -> dict:
            nonlocal given
            if given:  # as a server does: "disconnected" only once the answer is complete
                await finished.wait()
                return {"type": "http.disconnect"}
            given = True
            return {"type": "http.request", "body": data, "more_body": False}

        async def send(message: dict) -> None:
            await captured.send(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                finished.set()

        route = request_route(db.PRIMARY, scope["method"], scope["path"], gw.config.region.name)
        fence = db.claimed(claim.key, claim.started_at, idle_timeout_s=FENCE_IDLE_S)
        with route, fence:
            await bounded(gw.app(gw.edge_scope(scope), receive, send), FALLBACK_TIMEOUT_S)
        return captured

    async def _store_outcome(
        self, store: OutcomeStore, claim: Claim, captured: CapturedResponse
    ) -> str:
        _, lsn = await store.complete_at_position(
            claim.key,
            captured.status,
            [*client_headers(captured.headers), (SESSION_LENGTH, b"0")],
            bytes(captured.body),
            claim=claim,
            timeout_s=FALLBACK_TIMEOUT_S,
        )
        return lsn

    async def _settle(self, store: OutcomeStore, claim: Claim, run: asyncio.Future) -> None:
        """After the client was answered 504: store the run's outcome when it ends, or release
        the claim if the app failed. A run that never ends (stalled past the fallback bound)
        keeps the claim: its SQL may still commit, so the key waits until the database drops
        this process's liveness lock (a cut link: seconds) or the claim goes stale."""
        try:
            captured = await run
        except TimeoutError:
            log.warning("fallback run for key %s stalled; its claim is kept", claim.key)
            return
        except Exception:
            self.gateway.counters["fallback_failed"] += 1
            await store.abandon(claim.key, claim=claim, timeout_s=FALLBACK_TIMEOUT_S)
            return
        await self._store_outcome(store, claim, captured)

    # ---- reads -----------------------------------------------------------------------------

    async def read(self, scope: Scope, body: SpooledBody, send: Send, deadline: float) -> None:
        """A read meant for the primary that cannot be forwarded: read the primary database
        over the ocean; if that is out of reach too, serve the local replica's answer, marked
        stale (`Latitude-Stale`): better than none."""
        gw = self.gateway
        # The SQL of a read needs a round trip or two: give it a moment even late in the budget.
        budget = max(deadline - time.monotonic(), gw.config.read_wait_s, 1.0)
        started = time.monotonic()
        captured = CapturedResponse()
        try:
            # One ocean round trip at most once a second, not one more per read.
            if time.monotonic() - self._primary_db_seen_at > 1.0:
                store = await self.open()
                await bounded(store.ping(timeout_s=budget), budget)
                self._primary_db_seen_at = time.monotonic()
            left = budget - (time.monotonic() - started)
            route = request_route(db.PRIMARY, scope["method"], scope["path"], gw.config.region.name)
            with route:
                run = gw.app(gw.edge_scope(scope), *body.replay(body.size, captured.send))
                await bounded(run, max(left, 0.05))
        except Exception as exc:
            log.warning(
                "read %s: the primary database is out of reach too (%r); serving it stale",
                scope["path"],
                exc,
            )
            self._primary_db_seen_at = float("-inf")
            await self.stale_read(scope, body, send)
            return
        await send_response(send, captured.status, captured.headers, bytes(captured.body))

    async def stale_read(self, scope: Scope, body: SpooledBody, send: Send) -> None:
        gw = self.gateway
        gw.counters["read_served_stale"] += 1
        await gw.run_here(scope, *body.replay(body.size, marked_stale(send)), db.REPLICA)
