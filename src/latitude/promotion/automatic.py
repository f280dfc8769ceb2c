"""Automatic failover by majority: `latitude failover watch --region R` in every region.

Each watcher probes the primary's gateway from its own region every second and keeps its
verdict in `failover-view.json` beside the region's epoch file; the region's gateway serves it
with its epoch (`GET /_latitude/epoch`), so each watcher reads the others' verdicts across the
links. A replica region promotes itself only when

1. a majority of all regions (itself included) report the primary of the current epoch down
   for `after_s` (default 10 s): a minority partition never has one;
2. it is the most caught-up of the replicas reporting (received WAL, then name): all watchers
   compute the same candidate from the same reports;
3. a majority of regions adopt its *pending* epoch N+1 first. A gateway adopts one epoch per
   number, so two candidates cannot both win N+1; the loser backs off and the winner promotes.

Meanwhile the primary's gateway, cut off from the majority for `lease_s` (default 5 s, below
`after_s`), stops acknowledging writes (`latitude.promotion.follow`): one primary at a time.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import signal
import time
from pathlib import Path

import aiohttp

from latitude import atomic
from latitude.promotion.epoch import Epoch, EpochFile, epoch_file_for, initial_epoch, sign_epoch
from latitude.promotion.follow import EPOCH_PATH
from latitude.promotion.postgres import PgServer, PgUnavailable, slot_name
from latitude.promotion.regions_http import json_to_all
from latitude.promotion.remote import RemoteCluster, keyring_from
from latitude.topology import Topology, load_topology

log = logging.getLogger("latitude.promotion")

VIEW_FILE = "failover-view.json"
DEFAULT_AFTER_S = 10.0
DEFAULT_LEASE_S = 5.0
PROBE_TIMEOUT_S = 1.0
# Rounds are `interval_s` apart but not to the microsecond: without a little slack, the round at
# which the primary has been down `after_s` can read 9.999 s and the majority comes a round late.
DOWN_SLACK_S = 0.1
# A peer's view older than this says nothing (its watcher stopped). A round under a partition
# takes up to two probe timeouts, so a live watcher's view can be ~3 s old when read.
FRESH_VIEW_S = 5.0
# Between rounds the epoch file is read this often: a new primary is followed (this region's
# standby re-pointed) at once, not at the next round. With `synchronous = K` the new primary's
# first commits wait for that.
EPOCH_CHECK_S = 0.1


def view_file_for(topology_source: str) -> Path:
    return epoch_file_for(topology_source).parent / VIEW_FILE


def read_view(topology_source: str) -> dict | None:
    try:
        return json.loads(view_file_for(topology_source).read_text())
    except (OSError, ValueError):
        return None


class FailoverWatcher:
    def __init__(self, topology: Topology, region: str, interval_s: float = 1.0):
        self.topology = topology
        self.region = topology.region(region).name
        settings = dict(topology.failover)
        self.after_s = float(settings.get("after_s", DEFAULT_AFTER_S))
        self.interval_s = interval_s
        self.keyring = keyring_from(topology)
        self.epochs = EpochFile(epoch_file_for(topology.source), self.keyring)
        self.view_path = view_file_for(topology.source)
        self.cluster = RemoteCluster(topology)
        self.down_since: float | None = None
        self.stopping = asyncio.Event()
        self.promoted: Epoch | None = None
        self.followed: int | None = None

    def epoch(self) -> Epoch:
        found = self.epochs.read()
        return found[0] if found else initial_epoch(self.topology)

    def _url(self, name: str) -> str:
        r = self.topology.region(name)
        return (r.internal_url or r.public_url or "").rstrip("/")

    async def _probe_primary(self, session, primary: str) -> bool:
        try:
            async with session.get(self._url(primary) + "/_latitude/health") as resp:
                return resp.status == 200
        except Exception:
            return False

    def _received(self) -> int:
        try:
            pos = PgServer(
                self.region, self.topology.region(self.region).database_url, 2
            ).position()
        except PgUnavailable:
            return -1
        return pos["received"] or pos["flush"] or 0

    def _write_view(self, epoch: Epoch, received: int) -> dict:
        view = {
            "region": self.region,
            "epoch": epoch.number,
            "primary": epoch.primary,
            "down_for_s": 0.0 if self.down_since is None else time.time() - self.down_since,
            "received": received,
            "at": time.time(),
        }
        # Rewritten on every poll, and only a view for peers: not worth an fsync.
        atomic.write_json(self.view_path, view, fsync=False)
        return view

    async def _peer_views(self, session) -> list[dict]:
        async def one(name: str) -> dict | None:
            try:
                async with session.get(self._url(name) + EPOCH_PATH) as resp:
                    data = await resp.json(content_type=None)
                return data.get("view")
            except Exception:
                return None

        names = [r.name for r in self.topology.regions if r.name != self.region]
        return [v for v in await asyncio.gather(*(one(n) for n in names)) if v]

    def _down_for_now(self, view: dict) -> float:
        """How long the view's region has seen the primary down, as of now. A peer's view was
        written at its last round, up to `interval_s` ago, and served with its age on the
        peer's own clock (`age_s`): a fresh one counts that age too, or the majority would be
        reached a round late. A view older than `FRESH_VIEW_S` counts for nothing (its watcher
        stopped); one without `age_s` (an older gateway) is taken as written, judged fresh by
        this region's clock."""
        try:
            down_for = float(view.get("down_for_s") or 0.0)
            if view.get("region") == self.region:
                return down_for  # this round's own
            if "age_s" not in view:
                fresh = time.time() - float(view.get("at") or 0) < FRESH_VIEW_S
                return down_for if fresh else 0.0
            age = float(view["age_s"])
        except (TypeError, ValueError):
            return 0.0  # a view that does not parse says nothing
        if age > FRESH_VIEW_S or down_for <= 0:
            return 0.0
        return down_for + age

    def _follow(self, epoch: Epoch) -> None:
        """A new primary: stream from it (as this region reaches it)."""
        if self.followed is None:
            self.followed = epoch.number
        if epoch.number <= self.followed or not epoch.active or epoch.primary == self.region:
            return
        me = PgServer(self.region, self.topology.region(self.region).database_url, 5)
        try:
            if me.in_recovery():
                me.set_upstream(
                    self.cluster.conninfo(self.region, epoch.primary), slot_name(self.region)
                )
                log.warning("%s: streaming from %s now", self.region, epoch.primary)
        except PgUnavailable as exc:
            log.warning("%s: cannot re-point the database: %s", self.region, exc)
            return
        self.followed = epoch.number

    async def step(self, session) -> str:
        epoch = self.epoch()
        self._follow(epoch)
        found = self.epochs.read()
        if not epoch.active and epoch.primary == self.region and found and not self.promoted:
            # This region's own proposal, kept here but not by a majority when it was made
            # (a peer's answer came late): offered again until a majority holds it. Left
            # alone, every region that kept it would hold writes under it for good.
            return await self._complete(epoch, found[1], len(self.topology.regions) // 2 + 1)
        if not epoch.active or epoch.primary == self.region:
            self.down_since = None
            self._write_view(epoch, self._received())
            return "primary here" if epoch.primary == self.region else "epoch pending"
        up = await self._probe_primary(session, epoch.primary)
        if up:
            self.down_since = None
        elif self.down_since is None:
            self.down_since = time.time()
        mine = self._write_view(epoch, self._received())
        views = [mine] + [
            v for v in await self._peer_views(session) if v.get("epoch") == epoch.number
        ]
        down = [v for v in views if self._down_for_now(v) >= self.after_s - DOWN_SLACK_S]
        majority = len(self.topology.regions) // 2 + 1
        if len(down) < majority:
            return f"primary {epoch.primary} {'up' if up else 'down'}; {len(down)} of {majority}"
        candidate = max(down, key=lambda v: (v["received"], v["region"]))
        if candidate["region"] != self.region:
            return f"majority agrees {epoch.primary} is down; {candidate['region']} promotes"
        return await self._promote(epoch, majority)

    async def _promote(self, epoch: Epoch, majority: int) -> str:
        pending = Epoch(epoch.number + 1, self.region, "pending", time.time())
        return await self._complete(pending, sign_epoch(self.keyring, pending), majority)

    async def _complete(self, pending: Epoch, token: str, majority: int) -> str:
        """Offer the pending epoch `token`; once a majority holds it, promote this region."""
        told = await asyncio.to_thread(self._propose, token)
        if told < majority:
            await asyncio.sleep(random.uniform(0.5, 2.0))
            return f"proposed {pending}: only {told} of {majority} adopted it; backing off"
        me = PgServer(self.region, self.topology.region(self.region).database_url, 10)
        if me.in_recovery():
            me.promote()
        others = [r.name for r in self.topology.regions if r.name != self.region]
        me.ensure_slots(others)
        quorum = int(self.topology.replication.get("synchronous", 0) or 0)
        if quorum:
            me.set_synchronous(quorum, others)
        active = pending.activated()
        # Each other region's watcher re-points its own standby when it sees the epoch (at once:
        # `_wait_next_round`): only it knows the address this region has from there.
        await asyncio.to_thread(self.cluster.publish, sign_epoch(self.keyring, active))
        self.promoted = active
        log.warning("promoted %s by majority (epoch %s)", self.region, pending.number)
        return f"promoted: {active}"

    def _propose(self, token: str) -> int:
        """Offer the pending epoch to every region; how many hold it now (this one included)."""
        kept = self.epochs.offer(token) or (self.epochs.read() or (None, None))[1] == token
        urls = {
            r.name: self._url(r.name) + EPOCH_PATH
            for r in self.topology.regions
            if r.name != self.region
        }
        answers = json_to_all(urls, {"token": token}, timeout_s=PROBE_TIMEOUT_S * 2)
        # Adopted now, or already held (a proposal offered again).
        held = sum(
            1
            for a in answers.values()
            if isinstance(a, dict) and (a.get("adopted") or a.get("token") == token)
        )
        return held + (1 if kept else 0)

    async def run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=PROBE_TIMEOUT_S)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            last = ""
            while not self.stopping.is_set():
                started = time.monotonic()
                try:
                    said = await self.step(session)
                except Exception as exc:  # a failed round is retried on the next one
                    said = f"round failed: {exc!r}"
                if said != last:
                    log.warning("%s: %s", self.region, said)
                    last = said
                await self._wait_next_round(started)

    async def _wait_next_round(self, started: float) -> None:
        """Until `interval_s` after `started`, or until the epoch file changes (a promotion
        published here), or until stopped."""
        seen = self.epochs.read()
        while (left := self.interval_s - (time.monotonic() - started)) > 0:
            try:
                await asyncio.wait_for(self.stopping.wait(), min(left, EPOCH_CHECK_S))
                return
            except TimeoutError:
                pass
            now = self.epochs.read()
            if (now and now[1]) != (seen and seen[1]):
                return


def _log_with_times() -> None:
    """Each verdict with its UTC time to the millisecond: when the majority agreed and when
    the region was promoted are what an operator (and `bench_promotion.py`) asks of this log."""
    handler = logging.StreamHandler()
    formatter = logging.Formatter(
        "%(asctime)s.%(msecs)03dZ %(levelname)s %(message)s", "%Y-%m-%dT%H:%M:%S"
    )
    formatter.converter = time.gmtime
    handler.setFormatter(formatter)
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def run(topology_path: str, region: str) -> None:
    topology = load_topology(topology_path)
    watcher = FailoverWatcher(topology, region)
    _log_with_times()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, watcher.stopping.set)
        await watcher.run()

    asyncio.run(main())


__all__ = ["FailoverWatcher", "read_view", "run"]
