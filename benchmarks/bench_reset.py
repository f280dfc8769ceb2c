"""The first writes after every connection across the link was reset (the primary's restart
or deploy, a middlebox, a quiet spell past a keep-alive timeout): Latitude's pool, which
refills itself in the background, against nginx's keep-alive pool, in the same run.

    python benchmarks/bench_reset.py [--json FILE] [--rounds N] [--quiet-s S] [--install-nginx]

A two-region lab world (100 ms link) with the calendar; nginx as the seed's local proxy in
eu-west (one worker, `keepalive 8`, a relay of its own so that its new link connections are
counted). Each round resets every connection of the link, waits `--quiet-s` (no traffic: a
quiet region), then makes two writes through each, each on a new client connection, timed;
ideal = the link's RTT plus the primary's own p50 for a direct write, measured in the same
run. A write that answers other than 201 is counted, not timed (nginx does not retry a POST
on a pooled connection that turns out dead: its client gets the error).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
import uuid
from pathlib import Path

import aiohttp
from _lab import HOST, pct, say, summary, throwaway_world
from _nginx import nginx_or_exit, nginx_version, running_nginx
from bench_gateway import (
    PRIMARY,
    REPLICA,
    RTT_MS,
    TOPOLOGY,
    fresh_client,
    gateway_status,
    login,
    port_of,
    relay_connections,
    start_calendar,
    timed_write,
)

from latitude import atomic


def connections_by_purpose(world) -> dict[str, float]:
    """What the replica's gateway has opened across the link so far, by its own counters: the
    forwarding pool, its liveness probes, the dashboard's sampler, the epoch follower."""
    status = gateway_status(port_of(world, REPLICA))
    return {
        "pool_at_requests": status["forwarding"]["opened"],
        "pool_refills": status["forwarding"]["refilled"],
        "liveness_probes": status["forwarding"]["probes"],
        "dashboard_sampler": status["decisions"].get("sampler_connections", 0),
        "epoch_peers": status["epoch"].get("peer_connections", 0),
    }


async def attempt(c: aiohttp.ClientSession) -> tuple[int, float]:
    """One write: its status and, for a 201, its time in ms."""
    t0 = time.perf_counter()
    async with c.post("/events", json={"title": f"after reset {uuid.uuid4().hex[:8]}"}) as r:
        await r.read()
    return r.status, (time.perf_counter() - t0) * 1000


async def rounds(world, targets: dict[str, tuple[int, int]], n: int, quiet_s: float) -> dict:
    clients = {name: fresh_client(port) for name, (port, _) in targets.items()}
    near = fresh_client(port_of(world, PRIMARY))
    out = {name: {"first": [], "second": [], "failed": 0, "opened": 0} for name in targets}
    # The replica gateway's own counts of what it opened across the link, by purpose: its
    # relay also carries the dashboard's samples and the epoch follower's peer questions.
    opened_by: dict[str, float] = {}
    direct: list[float] = []
    try:
        for c in [*clients.values(), near]:
            await login(c, f"reset-{uuid.uuid4().hex[:8]}")
        for _ in range(3):
            for c in clients.values():
                await attempt(c)
        for i in range(n):
            await asyncio.to_thread(world.link, "reset", PRIMARY, REPLICA)
            await asyncio.sleep(quiet_s)
            before = {name: relay_connections(world, relay) for name, (_, relay) in targets.items()}
            by_before = connections_by_purpose(world)
            for name, c in clients.items():
                for which in ("first", "second"):
                    status, ms = await attempt(c)
                    if status == 201:
                        out[name][which].append(ms)
                    else:
                        out[name]["failed"] += 1
            for name, (_, relay) in targets.items():
                out[name]["opened"] += relay_connections(world, relay) - before[name]
            for purpose, count in connections_by_purpose(world).items():
                opened_by[purpose] = opened_by.get(purpose, 0) + count - by_before.get(purpose, 0)
            for _ in range(3):
                direct.append(await timed_write(near, PRIMARY))
            say(f"  round {i + 1}/{n}")
    finally:
        for c in [*clients.values(), near]:
            await c.close()
    ideal = RTT_MS + pct(direct, 50)
    result: dict = {"rounds": n, "quiet_s": quiet_s, "ideal_ms": round(ideal, 2)}
    result["latitude_connections_per_round_by_purpose"] = {
        purpose: round(count / n, 2) for purpose, count in opened_by.items()
    }
    for name, x in out.items():
        result[name] = {
            "first_write": summary(x["first"]) if x["first"] else None,
            "first_p50_ratio_to_ideal": round(pct(x["first"], 50) / ideal, 3)
            if x["first"]
            else None,
            "second_write": summary(x["second"]) if x["second"] else None,
            "failed_writes": x["failed"],
            "new_link_connections_per_round": round(x["opened"] / n, 2),
        }
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path, help="Also write the figures as JSON.")
    ap.add_argument("--rounds", type=int, default=8, help="Resets, each followed by writes.")
    ap.add_argument("--quiet-s", type=float, default=2.0, help="No traffic after each reset.")
    ap.add_argument("--install-nginx", action="store_true", help="apt-get nginx if missing.")
    args = ap.parse_args()
    if args.rounds < 1 or args.quiet_s < 0:
        ap.error("--rounds >= 1 and --quiet-s >= 0, please")
    nginx = nginx_or_exit(args.install_nginx)
    load0 = os.getloadavg()[0]
    with throwaway_world("bench-reset-", TOPOLOGY) as world:
        start_calendar(world, PRIMARY)
        start_calendar(world, REPLICA)
        relay = world.add_relay(REPLICA, PRIMARY, port_of(world, PRIMARY))
        with running_nginx(
            nginx, f"{HOST}:{relay}", workers=1, keepalive=8, health="/_latitude/health"
        ) as ngx:
            targets = {
                "latitude": (port_of(world, REPLICA), world.relay_port(REPLICA, PRIMARY, "app")),
                "nginx_1_worker": (ngx.port, relay),
            }
            say(f"{args.rounds} rounds: reset the link, {args.quiet_s:g} s quiet, two writes each")
            figures = asyncio.run(rounds(world, targets, args.rounds, args.quiet_s))
    figures.update(
        nginx=nginx_version(nginx), load_average=[round(load0, 2), round(os.getloadavg()[0], 2)]
    )
    report(figures)
    if args.json:
        atomic.write_json(args.json, figures)
    return 0


def report(f: dict) -> None:
    print(f"load average {f['load_average'][0]:.2f} -> {f['load_average'][1]:.2f}")
    print(f"ideal {f['ideal_ms']:.1f} ms (link + the primary's own p50); {f['rounds']} resets")
    for name in ("latitude", "nginx_1_worker"):
        x = f[name]
        first = x["first_write"]
        second = x["second_write"]
        print(
            f"{name}: first write after a reset p50 "
            + (
                f"{first['p50_ms']:.1f} ms = {x['first_p50_ratio_to_ideal']:.3f} x ideal"
                if first
                else "-"
            )
            + (f", second {second['p50_ms']:.1f} ms" if second else "")
            + f"; {x['failed_writes']} failed; {x['new_link_connections_per_round']:g} new link "
            "connections per round at write time"
        )
    by = ", ".join(
        f"{purpose} {count:g}"
        for purpose, count in f["latitude_connections_per_round_by_purpose"].items()
    )
    print(f"  the replica gateway's own count of those, per round: {by}")


if __name__ == "__main__":
    sys.exit(main())
