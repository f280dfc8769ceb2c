"""The route of the current request: which database its SQL may use, and the errors that name it.

The gateway sets :data:`current_route` before calling the app: a local read at a replica region
gets ``"replica"``; everything at the primary region, forwarded requests and local-fallback writes
get ``"primary"``. The engines and routers of :mod:`latitude.db` read it to pick a database.
Nothing here imports a database driver: the gateway uses this module without SQLAlchemy.
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from latitude.topology import Topology

__all__ = [
    "PRIMARY",
    "READ_ONLY_SQL_TRANSACTION",
    "REPLICA",
    "ClaimFence",
    "ClaimInTransaction",
    "ClaimLost",
    "ClaimRefused",
    "RequestInfo",
    "WriteOnReplicaError",
    "claimed",
    "claiming",
    "current_claim",
    "current_request",
    "current_route",
    "database_urls",
    "error_line",
    "is_read_only_error",
    "mark_claim",
    "request_context",
    "route_to_primary",
    "route_to_replica",
    "routed_request",
]

REPLICA = "replica"
PRIMARY = "primary"

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


class _Set:
    """Context vars set for a block and reset after it. A class, not a generator-based
    context manager: the gateway enters one for every request, and this costs a third."""

    __slots__ = ("_pairs", "_tokens")

    def __init__(self, *pairs: tuple[ContextVar, Any]) -> None:
        self._pairs = pairs
        self._tokens: list = []

    def __enter__(self) -> None:
        self._tokens = [var.set(value) for var, value in self._pairs]

    def __exit__(self, *exc: object) -> None:
        for (var, _), token in zip(reversed(self._pairs), reversed(self._tokens), strict=True):
            var.reset(token)


def _set(var: ContextVar, value: Any) -> _Set:
    return _Set((var, value))


def routed_request(route: str, method: str, path: str, region: str | None = None) -> _Set:
    """``route_to_primary()`` or ``route_to_replica()`` (by `route`) and ``request_context``
    at once: what the gateway enters around each request it runs here."""
    return _Set(
        (current_route, PRIMARY if route == PRIMARY else REPLICA),
        (current_request, RequestInfo(method.upper(), path, region)),
    )


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


# ---- the idempotency claim a request runs under ---------------------------------------------


@dataclass(frozen=True, slots=True)
class ClaimFence:
    """The idempotency claim the current request runs under (key and claim time), and how long
    the database may wait, within one of its transactions, for the app's next statement."""

    key: str
    started_at: Any
    idle_timeout_s: float | None = None


@dataclass(slots=True)
class ClaimInTransaction:
    """A claim not made yet: the first statement of each of the app's transactions on the
    primary makes it (``[gateway] idempotency_claim = "in_transaction"``, docs/gateway.md).
    ``runner`` is the run's own token. The gateway reads what happened after the run:
    ``taken`` once a transaction held the claim (it exists if that one committed), ``refused``
    once the key turned out to be anyone else's (every transaction from then on fails)."""

    key: str
    request_hash: str
    runner: str
    stale_after_s: float = 60.0
    owner: int | None = None  # the gateway process's liveness id (`latitude.liveness`)
    taken: bool = False
    refused: bool = False


current_claim: ContextVar[ClaimFence | ClaimInTransaction | None] = ContextVar(
    "latitude_claim", default=None
)
"""Set by the gateway while the app runs a claimed (non-read) request. :mod:`latitude.db` then
marks the claim "applied" inside each of the app's transactions on the primary, so a commit
and its mark land together or not at all: a retry can tell "never ran" from "ran, answer lost",
and a run whose claim was taken over cannot commit (see :mod:`latitude.idempotency`)."""


def claimed(
    key: str, started_at: Any, idle_timeout_s: float | None = None
) -> contextlib.AbstractContextManager[None]:
    """``with claimed(claim.key, claim.started_at): ...`` sets :data:`current_claim`."""
    return _set(current_claim, ClaimFence(key, started_at, idle_timeout_s))


def claiming(claim: ClaimInTransaction) -> contextlib.AbstractContextManager[None]:
    """``with claiming(pending): ...`` lets the app's transactions make the claim ``pending``."""
    return _set(current_claim, claim)


class ClaimLost(Exception):
    """The request's idempotency claim is no longer its own (taken over, or settled): its
    transaction is refused before it writes anything."""

    def __init__(self, key: str):
        super().__init__(
            f"idempotency key {key!r}: this run's claim was taken over by a retry; "
            "its transaction is refused so that the request runs once"
        )


def mark_claim(dbapi_connection: Any, fence: ClaimFence) -> None:
    """The fence's mark as the first statement of the transaction the DBAPI connection is
    opening (SQLAlchemy's engines and Django's wrapper both run it), or `ClaimLost` if the
    claim is no longer this run's."""
    from latitude.claims import fence_statement

    sql, params = fence_statement(fence.key, fence.started_at, fence.idle_timeout_s)
    if first_value(dbapi_connection, sql, params) != 1:
        raise ClaimLost(fence.key)


def first_value(dbapi_connection: Any, sql: str, params: tuple) -> Any:
    """The first column of the first row of one statement, on a DBAPI connection."""
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(sql, params)
        return cursor.fetchone()[0]
    finally:
        cursor.close()


class ClaimRefused(ClaimLost):
    """The key the request runs under is already anyone else's (a retry of a completed
    request, a concurrent duplicate, another request's key): the transaction is rolled back
    before it writes anything, and the gateway answers from the stored outcome."""

    def __init__(self, key: str):
        Exception.__init__(
            self,
            f"idempotency key {key!r}: the key is already held or done (a retry or a "
            "duplicate); this transaction is refused before it writes anything, and the "
            "gateway answers from the stored outcome",
        )


# ---- a write on the replica route -------------------------------------------------------------

READ_ONLY_SQL_TRANSACTION = "25006"


def is_read_only_error(exc: BaseException | None) -> bool:
    """Whether ``exc`` (or the driver error it wraps) is Postgres' ``read_only_sql_transaction``:
    "cannot execute INSERT in a read-only transaction", as a hot standby answers any write."""
    seen = 0
    while exc is not None and seen < 4:
        code = getattr(exc, "sqlstate", None) or getattr(exc, "pgcode", None)
        if code == READ_ONLY_SQL_TRANSACTION:
            return True
        exc = getattr(exc, "orig", None) or exc.__cause__
        seen += 1
    return False


def error_line(exc: BaseException) -> str:
    """The first line of the driver's message behind ``exc``."""
    orig = getattr(exc, "orig", None) or exc.__cause__ or exc
    text = str(orig).strip()
    return text.splitlines()[0] if text else type(orig).__name__


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
                "`latitude.db.route_to_primary()` or use the primary database." + pg
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


# ---- a region's databases --------------------------------------------------------------------


def database_urls(topology: Topology, region_name: str) -> tuple[str, str]:
    """``(local, primary)`` database URLs of a region: the primary region uses its own database
    for both; a replica region reads its local replica and writes to ``primary_database_url``."""
    region = topology.region(region_name)
    where = f"{topology.source}: regions ({region.name})"
    if not region.database_url:
        raise ValueError(
            f"{where}.database_url is not set; set it to the region's Postgres URL, like "
            f'database_url = "postgresql://app@db.{region.name}.internal:5432/app"'
        )
    if region.primary:
        return region.database_url, region.database_url
    if not region.primary_database_url:
        raise ValueError(
            f"{where}.primary_database_url is not set and no primary region has a database_url; "
            'set it, like primary_database_url = "postgresql://app@primary-db.internal:5432/app"'
        )
    return region.database_url, region.primary_database_url
