"""Promotion: how long writes stop, and what quorum commit costs.

One three-region lab world (us-west primary, 125 ms to eu-west, 165 ms to ap-southeast), the
calendar behind the gateway everywhere, a user writing events next to each region:

The topology asks for `[replication] synchronous = 1`, so every figure but the async commit
latency is taken with quorum commit on.

* planned switchover us-west -> eu-west, and back: the longest gap between two acknowledged
  writes of one user (goal <= 2 s), the command's own time, acknowledged writes lost (must be 0);
* forced failover with us-west killed (db, app, sessions): command start to
  the first acknowledged write (goal <= 5 s), and the acknowledged commits lost (must be 0);
* automatic failover (`[failover] automatic = true`, `after_s = 10`): the primary killed, a
  `latitude failover watch` in every region: death to the first acknowledged write (goal <= 15 s);
* commit latency at the primary, async against `synchronous_standby_names = 'ANY 1 (...)'`,
  measured in the same run on the same world (the baseline is async).

    python benchmarks/bench_promotion.py [--commits N] [--only switchover|automatic] [--json FILE]
"""

from __future__ import annotations

import argparse
import calendar
import functools
import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import psycopg
from _lab import REPO, say, summary, throwaway_world

from latitude.lab import LabWorld, harness
from latitude.lab.demo import start_calendar, wait_healthy
from latitude.lab.postgres import database_url
from latitude.promotion.postgres import PgServer

REGIONS = ("us-west", "eu-west", "ap-southeast")


# A user next to one region, writing events as fast as answers come back (see the harness).
Writer = functools.partial(harness.Writer, name="bench")


def latitude(world: LabWorld, *args: str) -> tuple[float, dict]:
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "latitude.cli", *args, "--state-dir", str(world.state_dir)],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=REPO,
    )
    if result.returncode != 0:
        raise RuntimeError(f"latitude {' '.join(args)} failed:\n{result.stderr}")
    for line in result.stderr.splitlines():
        if line.lstrip("… ").startswith("["):  # the steps, each with its own time
            say(line.lstrip("… "))
    last = (result.stdout.strip().splitlines() or ["{}"])[-1]
    return time.monotonic() - started, json.loads(last) if last.startswith("{") else {}


def titles(world: LabWorld, region: str) -> set[str]:
    port = world.state().regions[region].pg_port
    with psycopg.connect(database_url(port), autocommit=True) as c:
        return {r[0] for r in c.execute("select title from events").fetchall()}


def commit_latency(world: LabWorld, region: str, n: int) -> dict:
    port = world.state().regions[region].pg_port
    ms = []
    with psycopg.connect(database_url(port), autocommit=True) as c:
        c.execute("create table if not exists bench_commits (id serial primary key, at float8)")
        for _ in range(n):
            started = time.perf_counter()
            c.execute("insert into bench_commits (at) values (%s)", (time.time(),))
            ms.append((time.perf_counter() - started) * 1000)
    return summary(ms)


def switchover(world: LabWorld, target: str) -> dict:
    ws = [Writer(world, r) for r in REGIONS]
    for w in ws:
        w.login()
        w.start()
    time.sleep(2)
    t0 = time.monotonic()
    seconds, report = latitude(world, "lab", "promote", target)
    t1 = time.monotonic()
    time.sleep(4)
    for w in ws:
        w.stop.set()
    for w in ws:
        w.join(30)
    acked = {title for w in ws for _, title, _ in w.acked}
    gaps = {w.region: round(w.gap_around(t0, t1), 2) for w in ws}
    lost = len(acked - titles(world, target))
    say(f"switchover to {target}: {seconds:.2f} s, longest write gap {gaps}, lost {lost}")
    return {
        "command_s": round(seconds, 2),
        "steps_s": report["seconds"],
        "longest_write_gap_s": max(gaps.values()),
        "write_gap_by_region_s": gaps,
        "acknowledged_writes": len(acked),
        "acknowledged_writes_lost": lost,
    }


def forced_failover(world: LabWorld) -> dict:
    primary = "us-west"
    standbys = [r for r in REGIONS if r != primary]
    ws = [Writer(world, r) for r in standbys]
    for w in ws:
        w.login()
    commits: list[int] = []
    done = threading.Event()

    def direct() -> None:
        port = world.state().regions[primary].pg_port
        with psycopg.connect(database_url(port), autocommit=True) as c:
            c.execute("create table if not exists bench_acked (id int primary key)")
            i = 0
            while not done.is_set():
                i += 1
                try:
                    c.execute("insert into bench_acked values (%s)", (i,))
                except psycopg.Error:
                    return
                commits.append(i)

    t = threading.Thread(target=direct, daemon=True)
    t.start()
    time.sleep(2)
    for part in ("db", "app", "sessions"):
        world.kill(primary, part)
    done.set()
    t.join(10)
    for w in ws:
        w.start()
    time.sleep(1)
    started = time.monotonic()
    seconds, report = latitude(world, "lab", "promote", "--force", "--auto-choose")
    deadline = time.monotonic() + 30
    first = None
    while first is None and time.monotonic() < deadline:
        first = min((t for w in ws for t, _, _ in w.acked if t > started), default=None)
        time.sleep(0.05)
    for w in ws:
        w.stop.set()
    for w in ws:
        w.join(30)
    port = world.state().regions[report["to"]].pg_port
    with psycopg.connect(database_url(port), autocommit=True) as c:
        have = {r[0] for r in c.execute("select id from bench_acked").fetchall()}
    lost = len(set(commits) - have)
    to_first = round(first - started, 2) if first else None
    say(f"forced failover to {report['to']}: first write after {to_first} s, lost {lost}")
    return {
        "to": report["to"],
        "command_s": round(seconds, 2),
        "command_to_first_write_s": to_first,
        "acknowledged_commits_before_crash": len(commits),
        "acknowledged_commits_lost_sync1": lost,
        "reported_rpo0": report["rpo0"],
    }


