"""The health checker: every region's health endpoints probed from several vantage points.

Model, per (vantage point, region, service):

* one probe every `check_interval_s`, each an HTTP GET of the endpoint that must connect
  within `check_timeout_s` and then answer `200` within `check_timeout_s` (twice that on a new
  connection, whose handshake a relay or TLS charges to the answer: the probe after a lost one
  is always on a new connection); while the verdict is in doubt (a failure among the recent results,
  or the pair is down) every `suspect_interval_s` instead, so a death is confirmed, and a
  recovery noticed, in a fraction of the steady interval;
* healthy -> down after `check_threshold` failures among the last `window` results (one lost
  probe never takes a region out; a region answering 1 probe in 3 goes out), down -> healthy
  after `rise` successes in a row (so that region stays out); the first result sets the state;
* the round-trip time of successful probes (median of the last few) is what routing compares.

A vantage point sees a region healthy when every checked service is healthy there. A region is
down when at least a quorum of the vantage points that have a verdict see it down (default: a
majority), so one cut link does not take a region out but a dead region or one cut off from
the world does. When every region is down the checker fails open: routing uses them all.

Vantage points are either local (this process probes the URLs a topology file gives as seen
from that region; the lab's per-region topology files reach the others through the emulated
links) or peers: another `latitude health` elsewhere, whose verdicts are read over HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import statistics
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp

from latitude.routing.config import MAX_WINDOW, RoutingConfig
from latitude.topology import Topology

log = logging.getLogger(__name__)

RTT_SAMPLES = 5
USER_AGENT = "latitude-health/1"
# A peer's verdicts older than this many intervals no longer count (the peer abstains).
PEER_STALE_INTERVALS = 3


@dataclass(frozen=True)
class Target:
    region: str
    service: str
    url: str


@dataclass(frozen=True)
class Vantage:
    """A place the checks are made from, and the URLs of every region as seen from there."""

    name: str
    targets: tuple[Target, ...]
    location: tuple[float, float] | None = None


@dataclass(frozen=True)
class Peer:
    """Another checker whose verdicts count as vantage points: `GET {url}/_latitude/routing/observations`."""

    name: str
    url: str


def vantage_from_topology(
    name: str,
    topology: Topology,
    config: RoutingConfig,
    location: tuple[float, float] | None = None,
) -> Vantage:
    """The targets of every region as the given topology (as seen from `name`) reaches them."""
    targets: list[Target] = []
    for r in topology.regions:
        for service in config.check_services:
            base = (r.internal_url or r.public_url) if service == "app" else r.mirror_url
            if base:
                targets.append(Target(r.name, service, base.rstrip("/") + config.check_path))
    if location is None:
        with contextlib.suppress(KeyError):
            r = topology.region(name)
            location = (r.latitude, r.longitude)
    return Vantage(name, tuple(targets), location)


@dataclass
class PairState:
    """What one vantage point knows of one service of one region."""

    healthy: bool | None = None
    streak: int = 0  # consecutive results disagreeing with `healthy`
    recent: deque = field(default_factory=lambda: deque(maxlen=MAX_WINDOW))  # True = ok
    rtts: deque = field(default_factory=lambda: deque(maxlen=RTT_SAMPLES))
    checks: int = 0
    failures: int = 0
    last_checked: float | None = None  # wall clock
    last_error: str | None = None
    changed_at: float | None = None

    def observe(self, ok: bool, threshold: int, at: float, window: int = 0, rise: int = 0) -> bool:
        """Record one result; True when the state changed. `window` and `rise` default to
        `threshold` (the state then changes after `threshold` disagreeing results in a row)."""
        window, rise = window or threshold, rise or threshold
        self.checks += 1
        self.last_checked = at
        self.recent.append(ok)
        if not ok:
            self.failures += 1
        if self.healthy is None:
            self.healthy, self.streak, self.changed_at = ok, 0, at
            return True
        if ok == self.healthy:
            self.streak = 0
        else:
            self.streak += 1
        if self.healthy:
            changed = self._failed_in(window) >= threshold
        else:
            changed = self.streak >= rise
        if changed:
            self.healthy, self.streak, self.changed_at = not self.healthy, 0, at
            if self.healthy:
                self.recent.clear()  # the failures that took it out are history now
        return changed

    def _failed_in(self, window: int) -> int:
        n = min(window, len(self.recent))
        return sum(1 for i in range(1, n + 1) if not self.recent[-i])

    def in_doubt(self, window: int) -> bool:
        """Down, or healthy with a failure among the last `window` results: probe faster."""
        return self.healthy is False or (self.healthy is True and self._failed_in(window) > 0)

    @property
    def rtt_ms(self) -> float | None:
        return statistics.median(self.rtts) if self.rtts else None


@dataclass(frozen=True)
class RegionHealth:
    name: str
    healthy: bool
    up_votes: int
    down_votes: int
    votes: dict[str, bool | None]  # vantage -> verdict (None: no verdict yet)
    suspect: bool = False  # healthy, but some vantage point saw a recent failure


@dataclass(frozen=True)
class HealthView:
    """One consistent snapshot of what the checker believes, for routing to read."""

    regions: dict[str, RegionHealth]
    rtt_ms: dict[tuple[str, str], float]  # (vantage, region) -> measured round trip
    vantage_locations: dict[str, tuple[float, float]]
    at: float

    # Cached: the DNS front reads both on every query, and a view never changes once made.
    @functools.cached_property
    def healthy(self) -> tuple[str, ...]:
        return tuple(n for n, r in self.regions.items() if r.healthy)

    @functools.cached_property
    def suspect(self) -> tuple[str, ...]:
        """Healthy regions some vantage point has lately seen fail: answers naming them are
        given a short TTL, so resolvers ask again soon if the region is dying."""
        return tuple(n for n, r in self.regions.items() if r.healthy and r.suspect)

    @property
    def fail_open(self) -> bool:
        return bool(self.regions) and not self.healthy

    @property
    def routable(self) -> tuple[str, ...]:
        """The regions routing may answer with: the healthy ones, or all when none is."""
        return self.healthy if self.healthy else tuple(self.regions)

    def as_dict(self) -> dict:
        return {
            "at": self.at,
            "healthy": list(self.healthy),
            "suspect": list(self.suspect),
            "fail_open": self.fail_open,
            "regions": {
                n: {
                    "healthy": r.healthy,
                    "up_votes": r.up_votes,
                    "down_votes": r.down_votes,
                    "suspect": r.suspect,
                    "vantages": r.votes,
                }
                for n, r in self.regions.items()
            },
            "rtt_ms": [
                {"from": v, "to": t, "rtt_ms": round(ms, 3)} for (v, t), ms in self.rtt_ms.items()
            ],
        }


def empty_view(regions: list[str]) -> HealthView:
    return HealthView({n: RegionHealth(n, True, 0, 0, {}) for n in regions}, {}, {}, time.time())


ChangeCallback = Callable[[str, bool, float], None]


class HealthChecker:
    def __init__(
        self,
        topology: Topology,
        config: RoutingConfig,
        vantages: list[Vantage],
        peers: list[Peer] | None = None,
        on_change: ChangeCallback | None = None,
    ):
        self.topology = topology
        self.config = config
        self.vantages = list(vantages)
        self.peers = list(peers or [])
        self.on_change = on_change
        self.regions = [r.name for r in topology.regions]
        self.pairs: dict[tuple[str, str, str], PairState] = {}
        for v in self.vantages:
            for t in v.targets:
                self.pairs[(v.name, t.region, t.service)] = PairState()
        # Verdicts read from peers: vantage -> (received_at, {(region, service): (healthy, rtt)}).
        self.remote: dict[
            str, tuple[float, dict[tuple[str, str], tuple[bool | None, float | None]]]
        ] = {}
        self.remote_locations: dict[str, tuple[float, float]] = {}
        self.remote_doubts: set[tuple[str, str, str]] = set()  # (vantage, region, service)
        self.view: HealthView = empty_view(self.regions)
        self._verdicts: dict[str, bool] = {n: True for n in self.regions}
        self._tasks: list[asyncio.Task] = []
        self._sessions: list[aiohttp.ClientSession] = []

    # ---- results --------------------------------------------------------------------------

    def observe(
        self,
        vantage: str,
        region: str,
        service: str,
        ok: bool,
        latency_ms: float | None = None,
        error: str | None = None,
        at: float | None = None,
    ) -> None:
        """Record one probe result (the probe loops call this; so can tests)."""
        at = time.time() if at is None else at
        pair = self.pairs.setdefault((vantage, region, service), PairState())
        pair.last_error = None if ok else error
        if ok and latency_ms is not None:
            pair.rtts.append(latency_ms)
        c = self.config
        pair.observe(ok, c.check_threshold, at, c.window, c.rise)
        self.refresh(at)

    def refresh(self, at: float | None = None) -> HealthView:
        """Recompute the snapshot from every vantage point's state."""
        at = time.time() if at is None else at
        votes: dict[str, dict[str, bool | None]] = {n: {} for n in self.regions}
        doubted: set[str] = set()
        rtt: dict[tuple[str, str], float] = {}
        for (v, region, service), pair in self.pairs.items():
            if region not in votes:
                continue
            if pair.in_doubt(self.config.window):
                doubted.add(region)
            current = votes[region].get(v, True)
            if pair.healthy is None:
                verdict = None if current is not False else False
            else:
                verdict = False if (current is False or not pair.healthy) else current
            votes[region][v] = verdict
            if (
                service == self.config.check_services[0]
                and pair.healthy
                and pair.rtt_ms is not None
            ):
                rtt[(v, region)] = pair.rtt_ms
        stale_before = (
            at - PEER_STALE_INTERVALS * self.config.check_interval_s - self.config.check_timeout_s
        )
        for v, (received, results) in self.remote.items():
            if received < stale_before:
                continue
            per_region: dict[str, bool | None] = {}
            for (region, service), (healthy, ms) in results.items():
                if region not in votes:
                    continue
                if (v, region, service) in self.remote_doubts:
                    doubted.add(region)
                current = per_region.get(region, True)
                if healthy is None:
                    per_region[region] = None if current is not False else False
                else:
                    per_region[region] = False if (current is False or not healthy) else current
                if service == self.config.check_services[0] and healthy and ms is not None:
                    rtt[(v, region)] = ms
            for region, verdict in per_region.items():
                votes[region][v] = verdict
        regions: dict[str, RegionHealth] = {}
        for name in self.regions:
            known = [x for x in votes[name].values() if x is not None]
            down = sum(1 for x in known if x is False)
            up = len(known) - down
            quorum = self.config.check_quorum or (len(known) // 2 + 1)
            healthy = not (down > 0 and down >= min(quorum, len(known)))
            regions[name] = RegionHealth(
                name, healthy, up, down, votes[name], healthy and name in doubted
            )
        locations = {v.name: v.location for v in self.vantages if v.location}
        locations.update(self.remote_locations)
        self.view = HealthView(regions, rtt, locations, at)
        for name, r in regions.items():
            if r.healthy != self._verdicts.get(name):
                self._verdicts[name] = r.healthy
                log.info("%s is now %s", name, "healthy" if r.healthy else "DOWN")
                if self.on_change:
                    self.on_change(name, r.healthy, at)
        return self.view

    def observations(self) -> dict:
        """This checker's own verdicts, for peers (`GET /_latitude/routing/observations`)."""
        out: dict[str, dict] = {}
        for (v, region, service), pair in self.pairs.items():
            out.setdefault(v, {"location": None, "results": []})["results"].append(
                {
                    "region": region,
                    "service": service,
                    "healthy": pair.healthy,
                    "rtt_ms": pair.rtt_ms,
                    "last_checked": pair.last_checked,
                    "last_error": pair.last_error,
                    "checks": pair.checks,
                    "failures": pair.failures,
                    "in_doubt": pair.in_doubt(self.config.window),
                }
            )
        for v in self.vantages:
            if v.name in out and v.location:
                out[v.name]["location"] = list(v.location)
        return {"at": time.time(), "vantages": out}

    def absorb(self, payload: dict, received_at: float | None = None) -> None:
        """Take a peer's `observations()` as vantage points of ours."""
        received_at = time.time() if received_at is None else received_at
        own = {v.name for v in self.vantages}
        for v, data in (payload.get("vantages") or {}).items():
            if v in own or not isinstance(data, dict):
                continue
            results: dict[tuple[str, str], tuple[bool | None, float | None]] = {}
            for row in data.get("results") or []:
                try:
                    healthy = row["healthy"]
                    ms = row.get("rtt_ms")
                    key = (str(row["region"]), str(row["service"]))
                    results[key] = (
                        None if healthy is None else bool(healthy),
                        None if ms is None else float(ms),
                    )
                    if row.get("in_doubt") is True:
                        self.remote_doubts.add((v, *key))
                    else:
                        self.remote_doubts.discard((v, *key))
                except (KeyError, TypeError, ValueError):
                    continue
            self.remote[v] = (received_at, results)
            loc = data.get("location")
            if isinstance(loc, list) and len(loc) == 2:
                with contextlib.suppress(TypeError, ValueError):
                    self.remote_locations[v] = (float(loc[0]), float(loc[1]))
        self.refresh()

    # ---- probing --------------------------------------------------------------------------

    async def start(self) -> None:
        timeout = aiohttp.ClientTimeout(total=self.config.check_timeout_s)
        for v in self.vantages:
            session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(
                    limit=0, keepalive_timeout=max(15.0, 3 * self.config.check_interval_s)
                ),
                timeout=timeout,
                headers={"User-Agent": USER_AGENT, "X-Latitude-Vantage": v.name},
            )
            self._sessions.append(session)
            for t in v.targets:
                self._tasks.append(asyncio.create_task(self._probe_loop(session, v, t)))
        if self.peers:
            session = aiohttp.ClientSession(timeout=timeout, headers={"User-Agent": USER_AGENT})
            self._sessions.append(session)
            for p in self.peers:
                self._tasks.append(asyncio.create_task(self._peer_loop(session, p)))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        for s in self._sessions:
            await s.close()
        self._sessions.clear()

    async def probe_once(self) -> HealthView:
        """Probe every target from every local vantage point once (for `latitude health --once`)."""
        await self.start_sessions_only()
        try:
            jobs = [
                self._probe_and_observe(s, v, t)
                for s, v in zip(self._sessions, self.vantages, strict=False)
                for t in v.targets
            ]
            await asyncio.gather(*jobs)
        finally:
            await self.stop()
        return self.view

    async def start_sessions_only(self) -> None:
        timeout = aiohttp.ClientTimeout(total=self.config.check_timeout_s)
        for v in self.vantages:
            self._sessions.append(
                aiohttp.ClientSession(
                    timeout=timeout,
                    headers={"User-Agent": USER_AGENT, "X-Latitude-Vantage": v.name},
                )
            )

    async def _probe_loop(self, session: aiohttp.ClientSession, v: Vantage, t: Target) -> None:
        loop = asyncio.get_running_loop()
        c = self.config
        pair = self.pairs.setdefault((v.name, t.region, t.service), PairState())
        while True:
            started = loop.time()
            try:
                await self._probe_and_observe(session, v, t)
            except asyncio.CancelledError:
                raise
            except Exception:  # never let one probe end the loop
                log.exception("probe of %s from %s failed unexpectedly", t.url, v.name)
            # Steady cadence from the probe's start (a slow probe does not delay the next one);
            # in doubt, the next probe comes soon, to confirm a failure or a recovery.
            step = c.suspect_interval_s if pair.in_doubt(c.window) else c.check_interval_s
            await asyncio.sleep(max(0.0, started + step - loop.time()))

    async def _probe_and_observe(
        self, session: aiohttp.ClientSession, v: Vantage, t: Target
    ) -> None:
        timeout = self.config.check_timeout_s
        pair = self.pairs.get((v.name, t.region, t.service))
        # A probe that failed without an answer took its connection with it, so the next one
        # opens a new connection, and across a relay (or with TLS) the handshake rides on its
        # first answer: two round trips where a kept-alive probe takes one. Judged by the
        # kept-alive bound, the probe confirming a single lost one failed too under jitter and
        # load, and one lost probe took a healthy region out. A new connection gets the connect
        # budget on top of the answer's (Route 53 also times connecting separately).
        fresh = pair is None or pair.checks == 0 or _lost_connection(pair.last_error)
        ok, latency, error = await probe(
            session, t.url, timeout, answer_s=2 * timeout if fresh else timeout
        )
        self.observe(v.name, t.region, t.service, ok, latency, error)

    async def _peer_loop(self, session: aiohttp.ClientSession, p: Peer) -> None:
        url = p.url.rstrip("/") + "/_latitude/routing/observations"
        while True:
            try:
                async with session.get(url) as resp:
                    if resp.status == 200:
                        self.absorb(await resp.json())
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.debug("peer %s at %s: %s", p.name, url, exc)
                self.refresh()
            await asyncio.sleep(self.config.check_interval_s)


