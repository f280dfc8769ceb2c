"""The primary's change log: every publish or delete gets a strictly increasing serial.

Stored in SQLite (`<root>/.latitude/changes.sqlite`, WAL, `synchronous=FULL`) so that several
processes (the feed server, `latitude mirror publish`, an application's own publisher) share it:

* `changes`  one row per change; `serial` is an AUTOINCREMENT key, so it is never reused, even
  after old rows are pruned, and its order is the commit order.
* `files`    the current tree (path, sha256, size, mtime, serial of its last change), updated in
  the same transaction: a consistent snapshot for mirrors that must `resync`.
* `meta`     `floor`: the highest serial pruned away. A cursor below it cannot be continued.
             `epoch`: the primary epoch this log was started in (absent: epoch 1).

The log keeps `retention_s` (default 24 h, as Packagist's feed does); a cursor older than what
it keeps is answered with `resync`.
"""

from __future__ import annotations

import base64
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

DEFAULT_RETENTION_S = 24 * 3600.0

SCHEMA = """
CREATE TABLE IF NOT EXISTS changes (
    serial INTEGER PRIMARY KEY AUTOINCREMENT,
    op TEXT NOT NULL CHECK (op IN ('put', 'delete')),
    path TEXT NOT NULL,
    sha256 TEXT,
    size INTEGER,
    mtime REAL,
    at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS changes_at ON changes (at);
CREATE INDEX IF NOT EXISTS changes_path ON changes (path);
CREATE TABLE IF NOT EXISTS files (
    path TEXT PRIMARY KEY,
    sha256 TEXT NOT NULL,
    size INTEGER NOT NULL,
    mtime REAL NOT NULL,
    serial INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


@dataclass(frozen=True)
class Change:
    """One entry of the feed. For a delete, `sha256`, `size` and `mtime` are None.

    `data` is the file's content when the feed carried it inline (small files); it is checked
    against `sha256` like any download.
    """

    serial: int
    op: str
    path: str
    sha256: str | None = None
    size: int | None = None
    mtime: float | None = None
    data: bytes | None = field(default=None, repr=False, compare=False)

    def to_json(self) -> dict:
        out = asdict(self)
        data = out.pop("data")
        if data is not None:
            out["data"] = base64.b64encode(data).decode("ascii")
        return out

    @classmethod
    def from_json(cls, data: dict) -> Change:
        inline = data.get("data")
        return cls(
            serial=int(data["serial"]),
            op=str(data["op"]),
            path=str(data["path"]),
            sha256=data.get("sha256"),
            size=data.get("size"),
            mtime=data.get("mtime"),
            data=base64.b64decode(inline, validate=True) if inline is not None else None,
        )


@dataclass(frozen=True)
class Page:
    """An answer to "what changed since N": `resync`, or changes and where to continue."""

    head: int
    floor: int
    changes: tuple[Change, ...] = ()
    resync: bool = False

    @property
    def next(self) -> int:
        return self.changes[-1].serial if self.changes else self.head


class ChangeLog:
    def __init__(self, path: str | Path, retention_s: float = DEFAULT_RETENTION_S):
        self.path = Path(path)
        self.retention_s = float(retention_s)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        self.db.close()

    # ---- reading ---------------------------------------------------------------------------

    def head(self) -> int:
        row = self.db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'changes'").fetchone()
        return int(row[0]) if row else 0

    def floor(self) -> int:
        row = self.db.execute("SELECT value FROM meta WHERE key = 'floor'").fetchone()
        return int(row[0]) if row else 0

    def data_version(self) -> int:
        """Changes whenever another connection commits (cheap to poll)."""
        return int(self.db.execute("PRAGMA data_version").fetchone()[0])

    def since(self, serial: int, limit: int = 5000) -> Page:
        self.db.execute("BEGIN")
        try:
            head, floor = self.head(), self.floor()
            if serial < floor:
                return Page(head, floor, resync=True)
            rows = self.db.execute(
                "SELECT serial, op, path, sha256, size, mtime FROM changes"
                " WHERE serial > ? ORDER BY serial LIMIT ?",
                (serial, limit),
            ).fetchall()
        finally:
            self.db.execute("COMMIT")
        return Page(head, floor, tuple(Change(*r) for r in rows))

    def snapshot(self) -> tuple[int, list[dict]]:
        """The serial and the whole current tree, read in one transaction."""
        self.db.execute("BEGIN")
        try:
            head = self.head()
            rows = self.db.execute(
                "SELECT path, sha256, size, mtime, serial FROM files ORDER BY path"
            ).fetchall()
        finally:
            self.db.execute("COMMIT")
        keys = ("path", "sha256", "size", "mtime", "serial")
        return head, [dict(zip(keys, r, strict=True)) for r in rows]

    def file(self, path: str) -> dict | None:
        row = self.db.execute(
            "SELECT sha256, size, mtime, serial FROM files WHERE path = ?", (path,)
        ).fetchone()
        return dict(zip(("sha256", "size", "mtime", "serial"), row, strict=True)) if row else None

    def last_mtime(self, path: str) -> float | None:
        """The mtime of the path's latest version, even if it was deleted since (while the
        log remembers it)."""
        row = self.db.execute("SELECT mtime FROM files WHERE path = ?", (path,)).fetchone()
        if row is None:
            row = self.db.execute(
                "SELECT max(mtime) FROM changes WHERE path = ? AND op = 'put'", (path,)
            ).fetchone()
        return None if row is None or row[0] is None else float(row[0])

    def serials(self, paths: list[str]) -> dict[str, int]:
        """The serial of the last change of each path that exists."""
        out: dict[str, int] = {}
        for i in range(0, len(paths), 500):
            chunk = paths[i : i + 500]
            marks = ",".join("?" * len(chunk))
            rows = self.db.execute(f"SELECT path, serial FROM files WHERE path IN ({marks})", chunk)
            out.update(dict(rows.fetchall()))
        return out

    # ---- writing (the publisher's) ---------------------------------------------------------

    def begin(self) -> None:
        """Take the write lock: the caller renames its files, then `record`s and `commit`s."""
        self.db.execute("BEGIN IMMEDIATE")

    def record(
        self, entries: Iterable[tuple[str, str, str | None, int | None, float | None]]
    ) -> list[Change]:
        """Append (op, path, sha256, size, mtime) rows inside `begin`/`commit`."""
        now = time.time()
        out = []
        for op, path, sha, size, mtime in entries:
            cur = self.db.execute(
                "INSERT INTO changes (op, path, sha256, size, mtime, at) VALUES (?, ?, ?, ?, ?, ?)",
                (op, path, sha, size, mtime, now),
            )
            serial = int(cur.lastrowid)
            if op == "put":
                self.db.execute(
                    "INSERT OR REPLACE INTO files (path, sha256, size, mtime, serial)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (path, sha, size, mtime, serial),
                )
            else:
                self.db.execute("DELETE FROM files WHERE path = ?", (path,))
            out.append(Change(serial, op, path, sha, size, mtime))
        return out

    def commit(self) -> None:
        self.db.execute("COMMIT")

    def rollback(self) -> None:
        if self.db.in_transaction:
            self.db.execute("ROLLBACK")

    def epoch(self) -> int:
        row = self.db.execute("SELECT value FROM meta WHERE key = 'epoch'").fetchone()
        return int(row[0]) if row else 1

    def restart(self, floor: int, epoch: int, files: Iterable[tuple[str, str, int, float]]) -> None:
        """Begin the log afresh at serial `floor`, the tree being `files` (path, sha256, size,
        mtime): a region that became primary in `epoch` starts its own log from what it holds.
        Every cursor of an earlier log is below `floor`, so its mirror resyncs (hash by hash)."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            if floor < self.head():
                raise ValueError(f"a log cannot restart at {floor}, below its head {self.head()}")
            self.db.execute("DELETE FROM changes")
            self.db.execute("DELETE FROM files")
            self.db.executemany(
                "INSERT INTO files (path, sha256, size, mtime, serial) VALUES (?, ?, ?, ?, ?)",
                ((path, sha, size, mtime, floor) for path, sha, size, mtime in files),
            )
            self.db.execute("DELETE FROM sqlite_sequence WHERE name = 'changes'")
            self.db.execute(
                "INSERT INTO sqlite_sequence (name, seq) VALUES ('changes', ?)", (floor,)
            )
            for key, value in (("floor", floor), ("epoch", epoch)):
                self.db.execute(
                    "INSERT INTO meta (key, value) VALUES (?, ?)"
                    " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    (key, value),
                )
            self.db.execute("COMMIT")
        except BaseException:
            self.rollback()
            raise

    def prune(self, older_than_s: float | None = None, now: float | None = None) -> int:
        """Forget changes older than the retention window; returns the new floor."""
        keep = self.retention_s if older_than_s is None else older_than_s
        cutoff = (time.time() if now is None else now) - keep
        self.db.execute("BEGIN IMMEDIATE")
        try:
            row = self.db.execute(
                "SELECT max(serial) FROM changes WHERE at < ?", (cutoff,)
            ).fetchone()
            if row[0] is not None:
                self.db.execute("DELETE FROM changes WHERE serial <= ?", (row[0],))
                self.db.execute(
                    "INSERT INTO meta (key, value) VALUES ('floor', ?)"
                    " ON CONFLICT (key) DO UPDATE SET value = max(value, excluded.value)",
                    (row[0],),
                )
            self.db.execute("COMMIT")
        except BaseException:
            self.rollback()
            raise
        return self.floor()