def automatic_failover(world: LabWorld, revive: bool = True) -> dict:
    """Revive the old primary (after the forced failover), watch from every region, kill the
    primary: death to first write."""
    if revive:
        latitude(world, "lab", "revive", "us-west")  # rejoins as a replica of the new timeline
        wait_healthy(world, "us-west", 60)
    state = world.state()
    primary = state.primary
    harness.start_failover_watchers(world, REGIONS)
    others = [r for r in REGIONS if r != primary]
    ws = [Writer(world, r) for r in others]
    for w in ws:
        w.login()
    time.sleep(3)  # the watchers' first rounds
    for w in ws:
        w.start()
    time.sleep(1)
    died, died_at = time.monotonic(), time.time()
    for part in ("db", "app", "sessions"):
        world.kill(primary, part)
    first = None
    deadline = time.monotonic() + 60
    while first is None and time.monotonic() < deadline:
        first = min((t for w in ws for t, _, _ in w.acked if t > died + 0.5), default=None)
        time.sleep(0.05)
    for w in ws:
        w.stop.set()
    for w in ws:
        w.join(30)
    to_first = round(first - died, 2) if first else None
    timeline = watcher_timeline(world, others, died_at)
    say(
        f"automatic failover from {primary}: first write {to_first} s after its death "
        f"(watchers: {timeline})"
    )
    return {
        "from": primary,
        "after_s": 10,
        "death_to_first_write_s": to_first,
        "watcher_timeline_s": timeline,
    }


_LOGGED_AT = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3})Z \w+ (.*)$")


def watcher_timeline(world: LabWorld, regions, died_at: float) -> dict[str, float]:
    """When, after the death, each watcher first said the primary was down, that a majority
    agreed, that it promoted, or that its standby streams from the new primary (from its log's
    UTC times): where the seconds went."""
    marks = {
        "saw it down": " down; ",
        "majority agreed": "majority agrees",
        "proposed": "proposed ",
        "promoted": "by majority (epoch",
        "followed the new primary": "streaming from ",
    }
    found: dict[str, float] = {}
    for region in regions:
        try:
            lines = world.service_log(region, "watcher").read_text(errors="replace").splitlines()
        except OSError:
            continue
        for line in lines:
            m = _LOGGED_AT.match(line)
            if not m:
                continue
            at = calendar.timegm(time.strptime(m[1][:19], "%Y-%m-%dT%H:%M:%S"))
            at += int(m[1][20:]) / 1000
            for label, text in marks.items():
                key = f"{region} {label}"
                if at >= died_at and text in m[2] and key not in found:
                    found[key] = round(at - died_at, 2)
    return dict(sorted(found.items(), key=lambda kv: kv[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commits", type=int, default=40, help="commits per latency sample")
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--only",
        choices=("switchover", "automatic"),
        help="only the two switchovers, or only the automatic failover (quicker)",
    )
    parser.add_argument(
        "--idempotency-claim",
        choices=("eager", "in_transaction"),
        default="eager",
        help="[gateway] idempotency_claim (in_transaction: one quorum commit fewer per write)",
    )
    args = parser.parse_args()
    topology = (REPO / "src/latitude/data/lab.toml").read_text()
    topology += "\n[replication]\nsynchronous = 1\n\n[failover]\nautomatic = true\n"
    topology += f'\n[gateway]\nidempotency_claim = "{args.idempotency_claim}"\n'
    say(f"idempotency claim: {args.idempotency_claim}")
    with throwaway_world("latitude-bench-promotion-", topology) as world:
        start_calendar(world, timeout=60)
        pg = PgServer("us-west", database_url(world.state().regions["us-west"].pg_port))
        sync_commit = commit_latency(world, "us-west", args.commits)
        pg.set_synchronous(0, [])
        async_commit = commit_latency(world, "us-west", args.commits)
        pg.set_synchronous(1, ["eu-west", "ap-southeast"])
        say(f"commit p50: async {async_commit['p50_ms']} ms, sync=1 {sync_commit['p50_ms']} ms")
        if args.only:
            figures = (
                {
                    "switchover": switchover(world, "eu-west"),
                    "switchover_back": switchover(world, "us-west"),
                }
                if args.only == "switchover"
                else {"automatic_failover_sync1": automatic_failover(world, revive=False)}
            )
            print(json.dumps(figures, indent=2))
            if args.json:
                args.json.write_text(json.dumps(figures, indent=2))
            return
        figures = {
            "commit_async": async_commit,
            "commit_sync1": sync_commit,
            "sync1_vs_async_p50": round(sync_commit["p50_ms"] / async_commit["p50_ms"], 1),
            "switchover": switchover(world, "eu-west"),
            "switchover_back": switchover(world, "us-west"),
            "forced_failover_sync1": forced_failover(world),
            "automatic_failover_sync1": automatic_failover(world),
        }
    print(json.dumps(figures, indent=2))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
