"""The journal of a running promotion: one at a time (a lock), and what is done so far (a file
rewritten after each step), so an interrupted one can be reported and resumed."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

from latitude import atomic


class PromotionError(Exception):
    """A promotion failed part-way; the message says where it stopped and what to do."""

    exit_code = 1


class BadPromotion(PromotionError):
    """The promotion was refused before anything changed (bad input)."""

    exit_code = 2


class Journal:
    def __init__(self, folder: Path | str):
        self.folder = Path(folder)
        self.path = self.folder / "promotion.json"
        self.data: dict = {}

    def read(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    @contextlib.contextmanager
    def running(self, target: str, kind: str) -> Iterator[Journal]:
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / "promotion.lock", "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                other = self.read() or {}
                raise BadPromotion(
                    f"another promotion is running (to {other.get('target', '?')}, started "
                    f"{time.strftime('%H:%M:%S', time.localtime(other.get('started_at', 0)))}); "
                    "wait for it to finish"
                ) from None
            earlier = self.read()
            if earlier and earlier.get("target") != target:
                raise BadPromotion(
                    f"a promotion to {earlier['target']} was interrupted after step "
                    f"{earlier.get('done', ['none'])[-1] if earlier.get('done') else 'none'}; "
                    f"finish it first: promote {earlier['target']} again"
                )
            self.data = earlier or {
                "target": target,
                "kind": kind,
                "started_at": time.time(),
                "done": [],
            }
            self.data["pid"] = os.getpid()
            self.save()
            try:
                yield self
            except BaseException:
                # Nothing changed yet: forget it, so another promotion is not blocked by it.
                if set(self.data.get("done", [])) <= {"checked"}:
                    self.path.unlink(missing_ok=True)
                raise
            self.path.unlink(missing_ok=True)

    def done(self, step: str) -> bool:
        return step in self.data.get("done", [])

    def mark(self, step: str, **facts) -> None:
        self.data.setdefault("done", []).append(step)
        self.data.update(facts)
        self.save()

    def save(self) -> None:
        atomic.write_json(self.path, self.data, indent=2)
