"""`FreezeHeapAfterStartup`: moves everything alive once the app has started out of the
garbage collector's sight, and times the collector's full passes from then on.

A gateway process holds a hundred thousand or more long-lived objects (the app, SQLAlchemy,
psycopg, the templates); CPython's oldest-generation collection walks all of them, and a
request that arrives during one waits for it: 74 ms in a process holding 122,000 objects on
this project's 2-core machine, more than a forwarded write's whole own cost ten times over.
After `gc.freeze()` those objects are never scanned again; what requests allocate is collected
as before. The collector is the process's own, so this is done only where Latitude owns the
process (`latitude serve`), never by the middleware alone.
"""

from __future__ import annotations

import gc
import logging
import time

log = logging.getLogger("latitude.gateway")


class FullCollectionTimes:
    """The oldest generation's collections in this process: how many, the longest, in all."""

    def __init__(self) -> None:
        self.count = 0
        self.longest_s = 0.0
        self.total_s = 0.0
        self._started_at: float | None = None

    def __call__(self, phase: str, info: dict) -> None:
        if info.get("generation") != 2:
            return
        if phase == "start":
            self._started_at = time.perf_counter()
        elif self._started_at is not None:
            took = time.perf_counter() - self._started_at
            self._started_at = None
            self.count += 1
            self.total_s += took
            self.longest_s = max(self.longest_s, took)


# One collector per process, so one record of it (the callback is installed once).
full_collections = FullCollectionTimes()


class FreezeHeapAfterStartup:
    """Pure ASGI: passes everything through; when the app reports its lifespan startup
    complete (pools open, routes built), collects once, freezes what is left, and starts
    timing full collections."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return

        async def send_then_freeze(message) -> None:
            if message["type"] == "lifespan.startup.complete":
                gc.collect()
                gc.freeze()
                if full_collections not in gc.callbacks:
                    gc.callbacks.append(full_collections)
                log.debug("froze %d objects after start-up", gc.get_freeze_count())
            await send(message)

        await self.app(scope, receive, send_then_freeze)


def heap_status() -> dict:
    """What `/_latitude/status` shows of this process's collector: how many objects start-up
    left frozen (0: not frozen, e.g. a gateway inside another server) and the full
    collections timed since then."""
    times = full_collections
    return {
        "frozen_objects": gc.get_freeze_count(),
        "full_collections": times.count,
        "full_collection_longest_ms": round(times.longest_s * 1000, 2),
        "full_collection_total_ms": round(times.total_s * 1000, 2),
    }
