"""A replica region's side of forwarding: sign, send, retry, relay the answer.

The request is read whole (so it can be sent again), the region's session is packed after its
body, and the envelope is signed and sent over the warm pool. A connection that gives no answer
is retried with the same idempotency key on a fresh one until the deadline; one that cannot be
opened sends the request to the `Fallback`. The answer is verified, the session it brings back
is stored (or deleted, or left: `SessionTail`), and the rest is relayed to the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid

from latitude.forwarding import AnswerTooLarge, ForwardedResponse, NoAnswer, NotSent
from latitude.gateway.admission import ForwardingSlots
from latitude.gateway.answers import (
    BadAnswerSignature,
    Busy,
    Demoted,
    GatewayFault,
    PrimaryPaused,
    refuse,
    with_key,
)
from latitude.gateway.budget import AttemptBudget
from latitude.gateway.classify import SAFE_METHODS
from latitude.gateway.envelope import (
    BUDGET,
    IDEMPOTENCY,
    IDEMPOTENCY_KEY,
    SIGNED_REQUEST_HEADERS,
    SIGNED_RESPONSE_HEADERS,
    Headers,
    SessionTail,
    pack_request,
    request_fingerprint,
    session_id,
    target,
    unpack_answer,
)
from latitude.gateway.messages import (
    BodyStalled,
    BodyTooLarge,
    ClientDisconnected,
    Receive,
    Scope,
    Send,
    SpooledBody,
    announced_length,
    header,
    send_response,
)
from latitude.gateway.observe import TTFB, note, primary_ms, watch_answer
from latitude.promotion.follow import EPOCH_HEADER
from latitude.promotion.inflight import primary_moved, way_to_primary
from latitude.sessions import SessionStoreUnavailable, SessionTooLarge
from latitude.signing import SignatureError, sign_request, verify_response

log = logging.getLogger("latitude.gateway")

# While an answer is this late, check that the primary still accepts connections.
PATH_CHECK_AFTER_S = 0.5
# An envelope up to this size goes as one write (head, body and session together): one
# segment across the link and one wake-up at the primary instead of three.
ONE_WRITE_BYTES = 64 * 1024


class ReplicaSide:
    """Carries one region's writes to the primary. Holds no request state: the gateway's parts
    (`config`, `forwarding`, `session_store`) are read from it at each request, as a promotion
    may replace them."""

    def __init__(self, gateway) -> None:
        self.gateway = gateway
        cfg = gateway.config
        self.slots = ForwardingSlots(cfg.max_connections, cfg.queue_size)
        self.budget = AttemptBudget()

    async def forward(self, scope: Scope, receive: Receive, send: Send) -> None:
        gw = self.gateway
        cfg = gw.config
        headers = scope["headers"]
        # A client retrying after a 504 sends back the key it was given.
        client_key = header(headers, IDEMPOTENCY_KEY)
        key = client_key or str(uuid.uuid4())
        try:
            if announced_length(headers) > cfg.max_body_bytes:  # refused before a byte is read
                raise BodyTooLarge(cfg.max_body_bytes)
            body = await SpooledBody.read(
                receive, idle_timeout_s=cfg.body_timeout_s, max_bytes=cfg.max_body_bytes
            )
        except BodyStalled as exc:
            gw.counters["body_stalled"] += 1
            await refuse(scope, send, exc)
            return
        except BodyTooLarge as exc:
            gw.counters["body_too_large"] += 1
            await refuse(scope, send, exc)
            return
        box, send = watch_answer(scope, send)
        try:
            await self._forward(scope, send, body, key, client_key)
        except ClientDisconnected:
            raise
        except Exception as exc:
            if TTFB in box:  # half an answer is out: only closing the connection is left
                raise
            # A bug of ours: logged whole, and the client told plainly, with the key that
            # makes a retry safe (the attempt may have reached the primary).
            log.exception("forwarding %s %s (key %s) failed", scope["method"], scope["path"], key)
            gw.counters["gateway_fault"] += 1
            await refuse(scope, send, GatewayFault(f"{type(exc).__name__}: {exc}", key=key))
        finally:
            body.close()

    async def _forward(
        self, scope: Scope, send: Send, body: SpooledBody, key: str, client_key: str | None
    ) -> None:
        gw = self.gateway
        cfg = gw.config
        # The deadline is the primary's budget: a slow upload must not spend it.
        deadline = time.monotonic() + cfg.deadline_s
        sid = session_id(scope["headers"], cfg.session_cookie)
        if not client_key and scope["method"] not in SAFE_METHODS:
            # Refused now, the request costs no session read and no signature (overload).
            if (busy := self.slots.refusal(cfg.deadline_s)) is not None:
                gw.counters["busy"] += 1
                await refuse(scope, send, with_key(busy, key))
                return
        try:
            session = await gw.session_store.get(sid) if sid else None
            blob = gw.codec.pack(session) if session else b""
        except SessionTooLarge as exc:
            gw.counters["session_too_large"] += 1
            await refuse(scope, send, exc)
            return
        except SessionStoreUnavailable as exc:
            gw.counters["session_store_down"] += 1
            await refuse(scope, send, with_key(exc, None, nothing_done=True))
            return
        # The idempotency fingerprint covers the request, not the session that rides along.
        body_digest = body.digest.header_value()
        body.digest.update(blob)
        outgoing = pack_request(
            scope,
            key=key,
            content_digest=body.digest.header_value(),
            session_length=len(blob),
            body_length=body.size,
            region=cfg.region.name,
        )
        path_qs = target(scope)
        length = body.size + len(blob)

        async def streamed():
            async for chunk in body.chunks():
                yield chunk
            if blob:
                yield blob

        # The body with the session after it: one piece when small, else a stream per attempt.
        small = body.read_tail(body.size) + blob if 0 < length <= ONE_WRITE_BYTES else None

        def envelope():
            return small if small is not None or not length else streamed()

        attempt = 0
        fresh = False  # the next attempt on a new connection (the last one may have stalled)
        while (remaining := deadline - time.monotonic()) > 0:
            # Read at each attempt: a promotion may have moved the primary since the last one.
            forwarding, sent_to = way_to_primary(gw), gw.config.primary.name
            url = f"{forwarding.base_url}{path_qs}"
            try:
                async with self.slots.slot(remaining):
                    # Signed once a slot is held: the budget is what is left after the wait,
                    # less the way back for the primary's answer (gateway/budget.py).
                    sent_at = time.monotonic()
                    budget_ms = self.budget.for_primary_ms(deadline - sent_at)
                    attempt_headers = [*outgoing, (BUDGET, b"%d" % budget_ms)]
                    signature = sign_request(
                        cfg.keyring,
                        method=scope["method"],
                        url=url,
                        headers=attempt_headers,
                        covered=SIGNED_REQUEST_HEADERS,
                    )
                    signed = attempt_headers + [
                        (k.lower().encode(), v.encode()) for k, v in signature.items()
                    ]
                    resp = await self._watched_send(
                        forwarding,
                        scope["method"],
                        path_qs,
                        signed,
                        envelope(),
                        timeout_s=max(0.01, deadline - time.monotonic()),
                        fresh_connection=fresh,
                    )
                    # The link's part: what the primary's `Server-Timing` does not account for
                    # (without one the app's time would pass for the link's: no figure then).
                    took_s = time.monotonic() - sent_at
                    if (own_ms := primary_ms(resp.headers, sent_to, None)) is not None:
                        self.budget.answered(took_s - own_ms / 1000)
            except Busy as exc:
                gw.counters["busy"] += 1
                # An earlier attempt (or run) may have landed; a read is better served stale.
                if attempt or client_key or scope["method"] in SAFE_METHODS:
                    break
                await refuse(scope, send, with_key(exc, key))
                return
            except NotSent as exc:
                gw.counters["not_sent"] += 1
                log.warning(
                    "forwarding %s %s: %s; handling it here", scope["method"], scope["path"], exc
                )
                # A request that brings its key may have run before (a retry after a 504): only
                # one that does not can be told that nothing was changed.
                maybe_sent = attempt > 0 or getattr(exc, "maybe_delivered", False) or client_key
                if scope["method"] in SAFE_METHODS:
                    await gw.fallback.read(scope, body, send, deadline)
                else:
                    fingerprint = request_fingerprint(scope, body_digest, sid)
                    await gw.fallback.write(
                        scope, body, send, key, fingerprint, deadline, bool(maybe_sent)
                    )
                return
            except AnswerTooLarge as exc:
                gw.counters["answer_too_large"] += 1
                await refuse(scope, send, with_key(exc, key))
                return
            except NoAnswer as exc:
                attempt += 1
                fresh = True
                gw.counters["retries"] += 1
                log.warning(
                    "forwarding %s %s (key %s): %s; retrying",
                    scope["method"],
                    scope["path"],
                    key,
                    exc,
                )
                continue
            if resp.status == 409 and resp.header(IDEMPOTENCY) == "in-progress":
                attempt += 1
                fresh = True
                await asyncio.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
                continue
            bad_signature = self._signature_error(resp, signed)
            token = resp.header(EPOCH_HEADER)
            if await primary_moved(gw, sent_to, resp.status, token, bad_signature is None):
                attempt += 1
                fresh = False  # a new pool, to the new primary, warmed when the epoch came
                gw.counters["sent_to_new_primary"] += 1
                log.warning(
                    "forwarding %s %s (key %s): %s answered %s, the primary is %s now; "
                    "sending it there",
                    scope["method"],
                    scope["path"],
                    key,
                    sent_to,
                    resp.status,
                    gw.config.primary.name,
                )
                continue
            await self._relay(scope, send, resp, bad_signature, sid, key, had_session=bool(session))
            return
        if scope["method"] in SAFE_METHODS:
            await gw.fallback.stale_read(scope, body, send)
            return
        await gw.deadline_passed(scope, send, key)

    async def _watched_send(
        self, forwarding, method, path_qs, headers, body, *, timeout_s, fresh_connection
    ) -> ForwardedResponse:
        """Send one attempt, and while its answer is late, check the path is still there.

        A pooled connection over a cut link stalls without an error; a fresh connection that is
        refused proves the primary is unreachable now. The attempt may have been delivered, so
        it is reported as `NotSent` all the same: the fallback claims the key in the primary
        database before anything runs here, so it is never a blind local re-run.
        """
        attempt = asyncio.ensure_future(
            forwarding.send(
                method,
                path_qs,
                headers,
                body,
                timeout_s=timeout_s,
                fresh_connection=fresh_connection,
            )
        )
        try:
            while True:
                done, _ = await asyncio.wait({attempt}, timeout=PATH_CHECK_AFTER_S)
                if attempt in done:
                    return attempt.result()
                if not await forwarding.can_connect():
                    self.gateway.counters["path_down"] += 1
                    exc = NotSent(
                        "the primary stopped accepting connections while an attempt was pending"
                    )
                    exc.maybe_delivered = True  # the pending attempt may yet arrive
                    raise exc
        finally:
            if not attempt.done():
                attempt.cancel()
                with contextlib.suppress(BaseException):
                    await attempt

    def _signature_error(self, resp: ForwardedResponse, signed_request: Headers):
        """Why the answer does not verify as the primary's answer to this request, or None."""
        try:
            verify_response(
                self.gateway.config.keyring,
                status=resp.status,
                headers=resp.headers,
                request_headers=signed_request,
                body=resp.body,
                must_cover=SIGNED_RESPONSE_HEADERS,
            )
        except SignatureError as exc:
            return exc
        return None

    async def _relay(
        self,
        scope: Scope,
        send: Send,
        resp: ForwardedResponse,
        bad_signature: SignatureError | None,
        sid: str | None,
        key: str,
        had_session: bool,
    ) -> None:
        gw = self.gateway
        cfg = gw.config
        if bad_signature is not None:
            gw.counters["bad_answer_signature"] += 1
            note(scope, outcome="bad_signature")
            # An unsigned answer is usually the primary refusing the request: say why.
            log.error(
                "the primary's answer (%s, %r) failed verification: %s",
                resp.status,
                resp.body[:300],
                bad_signature,
            )
            if not gw.epochs.epoch.active:
                # The old primary refusing a write it held while the epoch is pending: the
                # key is the way on, at the new primary once the epoch is active.
                why = (
                    f"the primary region is moving to {gw.epochs.epoch.primary}; retry with "
                    f"the header Idempotency-Key: {key}, it will not be applied twice"
                )
                await refuse(scope, send, Demoted(why, key=key), extra=gw.epochs.headers())
                return
            if resp.status == 503:
                # A primary that refuses writes for now (its lease ran out) answers unsigned.
                why = (
                    "The primary region is refusing writes for now; retry in a moment with "
                    f"the header Idempotency-Key: {key}, it will not be applied twice."
                )
                await refuse(scope, send, PrimaryPaused(why, key=key), extra=gw.epochs.headers())
                return
            why = "The primary's answer was not correctly signed; it was discarded."
            await refuse(scope, send, BadAnswerSignature(why))
            return
        answer = unpack_answer(resp.status, resp.headers, resp.body, cfg.session_cookie, sid)
        try:
            if answer.session_id and answer.tail is SessionTail.UPDATED and answer.session:
                await gw.session_store.set(answer.session_id, gw.codec.unpack(answer.session))
            elif answer.session_id and answer.tail is SessionTail.DELETED and had_session:
                await gw.session_store.delete(answer.session_id)
        except SessionStoreUnavailable as exc:
            # The request ran; its answer is stored. A retry with the key fetches it again
            # and writes the session then.
            gw.counters["session_store_down"] += 1
            await refuse(scope, send, with_key(exc, key))
            return
        headers = answer.headers + gw.positions.cookie_headers(scope, answer.position)
        gw.counters["forwarded"] += 1
        note(scope, outcome="forwarded")
        await send_response(send, answer.status, headers, answer.body)
