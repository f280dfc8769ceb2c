"""Forced failover: the primary is unreachable; promote a reachable replica and publish the next
epoch. The old primary is fenced by that epoch when it hears of it (and by its lease), and
rejoins with `pg_rewind` (`latitude rejoin`)."""

from __future__ import annotations

import time

from latitude.promotion.epoch import Epoch, sign_epoch
from latitude.promotion.journal import BadPromotion
from latitude.promotion.postgres import PgUnavailable, format_lsn
from latitude.promotion.switchover import (
    Cluster,
    Progress,
    Steps,
    _resuming,
    check_target,
    point_replicas,
)


def standby_positions(cluster: Cluster, exclude: str) -> dict[str, dict]:
    """Every reachable standby's position (received and replayed WAL, timeline)."""
    found = {}
    for r in cluster.regions:
        if r == exclude:
            continue
        try:
            pos = cluster.pg(r).position()
        except PgUnavailable:
            continue
        if pos["standby"]:
            found[r] = pos
    return found


def choose(positions: dict[str, dict]) -> str | None:
    """The most caught-up standby: highest received, then replayed position."""
    if not positions:
        return None
    return max(
        positions, key=lambda r: (positions[r]["received"] or 0, positions[r]["replayed"] or 0)
    )


def failover(
    cluster: Cluster,
    target: str | None,
    *,
    auto_choose: bool = False,
    progress: Progress = print,
) -> dict:
    epoch = cluster.epoch()
    old = epoch.primary
    steps = Steps(5, progress)
    t0 = time.monotonic()
    positions = standby_positions(cluster, old)
    if target is None:
        if not auto_choose:
            raise BadPromotion("name the region to promote, or pass --auto-choose")
        target = choose(positions)
        if target is None:
            raise BadPromotion(f"no reachable replica to promote (the primary is {old})")
    elif not _resuming(cluster, target):
        check_target(cluster, target, epoch)
    with cluster.journal().running(target, "failover") as j:
        number = j.data.setdefault("epoch", epoch.number + 1)
        j.data.setdefault("from", old)
        if not j.done("promoted") and target not in positions:
            raise BadPromotion(
                f"{target}'s database is not a reachable standby; choose another region "
                f"({', '.join(positions) or 'none reachable'})"
            )
        best = choose(positions)
        behind = 0
        if best and target in positions:
            behind = (positions[best]["received"] or 0) - (positions[target]["received"] or 0)
        quorum = cluster.synchronous
        all_quorum_seen = len(positions) >= len(cluster.regions) - 1
        if quorum and all_quorum_seen and behind <= 0:
            loss = (
                "none: every synchronous standby was reachable and this one is the most caught up"
            )
            j.data["rpo0"] = True
        elif quorum and behind <= 0:
            loss = (
                f"none if one of the {quorum} synchronous standbys that acknowledged each commit "
                "is among those reachable; unreachable standbys may hold later writes"
            )
            j.data["rpo0"] = False
        else:
            lag = positions.get(target, {})
            loss = (
                "writes the old primary acknowledged after "
                f"{format_lsn(lag.get('received') or 0)} (asynchronous replication)"
            )
            j.data["rpo0"] = False
        if behind > 0:
            loss += f"; {best} had {behind} bytes more, and must rejoin"
        j.data["may_have_lost"] = loss
        steps.say(
            f"check: {old} is unreachable or fenced; {target} at "
            f"{format_lsn(positions.get(target, {}).get('replayed') or 0)}",
            t0,
        )

        t0 = time.monotonic()
        if cluster.pg(old).reachable():
            # Not dead after all: fence it before there can be a second primary.
            cluster.fence(old)
            steps.say(f"{old} answered: fenced it first", t0)
        else:
            steps.say(
                f"{old} does not answer: it will be fenced by epoch {number} and its lease", t0
            )

        t0 = time.monotonic()
        pg_target = cluster.pg(target)
        if not j.done("promoted"):
            if pg_target.in_recovery():
                pg_target.promote()
            j.mark("promoted")
        others = [r for r in cluster.regions if r != target]
        pg_target.ensure_slots(others)
        if quorum:
            pg_target.set_synchronous(quorum, others)
        point_replicas(cluster, target, skip=(old,))
        steps.say(f"pg_promote {target}: new timeline {pg_target.position()['timeline']}", t0)

        t0 = time.monotonic()
        active = Epoch(number, target, "active", time.time())
        token = sign_epoch(cluster.keyring, active)
        # The old primary's region is not told: it is unreachable; it learns from its peers.
        told = cluster.publish(token, skip=(old,))
        cluster.record(active, token, skip=(old,))
        j.mark("active", told=told)
        steps.say(f"publish epoch {number}: {target} is primary", t0)

        t0 = time.monotonic()
        notes = [
            f"{r} {cluster.repoint(r, target)}" for r in cluster.regions if r not in (target, old)
        ]
        j.mark("repointed")
        steps.say(f"re-point replicas: {', '.join(notes) or 'none'}; may have lost: {loss}", t0)
    return {
        "from": old,
        "to": target,
        "epoch": number,
        "may_have_lost": loss,
        "rpo0": j.data["rpo0"],
        "seconds": round(time.monotonic() - steps.started, 2),
    }
