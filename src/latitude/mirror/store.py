"""A content root on disk: URL paths mapped to files, atomic writes, the node's own state.

Layout of a root (the primary's and every mirror's)::

    <root>/simple/name/index.html      the mirrored files, at their URL paths
    <root>/.latitude/changes.sqlite    primary only: the change log (see `changelog`)
    <root>/.latitude/cursor            mirror only: the last serial fully applied (durable)
    <root>/.latitude/status.json       mirror only: what the sync daemon last saw (lag, errors)
    <root>/.latitude/lock              mirror only: held while deletes and the cursor are saved

A file is only ever replaced by renaming a fully written, fsynced temp file of the same folder
over it (`.latitude-tmp-*`, never served, removed at start-up), so a reader sees the old bytes or
the new bytes, and a crash leaves no partial file behind.

No read or write ever resolves outside the root: every access goes through
`ContentRoot.file` (or `stat` / `open` on top of it), which `lstat`s each component below the
root and refuses a symlink, file or folder, with `UnsafePath` naming it; the final open adds
`O_NOFOLLOW`. (The root itself may be a symlink: it is the operator's choice.)
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import secrets
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from latitude import atomic

STATE_DIR = ".latitude"
TMP_PREFIX = ".latitude-tmp-"
INDEX_FILE = "index.html"
HASH_CHUNK = 1 << 20


# The one table of content types, for `mirror serve` and the nginx config alike (nginx picks
# by the last extension, so `.tar.gz` is gzip in both). Anything else: application/octet-stream.
CONTENT_TYPES = {
    "html": "text/html",
    "htm": "text/html",
    "txt": "text/plain",
    "asc": "text/plain",
    "metadata": "text/plain",  # PEP 658 core metadata next to a wheel
    "md": "text/markdown",
    "css": "text/css",
    "csv": "text/csv",
    "xml": "text/xml",
    "js": "text/javascript",
    "json": "application/json",
    "svg": "image/svg+xml",
    "png": "image/png",
    "ico": "image/x-icon",
    "zip": "application/zip",
    "whl": "application/zip",  # a wheel is a zip archive
    "egg": "application/zip",
    "jar": "application/java-archive",
    "gz": "application/gzip",
    "tgz": "application/gzip",
    "bz2": "application/x-bzip2",
    "xz": "application/x-xz",
    "tar": "application/x-tar",
    "phar": "application/octet-stream",
}
DEFAULT_CONTENT_TYPE = "application/octet-stream"
# Compressible types: compressed for a client that accepts gzip, so they always carry
# `Vary: Accept-Encoding`.
COMPRESSIBLE_TYPES = ("text/", "application/json", "image/svg+xml")


def content_type(rel: str) -> str:
    """The Content-Type of a file by its last extension; text in UTF-8."""
    name = rel.rsplit("/", 1)[-1]
    ext = name.rpartition(".")[2].lower() if "." in name else ""
    ctype = CONTENT_TYPES.get(ext, DEFAULT_CONTENT_TYPE)
    return f"{ctype}; charset=utf-8" if ctype.startswith("text/") else ctype


def compressible(ctype: str) -> bool:
    return ctype.startswith(COMPRESSIBLE_TYPES)


class BadPath(ValueError):
    """A URL path that does not name a file inside the content root."""


class UnsafePath(BadPath):
    """A path that is, or goes through, a symlink: refused for reads and writes alike."""


def rel_path(url_path: str) -> str:
    """The file a URL path names, relative to the root: `/simple/x/` -> `simple/x/index.html`.

    Refuses anything that could leave the root or reach the node's own state.
    """
    if "\x00" in url_path or "\\" in url_path:
        raise BadPath(f"{url_path!r}: invalid character")
    path = url_path.lstrip("/")
    if path == "" or path.endswith("/"):
        path += INDEX_FILE
    parts = path.split("/")
    for part in parts:
        if part in ("", ".", ".."):
            raise BadPath(f"{url_path!r}: empty, '.' or '..' segment")
        if part.startswith(".latitude"):
            raise BadPath(f"{url_path!r}: reserved name")
    return path


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


class AtomicFile:
    """A temp file in the target's folder; `commit` fsyncs and renames it into place.

    ``no_clobber`` commits with a hard link instead of a rename, so an existing file (one the
    sync daemon wrote meanwhile) always wins.
    """

    def __init__(self, target: Path):
        self.target = target
        target.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = target.parent / f"{TMP_PREFIX}{secrets.token_hex(6)}-{target.name}"
        self.file = open(self.tmp, "xb")  # noqa: SIM115 - closed by commit/abort
        self.hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> None:
        self.file.write(data)
        self.hash.update(data)
        self.size += len(data)

    def commit(
        self, mtime: float | None = None, *, no_clobber: bool = False, fsync: bool = True
    ) -> bool:
        """Make the file durable (unless the caller fsynced it) and put it in place."""
        try:
            self.file.flush()
            if fsync:
                os.fsync(self.file.fileno())
            self.file.close()
            if mtime is not None:
                os.utime(self.tmp, (mtime, mtime))
            if no_clobber:
                try:
                    os.link(self.tmp, self.target)
                except FileExistsError:
                    return False
                finally:
                    self.tmp.unlink(missing_ok=True)
            else:
                os.replace(self.tmp, self.target)
            return True
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            self.file.close()
        self.tmp.unlink(missing_ok=True)


@dataclass(frozen=True)
class LocalFile:
    path: str
    size: int
    mtime: float


class ContentRoot:
    """The files of one node under `root`, plus its `.latitude` state folder."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root).absolute()
        self.state_dir = self.root / STATE_DIR

    def ensure(self) -> ContentRoot:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        return self

    def file(self, path: str, *, create_parents: bool = False) -> Path:
        """The file for a relative path (as in the change log), checked to stay inside: no
        component below the root may be a symlink. `create_parents` makes missing folders,
        one at a time, so a folder symlink planted meanwhile is refused, not followed."""
        return self._check(path, create_parents)[0]

    def stat(self, path: str) -> os.stat_result | None:
        """The file's own `lstat` (None when it does not exist), after the same checks."""
        return self._check(path, False)[1]

    def open(self, path: str):
        """The file opened for reading, never through a symlink."""
        full = self.file(path)
        try:
            fd = os.open(full, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno == errno.ELOOP:  # became a symlink since the check
                raise self._unsafe(rel_path(path), rel_path(path)) from None
            raise
        return os.fdopen(fd, "rb")

    def read_bytes(self, path: str) -> bytes:
        with self.open(path) as f:
            return f.read()

    def _check(self, path: str, create_parents: bool) -> tuple[Path, os.stat_result | None]:
        rel = rel_path(path)
        parts = rel.split("/")
        here = self.root
        for i, part in enumerate(parts):
            here = here / part
            last = i == len(parts) - 1
            while True:
                try:
                    st = os.lstat(here)
                    break
                except FileNotFoundError:
                    if last or not create_parents:
                        return self.root / rel, None
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(here)  # then lstat again: it may be someone else's symlink
                except NotADirectoryError:
                    return self.root / rel, None  # a file where a folder should be
            if stat.S_ISLNK(st.st_mode):
                raise self._unsafe(rel, "/".join(parts[: i + 1]))
            if last:
                return here, st
        raise AssertionError("unreachable")

    def _unsafe(self, rel: str, link: str) -> UnsafePath:
        return UnsafePath(
            f"{rel}: {link} is a symlink in the content root {self.root}; symlinks are never "
            "followed (they could lead outside the root): replace it with the real "
            "file or folder, or remove it"
        )

    def walk(self, symlinks: list[str] | None = None) -> Iterator[LocalFile]:
        """Every mirrored file (not state, not temp files), as relative paths. Symlinks are
        skipped, and their paths appended to `symlinks` when it is given."""
        for folder, dirs, files in os.walk(self.root):
            base = Path(folder)
            keep = []
            for d in dirs:
                if d.startswith(".latitude"):
                    continue
                if os.path.islink(base / d):
                    if symlinks is not None:
                        symlinks.append((base / d).relative_to(self.root).as_posix())
                    continue
                keep.append(d)
            dirs[:] = keep
            for name in files:
                if name.startswith(".latitude"):
                    continue
                full = base / name
                st = os.lstat(full)
                if stat.S_ISLNK(st.st_mode):
                    if symlinks is not None:
                        symlinks.append(full.relative_to(self.root).as_posix())
                    continue
                if stat.S_ISREG(st.st_mode):
                    yield LocalFile(full.relative_to(self.root).as_posix(), st.st_size, st.st_mtime)

    def hashes(self) -> dict[str, str]:
        return {f.path: sha256_file(self.file(f.path)) for f in self.walk()}

    def remove_temp_files(self) -> int:
        """Remove what a crash mid-write left behind; returns how many."""
        removed = 0
        for folder, dirs, files in os.walk(self.root):
            dirs[:] = [d for d in dirs if d != STATE_DIR]
            for name in files:
                if name.startswith(TMP_PREFIX):
                    (Path(folder) / name).unlink(missing_ok=True)
                    removed += 1
        return removed

    # ---- a mirror's own state --------------------------------------------------------------

    @property
    def cursor_file(self) -> Path:
        return self.state_dir / "cursor"

    @property
    def status_file(self) -> Path:
        return self.state_dir / "status.json"

    def cursor(self) -> int:
        try:
            return int(self.cursor_file.read_text().strip() or 0)
        except FileNotFoundError:
            return 0

    def save_cursor(self, serial: int) -> None:
        atomic.write_text(self.cursor_file, f"{serial}\n", tmp_prefix=TMP_PREFIX)

    def status(self) -> dict:
        try:
            return json.loads(self.status_file.read_text())
        except (FileNotFoundError, ValueError):
            return {}

    def save_status(self, status: dict) -> None:
        # Rewritten on every batch and only a report: not worth an fsync.
        atomic.write_json(self.status_file, status, fsync=False, tmp_prefix=TMP_PREFIX)

    @property
    def sync_lock_file(self) -> Path:
        return self.state_dir / "sync.lock"

    def hold_sync_lock(self, wait_s: float = 2.0):
        """Taken by the sync daemon for its whole life (the kernel drops it when the process
        dies, however it dies): `sync_running` is then exact. Returns the open lock file."""
        self.ensure()
        f = open(self.sync_lock_file, "a+")  # noqa: SIM115 - held until the daemon ends
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    f.seek(0)
                    pid = f.read().strip() or "?"
                    f.close()
                    raise RuntimeError(
                        f"another sync daemon (pid {pid}) is running on {self.root} "
                        f"(it holds {self.sync_lock_file}); stop it first"
                    ) from None
                time.sleep(0.05)  # a health probe holds it for microseconds
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        return f

    def sync_running(self) -> bool:
        """Whether a sync daemon holds this root's sync lock (probed without blocking it)."""
        try:
            f = open(self.sync_lock_file, "rb")  # noqa: SIM115
        except FileNotFoundError:
            return False
        with f:
            try:
                fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(f, fcntl.LOCK_UN)
            return False

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Serialises "apply deletes, save cursor" (sync) with "keep a fetched file" (serve)."""
        self.ensure()
        with open(self.state_dir / "lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)


def http_date(ts: float) -> str:
    return time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(ts))


def parse_http_date(value: str | None) -> float | None:
    if not value:
        return None
    import email.utils

    try:
        parsed = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    return parsed.timestamp()
