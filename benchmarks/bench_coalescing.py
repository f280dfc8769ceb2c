"""One send per answer: uvicorn's own httptools protocol, the one `latitude serve` runs
(`BoundedHttpToolsProtocol`: the header bounds, and the head held back for its body,
`latitude/gateway/coalescing.py`), and that one with the head sent on its own, serving the
same small app in the same run.

    python benchmarks/bench_coalescing.py [--json FILE] [--seconds S] [--rounds N]

Both servers are uvicorn, one worker, uvloop, serving `_floor_apps.upstream` (a POST answered
with a calendar-sized 201: a head, then a body, as Starlette sends them). In alternating
rounds, each is loaded with one connection sending back to back and with 32 connections; the
figures are the server's CPU per request (from /proc, the baseline being uvicorn's own
protocol in the same round) and the p50 latency at one connection. On loopback every send
also pays the receiver's TCP work, so the saving shows in the server's CPU and in the
client's; only the server's is counted here.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
from pathlib import Path

from _lab import HOST, build_request, free_port, run_load, say, uvicorn_argv, wait_http
from bench_floor import BODY, running

from latitude import atomic

PROTOCOLS = {
    "uvicorn": "httptools",
    "latitude_one_send_off": "benchmarks._floor_apps:UncoalescedHttpToolsProtocol",
    "latitude": "latitude.gateway.connections:BoundedHttpToolsProtocol",
}


def server_argv(protocol: str, port: int) -> list[str]:
    return [
        *uvicorn_argv("benchmarks._floor_apps:upstream", port),
        "--loop",
        "uvloop",
        "--http",
        protocol,
    ]


async def one_round(ports: dict[str, int], pids: dict[str, int], seconds: float) -> dict:
    out: dict[str, dict] = {}
    for name in PROTOCOLS:
        request = build_request("POST", "/events", ports[name], body=BODY)
        runs = [
            await run_load(
                ports[name],
                lambda _i, request=request: request,
                concurrency=concurrency,
                seconds=seconds,
                expect=(201,),
                cpu_pids={"server": pids[name]},
            )
            for concurrency in (1, 32)
        ]
        out[name] = {
            "cpu_ms_one_connection": runs[0]["server_cpu_ms_per_request"],
            "p50_ms_one_connection": runs[0]["p50_ms"],
            "cpu_ms_32_connections": runs[1]["server_cpu_ms_per_request"],
            "rps_32": runs[1]["rps"],
        }
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path, help="Also write the figures as JSON.")
    ap.add_argument("--seconds", type=float, default=3.0, help="Length of each measurement.")
    ap.add_argument("--rounds", type=int, default=4, help="Alternating rounds of both.")
    args = ap.parse_args()
    load0 = os.getloadavg()[0]
    rounds = []
    with contextlib.ExitStack() as stack:
        ports = {name: free_port() for name in PROTOCOLS}
        pids = {
            name: stack.enter_context(running(server_argv(protocol, ports[name]), name))
            for name, protocol in PROTOCOLS.items()
        }
        for name, port in ports.items():
            wait_http(f"http://{HOST}:{port}/", 30, f"uvicorn with the {name} protocol")
        for i in range(args.rounds):
            say(f"round {i + 1} of {args.rounds}: uvicorn's protocol, Latitude's without and with")
            rounds.append(asyncio.run(one_round(ports, pids, args.seconds)))
    figures = summarize(rounds)
    figures["load_average"] = [round(load0, 2), round(os.getloadavg()[0], 2)]
    report(figures)
    if args.json:
        atomic.write_json(args.json, {"rounds": rounds, **figures})
    return 0


def summarize(rounds: list[dict]) -> dict:
    """Per figure: each server's values, and Latitude's protocol's ratios to uvicorn's own and
    to itself with one send per answer off (the baselines, round by round)."""
    out: dict = {}
    for figure in ("cpu_ms_one_connection", "cpu_ms_32_connections", "p50_ms_one_connection"):
        row: dict = {name: [r[name][figure] for r in rounds] for name in PROTOCOLS}
        for base in ("uvicorn", "latitude_one_send_off"):
            ratios = [r["latitude"][figure] / max(r[base][figure], 1e-9) for r in rounds]
            row[f"ratios_to_{base}"] = [round(x, 3) for x in ratios]
            row[f"median_ratio_to_{base}"] = round(statistics.median(ratios), 3)
        out[figure] = row
    return out


def report(f: dict) -> None:
    print(f"load average {f['load_average'][0]:.2f} -> {f['load_average'][1]:.2f}")
    for figure, what in (
        ("cpu_ms_one_connection", "server CPU per request, one connection"),
        ("cpu_ms_32_connections", "server CPU per request, 32 connections"),
        ("p50_ms_one_connection", "p50 latency, one connection"),
    ):
        row = f[figure]
        print(f"{what} (ms):")
        for name in PROTOCOLS:
            print(f"  {name:24} {', '.join(f'{v:g}' for v in row[name])}")
        for base in ("uvicorn", "latitude_one_send_off"):
            ratios = ", ".join(f"{v:g}" for v in row[f"ratios_to_{base}"])
            median = row[f"median_ratio_to_{base}"]
            print(f"  latitude / {base}: {ratios} (median {median:g})")


if __name__ == "__main__":
    sys.exit(main())
