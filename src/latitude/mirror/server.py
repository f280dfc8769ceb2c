"""`latitude mirror serve`: a node's HTTP front.

* Mirrored paths are answered from the local copy, with a strong `ETag` (the file's sha256, the
  same on every node), `Last-Modified` (the origin's), `304` to a matching conditional request,
  and the precompressed `<file>.gz` to a client that accepts gzip.
* On a local miss, a mirror asks the primary instead of answering 404 (a client that read an
  index on one node and asks a lagging node for a file it names must get it), checks the bytes
  against the primary's ETag and keeps them, unless the sync daemon has already dealt with that
  change. If the primary cannot be reached the answer is 502, never 404.
* Other paths (the website) are proxied to the primary region's website.
* An index file the node knows to be behind (the primary's head, which the server long-polls
  itself, is past its serial) is asked of the primary like a missing file.
* Every response carries `Latitude-Mirror-Serial`, the serial the node holds, and
  `/_latitude/mirror/health` (also at `/_latitude/health`) reports how far behind the primary's
  real head it is and since when: 503 beyond `max_lag_s`, and at once when no sync daemon holds
  the root's sync lock, so a health checker takes a stale node out.
* On the primary the same server also answers the change feed (see `feed`).
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import hashlib
import logging
import os
import re
import stat
import time
from collections import OrderedDict

import aiohttp
from aiohttp import web

from latitude import signing
from latitude.http_headers import HOP_BY_HOP
from latitude.metrics import aiohttp_routes as metrics_routes
from latitude.mirror.changelog import ChangeLog
from latitude.mirror.feed import (
    FILE_SERIAL_HEADER,
    HEAD,
    HEALTH,
    PREFIX,
    SERIAL_HEADER,
    FeedClient,
    FeedError,
    FeedServer,
)
from latitude.mirror.store import (
    AtomicFile,
    BadPath,
    ContentRoot,
    UnsafePath,
    compressible,
    content_type,
    http_date,
    parse_http_date,
    rel_path,
)
from latitude.mirror.sync import DEFAULT_INDEXES

log = logging.getLogger(__name__)

GENERIC_HEALTH = "/_latitude/health"
REGION_HEADER = "Latitude-Mirror-Region"
SOURCE_HEADER = "Latitude-Mirror-Source"
SMALL_FILE = 256 * 1024  # bodies up to this size are cached in memory with their hash
CACHE_ENTRIES = 20_000
_SHA_RE = re.compile(r'^(W/)?"?([0-9a-f]{64})"?$')


class MirrorServer:
    def __init__(
        self,
        root: str | os.PathLike[str] | ContentRoot,
        *,
        region: str,
        is_primary: bool,
        primary_url: str | None = None,
        website_url: str | None = None,
        keyring: signing.Keyring | None = None,
        paths: tuple[str, ...] = ("/",),
        max_lag_s: float = 60.0,
        poll_timeout_s: float = 25.0,
        retention_s: float | None = None,
        indexes: tuple[str, ...] = DEFAULT_INDEXES,
    ):
        self.root = root if isinstance(root, ContentRoot) else ContentRoot(root)
        self.region = region
        self.is_primary = is_primary
        self.primary_url = primary_url.rstrip("/") if primary_url else None
        self.website_url = website_url.rstrip("/") if website_url else None
        self.keyring = keyring
        self.paths = tuple(paths)
        self.max_lag_s = max_lag_s
        self.poll_timeout_s = poll_timeout_s
        self.retention_s = retention_s
        self.indexes = tuple(indexes)
        # What this server itself knows of the primary's head (see `_watch_head`).
        self._head = 0
        self._head_contact: float | None = None  # last answer, or "parked in a poll" since
        self._head_error: str | None = None
        self._current_at: float | None = None  # last moment known to hold the primary's head
        self.via = f"1.1 latitude-mirror-{region}"
        self._cache: OrderedDict[tuple, tuple[str, bytes | None]] = OrderedDict()
        self._cursor: tuple[int, int] = (-1, 0)
        self._inflight: dict[str, asyncio.Future] = {}
        self.feed: FeedServer | None = None
        self.runner: web.AppRunner | None = None
        self.port: int | None = None

    @classmethod
    def from_config(cls, cfg) -> MirrorServer:
        return cls(
            cfg.root,
            region=cfg.region,
            is_primary=cfg.is_primary,
            primary_url=cfg.primary_url,
            website_url=cfg.website_url,
            keyring=cfg.keyring,
            paths=cfg.paths,
            max_lag_s=cfg.max_lag_s,
            poll_timeout_s=cfg.poll_timeout_s,
            retention_s=cfg.retention_s,
            indexes=cfg.indexes,
        )

    # ---- lifecycle -----------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(client_max_size=16 * 1024 * 1024)
        app.on_startup.append(self._on_startup)
        app.on_shutdown.append(self._on_shutdown)
        app.on_cleanup.append(self._on_cleanup)
        app.on_response_prepare.append(self._stamp)
        app.router.add_get(HEALTH, self.health)
        app.router.add_get(GENERIC_HEALTH, self.health)  # routing's default check_path
        if self.is_primary:
            self.root.ensure()
            self.log = ChangeLog(self.root.state_dir / "changes.sqlite", self.retention_s or 86400)
            self.feed = FeedServer(self.root, self.log, self.keyring, self.poll_timeout_s)
            self.feed.routes(app)
        metrics_routes(app, self)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        self.runner = web.AppRunner(
            self.app(), access_log=None, keepalive_timeout=75, shutdown_timeout=1
        )
        await self.runner.setup()
        site = web.TCPSite(self.runner, host, port, backlog=1024, reuse_address=True)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self.port

    async def close(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    async def _on_startup(self, app: web.Application) -> None:
        self.http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=100, keepalive_timeout=60),
            timeout=aiohttp.ClientTimeout(total=None, connect=10, sock_read=60),
            auto_decompress=False,
        )
        self._tasks: list[asyncio.Task] = []
        if self.feed is not None:
            await self.feed.start()
            self._tasks.append(asyncio.create_task(self._prune_forever()))
        elif self.primary_url is not None:
            self._tasks.append(asyncio.create_task(self._watch_head()))

    async def _on_shutdown(self, app: web.Application) -> None:
        for t in self._tasks:
            t.cancel()
        if self.feed is not None:
            await self.feed.close()  # parked long polls answer now

    async def _on_cleanup(self, app: web.Application) -> None:
        if self.feed is not None:
            self.log.close()
        await self.http.close()

    async def _prune_forever(self) -> None:
        every = max(1.0, min(self.log.retention_s / 10, 60.0))
        while True:
            with contextlib.suppress(Exception):
                self.log.prune()
            await asyncio.sleep(every)

    # ---- every response ------------------------------------------------------------------------

    def serial(self) -> int:
        if self.feed is not None:
            return self.feed.head
        try:
            mtime = os.stat(self.root.cursor_file).st_mtime_ns
        except FileNotFoundError:
            return 0
        if mtime != self._cursor[0]:
            self._cursor = (mtime, self.root.cursor())
        return self._cursor[1]

    async def _stamp(self, request: web.Request, response: web.StreamResponse) -> None:
        response.headers[SERIAL_HEADER] = str(self.serial())
        response.headers[REGION_HEADER] = self.region

    async def health(self, request: web.Request) -> web.Response:
        report = self.health_report()
        return web.json_response(
            report, status=200 if report["healthy"] else 503, headers={"Cache-Control": "no-store"}
        )

    async def _watch_head(self) -> None:
        """Long-poll the primary's head serial, independently of the sync daemon: health and
        the stale-index check compare with the primary's real head, not with what the daemon
        last wrote down (a dead daemon writes nothing)."""
        feed = FeedClient(self.http, self.primary_url, self.keyring)
        failures = 0
        while True:
            after = max(self._head, self.serial())
            self._head_contact = time.time() if self._head_error is None else self._head_contact
            # After a failure ask without waiting: a parked poll answers only when the head
            # moves, and until it answers health would still say "unreachable".
            wait = 0 if self._head_error is not None else self.poll_timeout_s
            try:
                head = await feed.head(after, wait)
            except FeedError as exc:
                if ": HTTP 404:" in str(exc):  # a primary from before /head: the daemon's word
                    log.warning("the primary has no %s; health relies on the sync daemon", HEAD)
                    self._head_contact = None
                    return
                if self._head_error is None:
                    self._observe(time.time())  # current until this very moment, perhaps
                self._head_error = str(exc)
                failures += 1
                await asyncio.sleep(min(0.2 * 2**failures, 2.0))
                continue
            failures, self._head_error = 0, None
            self._head = max(self._head, head)
            self._head_contact = time.time()
            self._observe(self._head_contact)

    def _observe(self, now: float) -> tuple[int, int, bool]:
        """(cursor, primary head, in contact with the primary), updating the last moment the
        node was known to hold the primary's head."""
        st = self.root.status()
        cursor = self.root.cursor()
        self._head = head = max(self._head, int(st.get("head") or 0), cursor)
        fresh = self.poll_timeout_s + 5  # a parked long poll answers within this
        contacts = [self._head_contact if self._head_error is None else None]
        if st.get("waiting_since") and not st.get("error") and self.root.sync_running():
            contacts.append(st["waiting_since"])  # parked in a long poll: it would have heard
        in_contact = any(c is not None and now - c <= fresh for c in contacts)
        if cursor >= head and in_contact:
            self._current_at = now
        if st.get("caught_up_at") and cursor >= head:
            self._current_at = max(self._current_at or 0.0, float(st["caught_up_at"]))
        return cursor, head, in_contact

    def behind(self) -> bool:
        """Whether this mirror knows the primary has changes it has not applied yet."""
        return not self.is_primary and self.serial() < self._head

    def health_report(self) -> dict:
        if self.is_primary:
            return {
                "region": self.region,
                "role": "primary",
                "serial": self.serial(),
                "healthy": True,
            }
        now = time.time()
        st = self.root.status()
        cursor, head, in_contact = self._observe(now)
        sync_running = self.root.sync_running()
        if cursor >= head and in_contact:
            lag_s: float | None = 0.0
            since = None
        else:
            # Behind, or out of touch: lagging since the last moment it was known current.
            since = self._current_at
            # Rounded before the comparison so that the figure reported and the verdict agree
            # (3.0004 s reported as 3.0 beside max_lag_s 3 and a 503 reads as a contradiction).
            lag_s = None if since is None else round(max(0.0, now - since), 3)
        problems = []
        if not sync_running:
            problems.append("the sync daemon is not running (no process holds .latitude/sync.lock)")
        if lag_s is None:
            problems.append("never known to be current with the primary")
        elif lag_s > self.max_lag_s:
            problems.append(f"behind for {lag_s:.1f} s, more than max_lag_s {self.max_lag_s:g}")
        last = self._head_contact if self._head_error is None else None
        last = max(filter(None, [last, st.get("last_contact")]), default=None)
        error = self._head_error or st.get("error")
        return {
            "region": self.region,
            "role": "mirror",
            "serial": cursor,
            "primary_serial": head,
            "behind_serials": max(0, head - cursor),
            "behind_since": None if since is None else round(since, 3),
            "behind_seconds": lag_s,
            "max_lag_s": self.max_lag_s,
            "sync": "running" if sync_running else "not running",
            "primary": "reachable"
            if in_contact and not error
            else ("unreachable" if error else "unknown"),
            "last_contact_s_ago": None if last is None else round(now - last, 3),
            "error": error,
            "problems": problems,
            "healthy": not problems,
        }

    # ---- requests ------------------------------------------------------------------------------

    def mirrored(self, path: str) -> bool:
        return any(path.startswith(p) or path + "/" == p for p in self.paths)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        if path.startswith(PREFIX + "/"):
            raise web.HTTPNotFound(
                text=f"{path}: not served by a {'primary' if self.is_primary else 'mirror'}\n"
            )
        if not self.mirrored(path):
            return await self.proxy(request, self.website_url, "website")
        if request.method not in ("GET", "HEAD"):
            raise web.HTTPMethodNotAllowed(request.method, ["GET", "HEAD"])
        try:
            rel = rel_path(path)
        except BadPath as exc:
            raise web.HTTPNotFound(text=f"{exc}\n") from None
        if self.primary_url is not None and self.is_index(rel) and self.behind():
            # The local index may predate a change the primary has: ask the primary, as for
            # a missing file. Only if it cannot be reached is the local copy the answer.
            response = await self.from_primary(request, rel)
            if response.status != 502:
                return response
        response = await self.local(request, rel)
        if response is not None:
            return response
        if self.is_primary or self.primary_url is None:
            raise web.HTTPNotFound(text=f"{path}: no such file\n")
        return await self.from_primary(request, rel)

    def is_index(self, rel: str) -> bool:
        return any(fnmatch.fnmatchcase(rel, p) for p in self.indexes)

    async def local(self, request: web.Request, rel: str) -> web.StreamResponse | None:
        try:
            st = self.root.stat(rel)
        except UnsafePath as exc:
            raise web.HTTPForbidden(text=f"{exc}\n") from None
        if st is None:
            return None
        if stat.S_ISDIR(st.st_mode):
            raise web.HTTPMovedPermanently(
                request.path + "/" + (f"?{request.query_string}" if request.query_string else "")
            )
        if not stat.S_ISREG(st.st_mode):
            return None
        served = rel
        ctype = content_type(rel)
        headers = {"Content-Type": ctype, "Last-Modified": http_date(st.st_mtime)}
        if compressible(ctype):
            headers["Vary"] = "Accept-Encoding"  # as nginx's gzip_vary: a .gz may come and go
            with contextlib.suppress(BadPath):
                gz = self.root.stat(rel + ".gz")
                if gz is not None and stat.S_ISREG(gz.st_mode):
                    if _accepts_gzip(request) and gz.st_mtime >= st.st_mtime:
                        served, st = rel + ".gz", gz
                        headers["Content-Encoding"] = "gzip"
        try:
            sha, body = await self._entry(served, st)
        except (UnsafePath, FileNotFoundError):  # swapped for a symlink, or deleted, meanwhile
            return None
        headers["ETag"] = f'"{sha}"'
        if self.feed is not None:
            known = self.log.file(served)
            if known:
                headers[FILE_SERIAL_HEADER] = str(known["serial"])
        if _not_modified(request, sha, st.st_mtime):
            return web.Response(
                status=304,
                headers={
                    k: v for k, v in headers.items() if k in ("ETag", "Last-Modified", "Vary")
                },
            )
        if body is not None:
            return web.Response(body=body, headers=headers)
        resp = web.StreamResponse(headers=headers)
        resp.content_length = st.st_size
        await resp.prepare(request)
        if request.method != "HEAD":
            with self.root.open(served) as f:
                while chunk := f.read(1 << 20):
                    await resp.write(chunk)
        await resp.write_eof()
        return resp

    async def _entry(self, rel: str, st: os.stat_result) -> tuple[str, bytes | None]:
        """(sha256, body if small) of a file version, cached by inode, mtime and size."""
        key = (st.st_ino, st.st_mtime_ns, st.st_size, rel)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        if st.st_size <= SMALL_FILE:
            data = self.root.read_bytes(rel)
            entry = (hashlib.sha256(data).hexdigest(), data)
        else:
            entry = (await asyncio.to_thread(self._sha_file, rel), None)
        self._cache[key] = entry
        if len(self._cache) > CACHE_ENTRIES:
            self._cache.popitem(last=False)
        return entry

    def _sha_file(self, rel: str) -> str:
        h = hashlib.sha256()
        with self.root.open(rel) as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        return h.hexdigest()

    async def from_primary(self, request: web.Request, rel: str) -> web.StreamResponse:
        """A local miss: the primary's copy, checked, kept, never a 404 for a file it has."""
        fut = self._inflight.get(rel)
        if fut is None:
            fut = asyncio.ensure_future(self._fetch(request.raw_path, rel))
            self._inflight[rel] = fut
            fut.add_done_callback(lambda _: self._inflight.pop(rel, None))
        status, headers, body = await asyncio.shield(fut)
        if status == 200 and _not_modified(
            request,
            headers.get("ETag", "").strip('"'),
            parse_http_date(headers.get("Last-Modified")),
        ):
            return web.Response(
                status=304,
                headers={k: headers[k] for k in ("ETag", "Last-Modified") if k in headers},
            )
        return web.Response(status=status, body=body, headers=headers)

    async def _fetch(self, raw_path: str, rel: str) -> tuple[int, dict, bytes]:
        url = self.primary_url + raw_path
        try:
            async with self.http.get(
                url, headers={"Accept-Encoding": "identity", "Via": self.via}, allow_redirects=False
            ) as r:
                body = await r.read()
                status, h = r.status, r.headers
        except (aiohttp.ClientError, TimeoutError) as exc:
            return (
                502,
                {"Content-Type": "text/plain", "Retry-After": "5"},
                (
                    f"no local copy of /{rel}, and the primary cannot be reached ({type(exc).__name__})\n".encode()
                ),
            )
        keep = {k: h[k] for k in ("Content-Type", "ETag", "Last-Modified", "Location") if k in h}
        keep[SOURCE_HEADER] = "primary"
        if status != 200:
            return status, keep, body
        m = _SHA_RE.match(h.get("ETag", ""))
        if m and hashlib.sha256(body).hexdigest() != m.group(2):
            return (
                502,
                {"Content-Type": "text/plain"},
                f"/{rel}: the primary's bytes do not match its ETag\n".encode(),
            )
        file_serial = h.get(FILE_SERIAL_HEADER)
        if m and file_serial and file_serial.isdigit():
            mtime = parse_http_date(h.get("Last-Modified"))
            try:
                await asyncio.to_thread(self._keep, rel, body, mtime, int(file_serial))
            except BadPath as exc:  # a symlink on the way: serve the checked bytes, keep none
                log.warning("not keeping /%s: %s", rel, exc)
        return status, keep, body

    def _keep(self, rel: str, body: bytes, mtime: float | None, file_serial: int) -> None:
        """Store a fetched file, unless the sync daemon got to that change (or a later one)."""
        with self.root.locked():
            if file_serial <= self.root.cursor():
                return
            f = AtomicFile(self.root.file(rel, create_parents=True))
            f.write(body)
            f.commit(mtime, no_clobber=True)

    async def proxy(self, request: web.Request, base: str | None, what: str) -> web.StreamResponse:
        if base is None:
            raise web.HTTPNotFound(
                text=f"{request.path}: not mirrored, and no {what} to send it to\n"
            )
        if any(self.via in v for v in request.headers.getall("Via", [])):
            raise web.HTTPLoopDetected(
                text=f"{request.path}: this request already went through {self.via}\n"
            )
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        headers["Via"] = ", ".join([*request.headers.getall("Via", []), self.via])
        headers["X-Forwarded-For"] = request.remote or ""
        headers["X-Forwarded-Host"] = request.host
        headers["X-Forwarded-Proto"] = request.scheme
        data = request.content if request.body_exists else None
        try:
            async with self.http.request(
                request.method,
                base + request.raw_path,
                headers=headers,
                data=data,
                allow_redirects=False,
            ) as r:
                resp = web.StreamResponse(status=r.status, reason=r.reason)
                for k, v in r.headers.items():
                    if k.lower() not in HOP_BY_HOP:
                        resp.headers.add(k, v)
                if r.content_length is not None:
                    resp.content_length = r.content_length
                await resp.prepare(request)
                async for chunk in r.content.iter_any():
                    await resp.write(chunk)
                await resp.write_eof()
                return resp
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise web.HTTPBadGateway(
                text=f"the {what} at the primary cannot be reached ({type(exc).__name__})\n"
            ) from None


def _accepts_gzip(request: web.Request) -> bool:
    for part in request.headers.get("Accept-Encoding", "").lower().split(","):
        name, _, params = part.strip().partition(";")
        if name.strip() in ("gzip", "*"):
            q = params.replace(" ", "")
            return not (q.startswith("q=0") and q.strip("q=0.") == "")
    return False


def _not_modified(request: web.Request, sha: str, mtime: float | None) -> bool:
    inm = request.headers.get("If-None-Match")
    if inm is not None:
        tags = {t.strip().removeprefix("W/").strip('"') for t in inm.split(",")}
        return "*" in tags or sha in tags
    ims = parse_http_date(request.headers.get("If-Modified-Since"))
    return ims is not None and mtime is not None and int(mtime) <= ims


async def serve_forever(server: MirrorServer, host: str, port: int, stop: asyncio.Event) -> None:
    await server.start(host, port)
    try:
        await stop.wait()
    finally:
        await server.close()
