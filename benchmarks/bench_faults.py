"""The link-fault writer, at length: careful clients writing through eu-west while its link to
the primary (us-west) is reset, cut for 0.5-4 s and healed at random, and the primary's app is
killed twice.

    python benchmarks/bench_faults.py [--writes N] [--users N] [--seed N] [--json FILE]

A throwaway lab world of two regions joined by a 125 ms link, the calendar behind the gateway in
both (two workers each, as the tests run it). Each client signs in, creates events one after
another, and reads each acknowledged one back through eu-west with its cookies; a 503 / 504 is
retried with the Idempotency-Key it carried (`latitude.lab.faults`). Printed, over >= 1,000
writes: lost (acknowledged, not in the primary database), doubled (in it twice), stale (a
read-back of your own acknowledged write that said 404 without `Latitude-Stale`), 503 / 504
without a key, unfinished, and every 5xx by status (only 503 and 504 are allowed). Target:
0 / 0 / 0 / 0.

Baseline, in the same run and world: the same writer with no faults (a fifth of the writes),
so the faulted run's throughput is given as a ratio of the calm one. Takes about five to ten
minutes; the world is torn down at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import time
from pathlib import Path

from _lab import say, throwaway_world, two_region_topology

from latitude.lab.demo import start_calendar
from latitude.lab.faults import run_fault_writer

PRIMARY, REPLICA = "us-west", "eu-west"
RTT_MS = 125.0
WORKERS = {PRIMARY: 2, REPLICA: 2}


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--writes", type=int, default=1000, help="Faulted writes (default 1000).")
    ap.add_argument("--users", type=int, default=8, help="Concurrent clients (default 8).")
    ap.add_argument("--kills", type=int, default=2, help="Primary app kills (default 2).")
    ap.add_argument("--seed", type=int, default=None, help="Fault schedule seed (random).")
    ap.add_argument("--json", type=Path, help="Also write the figures as JSON.")
    args = ap.parse_args()
    if args.writes < 1 or args.users < 1:
        ap.error("--writes and --users must be at least 1")
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    started = time.monotonic()
    results: dict = {
        "writes": args.writes,
        "users": args.users,
        "rtt_ms": RTT_MS,
        "seed": seed,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_before": load(),
        },
    }
    with throwaway_world("bench-faults-", two_region_topology("calendar", RTT_MS)) as world:
        start_calendar(world, workers=WORKERS, progress=say)
        say(f"baseline: {max(1, args.writes // 5)} writes, no faults")
        calm = asyncio.run(
            run_fault_writer(
                world,
                writes=max(1, args.writes // 5),
                users=args.users,
                kills=0,
                faults=False,
                seed=seed,
            )
        )
        say(f"faulted: {args.writes} writes, {args.kills} app kills, seed {seed}")
        faulted = asyncio.run(
            run_fault_writer(
                world,
                writes=args.writes,
                users=args.users,
                kills=args.kills,
                seed=seed,
                progress=say,
            )
        )
    results["machine"]["load_after"] = load()
    results["calm"] = calm.as_dict()
    results["faulted"] = faulted.as_dict()
    rate = {
        name: t.acked / t.seconds if t.seconds else 0.0
        for name, t in (("calm", calm), ("faulted", faulted))
    }
    results["acked_per_s"] = {k: round(v, 2) for k, v in rate.items()}
    results["faulted_vs_calm_throughput"] = round(rate["faulted"] / rate["calm"], 3)
    results["ok"] = faulted.ok() and calm.ok()
    results["seconds"] = round(time.monotonic() - started, 1)
    report(results)
    if args.json:
        tmp = args.json.with_suffix(args.json.suffix + ".tmp")
        tmp.write_text(json.dumps(results, indent=2) + "\n")
        tmp.replace(args.json)
    if not results["ok"]:
        raise SystemExit(1)


def report(r: dict) -> None:
    f = r["faulted"]
    print(f"bench_faults: {r['writes']} writes by {r['users']} clients through {REPLICA}")
    print(f"  faults: {f['faults']}  (seed {r['seed']})")
    print(
        f"  lost {f['lost']} / doubled {f['doubled']} / stale {f['stale']} / "
        f"other 5xx {f['bad_5xx']}   (keyless 503/504 {f['keyless_503_504']}, "
        f"unfinished {f['unfinished']}, no answer {f['no_answer']})"
    )
    print(f"  5xx by kind: {f['5xx_by_kind']}; reads marked stale {f['stale_marked']}")
    print(
        f"  acked {f['acked']} in {f['seconds']} s = {r['acked_per_s']['faulted']}/s; calm "
        f"baseline {r['acked_per_s']['calm']}/s; ratio {r['faulted_vs_calm_throughput']}"
    )
    print(f"  signed out under the client (item 7): {f['signed_out']}")
    print(f"  load {r['machine']['load_before']} -> {r['machine']['load_after']}, {r['seconds']} s")
    print("  OK" if r["ok"] else f"  FAILED: {f['examples'] + f['doubled_titles']}")


if __name__ == "__main__":
    main()
