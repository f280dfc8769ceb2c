"""The mirror network, measured in a throwaway lab world whose links all have a 150 ms RTT.

    python benchmarks/bench_mirror.py [--json FILE] [--samples N] [--files N] [--seconds S]

(a) Propagation: publish -> visible on every mirror. `latitude mirror serve` in every region,
    `latitude mirror sync` (the streaming feed) in eu-west and ap-southeast. Each sample
    publishes one file at the primary and watches the mirrors' roots until the file is there
    (an atomic rename, so "there" means servable). Half the single samples are 1 KiB metadata
    (carried inline by the feed), half 200 KiB (downloaded over the warm pool after the feed
    names them); single publishes are isolated (each after every long-polling mirror has
    parked its next poll: the long poll's best case). Then a burst: 100 publishes of 1 KiB,
    10 ms apart, once for the streaming mirrors and once for the long-polling ones (the other
    kind stopped meanwhile, so that they do not measure each other's CPU). Goal: p99 <= 0.6 x RTT + 10 ms. Beside it, in the same run, regions and
    links: the long poll it replaced (`--no-stream`) and a 5 s polling loop (composer/mirror's
    default): `latitude mirror sync --poll-interval 5 --inline 0`.
(b) Sync throughput: 1 KiB files per second into one mirror (eu-west) over the 150 ms link,
    from the commit of a 5,000-file publish to the mirror's cursor reaching it (every file
    sha256-checked, fsynced, renamed). Target >= 2,000/s. Beside it, the same daemon made to
    fetch one GET per file (no bundles, nothing inline) over the same 32-connection pool.
(c) Serving: requests per second for a 1 KiB file from `latitude mirror serve` (one process)
    and from nginx (the config `latitude mirror nginx-config` writes; `worker_processes auto`)
    serving the same root, on loopback. Load: wrk if it is on PATH (64 connections, 2
    threads), otherwise a Python aiohttp load generator (then the client, not nginx, is the
    ceiling, and the figure says so). nginx missing: (c) reports mirror serve alone.

Everything runs on 127.0.0.1; about two minutes on a quiet machine (four at most).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from _lab import pct, say

from latitude.lab import LabWorld, harness
from latitude.lab.harness import free_port
from latitude.lab.mirrors import lab_mirror_root, start_lab_mirrors, wait_lab_mirrors_ready
from latitude.mirror import ContentRoot, Item, Publisher
from latitude.mirror.nginx import nginx_config

RTT_MS = 150.0
PRIMARY, REPLICAS = "us-west", ("eu-west", "ap-southeast")
TOPOLOGY = f"""
[app]
name = "bench"

[lab]

[[regions]]
name = "us-west"
primary = true
location = [45.60, -121.18]

[[regions]]
name = "eu-west"
location = [53.35, -6.26]

[[regions]]
name = "ap-southeast"
location = [1.35, 103.82]

[signing]
keys = [{{ id = "lab-1", env = "LATITUDE_LAB_KEY" }}]

