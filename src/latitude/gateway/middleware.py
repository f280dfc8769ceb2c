"""`RegionGateway`: the pure-ASGI middleware that makes one app multi-region.

In a replica region it serves reads locally and forwards writes whole to the primary region's
gateway; in the primary region it verifies and runs forwarded requests. `classify` decides
which, in one fixed order; this module carries the decision out.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
import uuid
from collections import Counter

from latitude import consistency
from latitude.forwarding import AnswerTooLarge, ForwardingClient, NoAnswer, NotSent
from latitude.gateway.classify import FORWARDED_FROM_HEADER, SAFE_METHODS, Decision, classify
from latitude.gateway.config import GatewayConfig
from latitude.gateway.deadlines import bounded, in_background
from latitude.gateway.intake import check_request, check_target
from latitude.gateway.messages import (
    BodyStalled,
    BodyTooLarge,
    CapturedResponse,
    ClientDisconnected,
    Receive,
    Scope,
    Send,
    SpooledBody,
    build_forwarded,
    client_address,
    cookie_value,
    header,
    parse_forwarded,
    send_error,
    send_json,
    send_response,
    set_cookie_value,
    strip_untrusted,
)
from latitude.gateway.observe import note
from latitude.gateway.positions import PositionTracker, request_route
from latitude.http_headers import HOP_BY_HOP
from latitude.idempotency import ClaimTooLate, IdempotencyStore, IdempotencyUnavailable, Outcome
from latitude.promotion.follow import EPOCH_HEADER, EpochFollower
from latitude.sessions import (
    InvalidSessionId,
    SessionCodec,
    SessionError,
    SessionStore,
    SessionStoreUnavailable,
    SessionTooLarge,
    check_session_id,
    session_store_from_url,
)
from latitude.signing import (
    DigestMismatch,
    MemoryNonceCache,
    NonceCache,
    NonceCacheError,
    SignatureError,
    ValkeyNonceCache,
    sign_request,
    sign_response,
    verify_content_digest,
    verify_request,
    verify_response,
)

log = logging.getLogger("latitude.gateway")

SESSION_LENGTH = "latitude-session-length"
# What the answer does to the replica's session: `updated` (the session rides at the end of the
# body), `deleted` (the app emptied it), `unchanged` (every refusal: it never touches a session).
SESSION_STATE = "latitude-session"
POSITION = "latitude-position"
IDEMPOTENCY = "latitude-idempotency"
FALLBACK_TIMEOUT_S = 30.0
FENCE_IDLE_S = 10.0
PATH_CHECK_AFTER_S = 0.5
PRIMARY_SESSION_COPY_TTL_S = 60
STALE = b"latitude-stale"
# A position no replica reaches: a write whose position is unknown sends its writer's reads on.
UNKNOWN_POSITION = consistency.ReplicationPosition.parse("FFFFFFFF/FFFFFFFF")
# What a forwarded request's signature covers (when present), and must cover to be accepted.
SIGNED_REQUEST_HEADERS = (
    "content-digest",
    "content-type",
    "idempotency-key",
    "forwarded",
    SESSION_LENGTH,
    FORWARDED_FROM_HEADER,
    "cookie",
    "authorization",
)
SIGNED_RESPONSE_HEADERS = (
    "content-digest",
    "content-type",
    "location",
    "set-cookie",
    SESSION_LENGTH,
    SESSION_STATE,
    POSITION,
    IDEMPOTENCY,
)
# The gateway's own framing never reaches the client or the app.
INTERNAL_RESPONSE_HEADERS = frozenset(
    {
        SESSION_LENGTH,
        SESSION_STATE,
        POSITION,
        IDEMPOTENCY,
        "signature",
        "signature-input",
        "content-digest",
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "date",
        "server",
    }
)


def request_fingerprint(scope: Scope, content_digest: str, session_id: str | None) -> str:
    """What makes two requests "the same" for an idempotency key: both sides compute it alike.
    The session id is part of it, so one user's key never replays another user's answer."""
    parts = [
        scope["method"],
        scope["path"],
        scope.get("query_string", b"").decode("latin-1"),
        content_digest,
        session_id or "",
    ]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


class RegionGateway:
    def __init__(
        self,
        app,
        config: GatewayConfig,
        *,
        session_store: SessionStore | None = None,
        nonce_cache: NonceCache | None = None,
        forwarding: ForwardingClient | None = None,
        idempotency: IdempotencyStore | None = None,
    ):
        self.app = app
        self.config = config
        self.codec = SessionCodec(limit_bytes=config.session_limit_bytes)
        self.session_store = session_store
        self.nonce_cache = nonce_cache
        self.forwarding = forwarding
        self.idempotency = idempotency
        self.positions = PositionTracker(config)
        self.counters: Counter[str] = Counter()
        self._started = False
        self._start_lock = asyncio.Lock()
        self._fallback_store: IdempotencyStore | None = None
        self._fallback_store_lock = asyncio.Lock()
        self._fallback_renewed_at = float("-inf")
        self._stats_task: asyncio.Task | None = None
        self._purge_task: asyncio.Task | None = None
        self._primary_db_seen_at = float("-inf")  # when a fallback last reached the primary DB
        # The primary epoch: which region is primary now (latitude.promotion); it may swap
        # `config`, and the route that runs requests here as the primary.
        self.epochs = EpochFollower(config)
        self._primary_route = consistency.PRIMARY

    # ---- lifecycle -----------------------------------------------------------------------

    async def startup(self) -> None:
        async with self._start_lock:
            if self._started:
                return
            await self.epochs.start(self)
            cfg = self.config
            region = cfg.region
            if self.session_store is None:
                if not region.session_store_url:
                    raise RuntimeError(f"region {region.name} has no session_store_url")
                self.session_store = session_store_from_url(
                    region.session_store_url, key_template=cfg.session_key_template
                )
            if cfg.is_primary:
                if self.nonce_cache is None:
                    self.nonce_cache = await _nonce_cache_for(region.session_store_url)
                if self.idempotency is None:
                    self.idempotency = await IdempotencyStore.open(region.database_url)
                    await self.idempotency.ensure_schema()
                self._purge_task = asyncio.create_task(
                    self.idempotency.purge_periodically(
                        cfg.idempotency_retention_s,
                        cfg.idempotency_purge_every_s,
                        on_error=lambda exc: log.warning("idempotency purge failed: %s", exc),
                    )
                )
            elif self.forwarding is None:
                self.forwarding = ForwardingClient(
                    cfg.primary_url,
                    pool_size=cfg.pool_size,
                    pooling=cfg.pooling,
                    connect_timeout_s=cfg.connect_timeout_s,
                    ca_file=cfg.ca_file,
                    max_response_bytes=cfg.max_answer_bytes,
                )
                await self.forwarding.warm()
            if not cfg.is_primary and region.primary_database_url:
                # The fallback's pool connects now, in the background: a first fallback write
                # then has no connection to set up over the ocean within its deadline.
                await self._primary_idempotency()
            await self.positions.start()
            client = getattr(self.session_store, "client", None)
            if client is not None:
                self._stats_task = asyncio.create_task(self._publish_stats(client))
            self._started = True

    async def _publish_stats(self, client, interval_s: float = 1.0) -> None:
        """Add this process's counters to the region's shared tally (a Valkey hash), so a
        region's figures cover all its worker processes (`latitude lab status` reads them)."""
        key = f"latitude:stats:{self.config.region.name}"
        sent: Counter[str] = Counter()
        while True:
            await asyncio.sleep(interval_s)
            now = Counter({**self.counters, **{k: v for k, v in self.positions.counters.items()}})
            delta = {k: v - sent.get(k, 0) for k, v in now.items() if v != sent.get(k, 0)}
            if not delta:
                continue
            try:
                async with client.pipeline(transaction=False) as pipe:
                    for field, value in delta.items():
                        pipe.hincrbyfloat(key, field, value)
                    await pipe.execute()
                sent = now
            except Exception as exc:  # figures are best effort; requests never wait on them
                log.debug("could not publish gateway stats: %s", exc)

    async def shutdown(self) -> None:
        for task in (self._stats_task, self._purge_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        self._stats_task = self._purge_task = None
        for closer in (
            getattr(self.forwarding, "close", None),
            getattr(self.idempotency, "close", None),
            getattr(self._fallback_store, "close", None),
            getattr(self.session_store, "close", None),
            getattr(self.nonce_cache, "close", None),
            self.positions.close,
            self.epochs.close,
        ):
            if closer is not None:
                with contextlib.suppress(Exception):
                    await closer()
        self._started = False

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def wrapped_receive() -> dict:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await self.startup()
            return message

        async def wrapped_send(message: dict) -> None:
            if message["type"] == "lifespan.shutdown.complete":
                await self.shutdown()
            await send(message)

        try:
            await self.app(scope, wrapped_receive, wrapped_send)
        except Exception:
            # The app has no lifespan support: run ours alone.
            if not self._started:
                await self.startup()
            message = await receive()
            if message["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})

    # ---- dispatch ------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(scope, receive, send)
            return
        if scope["type"] != "http":
            # WebSockets stay in the region they connected to.
            await self.app(scope, receive, send)
            return
        if not self._started:
            await self.startup()
        # A forwarded request is the client's, checked at its edge, plus our envelope headers.
        slack = 8192 if header(scope["headers"], FORWARDED_FROM_HEADER.encode()) else 0
        refusal = check_request(
            scope["headers"],
            max_header_bytes=self.config.max_header_bytes,
            max_headers_bytes=self.config.max_headers_bytes + slack,
        ) or check_target(scope.get("raw_path") or scope["path"].encode())
        if refusal is not None:
            self.counters["refused_at_edge"] += 1
            await send_error(scope, send, refusal.status, refusal.title, refusal.detail)
            return
        if await self.epochs.gate(self, scope, receive, send):
            return
        if self.config.trusted_proxies:
            # Behind a trusted load balancer the client is who it says it saw, not the balancer.
            peer = (scope.get("client") or (None, 0))[0]
            ip = client_address(
                peer, header(scope["headers"], b"x-forwarded-for"), self.config.trusted_proxies
            )
            if ip != peer:
                scope = {**scope, "client": (ip, 0)}
        headers = scope["headers"]
        decision = classify(
            scope["method"],
            scope["path"],
            is_primary=self.config.is_primary,
            forwarded=header(headers, FORWARDED_FROM_HEADER.encode()) is not None,
            local=self.config.local_routes,
            always_forward=self.config.always_forward_routes,
        )
        self.counters[decision.value] += 1
        note(scope, decision=decision.value)
        try:
            if decision is Decision.LATITUDE:
                await self._own_endpoint(scope, send)
            elif decision is Decision.VERIFY:
                await self._run_forwarded(scope, receive, send)
            elif decision is Decision.PRIMARY:
                await self._run_here(scope, receive, send, self._primary_route)
            elif decision is Decision.LOCAL and scope["method"] not in SAFE_METHODS:
                # Listed `local`: a POST that only reads runs here, never forwarded.
                await self._run_here(scope, receive, send, consistency.REPLICA)
            elif decision is Decision.LOCAL:
                await self._serve_read(scope, receive, send)
            else:
                await self._forward(scope, receive, send)
        except ClientDisconnected:
            self.counters["client_disconnected"] += 1

    def _edge_scope(self, scope: Scope) -> Scope:
        """The request as the app may see it: no client-set trust headers."""
        return {**scope, "headers": strip_untrusted(scope["headers"])}

    async def _run_here(self, scope: Scope, receive: Receive, send: Send, route: str) -> None:
        started = False

        async def watched(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            with request_route(route, scope["method"], scope["path"], self.config.region.name):
                await self.app(self._edge_scope(scope), receive, watched)
        except SessionStoreUnavailable as exc:
            # The app's own sessions (SessionMiddleware) are in the region's store too.
            if started:
                raise
            await self._session_store_down(scope, send, exc)

    async def _own_endpoint(self, scope: Scope, send: Send) -> None:
        path = scope["path"]
        if path == "/_latitude/health":
            await send_json(
                send,
                200,
                {"region": self.config.region.name, "role": self.config.region.role, "ok": True},
            )
        elif path == "/_latitude/status":
            await send_json(send, 200, self.status())
        else:
            await send_error(scope, send, 404, "Not found", f"{path} is not a Latitude endpoint")

    def status(self) -> dict:
        return {
            "region": self.config.region.name,
            "role": self.config.region.role,
            "decisions": dict(self.counters),
            "forwarding": self.forwarding.pool_info() if self.forwarding else None,
            "consistency": self.positions.stats(),
            "epoch": self.epochs.status(),
        }

    # ---- replica side: reads -------------------------------------------------------------

    async def _serve_read(self, scope: Scope, receive: Receive, send: Send) -> None:
        checked = time.monotonic()
        current = await self.positions.replica_is_current(scope)
        note(scope, read_wait_s=time.monotonic() - checked)
        if current:
            note(scope, kind="local_read")
            await self._run_here(scope, receive, send, consistency.REPLICA)
        else:
            note(scope, kind="read_forwarded")
            self.counters["read_forwarded"] += 1
            await self._forward(scope, receive, send)

    # ---- replica side: forwarding --------------------------------------------------------

    async def _forward(self, scope: Scope, receive: Receive, send: Send) -> None:
        cfg = self.config
        headers = scope["headers"]
        # A client retrying after a 504 sends back the key it was given.
        client_key = header(headers, b"idempotency-key")
        key = client_key or str(uuid.uuid4())
        try:
            body = await SpooledBody.read(receive, idle_timeout_s=cfg.body_timeout_s)
        except BodyTooLarge as exc:
            await send_error(scope, send, 413, "Request too large", str(exc))
            return
        except BodyStalled as exc:
            self.counters["body_stalled"] += 1
            await send_error(
                scope, send, 408, "Request body stalled", f"{exc} ([gateway] body_timeout_s)"
            )
            return
        # The deadline is the primary's budget: a slow upload must not spend it.
        started = time.monotonic()
        deadline = started + cfg.deadline_s
        try:
            sid = session_id(headers, cfg.session_cookie)
            session = await self.session_store.get(sid) if sid else None
            blob = self.codec.pack(session) if session else b""
        except SessionTooLarge as exc:
            self.counters["session_too_large"] += 1
            body.close()
            await send_error(scope, send, 413, "Session too large to forward", str(exc))
            return
        except SessionStoreUnavailable as exc:
            body.close()
            await self._session_store_down(scope, send, exc, nothing_done=True)
            return
        # The idempotency fingerprint covers the request, not the session that rides along.
        body_digest = body.digest.header_value()
        body.digest.update(blob)
        client_ip = (scope.get("client") or (None, None))[0]
        outgoing: list[tuple[str, str]] = [
            # aiohttp writes values as UTF-8; the edge let through only ASCII or UTF-8.
            (k.decode("latin-1"), v.decode())
            for k, v in strip_untrusted(headers)
            if k.decode("latin-1").lower() not in HOP_BY_HOP and k != b"idempotency-key"
        ]
        outgoing += [
            (
                "forwarded",
                build_forwarded(client_ip, scope.get("scheme", "http"), header(headers, b"host")),
            ),
            ("idempotency-key", key),
            ("content-digest", body.digest.header_value()),
            (SESSION_LENGTH, str(len(blob))),
            (FORWARDED_FROM_HEADER, cfg.region.name),
        ]
        if body.size + len(blob):
            outgoing.append(("content-length", str(body.size + len(blob))))
        path_qs = scope.get("raw_path", scope["path"].encode()).decode("latin-1")
        if scope.get("query_string"):
            path_qs += "?" + scope["query_string"].decode("latin-1")
        url = f"{self.forwarding.base_url}{path_qs}"

        async def envelope():
            async for chunk in body.chunks():
                yield chunk
            if blob:
                yield blob

        attempt = 0
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    if scope["method"] in SAFE_METHODS:
                        self.counters["read_served_stale"] += 1
                        await self._run_here(
                            scope,
                            *body.replay(body.size, marked_stale(send)),
                            consistency.REPLICA,
                        )
                        return
                    break
                signed = outgoing + list(
                    sign_request(
                        cfg.keyring,
                        method=scope["method"],
                        url=url,
                        headers=outgoing,
                        covered=SIGNED_REQUEST_HEADERS,
                    ).items()
                )
                try:
                    resp = await self._watched_send(
                        scope["method"],
                        path_qs,
                        signed,
                        envelope() if body.size + len(blob) else None,
                        timeout_s=remaining,
                        fresh_connection=attempt > 0,
                    )
                except NotSent as exc:
                    self.counters["not_sent"] += 1
                    log.warning(
                        "forwarding %s %s: %s; handling it here",
                        scope["method"],
                        scope["path"],
                        exc,
                    )
                    fingerprint = request_fingerprint(scope, body_digest, sid)
                    # A request that brings its key may have run before (a retry after a 504):
                    # only one that does not can be told that nothing was changed.
                    maybe_sent = (
                        attempt > 0 or getattr(exc, "maybe_delivered", False) or bool(client_key)
                    )
                    await self._fallback(scope, body, send, key, fingerprint, deadline, maybe_sent)
                    return
                except AnswerTooLarge as exc:
                    self.counters["answer_too_large"] += 1
                    await send_error(
                        scope,
                        send,
                        502,
                        "The primary region's answer is too large",
                        f"The primary region handled the request, but {exc} ([gateway] "
                        "max_answer_bytes), so it was not relayed. Its outcome is stored: a "
                        f"retry with the header Idempotency-Key: {key} gets the same answer, "
                        "not a second run.",
                        extra_headers=[(b"idempotency-key", key.encode())],
                        data={"idempotency_key": key, "max_answer_bytes": exc.limit},
                    )
                    return
                except NoAnswer as exc:
                    attempt += 1
                    self.counters["retries"] += 1
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
                    await asyncio.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
                    continue
                await self._relay_answer(scope, send, resp, signed, sid, had_session=bool(session))
                return
        finally:
            body.close()
        await self._send_deadline(scope, send, key)

    async def _session_store_down(
        self,
        scope: Scope,
        send: Send,
        exc: Exception,
        key: str | None = None,
        nothing_done: bool = False,
    ) -> None:
        """The region's session store does not answer: the store's fault, not the user's."""
        self.counters["session_store_down"] += 1
        detail = f"This region's session store does not answer ({exc}). Retry in a few seconds."
        extra = [(b"retry-after", b"2")]
        if key:
            detail += (
                " The request itself was carried out; retry with the header Idempotency-Key: "
                f"{key} to get its answer without running it again."
            )
            extra.append((b"idempotency-key", key.encode()))
        elif nothing_done:
            detail += " Nothing was changed."
        await send_error(scope, send, 503, "Session store unavailable", detail, extra_headers=extra)

    async def _send_deadline(self, scope: Scope, send: Send, key: str) -> None:
        cfg = self.config
        self.counters["deadline"] += 1
        note(scope, outcome="deadline")
        await send_error(
            scope,
            send,
            504,
            "The primary region did not answer in time",
            f"The request was sent but no answer came within {cfg.deadline_s:g} s. Retry with the "
            f"header Idempotency-Key: {key}; it will not be applied twice.",
            extra_headers=[(b"idempotency-key", key.encode()), (b"retry-after", b"1")],
            data={"idempotency_key": key},
        )

    async def _watched_send(
        self, method, path_qs, headers, body, *, timeout_s: float, fresh_connection: bool
    ):
        """Send one attempt, and while its answer is late, check the path is still there.

        A pooled connection over a cut link stalls without an error; a fresh connection that is
        refused proves the primary is unreachable now. The attempt may have been delivered, so
        it is reported as `NotSent` all the same: the fallback claims the key in the primary
        database before anything runs here, so it is never a blind local re-run.
        """
        attempt = asyncio.ensure_future(
            self.forwarding.send(
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
                if not await self.forwarding.can_connect():
                    self.counters["path_down"] += 1
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

    async def _relay_answer(
        self, scope, send, resp, signed_request, sid, had_session: bool
    ) -> None:
        cfg = self.config
        self.epochs.heard(resp.header(EPOCH_HEADER))
        try:
            verify_response(
                cfg.keyring,
                status=resp.status,
                headers=resp.headers,
                request_headers=signed_request,
                body=resp.body,
                must_cover=SIGNED_RESPONSE_HEADERS,
            )
        except SignatureError as exc:
            self.counters["bad_answer_signature"] += 1
            note(scope, outcome="bad_signature")
            # An unsigned answer is usually the primary refusing the request: say why.
            log.error(
                "the primary's answer (%s, %r) failed verification: %s",
                resp.status,
                resp.body[:300],
                exc,
            )
            await send_error(
                scope,
                send,
                502,
                "Bad answer from the primary region",
                "The primary's answer was not correctly signed; it was discarded.",
            )
            return
        n = int(resp.header(SESSION_LENGTH) or 0)
        body, blob = resp.body[: len(resp.body) - n], resp.body[len(resp.body) - n :]
        new_sid = set_cookie_value(resp.headers, cfg.session_cookie) or sid
        # Only an answer that says so changes the session: a refusal says `unchanged`.
        state = resp.header(SESSION_STATE) or ("updated" if blob else "unchanged")
        try:
            new_sid = check_session_id(new_sid) if new_sid else None
            if new_sid and state == "updated" and blob:
                await self.session_store.set(new_sid, self.codec.unpack(blob))
            elif new_sid and state == "deleted" and had_session:
                await self.session_store.delete(new_sid)
        except InvalidSessionId:
            pass  # the app named a session id no store may hold; the client's cookie is moot
        except SessionStoreUnavailable as exc:
            # The request ran; its answer is stored. A retry with the key fetches it again
            # and writes the session then.
            key = next((v for k, v in signed_request if k == "idempotency-key"), None)
            await self._session_store_down(scope, send, exc, key=key)
            return
        headers = [
            (k.encode("latin-1"), v.encode("latin-1"))
            for k, v in resp.headers
            if k.lower() not in INTERNAL_RESPONSE_HEADERS
        ]
        headers += self.positions.cookie_headers(scope, resp.header(POSITION))
        self.counters["forwarded"] += 1
        note(scope, outcome="forwarded")
        await send_response(send, resp.status, headers, body)

    async def _fallback(
        self,
        scope: Scope,
        body: SpooledBody,
        send: Send,
        key: str,
        fingerprint: str,
        deadline: float,
        maybe_sent: bool = False,
    ) -> None:
        """The primary's gateway is unreachable: run here, writing over the ocean to its database.

        An earlier attempt may still reach the primary (a stalled connection), so the key is
        claimed in the primary database first, exactly as the primary's gateway claims it:
        whichever runs first, the request runs once. The client hears by the deadline; what is
        still under way then (a claim or the app's SQL held by a stalled link) finishes in the
        background and settles the key, so a retry with it gets the outcome. `maybe_sent`: a
        forwarded attempt may have reached the primary, so nothing can be promised unchanged.
        """

        def left() -> float:
            return max(0.0, deadline - time.monotonic())

        if scope["method"] in SAFE_METHODS:
            await self._fallback_read(scope, body, send, deadline)
            return

        try:
            store = await self._primary_idempotency()
            claim = await self._fallback_claim(store, key, fingerprint, deadline)
        except Exception as exc:  # unreachable, stalled or failing
            log.warning(
                "fallback for %s %s: primary database: %r", scope["method"], scope["path"], exc
            )
            never_reached = isinstance(exc, ClaimTooLate) or (
                isinstance(exc, IdempotencyUnavailable) and not exc.sent
            )
            if isinstance(exc, IdempotencyUnavailable) and not exc.sent:
                self._renew_fallback_store()
            if never_reached and not maybe_sent:
                await self._read_only(
                    scope, send, key, "neither the primary region nor its database answers"
                )
            else:
                # The claim (or the forwarded attempt) may yet land: only the key can tell.
                await self._send_deadline(scope, send, key)
            return
        if claim.outcome is Outcome.REPLAY:
            self.counters["replayed"] += 1
            n = int(next((v for k, v in claim.headers if k.lower() == SESSION_LENGTH), "0"))
            headers = [
                (k.encode("latin-1"), v.encode("latin-1"))
                for k, v in claim.headers
                if k.lower() not in INTERNAL_RESPONSE_HEADERS
            ]
            headers += self.positions.cookie_headers(scope, claim.position)
            await send_response(send, claim.status, headers, claim.body[: len(claim.body) - n])
            return
        if claim.outcome is Outcome.IN_PROGRESS:
            await self._send_deadline(scope, send, key)
            return
        if claim.outcome is Outcome.MISMATCH:
            await send_error(
                scope,
                send,
                422,
                "Idempotency-Key reused",
                "This Idempotency-Key was already used for a different request.",
            )
            return
        self.counters["fallback"] += 1
        note(scope, outcome="fallback")
        claimed_at = time.monotonic()
        # The run may outlive this request (which closes its spooled body): it gets a copy.
        data = b"".join([chunk async for chunk in body.chunks()])
        run = asyncio.ensure_future(self._fallback_app(scope, data, claim))
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
            await self._send_deadline(scope, send, key)
            return
        if run.exception() is not None:
            log.warning(
                "fallback for %s %s (key %s) failed: %r",
                scope["method"],
                scope["path"],
                key,
                run.exception(),
            )
            self.counters["fallback_failed"] += 1
            in_background(store.abandon(key, claim=claim, timeout_s=FALLBACK_TIMEOUT_S))
            await self._send_deadline(scope, send, key)
            return
        captured = run.result()
        storing = asyncio.ensure_future(self._store_fallback_outcome(store, claim, captured))
        await asyncio.wait({storing}, timeout=left())
        if storing.done() and storing.exception() is None:
            position = storing.result()
        else:
            if not storing.done():
                in_background(storing)
            log.warning("could not store the outcome of %s (key %s) in time", scope["path"], key)
            # The write's position is unknown: the writer's reads go to the primary until the
            # cookie expires, rather than risk a replica that has not replayed it.
            position = str(UNKNOWN_POSITION)
        await send_response(
            send,
            captured.status,
            [*captured.headers, *self.positions.cookie_headers(scope, position)],
            bytes(captured.body),
        )

    async def _fallback_claim(self, store: IdempotencyStore, key, fingerprint, deadline):
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

    def _release_late_claim(self, store: IdempotencyStore, claim) -> None:
        if claim.outcome is Outcome.NEW:
            self.counters["fallback_late_claims_released"] += 1
            in_background(store.abandon(claim.key, claim=claim, timeout_s=FALLBACK_TIMEOUT_S))

    async def _fallback_app(self, scope: Scope, data: bytes, claim) -> CapturedResponse:
        """Run the app here with its SQL routed to the primary database, each of its
        transactions fenced by the claim (committed with it, or not at all)."""
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

        route = request_route(
            consistency.PRIMARY, scope["method"], scope["path"], self.config.region.name
        )
        # A transaction whose next statement is held by a stalled link is aborted by the
        # database well before the fallback's bound, so a late commit cannot land.
        fence = consistency.claimed(claim.key, claim.started_at, idle_timeout_s=FENCE_IDLE_S)
        with route, fence:
            # SQL over the ocean is slow but completes; the bound only stops a stalled link
            # from holding the run (and its claim) forever.
            await bounded(self.app(self._edge_scope(scope), receive, send), FALLBACK_TIMEOUT_S)
        return captured

    async def _store_fallback_outcome(self, store: IdempotencyStore, claim, captured) -> str:
        out = [
            (k.decode("latin-1"), v.decode("latin-1"))
            for k, v in captured.headers
            if k.decode("latin-1").lower() not in INTERNAL_RESPONSE_HEADERS
        ]
        _, lsn = await store.complete_at_position(
            claim.key,
            captured.status,
            [*out, (SESSION_LENGTH, "0")],
            bytes(captured.body),
            claim=claim,
            timeout_s=FALLBACK_TIMEOUT_S,
        )
        return lsn

    async def _settle(self, store: IdempotencyStore, claim, run: asyncio.Future) -> None:
        """After the client was answered 504: store the run's outcome when it ends, or release
        the claim if the app failed. A run that never ends (stalled past the fallback bound)
        keeps the claim: its SQL may still commit, so the key waits out the takeover time."""
        try:
            captured = await run
        except TimeoutError:
            log.warning("fallback run for key %s stalled; its claim is kept", claim.key)
            return
        except Exception:
            self.counters["fallback_failed"] += 1
            await store.abandon(claim.key, claim=claim, timeout_s=FALLBACK_TIMEOUT_S)
            return
        await self._store_fallback_outcome(store, claim, captured)

    async def _fallback_read(
        self, scope: Scope, body: SpooledBody, send: Send, deadline: float
    ) -> None:
        """A read meant for the primary (the replica is behind) that cannot be forwarded: read
        the primary database over the ocean; if that is out of reach too, the local replica's
        answer, marked stale (`Latitude-Stale`), is better than none."""
        # The SQL of a read needs a round trip or two: give it a moment even late in the budget.
        budget = max(deadline - time.monotonic(), self.config.read_wait_s, 1.0)
        started = time.monotonic()
        captured = CapturedResponse()
        try:
            # One ocean round trip at most once a second, not one more per read.
            if time.monotonic() - self._primary_db_seen_at > 1.0:
                store = await self._primary_idempotency()
                await bounded(store.ping(timeout_s=budget), budget)
                self._primary_db_seen_at = time.monotonic()
            left = budget - (time.monotonic() - started)
            route = request_route(
                consistency.PRIMARY, scope["method"], scope["path"], self.config.region.name
            )
            with route:
                run = self.app(self._edge_scope(scope), *body.replay(body.size, captured.send))
                await bounded(run, max(left, 0.05))
        except Exception as exc:
            log.warning(
                "read %s: the primary database is out of reach too (%r); serving it stale",
                scope["path"],
                exc,
            )
            self._primary_db_seen_at = float("-inf")
            self.counters["read_served_stale"] += 1
            await self._run_here(
                scope, *body.replay(body.size, marked_stale(send)), consistency.REPLICA
            )
            return
        await send_response(send, captured.status, captured.headers, bytes(captured.body))

    def _renew_fallback_store(self) -> None:
        """No connection could be had from the fallback pool: start a fresh pool for the next
        request (at most every 2 s). After a run of cuts and resets psycopg_pool backs off its
        reconnects for longer than a deadline, and its connections may be held by attempts
        stalled on the old link; a new pool connects at once."""
        now = time.monotonic()
        if self._fallback_store is None or now - self._fallback_renewed_at < 2.0:
            return
        self._fallback_renewed_at = now
        old, self._fallback_store = self._fallback_store, None
        self.counters["fallback_pool_renewed"] += 1
        in_background(old.close())

    async def _primary_idempotency(self) -> IdempotencyStore:
        """The primary database's idempotency table over the ocean: one pool, made once and
        kept, that connects in the background; each call bounds its own wait."""
        async with self._fallback_store_lock:
            if self._fallback_store is None:
                url = self.config.region.primary_database_url
                if not url:
                    raise RuntimeError(
                        f"region {self.config.region.name} has no primary_database_url"
                    )
                self._fallback_store = await IdempotencyStore.open(
                    url,
                    min_size=1,
                    max_size=4,
                    wait=False,
                    connect_timeout_s=self.config.connect_timeout_s,
                )
        return self._fallback_store

    async def _read_only(self, scope: Scope, send: Send, key: str, why: str) -> None:
        self.counters["read_only"] += 1
        note(scope, outcome="read_only")
        await send_error(
            scope,
            send,
            503,
            "Read-only for now",
            f"This region can serve reads but cannot make changes at the moment: {why}. "
            f"Nothing was changed here. Retry shortly with the header Idempotency-Key: {key}.",
            extra_headers=[(b"retry-after", b"5"), (b"idempotency-key", key.encode())],
            data={"read_only": True, "idempotency_key": key},
        )

    # ---- primary side --------------------------------------------------------------------

    async def _run_forwarded(self, scope: Scope, receive: Receive, send: Send) -> None:
        cfg = self.config
        headers = scope["headers"]
        if not cfg.is_primary:
            await send_error(
                scope,
                send,
                421 if self.epochs.token is None else 503,
                "Misdirected request",
                f"{cfg.region.name} is not the primary region; forward to {cfg.primary.name}",
                extra_headers=[(b"retry-after", b"1"), *self.epochs.headers()],
            )
            return
        host = header(headers, b"host") or ""
        path_qs = scope.get("raw_path", scope["path"].encode()).decode("latin-1")
        if scope.get("query_string"):
            path_qs += "?" + scope["query_string"].decode("latin-1")
        url = f"{scope.get('scheme', 'http')}://{host}{path_qs}"
        try:
            await verify_request(
                cfg.keyring,
                method=scope["method"],
                url=url,
                headers=headers,
                nonce_cache=self.nonce_cache,
                must_cover=SIGNED_REQUEST_HEADERS,
            )
        except SignatureError as exc:
            self.counters["rejected"] += 1
            note(scope, idempotency="rejected")
            await send_error(scope, send, 401, "Forwarded request rejected", str(exc))
            return
        except NonceCacheError as exc:
            # The signature is good; only its nonce cannot be checked (the session store is
            # down). Signed, so the replica relays the 503 instead of calling it a bad answer.
            await self._signed_answer(
                send,
                headers,
                503,
                [(b"retry-after", b"2"), (b"content-type", b"text/plain")],
                f"Cannot verify forwarded requests: {exc}".encode(),
            )
            return
        body = await SpooledBody.read(receive, prefix_length=_announced_body_length(headers))
        try:
            await self._execute_forwarded(scope, send, headers, body)
        finally:
            body.close()

    async def _execute_forwarded(self, scope, send, headers, body: SpooledBody) -> None:
        cfg = self.config
        try:
            verify_content_digest(header(headers, b"content-digest"), body.digest)
        except DigestMismatch as exc:
            self.counters["rejected"] += 1
            await send_error(scope, send, 401, "Forwarded request rejected", str(exc))
            return
        key = header(headers, b"idempotency-key")
        try:
            n = int(header(headers, SESSION_LENGTH.encode()) or "0")
            if not key or not 0 <= n <= body.size:
                raise ValueError
        except ValueError:
            await self._signed_answer(
                send, headers, 400, [(b"content-type", b"text/plain")], b"bad forwarding envelope"
            )
            return
        sid = session_id(headers, cfg.session_cookie)
        request_hash = request_fingerprint(scope, body.prefix_digest(body.size - n), sid)
        # A read changes nothing, so it has no outcome to keep: it simply runs again.
        claim = None
        try:
            if scope["method"] not in SAFE_METHODS:
                claim = await self.idempotency.begin(key, request_hash)
        except IdempotencyUnavailable as exc:
            await self._signed_answer(
                send,
                headers,
                503,
                [(b"retry-after", b"1"), (b"idempotency-key", key.encode("latin-1"))],
                str(exc).encode(),
            )
            return
        if claim is not None:
            note(scope, idempotency=claim.outcome.value)
        if claim is None:
            pass
        elif claim.outcome is Outcome.REPLAY:
            self.counters["replayed"] += 1
            replayed = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in claim.headers]
            if claim.position:
                # The writer's next read must wait for the write, as after the first answer.
                replayed.append((POSITION.encode(), claim.position.encode()))
            await self._send_signed(send, headers, claim.status, replayed, claim.body)
            return
        elif claim.outcome is Outcome.IN_PROGRESS:
            await self._signed_answer(
                send,
                headers,
                409,
                [(IDEMPOTENCY.encode(), b"in-progress")],
                b"a request with this Idempotency-Key is running",
            )
            return
        elif claim.outcome is Outcome.MISMATCH:
            await self._signed_answer(
                send,
                headers,
                422,
                [(IDEMPOTENCY.encode(), b"mismatch")],
                b"this Idempotency-Key was used for a different request",
            )
            return
        try:
            session = self.codec.unpack(body.read_tail(n)) if n else None
            if sid:
                if session:
                    await self.session_store.set(sid, session)
                else:
                    await self.session_store.delete(sid)
        except SessionStoreUnavailable as exc:
            await self._abandon(claim)
            await self._signed_answer(
                send, headers, 503, [(b"retry-after", b"2")], str(exc).encode()
            )
            return
        except SessionError as exc:
            await self._abandon(claim)
            await self._signed_answer(
                send, headers, 413, [(b"content-type", b"text/plain")], str(exc).encode()
            )
            return
        forwarded = parse_forwarded(header(headers, b"forwarded") or "")
        app_headers = [
            (k, v)
            for k, v in strip_untrusted(headers)
            if k not in (b"host", b"content-length", b"idempotency-key")
        ]
        app_headers += [
            (b"host", forwarded.get("host", header(headers, b"host") or "").encode("latin-1")),
            (b"content-length", str(body.size - n).encode()),
            (b"forwarded", (header(headers, b"forwarded") or "").encode("latin-1")),
            (b"idempotency-key", key.encode("latin-1")),
        ]
        app_scope = {
            **scope,
            "headers": app_headers,
            "client": (forwarded.get("for", "unknown"), 0),
            "scheme": forwarded.get("proto", scope.get("scheme", "http")),
        }
        captured = CapturedResponse()
        try:
            with (
                request_route(self._primary_route, scope["method"], scope["path"], cfg.region.name),
                _fenced(claim),
            ):
                await self.app(app_scope, *body.replay(body.size - n, captured.send))
        except SessionStoreUnavailable as exc:
            await self._abandon(claim)
            await self._signed_answer(
                send, headers, 503, [(b"retry-after", b"2")], str(exc).encode()
            )
            return
        except Exception:
            log.exception("the app failed on a forwarded %s %s", scope["method"], scope["path"])
            await self._abandon(claim)
            await self._signed_answer(
                send, headers, 500, [(b"content-type", b"text/plain")], b"internal error"
            )
            return
        new_sid = set_cookie_value(captured.headers, cfg.session_cookie) or sid
        blob = b""
        if new_sid:
            session_after = await self.session_store.get(new_sid)
            # The session lives in its own region. The primary's copy is not deleted (another
            # request of the same session may be running on it) but expires soon; each
            # forwarded request brings the region's current session anyway.
            if session_after:
                await self.session_store.set(
                    new_sid, session_after, ttl_s=PRIMARY_SESSION_COPY_TTL_S
                )
            try:
                blob = self.codec.pack(session_after) if session_after else b""
            except SessionTooLarge as exc:
                await self._abandon(claim)
                await self._signed_answer(
                    send, headers, 500, [(b"content-type", b"text/plain")], str(exc).encode()
                )
                return
        out_headers = [
            (k, v)
            for k, v in captured.headers
            if k.decode("latin-1").lower() not in INTERNAL_RESPONSE_HEADERS
        ]
        envelope = bytes(captured.body) + blob
        out_headers.append((SESSION_LENGTH.encode(), str(len(blob)).encode()))
        out_headers.append((SESSION_STATE.encode(), b"updated" if blob else b"deleted"))
        # One round trip stores the outcome and reads the WAL position the replica must reach.
        if claim is None:
            position = await self.idempotency.position()
        else:
            _, position = await self.idempotency.complete_at_position(
                key,
                captured.status,
                [(k.decode("latin-1"), v.decode("latin-1")) for k, v in out_headers],
                envelope,
                claim=claim,
            )
        if position:
            out_headers.append((POSITION.encode(), position.encode()))
        self.counters["executed_forwarded"] += 1
        await self._send_signed(send, headers, captured.status, out_headers, envelope)

    async def _abandon(self, claim) -> None:
        """Release this run's claim (the app failed before any effect). With the claim, a run
        whose claim was taken over meanwhile deletes nothing of its successor's."""
        if claim is not None:
            await self.idempotency.abandon(claim.key, claim=claim)

    async def _signed_answer(self, send, request_headers, status, headers, body: bytes) -> None:
        """A signed answer of the gateway's own (a refusal or an error): it leaves the session
        as it is."""
        headers = [
            *headers,
            (SESSION_LENGTH.encode(), b"0"),
            (SESSION_STATE.encode(), b"unchanged"),
        ]
        await self._send_signed(send, request_headers, status, headers, body)

    async def _send_signed(
        self, send, request_headers, status: int, headers, envelope: bytes
    ) -> None:
        from latitude.signing import content_digest

        headers = [
            (k, v)
            for k, v in headers
            if k.lower() not in (b"content-digest", b"signature", b"signature-input")
        ]
        headers.append((b"content-digest", content_digest(envelope).encode()))
        headers += self.epochs.headers()
        signature = sign_response(
            self.config.keyring,
            status=status,
            headers=headers,
            request_headers=request_headers,
            covered=SIGNED_RESPONSE_HEADERS,
        )
        headers += [(k.lower().encode(), v.encode()) for k, v in signature.items()]
        await send_response(send, status, headers, envelope)


def session_id(headers: list[tuple[bytes, bytes]], cookie_name: str) -> str | None:
    """The session cookie's id, or None when there is none or it is not a valid id: a bad
    cookie is no session, as `SessionMiddleware` treats it, in every region and method."""
    sid = cookie_value(headers, cookie_name)
    try:
        return check_session_id(sid.strip().strip('"')) if sid else None
    except InvalidSessionId:
        return None


def _fenced(claim) -> contextlib.AbstractContextManager:
    if claim is None:
        return contextlib.nullcontext()
    return consistency.claimed(claim.key, claim.started_at)


def marked_stale(send: Send) -> Send:
    """`send`, adding `Latitude-Stale` to the answer: it comes from this region's replica,
    which may not have replayed the client's latest write (the primary is out of reach)."""

    async def marked(message: dict) -> None:
        if message["type"] == "http.response.start":
            headers = [*message.get("headers", []), (STALE, b"replica")]
            message = {**message, "headers": headers}
        await send(message)

    return marked


def _announced_body_length(headers) -> int | None:
    """The request's own length (without the session that rides after it), from its signed
    headers; None if they do not say."""
    try:
        return int(header(headers, b"content-length") or "0") - int(
            header(headers, SESSION_LENGTH.encode()) or "0"
        )
    except ValueError:
        return None


async def _nonce_cache_for(url: str | None) -> NonceCache:
    if not url or url.startswith("memory:"):
        return MemoryNonceCache()
    import redis.asyncio as redis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff
    from redis.exceptions import ConnectionError as RedisConnectionError

    url = url.replace("valkey://", "redis://", 1).replace("valkeys://", "rediss://", 1)
    # As the session store: a connection to a restarted Valkey is retried once on a new one.
    client = redis.from_url(
        url,
        retry=Retry(NoBackoff(), 1),
        retry_on_error=[RedisConnectionError],
        socket_connect_timeout=2.0,
        socket_timeout=2.0,
    )
    return ValkeyNonceCache(client)
