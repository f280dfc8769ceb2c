"""Promotion in the lab: the `Cluster` the switchover and failover steps run on.

The lab is its regions' operator: it reaches each database directly, stops and starts them,
reads `pg_controldata`, runs `pg_rewind`, and writes each region's epoch file (the push a
production promotion makes with `POST /_latitude/epoch`). Replication between regions always
goes through the links: a re-pointed replica streams through the relay to its new primary.
"""

from __future__ import annotations

import time
from pathlib import Path

import psycopg

from latitude.lab.postgres import SUPERUSER, PostgresError, database_url
from latitude.lab.world import BadLabInput, LabError, LabWorld
from latitude.promotion.epoch import Epoch, EpochFile, initial_epoch
from latitude.promotion.journal import Journal, PromotionError
from latitude.promotion.postgres import PgServer, PgUnavailable, parse_lsn, slot_name
from latitude.signing import Keyring, SigningKey

STREAM_TIMEOUT_S = 20.0


class LabCluster:
    def __init__(self, world: LabWorld):
        self.world = world
        state = world.state()
        self.regions = list(state.regions)
        self.keyring = Keyring([SigningKey("lab-1", state.secret.encode())], "lab-1")
        topology = world.topology()
        self.synchronous = int(topology.replication.get("synchronous", 0) or 0)
        self._initial = initial_epoch(topology)

    # ---- epochs ----------------------------------------------------------------------------

    def epoch_file(self, region: str | None = None) -> EpochFile:
        folder = self.world.state_dir if region is None else self._region_dir(region)
        return EpochFile(folder / "epoch.json", self.keyring)

    def _region_dir(self, region: str) -> Path:
        return Path(self.world.state().regions[region].topology_file).parent

    def epoch(self) -> Epoch:
        """The newest epoch the lab or any region has seen (`latitude promote` tells regions)."""
        newest = self._initial
        for where in (None, *self.regions):
            found = self.epoch_file(where).read()
            if found and found[0].newer_than(newest):
                newest = found[0]
                if where is not None:
                    self.epoch_file().offer(found[1])
        return newest

    def journal(self) -> Journal:
        return Journal(self.world.state_dir)

    def publish(self, token: str, skip: tuple[str, ...] = ()) -> dict[str, str]:
        self.epoch_file().offer(token)
        told = {}
        for r in self.regions:
            if r in skip:
                continue
            self.epoch_file(r).offer(token)
            told[r] = "told"
        return told

    def record(self, epoch: Epoch, token: str, skip: tuple[str, ...] = ()) -> None:
        if epoch.active:
            self.world.set_primary(epoch.primary, epoch.number, skip=skip)

    # ---- databases -------------------------------------------------------------------------

    def pg(self, region: str) -> PgServer:
        port = self.world.state().regions[region].pg_port
        return PgServer(region, database_url(port), timeout_s=5)

    def conninfo(self, replica: str, upstream: str) -> str:
        port = self.world.relay_port(replica, upstream, "pg")
        return (
            f"host=127.0.0.1 port={port} user={SUPERUSER} application_name={replica} "
            "connect_timeout=5"
        )

    def fence(self, region: str) -> int:
        """Stop the old primary cleanly; its final WAL position is its shutdown checkpoint."""
        node = self.world._pg(self.world.state(), region)
        if not node.is_running():
            raise PromotionError(
                f"{region}'s database is down: its final position is unknown; "
                f"use `latitude lab promote REGION --force` for a forced failover"
            )
        self.pg(region).wait_quiet()  # the writes already running are acknowledged first
        _stop_fast(node)
        control = node.controldata()
        return parse_lsn(control["Latest checkpoint location"]) or 0

    def unfence(self, region: str) -> None:
        node = self.world._pg(self.world.state(), region)
        if not node.is_running():
            node.start()

    def repoint(self, region: str, primary: str) -> str:
        pg = self.pg(region)
        try:
            if not pg.in_recovery():
                return "is not a standby (left alone)"
            pg.set_upstream(self.conninfo(region, primary), slot_name(region))
        except PgUnavailable:
            return "unreachable (rejoin it later)"
        if self.wait_streaming(region, primary, STREAM_TIMEOUT_S):
            return "streams"
        # Its WAL went past the new timeline's fork: rewind it onto the new timeline.
        return self.rejoin(region, primary)

    def wait_streaming(self, region: str, primary: str, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        url = self.pg(primary).url
        while time.monotonic() < deadline:
            try:
                with psycopg.connect(url, connect_timeout=2, autocommit=True) as c:
                    row = c.execute(
                        "select state from pg_stat_replication where application_name = %s",
                        (region,),
                    ).fetchone()
                if row and row[0] == "streaming":
                    return True
            except psycopg.Error:
                pass
            time.sleep(0.1)
        return False

    def rejoin(self, region: str, primary: str) -> str:
        """Make `region`'s database a streaming replica of `primary`: restart it as a standby,
        and if it cannot follow the new timeline, `pg_rewind` it first."""
        world = self.world
        state = world.state()
        node = world._pg(state, region)
        upstream = world.relay_port(region, primary, "pg")
        slot = slot_name(region)
        with _suppress_pg():
            self.pg(primary).ensure_slots([region])
        if node.is_running():
            node.stop(mode="fast")
        how = ""
        if self._can_follow(node, primary):
            node.make_standby(upstream, slot)
            node.start()
            if self.wait_streaming(region, primary, STREAM_TIMEOUT_S / 2):
                how = "streams from the new primary (clean shutdown, no rewind)"
        if not how:
            node.stop(mode="fast")
            try:
                node.rewind(upstream)
            except PostgresError as exc:
                raise PromotionError(
                    f"{region}: pg_rewind failed ({exc}); rebuild it with `latitude lab down`/`up`"
                ) from None
            node.make_standby(upstream, slot)
            node.start()
            if not self.wait_streaming(region, primary, STREAM_TIMEOUT_S):
                raise PromotionError(
                    f"{region} does not stream from {primary} after pg_rewind; see {node.log_file}"
                )
            how = "rewound (pg_rewind) and streams from the new primary"
        world.set_primary(primary, only=(region,))
        found = self.epoch_file().read()
        if found:
            self.epoch_file(region).offer(found[1])
        return how

    def _can_follow(self, node, primary: str) -> bool:
        """Whether the stopped `node`'s WAL ends before the new timeline forked from it (a clean
        switchover): then it follows without a rewind."""
        try:
            control = node.controldata()
            end = parse_lsn(control["Latest checkpoint location"]) or 0
            tli = int(control["Latest checkpoint's TimeLineID"])
            source = self.pg(primary)
            timeline = source.position()["timeline"]
            rows = source.query("select pg_read_file(%s)", (f"pg_wal/{timeline:08X}.history",))
        except (PostgresError, PgUnavailable, KeyError, ValueError):
            return False
        for line in (rows[0][0] or "").splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0].isdigit() and int(parts[0]) == tli:
                return end < (parse_lsn(parts[1]) or 0)
        return False


