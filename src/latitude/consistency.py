"""Read-your-writes across regions: Postgres replication positions, stamped and waited for.

After a write at the primary the response carries the primary's WAL position (an LSN); the
replica region keeps it in a signed cookie, and a later read there waits (bounded) until the
local replica has replayed that position, or is forwarded to the primary. Other systems pin a
user to the primary for a fixed 2, 5 or 15 s after a write; a position is both faster (a read
waits only as long as replication actually lags) and a guarantee (a time window is a guess).

Parts, all used by the gateway:

* :class:`ReplicationPosition` - an LSN such as ``16/B374D848``: parse, format, total order.
* :data:`current_route` / :data:`current_request` - which database the current request may use
  (``"replica"`` or ``"primary"``) and what the request is, for the database routing in
  :mod:`latitude.db` and for its error messages.
* :class:`PositionCookie` - the position in an HMAC-signed, expiring cookie.
* :func:`primary_position` / :func:`primary_position_async` - the primary's position after a
  commit.
* :class:`ReplayWatcher` - ONE per process: follows the local replica's replay position and wakes
  waiting reads when it arrives. A read without a pending position costs no query.
* :class:`ConsistencyMode`, :class:`ConsistencyPolicy` (per-route modes, glob patterns) and
  :class:`StrongPositionSource` (the primary's position at request start, for ``strong``).

This module is a leaf: it imports no other ``latitude`` module.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import enum
import fnmatch
import hashlib
import heapq
import hmac
import itertools
import logging
import re
import time
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from functools import total_ordering
from typing import Any

__all__ = [
    "PRIMARY",
    "REPLICA",
    "ConsistencyMode",
    "ConsistencyPolicy",
    "CookieClaim",
    "PositionCookie",
    "ReplayWatcher",
    "ReplicationPosition",
    "RequestInfo",
    "StrongPositionSource",
    "WriteOnReplicaError",
    "current_request",
    "current_route",
    "ensure_read_consistency",
    "primary_position",
    "primary_position_async",
    "request_context",
    "route_to_primary",
    "route_to_replica",
]

log = logging.getLogger(__name__)

# ---- positions ---------------------------------------------------------------------------

_LSN_RE = re.compile(r"([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})")
_MAX_LSN = (1 << 64) - 1


@total_ordering
@dataclass(frozen=True, slots=True)
class ReplicationPosition:
    """A Postgres WAL position (``pg_lsn``): two 32-bit hex halves, ``"16/B374D848"``.

    Positions compare in WAL order (a total order); ``a - b`` is the distance in bytes.
    """

    value: int

    def __post_init__(self) -> None:
        if isinstance(self.value, bool) or not isinstance(self.value, int):
            raise ValueError(f"a replication position is an int, got {self.value!r}")
        if not 0 <= self.value <= _MAX_LSN:
            raise ValueError(f"a replication position is between 0 and 2**64 - 1, got {self.value}")

    @classmethod
    def parse(cls, text: str) -> ReplicationPosition:
        """Parse Postgres' text form, ``X/Y`` with 1-8 hex digits each side."""
        if not isinstance(text, str):
            raise ValueError(f"a replication position is text like '16/B374D848', got {text!r}")
        m = _LSN_RE.fullmatch(text)
        if not m:
            shown = text if len(text) <= 40 else text[:40] + "..."
            raise ValueError(
                f"{shown!r} is not a Postgres WAL position; expected two hex numbers of at "
                "most 8 digits separated by '/', like '16/B374D848'"
            )
        return cls((int(m[1], 16) << 32) | int(m[2], 16))

    @classmethod
    def from_int(cls, value: int) -> ReplicationPosition:
        return cls(value)

    def to_int(self) -> int:
        return self.value

    def __int__(self) -> int:
        return self.value

    def __str__(self) -> str:
        # Postgres' own spelling (pg_lsn_out): upper-case hex, no padding.
        return f"{self.value >> 32:X}/{self.value & 0xFFFFFFFF:X}"

    def __repr__(self) -> str:
        return f"ReplicationPosition('{self}')"

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, ReplicationPosition):
            return NotImplemented
        return self.value < other.value

    def __sub__(self, other: ReplicationPosition) -> int:
        if not isinstance(other, ReplicationPosition):
            return NotImplemented
        return self.value - other.value


