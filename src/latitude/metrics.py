"""Prometheus series for every Latitude process, after Prometheus conventions (`_total`
counters, `_seconds` histograms, labels `region`, `kind`, `outcome`).

Two sorts of series:

* Events (requests, forwards, read waits, idempotency outcomes) are `prometheus_client` counters
  and histograms. With several uvicorn workers each worker counts its own, and a scrape must see
  them all: when `PROMETHEUS_MULTIPROC_DIR` is set (`latitude serve --workers N` sets it to a
  fresh folder) they live in memory-mapped files there and `exposition()` sums every worker's.
* Facts sampled now (replica lag, region up, link RTT, mirror serial, uptime) are not stored:
  a `Snapshot` holds this process's latest readings and is exported as gauges at scrape time.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client import multiprocess as _multiprocess
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# `_created` series double every counter's output and no dashboard of ours reads them.
disable_created_metrics()
CONTENT_TYPE = CONTENT_TYPE_LATEST

# Forwarded writes cost one ocean round trip (20-350 ms); local reads a few ms: buckets for both.
BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.125, 0.15, 0.175, 0.2,
    0.25, 0.3, 0.35, 0.4, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0,
)  # fmt: skip

# The registry the event series are made in; a scrape in multiprocess mode uses a fresh one.
REGISTRY = CollectorRegistry(auto_describe=True)

requests_total = Counter(
    "latitude_requests_total",
    "HTTP requests answered, by route kind (local_read, read_forwarded, forward, primary, "
    "verified, latitude, mirror) and status code.",
    ["region", "kind", "code"],
    registry=REGISTRY,
)
request_duration = Histogram(
    "latitude_request_duration_seconds",
    "Time from a request's arrival to its response's first byte, by route kind.",
    ["region", "kind"],
    buckets=BUCKETS,
    registry=REGISTRY,
)
forwarded_total = Counter(
    "latitude_forwarded_requests_total",
    "Requests a replica region carried to the primary, by outcome (forwarded, fallback, "
    "read_only, deadline, bad_signature).",
    ["region", "outcome"],
    registry=REGISTRY,
)
forward_duration = Histogram(
    "latitude_forward_duration_seconds",
    "Time a forwarded request took, from arrival to the relayed answer (one ocean round trip "
    "when pooled).",
    ["region"],
    buckets=BUCKETS,
    registry=REGISTRY,
)
read_wait = Histogram(
    "latitude_read_wait_seconds",
    "Time a read waited for the local replica to replay the reader's last write.",
    ["region"],
    buckets=BUCKETS,
    registry=REGISTRY,
)
idempotency_total = Counter(
    "latitude_idempotency_outcomes_total",
    "Forwarded requests at the primary, by idempotency outcome (new: run now; replay: the "
    "stored answer; in_progress, mismatch, rejected: refused).",
    ["region", "outcome"],
    registry=REGISTRY,
)


@dataclass
class Snapshot:
    """This process's latest readings of facts that are sampled, not counted."""

    region: str
    role: str
    started_at: float = field(default_factory=time.time)
    region_up: dict[str, bool] = field(default_factory=dict)
    link_rtt_s: dict[str, float] = field(default_factory=dict)
    replica_lag_s: dict[str, float] = field(default_factory=dict)
    replica_lag_bytes: dict[str, float] = field(default_factory=dict)
    mirror_serial: dict[str, float] = field(default_factory=dict)
    mirror_lag_s: dict[str, float] = field(default_factory=dict)

    def collect(self) -> Iterable[GaugeMetricFamily]:
        def family(name: str, doc: str, values: dict[str, float]) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=["region"])
            for key, value in values.items():
                g.add_metric([key], float(value))
            return g

        up = GaugeMetricFamily(
            "latitude_region_up", "1 if the region's gateway answered its last health check.",
            labels=["region"],
        )  # fmt: skip
        for name, ok in self.region_up.items():
            up.add_metric([name], 1.0 if ok else 0.0)
        yield up
        rtt = GaugeMetricFamily(
            "latitude_link_rtt_seconds",
            "Round trip of the last health check from this region to each region.",
            labels=["region", "peer"],
        )
        for peer, s in self.link_rtt_s.items():
            rtt.add_metric([self.region, peer], s)
        yield rtt
        yield family(
            "latitude_replica_lag_seconds",
            "How far the replica's replay is behind the primary (0 when it has replayed all "
            "it received).",
            self.replica_lag_s,
        )
        yield family(
            "latitude_replica_lag_bytes",
            "WAL bytes the replica has not yet replayed.",
            self.replica_lag_bytes,
        )
        yield family(
            "latitude_mirror_serial", "The change serial the region's mirror holds.", self.mirror_serial
        )  # fmt: skip
        yield family(
            "latitude_mirror_lag_seconds",
            "Seconds since the region's mirror was last caught up with the primary.",
            self.mirror_lag_s,
        )
        start = GaugeMetricFamily(
            "latitude_start_time_seconds",
            "When this process started (Unix time); uptime is now minus this.",
            labels=["region", "role"],
        )
        start.add_metric([self.region, self.role], self.started_at)
        yield start


