"""The primary region's side of forwarding: verify, claim, run, store, sign.

A forwarded request is run once per idempotency key: its signature and nonce are checked, the
key is claimed in the primary database (or, with `idempotency_claim = "in_transaction"`, by
the app's own first transaction), the replica's session is put in place, the app runs with
each of its transactions fenced by the claim, and the answer (with the session after the
run and the WAL position that holds the write) is stored under the key and signed back. Every
refusal on the way is signed too (`answers.TABLE` gives its status), so the replica relays it
and leaves its session unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from dataclasses import dataclass

from latitude import db
from latitude.cookies import set_cookie_value
from latitude.gateway.admission import ForwardingSlots
from latitude.gateway.answers import (
    AppFailed,
    BudgetSpent,
    Busy,
    Demoted,
    GatewayFault,
    KeyInProgress,
    KeyReused,
    NotPrimary,
    Refused,
    StoppedPastBudget,
    answer_headers,
    refusal_for,
    refuse,
    with_key,
)
from latitude.gateway.classify import SAFE_METHODS
from latitude.gateway.config import CLAIM_IN_TRANSACTION, GatewayConfigError
from latitude.gateway.envelope import (
    FORWARDED_FROM,
    IDEMPOTENCY,
    IDEMPOTENCY_KEY,
    POSITION,
    SIGNED_REQUEST_HEADERS,
    SIGNED_RESPONSE_HEADERS,
    BadEnvelope,
    ForwardedRequest,
    Headers,
    SessionTail,
    announced_body_length,
    pack_answer,
    refusal_tail,
    request_fingerprint,
    session_id,
    target,
    unpack_request,
)
from latitude.gateway.messages import (
    BodyTooLarge,
    CapturedResponse,
    ClientDisconnected,
    Receive,
    Scope,
    Send,
    SpooledBody,
    header,
    send_response,
)
from latitude.gateway.observe import TTFB, note, watch_answer
from latitude.gateway.positions import request_route
from latitude.gateway.upstream import HttpUpstream
from latitude.idempotency import Claim, IdempotencyUnavailable, Outcome
from latitude.outcome_store import NonceRecord, NonceUsed
from latitude.sessions import SessionError, SessionStoreUnavailable, carried_sessions
from latitude.signing import (
    DigestMismatch,
    SignatureError,
    VerifiedSignature,
    check_request,
    content_digest,
    nonce_entry,
    replayed,
    sign_response,
    verify_content_digest,
)

log = logging.getLogger("latitude.gateway")

# The primary's copy of a replica region's session lives only as long as a request may run on
# it: the session's home is its own region.
PRIMARY_SESSION_COPY_TTL_S = 60
# What a signed refusal can be (anything else is a bug, and propagates).
_SIGNED_REFUSALS = (Refused, SessionError, IdempotencyUnavailable, BadEnvelope)


@dataclass
class NonceCheck:
    """A forwarded request's nonce on its way into the replay cache: recorded by the eager
    claim's own statement, or meanwhile by `task`."""

    verified: VerifiedSignature
    task: asyncio.Future | None = None

    @property
    def in_claim(self) -> bool:
        """Recorded by the key's eager claim (decided once, when the request arrived: a
        promotion that swaps the config meanwhile must not record it twice)."""
        return self.task is None