def _position_or_none(raw: Any) -> ReplicationPosition | None:
    if raw is None:
        return None
    return ReplicationPosition.parse(str(raw))


# ---- the route of the current request ------------------------------------------------------

REPLICA = "replica"
PRIMARY = "primary"
_ROUTES = (REPLICA, PRIMARY)

current_route: ContextVar[str] = ContextVar("latitude_route", default=REPLICA)
"""Which database the current request may use: ``"replica"`` (default) or ``"primary"``.

The gateway sets it before calling the app: a local read at a replica region gets
``"replica"``; everything at the primary region, forwarded requests and local-fallback writes get
``"primary"``. :mod:`latitude.db` reads it to pick an engine / Django database.
"""


@dataclass(frozen=True, slots=True)
class RequestInfo:
    method: str
    path: str
    region: str | None = None

    def __str__(self) -> str:
        where = f" in {self.region}" if self.region else ""
        return f"{self.method} {self.path}{where}"


current_request: ContextVar[RequestInfo | None] = ContextVar("latitude_request", default=None)
"""The request being served (method, path, region), so that errors can name it."""


@contextlib.contextmanager
def _set(var: ContextVar, value: Any) -> Iterator[None]:
    token = var.set(value)
    try:
        yield
    finally:
        var.reset(token)


def route_to_primary() -> contextlib.AbstractContextManager[None]:
    """``with route_to_primary(): ...`` - database work inside goes to the primary."""
    return _set(current_route, PRIMARY)


def route_to_replica() -> contextlib.AbstractContextManager[None]:
    """``with route_to_replica(): ...`` - reads inside go to the local replica."""
    return _set(current_route, REPLICA)


def request_context(
    method: str, path: str, region: str | None = None
) -> contextlib.AbstractContextManager[None]:
    """``with request_context("GET", "/x", "eu-west"): ...`` sets :data:`current_request`."""
    return _set(current_request, RequestInfo(method.upper(), path, region))


@dataclass(frozen=True, slots=True)
class ClaimFence:
    """The idempotency claim the current request runs under (key and claim time), and how long
    the database may wait, within one of its transactions, for the app's next statement."""

    key: str
    started_at: Any
    idle_timeout_s: float | None = None


current_claim: ContextVar[ClaimFence | None] = ContextVar("latitude_claim", default=None)
"""Set by the gateway while the app runs a claimed (non-read) request. :mod:`latitude.db` then
marks the claim "applied" inside each of the app's transactions on the primary, so a commit
and its mark land together or not at all: a retry can tell "never ran" from "ran, answer lost",
and a run whose claim was taken over cannot commit (see :mod:`latitude.idempotency`)."""


def claimed(
    key: str, started_at: Any, idle_timeout_s: float | None = None
) -> contextlib.AbstractContextManager[None]:
    """``with claimed(claim.key, claim.started_at): ...`` sets :data:`current_claim`."""
    return _set(current_claim, ClaimFence(key, started_at, idle_timeout_s))


class ClaimLost(Exception):
    """The request's idempotency claim is no longer its own (taken over, or settled): its
    transaction is refused before it writes anything."""

    def __init__(self, key: str):
        super().__init__(
            f"idempotency key {key!r}: this run's claim was taken over by a retry; "
            "its transaction is refused so that the request runs once"
        )


class WriteOnReplicaError(Exception):
    """The app tried to write on a read replica (Postgres SQLSTATE 25006).

    The request was served locally as a read; if the route writes, it must be forwarded to the
    primary region: list it in ``[routes] always_forward`` in ``latitude.toml``.
    """

    def __init__(
        self,
        request: RequestInfo | None = None,
        route: str | None = None,
        detail: str | None = None,
        statement: str | None = None,
    ):
        self.request = request if request is not None else current_request.get()
        self.route = route if route is not None else current_route.get()
        self.detail = detail
        self.statement = statement
        super().__init__(self._message())

    def _message(self) -> str:
        req = self.request
        what = f" ({_one_line(self.statement)})" if self.statement else ""
        pg = f" Postgres said: {self.detail}." if self.detail else ""
        if req is None:
            return (
                f"a write{what} was attempted on a read-only replica connection outside of any "
                f"request (current route: {self.route}); run it inside "
                "`latitude.consistency.route_to_primary()` or use the primary database." + pg
            )
        where = f" in {req.region}" if req.region else ""
        return (
            f"{req.method} {req.path}{where} tried to write{what} on the local read replica: "
            f"the request was served locally as a read (route: {self.route}). "
            f"If this route writes, list it in `[routes] always_forward` in latitude.toml, "
            f'e.g. always_forward = ["{req.path}"], so that it is forwarded to the primary '
            "region." + pg
        )


