"""`Observe`: the pure-ASGI middleware in front of the region gateway that counts and shows.

It serves `/_latitude/metrics` (Prometheus text), `/_latitude/dashboard` (a live page),
`/_latitude/dashboard.json` (this region's summary) and `/_latitude/world.json` (every region's,
fetched over the links as this region reaches them). Every other request passes through to the
gateway with a note in its scope (`NOTE`), which the gateway fills in (what it decided, how a
forward ended, how long a read waited) and the app may read (when the request arrived, whether
the primary answers, how far the replica is behind). The response gets a `Server-Timing` header;
a browser's write gets a short `latitude_last_write` cookie, so the next page can say where the
write went and what it cost.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from importlib import resources

import aiohttp

from latitude import metrics
from latitude.forwarding import counting_connections, ssl_context
from latitude.gateway.classify import SAFE_METHODS
from latitude.gateway.config import GatewayConfig

log = logging.getLogger("latitude.observe")

NOTE = "latitude.note"
# In the note once the answer's first byte has passed (its time): the gateway reads it to know
# whether it may still answer a request itself.
TTFB = "ttfb_s"
LAST_WRITE_COOKIE = "latitude_last_write"
SAMPLE_EVERY_S = 1.0
PROBE_TIMEOUT_S = 1.5
WORLD_EVERY_S = 0.5
ENDPOINTS = (
    "/_latitude/metrics",
    "/_latitude/dashboard",
    "/_latitude/dashboard.json",
    "/_latitude/world.json",
)
# The route kinds a request is counted under, from the gateway's decision.
KINDS = {
    "local": "local_read",
    "forward": "forward",
    "primary": "primary",
    "verify": "verified",
    "latitude": "latitude",
}


def note(scope, **fields) -> None:
    """Record facts about this request for `Observe` (a no-op when nothing observes)."""
    box = scope.get(NOTE)
    if box is not None:
        box.update(fields)


def watch_answer(scope, send):
    """`(box, send)`: `TTFB in box` once the request's answer has started, through `send`.
    `Observe` in front notes it as the answer passes; a gateway without it gets a `send` that
    notes it."""
    box = scope.get(NOTE)
    if box is not None:
        return box, send
    box = {}

    async def watched(message: dict) -> None:
        if message["type"] == "http.response.start":
            box[TTFB] = 0.0
        await send(message)

    return box, watched


class Observe:
    def __init__(self, app, config: GatewayConfig):
        self.app = app
        self._config = config
        self.region = config.region.name
        self.snapshot = metrics.Snapshot(self.region, config.region.role)
        self._sampler: asyncio.Task | None = None
        self._http: aiohttp.ClientSession | None = None
        self._db = None
        # Whether the primary database accepts connections (for writes handled here when the
        # primary's gateway does not answer); None where there is no such fallback.
        self._primary_db_up: bool | None = None
        self._world_lock = asyncio.Lock()
        self._world_at = float("-inf")
        self._world: dict = {}
        self._children: dict = {}  # (metric, labels) -> its labelled child, see `_series`

    @property
    def config(self) -> GatewayConfig:
        """The gateway's live config: a promotion swaps it (a new primary, this region's role),
        and the dashboard must show the world as it is now, not as it was at start-up."""
        live = getattr(self.app, "config", None)
        return live if isinstance(live, GatewayConfig) else self._config

    # ---- ASGI ----------------------------------------------------------------------------

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(scope, receive, send)
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self._sampler is None:
            self._sampler = asyncio.create_task(self._sample_forever())
        path = scope["path"]
        if path in ENDPOINTS:
            await self._endpoint(path, send)
            return
        await self._observed(scope, receive, send)

    async def _observed(self, scope, receive, send) -> None:
        started = time.perf_counter()
        primary = self.config.primary.name
        box: dict = {
            "started": started,
            "region": self.region,
            "primary": primary,
            "primary_up": self.snapshot.region_up.get(primary, True),
            "primary_db_up": self._primary_db_up,
            "replica_lag_s": self.snapshot.replica_lag_s.get(self.region),
        }
        scope = {**scope, NOTE: box}
        status = 500
        html = b"text/html" in _header(scope, b"accept")

        async def timed_send(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                elapsed = time.perf_counter() - started
                box[TTFB] = elapsed
                headers = list(message.get("headers", []))
                headers.append((b"server-timing", _server_timing(box, elapsed).encode()))
                # At the primary a forwarded write's cookie is left to the region it came from.
                if html and scope["method"] not in SAFE_METHODS and box.get("decision") != "verify":
                    cookie = _last_write_cookie(box, elapsed, primary_ms(headers, primary))
                    headers.append((b"set-cookie", cookie.encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, timed_send)
        finally:
            self._record(box, status, time.perf_counter() - started)

    def _series(self, metric, *labels: str):
        """`metric.labels(region, *labels)`, kept: `labels` validates and locks on every call,
        which costs a local read more than the increment itself."""
        key = (metric, labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(self.region, *labels)
        return child

    def _record(self, box: dict, status: int, total_s: float) -> None:
        series = self._series
        kind = box.get("kind") or KINDS.get(box.get("decision", ""), "other")
        elapsed = box.get(TTFB, total_s)
        series(metrics.requests_total, kind, str(status)).inc()
        series(metrics.request_duration, kind).observe(elapsed)
        outcome = box.get("outcome")
        if outcome:
            series(metrics.forwarded_total, outcome).inc()
            if outcome == "forwarded":
                series(metrics.forward_duration).observe(elapsed)
        if box.get("read_wait_s"):
            series(metrics.read_wait).observe(box["read_wait_s"])
        if box.get("idempotency"):
            series(metrics.idempotency_total, box["idempotency"]).inc()

    async def _lifespan(self, scope, receive, send) -> None:
        async def wrapped_send(message) -> None:
            if message["type"] == "lifespan.shutdown.complete":
                await self.close()
            await send(message)

        await self.app(scope, receive, wrapped_send)

    async def close(self) -> None:
        if self._sampler is not None:
            self._sampler.cancel()
            with contextlib.suppress(BaseException):
                await self._sampler
            self._sampler = None
        if self._http is not None:
            await self._http.close()
            self._http = None
        if self._db is not None:
            with contextlib.suppress(Exception):
                await self._db.close()
            self._db = None

    # ---- own endpoints -------------------------------------------------------------------

    async def _endpoint(self, path: str, send) -> None:
        if path == "/_latitude/metrics":
            await _respond(send, 200, metrics.CONTENT_TYPE, metrics.exposition(self.snapshot))
        elif path == "/_latitude/dashboard":
            page = resources.files("latitude").joinpath("data/dashboard.html").read_bytes()
            await _respond(send, 200, "text/html; charset=utf-8", page)
        elif path == "/_latitude/dashboard.json":
            await _respond(send, 200, "application/json", json.dumps(self.summary()).encode())
        else:
            world = await self.world()
            await _respond(send, 200, "application/json", json.dumps(world).encode())

    def summary(self) -> dict:
        """This region, as the dashboard shows it (every worker's counts included)."""
        snap = self.snapshot
        seen = metrics.collect()
        forwarded = metrics.totals("latitude_forwarded_requests", "outcome", seen)
        requests = metrics.totals("latitude_requests", "kind", seen)
        waits = metrics.quantiles("latitude_read_wait_seconds", "region", collected=seen)
        latency = metrics.quantiles("latitude_request_duration_seconds", "kind", collected=seen)
        return {
            "region": self.region,
            "role": self.config.region.role,
            "primary": self.config.primary.name,
            "uptime_s": round(time.time() - snap.started_at, 1),
            "now": time.time(),
            "links_rtt_ms": {k: round(v * 1000, 1) for k, v in snap.link_rtt_s.items()},
            "regions_up": dict(snap.region_up),
            "replica_lag_s": snap.replica_lag_s.get(self.region),
            "replica_lag_bytes": snap.replica_lag_bytes.get(self.region),
            "replicas": {
                name: {"lag_s": lag, "lag_bytes": snap.replica_lag_bytes.get(name)}
                for name, lag in snap.replica_lag_s.items()
            },
            "forwarded": forwarded,
            "requests": requests,
            "read_waits": waits.get(self.region, {"count": 0}),
            "latency_ms": {
                kind: {
                    "count": q["count"],
                    "p50": _ms(q.get("p50")),
                    "p99": _ms(q.get("p99")),
                }
                for kind, q in latency.items()
            },
            "mirror": {
                "serial": snap.mirror_serial.get(self.region),
                "lag_s": snap.mirror_lag_s.get(self.region),
            }
            if self.region in snap.mirror_serial
            else None,
        }

    async def world(self) -> dict:
        """Every region's summary, fetched concurrently; a region that does not answer is down.
        Pages polling at once share one round of fetches (at most one every WORLD_EVERY_S)."""
        async with self._world_lock:
            if time.monotonic() - self._world_at > WORLD_EVERY_S:
                self._world = await self._fetch_world()
                self._world_at = time.monotonic()
            return self._world

    async def _fetch_world(self) -> dict:
        http = self._client()

        async def one(region) -> dict:
            if region.name == self.region:
                return {**self.summary(), "up": True}
            url = (region.internal_url or region.public_url or "").rstrip("/")
            started = time.perf_counter()
            try:
                async with http.get(f"{url}/_latitude/dashboard.json") as r:
                    r.raise_for_status()
                    data = await r.json()
                data["up"] = True
            except Exception as exc:
                data = {"region": region.name, "role": region.role, "up": False}
                data["error"] = f"{type(exc).__name__}: {exc}"[:200]
            data["fetched_in_ms"] = round((time.perf_counter() - started) * 1000, 1)
            return data

        regions = await asyncio.gather(*(one(r) for r in self.config.topology.regions))
        return {"seen_from": self.region, "regions": regions}

    # ---- sampling ------------------------------------------------------------------------

    def _client(self) -> aiohttp.ClientSession:
        if self._http is None or self._http.closed:
            self._http = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=PROBE_TIMEOUT_S),
                # The forwarding's own trust (ca_file): a probe that failed TLS would open a
                # new connection every second.
                connector=aiohttp.TCPConnector(
                    limit=16, keepalive_timeout=60, ssl=ssl_context(self.config.ca_file)
                ),
                trace_configs=[counting_connections(self._count_opened)],
            )
        return self._http

    def _count_opened(self) -> None:
        counters = getattr(self.app, "counters", None)  # published with the gateway's figures
        if counters is not None:
            counters["sampler_connections"] += 1

    async def _sample_forever(self) -> None:
        while True:
            try:
                await asyncio.gather(
                    self._probe_regions(),
                    self._sample_lag(),
                    self._sample_mirror(),
                    self._probe_primary_db(),
                )
            except Exception as exc:  # figures are best effort; requests never wait on them
                log.debug("sampling failed: %r", exc)
            await asyncio.sleep(SAMPLE_EVERY_S)

    async def _probe_regions(self) -> None:
        http = self._client()

        async def probe(region) -> None:
            if region.name == self.region:
                self.snapshot.region_up[region.name] = True
                self.snapshot.link_rtt_s[region.name] = 0.0
                return
            url = (region.internal_url or region.public_url or "").rstrip("/")
            started = time.perf_counter()
            try:
                async with http.get(f"{url}/_latitude/health") as r:
                    await r.read()
                    ok = r.status == 200
            except Exception:
                ok = False
            self.snapshot.region_up[region.name] = ok
            if ok:
                self.snapshot.link_rtt_s[region.name] = time.perf_counter() - started

        await asyncio.gather(*(probe(r) for r in self.config.topology.regions))

    async def _probe_primary_db(self) -> None:
        url = self.config.region.primary_database_url
        if not url or self.config.is_primary:
            return
        from urllib.parse import urlsplit

        parts = urlsplit(url)
        try:
            _, writer = await asyncio.wait_for(
                asyncio.open_connection(parts.hostname or "127.0.0.1", parts.port or 5432),
                PROBE_TIMEOUT_S,
            )
            writer.close()
            self._primary_db_up = True
        except (OSError, TimeoutError):
            self._primary_db_up = False

    async def _sample_lag(self) -> None:
        url = self.config.region.database_url
        if not url:
            return
        import psycopg

        if self._db is None or self._db.closed:
            self._db = await asyncio.wait_for(
                psycopg.AsyncConnection.connect(url, autocommit=True, connect_timeout=2), 3
            )
        snap = self.snapshot
        try:
            if self.config.is_primary:
                rows = await asyncio.wait_for(self._primary_view(), 2)
                for name, lag_bytes, lag_s in rows:
                    snap.replica_lag_bytes[name] = float(lag_bytes or 0)
                    snap.replica_lag_s[name] = float(lag_s or 0)
            else:
                lag_bytes, lag_s = await asyncio.wait_for(self._replica_view(), 2)
                snap.replica_lag_bytes[self.region] = float(lag_bytes or 0)
                snap.replica_lag_s[self.region] = float(lag_s or 0)
        except Exception:
            with contextlib.suppress(Exception):
                await self._db.close()
            self._db = None
            raise

    async def _primary_view(self):
        cur = await self._db.execute(
            "select application_name,"
            " pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn)::bigint,"
            " extract(epoch from replay_lag) from pg_stat_replication"
        )
        return await cur.fetchall()

    async def _replica_view(self):
        # Replay is caught up when it has replayed all it received; otherwise the lag is the
        # age of the last transaction it replayed.
        cur = await self._db.execute(
            "select pg_wal_lsn_diff(pg_last_wal_receive_lsn(), pg_last_wal_replay_lsn())::bigint,"
            " case when pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn() then 0"
            " else extract(epoch from now() - pg_last_xact_replay_timestamp()) end"
        )
        return await cur.fetchone()

    async def _sample_mirror(self) -> None:
        url = self.config.region.mirror_url
        if not url:
            return
        try:
            async with self._client().get(f"{url.rstrip('/')}/_latitude/mirror/health") as r:
                report = await r.json()
        except Exception:
            self.snapshot.mirror_serial.pop(self.region, None)
            return
        self.snapshot.mirror_serial[self.region] = float(report.get("serial") or 0)
        self.snapshot.mirror_lag_s[self.region] = float(report.get("behind_seconds") or 0)