def promote(
    world: LabWorld,
    region: str | None,
    *,
    force: bool = False,
    auto_choose: bool = False,
    max_lag_bytes: int | None = None,
    progress=print,
) -> dict:
    """`latitude lab promote`: a switchover, or with `force` a forced failover."""
    from latitude.promotion.failover import failover
    from latitude.promotion.journal import BadPromotion
    from latitude.promotion.switchover import DEFAULT_MAX_LAG_BYTES, switchover

    cluster = LabCluster(world)
    if auto_choose and not force:
        raise BadPromotion("--auto-choose chooses the replica of a forced failover: add --force")
    if region is None and not auto_choose:
        raise BadPromotion("name the region to promote (or pass --force --auto-choose)")
    if force:
        return failover(cluster, region, auto_choose=auto_choose, progress=progress)
    limit = max_lag_bytes or world.topology().failover.get("max_lag_bytes") or DEFAULT_MAX_LAG_BYTES
    return switchover(cluster, region, max_lag_bytes=int(limit), progress=progress)


def revive_region(world: LabWorld, region: str, *, services: bool = True) -> list[str]:
    """`latitude lab revive REGION` / `latitude rejoin REGION`: every part of the region back;
    a region that is not the primary any more rejoins as a replica of the new timeline."""
    state = world.state()
    state.region(region)  # BadLabInput, naming the regions there are
    cluster = LabCluster(world)
    primary = cluster.epoch().primary
    if region == primary and not services:
        others = ", ".join(r for r in state.regions if r != primary)
        raise BadLabInput(
            f"{region} is the primary, so it has nothing to rejoin; `latitude rejoin` brings back "
            f"an old primary ({others}); `latitude lab revive {region} db` restarts a stopped one"
        )
    lines = []
    if region == primary:
        lines.append(world.revive(region, "db"))
    else:
        lines.append(f"{region} db: {cluster.rejoin(region, primary)}")
    if services:
        lines.append(world.revive(region, "sessions"))
        for service in state.regions[region].services:
            lines.append(world.revive(region, service))
    return lines


def _stop_fast(node, timeout_s: float = 30.0) -> None:
    """`pg_ctl stop -m fast`, without pg_ctl: SIGINT to the postmaster and a 10 ms watch of its
    pid file (pg_ctl looks every 100 ms, and is one more process to start while writes wait)."""
    import os
    import signal

    pid = node.pid()
    if pid is None:
        return
    try:
        os.kill(pid, signal.SIGINT)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not (node.data_dir / "postmaster.pid").exists():
            return
        time.sleep(0.01)
    node.stop(mode="fast")  # still up: pg_ctl says why


class _suppress_pg:
    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        return kind is not None and issubclass(kind, PgUnavailable | LabError)
