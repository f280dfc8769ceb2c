"""CPU of signing per forwarded write: latitude.signing against the module it replaced.

    python benchmarks/bench_signing.py [--json FILE] [--rounds N] [--writes N]

A forwarded write costs four signature operations: the replica signs the request, the primary
verifies it, the primary signs its answer bound to it, the replica verifies the answer. Each is
timed on the gateway's own header shapes (lists of bytes pairs; the answer's headers as aiohttp
hands them over, a CIMultiDict) and covered-header lists, one write after another as a gateway
does them, for the current package and for the frozen copy of the old module
(benchmarks/_signing_baseline.py), in alternating batches in the same process. Also: a
Content-Digest of a 1 KiB and a 1 MiB body, and parsing one Signature-Input field.

Figures are the median of every single operation's time (robust to the preemption a loaded
machine causes); ratios are current / baseline (below 1 is faster). Takes about 20 seconds.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from multidict import CIMultiDict

import latitude.signing as current

# What the gateway covers when present: the forwarding envelope's own sets.
from latitude.gateway.envelope import SIGNED_REQUEST_HEADERS, SIGNED_RESPONSE_HEADERS

URL = "http://primary.lab.test:8000/calendars/7/events?week=12&tz=UTC"
SECRET = bytes(range(32))
SMALL_BODY = b'{"title": "standup", "starts": "2026-12-01T09:00:00Z"}'.ljust(1024, b" ")
LARGE_BODY = b"x" * (1024 * 1024)
OPERATIONS = ("sign_request", "verify_request", "sign_response", "verify_response")


def load_baseline() -> ModuleType:
    path = Path(__file__).with_name("_signing_baseline.py")
    spec = importlib.util.spec_from_file_location("_signing_baseline", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    return module


def run_sync(coro: Any) -> Any:
    """Drive a coroutine that never suspends (a memory nonce cache) without an event loop."""
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value
    raise RuntimeError("the coroutine suspended")


class Implementation:
    def __init__(self, name: str, mod: ModuleType) -> None:
        self.name = name
        self.mod = mod
        self.keyring = mod.Keyring([mod.SigningKey("eu-west-1", SECRET)], "eu-west-1")
        self.nonces = mod.MemoryNonceCache()
        self.samples: dict[str, list[float]] = {op: [] for op in OPERATIONS}

    def request(self, i: int) -> list[tuple[bytes, bytes]]:
        """A forwarded request's headers as the replica's gateway sends them."""
        return [
            (b"host", b"primary.lab.test:8000"),
            (b"content-type", b"application/json"),
            (b"content-length", b"1024"),
            (b"content-digest", self.mod.content_digest(SMALL_BODY).encode()),
            (b"idempotency-key", f"idem-{i:012d}".encode()),
            (b"forwarded", b'for="[2001:db8::1]";proto=http;host=calendar.example.com'),
            (b"latitude-session-length", b"42"),
            (b"latitude-forwarded-from", b"eu-west"),
            (b"cookie", b"theme=dark"),
            (b"user-agent", b"bench/1"),
        ]

    def write(self, i: int) -> None:
        """One forwarded write's four operations, each timed."""
        m = self.mod
        clock = time.perf_counter
        request = self.request(i)
        t0 = clock()
        sig = m.sign_request(
            self.keyring, method="POST", url=URL, headers=request, covered=SIGNED_REQUEST_HEADERS
        )
        t1 = clock()
        sent = request + list(sig.items())
        received = [(k, v.encode() if isinstance(v, str) else v) for k, v in sent]
        received = [(k.lower().encode() if isinstance(k, str) else k, v) for k, v in received]
        t2 = clock()
        run_sync(
            m.verify_request(
                self.keyring,
                method="POST",
                url=URL,
                headers=received,
                nonce_cache=self.nonces,
                must_cover=SIGNED_REQUEST_HEADERS,
            )
        )
        t3 = clock()
        answer_body = b'{"id": 1}'
        answer = [
            (b"content-type", b"application/json"),
            (b"location", b"/calendars/7/events/1"),
            (b"latitude-session-length", b"0"),
            (b"latitude-position", b"0/16B3748"),
            (b"content-digest", m.content_digest(answer_body).encode()),
        ]
        t4 = clock()
        asig = m.sign_response(
            self.keyring,
            status=201,
            headers=answer,
            request_headers=received,
            covered=SIGNED_RESPONSE_HEADERS,
        )
        t5 = clock()
        headers = CIMultiDict(
            [(k.decode(), v.decode()) for k, v in answer] + [(k, v) for k, v in asig.items()]
        )
        t6 = clock()
        m.verify_response(
            self.keyring, status=201, headers=headers, request_headers=sent, body=answer_body
        )
        t7 = clock()
        for op, dt in zip(OPERATIONS, (t1 - t0, t3 - t2, t5 - t4, t7 - t6), strict=True):
            self.samples[op].append(dt)


