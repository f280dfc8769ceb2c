"""The routing service: checker, uptime history, region choice, DNS front and HTTP endpoint
in one event loop. `latitude dns` and `latitude health` run this; so can tests and benchmarks,
in a background thread (`BackgroundRouting`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable
from pathlib import Path

from aiohttp import web

from latitude.routing.choice import RegionRouter
from latitude.routing.config import RoutingConfig
from latitude.routing.dns import DnsFront, DnsServer
from latitude.routing.geo import CidrTable, GeoIPDatabase, Locator
from latitude.routing.health import HealthChecker, Peer, Vantage, vantage_from_topology
from latitude.routing.history import UptimeHistory
from latitude.routing.http import add_routes
from latitude.topology import Topology

log = logging.getLogger(__name__)


def make_locator(topology: Topology, config: RoutingConfig) -> Locator:
    cidr = CidrTable(config.cidrs, topology) if config.cidrs else None
    geoip = GeoIPDatabase(config.geoip_path) if config.geoip_path else None
    return Locator(cidr, geoip)


class RoutingService:
    def __init__(
        self,
        topology: Topology,
        config: RoutingConfig,
        *,
        vantages: list[Vantage] | None = None,
        peers: list[Peer] | None = None,
        locator: Locator | None = None,
        history_path: str | Path | None = None,
        dns_host: str = "127.0.0.1",
        dns_port: int | None = 5353,
        http_host: str = "127.0.0.1",
        http_port: int | None = None,
        on_change: Callable[[str, bool, float], None] | None = None,
        check: bool = True,
        epoch=None,
    ):
        self.topology = topology
        self.config = config
        if vantages is None:
            vantages = [vantage_from_topology("local", topology, config)]
        self.history = (
            UptimeHistory(history_path, max_gap_s=3 * config.check_interval_s + 1)
            if history_path
            else None
        )
        self._user_on_change = on_change
        self.checker = HealthChecker(topology, config, vantages, peers, on_change=self._changed)
        self.locator = locator or make_locator(topology, config)
        # `epoch`: a `latitude.promotion.watch.EpochWatch`; without one the topology's primary
        # stays the primary (a topology built in memory, a test).
        self.epoch = epoch
        self.router = RegionRouter(
            topology,
            config,
            self.locator,
            lambda: self.checker.view,
            primary=(lambda: epoch.primary) if epoch is not None else None,
        )
        ns = (dns_host,) if dns_host not in ("0.0.0.0", "::", "") else ()
        self.front = DnsFront(config, self.router, ns)
        self.dns = DnsServer(self.front, dns_host, dns_port) if dns_port is not None else None
        self.http_host = http_host
        self.http_port = http_port
        self._runner: web.AppRunner | None = None
        self._tick: asyncio.Task | None = None
        self.check = check

    @property
    def dns_port(self) -> int | None:
        return self.dns.port if self.dns else None

    def _changed(self, region: str, healthy: bool, at: float) -> None:
        if self.history is not None:
            try:
                self.history.record({region: healthy}, at)
            except Exception:
                log.exception("could not write the uptime history")
        if self._user_on_change is not None:
            self._user_on_change(region, healthy, at)

    async def _follow_epoch(self) -> None:
        """Learn promotions: primary-only names and the no-location default follow them."""
        while True:
            try:
                await asyncio.to_thread(self.epoch.refresh)
            except Exception:
                log.exception("could not read the epoch")
            await asyncio.sleep(min(self.config.check_interval_s, 1.0))

    async def _ticker(self) -> None:
        while True:
            await asyncio.sleep(self.config.check_interval_s)
            if self.history is not None:
                view = self.checker.refresh()
                try:
                    self.history.record({n: r.healthy for n, r in view.regions.items()})
                except Exception:
                    log.exception("could not write the uptime history")

    async def start(self) -> None:
        if self.dns is not None:
            await self.dns.start()
        if self.http_port is not None:
            app = web.Application()
            add_routes(app, self.router, self.checker)
            self._runner = web.AppRunner(app, access_log=None)
            await self._runner.setup()
            site = web.TCPSite(self._runner, self.http_host, self.http_port)
            await site.start()
            if self.http_port == 0:
                server = site._server  # the bound port, when 0 asked for any
                assert server is not None
                self.http_port = server.sockets[0].getsockname()[1]
        if self.check:
            await self.checker.start()
        self._tick = asyncio.create_task(self._ticker())
        self._epoch_task = None
        if self.epoch is not None:
            if self.epoch.why_not:
                log.warning("%s", self.epoch.why_not)
            await asyncio.to_thread(self.epoch.refresh)
            self._epoch_task = asyncio.create_task(self._follow_epoch())

    async def stop(self) -> None:
        if getattr(self, "_epoch_task", None) is not None:
            self._epoch_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._epoch_task
        if self._tick is not None:
            self._tick.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._tick
        await self.checker.stop()
        if self.dns is not None:
            await self.dns.stop()
        if self._runner is not None:
            await self._runner.cleanup()
        if self.history is not None:
            if self.check:
                view = self.checker.view
                with contextlib.suppress(Exception):
                    self.history.record({n: r.healthy for n, r in view.regions.items()})
            self.history.close()
        self.locator.close()


class BackgroundRouting:
    """A `RoutingService` on its own event loop in a thread: `start()` returns once it listens."""

    def __init__(self, service: RoutingService):
        self.service = service
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def start(self) -> BackgroundRouting:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.service.start(), self.loop).result(30)
        return self

    def call(self, fn: Callable, *args):
        """Run `fn(*args)` on the service's loop and return its result."""

        async def run():
            return fn(*args)

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(30)

    def stop(self) -> None:
        try:
            asyncio.run_coroutine_threadsafe(self.service.stop(), self.loop).result(30)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self.loop.close()

    def __enter__(self) -> BackgroundRouting:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
