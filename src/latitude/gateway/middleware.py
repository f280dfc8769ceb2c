"""`RegionGateway`: the pure-ASGI middleware that makes one app multi-region.

`classify` decides each request's way in one fixed order; this module holds the gateway's
lifecycle, that dispatch, and its own endpoints. Each way has its own home:

- a read served here: `RegionGateway._serve_read` (below), with `positions.PositionTracker`;
- a write carried to the primary: `replica.ReplicaSide` (sign, send, retry, relay);
- the primary out of reach: `fallback.Fallback` (run here with SQL to the primary);
- a request forwarded to the primary: `primary.PrimarySide` (verify, claim, run, sign);
- what they carry: `envelope`; every refusal and its status: `answers`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter

from latitude import db
from latitude.forwarding import Forwarding, ForwardingClient
from latitude.forwarding_h1 import H1ForwardingClient
from latitude.gateway.answers import DeadlinePassed, FailedHere, refuse
from latitude.gateway.classify import SAFE_METHODS, Decision, classify
from latitude.gateway.config import GatewayConfig
from latitude.gateway.envelope import FORWARDED_FROM
from latitude.gateway.fallback import Fallback
from latitude.gateway.heap import heap_status
from latitude.gateway.intake import check_request, check_target
from latitude.gateway.messages import (
    ClientDisconnected,
    Receive,
    Scope,
    Send,
    client_address,
    header,
    send_error,
    send_json,
    strip_untrusted,
)
from latitude.gateway.observe import TTFB, note, watch_answer
from latitude.gateway.positions import PositionTracker, request_route
from latitude.gateway.primary import PrimarySide
from latitude.gateway.replica import ReplicaSide
from latitude.idempotency import IdempotencyStore, OutcomeStore
from latitude.promotion.follow import EpochFollower
from latitude.sessions import (
    SessionCodec,
    SessionStore,
    SessionStoreUnavailable,
    session_store_from_url,
)

log = logging.getLogger("latitude.gateway")


class RegionGateway:
    def __init__(
        self,
        app,
        config: GatewayConfig,
        *,
        session_store: SessionStore | None = None,
        forwarding: Forwarding | None = None,
        idempotency: OutcomeStore | None = None,
        fallback_store: OutcomeStore | None = None,
        replay_watcher=None,
    ):
        """The parts are made from `config` at start-up unless given (the unit tests give
        in-memory ones): `forwarding` carries a replica's writes to the primary; `idempotency`
        is the primary's outcome table; `fallback_store` is that same table as a replica region
        reaches it over the ocean when the primary's gateway does not answer; `replay_watcher`
        tells how far the region's replica has replayed."""
        self.app = app
        self.config = config
        self.codec = SessionCodec(limit_bytes=config.session_limit_bytes)
        self.session_store = session_store
        self.forwarding = forwarding
        self.idempotency = idempotency
        self.positions = PositionTracker(config, watcher=replay_watcher)
        self.counters: Counter[str] = Counter()
        self._started = False
        self._start_lock = asyncio.Lock()
        self._stats_task: asyncio.Task | None = None
        self._purge_task: asyncio.Task | None = None
        self._pool_task: asyncio.Task | None = None  # the forwarding pool's keeper
        self._primary_db_seen_at = float("-inf")  # when a fallback last reached the primary DB
        # The primary epoch: which region is primary now (latitude.promotion); it may swap
        # `config`, and the route that runs requests here as the primary.
        self.epochs = EpochFollower(config)
        self.primary_route = db.PRIMARY
        self.replica = ReplicaSide(self)
        self.primary = PrimarySide(self)
        self.fallback = Fallback(self, store=fallback_store)

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
            await self.take_role()
            await self.positions.start()
            client = getattr(self.session_store, "client", None)
            if client is not None:
                self._stats_task = asyncio.create_task(self._publish_stats(client))
            self._started = True

    async def take_role(self, *, moved: bool = False) -> list:
        """Open what this region's role (`config.is_primary`) needs. `moved`: the primary
        moved (a promotion): what served the old role is handed back, for the caller to close
        once the requests in flight are done with it."""
        cfg = self.config
        region = cfg.region
        retired: list = []
        if cfg.is_primary:
            if moved:
                retired.append(self.forwarding)
                self.forwarding = None
                self._keep_pool()
            if self.idempotency is None:
                self.idempotency = await IdempotencyStore.open(
                    region.database_url, hold_liveness=True
                )
                with contextlib.suppress(Exception) if moved else contextlib.nullcontext():
                    await self.idempotency.ensure_schema()
            if self._purge_task is None:
                self._purge_task = asyncio.create_task(
                    self.idempotency.purge_periodically(
                        cfg.idempotency_retention_s,
                        cfg.idempotency_purge_every_s,
                        on_error=lambda exc: log.warning("idempotency purge failed: %s", exc),
                    )
                )
            return retired
        if moved:
            # The idempotency store stays a while for writes still running here as primary
            # (promotion.follow retires it).
            retired += [self.forwarding, await self.fallback.detach()]
            self.forwarding = None
            self._keep_pool()
            if self._purge_task is not None:
                self._purge_task.cancel()
                self._purge_task = None
        if self.forwarding is None:
            client = ForwardingClient if cfg.forwarding_client == "aiohttp" else H1ForwardingClient
            self.forwarding = client(
                cfg.primary_url,
                pool_size=cfg.pool_size,
                pooling=cfg.pooling,
                connect_timeout_s=cfg.connect_timeout_s,
                ca_file=cfg.ca_file,
                max_response_bytes=cfg.max_answer_bytes,
            )
            if moved:  # requests wait on this: a slow new primary must not hold them long
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self.forwarding.warm(), 2.0)
            else:
                await self.forwarding.warm()
            self._keep_pool()
        if region.primary_database_url and not moved:
            # The fallback's pool connects now, in the background: a first fallback write
            # then has no connection to set up over the ocean within its deadline.
            await self.fallback.open()
        return retired

    def _keep_pool(self) -> None:
        """The pool to the primary kept full while this region forwards to it: connections
        lost to a restart or a reset link are replaced before a write needs them."""
        if self._pool_task is not None:
            self._pool_task.cancel()  # the client it kept is retired
            self._pool_task = None
        if self.forwarding is not None:
            self._pool_task = asyncio.create_task(self.forwarding.keep_full())

    async def _publish_stats(self, client, interval_s: float = 1.0) -> None:
        """Add this process's counters to the region's shared tally (a Valkey hash), so a
        region's figures cover all its worker processes (`latitude lab status` reads them)."""
        key = f"latitude:stats:{self.config.region.name}"
        sent: Counter[str] = Counter()
        while True:
            await asyncio.sleep(interval_s)
            now = Counter({**self.counters, **self.positions.counters})
            now["epoch_peer_connections"] = self.epochs.counters["peer_connections"]
            if self.forwarding is not None:  # new connections: the pool's, the path checks'
                info = self.forwarding.pool_info()
                now["forwarding_connections"] = info.get("opened", 0)
                now["forwarding_refills"] = info.get("refilled", 0)
                now["forwarding_probes"] = info.get("probes", 0)
            delta = {k: v - sent.get(k, 0) for k, v in now.items() if v != sent.get(k, 0)}
            if not delta:
                continue
            try:
                # Sent at once (the session store's client pipelines them on its connection).
                await asyncio.gather(*(client.hincrbyfloat(key, f, v) for f, v in delta.items()))
                sent = now
            except Exception as exc:  # figures are best effort; requests never wait on them
                log.debug("could not publish gateway stats: %s", exc)

    async def shutdown(self) -> None:
        for task in (self._stats_task, self._purge_task, self._pool_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        self._stats_task = self._purge_task = self._pool_task = None
        for closer in (
            getattr(self.forwarding, "close", None),
            getattr(self.idempotency, "close", None),
            self.fallback.close,
            getattr(self.session_store, "close", None),
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
        slack = 8192 if header(scope["headers"], FORWARDED_FROM) else 0
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
            forwarded=header(headers, FORWARDED_FROM) is not None,
            local=self.config.local_routes,
            always_forward=self.config.always_forward_routes,
        )
        self.counters[decision.value] += 1
        note(scope, decision=decision.value)
        box, send = watch_answer(scope, send)
        try:
            await self._dispatch(decision, scope, receive, send)
        except ClientDisconnected:
            self.counters["client_disconnected"] += 1
        except Exception:
            if TTFB in box:  # half an answer is out: only closing the connection is left
                raise
            region = self.config.region.name
            log.exception("%s %s failed in %s", scope["method"], scope["path"], region)
            self.counters["failed_here"] += 1
            changes = scope["method"] not in SAFE_METHODS
            await refuse(scope, send, FailedHere(region, changes=changes))

    async def _dispatch(
        self, decision: Decision, scope: Scope, receive: Receive, send: Send
    ) -> None:
        """The request's way, as `classify` decided it (the module doc lists each one's home)."""
        if decision is Decision.LATITUDE:
            await self._own_endpoint(scope, send)
        elif decision is Decision.VERIFY:
            await self.primary(scope, receive, send)
        elif decision is Decision.PRIMARY:
            await self.run_here(scope, receive, send, self.primary_route)
        elif decision is Decision.LOCAL and scope["method"] not in SAFE_METHODS:
            # Listed `local`: a POST that only reads runs here, never forwarded.
            await self.run_here(scope, receive, send, db.REPLICA)
        elif decision is Decision.LOCAL:
            await self._serve_read(scope, receive, send)
        else:
            await self.replica.forward(scope, receive, send)

    def edge_scope(self, scope: Scope) -> Scope:
        """The request as the app may see it: no client-set trust headers."""
        return {**scope, "headers": strip_untrusted(scope["headers"])}

    async def run_here(self, scope: Scope, receive: Receive, send: Send, route: str) -> None:
        box, send = watch_answer(scope, send)
        try:
            with request_route(route, scope["method"], scope["path"], self.config.region.name):
                await self.app(self.edge_scope(scope), receive, send)
        except SessionStoreUnavailable as exc:
            # The app's own sessions (SessionMiddleware) are in the region's store too.
            if TTFB in box:
                raise
            self.counters["session_store_down"] += 1
            await refuse(scope, send, exc)

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
            "heap": heap_status(),
        }

    # ---- replica side: reads -------------------------------------------------------------

    async def _serve_read(self, scope: Scope, receive: Receive, send: Send) -> None:
        checked = time.monotonic()
        current = await self.positions.replica_is_current(scope)
        note(scope, read_wait_s=time.monotonic() - checked)
        if current:
            note(scope, kind="local_read")
            await self.run_here(scope, receive, send, db.REPLICA)
        else:
            note(scope, kind="read_forwarded")
            self.counters["read_forwarded"] += 1
            await self.replica.forward(scope, receive, send)

    async def deadline_passed(self, scope: Scope, send: Send, key: str) -> None:
        """No answer by the deadline: the client gets the key to retry with (504)."""
        self.counters["deadline"] += 1
        note(scope, outcome="deadline")
        why = f"no answer came within {self.config.deadline_s:g} s"
        await refuse(scope, send, DeadlinePassed(why, key=key))
