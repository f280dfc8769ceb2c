"""The sync daemon: keeps a mirror's content root identical to the primary's.

    latitude mirror sync --region ap-southeast

The loop (`SyncDaemon.run`) follows the streaming feed from the saved cursor (one held
response carrying each change as it commits; long-polling `changes` when the primary has no
stream, or with `stream=False`) and applies each page as a batch: pages that arrived while the
previous batch was being applied are applied together, as one batch. Small files come inline with the feed's answer; the rest are downloaded concurrently over
a pooled, pre-warmed connection pool (many small files to a request, see `feed`). Each is checked against the sha256 the signed
feed announced, writes it atomically with the origin's Last-Modified, writes index files only
after the files they name, applies deletes last, and only then saves the cursor. A crash at
any point therefore repeats at most the batch it was in; a cursor the primary no longer
remembers gets `resync`: the tree is compared with the primary's snapshot, hash by hash.

A file whose bytes do not match its announced sha256 is never stored. If it is older than the
change that announced it (an origin or cache not yet up to date) it is "not yet propagated":
retried with backoff, then the whole batch is retried. If the origin says the file has changed
again since (a newer serial), the newer change is on its way in the feed and this one is
skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import hashlib
import json
import logging
import os
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import quote

import aiohttp

from latitude import signing
from latitude.atomic import fsync_dir
from latitude.mirror.changelog import Change, Page
from latitude.mirror.feed import (
    BUNDLE,
    BUNDLE_FILE_MAX,
    FILE_SERIAL_HEADER,
    HEALTH,
    INLINE_FILE_MAX,
    MAX_PAGE,
    SERIAL_HEADER,
    FeedClient,
    FeedError,
    StreamUnsupported,
)
from latitude.mirror.store import AtomicFile, BadPath, ContentRoot, parse_http_date

log = logging.getLogger(__name__)

DEFAULT_INDEXES = ("*index.html", "*index.html.gz", "simple/*", "*.json", "*.json.gz")
BUNDLE_FILES = 256
BUNDLE_BYTES = 4 * 1024 * 1024
RETRIES = 6
WARM_EVERY_S = 15.0
PAGES_AHEAD = 3  # streamed pages read ahead of the batch being applied
FEW_FILES = 4  # batches up to this many in-memory files are written in one writer-thread trip


class BatchFailed(Exception):
    """A batch could not be applied in full; the cursor stays where it was."""


@dataclass
class Got:
    """What the origin answered for one path."""

    status: int
    sha256: str | None = None
    mtime: float | None = None
    file_serial: int | None = None  # serial of the origin's copy (a latitude origin says)
    node_serial: int | None = None  # the serial the origin node holds
    data: bytes | None = None
    staged: AtomicFile | None = None


def verdict(change: Change, got: Got | None) -> str:
    """`store`, `skip` (superseded by a newer change) or `retry` (not propagated, damaged)."""
    if got is None:
        return "retry"
    if got.status == 200 and got.sha256 == change.sha256:
        return "store"
    if got.file_serial is not None and got.file_serial > change.serial:
        return "skip"
    if got.status == 404 and got.node_serial is not None and got.node_serial > change.serial:
        return "skip"  # deleted since: the delete is in the feed
    return "retry"


class SyncDaemon:
    def __init__(
        self,
        root: str | ContentRoot,
        primary_url: str,
        keyring: signing.Keyring | None,
        *,
        files_url: str | None = None,
        indexes: Sequence[str] = DEFAULT_INDEXES,
        poll_timeout_s: float = 25.0,
        poll_interval_s: float | None = None,
        pool_size: int = 32,
        bundles: bool = True,
        inline: int = INLINE_FILE_MAX,
        region: str | None = None,
        stream: bool = True,
    ):
        self.root = root if isinstance(root, ContentRoot) else ContentRoot(root)
        self.primary_url = primary_url.rstrip("/")
        self.files_url = (files_url or primary_url).rstrip("/")
        self.keyring = keyring
        self.indexes = tuple(indexes)
        self.poll_timeout_s = poll_timeout_s
        self.poll_interval_s = poll_interval_s
        self.pool_size = pool_size
        self.bundles = bundles
        self.inline = inline  # ask the feed to carry files up to this size (0: never)
        self.region = region
        self.stream = stream  # follow the streaming feed (False: long-poll `changes`)
        self._heard = False  # a frame arrived since the last failure
        self.stopping = asyncio.Event()
        self.status: dict = {}
        self.batches = 0
        self.files_written = 0
        self.files_inline = 0
        self._last_download = 0.0

    # ---- the loop ------------------------------------------------------------------------------

    async def run(self) -> None:
        """Sync until `stop()`; survives the primary being down, resumes from the cursor."""
        lock = await asyncio.to_thread(self.root.hold_sync_lock)
        try:
            await self._run()
        finally:
            lock.close()

    async def _run(self) -> None:
        async with self._connections():
            cursor = await asyncio.to_thread(self._start)
            failures = 0
            while not self.stopping.is_set():
                try:
                    if self.stream and not self.poll_interval_s:
                        cursor = await self._follow(cursor)
                        failures = 0
                        continue
                    page = await self._poll(cursor)
                    if page.resync:
                        cursor = await self.resync()
                    elif page.changes:
                        await self.apply(page.changes, page.next)
                        cursor = page.next
                    self._caught_up(cursor, page.head)
                    failures = 0
                except StreamUnsupported as exc:
                    log.warning("sync: %s; long-polling instead", exc)
                    self.stream = False
                    continue
                except (FeedError, BatchFailed, BadPath) as exc:  # BadPath: a symlink in the root
                    if self._heard:  # the stream worked for a while: start the backoff afresh
                        failures, self._heard = 0, False
                    failures += 1
                    self._report(
                        error=str(exc),
                        failing_since=self.status.get("failing_since") or time.time(),
                    )
                    log.warning("sync: %s (attempt %d)", exc, failures)
                    await self._sleep(min(0.2 * 2**failures, 2.0))
                    continue
                if self.poll_interval_s:
                    await self._sleep(self.poll_interval_s)

    def stop(self) -> None:
        self.stopping.set()

    async def _poll(self, cursor: int) -> Page:
        """Long-poll (or, in polling mode, just ask) for what changed after `cursor`."""
        timeout = 0 if self.poll_interval_s else self.poll_timeout_s
        current = cursor >= self.status.get("head", 0)
        self._report(cursor=cursor, waiting_since=time.time() if current and timeout else None)
        poll = asyncio.ensure_future(self.feed.changes(cursor, timeout, self.inline))
        stop = asyncio.ensure_future(self.stopping.wait())
        await asyncio.wait({poll, stop}, return_when=asyncio.FIRST_COMPLETED)
        if not poll.done():
            poll.cancel()
            return Page(head=self.status.get("head", cursor), floor=0)
        stop.cancel()
        page = poll.result()
        now = time.time()
        update = {"head": page.head, "last_contact": now, "waiting_since": None}
        if current and page.changes:
            update["caught_up_at"] = now  # current until the change we just heard of
        self._report(**update)
        return page

    async def _follow(self, cursor: int) -> int:
        """Apply the streaming feed's pages as they arrive, from `cursor`. Returns the cursor
        reached when the stream ends (the primary closing, a resync done, or `stop()`)."""
        heartbeat = max(1.0, self.poll_timeout_s / 2)
        async with self.feed.stream(cursor, heartbeat, self.inline) as frames:
            arrived: deque = deque()  # pages, then None (the end) or the exception that ended it
            ready, room = asyncio.Event(), asyncio.Event()

            async def read() -> None:
                try:
                    async for page in frames:
                        arrived.append(page)
                        ready.set()
                        # A mirror far behind reads only a few pages ahead: the rest waits in
                        # the primary (TCP pushes back), not in this process's memory.
                        while len(arrived) >= PAGES_AHEAD:
                            room.clear()
                            await room.wait()
                    arrived.append(None)
                except Exception as exc:  # handed to the loop below, which raises it
                    arrived.append(exc)
                ready.set()

            reader = asyncio.create_task(read())
            stop = asyncio.ensure_future(self.stopping.wait())
            self._report(cursor=cursor)
            try:
                while True:
                    if not arrived:
                        ready.clear()
                        wake = asyncio.ensure_future(ready.wait())
                        await asyncio.wait({wake, stop}, return_when=asyncio.FIRST_COMPLETED)
                        wake.cancel()
                        if self.stopping.is_set():
                            return cursor
                        continue
                    item = arrived.popleft()
                    room.set()
                    if item is None:
                        return cursor
                    if isinstance(item, BaseException):
                        raise item
                    self._heard = True
                    if item.resync:
                        return await self.resync()
                    changes, head = list(item.changes), item.head
                    # Pages that came while the last batch was applied: one batch, one cursor.
                    while (
                        arrived
                        and isinstance(arrived[0], Page)
                        and not arrived[0].resync
                        and len(changes) < MAX_PAGE
                    ):
                        more = arrived.popleft()
                        room.set()
                        changes += more.changes
                        head = max(head, more.head)
                    now = time.time()
                    update = {"head": head, "last_contact": now, "waiting_since": None}
                    if changes:
                        if cursor >= self.status.get("head", 0):
                            update["caught_up_at"] = now  # current until the change just heard of
                        if len(changes) > FEW_FILES:  # a while to apply: say it is behind
                            self._report(**update)
                        else:  # reported with the outcome: one status write a batch
                            self.status.update(update)
                        await self.apply(changes, changes[-1].serial)
                        cursor = changes[-1].serial
                    update = {"cursor": cursor, "error": None, "failing_since": None}
                    if cursor >= head:  # parked in the stream: the primary will tell us
                        update["caught_up_at"] = update["waiting_since"] = time.time()
                    self._report(head=head, last_contact=now, **update)
            finally:
                reader.cancel()
                stop.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reader

    # ---- one batch -----------------------------------------------------------------------------

    async def apply(self, changes: Sequence[Change], cursor: int) -> None:
        """Apply a batch, then save `cursor`. Raises BatchFailed with the cursor untouched."""
        latest = {c.path: c for c in changes}  # the last change of each path wins
        puts = [c for c in latest.values() if c.op == "put"]
        files = [c for c in puts if not self.is_index(c.path)]
        indexes = [c for c in puts if self.is_index(c.path)]
        deletes = [c.path for c in latest.values() if c.op == "delete"]
        touched: set = set()
        await self.download(files, touched)  # files first ...
        await self.download(indexes, touched)  # ... then the indexes naming them
        await asyncio.to_thread(self._finish, deletes, touched, cursor)
        self.batches += 1

    def is_index(self, path: str) -> bool:
        return any(fnmatch.fnmatchcase(path, p) for p in self.indexes)

    def _finish(self, deletes: list[str], touched: set, cursor: int) -> None:
        with self.root.locked():
            for path in deletes:
                target = self.root.file(path)
                target.unlink(missing_ok=True)
                touched.add(target.parent)
            for folder in touched:
                with contextlib.suppress(FileNotFoundError):
                    fsync_dir(folder)
            self.root.save_cursor(cursor)

    async def resync(self) -> int:
        """Rebuild from the primary's snapshot: fetch what differs, delete what it lacks."""
        snap = await self.feed.snapshot()
        log.warning(
            "sync: cursor too old; resync to serial %d (%d files)", snap.serial, len(snap.files)
        )
        local = await asyncio.to_thread(self.root.hashes)
        listed = {f["path"] for f in snap.files}
        batch = [
            Change(f["serial"], "put", f["path"], f["sha256"], f["size"], f["mtime"])
            for f in snap.files
            if local.get(f["path"]) != f["sha256"]
        ] + [Change(snap.serial, "delete", p) for p in local if p not in listed]
        await self.apply(batch, snap.serial)
        self._report(resyncs=self.status.get("resyncs", 0) + 1)
        return snap.serial

    # ---- downloads -----------------------------------------------------------------------------

    async def download(self, changes: list[Change], touched: set) -> None:
        if not changes:
            return
        small, large, inline = [], [], []
        for c in changes:
            if c.data is not None and _sha(c.data) == c.sha256:
                inline.append(c)  # it came with the feed: no download
            else:
                (small if self.bundles and (c.size or 0) <= BUNDLE_FILE_MAX else large).append(c)
        await self.store([(c, Got(200, c.sha256, c.mtime, data=c.data)) for c in inline], touched)
        self.files_inline += len(inline)
        groups = [[c] for c in large] + _chunks(small)
        results = await asyncio.gather(
            *(self._fetch_group(g, touched) for g in groups), return_exceptions=True
        )
        errors = [r for r in results if isinstance(r, BaseException)]
        for e in errors:
            if not isinstance(e, BatchFailed | aiohttp.ClientError | TimeoutError | OSError):
                raise e
        if errors:
            raise BatchFailed(
                f"{len(errors)} of {len(groups)} downloads failed; first: {errors[0]}"
            )

    async def _fetch_group(self, pending: list[Change], touched: set) -> None:
        reason = ""
        for attempt in range(RETRIES):
            if attempt:
                await asyncio.sleep(min(0.05 * 2**attempt, 2.0))
            try:
                async with self.slots:
                    if len(pending) == 1 and not (
                        self.bundles and (pending[0].size or 0) <= BUNDLE_FILE_MAX
                    ):
                        got = {pending[0].path: await self._get(pending[0].path)}
                    else:
                        got = await self._bundle([c.path for c in pending])
            except (aiohttp.ClientError, TimeoutError, FeedError) as exc:
                reason = f"{type(exc).__name__}: {exc}"
                continue
            retry, good = [], []
            for c in pending:
                g = got.get(c.path)
                v = verdict(c, g)
                if v == "store":
                    good.append((c, g))
                else:
                    if g is not None and g.staged is not None:
                        g.staged.abort()
                    if v == "retry":
                        retry.append(c)
                        reason = _why(c, g)
            await self.store(good, touched)
            if not retry:
                return
            pending = retry
        raise BatchFailed(f"{len(pending)} file(s) not stored after {RETRIES} tries: {reason}")

    async def store(self, items: list[tuple[Change, Got]], touched: set) -> None:
        """Write checked files atomically: all temp files first, then their fsyncs side by
        side (the disk commits them together), then the renames."""
        if not items:
            return
        loop = asyncio.get_running_loop()

        def run(fn, *args):
            return loop.run_in_executor(self.writers, fn, *args)

        files = [
            (self.root.file(c.path, create_parents=True), g.data or b"", g.mtime or c.mtime)
            for c, g in items
            if g.staged is None
        ]
        files += [
            (g.staged.target, g.staged, g.mtime or c.mtime)
            for c, g in items
            if g.staged is not None
        ]
        if len(files) <= FEW_FILES and all(not isinstance(d, AtomicFile) for _, d, _ in files):
            # A few small files (a publish as it commits): one trip to a writer thread, not
            # three; under load each trip costs a scheduling delay on the way to visibility.
            await run(_write_few, files)
            touched.update(target.parent for target, _, _ in files)
            self.files_written += len(items)
            return
        staged = await run(_stage, files)
        try:
            await asyncio.gather(*(run(os.fsync, f.file.fileno()) for f, _ in staged))
            await run(_commit, staged)
        except BaseException:
            for f, _ in staged:
                f.abort()
            raise
        touched.update(target.parent for target, _, _ in files)
        self.files_written += len(items)

    async def _get(self, path: str) -> Got:
        """One file by GET, streamed to a temp file beside its target."""
        async with self.http.get(
            f"{self.files_url}/{quote(path)}", headers={"Accept-Encoding": "identity"}
        ) as resp:
            self._last_download = time.monotonic()
            got = Got(
                status=resp.status,
                mtime=parse_http_date(resp.headers.get("Last-Modified")),
                file_serial=_int(resp.headers.get(FILE_SERIAL_HEADER)),
                node_serial=_int(resp.headers.get(SERIAL_HEADER)),
            )
            if resp.status != 200:
                return got
            staged = AtomicFile(self.root.file(path, create_parents=True))
            try:
                async for chunk in resp.content.iter_chunked(1 << 20):
                    staged.write(chunk)
            except BaseException:
                staged.abort()
                raise
            got.staged, got.sha256 = staged, staged.hash.hexdigest()
            return got

    async def _bundle(self, paths: list[str]) -> dict[str, Got]:
        async with self.http.post(f"{self.files_url}{BUNDLE}", json={"paths": paths}) as resp:
            self._last_download = time.monotonic()
            if resp.status in (404, 405):
                self.bundles = False  # a plain origin: fall back to one GET per file
                raise FeedError(f"{self.files_url} has no bundle endpoint; using GETs")
            if resp.status != 200:
                raise FeedError(f"bundle: HTTP {resp.status}")
            node_serial = _int(resp.headers.get(SERIAL_HEADER))
            out: dict[str, Got] = {}
            while line := await resp.content.readline():
                h = json.loads(line)
                data = await resp.content.readexactly(h["size"]) if h["size"] else b""
                out[h["path"]] = Got(
                    status=h["status"],
                    sha256=_sha(data) if h["status"] == 200 else None,
                    mtime=h.get("mtime"),
                    file_serial=h.get("serial"),
                    node_serial=node_serial,
                    data=data,
                )
            return out

    # ---- connections, status -------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _connections(self):
        feed_conn = aiohttp.TCPConnector(limit=2, keepalive_timeout=60)
        file_conn = aiohttp.TCPConnector(limit=self.pool_size, keepalive_timeout=60)
        timeout = aiohttp.ClientTimeout(total=None, connect=10, sock_read=60)
        self.slots = asyncio.Semaphore(self.pool_size)
        self.writers = ThreadPoolExecutor(max_workers=16, thread_name_prefix="mirror-write")
        async with (
            aiohttp.ClientSession(connector=feed_conn, auto_decompress=False) as feed_http,
            aiohttp.ClientSession(
                connector=file_conn, timeout=timeout, auto_decompress=False
            ) as http,
        ):
            self.http = http
            self.feed = FeedClient(feed_http, self.primary_url, self.keyring)
            warm = asyncio.create_task(self._keep_warm())
            try:
                yield
            finally:
                warm.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await warm
                self.writers.shutdown(wait=True)

    async def _keep_warm(self) -> None:
        """Keep a few idle connections open to the origin, so a download pays no handshake."""
        n = min(4, self.pool_size)
        while True:
            if time.monotonic() - self._last_download > WARM_EVERY_S / 2:
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    await asyncio.gather(*(self._ping() for _ in range(n)), return_exceptions=True)
            await asyncio.sleep(WARM_EVERY_S)

    async def _ping(self) -> None:
        async with self.http.head(
            f"{self.files_url}{HEALTH}", timeout=aiohttp.ClientTimeout(total=10)
        ) as r:
            await r.read()

    def _start(self) -> int:
        self.root.ensure()
        removed = self.root.remove_temp_files()
        if removed:
            log.warning("sync: removed %d partial file(s) left by a crash", removed)
        cursor = self.root.cursor()
        self.status = {
            **self.root.status(),
            "region": self.region,
            "cursor": cursor,
            "pid_started": time.time(),
        }
        self._report(waiting_since=None)
        return cursor

    def _caught_up(self, cursor: int, head: int) -> None:
        update: dict = {"cursor": cursor, "error": None, "failing_since": None}
        if cursor >= head:
            update["caught_up_at"] = time.time()
        self._report(**update)

    def _report(self, **fields) -> None:
        self.status.update(fields)
        with contextlib.suppress(OSError):
            self.root.save_status(self.status)

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), seconds)


