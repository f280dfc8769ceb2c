"""The change feed between the primary and its mirrors, both ends.

    GET  /_latitude/mirror/changes?since=N&timeout=S&inline=B
                                                       signed; long-polled up to S seconds
    GET  /_latitude/mirror/stream?since=N&timeout=S&inline=B
                                                       signed; one held response, a signed
                                                       frame per commit (S: heartbeat)
    GET  /_latitude/mirror/snapshot                    signed; the whole tree, for `resync`
    POST /_latitude/mirror/bundle                      many small files in one response
    GET  /_latitude/mirror/head?after=N&timeout=S      signed; the head serial, long-polled
                                                       until it passes N (mirrors' health)

`changes` answers ``{"head", "floor", "next", "resync", "changes": [...]}``. With nothing newer
than N it holds the request until a change is committed (or S passes), so a mirror hears of a
change one one-way trip after it happens. Files up to B bytes (at most 64 KiB, 1 MiB a page) come
inline, base64 in `data`: metadata files then reach a mirror in that same one-way trip, with
no second round trip to download them. A cursor below `floor` (pruned away) gets
``"resync": true`` and the mirror rebuilds from `snapshot`.

`stream` is the same feed without the re-arming: after a long poll answers, the mirror's next
poll needs a one-way trip to reach the primary, and a publish in that window waits for it (up
to RTT/2 more; a burst of publishes pays it again and again). The stream stays open and
carries each change as it commits. Every frame is a JSON header line ``{"size",
"content-digest", "signature-input", "signature"}`` then `size` bytes of a page (as
`changes` answers, plus ``"since"``: the serial it continues from), signed like a response and
bound to the request, so frames cannot be forged, and the mirror checks that each continues
exactly where the previous one ended, so none can be dropped, repeated or reordered. The first
frame goes at once (a heartbeat if nothing is new: the mirror learns the head); with nothing
to send the primary sends a heartbeat frame (no changes) every S seconds. A `resync`
frame ends the stream; so does the primary shutting down. The mirror resumes by opening a
new stream from its saved cursor.

Requests and the primary's answers are signed (RFC 9421, `latitude.signing`) with the region
keys of the topology, like the gateway's traffic: the sha256 of every file a mirror stores
comes from this feed, so the feed must not be forgeable.

A bundle is a sequence of frames, one per path asked for: a JSON header line
``{"path", "status", "sha256", "size", "mtime", "serial"}`` then exactly `size` bytes. A sync
of thousands of small files then costs a few round trips over an ocean, not thousands.
"""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import hashlib
import json
import logging
import os
import socket
from dataclasses import dataclass, replace

import aiohttp
from aiohttp import web
from yarl import URL

from latitude import signing
from latitude.mirror.changelog import Change, ChangeLog, Page
from latitude.mirror.publisher import notify_address
from latitude.mirror.store import BadPath, ContentRoot, rel_path

log = logging.getLogger(__name__)

PREFIX = "/_latitude/mirror"
CHANGES = f"{PREFIX}/changes"
SNAPSHOT = f"{PREFIX}/snapshot"
BUNDLE = f"{PREFIX}/bundle"
STREAM = f"{PREFIX}/stream"
STREAM_TYPE = "application/x-latitude-feed-stream"
HEALTH = f"{PREFIX}/health"
HEAD = f"{PREFIX}/head"
SERIAL_HEADER = "Latitude-Mirror-Serial"
FILE_SERIAL_HEADER = "Latitude-File-Serial"
BUNDLE_TYPE = "application/x-latitude-bundle"
FALLBACK_POLL_S = 0.5
MAX_PAGE = 5000
INLINE_FILE_MAX = 64 * 1024  # files up to this size may travel inside the feed's answer
INLINE_PAGE_MAX = 1024 * 1024
# Files up to this size travel in bundles; a larger one is answered 413 without being read (the
# endpoint is unsigned, like a GET: 5000 paths of a huge file must not be read into memory).
BUNDLE_FILE_MAX = 256 * 1024


class FeedError(Exception):
    """The feed could not be read, or its answer failed verification."""


class StreamUnsupported(FeedError):
    """The primary has no streaming feed (an older version): long-poll `changes` instead."""


# ------------------------------------------------------------------------------ server side


