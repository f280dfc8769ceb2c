"""Read-your-writes for the gateway: the primary's replication position after a write travels
back in a signed cookie, and a later read in the replica region waits (bounded) until the local
replica has replayed it, or is forwarded to the primary instead."""

from __future__ import annotations

import contextlib
import logging
import time

from latitude import consistency, db
from latitude.cookies import cookie_value
from latitude.gateway.config import GatewayConfig
from latitude.gateway.deadlines import bounded
from latitude.gateway.messages import Scope

log = logging.getLogger("latitude.gateway")

POSITION_COOKIE = "latitude_pos"


def request_route(route: str, method: str, path: str, region: str):
    """Tell the app (through `latitude.db`) which database this request must use."""
    return db.routed_request(route, method, path, region)


class PositionTracker:
    def __init__(self, config: GatewayConfig, watcher=None):
        """`watcher`: what tells how far the local replica has replayed (made from the region's
        `database_url` at start-up unless given: the unit tests give an in-memory one)."""
        self.config = config
        self._given_watcher = watcher
        self.cookie = consistency.PositionCookie(
            config.keyring.signing_key.secret, name=POSITION_COOKIE
        )
        self.policy = consistency.ConsistencyPolicy.from_config(config.consistency)
        self.watcher: consistency.ReplayWatcher | None = None
        self.strong: consistency.StrongPositionSource | None = None
        self._watcher_tried_at = float("-inf")
        self.counters = {
            "reads_local": 0,
            "reads_waited": 0,
            "reads_forwarded": 0,
            "wait_ms_total": 0.0,
        }

    async def start(self) -> None:
        region = self.config.region
        if self.config.is_primary:
            return  # at the primary every read is current
        elif self._given_watcher is not None:
            await self._given_watcher.start()
            self.watcher = self._given_watcher
        elif region.database_url:
            watcher = consistency.ReplayWatcher(region.database_url)
            # Kept only once started: a region demoted by a promotion starts it while its
            # database restarts as a replica, and a half-started watcher must not be used.
            await watcher.start()
            self.watcher = watcher
            if region.primary_database_url and _uses_strong(self.policy):
                self.strong = consistency.StrongPositionSource(region.primary_database_url)
                with contextlib.suppress(Exception):
                    await self.strong.open(wait=False)

    async def _start_watcher(self) -> bool:
        """Start the watcher late (at most once a second): after a demotion the first tries
        meet a database that is still restarting."""
        now = time.monotonic()
        if now - self._watcher_tried_at < 1.0:
            return False
        self._watcher_tried_at = now
        with contextlib.suppress(Exception):
            await bounded(self.start(), self.config.read_wait_s)
        return self.watcher is not None

    async def close(self) -> None:
        for thing in (self.watcher, self.strong):
            if thing is not None:
                with contextlib.suppress(Exception):
                    await thing.close()

    async def replica_is_current(self, scope: Scope) -> bool:
        """True to serve this read from the local replica; False to forward it."""
        mode = self.policy.mode_for(scope["path"])
        if mode is consistency.ConsistencyMode.EVENTUAL or self.config.is_primary:
            self.counters["reads_local"] += 1
            return True
        if self.watcher is None:
            # A region demoted moments ago, its database restarting: one more try to start.
            await self._start_watcher()
        started = time.monotonic()
        ok = await consistency.read_locally(
            mode,
            self.watcher,
            cookie_position=self.cookie_position(scope),
            strong=self.strong,
            timeout_s=self.config.read_wait_s,
        )
        waited = (time.monotonic() - started) * 1000
        if waited > 0.05:
            self.counters["reads_waited"] += 1
            self.counters["wait_ms_total"] += waited
        self.counters["reads_local" if ok else "reads_forwarded"] += 1
        return ok

    def cookie_position(self, scope: Scope) -> consistency.ReplicationPosition | None:
        """The position in the request's cookie, if it is genuine and was issued here.

        A cookie is bound to the region that issued it. Each region answers on its own host, so
        a browser never sends one region's cookie to another; one that arrives anyway was
        carried over by hand (or by a cookie domain shared across regions), and is not this
        region's promise to keep: honouring it would let one cookie make every region wait
        and cross the ocean for its reads. Read-your-writes holds within the writer's region."""
        raw = cookie_value(scope["headers"], POSITION_COOKIE)
        claim = self.cookie.read_claim(raw) if raw else None
        if claim is None or claim.region != self.config.region.name:
            return None
        return claim.position

    def cookie_headers(self, scope: Scope, position: str | None) -> list[tuple[bytes, bytes]]:
        if not position or self.config.is_primary:
            return []
        try:
            new = consistency.ReplicationPosition.parse(position)
        except ValueError:
            return []
        if self.watcher is not None:
            # The primary's timeline: a standby may not show its own (see ReplayWatcher).
            self.watcher.note_timeline(new.timeline)
        # Answers to one user's concurrent requests may arrive out of order: never go back.
        old = self.cookie_position(scope)
        if old is not None and new < old:
            new = old
        value = self.cookie.issue(new, self.config.region.name)
        secure = scope.get("scheme") == "https"
        return [
            (b"set-cookie", self.cookie.set_cookie_header(value, secure=secure).encode("latin-1"))
        ]

    def stats(self) -> dict:
        out = dict(self.counters)
        if self.watcher is not None:
            out["watcher"] = self.watcher.stats()
            out["replayed"] = str(self.watcher.replayed) if self.watcher.replayed else None
        return out


def _uses_strong(policy: consistency.ConsistencyPolicy) -> bool:
    strong = consistency.ConsistencyMode.STRONG
    return policy.default is strong or strong in policy.routes.values()