class PrimarySide:
    """Runs the requests other regions forward here. Holds no request state of its own: the
    gateway's parts (`config`, `session_store`, `idempotency`, `epochs`) are read
    from it at each request, as a promotion may replace them."""

    def __init__(self, gateway) -> None:
        self.gateway = gateway
        self._warned_no_transaction = False
        cfg = gateway.config
        self.runs = ForwardingSlots(
            cfg.max_runs, cfg.queue_size, doing="running at the primary", setting="max_runs"
        )
        if gateway.config.idempotency_claim == CLAIM_IN_TRANSACTION and isinstance(
            gateway.app, HttpUpstream
        ):
            # Fail closed: the claim would never be made, and every retry would run again.
            raise GatewayConfigError(
                '[gateway] idempotency_claim = "in_transaction" needs an app on latitude.db in '
                "the gateway's own process; an app behind --upstream runs its SQL elsewhere: "
                'use idempotency_claim = "eager"'
            )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        arrived = time.monotonic()
        gw = self.gateway
        cfg = gw.config
        if not cfg.is_primary:
            kind = NotPrimary if gw.epochs.token is None else Demoted
            why = f"{cfg.region.name} is not the primary region; forward to {cfg.primary.name}"
            await refuse(scope, send, kind(why), extra=gw.epochs.headers())
            return
        headers = scope["headers"]
        url = f"{scope.get('scheme', 'http')}://{header(headers, b'host') or ''}{target(scope)}"
        try:
            verified = check_request(
                cfg.keyring,
                method=scope["method"],
                url=url,
                headers=headers,
                must_cover=SIGNED_REQUEST_HEADERS,
            )
        except SignatureError as exc:
            await self._reject(scope, send, exc)
            return
        # The replay cache is the primary database: an eager claim records the nonce in its
        # own statement; any other request's nonce is recorded while its body is read and it
        # waits for a run slot. Nothing of a request is run, replayed or stored before its
        # nonce is known to be new (`_claim`, `_execute`).
        nonce = NonceCheck(verified)
        if not self._claims_eagerly(scope):
            nonce.task = asyncio.ensure_future(self._record_nonce(verified))
        try:
            await self._verified(scope, receive, send, arrived, nonce)
        finally:
            if nonce.task is not None:
                if not nonce.task.done():
                    nonce.task.cancel()  # refused before it mattered
                with contextlib.suppress(BaseException):
                    await nonce.task

    def _claims_eagerly(self, scope: Scope) -> bool:
        """Whether the request's key is claimed before it runs (not by the app's transaction;
        a read claims nothing)."""
        return (
            scope["method"] not in SAFE_METHODS
            and self.gateway.config.idempotency_claim != CLAIM_IN_TRANSACTION
        )

    async def _record_nonce(self, verified: VerifiedSignature) -> None:
        if not await self.gateway.idempotency.record_nonce(NonceRecord(*nonce_entry(verified))):
            raise replayed(verified)

    async def _reject(self, scope: Scope, send: Send, exc: SignatureError) -> None:
        self.gateway.counters["rejected"] += 1
        note(scope, idempotency="rejected")
        await refuse(scope, send, exc)  # not signed: it may not come from a gateway at all

    async def _verified(
        self, scope: Scope, receive: Receive, send: Send, arrived: float, nonce: NonceCheck
    ) -> None:
        gw = self.gateway
        cfg = gw.config
        headers = scope["headers"]
        box, send = watch_answer(scope, send)
        try:
            # The replica's gateway bounds the body; the session rides after it.
            body = await SpooledBody.read(
                receive,
                prefix_length=announced_body_length(headers),
                max_bytes=cfg.max_body_bytes + cfg.session_limit_bytes + 64 * 1024,
            )
        except BodyTooLarge as exc:
            await self._refuse_signed(send, headers, exc)
            return
        try:
            verify_content_digest(header(headers, b"content-digest"), body.digest)
        except DigestMismatch as exc:
            gw.counters["rejected"] += 1
            await refuse(scope, send, exc)
            return
        try:
            await self._execute_in_turn(scope, send, body, arrived, nonce)
        except SignatureError as exc:  # a replayed nonce, known only now
            await self._reject(scope, send, exc)
        except _SIGNED_REFUSALS as exc:
            if isinstance(exc, IdempotencyUnavailable):  # a retry with the key is the way on
                with_key(exc, header(headers, IDEMPOTENCY_KEY))
            await self._refuse_signed(send, headers, exc)
        except ClientDisconnected:
            raise
        except Exception as exc:
            if TTFB in box:  # half an answer is out: only closing the connection is left
                raise
            # A bug of ours or an error no part names, before the answer: signed, so the
            # replica relays it with the key (a claim of a run that failed was released, one
            # whose effects committed answers a retry as applied, not by running again).
            log.exception("a forwarded %s %s failed", scope["method"], scope["path"])
            gw.counters["gateway_fault"] += 1
            key = header(headers, IDEMPOTENCY_KEY)
            fault = GatewayFault(f"{type(exc).__name__} at the primary region", key=key)
            await self._refuse_signed(send, headers, fault)
        finally:
            body.close()

    async def _execute_in_turn(
        self, scope: Scope, send: Send, body: SpooledBody, arrived: float, nonce: NonceCheck
    ) -> None:
        """Run the request once one of `max_runs` run slots is free; refused unrun (its key
        free) if none could come free in time for it to finish within its budget."""
        request = unpack_request(scope, body.size)
        # When the attempt's budget runs out here (counted from its arrival), if it has one; a
        # request from a gateway that sends none may wait for a slot as long as a deadline.
        ends = None if request.budget_s is None else arrived + request.budget_s
        wait_until = arrived + self.gateway.config.deadline_s if ends is None else ends
        try:
            async with self.runs.slot(wait_until - time.monotonic()):
                self._check_budget(request, ends)  # after the wait for the slot, if any
                await self._execute(scope, send, body, request, ends, nonce)
        except Busy as exc:  # only the slot raises it: nothing of the request ran
            self.gateway.counters["budget_spent"] += 1
            raise BudgetSpent(f"{exc}, so it was not run", key=request.key) from None

    async def _execute(
        self,
        scope: Scope,
        send: Send,
        body: SpooledBody,
        request: ForwardedRequest,
        ends: float | None,
        nonce: NonceCheck,
    ) -> None:
        gw = self.gateway
        headers = scope["headers"]
        sid = session_id(headers, gw.config.session_cookie)
        claim: Claim | None = None
        pending: db.ClaimInTransaction | None = None
        fingerprint = ""
        if scope["method"] not in SAFE_METHODS:  # a read changes nothing: it simply runs again
            fingerprint = request_fingerprint(
                scope, body.prefix_digest(body.size - request.session_length), sid
            )
            if not nonce.in_claim:
                # The app's first transaction makes the claim (docs/gateway.md).
                pending = db.ClaimInTransaction(
                    request.key, fingerprint, uuid.uuid4().hex, owner=gw.idempotency.owner
                )
            else:
                claim = await self._claim(scope, request.key, fingerprint, nonce.verified)
                if claim.outcome is Outcome.REPLAY:
                    await self._send_replay(send, headers, claim)
                    return
        if not nonce.in_claim:  # a read, or the claim in the transaction
            await nonce.task
        try:
            if claim is not None:  # the claim's round trip may have spent the rest
                self._check_budget(request, ends)
            ttl = self._copy_ttl(headers)
            brought = await self._bring_session(sid, body.read_tail(request.session_length), ttl)
            with self._carrying(sid, brought) as box:
                captured = await self._run_app(scope, request, body, claim or pending, ends)
            if pending is None or not pending.refused:
                out_headers, envelope = pack_answer(
                    captured.headers,
                    bytes(captured.body),
                    *await self._session_after(captured, sid, brought, box, ttl),
                )
        except BaseException as exc:
            if pending is None or not pending.refused or not isinstance(exc, Exception):
                await self._abandon(claim, pending)
                raise
        if pending is not None and pending.refused:
            # Whatever the app made of its refused transaction: the store has the answer.
            await self._answer_from_store(scope, send, headers, request.key, fingerprint)
            return
        # One round trip stores the outcome and reads the WAL position the replica must reach.
        if pending is not None:
            note(scope, idempotency=Outcome.NEW.value)
            if not pending.taken:
                self._warn_no_transaction(scope)
            _, position = await gw.idempotency.complete_run(
                request.key, fingerprint, pending.runner, captured.status, out_headers, envelope
            )
        elif claim is None:
            position = await gw.idempotency.position()
        else:
            _, position = await gw.idempotency.complete_at_position(
                request.key, captured.status, out_headers, envelope, claim=claim
            )
        if position:
            out_headers.append((POSITION, position.encode()))
        gw.counters["executed_forwarded"] += 1
        await self._send_signed(send, headers, captured.status, out_headers, envelope)

    def _check_budget(self, request: ForwardedRequest, ends: float | None) -> None:
        """Refuse (before the app runs) a request that has waited here longer than the time
        its replica had left for it: its answer could only reach a connection that gave up,
        and under overload such work is what keeps the primary from catching up."""
        if ends is not None and time.monotonic() >= ends:
            self.gateway.counters["budget_spent"] += 1
            raise BudgetSpent(
                f"the request waited at the primary region past the {request.budget_s:.2f} s "
                "its region had left for it, so it was not run",
                key=request.key,
            )

    def _warn_no_transaction(self, scope: Scope) -> None:
        """A write that opened no `latitude.db` transaction held no claim while it ran: right
        for a write that only changes the session, a sign that the app writes elsewhere if it
        is not (then the eager claim is the one that keeps it from running twice)."""
        if self._warned_no_transaction:
            return
        self._warned_no_transaction = True
        log.warning(
            'idempotency_claim = "in_transaction": %s %s opened no latitude.db transaction, so '
            "it held no claim while it ran (a retry runs it again); if the app writes anywhere "
            'but latitude.db and the session, use idempotency_claim = "eager"',
            scope["method"],
            scope["path"],
        )

    async def _claim(
        self, scope: Scope, key: str, fingerprint: str, verified: VerifiedSignature | None = None
    ) -> Claim:
        """The key's claim: new (run it), or a stored answer to replay; refused otherwise.
        With `verified`, its nonce is recorded in the claim's statement, and a request whose
        nonce is not new gets nothing of its key: no claim, no stored answer."""
        nonce = None if verified is None else NonceRecord(*nonce_entry(verified))
        try:
            claim = await self.gateway.idempotency.begin(key, fingerprint, nonce=nonce)
        except NonceUsed:
            raise replayed(verified) from None
        note(scope, idempotency=claim.outcome.value)
        if claim.outcome is Outcome.IN_PROGRESS:
            raise KeyInProgress("a request with this Idempotency-Key is running")
        if claim.outcome is Outcome.MISMATCH:
            raise KeyReused("this Idempotency-Key was used for a different request")
        return claim

    async def _answer_from_store(
        self, scope: Scope, send: Send, headers: Headers, key: str, fingerprint: str
    ) -> None:
        """The app's transaction found the key anyone else's: answer what the store holds
        (replay, 409, 422). A key that is free again by now (released, purged) was claimed by
        the lookup: released at once, and the replica's retry runs the request."""
        claim = await self._claim(scope, key, fingerprint)
        if claim.outcome is Outcome.NEW:
            await self.gateway.idempotency.abandon(key, claim=claim)
            raise KeyInProgress("a request with this Idempotency-Key was running")
        await self._send_replay(send, headers, claim)

    async def _send_replay(self, send: Send, headers: Headers, claim: Claim) -> None:
        self.gateway.counters["replayed"] += 1
        replayed = claim.asgi_headers()
        if claim.position:
            # The writer's next read must wait for the write, as after the first answer.
            replayed.append((POSITION, claim.position.encode()))
        await self._send_signed(send, headers, claim.status, replayed, claim.body)

    def _copy_ttl(self, headers: Headers) -> int | None:
        """How long the primary's store may keep a forwarded request's session: a short-lived
        copy for another region's, the store's own lifetime for this region's (a write this
        region's gateway sent to its own primary side after a promotion)."""
        if header(headers, FORWARDED_FROM) == self.gateway.config.region.name:
            return None
        return PRIMARY_SESSION_COPY_TTL_S

    async def _bring_session(self, sid: str | None, blob: bytes, ttl: int | None) -> bytes | None:
        """The replica region's session, as the envelope brought it. An app in this process
        runs on it in memory (`_carrying`); one behind HTTP (the sidecar) reads the primary's
        store, so it is put there as a copy that expires soon: its home is its own region."""
        if not sid:
            return None
        session = self.gateway.codec.unpack(blob) if blob else None
        if self._reads_store():
            store = self.gateway.session_store
            if session:
                await store.set(sid, session, ttl_s=ttl)
            else:
                await store.delete(sid)
        return session

    def _reads_store(self) -> bool:
        return getattr(self.gateway.app, "reads_sessions_from_store", False)

    def _carrying(self, sid: str | None, brought: bytes | None):
        """The context the app runs in: the brought session held in this process, or nothing
        to hold (an app that reads the store itself). Without a session the box catches one
        the app makes (a sign-in)."""
        if self._reads_store():
            return contextlib.nullcontext(None)
        return carried_sessions(sid, brought)

    async def _run_app(
        self,
        scope: Scope,
        request: ForwardedRequest,
        body: SpooledBody,
        claim: Claim | db.ClaimInTransaction | None,
        ends: float | None,
    ) -> CapturedResponse:
        gw = self.gateway
        captured = CapturedResponse()
        route = request_route(
            gw.primary_route, scope["method"], scope["path"], gw.config.region.name
        )
        if isinstance(claim, db.ClaimInTransaction):
            fence = db.claiming(claim)
        elif claim is not None:
            fence = db.claimed(claim.key, claim.started_at)
        else:
            fence = contextlib.nullcontext()
        try:
            with route, fence:
                replay = body.replay(body.size - request.session_length, captured.send)
                await self._within_budget(gw.app(request.scope, *replay), request, ends)
        except (SessionStoreUnavailable, StoppedPastBudget):
            raise
        except Exception as exc:
            if isinstance(claim, db.ClaimInTransaction) and claim.refused:
                raise AppFailed("the key is another run's") from exc  # not the app's failure
            log.exception("the app failed on a forwarded %s %s", scope["method"], scope["path"])
            where = gw.config.region.name
            raise AppFailed(
                f"the app failed in the primary region {where}; it is logged there"
            ) from exc
        return captured

    async def _within_budget(self, run, request: ForwardedRequest, ends: float | None) -> None:
        """Run the app, stopped when the time its replica had left for the attempt is up: past
        it the answer can only reach a connection that gave up, and an overloaded primary that
        finishes such runs falls further behind with each one (benchmarks/README.md,
        session 10). Stopping is the same as the app failing: the claim is released, or
        settled if a transaction of the run committed. An app that says it is not `stoppable`
        (the sidecar's upstream, whose SQL is not fenced) runs to its end."""
        if ends is None or not getattr(self.gateway.app, "stoppable", True):
            await run
            return
        try:
            # A delay, not `timeout_at`: `ends` is on time.monotonic(), the loop's clock may not be.
            async with asyncio.timeout(max(ends - time.monotonic(), 0.0)) as budget:
                await run
        except TimeoutError:
            if not budget.expired():
                raise  # the app's own timeout
            self.gateway.counters["budget_stopped"] += 1
            raise StoppedPastBudget(
                f"the request ran past the {request.budget_s:.2f} s its region had left for "
                "it and was stopped at the primary region",
                key=request.key,
            ) from None

    async def _session_after(
        self,
        captured: CapturedResponse,
        sid: str | None,
        brought: bytes | None,
        box: dict[str, bytes | None] | None,
        ttl: int | None,
    ) -> tuple[bytes, SessionTail]:
        """The session after the run, packed to ride back, and what it does to the replica's
        copy. An app in this process left it in `box` (no store call); else one read of the
        store, and no write back when the app left it as it came."""
        gw = self.gateway
        new_sid = set_cookie_value(captured.headers, gw.config.session_cookie) or sid
        if not new_sid:  # no session before the run, none made by it
            return b"", SessionTail.UNCHANGED
        if box is not None:
            session = box.get(new_sid)
        else:
            session = await gw.session_store.get(new_sid)
        if new_sid == sid and session == brought:
            return b"", SessionTail.UNCHANGED
        if not session:
            return b"", SessionTail.DELETED
        if self._reads_store():
            # The app wrote it with its own expiry: the primary's copy must expire soon all
            # the same (another request of the same session may still be running on it).
            await gw.session_store.set(new_sid, session, ttl_s=ttl)
        try:
            return gw.codec.pack(session), SessionTail.UPDATED
        except SessionError as exc:  # the app's session outgrew what can be carried back
            raise AppFailed(str(exc)) from exc

    async def _abandon(self, claim: Claim | None, pending: db.ClaimInTransaction | None) -> None:
        """Release this run's claim (the app failed before any effect). With the claim, a run
        whose claim was taken over meanwhile deletes nothing of its successor's. A claim made
        in the app's transactions exists only if one committed: it is settled, never freed."""
        if claim is not None:
            await self.gateway.idempotency.abandon(claim.key, claim=claim)
        elif pending is not None and pending.taken:
            await self.gateway.idempotency.settle_run(pending.key, pending.runner)

    async def _refuse_signed(self, send: Send, request_headers: Headers, exc: Exception) -> None:
        """A signed refusal, with the status `answers.TABLE` gives: it leaves the session as
        it is."""
        refusal = refusal_for(exc)
        headers = [
            (b"content-type", b"application/json"),
            *answer_headers(exc, refusal),
            *refusal_tail(),
        ]
        if refusal.marker is not None:  # the replica waits (in-progress) or relays (mismatch)
            headers.append((IDEMPOTENCY, refusal.marker))
        body = json.dumps({"error": refusal.title, "detail": refusal.detail(exc)}).encode()
        await self._send_signed(send, request_headers, refusal.status, headers, body)

    async def _send_signed(
        self, send: Send, request_headers: Headers, status: int, headers: Headers, envelope: bytes
    ) -> None:
        headers = [
            (k, v)
            for k, v in headers
            if k.lower() not in (b"content-digest", b"signature", b"signature-input")
        ]
        headers.append((b"content-digest", content_digest(envelope).encode()))
        headers += self.gateway.epochs.headers()
        signature = sign_response(
            self.gateway.config.keyring,
            status=status,
            headers=headers,
            request_headers=request_headers,
            covered=SIGNED_RESPONSE_HEADERS,
        )
        headers += [(k.lower().encode(), v.encode()) for k, v in signature.items()]
        await send_response(send, status, headers, envelope)