def median_us(samples: list[float]) -> float:
    return statistics.median(samples) * 1e6


def time_calls(fn: Callable[[], Any], n: int) -> list[float]:
    out = []
    clock = time.perf_counter
    for _ in range(n):
        t0 = clock()
        fn()
        out.append(clock() - t0)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", metavar="FILE", help="write the figures as JSON")
    ap.add_argument("--rounds", type=int, default=10, help="alternating batches per side")
    ap.add_argument("--writes", type=int, default=300, help="forwarded writes per batch")
    args = ap.parse_args()

    started = time.monotonic()
    load_start = os.getloadavg()
    impls = [Implementation("current", current), Implementation("baseline", load_baseline())]
    for impl in impls:  # warm caches and imports, as a running gateway has them
        for i in range(50):
            impl.write(i)
        impl.samples = {op: [] for op in OPERATIONS}
    writes = 0
    for r in range(args.rounds):
        for impl in impls if r % 2 == 0 else impls[::-1]:
            for i in range(args.writes):
                impl.write(writes + i)
        writes += args.writes

    extra: dict[str, dict[str, list[float]]] = {}
    for impl in impls:
        m = impl.mod
        headers = impl.request(0)
        si = m.sign_request(
            impl.keyring, method="POST", url=URL, headers=headers, covered=SIGNED_REQUEST_HEADERS
        )
        value = si["Signature-Input"]  # the whole field, not the verifier's shortcut
        n = args.rounds * args.writes
        extra[impl.name] = {
            "content_digest_1KiB": time_calls(lambda m=m: m.content_digest(SMALL_BODY), n),
            "content_digest_1MiB": time_calls(lambda m=m: m.content_digest(LARGE_BODY), 50),
            "parse_signature_input": time_calls(lambda m=m, v=value: m.parse_dictionary(v), n),
        }

    cur, base = impls
    rows: list[tuple[str, float, float]] = []
    for op in OPERATIONS:
        rows.append((op, median_us(cur.samples[op]), median_us(base.samples[op])))
    per_write_cur = sum(r[1] for r in rows)
    per_write_base = sum(r[2] for r in rows)
    rows.append(("per forwarded write (4 ops)", per_write_cur, per_write_base))
    for name in extra["current"]:
        rows.append((name, median_us(extra["current"][name]), median_us(extra["baseline"][name])))

    load_end = os.getloadavg()
    print(f"signing CPU, {args.rounds} x {args.writes} forwarded writes per side")
    print(f"load average {load_start[0]:.2f} at start, {load_end[0]:.2f} at end")
    print(f"{'operation':<30} {'current us':>11} {'baseline us':>12} {'ratio':>7}")
    for name, c, b in rows:
        print(f"{name:<30} {c:>11.1f} {b:>12.1f} {c / b:>7.3f}")

    if args.json:
        results = {
            "benchmark": "bench_signing",
            "machine": {
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "load_average_at_start": round(load_start[0], 2),
                "load_average_at_end": round(load_end[0], 2),
            },
            "rounds": args.rounds,
            "writes_per_round": args.writes,
            "figures_us": {
                name: {"current": round(c, 2), "baseline": round(b, 2), "ratio": round(c / b, 4)}
                for name, c, b in rows
            },
            "seconds": round(time.monotonic() - started, 1),
        }
        tmp = Path(args.json + ".tmp")
        tmp.write_text(json.dumps(results, indent=2) + "\n")
        tmp.replace(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
