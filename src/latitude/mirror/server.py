"""`latitude mirror serve`: a node's HTTP front.

* Mirrored paths are answered from the local copy, with a strong `ETag` (the file's sha256, the
  same on every node), `Last-Modified` (the origin's), `304` to a matching conditional request,
  and the precompressed `<file>.gz` to a client that accepts gzip.
* On a local miss, a mirror asks the primary instead of answering 404 (a client that read an
  index on one node and asks a lagging node for a file it names must get it), checks the bytes
  against the primary's ETag and keeps them, unless the sync daemon has already dealt with that
  change. If the primary cannot be reached the answer is 502, never 404.
* Other paths (the website) are proxied to the primary region's website.
* Every response carries `Latitude-Mirror-Serial`, the serial the node holds, and
  `/_latitude/mirror/health` reports the lag in serials and seconds: 503 beyond `max_lag_s`, so
  a health checker takes a stale node out.
* On the primary the same server also answers the change feed (see `feed`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import mimetypes
import os
import re
import stat
import time
from collections import OrderedDict

import aiohttp
from aiohttp import web

from latitude import signing
from latitude.http_headers import HOP_BY_HOP
from latitude.mirror.changelog import ChangeLog
from latitude.mirror.feed import FILE_SERIAL_HEADER, HEALTH, PREFIX, SERIAL_HEADER, FeedServer
from latitude.mirror.store import (
    AtomicFile,
    BadPath,
    ContentRoot,
    UnsafePath,
    http_date,
    parse_http_date,
    rel_path,
)

log = logging.getLogger(__name__)

REGION_HEADER = "Latitude-Mirror-Region"
SOURCE_HEADER = "Latitude-Mirror-Source"
SMALL_FILE = 256 * 1024  # bodies up to this size are cached in memory with their hash
CACHE_ENTRIES = 20_000
_SHA_RE = re.compile(r'^(W/)?"?([0-9a-f]{64})"?$')
mimetypes.add_type("application/octet-stream", ".whl")
mimetypes.add_type("application/json", ".json")


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
        )

    # ---- lifecycle -----------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(client_max_size=16 * 1024 * 1024)
        app.on_startup.append(self._on_startup)
        app.on_shutdown.append(self._on_shutdown)
        app.on_cleanup.append(self._on_cleanup)
        app.on_response_prepare.append(self._stamp)
        app.router.add_get(HEALTH, self.health)
        if self.is_primary:
            self.root.ensure()
            self.log = ChangeLog(self.root.state_dir / "changes.sqlite", self.retention_s or 86400)
            self.feed = FeedServer(self.root, self.log, self.keyring, self.poll_timeout_s)
            self.feed.routes(app)
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

    def health_report(self) -> dict:
        if self.is_primary:
            return {
                "region": self.region,
                "role": "primary",
                "serial": self.serial(),
                "healthy": True,
            }
        st = self.root.status()
        cursor = self.root.cursor()
        head = max(int(st.get("head") or 0), cursor)
        now = time.time()
        waiting = st.get("waiting_since")
        if (
            cursor >= head
            and waiting
            and not st.get("error")
            and now - waiting <= self.poll_timeout_s + 5
        ):
            lag_s: float | None = 0.0  # parked in a long poll: the primary would have told us
        elif st.get("caught_up_at"):
            lag_s = max(0.0, now - float(st["caught_up_at"]))
        else:
            lag_s = None  # never caught up
        healthy = lag_s is not None and lag_s <= self.max_lag_s
        last = st.get("last_contact")
        return {
            "region": self.region,
            "role": "mirror",
            "serial": cursor,
            "primary_serial": head,
            "behind_serials": head - cursor,
            "behind_seconds": None if lag_s is None else round(lag_s, 3),
            "max_lag_s": self.max_lag_s,
            "primary": "unreachable" if st.get("error") else ("reachable" if last else "unknown"),
            "last_contact_s_ago": None if last is None else round(now - last, 3),
            "error": st.get("error"),
            "healthy": healthy,
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
        response = await self.local(request, rel)
        if response is not None:
            return response
        if self.is_primary or self.primary_url is None:
            raise web.HTTPNotFound(text=f"{path}: no such file\n")
        return await self.from_primary(request, rel)

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
        headers = {"Content-Type": _content_type(rel), "Last-Modified": http_date(st.st_mtime)}
        if not rel.endswith(".gz"):
            with contextlib.suppress(BadPath):
                gz = self.root.stat(rel + ".gz")
                if gz is not None and stat.S_ISREG(gz.st_mode):
                    headers["Vary"] = "Accept-Encoding"
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


def _content_type(rel: str) -> str:
    if rel.endswith(".gz"):
        return "application/gzip"
    ctype, _ = mimetypes.guess_type(rel, strict=False)
    ctype = ctype or "application/octet-stream"
    return f"{ctype}; charset=utf-8" if ctype.startswith("text/") else ctype


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
