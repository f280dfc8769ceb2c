"""The gateway's side of the epoch: learn the newest one, follow it at once, hold writes while one
is pending, and (with a lease) stop acknowledging writes when cut off from the majority.

`RegionGateway` calls four things, each one line there: `start()` at start-up, `gate()` before
each request, `heard()` with an answer's `Latitude-Epoch` header, `headers()` for its own answers.
Following an epoch swaps the gateway's config for one whose primary is the epoch's, and opens or
closes what the new role needs (the forwarding pool, the idempotency store with its nonces).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import replace
from pathlib import Path

from latitude import db
from latitude.promotion.epoch import (
    Epoch,
    EpochError,
    EpochFile,
    epoch_file_for,
    initial_epoch,
    sign_epoch,
    verify_epoch,
)

log = logging.getLogger("latitude.promotion")

EPOCH_HEADER = "latitude-epoch"
EPOCH_PATH = "/_latitude/epoch"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
DEFAULT_HOLD_S = 5.0
PEER_TIMEOUT_S = 1.0


def topology_for_epoch(topology, primary: str):
    """`topology` with `primary` as the primary region and every other region writing to it."""
    new = topology.region(primary)
    regions = tuple(
        replace(
            r,
            primary=r.name == primary,
            primary_database_url=None if r.name == primary else new.database_url,
        )
        for r in topology.regions
    )
    return replace(topology, regions=regions)


def failover_settings(topology) -> dict:
    return dict(getattr(topology, "failover", {}) or {})


class EpochFollower:
    def __init__(self, config):
        self.base = config.topology  # as the process started: what the app's engines were built on
        self.keyring = config.keyring
        source = Path(config.topology.source)
        self.file = (
            EpochFile(epoch_file_for(source), self.keyring) if source.suffix == ".toml" else None
        )
        settings = failover_settings(config.topology)
        self.hold_s = float(settings.get("hold_s", DEFAULT_HOLD_S))
        # With automatic failover the primary holds a lease, shorter than the others' wait.
        lease = settings.get("lease_s", 5.0 if settings.get("automatic") else None)
        self.lease_s = float(lease) if lease else None
        self.peer_poll_s = float(settings.get("peer_poll_s", 1.0 if self.lease_s else 0))
        self.epoch: Epoch = initial_epoch(config.topology)
        self.token: str | None = None
        self.applied: str = config.topology.primary.name
        self._lock = asyncio.Lock()
        self._tasks: list[asyncio.Task] = []
        # A lease is earned by reaching a majority, never granted at start-up: a primary revived
        # behind a partition must not acknowledge writes before it has heard from its peers.
        self._majority_seen_at = float("-inf")
        self.counters = {
            "epochs_adopted": 0,
            "writes_held": 0,
            "writes_refused": 0,
            "peer_connections": 0,  # new connections the peer questions opened
        }
        # One keep-alive session for every question: polling each second with a new session
        # opened a new connection across every link each time.
        self._peers = None

    # ---- learning --------------------------------------------------------------------------

    def _take(self, epoch: Epoch, token: str) -> bool:
        if not epoch.newer_than(self.epoch):
            return False
        self.epoch, self.token = epoch, token
        self.counters["epochs_adopted"] += 1
        log.warning("adopted %s", epoch)
        return True

    def _read_file(self) -> None:
        if self.file is not None:
            found = self.file.read()
            if found is not None:
                self._take(*found)

    def offer(self, token: str | None) -> bool:
        """Adopt `token` if it is a valid, newer epoch (and keep it in the region's file)."""
        if not token:
            return False
        try:
            epoch = verify_epoch(self.keyring, token)
        except EpochError as exc:
            log.warning("ignored an epoch: %s", exc)
            return False
        if not epoch.newer_than(self.epoch):
            return False
        if self.file is not None:
            with contextlib.suppress(OSError):
                self.file.offer(token)
        return self._take(epoch, token)

    async def start(self, gateway) -> None:
        self._read_file()
        if self.file is not None:  # a deployed region (not a topology built in memory)
            answered = await self._ask_peers(gateway)
            if answered + 1 > len(self.base.regions) // 2:
                self._majority_seen_at = time.monotonic()
        await self._apply(gateway)
        self._tasks.append(asyncio.create_task(self._watch_file(gateway)))
        if self.peer_poll_s > 0:
            self._tasks.append(asyncio.create_task(self._poll(gateway)))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        self._tasks.clear()
        if self._peers is not None:
            await self._peers.close()
            self._peers = None

    async def _watch_file(self, gateway, interval_s: float = 0.2) -> None:
        """Follow a new epoch before the next request needs it: that request then pays nothing
        for the new role's pools."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                self._read_file()
                await self._apply(gateway)
            except Exception as exc:
                log.debug("epoch file check failed: %r", exc)

    async def _ask_peers(self, gateway) -> int:
        """Ask every other region's gateway for its epoch; return how many answered."""
        import aiohttp

        me = gateway.config.region.name
        urls = [
            (r.internal_url or r.public_url).rstrip("/") + EPOCH_PATH
            for r in self.base.regions
            if r.name != me and (r.internal_url or r.public_url)
        ]
        if not urls:
            return 0
        timeout = aiohttp.ClientTimeout(total=PEER_TIMEOUT_S)

        async def one(session, url) -> bool:
            try:
                async with session.get(url) as resp:
                    data = await resp.json(content_type=None)
                self.offer(data.get("token"))
                return True
            except Exception:
                return False

        if self._peers is None or self._peers.closed:
            from latitude.forwarding import counting_connections

            self._peers = aiohttp.ClientSession(
                timeout=timeout,
                connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=60),
                trace_configs=[counting_connections(self._count_peer_connection)],
            )
        answers = await asyncio.gather(*(one(self._peers, u) for u in urls))
        return sum(answers)

    def _count_peer_connection(self) -> None:
        self.counters["peer_connections"] += 1

    async def _poll(self, gateway) -> None:
        peers = len(self.base.regions) - 1
        while True:
            await asyncio.sleep(self.peer_poll_s)
            try:
                answered = await self._ask_peers(gateway)
                # A majority of all regions, this one included.
                if answered + 1 > (peers + 1) // 2:
                    self._majority_seen_at = time.monotonic()
                await self._apply(gateway)
            except Exception as exc:
                log.debug("epoch poll failed: %r", exc)

    def heard(self, token: str | None) -> None:
        """An epoch that came with an answer (forwarded or refused); followed on the next request."""
        self.offer(token)

    async def follow(self, gateway) -> None:
        """Follow the newest epoch now (the region's file, and what was heard), not at the next
        request: a write in flight across a promotion is sent on to the new primary."""
        self._read_file()
        await self._apply(gateway)

    # ---- following -------------------------------------------------------------------------

    def lease_lost(self, gateway) -> bool:
        return (
            self.lease_s is not None
            and gateway.config.is_primary
            and time.monotonic() - self._majority_seen_at > self.lease_s
        )

    async def _apply(self, gateway) -> None:
        """Make the gateway's role match the newest epoch's primary."""
        if self.epoch.primary == self.applied:
            return
        async with self._lock:
            target = self.epoch.primary
            if target == self.applied:
                return
            names = {r.name for r in self.base.regions}
            if target not in names:
                log.error("%s names unknown region %r; ignored", self.epoch, target)
                return
            await _reconfigure(gateway, topology_for_epoch(self.base, target), self.base)
            self.applied = target
            # A peer reached recently: a new primary starts with a fresh lease.
            self._majority_seen_at = time.monotonic()

    async def gate(self, gateway, scope, receive, send) -> bool:
        """Before a request: follow the newest epoch; hold a write while an epoch is pending.
        True if the request was answered here (refused) and must go no further."""
        is_write = scope["method"] not in SAFE_METHODS or any(
            k == b"latitude-forwarded-from" for k, _ in scope["headers"]
        )
        if is_write or scope["path"] == EPOCH_PATH:
            # A write is fenced by the newest epoch on disk, looked at now. A read needs no
            # fence: `_watch_file` follows the file within 0.2 s, and a stat per read would
            # be a read's largest single cost in the gateway (benchmarks/README.md, session 10).
            self._read_file()
        await self._apply(gateway)
        if scope["path"] == EPOCH_PATH:
            await self.endpoint(gateway, scope, receive, send)
            return True
        if not is_write:
            return False
        if not self.epoch.active:
            self.counters["writes_held"] += 1
            deadline = time.monotonic() + self.hold_s
            while not self.epoch.active and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
                self._read_file()
            await self._apply(gateway)
            if not self.epoch.active:
                await self._refuse(scope, send, f"the primary is moving to {self.epoch.primary}")
                return True
        if self.lease_lost(gateway):
            await self._refuse(
                scope,
                send,
                "this primary region cannot reach a majority of regions (its lease ran out)",
            )
            return True
        return False

    async def _refuse(self, scope, send, why: str) -> None:
        from latitude.gateway.messages import send_error

        self.counters["writes_refused"] += 1
        await send_error(
            scope,
            send,
            503,
            "Writes paused",
            f"No change was made: {why}. Retry in a moment.",
            extra_headers=[(b"retry-after", b"1"), *self.headers()],
            data={"read_only": True, "epoch": self.epoch.number},
        )

    def headers(self) -> list[tuple[bytes, bytes]]:
        return [(EPOCH_HEADER.encode(), self.token.encode())] if self.token else []

    def status(self) -> dict:
        return {
            "number": self.epoch.number,
            "primary": self.epoch.primary,
            "state": self.epoch.state,
            **self.counters,
        }

    async def endpoint(self, gateway, scope, receive, send) -> None:
        """GET: this region's newest epoch. POST {"token": ...}: offer a newer one."""
        from latitude.gateway.messages import send_error, send_json

        if scope["method"] == "POST":
            body = b""
            while len(body) < 65536:
                message = await receive()
                body += message.get("body", b"")
                if not message.get("more_body"):
                    break
            try:
                token = json.loads(body or b"{}")["token"]
                verify_epoch(self.keyring, token)
            except (ValueError, KeyError, TypeError) as exc:
                await send_error(scope, send, 400, "Bad epoch", f'send {{"token": "..."}}: {exc}')
                return
            except EpochError as exc:
                await send_error(scope, send, 403, "Epoch rejected", str(exc))
                return
            adopted = self.offer(token)
            await self._apply(gateway)
            await send_json(send, 200, {"adopted": adopted, **self._answer(gateway)})
        else:
            await send_json(send, 200, self._answer(gateway))

    def _answer(self, gateway) -> dict:
        answer = {
            "region": gateway.config.region.name,
            "role": gateway.config.region.role,
            "epoch": self.status(),
            "token": self.token,
        }
        if self.file is not None:
            # The region's failover watcher's verdict on the primary (latitude.promotion.automatic).
            with contextlib.suppress(OSError, ValueError, TypeError, AttributeError):
                view = json.loads((self.file.path.parent / "failover-view.json").read_text())
                # Its age on this region's own clock: a reader far away need not trust its own
                # clock to agree with ours.
                view["age_s"] = max(0.0, time.time() - float(view.get("at", 0)))
                answer["view"] = view
        return answer


