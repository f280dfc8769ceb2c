"""The floor of a forwarding hop in Python, against nginx's: what is left of a replica gateway's
cost per forwarded request once every Latitude feature is taken out.

    python benchmarks/bench_floor.py [--json FILE] [--seconds S] [--rounds N] [--install-nginx]

A small upstream (uvicorn, one worker, answering a POST with a calendar-sized 201) is reached
three ways, in alternating rounds: directly (the baseline); through nginx as the seed's local
keep-alive proxy (one worker, `keepalive 8`); and through `_floor_apps.hop`, uvicorn with
uvloop and httptools as `latitude serve` runs, forwarding with the gateway's own pooled client
(`H1ForwardingClient`) and nothing else: no signature, session, idempotency key or metrics.
Each round measures one connection sending back to back (the latency a hop adds, p50 over
the direct p50, and its CPU per request) and 32 connections (CPU per request of the hop's
process, from /proc, and requests/s). Ratios are to nginx in the same round.

Issue #14 asks for a forwarded write's own cost <= 1 ms over both gateways, the replica's and
the primary's: if the hop alone costs a good part of that on one side, no trimming of
Latitude's features reaches the goal, and that is worth knowing before the next trim.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import statistics
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from _lab import HOST, build_request, free_port, run_load, say, uvicorn_argv, wait_http
from _nginx import nginx_or_exit, nginx_version, running_nginx

from latitude import atomic

BODY = b'{"title": "standup", "when": "2026-12-02T10:00"}' + b" " * 150
KINDS = ("direct", "nginx", "python_hop")


@contextlib.contextmanager
def running(argv: list[str], what: str, env: dict[str, str] | None = None) -> Iterator[int]:
    """`argv` in a session of its own until the block ends (SIGTERM, then SIGKILL)."""
    proc = subprocess.Popen(
        argv,
        env={**os.environ, **(env or {})},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        yield proc.pid
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            say(f"{what} did not stop on SIGTERM: SIGKILL")
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def uvicorn_app(app: str, what: str, env: dict[str, str] | None = None):
    port = free_port()
    argv = uvicorn_argv(f"benchmarks._floor_apps:{app}", port)
    return port, running(argv, what, env)


async def one_round(ports: dict[str, int], pids: dict[str, int], seconds: float) -> dict:
    out: dict[str, dict] = {}
    for kind in KINDS:
        port = ports[kind]
        request = build_request("POST", "/events", port, body=BODY)
        cpu = {"hop": pids[kind]} if kind in pids else None
        sequential, loaded = [
            await run_load(
                port,
                lambda _i, request=request: request,
                concurrency=concurrency,
                seconds=seconds,
                expect=(201,),
                cpu_pids=cpu,
            )
            for concurrency in (1, 32)
        ]
        out[kind] = {
            "p50_ms": sequential["p50_ms"],
            "rps_32": loaded["rps"],
            "cpu_ms_per_request": loaded.get("hop_cpu_ms_per_request"),
            "cpu_ms_per_request_one_connection": sequential.get("hop_cpu_ms_per_request"),
        }
    for kind in ("nginx", "python_hop"):
        out[kind]["added_p50_ms"] = round(out[kind]["p50_ms"] - out["direct"]["p50_ms"], 3)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path, help="Also write the figures as JSON.")
    ap.add_argument("--seconds", type=float, default=4.0, help="Length of each measurement.")
    ap.add_argument("--rounds", type=int, default=3, help="Alternating rounds of all three.")
    ap.add_argument("--install-nginx", action="store_true", help="apt-get nginx if missing.")
    args = ap.parse_args()
    nginx = nginx_or_exit(args.install_nginx)
    load0 = os.getloadavg()[0]
    with contextlib.ExitStack() as stack:
        up_port, up = uvicorn_app("upstream", "the upstream")
        stack.enter_context(up)
        wait_http(f"http://{HOST}:{up_port}/", 30, "the upstream")
        ngx = stack.enter_context(running_nginx(nginx, f"{HOST}:{up_port}", workers=1, keepalive=8))
        hop_port, hop = uvicorn_app(
            "hop", "the Python hop", {"FLOOR_UPSTREAM": f"http://{HOST}:{up_port}"}
        )
        hop_pid = stack.enter_context(hop)
        wait_http(f"http://{HOST}:{hop_port}/", 30, "the Python hop")
        ports = {"direct": up_port, "nginx": ngx.port, "python_hop": hop_port}
        pids = {"nginx": ngx.pid, "python_hop": hop_pid}
        rounds = []
        for i in range(args.rounds):
            say(f"round {i + 1} of {args.rounds}: direct, nginx, the Python hop")
            rounds.append(asyncio.run(one_round(ports, pids, args.seconds)))
    figures = summarize(rounds)
    figures.update(nginx=nginx_version(nginx), load_average=[load0, os.getloadavg()[0]])
    report(figures)
    if args.json:
        atomic.write_json(args.json, {"rounds": rounds, **figures})
    return 0


def summarize(rounds: list[dict]) -> dict:
    def each(kind: str, figure: str) -> list[float]:
        return [r[kind][figure] for r in rounds]

    hop_cpu, ngx_cpu = each("python_hop", "cpu_ms_per_request"), each("nginx", "cpu_ms_per_request")
    hop_add, ngx_add = each("python_hop", "added_p50_ms"), each("nginx", "added_p50_ms")
    return {
        "hop_cpu_ms_per_request": hop_cpu,
        "nginx_cpu_ms_per_request": ngx_cpu,
        "cpu_ratio_to_nginx": [
            round(h / max(n, 1e-6), 2) for h, n in zip(hop_cpu, ngx_cpu, strict=True)
        ],
        "hop_cpu_ms_one_connection": each("python_hop", "cpu_ms_per_request_one_connection"),
        "nginx_cpu_ms_one_connection": each("nginx", "cpu_ms_per_request_one_connection"),
        "hop_added_p50_ms": hop_add,
        "nginx_added_p50_ms": ngx_add,
        "rps_32": {kind: each(kind, "rps_32") for kind in KINDS},
        "rps_ratio_to_nginx": [
            round(h / max(n, 1e-6), 2)
            for h, n in zip(each("python_hop", "rps_32"), each("nginx", "rps_32"), strict=True)
        ],
        "hop_cpu_ms_median": statistics.median(hop_cpu),
    }


def report(f: dict) -> None:
    def spread(values) -> str:
        return ", ".join(f"{v:g}" for v in values)

    print(f"load average {f['load_average'][0]:.2f} -> {f['load_average'][1]:.2f}")
    print(
        f"CPU per request, 32 connections: the Python hop {spread(f['hop_cpu_ms_per_request'])} ms"
    )
    print(f"  nginx {f['nginx']} {spread(f['nginx_cpu_ms_per_request'])} ms")
    print(f"  ratio hop / nginx {spread(f['cpu_ratio_to_nginx'])}")
    print(f"CPU per request, one connection: the hop {spread(f['hop_cpu_ms_one_connection'])} ms")
    print(f"  nginx {spread(f['nginx_cpu_ms_one_connection'])} ms")
    print(f"latency added at p50, one connection: the hop {spread(f['hop_added_p50_ms'])} ms")
    print(f"  nginx {spread(f['nginx_added_p50_ms'])} ms")
    print(f"requests/s at 32 connections, ratio hop / nginx {spread(f['rps_ratio_to_nginx'])}")


if __name__ == "__main__":
    sys.exit(main())
