"""What the lab benchmarks share: a throwaway world, processes started in it, figures, and a
lean HTTP/1.1 load generator.

* :func:`throwaway_world`: the harness's (`latitude.lab.harness`), saying what it does.
* :func:`tree_cpu_seconds` reads a process tree's CPU time from /proc, to put a server's own
  cost per request beside its throughput.
* :class:`RawConnection` / :func:`run_load`: a keep-alive HTTP/1.1 client over asyncio streams.
  It sends prebuilt request bytes and reads the answer by Content-Length, so it costs the
  machine far less per request than a general client (aiohttp): on a small machine the server,
  not the load generator, is then the ceiling.

Everything listens and connects on 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

from latitude.lab import LabWorld, harness
from latitude.lab.harness import free_port as free_port
from latitude.lab.harness import wait_http as wait_http

REPO = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"


def two_region_topology(
    app_name: str, rtt_ms: float, primary: str = "us-west", replica: str = "eu-west"
) -> str:
    """A lab topology: `primary` and `replica`, one link of `rtt_ms` between them."""
    return f"""
[app]
name = "{app_name}"

[lab]

[[regions]]
name = "{primary}"
primary = true
location = [45.60, -121.18]

[[regions]]
name = "{replica}"
location = [53.35, -6.26]

[signing]
keys = [{{ id = "lab-1", env = "LATITUDE_LAB_KEY" }}]