def _one_line(sql: str, limit: int = 80) -> str:
    text = " ".join(str(sql).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---- the position cookie ------------------------------------------------------------------

_COOKIE_KEY_LABEL = b"latitude position cookie v1"
_COOKIE_MAX_LEN = 512
_REGION_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")


def _b64e(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64d(text: str) -> bytes:
    if not re.fullmatch(r"[A-Za-z0-9_-]*", text):
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True, slots=True)
class CookieClaim:
    position: ReplicationPosition
    region: str
    expires_at: int


class PositionCookie:
    """The replication position of a client's last write, in a signed, expiring cookie.

    Value: ``base64url("<lsn>|<expires unix s>|<region>") "." base64url(hmac-sha256)``. The MAC
    key is derived from ``secret`` (so the signing secret can be shared safely). A cookie that is
    missing, unsigned, forged, tampered, expired or malformed reads as ``None``: the read then
    simply does not wait, which is what a client without a cookie gets too.
    """

    def __init__(self, secret: bytes, name: str = "latitude_pos", max_age_s: int = 30):
        if not isinstance(secret, bytes | bytearray) or len(secret) < 16:
            raise ValueError("PositionCookie needs a secret of at least 16 bytes")
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise ValueError(f"{name!r} is not a usable cookie name")
        if max_age_s <= 0:
            raise ValueError(f"max_age_s must be positive, got {max_age_s!r}")
        self.name = name
        self.max_age_s = int(max_age_s)
        self._key = hmac.new(bytes(secret), _COOKIE_KEY_LABEL, hashlib.sha256).digest()

    def _mac(self, payload: bytes) -> bytes:
        return hmac.new(self._key, self.name.encode() + b"\x00" + payload, hashlib.sha256).digest()

    def issue(self, position: ReplicationPosition, region: str, now: float | None = None) -> str:
        if not isinstance(position, ReplicationPosition):
            raise TypeError(f"position must be a ReplicationPosition, got {position!r}")
        if not _REGION_RE.fullmatch(region):
            raise ValueError(f"{region!r} is not a region name")
        expires = int(time.time() if now is None else now) + self.max_age_s
        payload = f"{position}|{expires}|{region}".encode("ascii")
        return f"{_b64e(payload)}.{_b64e(self._mac(payload))}"

    def read_claim(self, value: str | None, now: float | None = None) -> CookieClaim | None:
        """The verified contents of a cookie value, or ``None``. Never raises."""
        try:
            if not value or not isinstance(value, str) or len(value) > _COOKIE_MAX_LEN:
                return None
            body, sep, mac = value.partition(".")
            if not sep:
                return None
            payload = _b64d(body)
            if not hmac.compare_digest(_b64d(mac), self._mac(payload)):
                return None
            lsn, expires_text, region = payload.decode("ascii").split("|")
            if not expires_text.isdigit():
                return None
            expires = int(expires_text)
            if (time.time() if now is None else now) >= expires:
                return None
            return CookieClaim(ReplicationPosition.parse(lsn), region, expires)
        except (ValueError, TypeError, binascii.Error, UnicodeError):
            return None

    def read(self, value: str | None, now: float | None = None) -> ReplicationPosition | None:
        """The position in a cookie value, or ``None`` (missing, forged, expired...)."""
        claim = self.read_claim(value, now)
        return claim.position if claim else None

    def value_from_header(self, cookie_header: str | None) -> str | None:
        """This cookie's value in a request's ``Cookie`` header, if present."""
        if not cookie_header:
            return None
        for part in cookie_header.split(";"):
            key, sep, val = part.strip().partition("=")
            if sep and key == self.name:
                return val.strip().strip('"')
        return None

    def set_cookie_header(self, value: str, secure: bool) -> str:
        """A ``Set-Cookie`` header value carrying ``value``."""
        attrs = f"{self.name}={value}; Path=/; Max-Age={self.max_age_s}; HttpOnly; SameSite=Lax"
        return attrs + "; Secure" if secure else attrs

    def clear_cookie_header(self, secure: bool) -> str:
        """A ``Set-Cookie`` header value that deletes the cookie."""
        attrs = f"{self.name}=; Path=/; Max-Age=0; HttpOnly; SameSite=Lax"
        return attrs + "; Secure" if secure else attrs


# ---- the primary's position -----------------------------------------------------------------

# pg_current_wal_lsn() is the primary's WAL *write* position. With synchronous_commit on (the
# default), a commit returns only after its WAL is flushed, so this position, read after the
# commit on any connection, is >= the end of the commit record; and it is WAL the walsender
# can already ship. pg_current_wal_insert_lsn() can run ahead of what has been written (other
# sessions' in-flight WAL) and, at a page boundary, points past the page header, beyond any
# replay position a replica reports until more WAL arrives: a waiting read could then wait for
# nothing. It is only needed when the app commits with synchronous_commit = off.
_PRIMARY_SQL = "SELECT pg_current_wal_lsn()::text"
_PRIMARY_INSERT_SQL = "SELECT pg_current_wal_insert_lsn()::text"


def _primary_sql(insert: bool) -> str:
    return _PRIMARY_INSERT_SQL if insert else _PRIMARY_SQL


def primary_position(conn: Any, *, insert: bool = False) -> ReplicationPosition:
    """The primary's WAL position; call it after the write has committed.

    ``conn``: a psycopg connection or cursor, any DB-API cursor (e.g. Django's), or an
    SQLAlchemy ``Connection`` (for a ``Session``, pass ``session.connection()``).
    ``insert=True`` reads ``pg_current_wal_insert_lsn()`` instead (see the module source).
    """
    sql = _primary_sql(insert)
    if hasattr(conn, "exec_driver_sql"):  # SQLAlchemy Connection
        value = conn.exec_driver_sql(sql).scalar()
    else:
        cur = conn.execute(sql)
        value = (cur if cur is not None and hasattr(cur, "fetchone") else conn).fetchone()[0]
    return ReplicationPosition.parse(str(value))


async def primary_position_async(conn: Any, *, insert: bool = False) -> ReplicationPosition:
    """:func:`primary_position` for a psycopg ``AsyncConnection`` / ``AsyncCursor`` or an
    SQLAlchemy ``AsyncConnection``."""
    sql = _primary_sql(insert)
    if hasattr(conn, "exec_driver_sql"):
        value = (await conn.exec_driver_sql(sql)).scalar()
    else:
        cur = await conn.execute(sql)
        value = (await (cur if cur is not None else conn).fetchone())[0]
    return ReplicationPosition.parse(str(value))


# On a replica: the end of the last WAL record replayed. On a primary (a watcher pointed at the
# primary region's own database, or a replica since promoted) everything is "replayed".
_REPLAY_SQL = (
    "SELECT CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn()"
    " ELSE pg_current_wal_lsn() END::text"
)

# ---- the watcher ---------------------------------------------------------------------------

# Upper bounds (ms) of the wait-time histogram buckets; the last bucket is "more".
WAIT_BUCKETS_MS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500)


