"""Uptime history in SQLite: what the checker believed about each region, and when.

Stored as spans: (region, healthy, start, end). While a region's state holds, the checker
extends the open span every tick; a change closes it and opens the next at the moment of the
change. A gap (no checker running) is simply not covered: uptime is measured over the time
that was observed, never guessed. Periods are UTC days or months.
"""

from __future__ import annotations

import calendar
import json
import sqlite3
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

SCHEMA = """
create table if not exists spans (
    id integer primary key,
    region text not null,
    healthy integer not null,
    start real not null,
    end real not null
);
create index if not exists spans_region_end on spans (region, end);
"""


@dataclass(frozen=True)
class UptimeRow:
    region: str
    period: str  # "2026-11-26" or "2026-11"
    observed_s: float
    up_s: float
    down_s: float
    outages: int

    @property
    def uptime_pct(self) -> float | None:
        return None if self.observed_s <= 0 else 100.0 * self.up_s / self.observed_s

    def as_dict(self) -> dict:
        d = asdict(self)
        pct = self.uptime_pct
        d["uptime_pct"] = None if pct is None else round(pct, 4)
        for k in ("observed_s", "up_s", "down_s"):
            d[k] = round(d[k], 3)
        return d


@dataclass(frozen=True)
class Outage:
    region: str
    start: float
    end: float
    ongoing: bool

    @property
    def duration_s(self) -> float:
        return self.end - self.start

    def as_dict(self) -> dict:
        return {
            "region": self.region,
            "start": _iso(self.start),
            "end": None if self.ongoing else _iso(self.end),
            "duration_s": round(self.duration_s, 3),
        }


class UptimeHistory:
    def __init__(self, path: str | Path, max_gap_s: float = 10.0):
        """`max_gap_s`: two ticks further apart than this leave the time between unobserved."""
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, check_same_thread=False, timeout=10)
        self.db.execute("pragma journal_mode=wal")
        self.db.execute("pragma synchronous=normal")
        self.db.executescript(SCHEMA)
        self.max_gap_s = max_gap_s
        self._open: dict[str, tuple[int, bool, float]] = {}  # region -> (span id, healthy, end)

    def close(self) -> None:
        self.db.close()

    def record(self, states: dict[str, bool], at: float | None = None) -> None:
        """Note each region's state at `at` (a tick, or the moment of a change)."""
        at = time.time() if at is None else at
        with self.db:
            for region, healthy in states.items():
                current = self._open.get(region)
                if current and at < current[2]:
                    continue  # out of order: never shorten what was recorded
                if current and current[1] == healthy and at - current[2] <= self.max_gap_s:
                    self.db.execute("update spans set end = ? where id = ?", (at, current[0]))
                    self._open[region] = (current[0], healthy, at)
                    continue
                if current and at - current[2] <= self.max_gap_s:
                    # A change: the old state lasted until now.
                    self.db.execute("update spans set end = ? where id = ?", (at, current[0]))
                cur = self.db.execute(
                    "insert into spans (region, healthy, start, end) values (?, ?, ?, ?)",
                    (region, int(healthy), at, at),
                )
                self._open[region] = (int(cur.lastrowid or 0), healthy, at)

    # ---- reading --------------------------------------------------------------------------

    def spans(
        self, region: str | None = None, since: float | None = None, until: float | None = None
    ) -> list[tuple[str, bool, float, float]]:
        q = "select region, healthy, start, end from spans where 1=1"
        args: list[object] = []
        if region:
            q += " and region = ?"
            args.append(region)
        if since is not None:
            q += " and end >= ?"
            args.append(since)
        if until is not None:
            q += " and start <= ?"
            args.append(until)
        q += " order by region, start"
        return [(r, bool(h), s, e) for r, h, s, e in self.db.execute(q, args)]

    def uptime(
        self,
        by: str = "day",
        region: str | None = None,
        since: float | None = None,
        until: float | None = None,
    ) -> list[UptimeRow]:
        if by not in ("day", "month"):
            raise ValueError("by must be 'day' or 'month'")
        acc: dict[tuple[str, str], list[float]] = {}
        for r, healthy, start, end in self.spans(region, since, until):
            if since is not None:
                start = max(start, since)
            if until is not None:
                end = min(end, until)
            for period, seconds in _split(start, end, by):
                row = acc.setdefault((r, period), [0.0, 0.0, 0.0])
                row[0 if healthy else 1] += seconds
        for o in self.outages(region, since):
            if (until is None or o.start <= until) and (o.region, _period(o.start, by)) in acc:
                acc[(o.region, _period(o.start, by))][2] += 1
        return [
            UptimeRow(r, p, up + down, up, down, int(outages))
            for (r, p), (up, down, outages) in sorted(acc.items())
        ]

    def outages(self, region: str | None = None, since: float | None = None) -> list[Outage]:
        """Every span a region spent down, merged across a restart of the checker."""
        spans = self.spans(region, since)
        final = {r: (healthy, end) for r, healthy, _start, end in spans}
        out: list[Outage] = []
        previous: tuple[str, bool] | None = None
        for r, healthy, start, end in spans:
            follows_outage = previous == (r, False)
            previous = (r, healthy)
            if healthy:
                continue
            if follows_outage and start - out[-1].end <= self.max_gap_s:
                start = out.pop().start
            ongoing = not final[r][0] and end == final[r][1]
            out.append(Outage(r, start, end, ongoing))
        return out

    def report(
        self, by: str = "day", region: str | None = None, since: float | None = None
    ) -> dict:
        return {
            "by": by,
            "history": self.path,
            "uptime": [row.as_dict() for row in self.uptime(by, region, since)],
            "outages": [o.as_dict() for o in self.outages(region, since)],
        }

    def to_json(self, by: str = "day", region: str | None = None) -> str:
        return json.dumps(self.report(by, region), indent=2)


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _period(t: float, by: str) -> str:
    d = datetime.fromtimestamp(t, UTC)
    return d.strftime("%Y-%m-%d" if by == "day" else "%Y-%m")


def _period_end(t: float, by: str) -> float:
    d = datetime.fromtimestamp(t, UTC)
    if by == "day":
        start = calendar.timegm((d.year, d.month, d.day, 0, 0, 0))
        return start + 86400.0
    year, month = (d.year + 1, 1) if d.month == 12 else (d.year, d.month + 1)
    return float(calendar.timegm((year, month, 1, 0, 0, 0)))


def _split(start: float, end: float, by: str) -> list[tuple[str, float]]:
    """The seconds of [start, end] falling in each UTC period."""
    out: list[tuple[str, float]] = []
    t = start
    while t < end:
        boundary = min(end, _period_end(t, by))
        out.append((_period(t, by), boundary - t))
        t = boundary
    return out