def _lost_connection(error: str | None) -> bool:
    """Whether a probe's failure closed its connection (anything but an HTTP answer)."""
    return error is not None and not error.startswith("HTTP ")


async def probe(
    session: aiohttp.ClientSession, url: str, timeout_s: float, answer_s: float | None = None
) -> tuple[bool, float | None, str | None]:
    """GET `url`: (healthy, latency of the successful request in ms, error).

    Like Route 53's checks, the timeout applies to connecting and, separately, to the answer
    once the request is sent (`answer_s`, default `timeout_s`; the checker gives a probe on a
    new connection twice as long, as a relay or TLS charges the handshake to the answer)."""
    loop = asyncio.get_running_loop()
    answer_s = timeout_s if answer_s is None else answer_s
    deadline = loop.time() + timeout_s + answer_s
    per_step = aiohttp.ClientTimeout(total=None, connect=timeout_s, sock_read=answer_s)
    attempts = 2  # a kept-alive connection the server closed meanwhile gets one fresh retry
    while True:
        attempts -= 1
        started = loop.time()
        try:
            async with asyncio.timeout_at(deadline):
                async with session.get(url, allow_redirects=False, timeout=per_step) as resp:
                    await resp.content.read(65536)
                    latency = (loop.time() - started) * 1000
                    if resp.status == 200:
                        return True, latency, None
                    return False, None, f"HTTP {resp.status}"
        except TimeoutError:  # aiohttp's connect and read timeouts are TimeoutErrors too
            return False, None, f"no answer within {answer_s:g} s"
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
            if attempts > 0 and loop.time() < deadline:
                continue
            return False, None, _describe(exc)
        except aiohttp.ClientError as exc:
            return False, None, _describe(exc)
        except OSError as exc:
            return False, None, _describe(exc)


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) < 200 else text[:197] + "..."