def multiprocess() -> bool:
    return bool(os.environ.get(MULTIPROC_ENV))


def event_registry() -> CollectorRegistry:
    """The event series as a scrape must see them: every worker's, summed, in multiprocess mode."""
    if not multiprocess():
        return REGISTRY
    registry = CollectorRegistry()
    _multiprocess.MultiProcessCollector(registry)
    return registry


def exposition(snapshot: Snapshot | None = None) -> bytes:
    """The text a `/_latitude/metrics` scrape answers with."""
    return generate_latest(_Union(snapshot))  # type: ignore[arg-type]


class _Union:
    """The event series and the snapshot's, as one thing to collect."""

    def __init__(self, snapshot: Snapshot | None):
        self.snapshot = snapshot

    def collect(self):
        yield from event_registry().collect()
        if self.snapshot is not None:
            yield from self.snapshot.collect()


def mark_process_dead(pid: int) -> None:
    if multiprocess():
        _multiprocess.mark_process_dead(pid)


# ---- reading the series back (for the dashboard) -------------------------------------------


def collect() -> list:
    """Every event series once (a multiprocess collection reads every worker's file)."""
    return list(event_registry().collect())


def totals(name: str, by: str, collected: list | None = None) -> dict[str, float]:
    """Sum of counter `name` (without `_total`) per value of label `by`, all workers included."""
    out: dict[str, float] = {}
    for metric in collected if collected is not None else collect():
        if metric.name != name:
            continue
        for s in metric.samples:
            if s.name.endswith("_total"):
                key = s.labels.get(by, "")
                out[key] = out.get(key, 0.0) + s.value
    return out


def quantiles(
    name: str, by: str, qs: tuple[float, ...] = (0.5, 0.99), collected: list | None = None
) -> dict[str, dict]:
    """Quantiles of histogram `name` per value of label `by`, estimated from its buckets as
    Prometheus' `histogram_quantile` does (linear within the bucket)."""
    buckets: dict[str, dict[float, float]] = {}
    for metric in collected if collected is not None else collect():
        if metric.name != name:
            continue
        for s in metric.samples:
            if s.name.endswith("_bucket"):
                key = s.labels.get(by, "")
                le = float(s.labels["le"])
                per = buckets.setdefault(key, {})
                per[le] = per.get(le, 0.0) + s.value
    out = {}
    for key, per in buckets.items():
        bounds = sorted(per.items())
        count = bounds[-1][1] if bounds else 0.0
        if not count:
            continue
        out[key] = {"count": int(count), **{f"p{round(q * 100)}": _quantile(q, bounds) for q in qs}}
    return out


def _quantile(q: float, bounds: list[tuple[float, float]]) -> float | None:
    total = bounds[-1][1]
    rank = q * total
    lower_le, lower_count = 0.0, 0.0
    for le, cumulative in bounds:
        if cumulative >= rank:
            if math.isinf(le):
                return lower_le  # beyond the last finite bucket: its bound is all we know
            span = cumulative - lower_count
            frac = (rank - lower_count) / span if span else 1.0
            return lower_le + (le - lower_le) * frac
        lower_le, lower_count = le, cumulative
    return lower_le


# ---- an aiohttp server's series (`latitude mirror serve`) ---------------------------------


def aiohttp_routes(app, server) -> None:
    """Count an aiohttp app's requests (kind `mirror`) and serve `/_latitude/metrics` on it, with
    the mirror's serial and lag read from `server.health_report()` at scrape time."""
    from aiohttp import web

    snapshot = Snapshot(server.region, "primary" if server.is_primary else "mirror")

    @web.middleware
    async def count(request, handler):
        started = time.perf_counter()
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as exc:
            status = exc.status
            raise
        finally:
            if request.path != METRICS_PATH:
                requests_total.labels(server.region, "mirror", str(status)).inc()
                request_duration.labels(server.region, "mirror").observe(
                    time.perf_counter() - started
                )

    async def scrape(request):
        report = server.health_report()
        snapshot.mirror_serial[server.region] = float(report.get("serial") or 0)
        snapshot.mirror_lag_s[server.region] = float(report.get("behind_seconds") or 0)
        snapshot.region_up[server.region] = bool(report.get("healthy"))
        return web.Response(body=exposition(snapshot), headers={"Content-Type": CONTENT_TYPE})

    app.middlewares.append(count)
    app.router.add_get(METRICS_PATH, scrape)


METRICS_PATH = "/_latitude/metrics"
