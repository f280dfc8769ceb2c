"""Publishing at the primary: write files under the content root, then record the change.

Order, for every change: the file is written to a temp file in its folder, fsynced, renamed
into place and its folder fsynced; only then is the change committed to the log with its new
serial. Readers of the feed therefore never hear of a file that is not durably there. The log's
write lock is held across the rename so two publishers of the same path cannot record their
changes in the opposite order from their renames.

After a commit the publisher pokes the feed server (a datagram on a socket named after the
root) so long-polling mirrors hear of the change at once; the server also re-reads the log
twice a second, so a lost poke costs at most half a second.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import os
import socket
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from latitude.atomic import fsync_dir
from latitude.mirror.changelog import DEFAULT_RETENTION_S, Change, ChangeLog
from latitude.mirror.store import (
    AtomicFile,
    ContentRoot,
    UnsafePath,
    rel_path,
    sha256_file,
)

GZIP_SUFFIXES = (".html", ".json", ".xml", ".txt", ".css", ".js", ".svg")


def notify_address(root: Path) -> str:
    """Where the feed server of `root` listens for pokes (abstract socket on Linux)."""
    digest = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:24]
    if sys.platform.startswith("linux"):
        return f"\0latitude-mirror-{digest}"
    return str(root / ".latitude" / "notify.sock")


def poke(root: Path) -> None:
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.setblocking(False)
        s.sendto(b"!", notify_address(root))


Source = bytes | str | os.PathLike[str] | BinaryIO  # str is text, a Path is a file


@dataclass(frozen=True)
class Item:
    """One file to publish: its path under the root and its content."""

    path: str
    content: Source
    mtime: float | None = None


class Publisher:
    """The primary's publishing API. Not thread-safe; one per thread or process."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        retention_s: float = DEFAULT_RETENTION_S,
        precompress: bool = False,
    ):
        self.root = ContentRoot(root).ensure()
        from latitude.mirror.role import check_publishable  # (role imports the promotion part)

        check_publishable(self.root)
        self.log = ChangeLog(self.root.state_dir / "changes.sqlite", retention_s)
        self.precompress = precompress

    def close(self) -> None:
        self.log.close()

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- the API ---------------------------------------------------------------------------

    def publish(self, path: str, content: Source, mtime: float | None = None) -> Change:
        """Publish one file; returns its change (the last one if a `.gz` is made too)."""
        return self.publish_many([Item(path, content, mtime)])[-1]

    def delete(self, path: str) -> Change | None:
        return (self.delete_many([path]) or [None])[-1]

    def publish_many(self, items: Iterable[Item]) -> list[Change]:
        """Publish several files as consecutive serials, with one log commit."""
        items = list(items)
        staged: list[tuple[AtomicFile, str, float | None]] = []
        try:
            for item in items:
                path = rel_path(item.path)
                data = _read(item.content)
                staged.append((self._stage(path, data), path, item.mtime))
                if self.precompress and path.endswith(GZIP_SUFFIXES):
                    gz = gzip.compress(data, compresslevel=9, mtime=0)
                    staged.append((self._stage(path + ".gz", gz), path + ".gz", item.mtime))
            return self._commit_puts(staged)
        finally:
            for f, _, _ in staged:
                f.abort()  # no-op once renamed

    def delete_many(self, paths: Iterable[str]) -> list[Change]:
        targets = []
        for p in paths:
            path = rel_path(p)
            targets.append(path)
            self.root.file(path)  # refuses a symlink before anything is deleted
            if self.precompress and self.root.stat(path + ".gz") is not None:
                targets.append(path + ".gz")
        self.log.begin()
        try:
            for path in targets:
                self.root.file(path).unlink(missing_ok=True)
            for folder in {self.root.file(p).parent for p in targets}:
                if folder.exists():
                    fsync_dir(folder)
            changes = self.log.record(("delete", p, None, None, None) for p in targets)
            self.log.commit()
        except BaseException:
            self.log.rollback()
            raise
        poke(self.root.root)
        return changes

    def publish_tree(self) -> list[Change]:
        """Record whatever differs between the files on disk and the log (first import, files
        copied in by other tools, or a crash between a rename and its commit)."""
        _, known = self.log.snapshot()
        known_sha = {f["path"]: f["sha256"] for f in known}
        changed, on_disk, symlinks = [], set(), []
        for f in self.root.walk(symlinks):
            on_disk.add(f.path)
            sha = sha256_file(self.root.file(f.path))
            if known_sha.get(f.path) != sha:
                changed.append(("put", f.path, sha, f.size, f.mtime))
        if symlinks:
            raise UnsafePath(
                f"refusing to scan {self.root.root}: {', '.join(sorted(symlinks))} "
                f"{'is a symlink' if len(symlinks) == 1 else 'are symlinks'}; symlinks are never "
                "published (they could lead outside the root): replace each with a copy of "
                "what it points to, or remove it"
            )
        for i, (op, path, sha, size, mtime) in enumerate(changed):
            later = self._later_second(path, mtime)
            if later != mtime:
                os.utime(self.root.file(path), (later, later))
                changed[i] = (op, path, sha, size, later)
        gone = [("delete", p, None, None, None) for p in known_sha if p not in on_disk]
        if not changed and not gone:
            return []
        self.log.begin()
        try:
            changes = self.log.record(changed + gone)
            self.log.commit()
        except BaseException:
            self.log.rollback()
            raise
        poke(self.root.root)
        return changes

    def prune(self, older_than_s: float | None = None) -> int:
        return self.log.prune(older_than_s)

    @property
    def serial(self) -> int:
        return self.log.head()

    # ---- steps -----------------------------------------------------------------------------

    def _stage(self, path: str, data: bytes) -> AtomicFile:
        f = AtomicFile(self.root.file(path, create_parents=True))
        f.write(data)
        f.file.flush()
        os.fsync(f.file.fileno())
        return f

    def _later_second(self, path: str, mtime: float) -> float:
        """`mtime`, or the second after the previous version's when it falls in the same (or an
        earlier) whole second.

        Last-Modified has one-second resolution and clients such as composer revalidate with
        If-Modified-Since alone: two versions of a path within one second would share a
        Last-Modified, and the second would be answered 304. So every version gets a later
        whole second than the one before (mirrors copy the origin's mtime, so this holds on
        every node); a path republished many times a second runs ahead of the clock.
        """
        prev = self.log.last_mtime(path)
        if prev is not None and int(mtime) <= int(prev):
            return float(int(prev) + 1)
        return mtime

    def _commit_puts(self, staged: list[tuple[AtomicFile, str, float | None]]) -> list[Change]:
        self.log.begin()
        try:
            entries, chosen = [], {}
            for f, path, mtime in staged:
                mtime = self._later_second(path, time.time() if mtime is None else mtime)
                if path.endswith(".gz") and path[:-3] in chosen:
                    mtime = max(mtime, chosen[path[:-3]])  # never older than its file
                chosen[path] = mtime
                f.commit(mtime)  # fsync (again, cheap) + rename under the log's write lock
                st = f.target.stat()
                entries.append(("put", path, f.hash.hexdigest(), f.size, st.st_mtime))
            for folder in {f.target.parent for f, _, _ in staged}:
                fsync_dir(folder)
            changes = self.log.record(entries)
            self.log.commit()
        except BaseException:
            self.log.rollback()
            raise
        poke(self.root.root)
        return changes


def _read(content: Source) -> bytes:
    """bytes as they are, str as UTF-8 text, a path's file, or a binary file object."""
    if isinstance(content, bytes | bytearray | memoryview):
        return bytes(content)
    if isinstance(content, str):
        return content.encode()
    if isinstance(content, os.PathLike):
        return Path(content).read_bytes()
    return content.read()
