"""The read policy: how fresh a read at a replica region must be, and the one decision to
serve it from the local replica or send it to the primary.

* :class:`ConsistencyMode` (eventual / session / strong) and :class:`ConsistencyPolicy`
  (per-route modes, glob patterns).
* :class:`StrongPositionSource`: the primary's position at request start, for ``strong``.
* :func:`read_locally`: the decision, used by the gateway (``PositionTracker``); its answer
  becomes the request's route in :mod:`latitude.db`.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import fnmatch
import time
from collections.abc import Mapping
from typing import Any

from latitude.consistency.position import ReplicationPosition, primary_position_async
from latitude.consistency.watcher import ReplayWatcher

__all__ = [
    "ConsistencyMode",
    "ConsistencyPolicy",
    "StrongPositionSource",
    "read_locally",
]


class ConsistencyMode(enum.Enum):
    """How fresh a read at a replica region must be (as Aurora's global write forwarding offers).

    * ``EVENTUAL`` - never wait: whatever the local replica has.
    * ``SESSION`` - (default) wait for the position of the client's own last write (the cookie).
    * ``STRONG`` - ask the primary for its position at request start (one extra round trip to
      the primary region) and wait for the replica to replay it: every write committed anywhere
      before the read began is visible.
    """

    EVENTUAL = "eventual"
    SESSION = "session"
    STRONG = "strong"

    @classmethod
    def parse(cls, value: str | ConsistencyMode) -> ConsistencyMode:
        if isinstance(value, ConsistencyMode):
            return value
        try:
            return cls(str(value).strip().lower())
        except ValueError:
            raise ValueError(
                f"{value!r} is not a consistency mode; use one of "
                f"{', '.join(repr(m.value) for m in cls)}"
            ) from None


class ConsistencyPolicy:
    """The consistency mode of each route: ``mode_for(path)``.

    ``routes`` maps glob patterns (``fnmatch``: ``*`` also crosses ``/``) or exact paths to modes
    (or their names). An exact path wins, then the longest matching pattern, else ``default``.
    """

    def __init__(
        self,
        default: ConsistencyMode | str = ConsistencyMode.SESSION,
        routes: Mapping[str, ConsistencyMode | str] | None = None,
    ):
        self.default = ConsistencyMode.parse(default)
        self.routes: dict[str, ConsistencyMode] = {}
        for pattern, mode in (routes or {}).items():
            if not isinstance(pattern, str) or not pattern.startswith("/"):
                raise ValueError(f"route pattern {pattern!r} must be a path starting with '/'")
            self.routes[pattern] = ConsistencyMode.parse(mode)
        self._ordered = sorted(
            ((p, m) for p, m in self.routes.items() if _is_glob(p)), key=lambda pm: -len(pm[0])
        )

    @classmethod
    def from_config(cls, value: object) -> ConsistencyPolicy:
        """From the ``[gateway] consistency`` value of latitude.toml: a mode name
        (``"session"``) or a table ``{ default = "session", routes = { "/reports/*" = "strong" } }``.
        """
        if value is None:
            return cls()
        if isinstance(value, str | ConsistencyMode):
            return cls(value)
        if isinstance(value, Mapping):
            unknown = set(value) - {"default", "routes"}
            if unknown:
                raise ValueError(
                    f"gateway.consistency: unknown key(s) {', '.join(sorted(unknown))}; "
                    "allowed: default, routes"
                )
            routes = value.get("routes", {})
            if not isinstance(routes, Mapping):
                raise ValueError(
                    'gateway.consistency.routes must be a table like { "/reports/*" = "strong" }'
                )
            return cls(value.get("default", ConsistencyMode.SESSION), routes)
        raise ValueError(
            'gateway.consistency must be a mode name like "session" or a table '
            '{ default = "session", routes = { "/reports/*" = "strong" } }'
        )

    def mode_for(self, path: str) -> ConsistencyMode:
        exact = self.routes.get(path)
        if exact is not None:
            return exact
        for pattern, mode in self._ordered:
            if fnmatch.fnmatchcase(path, pattern):
                return mode
        return self.default

    def __repr__(self) -> str:
        routes = {p: m.value for p, m in self.routes.items()}
        return f"ConsistencyPolicy(default={self.default.value!r}, routes={routes!r})"


def _is_glob(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


class StrongPositionSource:
    """The primary's current WAL position, for ``STRONG`` reads: one round trip per request.

    Concurrent requests share a query as long as it has not been sent yet (a position read
    after a request arrived is valid for it); a small pool keeps connections to the primary
    open, so no connection handshake is paid per request.
    """

    def __init__(self, primary_dsn: str, min_size: int = 1, max_size: int = 4):
        self.primary_dsn = primary_dsn
        self.min_size = min_size
        self.max_size = max_size
        self.queries = 0
        self.requests = 0
        self._pool: Any = None
        self._boarding: asyncio.Future | None = None
        self._tasks: set[asyncio.Task] = set()

    async def open(self, wait: bool = True, timeout_s: float = 30.0) -> None:
        from psycopg_pool import AsyncConnectionPool

        self._pool = AsyncConnectionPool(
            self.primary_dsn,
            min_size=self.min_size,
            max_size=self.max_size,
            kwargs={"autocommit": True, "application_name": "latitude-strong-reads"},
            open=False,
            name="latitude-strong",
        )
        await self._pool.open(wait=wait, timeout=timeout_s)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    async def __aenter__(self) -> StrongPositionSource:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def current(self, timeout_s: float | None = None) -> ReplicationPosition:
        """The primary's position, read after this call began."""
        if self._pool is None:
            raise RuntimeError("StrongPositionSource.current before open()")
        self.requests += 1
        flight = self._boarding
        if flight is None:
            flight = self._boarding = asyncio.get_running_loop().create_future()
            flight.add_done_callback(lambda f: f.cancelled() or f.exception())
            task = asyncio.create_task(self._fly(flight))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        if timeout_s is None:
            return await asyncio.shield(flight)
        return await asyncio.wait_for(asyncio.shield(flight), timeout_s)

    async def _fly(self, flight: asyncio.Future) -> None:
        try:
            async with self._pool.connection() as conn:
                # Boarding closes before the query is sent: a later arrival takes the next one.
                if self._boarding is flight:
                    self._boarding = None
                self.queries += 1
                position = await primary_position_async(conn)
            if not flight.done():
                flight.set_result(position)
        except asyncio.CancelledError:
            if self._boarding is flight:
                self._boarding = None
            flight.cancel()
            raise
        except Exception as exc:
            if self._boarding is flight:
                self._boarding = None
            if not flight.done():
                flight.set_exception(exc)


async def read_locally(
    mode: ConsistencyMode,
    watcher: ReplayWatcher | None,
    *,
    cookie_position: ReplicationPosition | None = None,
    strong: StrongPositionSource | None = None,
    timeout_s: float = 0.5,
) -> bool:
    """For a read at a replica region: True when it may be served by the local replica now
    (after waiting, bounded by ``timeout_s`` in all, if needed), False when it should be sent to
    the primary instead.

    * ``EVENTUAL``: True, at once.
    * ``SESSION``: the replica must have replayed ``cookie_position`` (the client's own last
      write); no position, no wait.
    * ``STRONG``: the replica must have replayed the primary's position read after the request
      began (``strong``). That position already covers the client's own earlier writes, so the
      cookie adds nothing; without a source, or if the primary does not answer in time,
      freshness cannot be proven and the read goes to the primary.
    * No ``watcher`` (none started yet, e.g. in a region demoted moments ago whose database is
      restarting): nothing can prove the replica fresh, so a read that has a position to wait
      for goes to the primary; one without is served locally.
    """
    if mode is ConsistencyMode.EVENTUAL:
        return True
    if mode is ConsistencyMode.STRONG:
        if strong is None or watcher is None:
            return False
        deadline = time.monotonic() + timeout_s
        try:
            target = await strong.current(timeout_s)
        except Exception:  # the primary is unreachable or slow: freshness cannot be proven
            return False
        watcher.note_timeline(target.timeline)
        timeout_s = max(0.0, deadline - time.monotonic())
    else:
        target = cookie_position
    if target is None:
        return True
    if watcher is None:
        return False
    try:
        return await watcher.wait_for(target, timeout_s)
    except RuntimeError:  # closed under us (a promotion swapped it): ask the primary
        return False