class FeedServer:
    """The primary's end: answers long polls from the change log, wakes them on a publish."""

    def __init__(
        self,
        root: ContentRoot,
        log_: ChangeLog,
        keyring: signing.Keyring | None,
        poll_timeout_s: float = 25.0,
    ):
        self.root = root
        self.log = log_
        self.keyring = keyring
        self.poll_timeout_s = poll_timeout_s
        self.nonces = signing.MemoryNonceCache()
        self.head = log_.head()
        self._changed = asyncio.Event()
        self._closing = asyncio.Event()
        self._sock: socket.socket | None = None
        self._task: asyncio.Task | None = None

    # ---- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            s.bind(notify_address(self.root.root))
            s.setblocking(False)
            loop.add_reader(s.fileno(), self._on_poke)
            self._sock = s
        except OSError as exc:
            log.warning(
                "no publish notifications (%s); polling the log every %.1f s", exc, FALLBACK_POLL_S
            )
        self._task = asyncio.create_task(self._poll_log())

    async def close(self) -> None:
        self._closing.set()
        self._wake()
        if self._sock is not None:
            asyncio.get_running_loop().remove_reader(self._sock.fileno())
            self._sock.close()
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def _on_poke(self) -> None:
        with contextlib.suppress(OSError):
            while self._sock and self._sock.recv(64):
                pass
        self.refresh()

    async def _poll_log(self) -> None:
        version = self.log.data_version()
        while True:
            await asyncio.sleep(FALLBACK_POLL_S)
            now = self.log.data_version()
            if now != version:
                version = now
                self.refresh()

    def refresh(self) -> None:
        head = self.log.head()
        if head != self.head:
            self.head = head
            self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_past(self, serial: int, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.head <= serial and not self._closing.is_set():
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)

    # ---- handlers ------------------------------------------------------------------------------

    def routes(self, app: web.Application) -> None:
        app.router.add_get(CHANGES, self.changes, allow_head=False)
        app.router.add_get(STREAM, self.stream, allow_head=False)
        app.router.add_get(SNAPSHOT, self.snapshot, allow_head=False)
        app.router.add_post(BUNDLE, self.bundle)
        app.router.add_get(HEAD, self.head_serial, allow_head=False)

    async def head_serial(self, request: web.Request) -> web.Response:
        """The head serial, held until it passes `after` (or `timeout` s): how a mirror's
        server learns the primary's head on its own, whatever its sync daemon is doing."""
        await self._verify(request)
        try:
            after = int(request.query.get("after", "-1"))
            timeout = max(0.0, min(float(request.query.get("timeout", "0")), self.poll_timeout_s))
        except ValueError:
            raise web.HTTPBadRequest(text="after and timeout must be numbers\n") from None
        self.refresh()
        if timeout > 0:
            await self.wait_past(after, timeout)
        return self._signed_json(request, {"head": self.head})

    async def changes(self, request: web.Request) -> web.Response:
        await self._verify(request)
        try:
            since = int(request.query.get("since", "0"))
            timeout = float(request.query.get("timeout", self.poll_timeout_s))
            limit = int(request.query.get("limit", MAX_PAGE))
            inline = int(request.query.get("inline", "0"))
        except ValueError:
            raise web.HTTPBadRequest(
                text="since, timeout, limit and inline must be numbers\n"
            ) from None
        timeout = max(0.0, min(timeout, self.poll_timeout_s))
        limit = max(1, min(limit, MAX_PAGE))
        page = self.log.since(since, limit)
        if not page.resync and not page.changes and timeout > 0:
            self.refresh()
            await self.wait_past(since, timeout)
            if self._closing.is_set():
                raise web.HTTPServiceUnavailable(
                    text="the primary is shutting down\n", headers={"Retry-After": "1"}
                )
            page = self.log.since(since, limit)
        if inline > 0 and page.changes:
            page = replace(page, changes=self._inline(page.changes, min(inline, INLINE_FILE_MAX)))
        return self._signed_json(request, page_to_json(page))

    async def stream(self, request: web.Request) -> web.StreamResponse:
        await self._verify(request)
        try:
            since = int(request.query.get("since", "0"))
            heartbeat = float(request.query.get("timeout", self.poll_timeout_s))
            inline = int(request.query.get("inline", "0"))
        except ValueError:
            raise web.HTTPBadRequest(text="since, timeout and inline must be numbers\n") from None
        heartbeat = max(0.5, min(heartbeat, self.poll_timeout_s))
        resp = web.StreamResponse(
            headers={"Content-Type": STREAM_TYPE, "Cache-Control": "no-store"}
        )
        await resp.prepare(request)
        cursor, first = since, True
        with contextlib.suppress(ConnectionError):
            while not self._closing.is_set():
                page = self.log.since(cursor, MAX_PAGE)
                # The first frame goes at once, changes or not: the mirror learns the head.
                if not page.resync and not page.changes and not first:
                    self.refresh()
                    if self.head <= cursor:
                        await self.wait_past(cursor, heartbeat)
                        if self.head > cursor or self._closing.is_set():
                            continue  # a commit (read it) or the end
                if inline > 0 and page.changes:
                    page = replace(
                        page, changes=self._inline(page.changes, min(inline, INLINE_FILE_MAX))
                    )
                await resp.write(self._frame(request, cursor, page))  # changes, or a heartbeat
                first = False
                if page.resync:
                    break
                cursor = page.changes[-1].serial if page.changes else cursor
            await resp.write_eof()
        return resp

    def _frame(self, request: web.Request, since: int, page: Page) -> bytes:
        body = json.dumps({**page_to_json(page), "since": since}, separators=(",", ":")).encode()
        headers = {"Content-Digest": signing.content_digest(body)}  # the frame's only header
        if self.keyring is not None and "signature" in request.headers:
            headers.update(
                signing.sign_response(
                    self.keyring, status=200, headers=headers, request_headers=request.headers
                )
            )
        header: dict = {k.lower(): v for k, v in headers.items()}
        header["size"] = len(body)
        return json.dumps(header, separators=(",", ":")).encode() + b"\n" + body

    def _inline(self, changes: tuple[Change, ...], file_max: int) -> tuple[Change, ...]:
        """Carry small files in the answer itself: the mirror then needs no second round trip.

        Only a path's last change in the page is inlined, and only while the page stays under
        `INLINE_PAGE_MAX`. The bytes are read now; if the file changed again since, they will
        not match the change's sha256 and the mirror downloads it instead.
        """
        last = {c.path: c.serial for c in changes}
        budget = INLINE_PAGE_MAX
        out = []
        for c in changes:
            if (
                c.op == "put"
                and last[c.path] == c.serial
                and (c.size or 0) <= min(file_max, budget)
            ):
                with contextlib.suppress(OSError, ValueError):  # ValueError: a symlink
                    data = self.root.read_bytes(c.path)
                    budget -= len(data)
                    c = replace(c, data=data)
            out.append(c)
        return tuple(out)

    async def snapshot(self, request: web.Request) -> web.Response:
        await self._verify(request)
        serial, files = self.log.snapshot()
        return self._signed_json(request, {"serial": serial, "files": files})

    async def bundle(self, request: web.Request) -> web.StreamResponse:
        try:
            paths = [rel_path(p) for p in (await request.json())["paths"]][:MAX_PAGE]
        except (ValueError, KeyError, TypeError) as exc:
            raise web.HTTPBadRequest(text=f'expected {{"paths": [...]}}: {exc}\n') from None
        resp = web.StreamResponse(headers={"Content-Type": BUNDLE_TYPE})
        await resp.prepare(request)
        for i in range(0, len(paths), 256):
            chunk = paths[i : i + 256]
            frames = await asyncio.to_thread(self._frames, chunk, self.log.serials(chunk))
            await resp.write(frames)
        await resp.write_eof()
        return resp

    def _frames(self, paths: list[str], serials: dict[str, int]) -> bytes:
        out = bytearray()
        for path in paths:
            try:
                with self.root.open(path) as f:  # never through a symlink
                    st = os.fstat(f.fileno())
                    if st.st_size > BUNDLE_FILE_MAX:
                        big = {"path": path, "status": 413, "size": 0, "serial": serials.get(path)}
                        out += json.dumps(big).encode() + b"\n"
                        continue
                    data = f.read(BUNDLE_FILE_MAX + 1)
                    mtime = st.st_mtime
            except (FileNotFoundError, IsADirectoryError, NotADirectoryError, BadPath):
                out += json.dumps({"path": path, "status": 404, "size": 0}).encode() + b"\n"
                continue
            header = {
                "path": path,
                "status": 200,
                "sha256": hashlib.sha256(data).hexdigest(),
                "size": len(data),
                "mtime": mtime,
                "serial": serials.get(path),
            }
            out += json.dumps(header).encode() + b"\n" + data
        return bytes(out)

    # ---- signatures ----------------------------------------------------------------------------

    async def _verify(self, request: web.Request) -> None:
        if self.keyring is None:
            return
        url = f"{request.scheme}://{request.host}{request.raw_path}"
        try:
            await signing.verify_request(
                self.keyring,
                method=request.method,
                url=url,
                headers=request.headers,
                nonce_cache=self.nonces,
                body=b"",
            )
        except signing.SignatureError as exc:
            raise web.HTTPUnauthorized(text=f"feed request refused: {exc}\n") from None

    def _signed_json(self, request: web.Request, data: dict) -> web.Response:
        body = json.dumps(data, separators=(",", ":")).encode()
        headers = {
            "Content-Type": "application/json",
            "Content-Digest": signing.content_digest(body),
        }
        if self.keyring is not None and "signature" in request.headers:
            headers.update(
                signing.sign_response(
                    self.keyring, status=200, headers=headers, request_headers=request.headers
                )
            )
        return web.Response(body=body, headers=headers)


