"""Bounded waits: nothing the gateway awaits may outlive the request's deadline."""

from __future__ import annotations

import asyncio

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