def _stage(files: list[tuple]) -> list[tuple[AtomicFile, float | None]]:
    staged = []
    try:
        for target, data, mtime in files:
            if isinstance(data, AtomicFile):
                f = data  # streamed to its temp file already
            else:
                f = AtomicFile(target)
                f.write(data)
            f.file.flush()  # into the kernel, for the fsync that follows
            staged.append((f, mtime))
    except BaseException:
        for f, _ in staged:
            f.abort()
        raise
    return staged


def _write_few(files: list[tuple]) -> None:
    staged = _stage(files)
    try:
        for f, _ in staged:
            os.fsync(f.file.fileno())
    except BaseException:
        for f, _ in staged:
            f.abort()
        raise
    _commit(staged)


def _commit(staged: list[tuple[AtomicFile, float | None]]) -> None:
    for f, mtime in staged:
        f.commit(mtime, fsync=False)  # fsynced just before, side by side


def _chunks(changes: list[Change]) -> list[list[Change]]:
    groups: list[list[Change]] = []
    size = 0
    for c in changes:
        if not groups or len(groups[-1]) >= BUNDLE_FILES or size + (c.size or 0) > BUNDLE_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(c)
        size += c.size or 0
    return groups


def _why(change: Change, got: Got | None) -> str:
    if got is None:
        return f"{change.path}: missing from the origin's answer"
    if got.status != 200:
        return f"{change.path}: HTTP {got.status} from the origin (not yet propagated?)"
    if change.mtime and got.mtime and got.mtime < int(change.mtime):
        return f"{change.path}: older than the change that announced it (not yet propagated)"
    return f"{change.path}: sha256 {got.sha256} is not the announced {change.sha256}"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None