def page_to_json(page: Page) -> dict:
    return {
        "head": page.head,
        "floor": page.floor,
        "next": page.next,
        "resync": page.resync,
        "changes": [c.to_json() for c in page.changes],
    }


# ------------------------------------------------------------------------------ client side


@dataclass(frozen=True)
class Snapshot:
    serial: int
    files: list[dict]


class FeedClient:
    """A mirror's end of the feed: signed requests, verified answers."""

    def __init__(
        self, session: aiohttp.ClientSession, base_url: str, keyring: signing.Keyring | None
    ):
        self.session = session
        self.base_url = base_url.rstrip("/")
        self.keyring = keyring

    async def changes(self, since: int, timeout: float, inline: int = INLINE_FILE_MAX) -> Page:
        qs = f"?since={since}&timeout={timeout:g}&inline={inline}"
        data = await self._get(CHANGES + qs, timeout + 15)
        try:
            return Page(
                head=int(data["head"]),
                floor=int(data["floor"]),
                changes=tuple(Change.from_json(c) for c in data["changes"]),
                resync=bool(data["resync"]),
            )
        except (KeyError, TypeError, ValueError, binascii.Error) as exc:
            raise FeedError(f"malformed feed page: {exc}") from None

    async def head(self, after: int = -1, timeout: float = 0) -> int:
        """The primary's head serial; with `timeout`, once it passes `after`."""
        data = await self._get(f"{HEAD}?after={after}&timeout={timeout:g}", timeout + 15)
        try:
            return int(data["head"])
        except (KeyError, TypeError, ValueError) as exc:
            raise FeedError(f"malformed head: {exc}") from None

    @contextlib.asynccontextmanager
    async def stream(self, since: int, heartbeat: float, inline: int = INLINE_FILE_MAX):
        """Open the streaming feed from `since`: yields a `FeedStream` of verified pages."""
        qs = f"?since={since}&timeout={heartbeat:g}&inline={inline}"
        url = self.base_url + STREAM + qs
        headers = self._sign("GET", url)
        # No total timeout (the response never ends by itself); a silence of two heartbeats
        # and then some means the connection is dead.
        timeout = aiohttp.ClientTimeout(total=None, connect=15, sock_read=2 * heartbeat + 10)
        try:
            resp = await self.session.get(URL(url, encoded=True), headers=headers, timeout=timeout)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise FeedError(f"GET {url}: {type(exc).__name__}: {exc}") from None
        try:
            if resp.status in (404, 405):
                raise StreamUnsupported(f"GET {url}: HTTP {resp.status}: no streaming feed")
            if resp.status != 200:
                body = (await resp.read())[:200].decode(errors="replace").strip()
                raise FeedError(f"GET {url}: HTTP {resp.status}: {body}")
            yield FeedStream(resp, since, headers, self.keyring, url)
        finally:
            resp.close()  # never back into the pool: the stream was left mid-way

    def _sign(self, method: str, url: str) -> dict:
        headers = {"Content-Digest": signing.content_digest(b"")}
        if self.keyring is not None:
            headers.update(
                signing.sign_request(self.keyring, method=method, url=url, headers=headers)
            )
        return headers

    async def snapshot(self) -> Snapshot:
        data = await self._get(SNAPSHOT, 300)
        try:
            return Snapshot(int(data["serial"]), list(data["files"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise FeedError(f"malformed snapshot: {exc}") from None

    async def _get(self, path_qs: str, timeout: float) -> dict:
        url = self.base_url + path_qs
        headers = {"Content-Digest": signing.content_digest(b"")}
        if self.keyring is not None:
            headers.update(
                signing.sign_request(self.keyring, method="GET", url=url, headers=headers)
            )
        try:
            async with self.session.get(
                URL(url, encoded=True),
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=timeout),
            ) as resp:
                body = await resp.read()
                if resp.status != 200:
                    raise FeedError(
                        f"GET {url}: HTTP {resp.status}: {body[:200].decode(errors='replace').strip()}"
                    )
                if self.keyring is not None:
                    try:
                        signing.verify_response(
                            self.keyring,
                            status=resp.status,
                            headers=resp.headers,
                            request_headers=headers,
                            body=body,
                        )
                    except signing.SignatureError as exc:
                        raise FeedError(
                            f"GET {url}: the answer's signature does not verify: {exc}"
                        ) from None
                return json.loads(body)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise FeedError(f"GET {url}: {type(exc).__name__}: {exc}") from None
        except ValueError as exc:
            raise FeedError(f"GET {url}: not JSON: {exc}") from None


class FeedStream:
    """The pages of one streaming feed response, each verified and checked to continue exactly
    where the previous one ended. Iterating ends when the primary ends the stream."""

    def __init__(self, resp, since: int, request_headers: dict, keyring, url: str):
        self.resp = resp
        self.cursor = since  # where the next frame must continue from
        self.request_headers = request_headers
        self.keyring = keyring
        self.url = url

    def __aiter__(self) -> FeedStream:
        return self

    async def __anext__(self) -> Page:
        content = self.resp.content
        try:
            line = await content.readline()
            if not line:
                raise StopAsyncIteration
            header = json.loads(line)
            size = int(header["size"])
            if not 0 <= size <= 64 * INLINE_PAGE_MAX:
                raise ValueError(f"frame size {size}")
            body = await content.readexactly(size)
        except asyncio.IncompleteReadError:
            raise FeedError(f"GET {self.url}: the stream ended inside a frame") from None
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise FeedError(f"GET {self.url}: {type(exc).__name__}: {exc}") from None
        except (ValueError, KeyError, TypeError) as exc:
            raise FeedError(f"GET {self.url}: malformed frame header: {exc}") from None
        if self.keyring is not None:
            try:
                signing.verify_response(
                    self.keyring,
                    status=200,
                    headers={k: str(v) for k, v in header.items() if k != "size"},
                    request_headers=self.request_headers,
                    body=body,
                )
            except signing.SignatureError as exc:
                raise FeedError(
                    f"GET {self.url}: a frame's signature does not verify: {exc}"
                ) from None
        try:
            data = json.loads(body)
            page = Page(
                head=int(data["head"]),
                floor=int(data["floor"]),
                changes=tuple(Change.from_json(c) for c in data["changes"]),
                resync=bool(data["resync"]),
            )
            since = int(data["since"])
        except (KeyError, TypeError, ValueError, binascii.Error) as exc:
            raise FeedError(f"malformed feed frame: {exc}") from None
        serials = [c.serial for c in page.changes]
        if since != self.cursor or any(
            b <= a for a, b in zip([since, *serials], serials, strict=False)
        ):
            raise FeedError(
                f"GET {self.url}: a frame continues from serial {since} with {serials[:3]}..., "
                f"not from {self.cursor}: frames lost or out of order"
            )
        if serials:
            self.cursor = serials[-1]
        return page