[links]
default_rtt_ms = {rtt_ms}
"""


def say(msg: str) -> None:
    print(f"... {msg}", file=sys.stderr, flush=True)


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(p / 100 * (len(values) - 1))))]


def summary(ms: list[float], digits: int = 2) -> dict:
    return {
        "n": len(ms),
        "p50_ms": round(pct(ms, 50), digits),
        "p90_ms": round(pct(ms, 90), digits),
        "p99_ms": round(pct(ms, 99), digits),
        "mean_ms": round(statistics.fmean(ms), digits),
    }


# ---------------------------------------------------------------------------------------- world


def throwaway_world(prefix: str, topology_text: str):
    """A lab world in a temporary folder, up on entry and down on exit (see the harness)."""
    return harness.throwaway_world(prefix, topology_text, progress=say)


def uvicorn_argv(app: str, port: int) -> list[str]:
    """Plain uvicorn, one process, no gateway (run with a region's environment)."""
    return [
        sys.executable,
        "-m",
        "uvicorn",
        app,
        "--app-dir",
        str(REPO),
        "--host",
        HOST,
        "--port",
        str(port),
        "--workers",
        "1",
        "--log-level",
        "warning",
        "--no-access-log",
        "--timeout-keep-alive",
        "300",
    ]


def service_pid(world: LabWorld, region: str, service: str) -> int:
    return int((world.state_dir / "regions" / region / f"{service}.pid").read_text())


# ------------------------------------------------------------------------------------ CPU time

_TICK = os.sysconf("SC_CLK_TCK")


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        kids.setdefault(ppid, []).append(int(entry))
    return kids


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of `pid` and all its live descendants."""
    kids = _children()
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo += kids.get(p, [])
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        except (OSError, ValueError, IndexError):
            pass
    return total / _TICK


def machine_cpu() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine, all CPUs, from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # guest time is already counted in user
    return total - idle, total


# ---------------------------------------------------------------------------------------- load


def build_request(
    method: str,
    path: str,
    port: int,
    *,
    cookie: str | None = None,
    body: bytes = b"",
    content_type: str = "application/json",
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {HOST}:{port}"]
    if cookie:
        lines.append(f"Cookie: {cookie}")
    if body or method in ("POST", "PUT", "PATCH"):
        lines += [f"Content-Type: {content_type}", f"Content-Length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class RawConnection:
    """One keep-alive HTTP/1.1 connection that sends prebuilt requests."""

    def __init__(self, port: int):
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.retry_after_s: float | None = None  # what the last 503 asked for

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(HOST, self.port)

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(OSError):
                await self.writer.wait_closed()
            self.writer = None

    async def request(self, data: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            await self.open()
        self.writer.write(data)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        lower = head.lower()
        i = lower.find(b"\r\ncontent-length:")
        if i >= 0:
            j = lower.index(b"\r\n", i + 2)
            body = await self.reader.readexactly(int(head[i + 17 : j]))
        elif b"\r\ntransfer-encoding: chunked" in lower:
            body = await self._chunked()
        else:
            body = b""
        if b"\r\nconnection: close" in lower:
            await self.close()
        self.retry_after_s = _retry_after(lower) if status == 503 else None
        return status, body

    async def _chunked(self) -> bytes:
        parts = []
        while True:
            size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await self.reader.readuntil(b"\r\n")
                return b"".join(parts)
            parts.append(await self.reader.readexactly(size))
            await self.reader.readexactly(2)


def _retry_after(head: bytes) -> float | None:
    i = head.find(b"\r\nretry-after:")
    if i < 0:
        return None
    try:
        return float(head[i + 14 : head.index(b"\r\n", i + 2)].strip())
    except ValueError:
        return None  # an HTTP date: not sent by anything measured here


async def run_load(
    port: int,
    requests: Callable[[int], bytes],
    *,
    concurrency: int,
    seconds: float,
    warmup_s: float = 1.0,
    expect: tuple[int, ...] = (200,),
    tolerate: tuple[int, ...] = (),
    cpu_pids: dict[str, int] | None = None,
    counters: dict[str, Callable[[], float]] | None = None,
) -> dict:
    """`concurrency` connections, each sending `requests(i)` back to back for `warmup_s` then
    `seconds`; only the second window is counted. `cpu_pids`: processes whose CPU time (with
    their descendants) is measured over that window; `counters`: readings (made in a thread)
    whose change over that window is reported (`<name>_in_window`). A status outside `expect`
    fails the run unless it is in `tolerate`: then it is only counted (`other_statuses`). A 503
    with `Retry-After` makes its client wait that long first, as a well-behaved client does
    (one that resent at once would measure its own storm of refusals)."""
    conns = [RawConnection(port) for _ in range(concurrency)]
    await asyncio.gather(*(c.open() for c in conns))
    start = time.perf_counter() + warmup_s
    end = start + seconds
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    cpu0: dict[str, float] = {}
    machine0: list[tuple[int, int]] = []
    counted0: dict[str, float] = {}

    async def worker(i: int, conn: RawConnection) -> None:
        data = requests(i)
        while True:
            t0 = time.perf_counter()
            if t0 >= end:
                return
            status, _ = await conn.request(data)
            if t0 >= start:
                latencies.append((time.perf_counter() - t0) * 1000)
                statuses[status] = statuses.get(status, 0) + 1
            if conn.retry_after_s:
                await asyncio.sleep(min(conn.retry_after_s, max(0.0, end - time.perf_counter())))

    async def cpu_start() -> None:
        await asyncio.sleep(max(0.0, start - time.perf_counter()))
        for name, pid in (cpu_pids or {}).items():
            cpu0[name] = tree_cpu_seconds(pid)
        machine0.append(machine_cpu())
        for name, read in (counters or {}).items():
            counted0[name] = await asyncio.to_thread(read)

    try:
        cpu_task = asyncio.create_task(cpu_start())
        await asyncio.gather(*(worker(i, c) for i, c in enumerate(conns)))
        await cpu_task
        elapsed = time.perf_counter() - start
        cpu = {name: tree_cpu_seconds(pid) - cpu0[name] for name, pid in (cpu_pids or {}).items()}
        busy, total = (b - a for a, b in zip(machine0[0], machine_cpu(), strict=True))
        counted = {
            name: await asyncio.to_thread(read) - counted0[name]
            for name, read in (counters or {}).items()
        }
    finally:
        await asyncio.gather(*(c.close() for c in conns), return_exceptions=True)
    ok = sum(n for s, n in statuses.items() if s in expect)
    bad = {s: n for s, n in statuses.items() if s not in expect and s not in tolerate}
    if bad:
        raise RuntimeError(f"unexpected statuses under load: {bad} (ok: {ok})")
    other = {s: n for s, n in statuses.items() if s not in expect}
    out = {
        "concurrency": concurrency,
        "seconds": round(elapsed, 2),
        "requests": ok,
        "rps": round(ok / elapsed, 1),
        **summary(latencies),
        # Share of all the machine's CPUs in use meanwhile (every process, ours or not).
        "machine_cpu_percent": round(100 * busy / max(total, 1), 1),
    }
    if tolerate:
        out["other_statuses"] = {str(s): n for s, n in sorted(other.items())}
    for name, seconds_used in cpu.items():
        out[f"{name}_cpu_ms_per_request"] = round(seconds_used * 1000 / max(ok, 1), 3)
        out[f"{name}_cpu_percent"] = round(100 * seconds_used / elapsed, 1)
    for name, change in counted.items():
        out[f"{name}_in_window"] = change
    return out
