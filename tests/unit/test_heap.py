"""`FreezeHeapAfterStartup` freezes at the app's startup.complete, not before, and passes
everything else through untouched."""

from __future__ import annotations

import contextlib
import gc

from latitude.gateway.heap import FreezeHeapAfterStartup, full_collections, heap_status


async def test_freezes_when_the_app_reports_startup_complete_and_not_before():
    seen: list[tuple[str, int]] = []
    inbox = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]

    async def app(scope, receive, send):
        assert scope["type"] == "lifespan"
        await receive()
        seen.append(("before startup.complete", gc.get_freeze_count()))
        await send({"type": "lifespan.startup.complete"})
        await receive()
        await send({"type": "lifespan.shutdown.complete"})

    async def receive():
        return inbox.pop(0)

    async def send(message):
        seen.append((message["type"], gc.get_freeze_count()))

    gc.unfreeze()
    try:
        await FreezeHeapAfterStartup(app)({"type": "lifespan"}, receive, send)
        assert seen[0] == ("before startup.complete", 0)
        assert seen[1][0] == "lifespan.startup.complete" and seen[1][1] > 1000
        assert heap_status()["frozen_objects"] > 1000
        # From then on the collector's full passes are timed.
        before = heap_status()["full_collections"]
        gc.collect()
        after = heap_status()
        assert after["full_collections"] == before + 1
        assert after["full_collection_longest_ms"] > 0
    finally:
        gc.unfreeze()
        with contextlib.suppress(ValueError):
            gc.callbacks.remove(full_collections)


async def test_requests_pass_through_as_they_are():
    got = []

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 204, "headers": []})

    async def send(message):
        got.append(message)

    gc.unfreeze()
    await FreezeHeapAfterStartup(app)({"type": "http"}, None, send)
    assert got == [{"type": "http.response.start", "status": 204, "headers": []}]
    assert gc.get_freeze_count() == 0
