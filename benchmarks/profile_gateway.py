"""Where a forwarded write's own cost goes, both sides, in a throwaway two-region lab world with
the link at 0 ms (so only forwarding's own work is left) and the calendar example.

    python benchmarks/profile_gateway.py [--json FILE] [--writes N] [--rate HZ]

Needs py-spy (`pip install py-spy`; not a dependency of the project) and the right to ptrace
the gateway processes (root, or ptrace_scope 0).

1. `N` forwarded writes alone, py-spy sampling eu-west's gateway and the primary's gateway
   (with its worker processes) meanwhile; then `N` writes made directly at the primary alone,
   sampling the primary again: the direct write is the primary's own work, so the primary's
   extra for a forwarded write is the difference, category by category.
2. py-spy counts CPU only (idle threads are not sampled). Each sample goes to a category by
   the frames on its stack: sign/verify (`latitude.signing`), idempotency store
   (`latitude.idempotency`), Valkey client (`redis`, `latitude.resp_client`), session codec (`latitude.sessions`), the
   app (`examples/`); else by its innermost frame: HTTP client (`aiohttp`), HTTP server
   (`uvicorn`, `h11`, `httptools`), event loop (`asyncio`, `selectors`, `uvloop`), gateway glue
   (other `latitude` code), other.
3. Waits: the round trips each write makes to Valkey and to Postgres (counted as
   `bench_gateway.py` does), and the p50 of one such round trip measured from this process
   with the same client libraries (a session-sized GET; an autocommit INSERT like the
   idempotency claim).

The own cost (p50 forwarded - p50 direct, same link) is then set against these parts; what is
left is glue the categories do not name. Everything runs on 127.0.0.1 and is stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path

import psycopg
import redis.asyncio
from _counters import Census
from _lab import (
    HOST,
    pct,
    say,
    service_pid,
    throwaway_world,
    tree_cpu_seconds,
    two_region_topology,
)
from bench_gateway import (
    PRIMARY,
    REPLICA,
    client,
    login,
    port_of,
    start_calendar,
    timed_write,
)

from latitude.lab.postgres import database_url

# Up at 100 ms (the topology takes 0 for "not given"), then set to 0 ms.
TOPOLOGY = two_region_topology("profile-gateway", 100.0, PRIMARY, REPLICA)
# py-spy names frames `function (package/module.py:line)`.
OWNERS = (  # any frame on the stack: the work done on behalf of...
    ("sign/verify", ("(latitude/signing/",)),
    ("idempotency store", ("(latitude/idempotency.py",)),
    ("Valkey client", ("(redis/", "(latitude/resp_client.py")),
    ("app", ("(examples/", "(starlette/", "(sqlalchemy/")),  # under the session middleware
    ("session codec", ("(latitude/sessions.py",)),
)
LEAVES = (  # else the innermost frame's module
    (
        "HTTP client (aiohttp, h1)",
        ("(aiohttp/", "(yarl/", "(multidict/", "(latitude/forwarding_h1"),
    ),
    ("HTTP server (uvicorn)", ("(uvicorn/", "(h11/", "(httptools/")),
    ("Postgres client (psycopg)", ("(psycopg/", "(psycopg_pool/")),
    ("event loop", ("(asyncio/", "(uvloop/")),
    ("gateway glue", ("(latitude/",)),
)
# Threads waiting, which py-spy in --nonblocking mode can sample as busy: not CPU, dropped.
WAITING = ("(selectors.py", "(multiprocessing/connection.py", "(threading.py")


def category(stack: str) -> str:
    frames = stack.split(";")
    if any(m in frames[-1] for m in WAITING) or "(" not in frames[-1]:
        return "waiting"
    for name, marks in OWNERS:
        if any(m in stack for m in marks):
            return name
    for frame in reversed(frames):
        for name, marks in LEAVES:
            if any(m in frame for m in marks):
                return name
    return "other"


def read_raw(path: Path) -> tuple[Counter, Counter]:
    """py-spy's raw (collapsed) output, `frame;frame;... count` per line: samples per category,
    and the innermost frames of the samples no category took (to name them)."""
    out: Counter = Counter()
    unnamed: Counter = Counter()
    if not path.exists():
        return out, unnamed
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            name = category(stack)
            out[name] += int(count)
            if name == "other":
                unnamed[stack.split(";")[-1]] += int(count)
    return out, unnamed


class Sampler:
    """py-spy recording a process tree until stopped."""

    def __init__(self, pyspy: str, pid: int, out: Path, rate: int):
        self.out = out
        self.proc = subprocess.Popen(
            [
                pyspy,
                "record",
                "--pid",
                str(pid),
                "--subprocesses",
                "--rate",
                str(rate),
                "--format",
                "raw",
                "--output",
                str(out),
                "--nonblocking",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=open(out.with_suffix(".log"), "wb"),  # noqa: SIM115 - closed with the process
        )

    def stop(self) -> None:
        # SIGINT: py-spy stops sampling and writes its output.
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def sampled_series(pyspy, tmp: Path, label: str, port: int, pids: dict, n: int, rate: int):
    """`n` writes on `port` while py-spy samples each of `pids`; latencies, samples per category
    and the CPU seconds each process tree used meanwhile."""

    async def run() -> tuple[list[float], dict]:
        async with client(port) as c:
            await login(c, f"prof-{uuid.uuid4().hex[:8]}")
            for _ in range(10):
                await timed_write(c, PRIMARY)
            samplers = {
                side: Sampler(pyspy, pid, tmp / f"{label}-{side}.txt", rate)
                for side, pid in pids.items()
            }
            await asyncio.sleep(1.0)  # py-spy attaches
            cpu0 = {side: tree_cpu_seconds(pid) for side, pid in pids.items()}
            ms = [await timed_write(c, PRIMARY) for _ in range(n)]
            cpu = {side: tree_cpu_seconds(pid) - cpu0[side] for side, pid in pids.items()}
            for sampler in samplers.values():
                sampler.stop()
        return ms, cpu

    ms, cpu = asyncio.run(run())
    samples = {side: read_raw(tmp / f"{label}-{side}.txt") for side in pids}
    return ms, samples, cpu


async def round_trip_times(world, n: int = 300) -> dict:
    state = world.state().regions
    r = redis.asyncio.Redis(host=HOST, port=state[REPLICA].valkey_port)
    value = os.urandom(600)
    await r.set("profile:rt", value)
    valkey = []
    for _ in range(n):
        t0 = time.perf_counter()
        await r.get("profile:rt")
        valkey.append((time.perf_counter() - t0) * 1000)
    await r.aclose()
    pg = []
    async with await psycopg.AsyncConnection.connect(
        database_url(state[PRIMARY].pg_port), autocommit=True
    ) as conn:
        await conn.execute("create table if not exists profile_rt (k text primary key, v text)")
        for _ in range(n):
            t0 = time.perf_counter()
            await conn.execute(
                "insert into profile_rt values (%s, 'running') on conflict do nothing",
                (uuid.uuid4().hex,),
            )
            pg.append((time.perf_counter() - t0) * 1000)
        await conn.execute("drop table profile_rt")
    return {"valkey_get_ms": round(pct(valkey, 50), 3), "pg_insert_ms": round(pct(pg, 50), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", type=Path, help="Also write the figures as JSON.")
    ap.add_argument("--writes", type=int, default=300, help="Writes in each sampled series.")
    ap.add_argument("--rate", type=int, default=200, help="py-spy samples per second.")
    ap.add_argument("--keep", type=Path, help="Keep py-spy's raw stacks in this folder.")
    args = ap.parse_args()
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not os.access(pyspy, os.X_OK):
        ap.error("py-spy is not installed: pip install py-spy")
    n = args.writes
    load0 = os.getloadavg()[0]
    with (
        throwaway_world("profile-gateway-", TOPOLOGY) as world,
        tempfile.TemporaryDirectory(prefix="profile-gateway-") as tmp,
    ):
        tmp = Path(tmp)
        start_calendar(world, PRIMARY)
        start_calendar(world, REPLICA)
        world.link("set", PRIMARY, REPLICA, rtt_ms=0)
        pids = {
            "replica": service_pid(world, REPLICA, "app"),
            "primary": service_pid(world, PRIMARY, "app"),
        }
        say(f"{n} forwarded writes, sampling both gateways")
        fwd_ms, fwd, fwd_cpu = sampled_series(
            pyspy, tmp, "fwd", port_of(world, REPLICA), pids, n, args.rate
        )
        say(f"{n} direct writes at the primary, sampling it")
        dir_ms, direct, dir_cpu = sampled_series(
            pyspy,
            tmp,
            "direct",
            port_of(world, PRIMARY),
            {"primary": pids["primary"]},
            n,
            args.rate,
        )
        if args.keep:
            args.keep.mkdir(parents=True, exist_ok=True)
            for f in tmp.glob("*.txt"):
                shutil.copy(f, args.keep / f.name)
        say("counting round trips per write (Valkey commands, Postgres statements)")
        census = Census(world, {})
        counts = {}
        with census.logging_statements():
            for label, port in (
                ("forwarded", port_of(world, REPLICA)),
                ("direct", port_of(world, PRIMARY)),
            ):

                async def counted(port=port):
                    async with client(port) as c:
                        await login(c, f"count-{uuid.uuid4().hex[:8]}")
                        await timed_write(c, PRIMARY)
                        with census.window() as w:
                            for _ in range(50):
                                await timed_write(c, PRIMARY)
                    return w

                w = asyncio.run(counted())
                counts[label] = {
                    "valkey": sum(w["valkey_commands"].values()) / 50,
                    "pg": sum(w["pg_statements"].values()) / 50,
                }
        say("one round trip to Valkey and to Postgres, from here")
        rtt = asyncio.run(round_trip_times(world))

    def cpu_ms(samples: Counter, cpu_s: float) -> dict:
        """Each category's share of the samples times the tree's measured CPU time, per write:
        on a loaded machine py-spy also samples runnable threads waiting for a core, so its
        counts are shares, and /proc says how much CPU there was to share."""
        busy = Counter({k: v for k, v in samples.items() if k != "waiting"})
        total = sum(busy.values()) or 1
        return {k: round(v / total * cpu_s * 1000 / n, 3) for k, v in busy.most_common()}

    replica = cpu_ms(fwd["replica"][0], fwd_cpu["replica"])
    primary_fwd = cpu_ms(fwd["primary"][0], fwd_cpu["primary"])
    primary_dir = cpu_ms(direct["primary"][0], dir_cpu["primary"])
    cats = sorted(set(replica) | set(primary_fwd) | set(primary_dir))
    primary_extra = {k: round(primary_fwd.get(k, 0) - primary_dir.get(k, 0), 3) for k in cats}
    own_wall = pct(fwd_ms, 50) - pct(dir_ms, 50)
    valkey_rt = counts["forwarded"]["valkey"] - counts["direct"]["valkey"]
    pg_rt = counts["forwarded"]["pg"] - counts["direct"]["pg"]

    def both(*names: str) -> float:
        return sum(replica.get(k, 0) + primary_extra.get(k, 0) for k in names)

    split = {
        "valkey_round_trips": {
            "count": round(valkey_rt, 2),
            "ms": round(valkey_rt * rtt["valkey_get_ms"], 3),
        },
        "sign_verify_cpu_ms": round(both("sign/verify"), 3),
        "idempotency_round_trips": {
            "count": round(pg_rt, 2),
            "ms": round(pg_rt * rtt["pg_insert_ms"], 3),
        },
        "session_codec_cpu_ms": round(both("session codec"), 3),
        # The hop: eu-west's server reading the client's request and the client's session
        # towards the primary, plus the primary's extra work parsing a bigger request.
        "http_hop_cpu_ms": round(both("HTTP client (aiohttp)", "HTTP server (uvicorn)"), 3),
        "event_loop_cpu_ms": round(both("event loop"), 3),
        "gateway_glue_cpu_ms": round(both("gateway glue", "other"), 3),
    }
    named = (
        split["valkey_round_trips"]["ms"]
        + split["idempotency_round_trips"]["ms"]
        + sum(v for k, v in split.items() if k.endswith("_cpu_ms"))
    )
    split["unaccounted_ms"] = round(own_wall - named, 3)
    result = {
        "writes": n,
        "rate_hz": args.rate,
        "load_average": [round(load0, 2), round(os.getloadavg()[0], 2)],
        "forwarded_p50_ms": round(pct(fwd_ms, 50), 3),
        "direct_p50_ms": round(pct(dir_ms, 50), 3),
        "own_cost_p50_ms": round(own_wall, 3),
        "forwarded_mean_ms": round(statistics.fmean(fwd_ms), 3),
        "direct_mean_ms": round(statistics.fmean(dir_ms), 3),
        "cpu_ms_per_write": {
            "replica": round(fwd_cpu["replica"] * 1000 / n, 3),
            "primary_forwarded": round(fwd_cpu["primary"] * 1000 / n, 3),
            "primary_direct": round(dir_cpu["primary"] * 1000 / n, 3),
        },
        "split": split,
        "replica_cpu_ms": replica,
        "primary_cpu_ms_forwarded": primary_fwd,
        "primary_cpu_ms_direct": primary_dir,
        "primary_extra_cpu_ms": primary_extra,
        "unnamed_frames": {
            side: dict(fwd[side][1].most_common(8)) for side in ("replica", "primary")
        },
        "round_trips_per_write": counts,
        "round_trip_ms": rtt,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        tmp_json = args.json.with_suffix(".tmp")
        tmp_json.write_text(json.dumps(result, indent=2) + "\n")
        tmp_json.rename(args.json)


if __name__ == "__main__":
    main()
