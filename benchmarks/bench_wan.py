"""How much the WAN emulator adds of its own, and how fast an unconstrained link is.

    python benchmarks/bench_wan.py [--json FILE]

(a) Delay added beyond the configured RTT: ping-pong of a 64-byte message through a relay,
    minus the configured RTT, minus the same ping-pong straight to the echo server (measured
    in the same run, against the same server), at p50 and p99.
(b) Throughput of one link with RTT 0: one connection streams into a sink that counts the
    bytes and acknowledges at EOF; relay MB/s versus direct MB/s.

Everything runs on 127.0.0.1 in this process, and takes about 15 seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import sys
import time

from latitude.lab.harness import TcpServer
from latitude.lab.harness import echo as harness_echo
from latitude.lab.relay import LinkRelay

MESSAGE = b"x" * 64
# (configured RTT in ms, round trips): fewer at long RTTs to stay bounded in time.
LATENCY_CASES = ((0, 2000), (20, 150), (100, 40))
DIRECT_ROUND_TRIPS = 2000
STREAM_BYTES = 512 * 1024 * 1024
STREAM_RUNS = 3


def _sink(client: socket.socket) -> None:
    received = 0
    while data := client.recv(1024 * 1024):
        received += len(data)
    client.sendall(str(received).encode())


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _round_trips_ms(port: int, count: int) -> list[float]:
    with _connect(port) as sock:
        times = []
        for i in range(count + 1):
            start = time.perf_counter()
            sock.sendall(MESSAGE)
            received = 0
            while received < len(MESSAGE):
                received += len(sock.recv(len(MESSAGE)))
            if i:  # the first one also pays the (emulated) connect
                times.append((time.perf_counter() - start) * 1000)
    return times


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def _stream_mb_per_s(port: int) -> float:
    block = b"\0" * (1024 * 1024)
    with _connect(port) as sock:
        start = time.perf_counter()
        for _ in range(STREAM_BYTES // len(block)):
            sock.sendall(block)
        sock.shutdown(socket.SHUT_WR)
        acknowledged = int(sock.recv(64))
        elapsed = time.perf_counter() - start
    assert acknowledged == STREAM_BYTES, acknowledged
    return STREAM_BYTES / elapsed / 1e6


def measure_latency(echo_port: int) -> list[dict[str, float]]:
    direct = _round_trips_ms(echo_port, DIRECT_ROUND_TRIPS)
    direct_p50, direct_p99 = _percentile(direct, 0.5), _percentile(direct, 0.99)
    rows = []
    for rtt_ms, count in LATENCY_CASES:
        with LinkRelay("127.0.0.1", echo_port, rtt_ms=rtt_ms) as relay:
            relayed = _round_trips_ms(relay.port, count)
        p50, p99 = _percentile(relayed, 0.5), _percentile(relayed, 0.99)
        rows.append(
            {
                "rtt_ms": rtt_ms,
                "round_trips": count,
                "direct_p50_ms": direct_p50,
                "direct_p99_ms": direct_p99,
                "relay_p50_ms": p50,
                "relay_p99_ms": p99,
                "added_p50_ms": p50 - rtt_ms - direct_p50,
                "added_p99_ms": p99 - rtt_ms - direct_p99,
                "min_ms": min(relayed),
            }
        )
    return rows


def measure_throughput(sink_port: int) -> dict[str, float]:
    # Best of a few runs: a neighbour's burst of CPU should not decide the figure.
    direct = max(_stream_mb_per_s(sink_port) for _ in range(STREAM_RUNS))
    with LinkRelay("127.0.0.1", sink_port, rtt_ms=0) as relay:
        relayed = max(_stream_mb_per_s(relay.port) for _ in range(STREAM_RUNS))
    return {
        "bytes_per_run": STREAM_BYTES,
        "direct_mb_s": direct,
        "relay_mb_s": relayed,
        "ratio": relayed / direct,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", metavar="FILE", help="also write the figures to FILE as JSON")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    echo, sink = TcpServer(harness_echo), TcpServer(_sink)
    try:
        latency = measure_latency(echo.port)
        throughput = measure_throughput(sink.port)
    finally:
        echo.close()
        sink.close()

    print("Delay added by the relay beyond the configured RTT (ms; relay - RTT - direct)")
    print(f"{'RTT':>5} {'n':>5} {'direct p50':>10} {'relay p50':>10} {'relay p99':>10}", end="")
    print(f" {'added p50':>10} {'added p99':>10}")
    for row in latency:
        print(
            f"{row['rtt_ms']:>5} {row['round_trips']:>5} {row['direct_p50_ms']:>10.3f}"
            f" {row['relay_p50_ms']:>10.3f} {row['relay_p99_ms']:>10.3f}"
            f" {row['added_p50_ms']:>10.3f} {row['added_p99_ms']:>10.3f}"
        )
    print()
    print(f"Throughput, one link at RTT 0 ({STREAM_BYTES >> 20} MiB, best of {STREAM_RUNS})")
    print(f"  direct {throughput['direct_mb_s']:8.0f} MB/s")
    print(f"  relay  {throughput['relay_mb_s']:8.0f} MB/s  ({throughput['ratio']:.2f} x direct)")
    elapsed = time.perf_counter() - started
    print(f"\n({elapsed:.1f} s, Python {platform.python_version()}, {os.cpu_count()} CPUs)")

    if args.json:
        figures = {
            "latency": latency,
            "throughput": throughput,
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "seconds": elapsed,
        }
        with open(args.json, "w") as out:
            json.dump(figures, out, indent=2)
            out.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
