"""Planned switchover: move the primary to a caught-up replica with no acknowledged write lost.

The steps (docs/promotion.md): check and cascade the other replicas through the target (before
any write waits: they are then already connected when it is promoted, and with quorum commit its
first commits do not wait for a standby to reconnect across an ocean), publish the next epoch as
pending (gateways hold writes),
fence the old primary's database and take its final WAL position, wait for the target to
replay it, promote the target, create the slots, publish the epoch active, re-point the other
replicas, bring the old primary back as a replica. Each step is bounded, printed, and written to
the journal, so running the command again resumes an interrupted one.

`Cluster` is what the steps need from the world; the lab (`latitude.lab.promote`) and a
production topology (`latitude.promotion.remote`) each provide one.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

from latitude.promotion.epoch import Epoch, sign_epoch
from latitude.promotion.journal import BadPromotion, Journal, PromotionError
from latitude.promotion.postgres import PgServer, PgUnavailable, format_lsn, slot_name

Progress = Callable[[str], None]
DEFAULT_MAX_LAG_BYTES = 16 * 1024 * 1024


class Cluster(Protocol):
    regions: list[str]
    keyring: object
    synchronous: int

    def epoch(self) -> Epoch: ...
    def journal(self) -> Journal: ...
    def pg(self, region: str) -> PgServer: ...
    def conninfo(self, replica: str, upstream: str) -> str: ...
    def publish(self, token: str, skip: tuple[str, ...] = ()) -> dict[str, str]: ...
    def fence(self, region: str) -> int: ...
    def unfence(self, region: str) -> None: ...
    def rejoin(self, region: str, primary: str) -> str: ...
    def repoint(self, region: str, primary: str) -> str: ...
    def wait_streaming(self, region: str, primary: str, timeout_s: float) -> bool: ...
    def record(self, epoch: Epoch, token: str, skip: tuple[str, ...] = ()) -> None: ...


class Steps:
    """Numbered, timed progress lines."""

    def __init__(self, total: int, progress: Progress):
        self.total, self.n, self.progress = total, 0, progress
        self.started = time.monotonic()

    def say(self, text: str, t0: float) -> None:
        self.n += 1
        self.progress(f"[{self.n}/{self.total}] {text} ({time.monotonic() - t0:.2f} s)")


def check_target(cluster: Cluster, target: str, epoch: Epoch) -> None:
    if target not in cluster.regions:
        raise BadPromotion(
            f"unknown region {target!r}; the regions are {', '.join(cluster.regions)}"
        )
    if target == epoch.primary:
        raise BadPromotion(
            f"{target} is already the primary ({epoch}); name one of the replicas: "
            f"{', '.join(r for r in cluster.regions if r != target)}"
        )


def _resuming(cluster: Cluster, target: str) -> bool:
    earlier = cluster.journal().read()
    return bool(earlier and earlier.get("target") == target)


def switchover(
    cluster: Cluster,
    target: str,
    *,
    force: bool = False,
    max_lag_bytes: int = DEFAULT_MAX_LAG_BYTES,
    replay_timeout_s: float = 30.0,
    progress: Progress = print,
) -> dict:
    epoch = cluster.epoch()
    if not _resuming(cluster, target):
        check_target(cluster, target, epoch)
    steps = Steps(9, progress)
    with cluster.journal().running(target, "switchover") as j:
        old = j.data.setdefault("from", epoch.primary)
        number = j.data.setdefault("epoch", epoch.number + 1)
        pg_target, pg_old = cluster.pg(target), cluster.pg(old)

        t0 = time.monotonic()
        if not j.done("checked"):
            try:
                if not pg_target.in_recovery():
                    raise BadPromotion(f"{target}'s database is not a standby; nothing to promote")
            except PgUnavailable as exc:
                raise BadPromotion(f"{exc}; a switchover needs the target up") from None
            try:
                primary_at = pg_old.position()["flush"] or 0
            except PgUnavailable as exc:
                raise BadPromotion(
                    f"{exc}; the primary cannot be reached: use --force for a forced failover"
                ) from None
            lag = max(0, primary_at - pg_target.replay_lsn())
            if lag > max_lag_bytes and not force:
                raise BadPromotion(
                    f"{target} is {lag} bytes behind {old} (the limit is {max_lag_bytes}); "
                    "wait for it to catch up, or pass --force"
                )
            j.mark("checked", lag_bytes=lag)
            j.mark("cascaded", cascaded=cascade(cluster, target, old, pg_target))
        steps.say(
            f"check: {target} is a standby {j.data['lag_bytes']} bytes behind {old}; "
            f"{_cascaded(j, target)}",
            t0,
        )

        pending = Epoch(number, target, "pending", time.time())
        t0 = time.monotonic()
        if not j.done("pending"):
            token = sign_epoch(cluster.keyring, pending)
            told = cluster.publish(token)
            j.mark("pending", told=told)
        steps.say(f"publish epoch {number} pending: gateways hold writes ({_told(j)})", t0)

        t0 = time.monotonic()
        if not j.done("fenced"):
            final = cluster.fence(old)
            j.mark("fenced", final_lsn=final)
        steps.say(f"fence {old}: final WAL position {format_lsn(j.data['final_lsn'])}", t0)

        t0 = time.monotonic()
        if not j.done("replayed"):
            if not pg_target.wait_replayed(j.data["final_lsn"], replay_timeout_s):
                _roll_back(cluster, j, old, number)
                raise PromotionError(
                    f"{target} did not replay {old}'s final WAL position within "
                    f"{replay_timeout_s:.0f} s; rolled back: {old} is primary again "
                    f"(epoch {number + 1})"
                )
            j.mark("replayed")
        steps.say(f"{target} replayed {format_lsn(j.data['final_lsn'])}", t0)

        t0 = time.monotonic()
        if not j.done("promoted"):
            if pg_target.in_recovery():
                pg_target.promote()
            j.mark("promoted")
        steps.say(f"pg_promote {target}: new timeline {pg_target.position()['timeline']}", t0)

        t0 = time.monotonic()
        others = [r for r in cluster.regions if r != target]
        cascaded = tuple(j.data.get("cascaded", ()))
        if not cascaded:  # else the slots and the quorum are in place since the check
            pg_target.ensure_slots(others)
            if cluster.synchronous:
                pg_target.set_synchronous(cluster.synchronous, others)
        point_replicas(cluster, target, skip=(old, *cascaded))
        active = Epoch(number, target, "active", time.time())
        token = sign_epoch(cluster.keyring, active)
        told = cluster.publish(token)
        if cascaded:  # the old primary's slot, for its rejoin (after the writes resume)
            pg_target.ensure_slots([old])
        cluster.record(active, token)
        j.mark("active", told=told)
        steps.say(f"publish epoch {number} active: {target} is primary ({_told(j)})", t0)

        t0 = time.monotonic()
        notes = []
        for r in cluster.regions:
            if r not in (target, old):
                notes.append(f"{r} {cluster.repoint(r, target)}")
        j.mark("repointed")
        steps.say(f"re-point replicas: {', '.join(notes) or 'none'}", t0)

        t0 = time.monotonic()
        rejoined = cluster.rejoin(old, target)
        j.mark("rejoined")
        steps.say(f"{old}: {rejoined}", t0)

        t0 = time.monotonic()
        steps.say(f"done: {target} is primary in epoch {number}, no acknowledged write lost", t0)
    return {
        "from": old,
        "to": target,
        "epoch": number,
        "final_lsn": format_lsn(j.data["final_lsn"]),
        "seconds": round(time.monotonic() - steps.started, 2),
    }


CASCADE_TIMEOUT_S = 5.0


def cascade(cluster: Cluster, target: str, old: str, pg_target: PgServer) -> list[str]:
    """Point the other standbys at the target while it is still a standby (cascading
    replication): when it is promoted they follow its new timeline on the connection they
    already have. Writes still flow meanwhile (through the target). Returns the regions that
    stream from the target; the others are re-pointed after the promotion, as before."""
    others = [r for r in cluster.regions if r not in (target, old)]
    if not others:
        return []
    try:
        pg_target.ensure_slots(others)  # physical slots can be made on a standby
        if cluster.synchronous:
            # Read at promotion: the first commits wait for the quorum at once.
            pg_target.set_synchronous(
                cluster.synchronous, [r for r in cluster.regions if r != target]
            )
    except PgUnavailable:
        return []
    pointed = []
    for r in others:
        try:
            pg = cluster.pg(r)
            if pg.in_recovery():
                pg.set_upstream(cluster.conninfo(r, target), slot_name(r))
                pointed.append(r)
        except PgUnavailable:
            pass
    return [r for r in pointed if cluster.wait_streaming(r, target, CASCADE_TIMEOUT_S)]


def _cascaded(j: Journal, target: str) -> str:
    regions = j.data.get("cascaded") or []
    return f"{', '.join(regions)} stream through {target}" if regions else "no replica cascades"


def point_replicas(cluster: Cluster, primary: str, skip: tuple[str, ...] = ()) -> None:
    """Point the other standbys at the new primary at once (no waiting): with quorum commit the
    new primary's first commits wait for one of them, so they must not wait for the epoch."""
    for r in cluster.regions:
        if r == primary or r in skip:
            continue
        try:
            pg = cluster.pg(r)
            if pg.in_recovery():
                pg.set_upstream(cluster.conninfo(r, primary), slot_name(r))
        except PgUnavailable:
            pass  # reported by the re-point step


def _told(j: Journal) -> str:
    told = j.data.get("told") or {}
    return ", ".join(f"{k} {v}" for k, v in told.items()) or "no gateway"


def _roll_back(cluster: Cluster, j: Journal, old: str, number: int) -> None:
    cluster.unfence(old)
    point_replicas(cluster, old, skip=(j.data["target"],))  # no longer through the target
    back = Epoch(number + 1, old, "active", time.time())
    token = sign_epoch(cluster.keyring, back)
    cluster.publish(token)
    cluster.record(back, token)
    j.path.unlink(missing_ok=True)