async def _reconfigure(gateway, topology, base) -> None:
    """Swap the gateway's config for `topology`'s view, and its resources for the new role."""
    old = gateway.config
    gateway.config = replace(old, topology=topology, region=topology.region(old.region.name))
    cfg = gateway.config
    # The app's engines were built from the start-up topology: its "replica" engine is the local
    # database, which is what a region promoted since must write to.
    started_primary = base.region(cfg.region.name).primary
    gateway.primary_route = db.PRIMARY if started_primary else db.REPLICA
    closers = await gateway.take_role(moved=True)
    store = gateway.idempotency
    if not cfg.is_primary and store is not None:
        # A write that was running here as primary when the epoch moved still completes its
        # idempotency record with this store (it reads the attribute when it finishes): taking
        # it away at once turned such writes, already committed, into 500s.
        asyncio.get_running_loop().call_later(
            30, lambda: asyncio.ensure_future(_retire_store(gateway, store))
        )
    gateway.positions.config = cfg
    if gateway._started and not cfg.is_primary and gateway.positions.watcher is None:
        with contextlib.suppress(Exception):
            await gateway.positions.start()
    # Requests in flight may still be using the old pool or store: close them a little later.
    asyncio.get_running_loop().call_later(30, lambda: asyncio.ensure_future(_close_all(closers)))


async def _retire_store(gateway, store) -> None:
    if gateway.idempotency is store and not gateway.config.is_primary:
        gateway.idempotency = None
        await _close_all([store])


async def _close_all(things) -> None:
    for thing in things:
        closer = getattr(thing, "close", None)
        if closer is not None:
            with contextlib.suppress(Exception):
                await closer()


def signed(keyring, epoch: Epoch) -> str:
    return sign_epoch(keyring, epoch)
