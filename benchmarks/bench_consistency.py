"""Read-your-writes, measured: replication positions against pinning to the primary.

    python benchmarks/bench_consistency.py [--json FILE] [--rounds N]

A throwaway lab world of two regions (us-west primary, eu-west replica) joined by a 100 ms link,
with the calendar example behind the gateway in both (started as `latitude demo` starts it).
Users sit next to eu-west. Rounds are interleaved (in a shuffled order each round) so that
drift on the machine hits every figure alike:

* plain local read - a signed-in user with no recent write (no position cookie) reads an event
  that replicated long ago: the gateway serves it from the local replica without any check.
* read-after-write, positions (Latitude) - a user creates an event (forwarded to the primary;
  the answer carries the primary's WAL position in the `latitude_pos` cookie) and at once reads
  it back. Only the read is timed. Replication keeps up (nothing is paused), so the read waits
  only if the replica has not replayed the write by the time the read arrives.
* read-after-write, pin to the primary for N s - Rails' DatabaseSelector (2 s), fly-ruby (5 s),
  django-multidb-router (15 s): after a write, the user's reads for N seconds go to the
  primary. Emulated as such a system does it: the client keeps the time of its last write, and
  a read within N s of it is sent to the primary region's gateway through the link (the relay
  `relay_port("eu-west", "us-west", "app")`, a kept-alive connection) instead of the local one.
  The read is timed the same way. (Rails runs the read's SQL against the primary database over
  the link instead: one round trip per query, so at least the same for this one-query read.)

Target: positions' read-after-write p50 <= 1.1 x the plain local read p50. Everything runs on
127.0.0.1; about a minute and a half, bounded under three minutes; the world is torn down at the
end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import aiohttp
from _lab import pct, say, summary, two_region_topology

from latitude.lab import LabWorld
from latitude.lab.demo import start_calendar

RTT_MS = 100.0
PRIMARY, REPLICA = "us-west", "eu-west"
PIN_WINDOWS = {"Rails DatabaseSelector": 2.0, "fly-ruby": 5.0, "django-multidb-router": 15.0}
TARGET_RATIO = 1.1
BUDGET_S = 150.0  # the measuring loop stops early rather than pass three minutes in all
POS = "latitude_pos"
TOPOLOGY = two_region_topology("calendar", RTT_MS, PRIMARY, REPLICA)


class Failure(Exception):
    pass


async def expect(resp: aiohttp.ClientResponse, status: int, what: str) -> dict:
    body = await resp.read()
    if resp.status != status:
        raise Failure(f"{what}: HTTP {resp.status}: {body[:300]!r}")
    return json.loads(body)


class User:
    """A signed-in user next to eu-west."""

    def __init__(self, local_url: str, name: str):
        self.name = name
        self.http = aiohttp.ClientSession(local_url, cookie_jar=aiohttp.CookieJar(unsafe=True))
        self.writes = 0

    async def login(self) -> None:
        async with self.http.post("/login", json={"name": self.name}) as r:
            await expect(r, 200, f"sign-in of {self.name}")

    async def write(self) -> int:
        self.writes += 1
        title = f"{self.name} meeting {self.writes}"
        async with self.http.post("/events", json={"title": title}) as r:
            return (await expect(r, 201, f"write by {self.name}"))["id"]

    async def timed_read(self, event_id: int, http: aiohttp.ClientSession | None = None):
        """(ms, forwarded?) of one GET /events/{id} that must find the event."""
        started = time.perf_counter()
        async with (http or self.http).get(f"/events/{event_id}") as r:
            await expect(r, 200, f"read of event {event_id} by {self.name}")
            return (time.perf_counter() - started) * 1000, POS in r.cookies

    def forget_position(self) -> None:
        self.http.cookie_jar.clear(lambda m: m.key == POS)

    async def close(self) -> None:
        await self.http.close()


class PinnedUser(User):
    """The pin-to-primary approach: reads within `window_s` of the last write go to the primary."""

    def __init__(self, local_url: str, primary_url: str, name: str, window_s: float):
        super().__init__(local_url, name)
        self.window_s = window_s
        self.pinned_until = 0.0
        # The primary's gateway through the link, over a kept-alive connection (as a proxy or an
        # app's pooled database connection would be). The session lives in eu-west: the read
        # goes without it, as a replayed request to another region would.
        self.primary = aiohttp.ClientSession(primary_url, cookie_jar=aiohttp.DummyCookieJar())
        self.to_primary = 0

    async def write(self) -> int:
        event_id = await super().write()
        self.pinned_until = time.monotonic() + self.window_s
        return event_id

    async def timed_read(self, event_id: int, http=None):
        if time.monotonic() < self.pinned_until:
            self.to_primary += 1
            return await super().timed_read(event_id, self.primary)
        return await super().timed_read(event_id)

    async def close(self) -> None:
        await self.primary.close()
        await super().close()


def gateway_stats(world: LabWorld) -> dict:
    return next(r for r in world.status()["regions"] if r["name"] == REPLICA)["gateway"]


async def settled_stats(world: LabWorld, before: dict, reads: int, timeout: float = 5.0) -> dict:
    """The gateways publish their counters every second: wait until these reads show."""
    deadline = time.monotonic() + timeout
    while True:
        after = gateway_stats(world)
        seen = sum(after.get(k, 0) - before.get(k, 0) for k in ("reads_local", "reads_forwarded"))
        if seen >= reads or time.monotonic() > deadline:
            return after
        await asyncio.sleep(0.25)


async def measure(world: LabWorld, rounds: int, warmup: int, started: float) -> dict:
    state = world.state()
    local_url = f"http://127.0.0.1:{state.regions[REPLICA].app_port}"
    primary_url = f"http://127.0.0.1:{world.relay_port(REPLICA, PRIMARY, 'app')}"
    run = uuid.uuid4().hex[:6]
    plain = User(local_url, f"plain-{run}")
    positions = User(local_url, f"positions-{run}")
    pinned = {
        label: PinnedUser(local_url, primary_url, f"pin{int(n)}-{run}", n)
        for label, n in PIN_WINDOWS.items()
    }
    everyone = [plain, positions, *pinned.values()]
    samples: dict[str, list[float]] = {"plain": [], "positions": [], **{k: [] for k in pinned}}
    forwarded = {"plain": 0, "positions": 0}
    write_ms: list[float] = []
    try:
        for u in everyone:
            await u.login()
        old_event = await plain.write()
        # Let it replicate, and let the position cookie lapse from the plain reader's jar.
        await asyncio.sleep(0.5)
        plain.forget_position()

        async def plain_read(record: bool) -> None:
            ms, fwd = await plain.timed_read(old_event)
            if record:
                samples["plain"].append(ms)
                forwarded["plain"] += fwd

        async def positions_pair(record: bool) -> None:
            t0 = time.perf_counter()
            event_id = await positions.write()
            if record:
                write_ms.append((time.perf_counter() - t0) * 1000)
            ms, fwd = await positions.timed_read(event_id)  # at once, timed alone
            if record:
                samples["positions"].append(ms)
                forwarded["positions"] += fwd

        def pinned_pair(label: str):
            async def pair(record: bool) -> None:
                u = pinned[label]
                event_id = await u.write()
                ms, _ = await u.timed_read(event_id)
                if record:
                    samples[label].append(ms)

            return pair

        steps = [plain_read, positions_pair, *(pinned_pair(label) for label in pinned)]
        rng = random.Random(7)
        say(f"{warmup} warm-up rounds, then {rounds} measured rounds of {len(steps)} steps each")
        before = gateway_stats(world)
        done = 0
        for i in range(warmup + rounds):
            record = i >= warmup
            if i == warmup:
                before = gateway_stats(world)
            rng.shuffle(steps)
            for step in steps:
                await step(record)
            done += record
            if record and done % 25 == 0:
                say(
                    f"round {done}/{rounds}: read-after-write p50 "
                    f"{statistics.median(samples['positions']):.2f} ms, plain read p50 "
                    f"{statistics.median(samples['plain']):.2f} ms"
                )
            if time.monotonic() - started > BUDGET_S:
                say(f"time budget reached after {done} measured rounds; stopping there")
                break
        after = await settled_stats(world, before, reads=2 * done)
        for label, u in pinned.items():
            if u.to_primary < u.writes:
                raise Failure(f"{label}: a read right after a write was not sent to the primary")
    finally:
        for u in everyone:
            await u.close()

    def d(key: str) -> float:
        return round(after.get(key, 0) - before.get(key, 0), 1)

    plain_p50 = pct(samples["plain"], 50)
    out = {
        "rounds": done,
        "plain_local_read": summary(samples["plain"]),
        "positions": {
            **summary(samples["positions"]),
            "ratio_p50_vs_plain": round(pct(samples["positions"], 50) / plain_p50, 3),
            "reads_forwarded_seen_by_client": forwarded["positions"],
            "gateway_reads_waited": d("reads_waited"),
            "gateway_wait_ms_total": d("wait_ms_total"),
            "gateway_reads_forwarded": d("reads_forwarded"),
        },
        "pinned": {
            label: {
                **summary(samples[label]),
                "window_s": PIN_WINDOWS[label],
                "ratio_p50_vs_plain": round(pct(samples[label], 50) / plain_p50, 3),
            }
            for label in pinned
        },
        "write": summary(write_ms),
    }
    out["positions"]["meets_target"] = out["positions"]["ratio_p50_vs_plain"] <= TARGET_RATIO
    if forwarded["plain"]:
        raise Failure(f"{forwarded['plain']} plain reads were forwarded: the baseline is wrong")
    return out


def report(r: dict) -> None:
    m = r["measure"]
    plain, pos = m["plain_local_read"], m["positions"]
    print(
        f"read-your-writes benchmark: {PRIMARY} primary, {REPLICA} replica, {r['rtt_ms']:.0f} ms "
        f"RTT, {r['machine']['cpus']} CPUs, {m['rounds']} rounds, {r['seconds']} s"
    )
    print(f"    {'read in eu-west':58} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'x plain':>8}")
    rows = [("plain local read (no recent write)", plain, 1.0)]
    rows.append(("read-after-write, positions (Latitude)", pos, pos["ratio_p50_vs_plain"]))
    for label, x in m["pinned"].items():
        rows.append(
            (f"read-after-write, pinned {x['window_s']:g} s ({label})", x, x["ratio_p50_vs_plain"])
        )
    for label, x, ratio in rows:
        print(
            f"    {label:58} {x['p50_ms']:8.2f} {x['p90_ms']:8.2f} {x['p99_ms']:8.2f} {ratio:8.2f}"
        )
    waited = pos["gateway_reads_waited"]
    mean_wait = pos["gateway_wait_ms_total"] / waited if waited else 0.0
    verdict = "meets" if pos["meets_target"] else "MISSES"
    print(
        f"    positions: {verdict} the target <= {TARGET_RATIO} x plain; reads that waited "
        f"{waited:.0f}/{m['rounds']} (mean {mean_wait:.2f} ms), forwarded "
        f"{pos['gateway_reads_forwarded']:.0f}; the write itself p50 {m['write']['p50_ms']:.1f} ms"
    )
    print(
        "    pinning pays ~1 RTT on every read in its window (not only the first); "
        "positions pay only the replica's actual lag"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", type=Path, help="Also write the figures as JSON.")
    ap.add_argument("--rounds", type=int, default=100, help="Measured rounds (default 100).")
    ap.add_argument("--warmup", type=int, default=5, help="Rounds not recorded (default 5).")
    args = ap.parse_args()
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-consistency-") as tmp:
        tmp = Path(tmp)
        (tmp / "topology.toml").write_text(TOPOLOGY)
        world = LabWorld(tmp / "lab", tmp / "topology.toml", progress=say)
        world.up()
        try:
            start_calendar(world, progress=say)
            results = {
                "rtt_ms": RTT_MS,
                "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
                "measure": asyncio.run(measure(world, args.rounds, args.warmup, started)),
            }
        finally:
            say("tearing the world down")
            world.down()
    results["seconds"] = round(time.monotonic() - started, 1)
    report(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    try:
        main()
    except Failure as exc:
        raise SystemExit(f"bench_consistency: {exc}") from None
