"""The link-fault writer: careful clients writing through a replica region while the link to the
primary is reset, cut and healed at random and the primary's app is killed.

Each client signs in, then creates events one after another, and after each acknowledged write
reads it back through the same region with its cookies. It is careful the way a client should
be: it retries a 503 / 504 with the `Idempotency-Key` the answer gave it (and resubmits afresh
after a 503 that says nothing was changed, as that answer invites). At the end every title is
counted in the primary database:

* lost - acknowledged (201) but not in the database;
* doubled - in the database more than once;
* stale - a read-back of an acknowledged write that said 404 without saying it was stale
  (`Latitude-Stale`); reads marked stale are counted apart and read again until current;
* keyless - a 503 / 504 answer to a write without an `Idempotency-Key`;
* 5xx by kind - every 5xx answer by status (only 503 and 504 are allowed);
* unfinished - writes with no final answer within `give_up_s` (a key blocked, say);
* signed_out - 401s to a signed-in client (it signs in again and resubmits: a 401 ran nothing).

Used by the fault suite (tests/test_faults.py, a short run) and benchmarks/bench_faults.py.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp
import psycopg

from latitude.lab.world import LabWorld

STALE_HEADER = "Latitude-Stale"
SIGNED_OUT = {"signed_out": True}  # a 401: the write did not run; sign in again and resubmit


@dataclass
class FaultTally:
    acked: int = 0
    lost: int = 0
    doubled: int = 0
    stale: int = 0
    stale_marked: int = 0
    keyless: int = 0
    unfinished: int = 0
    no_answer: int = 0
    retries: int = 0
    statuses: Counter = field(default_factory=Counter)
    faults: Counter = field(default_factory=Counter)
    task_destroyed_logged: int = 0
    seconds: float = 0.0
    examples: list = field(default_factory=list)
    doubled_titles: list = field(default_factory=list)
    history: dict = field(default_factory=dict)
    signed_out: int = 0

    @property
    def five_xx(self) -> dict[int, int]:
        return {s: n for s, n in sorted(self.statuses.items()) if s >= 500}

    @property
    def bad_5xx(self) -> int:
        return sum(n for s, n in self.five_xx.items() if s not in (503, 504))

    def ok(self) -> bool:
        return not (
            self.lost
            or self.doubled
            or self.stale
            or self.keyless
            or self.unfinished
            or self.bad_5xx
            or self.no_answer
        )

    def as_dict(self) -> dict:
        return {
            "acked": self.acked,
            "lost": self.lost,
            "doubled": self.doubled,
            "stale": self.stale,
            "stale_marked": self.stale_marked,
            "keyless_503_504": self.keyless,
            "unfinished": self.unfinished,
            "no_answer": self.no_answer,
            "retries": self.retries,
            "5xx_by_kind": {str(k): v for k, v in self.five_xx.items()},
            "bad_5xx": self.bad_5xx,
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "faults": dict(self.faults),
            "task_destroyed_logged": self.task_destroyed_logged,
            "seconds": round(self.seconds, 1),
            "signed_out": self.signed_out,
            "doubled_titles": self.doubled_titles[:10],
            "examples": self.examples[:10],
        }


class _Client:
    def __init__(self, tally: FaultTally, base_url: str, give_up_s: float):
        self.tally = tally
        self.give_up_s = give_up_s
        self.http = aiohttp.ClientSession(base_url, cookie_jar=aiohttp.CookieJar(unsafe=True))

    async def close(self) -> None:
        await self.http.close()

    async def _answer(self, method: str, path: str, **kw) -> tuple[int, dict, dict] | None:
        try:
            async with self.http.request(
                method, path, timeout=aiohttp.ClientTimeout(total=30), **kw
            ) as r:
                try:
                    body = await r.json(content_type=None)
                except ValueError:
                    body = {"text": (await r.text())[:200]}
                self.tally.statuses[r.status] += 1
                return r.status, r.headers.copy(), body if isinstance(body, dict) else {}
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.tally.no_answer += 1
            self.tally.examples.append(f"{method} {path}: no answer ({exc!r})")
            return None

    async def write(self, path: str, payload: dict) -> dict | None:
        """POST until a final answer: the body of a 2xx, or None (given up / refused)."""
        key: str | None = None
        started = time.monotonic()
        while time.monotonic() - started < self.give_up_s:
            headers = {"Accept": "application/json"}
            if key:
                headers["Idempotency-Key"] = key
            answer = await self._answer("POST", path, json=payload, headers=headers)
            if answer is None:
                return None  # no key to retry with: a careful client cannot resubmit blindly
            status, got, body = answer
            self.tally.history.setdefault(payload.get("title") or path, []).append(
                (round(time.monotonic() - started, 2), status, key, got.get("Idempotency-Key"))
            )
            if 200 <= status < 300:
                return body
            if status in (503, 504):
                self.tally.retries += 1
                given = got.get("Idempotency-Key")
                if not given:
                    self.tally.keyless += 1
                    self.tally.examples.append(f"{status} without a key: {body}")
                    return None
                # "Nothing was changed": take it at its word and submit afresh.
                key = None if (status == 503 and body.get("read_only")) else given
                await asyncio.sleep(min(1.0, float(got.get("Retry-After") or 1)) * 0.5)
                continue
            if status == 401:
                self.tally.signed_out += 1
                return SIGNED_OUT
            self.tally.examples.append(f"POST {path}: {status} {body}")
            return None
        self.tally.unfinished += 1
        self.tally.examples.append(f"POST {path}: no final answer in {self.give_up_s:g} s")
        return None

    async def read_back(self, event_id: int, title: str) -> None:
        started = time.monotonic()
        while time.monotonic() - started < self.give_up_s:
            answer = await self._answer("GET", f"/events/{event_id}")
            if answer is None:
                return
            status, got, body = answer
            marked = got.get(STALE_HEADER) is not None
            if status == 200 and body.get("title") == title:
                return
            if status in (200, 404) and not marked:
                self.tally.stale += 1
                self.tally.examples.append(f"stale read-back of {event_id}: {status} {body}")
                return
            if marked:
                self.tally.stale_marked += 1
            await asyncio.sleep(0.3)
        self.tally.examples.append(f"read-back of {event_id}: never current")
        self.tally.unfinished += 1


async def run_fault_writer(
    world: LabWorld,
    *,
    writes: int,
    users: int = 8,
    primary: str = "us-west",
    region: str = "eu-west",
    kills: int = 2,
    faults: bool = True,
    cut_s: tuple[float, float] = (0.5, 4.0),
    seed: int | None = None,
    give_up_s: float = 90.0,
    progress: Callable[[str], None] | None = None,
) -> FaultTally:
    """`writes` acknowledged-or-given-up writes by `users` careful clients next to `region`,
    while (with `faults`) the link to `primary` is reset / cut / healed at random and the
    primary's app is killed `kills` times. The link is healed and the app revived at the end."""
    rng = random.Random(seed)
    tally = FaultTally()
    run = uuid.uuid4().hex[:8]
    base = f"http://127.0.0.1:{world.state().regions[region].app_port}"
    log_path = world.service_log(region, "app")
    log_start = log_path.stat().st_size if log_path.exists() else 0
    titles: list[str] = []
    acked: list[str] = []
    next_write = iter(range(writes))
    done = asyncio.Event()
    started = time.monotonic()

    async def user(i: int) -> None:
        client = _Client(tally, base, give_up_s)
        try:
            name = f"faults-{run}-{i}"
            if await client.write("/login", {"name": name}) is None:
                return
            for n in next_write:
                title = f"faults {run} {i}.{n}"
                titles.append(title)
                body = await client.write("/events", {"title": title})
                for _ in range(3):
                    if body is not SIGNED_OUT:
                        break
                    # Signed out under us (a refusal read as "session deleted"): the write was
                    # refused before it ran, so signing in again and resubmitting is safe.
                    if await client.write("/login", {"name": name}) in (None, SIGNED_OUT):
                        break
                    body = await client.write("/events", {"title": title})
                if body is None or body is SIGNED_OUT:
                    continue
                tally.acked += 1
                acked.append(title)
                await client.read_back(body["id"], title)
        finally:
            await client.close()

    async def link(action: str) -> None:
        await asyncio.to_thread(world.link, action, primary, region)

    async def disturb() -> None:
        kill_at = [writes * (k + 1) // (kills + 1) for k in range(kills)] if faults else []
        while not done.is_set():
            if kill_at and len(titles) >= kill_at[0]:
                kill_at.pop(0)
                tally.faults["app_killed"] += 1
                await asyncio.to_thread(world.kill, primary, "app")
                await _sleep(done, rng.uniform(1.5, 3.0))
                await asyncio.to_thread(world.revive, primary, "app")
                continue
            if not faults:
                await _sleep(done, 0.2)
                continue
            action = rng.choices(["reset", "cut", "calm"], weights=[3, 3, 4])[0]
            tally.faults[action] += 1
            if action == "reset":
                await link("reset")
                await _sleep(done, rng.uniform(0.2, 1.0))
            elif action == "cut":
                await link("cut")
                try:
                    await _sleep(done, rng.uniform(*cut_s))
                finally:
                    await link("heal")
            else:
                await _sleep(done, rng.uniform(0.5, 2.0))

    async def report() -> None:
        while not done.is_set():
            await _sleep(done, 5.0)
            if progress:
                progress(
                    f"{len(titles)}/{writes} writes, {tally.acked} acked, "
                    f"faults {dict(tally.faults)}, 5xx {tally.five_xx}"
                )

    disturber = asyncio.create_task(disturb())
    reporter = asyncio.create_task(report())
    try:
        await asyncio.gather(*(user(i) for i in range(users)))
    finally:
        done.set()
        await asyncio.gather(disturber, reporter, return_exceptions=True)
        await asyncio.to_thread(world.link, "heal", primary, region)
        await asyncio.to_thread(world.revive, primary, "app")
    tally.seconds = time.monotonic() - started
    # Writes still settling in the background (a claim or a run held by the last cut) land
    # within the fallback's bound; count once they have had the chance.
    await asyncio.sleep(2.0)
    counts = _count_titles(world, primary, run)
    for title in titles:
        if counts.get(title, 0) > 1:
            tally.doubled += 1
            tally.doubled_titles.append(f"{title!r} x {counts[title]}: {tally.history.get(title)}")
    for title in acked:
        if counts.get(title, 0) == 0:
            tally.lost += 1
            tally.examples.append(f"{title!r} was acknowledged but is not in the database")
    with open(log_path, "rb") as f:
        f.seek(log_start)
        tally.task_destroyed_logged = f.read().count(b"Task was destroyed but it is pending")
    return tally


def _count_titles(world: LabWorld, primary: str, run: str) -> dict[str, int]:
    dsn = next(r["database_url"] for r in world.status()["regions"] if r["name"] == primary)
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "select title, count(*) from events where title like %s group by title",
            (f"faults {run} %",),
        ).fetchall()
    return dict(rows)


async def _sleep(done: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(done.wait(), seconds)
    except TimeoutError:
        pass