[links]
default_rtt_ms = {RTT_MS}
"""
SYNC = [sys.executable, "-m", "latitude.cli", "mirror", "sync"]


def summary(ms: list[float]) -> dict:
    return {
        "n": len(ms),
        "p50_ms": round(pct(ms, 50), 1),
        "p99_ms": round(pct(ms, 99), 1),
        "max_ms": round(max(ms), 1),
        "mean_ms": round(statistics.fmean(ms), 1),
    }


class Watcher(threading.Thread):
    """Notes when each awaited file appears. A mirror that applies changes in serial order has
    an ordered queue: only its oldest pending file is looked at (stat every 0.5 ms), so the
    watching costs the same for a burst as for one publish. Others are looked at every 20 ms
    (the 5 s pollers, whose figures are seconds)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.queues: dict[object, list[tuple[tuple, Path, float]]] = {}
        self.loose: dict[tuple, tuple[Path, float]] = {}
        self.seen: dict[tuple, float] = {}
        self.lock = threading.Lock()
        self.stop = False

    def expect(self, key: tuple, path: Path, t0: float, queue: object = None) -> None:
        with self.lock:
            if queue is None:
                self.loose[key] = (path, t0)
            else:
                self.queues.setdefault(queue, []).append((key, path, t0))

    def run(self) -> None:
        last_loose = 0.0
        while not self.stop:
            with self.lock:
                for q in self.queues.values():
                    while q and os.path.exists(q[0][1]):
                        key, _, t0 = q.pop(0)
                        self.seen[key] = (time.perf_counter() - t0) * 1000
                if time.perf_counter() - last_loose > 0.02:
                    last_loose = time.perf_counter()
                    for key, (path, t0) in list(self.loose.items()):
                        if os.path.exists(path):
                            del self.loose[key]
                            self.seen[key] = (time.perf_counter() - t0) * 1000
            time.sleep(0.0005)

    def wait(self, keys: list[tuple], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if all(k in self.seen for k in keys):
                    return True
            time.sleep(0.001)
        return False


def status(root: Path) -> dict:
    return ContentRoot(root).status()


wait_until = functools.partial(harness.wait_until, step=0.01)  # timings are read off it


# ------------------------------------------------------------------------------- (a) propagation


def propagation(world: LabWorld, pub: Publisher, samples: int, burst: int) -> dict:
    roots = {r: lab_mirror_root(world, r) for r in (PRIMARY, *REPLICAS)}
    # Beside the streaming mirrors (`mirror-sync`, the default), in the same regions and on the
    # same links: the long poll the stream replaced, and a 5 s polling loop.
    others = {
        "longpoll": ["--no-stream"],
        "poll5": ["--poll-interval", "5", "--inline", "0"],
    }
    mode_roots = {"stream": {r: roots[r] for r in REPLICAS}}
    for mode, flags in others.items():
        mode_roots[mode] = {r: roots[r].parent / f"mirror-{mode}" for r in REPLICAS}
        for r in REPLICAS:
            world.set_service(
                r, f"mirror-{mode}", [*SYNC, "--root", str(mode_roots[mode][r]), *flags]
            )
    wait_until(
        lambda: all(
            status(p).get("last_contact") or status(p).get("waiting_since")  # a poll parked
            for m in others
            for p in mode_roots[m].values()
        ),
        60,
        "the long-polling and 5 s polling mirrors",
    )
    watcher = Watcher()
    watcher.start()
    small = json.dumps({"x": "y" * 1000}).encode()
    medium = os.urandom(200 * 1024)
    keys: dict[tuple[str, str], list[tuple]] = {}

    def expect(mode: str, kind: str, i: int, path: str, t0: float) -> list[tuple]:
        fast = []
        for r in REPLICAS:
            key = (mode, kind, r, i)
            watcher.expect(key, mode_roots[mode][r] / path, t0, (mode, r))
            keys.setdefault((mode, kind), []).append(key)
            fast.append(key)
            if mode == "longpoll":  # the 5 s pollers run through both loops; count one
                pkey = ("poll5", kind, r, i)
                watcher.expect(pkey, mode_roots["poll5"][r] / path, t0)
                keys.setdefault(("poll5", kind), []).append(pkey)
        return fast

    def resume(other: str) -> None:
        """Start the other mode's daemons again, and let them catch up and park."""
        for r in REPLICAS:
            world.revive(r, slots[other])
        head = pub.serial
        wait_until(
            lambda: all(ContentRoot(mode_roots[other][r]).cursor() >= head for r in REPLICAS),
            30,
            f"the {other} mirrors to catch up",
        )
        time.sleep(RTT_MS / 1000 + 0.2)  # and park their next poll or stream

    # Each fast mode alone, the other's daemons stopped meanwhile (as for the burst): on 2
    # cores four mirrors waking at once for every publish measure each other's CPU.
    slots = {"stream": "mirror-sync", "longpoll": "mirror-longpoll"}
    for mode, other in (("stream", "longpoll"), ("longpoll", "stream")):
        for r in REPLICAS:
            world.kill(r, slots[other])
        say(
            f"propagation: {samples} single publishes, each awaited on {len(REPLICAS)} {mode} mirrors"
        )
        for i in range(samples):
            kind = "inline" if i % 2 == 0 else "download"
            path = f"bench/prop-{mode}/{i}.{'json' if kind == 'inline' else 'bin'}"
            pub.publish(path, small if kind == "inline" else medium)
            t0 = time.perf_counter()  # committed: the clock starts
            if not watcher.wait(expect(mode, kind, i, path, t0), 10):
                raise SystemExit(f"sample {i} did not reach every {mode} mirror within 10 s")
            # Let every long-polling mirror park its next poll (one one-way trip after it
            # heard) before the next publish: isolated publishes, the long poll's best case.
            time.sleep(RTT_MS / 2000 + random.uniform(0.02, 0.06))
        resume(other)
    # The burst, once per mode, the other fast mode's daemons stopped meanwhile.
    for mode, other in (("stream", "longpoll"), ("longpoll", "stream")):
        for r in REPLICAS:
            world.kill(r, slots[other])
        say(f"propagation: a burst of {burst} publishes 10 ms apart (1 KiB each), {mode}")
        fast = []
        next_at = time.perf_counter()
        for i in range(burst):
            path = f"bench/burst-{mode}/{i}.json"
            pub.publish(path, small)
            t0 = time.perf_counter()
            fast += expect(mode, "burst", i, path, t0)
            next_at += 0.010
            time.sleep(max(0.0, next_at - time.perf_counter()))
        if not watcher.wait(fast, 20):
            raise SystemExit(f"the burst did not reach every {mode} mirror")
        resume(other)
    say("propagation: waiting for the 5 s pollers to see the last samples")
    watcher.wait([k for ks in keys.values() for k in ks], 12)
    watcher.stop = True
    out: dict = {}
    for (mode, kind), ks in keys.items():
        ms = [watcher.seen[k] for k in ks if k in watcher.seen]
        out.setdefault(mode, {})[kind] = summary(ms)
    target_ms = 0.6 * RTT_MS + 10
    out["goal_p99_ms"] = target_ms
    out["previous_target_p99_ms"] = 1.5 * RTT_MS + 50
    for kind in ("inline", "burst"):
        out[f"{kind}_p99_longpoll_vs_stream"] = round(
            out["longpoll"][kind]["p99_ms"] / out["stream"][kind]["p99_ms"], 2
        )
    out["p50_speedup_vs_poll5"] = round(
        out["poll5"]["inline"]["p50_ms"] / out["stream"]["inline"]["p50_ms"], 1
    )
    for r in REPLICAS:
        for mode in others:
            world.kill(r, f"mirror-{mode}")
    return out


# ------------------------------------------------------------------------------ (b) throughput


def throughput(world: LabWorld, pub: Publisher, files: int) -> dict:
    for r in REPLICAS:
        world.kill(r, "mirror-sync")  # one mirror at a time, nothing else loading the primary
    region = REPLICAS[0]
    out = {}
    runs = [
        ("bundled", files, []),
        ("bundled_longpoll", files, ["--no-stream"]),  # the feed before the stream
        ("one_get_per_file", max(200, files // 5), ["--no-bundles", "--inline", "0"]),
    ]
    for name, n, flags in runs:
        root = lab_mirror_root(world, region).parent / f"mirror-tp-{name}"
        ContentRoot(root).ensure().save_cursor(
            pub.serial
        )  # start from now: only the new files count
        world.set_service(
            region, f"mirror-tp-{name}", [*SYNC, "--root", str(root), "--pool-size", "32", *flags]
        )
        wait_until(
            lambda root=root: status(root).get("waiting_since"), 30, f"{name} sync to park its poll"
        )
        time.sleep(0.5)  # its pool is warm by now
        payload = [
            Item(f"bench/tp/{name}/{i // 100}/{i}.json", os.urandom(512).hex()) for i in range(n)
        ]
        pub.publish_many(payload)
        head = pub.serial
        t0 = time.perf_counter()
        wait_until(
            lambda root=root, head=head: ContentRoot(root).cursor() >= head, 120, f"{name} sync"
        )
        dt = time.perf_counter() - t0
        world.kill(region, f"mirror-tp-{name}")
        out[name] = {"files": n, "seconds": round(dt, 3), "files_per_s": round(n / dt)}
        say(f"throughput {name}: {n} files in {dt:.2f} s")
    out["target_files_per_s"] = 2000
    out["ratio_bundled_vs_get"] = round(
        out["bundled"]["files_per_s"] / out["one_get_per_file"]["files_per_s"], 1
    )
    return out


# ---------------------------------------------------------------------------------- (c) serving


def find(tool: str) -> str | None:
    env = os.environ.get(tool.upper())
    if env and os.access(env, os.X_OK):
        return env
    return shutil.which(tool) or next(
        (p for p in (f"/usr/sbin/{tool}", f"/usr/local/sbin/{tool}") if os.access(p, os.X_OK)), None
    )


LOADGEN = r"""
import asyncio, sys, time, aiohttp
url, conns, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
async def main():
    n = 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=conns)) as s:
        end = time.perf_counter() + seconds
        async def worker():
            nonlocal n
            while time.perf_counter() < end:
                async with s.get(url) as r:
                    await r.read()
                    n += r.status == 200
        await asyncio.gather(*(worker() for _ in range(conns)))
    print(n / seconds)
asyncio.run(main())
"""


def load(url: str, seconds: float) -> tuple[float, str]:
    wrk = find("wrk")
    if wrk:
        out = subprocess.run(
            [wrk, "-t2", "-c64", f"-d{seconds:g}s", url], capture_output=True, text=True, timeout=60
        )
        m = re.search(r"Requests/sec:\s+([\d.]+)", out.stdout)
        non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out.stdout)
        if not m or non2xx:
            raise SystemExit(f"wrk failed: {out.stdout}{out.stderr}")
        return float(m.group(1)), "wrk -t2 -c64"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", LOADGEN, url, "32", str(seconds)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    return sum(
        float(p.communicate()[0]) for p in procs
    ), "python aiohttp x2 processes x32 connections"


def serving(world: LabWorld, pub: Publisher, seconds: float, tmp: Path) -> dict:
    region = REPLICAS[0]
    root = lab_mirror_root(world, region)
    path = "bench/prop-stream/0.json"  # 1 KiB, synced there in (a)
    state = world.state()
    mirror_url = f"http://127.0.0.1:{state.regions[region].mirror_port}/{path}"
    out: dict = {"file_bytes": (root / path).stat().st_size}
    rps, how = load(mirror_url, seconds)
    out["mirror_serve_rps"], out["load_generator"] = round(rps), how
    say(f"serving: mirror serve {rps:.0f} req/s ({how})")
    nginx = harness.find_nginx()
    if nginx is None:
        out["nginx"] = (
            "skipped: nginx is not installed (apt-get install nginx, or NGINX=/path/to/nginx)"
        )
        return out
    conf_dir = tmp / "nginx"
    for sub in ("", "client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (conf_dir / sub).mkdir(parents=True, exist_ok=True)
    port = free_port()
    primary_port = state.regions[PRIMARY].mirror_port
    (conf_dir / "nginx.conf").write_text(
        nginx_config(
            region=region,
            root=root,
            listen=f"127.0.0.1:{port}",
            primary_url=f"http://127.0.0.1:{primary_port}",
            website_url=None,
            standalone=conf_dir,
            user="root" if os.geteuid() == 0 else None,
        )
    )
    with harness.nginx_running(nginx, conf_dir / "nginx.conf", conf_dir):
        url = f"http://127.0.0.1:{port}/{path}"
        wait_until(lambda: harness.http_ok(url, timeout=1), 10, "nginx")
        with urllib.request.urlopen(url) as a, urllib.request.urlopen(mirror_url) as b:
            assert a.read() == b.read(), "nginx and mirror serve disagree"
        rps_nginx, _ = load(url, seconds)
        out["nginx_rps"] = round(rps_nginx)
        out["nginx_workers"] = os.cpu_count()
        out["ratio_mirror_serve_vs_nginx"] = round(rps / rps_nginx, 2)
        say(f"serving: nginx {rps_nginx:.0f} req/s")
    return out


# ---------------------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", type=Path, help="Also write the figures as JSON.")
    ap.add_argument("--samples", type=int, default=60, help="Publishes for (a).")
    ap.add_argument("--burst", type=int, default=100, help="Publishes 10 ms apart for (a).")
    ap.add_argument("--files", type=int, default=5000, help="Files for (b).")
    ap.add_argument("--seconds", type=float, default=5.0, help="Load duration for (c).")
    args = ap.parse_args()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-mirror-") as tmp:
        tmp = Path(tmp)
        (tmp / "topology.toml").write_text(TOPOLOGY)
        world = LabWorld(tmp / "lab", tmp / "topology.toml", progress=say)
        world.up()
        try:
            roots = start_lab_mirrors(world)
            if not wait_lab_mirrors_ready(world, timeout=60):
                raise SystemExit("mirrors not ready; see the lab's regions/*/mirror*.log")
            with Publisher(roots[PRIMARY]) as pub:
                results = {
                    "rtt_ms": RTT_MS,
                    "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
                    "propagation": propagation(world, pub, args.samples, args.burst),
                    "sync_throughput": throughput(world, pub, args.files),
                    "serving": serving(world, pub, args.seconds, tmp),
                }
        finally:
            world.down()
    results["seconds"] = round(time.monotonic() - started, 1)
    results["load_average"] = [round(x, 2) for x in os.getloadavg()]
    report(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


def report(r: dict) -> None:
    p, t, s = r["propagation"], r["sync_throughput"], r["serving"]
    print(
        f"mirror benchmark: links {r['rtt_ms']:.0f} ms RTT, {r['machine']['cpus']} CPUs, "
        f"load average {' / '.join(str(x) for x in r['load_average'])}, {r['seconds']} s"
    )
    print("(a) propagation, publish -> visible on every mirror")
    for kind, label in (
        ("inline", "single, 1 KiB inline"),
        ("download", "single, 200 KiB download"),
        ("burst", "burst 100 x 10 ms, 1 KiB"),
    ):
        for mode, name in (
            ("stream", "stream"),
            ("longpoll", "long poll (before)"),
            ("poll5", "5 s polling"),
        ):
            x = p[mode][kind]
            print(
                f"    {label:26} {name:19} p50 {x['p50_ms']:7.1f} ms  p99 {x['p99_ms']:7.1f} ms"
                f"  max {x['max_ms']:7.1f} ms  (n={x['n']})"
            )
    goal = p["goal_p99_ms"]
    for kind in ("inline", "burst"):
        x = p["stream"][kind]
        verdict = "meets" if x["p99_ms"] <= goal else "MISSES"
        print(
            f"    stream {kind}: p99 {x['p99_ms']:.1f} ms = {x['p99_ms'] / r['rtt_ms']:.2f} x RTT; "
            f"{verdict} the goal 0.6 x RTT + 10 = {goal:.0f} ms; long poll p99 "
            f"{p[f'{kind}_p99_longpoll_vs_stream']}x of it"
        )
    print(f"    p50 {p['p50_speedup_vs_poll5']}x faster than 5 s polling (single 1 KiB)")
    print("(b) sync throughput into one mirror, 1 KiB files")
    for name in ("bundled", "bundled_longpoll", "one_get_per_file"):
        x = t[name]
        print(
            f"    {name:30} {x['files_per_s']:7d} files/s  ({x['files']} files in {x['seconds']} s)"
        )
    verdict = "meets" if t["bundled"]["files_per_s"] >= t["target_files_per_s"] else "MISSES"
    print(
        f"    {verdict} the target {t['target_files_per_s']}/s; {t['ratio_bundled_vs_get']}x one GET per file"
    )
    print(f"(c) serving a {s['file_bytes']} B file on loopback ({s['load_generator']})")
    print(f"    latitude mirror serve (1 process)  {s['mirror_serve_rps']:7d} req/s")
    if "nginx_rps" in s:
        print(
            f"    nginx ({s['nginx_workers']} workers)              {s['nginx_rps']:7d} req/s"
            f"   -> mirror serve = {s['ratio_mirror_serve_vs_nginx']} x nginx"
        )
    else:
        print(f"    nginx: {s['nginx']}")


if __name__ == "__main__":
    main()