def _header(scope, name: bytes) -> bytes:
    for k, v in scope.get("headers", []):
        if k.lower() == name:
            return v
    return b""


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def _where(box: dict) -> str:
    outcome = box.get("outcome")
    if outcome == "forwarded":
        return f"forwarded to {box['primary']}"
    if outcome:
        return f"{outcome.replace('_', ' ')} in {box['region']}"
    kind = box.get("kind") or KINDS.get(box.get("decision", ""), "")
    if kind == "local_read":
        return f"read in {box['region']} from its replica"
    return f"{kind.replace('_', ' ') or 'served'} in {box['region']}"


def _server_timing(box: dict, elapsed_s: float) -> str:
    # Named after the region, so a forwarded answer carries one entry per hop.
    desc = _where(box).replace('"', "'")
    return f'{box["region"]};dur={elapsed_s * 1000:.1f};desc="{desc}"'


def primary_ms(headers, primary: str, missing: float | None = 0.0) -> float | None:
    """The primary's own time, from the `Server-Timing` entry its gateway put on the answer
    (`missing` if there is none: a primary gateway without `Observe` sends none)."""
    for k, v in headers:
        if k.lower() != b"server-timing":
            continue
        for entry in v.decode("latin-1").split(","):
            name, _, params = entry.strip().partition(";")
            if name == primary:
                for param in params.split(";"):
                    key, _, value = param.strip().partition("=")
                    if key == "dur":
                        with contextlib.suppress(ValueError):
                            return float(value)
    return missing


def _last_write_cookie(box: dict, elapsed_s: float, primary_ms: float = 0.0) -> str:
    """`region:ms:how:primary_ms`, read by the next page: where this browser's write ran, what
    it cost in all, and how much of that was the primary's own work."""
    outcome = box.get("outcome") or KINDS.get(box.get("decision", ""), "here")
    ran_in = box["primary"] if outcome in ("forwarded", "primary", "verified") else box["region"]
    value = f"{ran_in}:{elapsed_s * 1000:.1f}:{outcome}:{primary_ms:.1f}"
    return f"{LAST_WRITE_COOKIE}={value}; Max-Age=60; Path=/; HttpOnly; SameSite=Lax"


async def _respond(send, status: int, content_type: str, body: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", content_type.encode()),
                (b"content-length", str(len(body)).encode()),
                (b"cache-control", b"no-store"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