class ReplayWatcher:
    """Follows a replica's replay position; ONE per process, shared by all requests.

    * ``replayed`` is refreshed in the background every ``idle_interval_s`` (default 200 ms).
    * ``await wait_for(position, timeout_s)`` returns True at once, with no query, when
      ``replayed >= position``. Otherwise the request registers a waiter and the watcher polls
      the replica every ``poll_interval_s`` (default 2 ms) only while waiters exist, waking every
      satisfied waiter at each poll: one query per poll whatever the number of waiting reads.
    * ``stats()``: reads served at once / after a wait / timed out, wait times, queries, lag.

    Errors talking to the replica never escape the background task: the watcher reconnects,
    ``healthy`` turns False meanwhile, and waiters run into their timeout (the gateway then
    forwards the read).
    """

    def __init__(
        self,
        replica_dsn: str,
        poll_interval_s: float = 0.002,
        idle_interval_s: float = 0.2,
        connect_timeout_s: float = 5.0,
    ):
        if poll_interval_s <= 0 or idle_interval_s <= 0:
            raise ValueError("poll_interval_s and idle_interval_s must be positive")
        self.replica_dsn = replica_dsn
        self.poll_interval_s = poll_interval_s
        self.idle_interval_s = idle_interval_s
        self.connect_timeout_s = connect_timeout_s
        self.replayed: ReplicationPosition | None = None
        self.replayed_at: float | None = None  # monotonic time of the last successful poll
        self.healthy = False
        self.last_error: str | None = None
        self._conn: Any = None
        self._task: asyncio.Task | None = None
        self._wake: asyncio.Event | None = None
        # A heap of (position, seq, future); `_live` counts the futures in it not yet done,
        # `_abandoned` the done ones (timed-out reads) still in it, purged lazily.
        self._waiters: list[tuple[int, int, asyncio.Future]] = []
        self._live = 0
        self._abandoned = 0
        self._seq = itertools.count()
        self._closed = False
        # counters
        self.queries = 0
        self.reads_immediate = 0
        self.reads_waited = 0
        self.reads_timed_out = 0
        self.wait_ms_total = 0.0
        self.wait_ms_max = 0.0
        self._hist = [0] * (len(WAIT_BUCKETS_MS) + 1)

    # -- lifecycle --

    async def start(self, require_connection: bool = True) -> None:
        """Connect, read the replay position once, and start following it.

        With ``require_connection=False`` a replica that is down does not fail the start: the
        watcher keeps trying in the background (reads wait for nothing meanwhile but time out).
        """
        if self._task is not None:
            raise RuntimeError("this ReplayWatcher is already started")
        self._closed = False
        self._wake = asyncio.Event()
        try:
            await self._connect()
            await self._poll()
        except Exception as exc:
            await self._disconnect()
            if require_connection:
                raise
            self.healthy = False
            self.last_error = f"{type(exc).__name__}: {exc}"
        self._task = asyncio.create_task(self._run(), name="latitude-replay-watcher")

    async def close(self) -> None:
        """Stop following; pending waiters return False. Idempotent."""
        self._closed = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for _, _, fut in self._waiters:
            if not fut.done():
                fut.set_result(False)
        self._waiters.clear()
        self._live = self._abandoned = 0
        await self._disconnect()
        self.healthy = False

    async def __aenter__(self) -> ReplayWatcher:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _connect(self) -> None:
        import psycopg

        self._conn = await psycopg.AsyncConnection.connect(
            self.replica_dsn,
            autocommit=True,
            connect_timeout=max(1, int(self.connect_timeout_s)),
            application_name="latitude-replay-watcher",
        )

    async def _disconnect(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close()

    async def _poll(self) -> None:
        self.queries += 1
        cur = await self._conn.execute(_REPLAY_SQL)
        row = await cur.fetchone()
        position = _position_or_none(row[0] if row else None)
        self.replayed_at = time.monotonic()
        self.healthy = True
        self.last_error = None
        if position is not None and (self.replayed is None or position > self.replayed):
            self.replayed = position
        self._release()

    def _release(self) -> None:
        """Wake every waiter whose position has been replayed (and drop abandoned ones)."""
        waiters = self._waiters
        while waiters and (waiters[0][2].done() or self._reached(waiters[0][0])):
            _, _, fut = heapq.heappop(waiters)
            if fut.done():
                self._abandoned -= 1
            else:
                fut.set_result(True)
                self._live -= 1

    def _reached(self, value: int) -> bool:
        return self.replayed is not None and self.replayed.value >= value

    async def _run(self) -> None:
        assert self._wake is not None
        backoff = 0.05
        while not self._closed:
            try:
                if self._conn is None:
                    await self._connect()
                if self._live:
                    await asyncio.sleep(self.poll_interval_s)
                else:
                    self._wake.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), self.idle_interval_s)
                await self._poll()
                backoff = 0.05
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the replica is down or restarting: keep trying
                if self.healthy:
                    log.warning("replay watcher lost %s: %s", _redact(self.replica_dsn), exc)
                self.healthy = False
                self.last_error = f"{type(exc).__name__}: {exc}"
                await self._disconnect()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)

    # -- waiting --

    async def wait_for(self, position: ReplicationPosition | None, timeout_s: float) -> bool:
        """True once the replica has replayed ``position`` (at once, with no query, if it has);
        False if it has not within ``timeout_s`` or the watcher is closed."""
        if position is None or self._reached(position.value):
            self.reads_immediate += 1
            return True
        if self._task is None or self._closed:
            raise RuntimeError("ReplayWatcher.wait_for before start() or after close()")
        if timeout_s <= 0:
            self.reads_timed_out += 1
            return False
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (position.value, next(self._seq), fut))
        self._live += 1
        assert self._wake is not None
        self._wake.set()  # an idle watcher polls right now rather than after its idle interval
        started = time.monotonic()
        try:
            ok = await asyncio.wait_for(asyncio.shield(fut), timeout_s)
        except TimeoutError:  # (released in the very same instant: still a success)
            ok = fut.done() and not fut.cancelled() and fut.result()
        finally:
            if not fut.done():
                fut.cancel()  # abandoned (timed out or the caller was cancelled)
                self._live -= 1
                self._abandoned += 1
                if self._abandoned > 64 and self._abandoned * 2 > len(self._waiters):
                    self._waiters = [w for w in self._waiters if not w[2].done()]
                    heapq.heapify(self._waiters)
                    self._abandoned = 0
        waited_ms = (time.monotonic() - started) * 1000
        self.wait_ms_total += waited_ms
        if ok:
            self.reads_waited += 1
            self.wait_ms_max = max(self.wait_ms_max, waited_ms)
            self._hist[_bucket(waited_ms)] += 1
        else:
            self.reads_timed_out += 1
        return ok

    @property
    def waiting(self) -> int:
        """Reads waiting right now."""
        return self._live

    def stats(self) -> dict[str, Any]:
        buckets = {f"le_{b}ms": n for b, n in zip(WAIT_BUCKETS_MS, self._hist, strict=False)}
        buckets["more"] = self._hist[-1]
        age = None if self.replayed_at is None else time.monotonic() - self.replayed_at
        return {
            "replayed": str(self.replayed) if self.replayed else None,
            "replayed_age_ms": None if age is None else round(age * 1000, 1),
            "healthy": self.healthy,
            "last_error": self.last_error,
            "waiting": self.waiting,
            "queries": self.queries,
            "reads_immediate": self.reads_immediate,
            "reads_waited": self.reads_waited,
            "reads_timed_out": self.reads_timed_out,
            "wait_ms_total": round(self.wait_ms_total, 3),
            "wait_ms_max": round(self.wait_ms_max, 3),
            "wait_ms_histogram": buckets,
        }


