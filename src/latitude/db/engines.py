"""SQLAlchemy 2.x engines that follow the request's route: reads to the local replica, writes
to the primary (``postgresql+psycopg``), sync (:class:`RoutedEngines`) and async
(:class:`AsyncRoutedEngines`). A write on the replica engine raises
:class:`~latitude.db.route.WriteOnReplicaError`; inside a claimed request the primary engine
marks the claim applied in each transaction (the fence)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import Session

from latitude.claims import claim_statement
from latitude.db.route import (
    PRIMARY,
    REPLICA,
    ClaimInTransaction,
    ClaimRefused,
    WriteOnReplicaError,
    current_claim,
    current_route,
    database_urls,
    error_line,
    first_value,
    is_read_only_error,
    mark_claim,
)

if TYPE_CHECKING:
    from latitude.topology import Topology

__all__ = ["AsyncRoutedEngines", "RoutedEngines", "sqlalchemy_url"]

_PG_SCHEMES = ("postgresql", "postgres")


def sqlalchemy_url(url: str) -> str:
    """A topology's ``postgresql://`` / ``postgres://`` URL as an SQLAlchemy URL on psycopg 3
    (``postgresql+psycopg://``); a URL naming a driver already is kept."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ValueError(f"{url!r} is not a database URL; write it like postgresql://app@host/db")
    dialect, _, driver = scheme.partition("+")
    if dialect not in _PG_SCHEMES:
        raise ValueError(
            f"{scheme}:// is not a Postgres URL; Latitude routes Postgres databases "
            "(postgresql://...)"
        )
    return f"postgresql+{driver or 'psycopg'}://{rest}"


def _translate_read_only(ctx: Any) -> None:
    """``handle_error`` listener on a replica engine: 25006 becomes WriteOnReplicaError."""
    if is_read_only_error(ctx.original_exception):
        raise WriteOnReplicaError(
            detail=error_line(ctx.original_exception), statement=ctx.statement
        ) from ctx.sqlalchemy_exception


def _fence_claim(conn: Any) -> None:
    """``begin`` listener on the primary engine: inside a claimed request (the gateway sets
    :data:`~latitude.db.route.current_claim`), mark the claim applied as the transaction's
    first statement, or make the claim there (:class:`ClaimInTransaction`), so the mark or the
    claim commits with the app's writes or not at all. Run on the DBAPI connection: the driver
    opens the transaction with it, and SQLAlchemy's own begin is not re-entered."""
    fence = current_claim.get()
    if fence is None or current_route.get() != PRIMARY:
        return
    if isinstance(fence, ClaimInTransaction):
        _claim_in_transaction(conn.connection.dbapi_connection, fence)
        return
    mark_claim(conn.connection.dbapi_connection, fence)


def _claim_in_transaction(dbapi_connection: Any, claim: ClaimInTransaction) -> None:
    """Make ``claim`` in the transaction just opened, or refuse the transaction: rolled back at
    once (it row-locked the key's row, and the app may hold the connection for a while), before
    any statement of the app's."""
    if not claim.refused:
        sql, params = claim_statement(
            claim.key, claim.request_hash, claim.runner, claim.stale_after_s, claim.owner
        )
        if first_value(dbapi_connection, sql, params) == 1:
            claim.taken = True
            return
        claim.refused = True
        dbapi_connection.rollback()
    raise ClaimRefused(claim.key)


class _Routed:
    """What the sync and async flavours share: two engines and the choice between them."""

    _create_engine: Any  # create_engine or create_async_engine

    def __init__(
        self,
        replica_url: str,
        primary_url: str,
        *,
        primary_engine_kwargs: Mapping[str, Any] | None = None,
        replica_engine_kwargs: Mapping[str, Any] | None = None,
        **engine_kwargs: Any,
    ):
        create = type(self)._create_engine
        self.replica_url = sqlalchemy_url(replica_url)
        self.primary_url = sqlalchemy_url(primary_url)
        # A remote primary's pooled connections cross the ocean and may die quietly: ping them
        # before use (one round trip) rather than fail the request.
        self.primary = create(
            self.primary_url,
            **{"pool_pre_ping": True, **engine_kwargs, **(primary_engine_kwargs or {})},
        )
        event.listen(getattr(self.primary, "sync_engine", self.primary), "begin", _fence_claim)
        if self.replica_url == self.primary_url and not replica_engine_kwargs:
            self.replica = self.primary  # the primary region: one database, one pool
        else:
            self.replica = create(
                self.replica_url, **{**engine_kwargs, **(replica_engine_kwargs or {})}
            )
            sync_engine = getattr(self.replica, "sync_engine", self.replica)
            event.listen(sync_engine, "handle_error", _translate_read_only)

    @property
    def shared(self) -> bool:
        """True when reads and writes use the same database (the primary region)."""
        return self.replica is self.primary

    def _engine(self) -> Any:
        route = current_route.get()
        if route == PRIMARY:
            return self.primary
        if route == REPLICA:
            return self.replica
        raise ValueError(f"current_route is {route!r}; it must be 'replica' or 'primary'")

    @classmethod
    def from_topology(cls, topology: Topology, region_name: str, **kwargs: Any) -> Any:
        """Engines for an app running in ``region_name`` (see :func:`database_urls`)."""
        local, primary = database_urls(topology, region_name)
        return cls(local, primary, **kwargs)


class RoutedEngines(_Routed):
    """Sync SQLAlchemy engines for a region: ``engine()`` / ``session()`` follow
    :data:`~latitude.db.route.current_route`.

    ``engine_kwargs`` go to both ``create_engine`` calls; ``primary_engine_kwargs`` /
    ``replica_engine_kwargs`` to one only. The primary's pool uses ``pool_pre_ping=True``.
    """

    primary: Engine
    replica: Engine

    _create_engine = staticmethod(create_engine)

    def engine(self) -> Engine:
        return self._engine()

    def session(self, **kwargs: Any) -> Session:
        """A new ``Session`` bound to the engine of the current route."""
        return Session(bind=self.engine(), **kwargs)

    def warm(self, connections: int = 1) -> None:
        """Open ``connections`` to the primary ahead of need, so the fallback path does not pay
        the connection handshakes across the ocean on its first request."""
        conns = [self.primary.connect() for _ in range(connections)]
        for c in conns:
            c.close()

    def dispose(self) -> None:
        self.primary.dispose()
        if self.replica is not self.primary:
            self.replica.dispose()


class AsyncRoutedEngines(_Routed):
    """:class:`RoutedEngines` for asyncio: ``AsyncEngine`` / ``AsyncSession`` (psycopg async)."""

    primary: AsyncEngine
    replica: AsyncEngine

    _create_engine = staticmethod(create_async_engine)

    def engine(self) -> AsyncEngine:
        return self._engine()

    def session(self, **kwargs: Any) -> AsyncSession:
        """A new ``AsyncSession`` bound to the engine of the current route."""
        return AsyncSession(bind=self.engine(), **kwargs)

    async def warm(self, connections: int = 1) -> None:
        """Open ``connections`` to the primary ahead of need (concurrently)."""
        import asyncio

        conns = await asyncio.gather(*(self.primary.connect() for _ in range(connections)))
        for c in conns:
            await c.close()

    async def dispose(self) -> None:
        await self.primary.dispose()
        if self.replica is not self.primary:
            await self.replica.dispose()
