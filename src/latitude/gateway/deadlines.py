"""Bounded waits: nothing the gateway awaits may outlive the request's deadline."""

from __future__ import annotations

import asyncio
import logging

log = logging.getLogger("latitude.gateway")

_abandoned: set[asyncio.Task] = set()


async def bounded(coro, timeout_s: float):
    """Await `coro` for at most `timeout_s`. Unlike `asyncio.wait_for`, a timed-out operation is
    cancelled without waiting for it: a database driver's cancel can itself cross a dead link."""
    task = asyncio.ensure_future(coro)
    done, _ = await asyncio.wait({task}, timeout=timeout_s)
    if task in done:
        return task.result()
    task.cancel()
    _abandoned.add(task)
    task.add_done_callback(lambda t: (_abandoned.discard(t), t.cancelled() or t.exception()))
    raise TimeoutError(f"no result within {timeout_s:.2f} s")


_background: set[asyncio.Task] = set()


def in_background(coro_or_task, then=None) -> asyncio.Task:
    """Let an operation the request stopped waiting for finish on its own (a claim or a write
    held by a stalled link lands when the link heals): keep it referenced until done, then pass
    its result to `then` (not called if it failed or was cancelled)."""
    task = asyncio.ensure_future(coro_or_task)
    _background.add(task)

    def done(t: asyncio.Task) -> None:
        _background.discard(t)
        if t.cancelled():
            return
        if t.exception() is not None:
            log.warning("a background step of an answered request failed: %r", t.exception())
        elif then is not None:
            then(t.result())

    task.add_done_callback(done)
    return task