def _bucket(ms: float) -> int:
    for i, bound in enumerate(WAIT_BUCKETS_MS):
        if ms <= bound:
            return i
    return len(WAIT_BUCKETS_MS)


def _redact(dsn: str) -> str:
    return re.sub(r"(//[^:/@]*:)[^@]*@", r"\1***@", dsn)


# ---- modes ---------------------------------------------------------------------------------


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


async def ensure_read_consistency(
    mode: ConsistencyMode,
    watcher: ReplayWatcher,
    *,
    cookie_position: ReplicationPosition | None = None,
    strong: StrongPositionSource | None = None,
    timeout_s: float = 0.5,
) -> bool:
    """For a read at a replica region: True when it may be served locally now (after waiting,
    bounded, if needed), False when the gateway should forward it to the primary instead."""
    if mode is ConsistencyMode.EVENTUAL:
        return True
    deadline = time.monotonic() + timeout_s
    target = cookie_position
    if mode is ConsistencyMode.STRONG:
        if strong is None:
            raise ValueError("STRONG consistency needs a StrongPositionSource")
        try:
            target = await strong.current(timeout_s)
        except Exception:  # the primary is unreachable or slow: freshness cannot be proven
            return False
        if cookie_position is not None and cookie_position > target:
            target = cookie_position
    if target is None:
        return True
    return await watcher.wait_for(target, max(0.0, deadline - time.monotonic()))
